# Copyright (c) fairseq_dp contributors. MIT license.
"""A checkpoint whose encoder does not fit the model's architecture.

torch's strict ``load_state_dict`` answers a wrong ``--arch`` (say
``roberta_rgp_base`` for a converted MiniLM) with one ``size mismatch`` line per
tensor, hundreds of lines, and fairseq re-raises that as "Cannot load model
parameters". This check runs first (a ``load_state_dict`` pre-hook on the
model, torch's public mechanism, so it also covers fairseq's own RoBERTa
classes) and raises one :class:`DPConfigError` that says what the checkpoint's
encoder is and which flags rebuild it.
"""

import logging
import os
import re
from typing import Dict, Optional, Tuple

from fairseq.models import ARCH_MODEL_REGISTRY
from torch import nn

from .checkpoint_ledger import own_last_checkpoint, restored_checkpoint_path
from .errors import DPConfigError

logger = logging.getLogger(__name__)

ENC = "encoder.sentence_encoder."
LAYER = re.compile(r"^" + re.escape(ENC) + r"layers\.(\d+)\.")
# (layers, embedding dim, FFN dim) of the archs the plugin ships sizes for
KNOWN_SIZES = {(6, 384, 1536): "_minilm", (12, 768, 3072): "_base", (24, 1024, 4096): "_large",
               (4, 312, 1200): "_tiny"}
HOOKED = "_fairseq_dp_checks_checkpoint_fit"


def encoder_sizes(shapes: Dict[str, Tuple[int, ...]], prefix: str = "") -> Optional[dict]:
    """Layers, dims, vocabulary and position rows of a RoBERTa encoder state."""
    def shape(name):
        return shapes.get(prefix + ENC + name)

    embed, fc1 = shape("embed_tokens.weight"), shape("layers.0.fc1.weight")
    if embed is None or fc1 is None:
        return None
    layers = {int(m.group(1)) for k in shapes for m in [LAYER.match(k[len(prefix):])] if k.startswith(prefix) and m}
    positions = shape("embed_positions.weight")
    return {
        "layers": len(layers),
        "embed_dim": embed[1],
        "ffn_dim": fc1[0],
        "vocabulary": embed[0],
        # fairseq's learned positions keep padding_idx + 1 = 2 extra rows
        "max_positions": positions[0] - 2 if positions is not None else None,
    }


def fit_message(arch: Optional[str], theirs: dict, ours: dict, example: str, lora_rank: Optional[int] = None) -> str:
    arch = arch or "this model"
    lines = [f"the checkpoint does not fit --arch {arch} ({example})."]
    what = (f"Its encoder has {theirs['layers']} layers, embedding dim {theirs['embed_dim']}, "
            f"FFN dim {theirs['ffn_dim']}")
    if theirs["max_positions"] is not None:
        what += f", {theirs['max_positions']} positions"
    lines.append(what + f" and {theirs['vocabulary']} vocabulary rows; the model has "
                 f"{ours['layers']}, {ours['embed_dim']}, {ours['ffn_dim']}"
                 + (f", {ours['max_positions']}" if ours["max_positions"] is not None else "")
                 + f" and {ours['vocabulary']}.")
    sizes = (theirs["layers"], theirs["embed_dim"], theirs["ffn_dim"])
    if sizes != (ours["layers"], ours["embed_dim"], ours["ffn_dim"]):
        suffix = KNOWN_SIZES.get(sizes)
        family = re.sub(r"_(base|large|minilm|tiny)$", "", arch)
        flags = (f"--encoder-layers {sizes[0]} --encoder-embed-dim {sizes[1]} "
                 f"--encoder-ffn-embed-dim {sizes[2]} --encoder-attention-heads H "
                 "(the checkpoint's number of heads)")
        if suffix and family + suffix in ARCH_MODEL_REGISTRY:
            lines.append(f"Use --arch {family + suffix}, or give {flags}.")
        else:
            lines.append(f"Give {flags}.")
    if theirs["max_positions"] is not None and theirs["max_positions"] != ours["max_positions"]:
        lines.append(f"Set --max-positions {theirs['max_positions']} (or the value it was trained with).")
    if lora_rank is not None:
        lines.append(f"Its LoRA adapters have rank {lora_rank}: give --lora-rank {lora_rank}.")
    if theirs["vocabulary"] != ours["vocabulary"]:
        lines.append("The vocabulary differs: the data must be binarized with the checkpoint's own "
                     "dict.txt (fairseq-dp-prepare-glue --dict CHECKPOINT_DIR/dict.txt).")
    lines.append("A checkpoint written by fairseq-dp-convert lists the flags that rebuild its encoder "
                 "in convert.json next to model.pt (\"roberta_rgp_flags\" for the plugin's archs, "
                 "\"fairseq_flags\" for fairseq's roberta).")
    return "\n".join(lines)


