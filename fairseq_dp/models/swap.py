# Copyright (c) fairseq_dp contributors. MIT license.
"""Reparametrized and adapter layers by swapping Linear modules after fairseq
has built the model.

fairseq builds a stock model (RoBERTa, ``transformer_lm``, ...); then
:func:`swap_linears` replaces the chosen ``nn.Linear`` modules of every
transformer layer (encoder or decoder) by a subclass made from the Linear
(:class:`LoRALinear`, :class:`LowRankLinear`). The subclasses keep the
Linear's ``weight`` / ``bias`` names, so parameter names, checkpoints and
fairseq's initialization stay those of the stock model; nothing of fairseq's
model or layer classes is copied.

Targets are named as in the papers' code: ``q``, ``k``, ``v``, ``out``
(self-attention projections) and ``fc1``, ``fc2`` (the FFN).
"""

from typing import Callable, Dict, List, Sequence

import torch
import torch.nn as nn
from fairseq.modules.transformer_layer import TransformerDecoderLayerBase, TransformerEncoderLayerBase

from ..errors import DPConfigError

# the module path of each target inside one fairseq transformer layer
LAYER_TARGETS: Dict[str, str] = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "out": "self_attn.out_proj",
    "fc1": "fc1",
    "fc2": "fc2",
}
ALL_TARGETS = ",".join(LAYER_TARGETS)
TRANSFORMER_LAYERS = (TransformerEncoderLayerBase, TransformerDecoderLayerBase)

CARRIER_SOURCES = ("weight", "update")
# help of RGP's options, shared by roberta_rgp and transformer_lm_rgp
RGP_HELP = {
    "rgp_rank": "rank of the gradient carriers L (out x R) and R (R x in) of every reparametrized matrix",
    "rgp_power_iters": "power iterations computing the carriers before each update",
    "rgp_carrier_source": "matrix whose top singular subspace gives the carriers: the current weight "
    "(the published language code) or the update since the start of training (the paper's historical update)",
    "rgp_reference_projection": "rebuild weight gradients with the published code's '+ L Lt dL R' instead "
    "of the projection's '-' (only to reproduce published numbers)",
    "rgp_targets": f"comma-separated matrices of every transformer layer that are reparametrized, from {ALL_TARGETS}",
}


def parse_targets(spec: str, flag: str = "--lora-targets") -> List[str]:
    """``"q,v"`` -> ``["q", "v"]``; anything outside :data:`LAYER_TARGETS`, a
    repeated name or an empty list is a user mistake."""
    targets = [t.strip() for t in (spec or "").split(",") if t.strip()]
    unknown = [t for t in targets if t not in LAYER_TARGETS]
    if unknown or not targets or len(set(targets)) != len(targets):
        raise DPConfigError(f"{flag} must be a comma-separated subset of {ALL_TARGETS}, got {spec!r}")
    return targets


def transformer_layers(model: nn.Module) -> List[nn.Module]:
    return [m for m in model.modules() if isinstance(m, TRANSFORMER_LAYERS)]


def swap_linears(model: nn.Module, targets: Sequence[str], make: Callable[[nn.Linear], nn.Linear],
                 arch: str = "this architecture") -> int:
    """Replace ``targets`` of every encoder and decoder layer of ``model`` by
    ``make(linear)``; returns the number of modules replaced.

    Only plain ``nn.Linear`` modules without hooks are replaced: a subclass
    (already swapped) or a hooked Linear (``--quant-noise-pq`` registers a
    forward pre-hook) would silently lose what it does.
    """
    layers = transformer_layers(model)
    if not layers:
        raise DPConfigError(f"{arch}: the model has no fairseq transformer layer whose matrices could be swapped")
    swapped = 0
    for layer in layers:
        for target in targets:
            owner_path, _, attr = LAYER_TARGETS[target].rpartition(".")
            owner = layer.get_submodule(owner_path) if owner_path else layer
            linear = getattr(owner, attr)
            if type(linear) is not nn.Linear:
                raise DPConfigError(f"{arch}: {LAYER_TARGETS[target]} is a {type(linear).__name__}, "
                                    "not a plain nn.Linear, and cannot be swapped")
            if linear._forward_pre_hooks or linear._forward_hooks:
                raise DPConfigError(f"{arch} does not support --quant-noise-pq (or any other hook on "
                                    f"{LAYER_TARGETS[target]}): drop it")
            setattr(owner, attr, make(linear))
            swapped += 1
        # fairseq's attention fast path (F.multi_head_attention_forward) reads
        # q/k/v/out_proj.weight directly and would skip a swapped module's own
        # forward; this is the switch fairseq checks to call the modules
        layer.self_attn._set_skip_embed_dim_check()
    return swapped


