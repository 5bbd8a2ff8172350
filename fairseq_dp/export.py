# Copyright (c) fairseq_dp contributors. MIT license.
"""Make a DP checkpoint that stock fairseq loads, without losing its privacy ledger.

    fairseq-dp-export checkpoints/checkpoint_best.pt exported.pt
    python -m fairseq_dp.export checkpoints/checkpoint_best.pt exported.pt

Stock fairseq cannot build the plugin's tasks (``dp_sentence_prediction``,
``dp_language_modeling``) and loads the model state strictly, so it refuses
the ledger entries there. The export:

- moves the ledger from the model state to the checkpoint's top-level
  ``dp_ledger`` entry: stock fairseq ignores it, and a DP run of the plugin
  that continues from the exported file finds it and composes with it
  (``checkpoint_ledger``); deleting it by hand instead would make the weights
  look fresh, which the plugin refuses;
- makes the task fairseq's own ``sentence_prediction`` (RoBERTa models) or
  ``language_modeling`` (language models), with its own options only (the DP
  options stay on record under ``dp_task``);
- drops the optimizer state.

Architectures stock fairseq has (``roberta*``, ``transformer_lm*``) can be
exported, and ``transformer_lm_rgp*``, whose trained weights are a plain
``transformer_lm``'s (the architecture is renamed). A ``roberta_lora`` or
``transformer_lm_lora`` checkpoint is merged by ``fairseq_dp.merge_lora``
(which uses this); the plugin's other archs need the plugin to load.
"""

import argparse
import dataclasses
import logging
import os
import pickle
from typing import Any, Dict

import torch
from omegaconf import OmegaConf, open_dict

from .accounting import LEDGER_KEYS
from .checkpoint_ledger import TOP_LEVEL_KEY
from .errors import DPConfigError

logger = logging.getLogger(__name__)

STOCK_TASK = "sentence_prediction"
STOCK_LM_TASK = "language_modeling"


def move_ledger_to_top_level(state: Dict[str, Any]) -> None:
    ledger = {k: state["model"].pop(k) for k in LEDGER_KEYS if k in state["model"]}
    if ledger:
        state[TOP_LEVEL_KEY] = ledger


def _stock_task_config(stock_task: str):
    if stock_task == STOCK_LM_TASK:
        from fairseq.tasks.language_modeling import LanguageModelingConfig

        return LanguageModelingConfig
    from fairseq.tasks.sentence_prediction import SentencePredictionConfig

    return SentencePredictionConfig


def stock_task_for(model_class) -> str:
    """fairseq's own task for a model class: language models train under
    ``language_modeling``, RoBERTa models under ``sentence_prediction``."""
    from fairseq.models import FairseqLanguageModel

    return STOCK_LM_TASK if issubclass(model_class, FairseqLanguageModel) else STOCK_TASK


def use_stock_task(state: Dict[str, Any], stock_task: str = STOCK_TASK) -> None:
    """The saved task configuration becomes fairseq's ``stock_task``
    with only the options that task knows (fairseq refuses unknown ones)."""
    known = {f.name for f in dataclasses.fields(_stock_task_config(stock_task))}
    cfg = state.get("cfg")
    if cfg is None:  # a checkpoint of the argparse era: fairseq reads only known names
        state["args"].task = stock_task
        return
    task = cfg["task"]
    task = OmegaConf.to_container(task, resolve=True) if OmegaConf.is_config(task) else dict(task)
    stock = {k: v for k, v in task.items() if k in known}
    stock["_name"] = stock_task
    state["dp_task"] = {k: v for k, v in task.items() if k not in known}
    cfg["task"] = stock


def rename_arch(state: Dict[str, Any], arch: str) -> None:
    """The saved model configuration names ``arch``, however it was saved:
    a Namespace (fairseq-train), a DictConfig or a dict (fairseq-hydra-train)."""
    model_cfg = state["cfg"]["model"] if state.get("cfg") is not None else state["args"]
    if isinstance(model_cfg, dict):
        model_cfg["_name"] = arch
        if "arch" in model_cfg:
            model_cfg["arch"] = arch
    elif OmegaConf.is_config(model_cfg):
        with open_dict(model_cfg):
            model_cfg._name = arch
            model_cfg.arch = arch
    else:
        model_cfg._name, model_cfg.arch = arch, arch
    if state.get("cfg") is not None and state.get("args") is not None:
        state["args"].arch = arch


def read_checkpoint(src: str, dst: str) -> Dict[str, Any]:
    """The checkpoint at ``src``, after checking that ``dst`` can be written."""
    import fairseq_dp  # noqa: F401  (lets torch.load read fairseq's pickled config)

    if not os.path.isfile(src):
        raise DPConfigError(f"{src}: no such checkpoint file")
    if not os.path.isdir(os.path.dirname(os.path.abspath(dst))):
        raise DPConfigError(f"{dst}: its directory does not exist")
    try:
        return torch.load(src, map_location="cpu")
    except (pickle.UnpicklingError, EOFError) as e:
        raise DPConfigError(f"{src} is not a fairseq checkpoint ({e})") from e


def model_arch(state: Dict[str, Any]) -> str:
    model_cfg = state["cfg"]["model"] if state.get("cfg") is not None else state["args"]
    get = model_cfg.get if isinstance(model_cfg, dict) else lambda k: getattr(model_cfg, k, None)
    return get("arch") or get("_name")


def plain_weights_arch(arch: str):
    """The stock architecture whose weights a plugin architecture's trained
    checkpoint holds unchanged, or None."""
    from .models.transformer_lm_rgp import PLAIN_ARCH

    return PLAIN_ARCH.get(arch)


def export_checkpoint(src: str, dst: str) -> None:
    from fairseq.models import ARCH_MODEL_REGISTRY

    state = read_checkpoint(src, dst)
    arch = model_arch(state)
    plain = plain_weights_arch(arch)
    model_class = ARCH_MODEL_REGISTRY.get(plain or arch)
    if model_class is None or model_class.__module__.startswith("fairseq_dp"):
        raise DPConfigError(
            f"{src} has the plugin's architecture {arch!r}, which stock fairseq cannot build: "
            "merge a roberta_lora or transformer_lm_lora checkpoint with `python -m fairseq_dp.merge_lora`, "
            "and load the plugin's other architectures with --user-dir fairseq_dp"
        )
    move_ledger_to_top_level(state)
    if plain is not None:
        rename_arch(state, plain)
    stock_task = stock_task_for(model_class)
    use_stock_task(state, stock_task)
    state["last_optimizer_state"] = None
    torch.save(state, dst)
    ledger = (f"privacy ledger at the top level ('{TOP_LEVEL_KEY}')" if TOP_LEVEL_KEY in state
              else "no privacy ledger (these weights were not trained with DP here)")
    logger.info(f"wrote {dst}: {'architecture ' + plain + ', ' if plain else ''}task {stock_task}, {ledger}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="checkpoint written by a DP run (roberta*, transformer_lm* or "
                        "transformer_lm_rgp* arch)")
    parser.add_argument("output", help="where to write the checkpoint for stock fairseq")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    export_checkpoint(args.checkpoint, args.output)  # a DPConfigError prints as a message (errors.py)


if __name__ == "__main__":
    main()