def check_checkpoint_fits(model: nn.Module, state_dict, prefix: str = "", conversion: Optional[dict] = None) -> None:
    """Raise a DPConfigError if the RoBERTa encoder in ``state_dict`` has other
    sizes than ``model``'s; anything else is left to torch's strict load."""
    own = {k: tuple(t.shape) for k, t in list(model.named_parameters()) + list(model.named_buffers())}
    theirs = {k[len(prefix):]: tuple(v.shape) for k, v in state_dict.items()
              if k.startswith(prefix) and hasattr(v, "shape")}
    mismatched = [k for k in own if k in theirs and theirs[k] != own[k]]
    ours_sizes, their_sizes = encoder_sizes(own), encoder_sizes(theirs)
    if their_sizes is None or ours_sizes is None:
        return
    if not mismatched and their_sizes == ours_sizes:
        return
    if mismatched:
        k = mismatched[0]
        example = (f"{len(mismatched)} tensors differ in shape, e.g. {k}: checkpoint "
                   f"{list(theirs[k])}, model {list(own[k])}")
    else:
        example = f"{their_sizes['layers']} layers in the checkpoint, {ours_sizes['layers']} in the model"
    args = getattr(model, "args", None)
    arch = getattr(args, "arch", None) or getattr(args, "_name", None)
    # LoRA's A factor is (rank x in)
    lora = [k for k in mismatched if k.endswith(".lora_A")]
    lora_rank = theirs[lora[0]][0] if lora else None
    message = fit_message(arch, their_sizes, ours_sizes, example, lora_rank)
    if conversion:
        # the checkpoint's own record replaces the pointer to convert.json
        message = message.rsplit("\n", 1)[0]
        message += ("\nThis checkpoint was converted by fairseq-dp-convert; the flags that rebuild its "
                    f"encoder: {' '.join(conversion.get('roberta_rgp_flags', []))} (plugin archs), "
                    f"{' '.join(conversion.get('fairseq_flags', []))} (fairseq's roberta).")
    raise DPConfigError(message)


DEC = "decoder."
DEC_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def decoder_sizes(shapes: Dict[str, Tuple[int, ...]]) -> Optional[dict]:
    """A causal LM's sizes from its tensor shapes (fairseq's transformer_lm names)."""
    embed = shapes.get(DEC + "embed_tokens.weight")
    if embed is None:
        return None
    # LoRA factors are not the checkpoint's own (a LoRA model adds them to a plain one)
    layers = {int(m.group(1)) for k in shapes if ".lora_" not in k for m in [DEC_LAYER.match(k)] if m}
    fc1 = shapes.get(DEC + "layers.0.fc1.weight")
    positions = shapes.get(DEC + "embed_positions.weight")
    return {"layers": len(layers), "embed_dim": embed[1], "ffn_dim": fc1[0] if fc1 else None,
            "vocab": embed[0], "position_rows": positions[0] if positions else None}


def decoder_flags(sizes: dict) -> str:
    flags = [f"--decoder-layers {sizes['layers']}", f"--decoder-embed-dim {sizes['embed_dim']}",
             f"--decoder-input-dim {sizes['embed_dim']}", f"--decoder-output-dim {sizes['embed_dim']}"]
    if sizes["ffn_dim"]:
        flags.append(f"--decoder-ffn-embed-dim {sizes['ffn_dim']}")
    if sizes["position_rows"]:
        # learned positions keep padding_idx + 1 = 2 rows before the first position
        flags.append(f"--max-target-positions {sizes['position_rows'] - 2}")
    return " ".join(flags)