def keep_missing_parameters(model: nn.Module, state_dict: Dict, prefix: str, module_type: type,
                            names: Sequence[str]) -> int:
    """For ``upgrade_state_dict_named``: the parameters ``names`` of every
    ``module_type`` module that ``state_dict`` lacks (a plain checkpoint has no
    adapters) are filled in from the model, so they keep their initialization
    (LoRA: B = 0, the model starts as the checkpoint). Returns how many."""
    prefix = prefix + "." if prefix else ""
    added = 0
    for module_name, module in model.named_modules():
        if isinstance(module, module_type):
            for name in names:
                key = f"{prefix}{module_name}.{name}"
                if key not in state_dict:
                    state_dict[key] = getattr(module, name).detach().clone()
                    added += 1
    return added


def check_lora_args(rank: int, targets_spec: str) -> List[str]:
    """LoRA's options, checked before the model is built; returns the targets."""
    if rank < 1:
        raise DPConfigError(f"--lora-rank must be >= 1, got {rank}")
    return parse_targets(targets_spec, "--lora-targets")


def add_lora(model: nn.Module, rank: int, alpha: float, targets_spec: str, arch: str) -> List[str]:
    """DP-LoRA: the ``targets`` of every layer become :class:`LoRALinear` of
    rank ``rank`` and scale ``alpha / rank``; every other parameter is frozen
    (callers unfreeze what else trains, such as classification heads).
    Returns the targets."""
    from ..modules import LoRALinear

    targets = check_lora_args(rank, targets_spec)
    swap_linears(model, targets, lambda linear: LoRALinear.from_linear(linear, rank=rank, alpha=alpha), arch)
    for name, param in model.named_parameters():
        param.requires_grad_(name.endswith((".lora_A", ".lora_B")))
    return targets


def add_rgp(model: nn.Module, rank: int, reference_projection: bool, targets_spec: str, arch: str) -> List[str]:
    """RGP: the ``targets`` of every layer become :class:`LowRankLinear`
    (rank-``rank`` gradient carriers); only their weights train, everything
    else (embeddings, LayerNorms, biases) is frozen. Returns the targets."""
    from ..modules import LowRankLinear

    targets = parse_targets(targets_spec, "--rgp-targets")

    def low_rank(linear: nn.Linear) -> LowRankLinear:
        # the new module's random initialization is overwritten by the copy;
        # restoring the RNG keeps every later draw (heads, carriers' random
        # starts) as in the stock model, so a seed gives the same start as
        # fairseq's own architecture
        with torch.random.fork_rng(devices=[]):
            return LowRankLinear.from_linear(
                linear,
                rank=rank,
                batch_dim=1,  # fairseq's encoder and decoder layers run time-major (T, B, C)
                reference_projection=reference_projection,
            )

    swap_linears(model, targets, low_rank, arch)
    for param in model.parameters():
        param.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, LowRankLinear):
            module.weight.requires_grad_(True)
    return targets


def check_rgp_args(args, arch: str) -> None:
    """RGP's options, and the fairseq options it cannot train with."""
    from fairseq.utils import safe_getattr

    if args.rgp_rank < 1:
        raise DPConfigError(f"--rgp-rank must be >= 1, got {args.rgp_rank}")
    if args.rgp_power_iters < 1:
        raise DPConfigError(f"--rgp-power-iters must be >= 1, got {args.rgp_power_iters}")
    if args.rgp_carrier_source not in CARRIER_SOURCES:
        raise DPConfigError(
            f"--rgp-carrier-source must be one of {CARRIER_SOURCES}, got {args.rgp_carrier_source!r}"
        )
    # recomputed activations would record every carrier gradient twice; quant
    # noise would change the weight the carriers reparametrize
    if safe_getattr(args, "checkpoint_activations", False) or (safe_getattr(args, "quant_noise_pq", 0) or 0) > 0:
        raise DPConfigError(f"{arch} does not support --checkpoint-activations or --quant-noise-pq")

