# Copyright (c) fairseq_dp contributors. MIT license.
"""Merge a trained ``roberta_lora`` or ``transformer_lm_lora`` checkpoint
into a plain RoBERTa or ``transformer_lm`` one.

    python -m fairseq_dp.merge_lora checkpoint_best.pt merged.pt

Every adapted matrix becomes ``W₀ + (α / r)·B A``, the ``lora_A`` / ``lora_B``
entries are dropped and the architecture is renamed to the plain one
(``roberta_lora_base`` → ``roberta_base``; every ``transformer_lm_lora*`` →
``transformer_lm``, whose saved options carry the GPT-2 shape and sizes), so
the result loads as a ``RobertaModel`` / ``TransformerLanguageModel`` with the
same outputs, in fairseq with or without the plugin (its task becomes
fairseq's ``sentence_prediction`` / ``language_modeling``, as
``fairseq_dp.export`` does).
A model whose heads read the mean over tokens, or whose LayerNorm ε is not
fairseq's, becomes the plugin's ``roberta_pooled`` (``_minilm``) instead, since
stock RoBERTa cannot express either.
The optimizer state (shaped for the adapters) is dropped; the privacy ledger
moves from the model state to the checkpoint's top-level ``dp_ledger`` entry,
which stock fairseq ignores (so it loads the model state strictly) and the
plugin reads: a DP run that continues from the merged checkpoint composes
with the privacy already spent (``checkpoint_ledger``). The rest of the
checkpoint (classification heads, the DP task's options under ``dp_task``) is kept.
"""

import argparse
import logging
from typing import Dict

import torch

from .export import STOCK_LM_TASK, STOCK_TASK, move_ledger_to_top_level, read_checkpoint, rename_arch, use_stock_task
from .errors import DPConfigError
from .models.roberta_lora import PLAIN_ARCH, POOLED_ARCH
from .models.transformer_lm_lora import PLAIN_ARCH as LM_PLAIN_ARCH

logger = logging.getLogger(__name__)


def merge_lora_state_dict(state_dict: Dict[str, torch.Tensor], scaling: float) -> Dict[str, torch.Tensor]:
    """A plain state dict: ``weight += scaling · lora_B @ lora_A`` for every
    module that has both factors."""
    merged = {k: v for k, v in state_dict.items() if not k.endswith((".lora_A", ".lora_B"))}
    prefixes = {k[: -len(".lora_A")] for k in state_dict if k.endswith(".lora_A")}
    for prefix in sorted(prefixes):
        A, B = state_dict[prefix + ".lora_A"], state_dict[prefix + ".lora_B"]
        W = state_dict[prefix + ".weight"]
        merged[prefix + ".weight"] = (W.double() + scaling * (B.double() @ A.double())).to(W.dtype)
    return merged


def _model_cfg(state):
    if state.get("cfg") is not None:
        return state["cfg"]["model"]
    return state["args"]


def merge_lora_checkpoint(src: str, dst: str) -> None:
    state = read_checkpoint(src, dst)
    model_cfg = _model_cfg(state)
    # fairseq-train saves a Namespace or a DictConfig, fairseq-hydra-train a dict
    get = model_cfg.get if isinstance(model_cfg, dict) else lambda k: getattr(model_cfg, k, None)
    arch = get("arch") or get("_name")
    if arch not in PLAIN_ARCH and arch not in LM_PLAIN_ARCH:
        raise DPConfigError(f"{src} is not a roberta_lora checkpoint (architecture {arch!r}) "
                            "nor a transformer_lm_lora one")
    scaling = float(get("lora_alpha")) / int(get("lora_rank"))
    move_ledger_to_top_level(state)
    state["model"] = merge_lora_state_dict(state["model"], scaling)
    if arch in LM_PLAIN_ARCH:
        plain, stock_task = LM_PLAIN_ARCH[arch], STOCK_LM_TASK
    else:
        plain, stock_task = PLAIN_ARCH[arch], STOCK_TASK
        pooling, eps = get("classification_pooling") or "cls", get("layer_norm_eps") or 1e-5
        if pooling != "cls" or eps != 1e-5:
            plain, stock_task = POOLED_ARCH[arch], None
            logger.info(f"--classification-pooling {pooling}, --layer-norm-eps {eps:g}: the merged "
                        f"checkpoint is {plain}, which needs --user-dir fairseq_dp to load")
    rename_arch(state, plain)
    if stock_task is not None:  # stock fairseq builds it: give it fairseq's own task
        use_stock_task(state, stock_task)
    state["last_optimizer_state"] = None
    torch.save(state, dst)
    logger.info(f"merged LoRA adapters (scale {scaling:g}) of {src} into {dst} ({plain})")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="roberta_lora or transformer_lm_lora checkpoint written by fairseq-train")
    parser.add_argument("output", help="where to write the plain RoBERTa / transformer_lm checkpoint")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    merge_lora_checkpoint(args.checkpoint, args.output)


if __name__ == "__main__":
    main()
