# Copyright (c) fairseq_dp contributors. MIT license.
"""Make a DP checkpoint that stock fairseq loads, without losing its privacy ledger.

    fairseq-dp-export checkpoints/checkpoint_best.pt exported.pt
    python -m fairseq_dp.export checkpoints/checkpoint_best.pt exported.pt

Stock fairseq cannot build the plugin's task (``dp_sentence_prediction``) and
loads the model state strictly, so it refuses the ledger entries there. The
export:

- moves the ledger from the model state to the checkpoint's top-level
  ``dp_ledger`` entry: stock fairseq ignores it, and a DP run of the plugin
  that continues from the exported file finds it and composes with it
  (``checkpoint_ledger``); deleting it by hand instead would make the weights
  look fresh, which the plugin refuses;
- makes the task fairseq's own ``sentence_prediction``, with its own options
  only (the DP options stay on record under ``dp_task``);
- drops the optimizer state.

Only architectures stock fairseq has (``roberta*``) can be exported: a
``roberta_lora`` checkpoint is merged by ``fairseq_dp.merge_lora`` (which uses
this), and the plugin's other archs need the plugin to load.
"""

import argparse
import dataclasses
import logging
import os
import pickle
from typing import Any, Dict

import torch
from omegaconf import OmegaConf

from .accounting import LEDGER_KEYS
from .checkpoint_ledger import TOP_LEVEL_KEY
from .errors import DPConfigError

logger = logging.getLogger(__name__)

STOCK_TASK = "sentence_prediction"


def move_ledger_to_top_level(state: Dict[str, Any]) -> None:
    ledger = {k: state["model"].pop(k) for k in LEDGER_KEYS if k in state["model"]}
    if ledger:
        state[TOP_LEVEL_KEY] = ledger


def use_stock_task(state: Dict[str, Any]) -> None:
    """The saved task configuration becomes fairseq's ``sentence_prediction``
    with only the options that task knows (fairseq refuses unknown ones)."""
    from fairseq.tasks.sentence_prediction import SentencePredictionConfig

    known = {f.name for f in dataclasses.fields(SentencePredictionConfig)}
    cfg = state.get("cfg")
    if cfg is None:  # a checkpoint of the argparse era: fairseq reads only known names
        state["args"].task = STOCK_TASK
        return
    task = cfg["task"]
    task = OmegaConf.to_container(task, resolve=True) if OmegaConf.is_config(task) else dict(task)
    stock = {k: v for k, v in task.items() if k in known}
    stock["_name"] = STOCK_TASK
    state["dp_task"] = {k: v for k, v in task.items() if k not in known}
    cfg["task"] = stock


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


def export_checkpoint(src: str, dst: str) -> None:
    from fairseq.models import ARCH_MODEL_REGISTRY

    state = read_checkpoint(src, dst)
    arch = model_arch(state)
    model_class = ARCH_MODEL_REGISTRY.get(arch)
    if model_class is None or model_class.__module__.startswith("fairseq_dp"):
        raise DPConfigError(
            f"{src} has the plugin's architecture {arch!r}, which stock fairseq cannot build: "
            "merge a roberta_lora checkpoint with `python -m fairseq_dp.merge_lora`, and load the "
            "plugin's other architectures with --user-dir fairseq_dp"
        )
    move_ledger_to_top_level(state)
    use_stock_task(state)
    state["last_optimizer_state"] = None
    torch.save(state, dst)
    logger.info(f"wrote {dst}: task {STOCK_TASK}, privacy ledger at the top level ('{TOP_LEVEL_KEY}')")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="checkpoint written by a DP run (plain roberta* arch)")
    parser.add_argument("output", help="where to write the checkpoint for stock fairseq")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    export_checkpoint(args.checkpoint, args.output)  # a DPConfigError prints as a message (errors.py)


if __name__ == "__main__":
    main()