def check_decoder_fits(model: nn.Module, state_dict, prefix: str = "") -> None:
    """A language model's checkpoint whose sizes differ from the model's gets
    one message with the flags that rebuild it; a checkpoint whose output
    projection differs from its token embedding (trained untied) is refused
    for a tied model, which would silently keep only one of the two."""
    # the state dict's names: a tied weight is there under both of its names
    own = {k: tuple(t.shape) for k, t in model.state_dict(keep_vars=True).items() if hasattr(t, "shape")}
    theirs = {k[len(prefix):]: tuple(v.shape) for k, v in state_dict.items()
              if k.startswith(prefix) and hasattr(v, "shape")}
    their_sizes = decoder_sizes(theirs)
    if their_sizes is None or decoder_sizes(own) is None:
        return
    def weights(names):  # the checkpoint's own weights, not LoRA factors, the ledger or buffers
        return {k for k in names if k.endswith((".weight", ".bias")) and ".lora_" not in k}

    mismatched = sorted(k for k in weights(own) if k in theirs and theirs[k] != own[k])

    missing, unexpected = sorted(weights(own) - weights(theirs)), sorted(weights(theirs) - weights(own))
    if mismatched or missing or unexpected:
        if mismatched:
            k = mismatched[0]
            what = (f"{len(mismatched)} tensor{'s' if len(mismatched) > 1 else ''} differ in shape, e.g. {k}: "
                    f"checkpoint {list(theirs[k])}, model {list(own[k])}")
        else:
            what = "; ".join(part for part in (
                f"the model has {len(missing)} weights the checkpoint lacks (e.g. {missing[0]})" if missing else "",
                f"the checkpoint has {len(unexpected)} the model lacks (e.g. {unexpected[0]})" if unexpected else "",
            ) if part)
        hints = []
        if DEC + "embed_positions.weight" in unexpected:
            hints.append("--decoder-learned-pos (the checkpoint has learned positions)")
        if DEC + "layer_norm.weight" in unexpected:
            hints.append("--decoder-normalize-before (the checkpoint is pre-LayerNorm with a final LayerNorm)")
        raise DPConfigError(
            f"the checkpoint's language model does not fit --arch's: {what}. The checkpoint has "
            f"{their_sizes['layers']} layers, embedding dim {their_sizes['embed_dim']}, FFN dim "
            f"{their_sizes['ffn_dim']} and {their_sizes['vocab']} dictionary entries; rebuild it with "
            f"{decoder_flags(their_sizes)}" + (", " + ", ".join(hints) if hints else "")
            + " (and the dictionary it was trained with; a converted checkpoint's convert.json lists "
            "every flag under fairseq_flags)"
        )
    decoder = getattr(model, "decoder", None)
    embed_key, out_key = prefix + DEC + "embed_tokens.weight", prefix + DEC + "output_projection.weight"
    tied = (decoder is not None and getattr(decoder, "output_projection", None) is not None
            and decoder.output_projection.weight is getattr(decoder, "embed_tokens", None).weight)
    if tied and embed_key in state_dict and out_key in state_dict \
            and not state_dict[embed_key].equal(state_dict[out_key]):
        raise DPConfigError(
            "the checkpoint's output projection differs from its token embedding (it was trained "
            "untied), but this model ties them (--share-decoder-input-output-embed), which would keep "
            "only one of the two: drop --share-decoder-input-output-embed"
        )


def check_checkpoints_on_load(model: nn.Module) -> None:
    """Run :func:`check_checkpoint_fits` before every ``load_state_dict`` of
    ``model`` (once per model, however often it is called)."""
    if getattr(model, HOOKED, False):
        return
    setattr(model, HOOKED, True)

    def hook(module, state_dict, prefix, *unused):
        if module is model:
            check_checkpoint_fits(model, state_dict, prefix)
            check_decoder_fits(model, state_dict, prefix)

    model.register_load_state_dict_pre_hook(hook)


def pretrained_checkpoint(checkpoint_cfg) -> Optional[str]:
    """The checkpoint the user named for fairseq_cli.train to start from
    (``--finetune-from-model`` on a first launch, or ``--restore-file``), as
    ``checkpoint_utils.load_checkpoint`` chooses it; None when the run resumes
    its own ``checkpoint_last.pt`` or starts from scratch."""
    finetune = getattr(checkpoint_cfg, "finetune_from_model", None)
    for flag, named in (("--finetune-from-model", finetune),
                        ("--restore-file", getattr(checkpoint_cfg, "restore_file", None))):
        # fairseq would find no checkpoint file there and train from random weights
        if named and os.path.isdir(named):
            inside = sorted(f for f in os.listdir(named) if f.endswith(".pt"))
            raise DPConfigError(
                f"{flag} {named} is a directory; give the checkpoint file"
                + (f" in it, e.g. {os.path.join(named, inside[0])}" if inside else
                   " (a HuggingFace directory is converted first: fairseq-dp-convert DIR OUT_DIR)")
            )
    if finetune is not None and not os.path.isfile(finetune) and restored_checkpoint_path(checkpoint_cfg) is None:
        raise DPConfigError(f"--finetune-from-model {finetune}: no such checkpoint file")
    path = restored_checkpoint_path(checkpoint_cfg)
    return None if path == own_last_checkpoint(checkpoint_cfg) else path


def check_pretrained_checkpoint(model: nn.Module, task_cfg) -> None:
    """Before fairseq loads the checkpoint the user named, check that it fits
    the model. fairseq's own load does the same check through the pre-hook,
    but inside a ``try`` that re-raises a plain ``Exception``, which
    ``fairseq-hydra-train`` prints with a traceback; from here the message
    reaches every entry point alone, with the file's name."""
    root = task_cfg._get_root() if hasattr(task_cfg, "_get_root") else None
    checkpoint_cfg = getattr(root, "checkpoint", None) if root is not None else None
    if checkpoint_cfg is None:
        return
    path = pretrained_checkpoint(checkpoint_cfg)
    if path is None or not os.path.isfile(path):
        return  # fairseq then trains from scratch, and says so
    try:
        import torch

        state = torch.load(path, map_location="cpu", mmap=True)
    except Exception as e:  # noqa: BLE001  an early courtesy check: fairseq's own load decides
        if path.endswith((".safetensors", ".bin")) or os.path.isfile(os.path.join(os.path.dirname(path), "config.json")):
            raise DPConfigError(
                f"{path} is not a fairseq checkpoint (a HuggingFace one?); convert its directory first: "
                f"fairseq-dp-convert {os.path.dirname(path) or '.'} OUT_DIR, then start from OUT_DIR/model.pt"
            ) from None
        logger.debug(f"checkpoint shapes not checked early ({path}: {e})")
        return
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        # fairseq's load would fail on state["model"] with a traceback
        raise DPConfigError(
            f"{path} is not a fairseq checkpoint (it has no 'model' entry; a HuggingFace weights file?). "
            f"Convert a HuggingFace directory first: fairseq-dp-convert DIR OUT_DIR, then start from "
            "OUT_DIR/model.pt"
        )
    try:
        check_checkpoint_fits(model, state["model"], conversion=state.get("fairseq_dp_conversion"))
        check_decoder_fits(model, state["model"])
        check_same_decoder_shape(state.get("cfg"), getattr(root, "model", None))
    except DPConfigError as e:
        raise DPConfigError(f"{path}: {e}") from None


# settings of a causal LM that leave no trace in its weights' shapes but change
# what they compute: a run that differs from its starting checkpoint in one of
# them would train a different model without a word
DECODER_SHAPE_FLAGS = {
    "decoder_attention_heads": "--decoder-attention-heads {}",
    "activation_fn": "--activation-fn {}",
    "no_scale_embedding": "--no-scale-embedding",
    "decoder_normalize_before": "--decoder-normalize-before",
    "layernorm_embedding": "--layernorm-embedding",
    "no_decoder_final_norm": "--no-decoder-final-norm",
}


def _setting(cfg, name):
    if cfg is None:
        return None
    if isinstance(cfg, dict) or hasattr(cfg, "get"):
        try:
            return cfg.get(name)
        except Exception:  # noqa: BLE001  an omegaconf node that cannot be read: not compared
            return None
    return getattr(cfg, name, None)


def check_same_decoder_shape(saved_cfg, run_model_cfg) -> None:
    """The run's model must compute what its starting language model computes:
    the settings of ``DECODER_SHAPE_FLAGS`` are compared with the checkpoint's
    saved model config (fairseq's checkpoints and fairseq-dp-convert's carry it)."""
    saved_model = _setting(saved_cfg, "model")
    if saved_model is None or run_model_cfg is None or _setting(saved_model, "decoder_layers") is None:
        return
    differ = []
    for name, flag in DECODER_SHAPE_FLAGS.items():
        theirs, ours = _setting(saved_model, name), _setting(run_model_cfg, name)
        if theirs is None or ours is None or str(theirs) == str(ours):
            continue
        if isinstance(theirs, bool):
            fix = flag if theirs else f"no {flag}"
        else:
            fix = flag.format(theirs)
        differ.append(f"{name} is {theirs} in the checkpoint and {ours} here ({fix})")
    if differ:
        raise DPConfigError(
            "the run's language model would not compute what its starting checkpoint computes: "
            + "; ".join(differ) + ". Use the checkpoint's settings (a converted checkpoint's "
            "convert.json lists them under fairseq_flags)"
        )
