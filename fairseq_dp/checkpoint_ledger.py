# Copyright (c) fairseq_dp contributors. MIT license.
"""The privacy ledger in checkpoint files, where the model state cannot hold it.

The ledger normally travels inside the model state (``accounting.
keep_ledger_with_weights``). Three paths need the file itself:

- A checkpoint meant for stock fairseq (``merge_lora``'s output) keeps the
  ledger at the top level, under ``dp_ledger``, because stock fairseq loads the
  model state strictly. A DP run that continues from it must still compose
  with it: the task reads it from the file fairseq restored.
- Weights that come from a DP run but carry no ledger (its keys were removed)
  must not count as fresh: the file's saved config says a DP task trained them.
- ``checkpoint_best.pt`` is chosen by validating every checkpoint of the run,
  so its ε is that of all the updates run so far, not of those before it was
  written: its ledger is brought up to date whenever fairseq saves.
- Weights pre-trained on a public corpus that a DP classifier chose from
  private data (selective pre-training, ``fairseq-dp-pretrain``) have spent
  that classifier's privacy. ``masked_lm_selected`` keeps the selection's
  ledger in the task state (``task_state``/``dp_ledger``), outside the model
  state that stock fairseq loads strictly; weights pre-trained by plain
  ``masked_lm`` on such a corpus are found by the ``dp_ledger.pt`` beside the
  training data their saved config names.
"""

import glob
import logging
import os
from typing import Dict, Optional, Tuple

import torch

from .accounting import LEDGER_KEY, LEDGER_KEYS, PrivacyAccountant, ledger_entries

logger = logging.getLogger(__name__)

TOP_LEVEL_KEY = "dp_ledger"


def own_last_checkpoint(checkpoint_cfg) -> str:
    suffix = getattr(checkpoint_cfg, "checkpoint_suffix", "") or ""
    return os.path.join(checkpoint_cfg.save_dir, f"checkpoint_last{suffix}.pt")


def restored_checkpoint_path(checkpoint_cfg) -> Optional[str]:
    """The file fairseq's ``checkpoint_utils.load_checkpoint`` restores for
    this configuration (its own rule), if that file exists."""
    suffix = getattr(checkpoint_cfg, "checkpoint_suffix", "") or ""
    restore = getattr(checkpoint_cfg, "restore_file", "checkpoint_last.pt")
    if restore == "checkpoint_last.pt":
        path = own_last_checkpoint(checkpoint_cfg)
        if not os.path.exists(path):
            if getattr(checkpoint_cfg, "continue_once", None) is not None:
                path = checkpoint_cfg.continue_once
            elif getattr(checkpoint_cfg, "finetune_from_model", None) is not None:
                path = checkpoint_cfg.finetune_from_model
    else:
        path = restore.replace(".pt", suffix + ".pt") if suffix else restore
    return path if path and os.path.exists(path) else None


def _load(path: str) -> dict:
    try:
        return torch.load(path, map_location="cpu", mmap=True)
    except RuntimeError:  # not a zip file (old torch format): no mmap
        return torch.load(path, map_location="cpu")


def finished_updates(path: str) -> int:
    """The update count a fairseq checkpoint was saved at (0 if none)."""
    history = _load(path).get("optimizer_history") or [{}]
    return int(history[-1].get("num_updates", 0))


def trained_by_dp_task(state: dict) -> bool:
    """Whether a checkpoint's saved configuration is that of a DP task: its
    task config has DP options, or (merged and exported checkpoints, whose task
    became fairseq's own) they are kept under ``dp_task``."""
    if state.get("dp_task"):
        return True
    task = _saved_task_cfg(state)
    if task is None:
        return False
    keys = task.keys() if hasattr(task, "keys") else []
    return any(str(k).startswith("dp_") for k in keys)


# where a checkpoint keeps a ledger outside its model state, in words
AT_TOP_LEVEL = "keeps its privacy ledger at the top level (a merged or exported checkpoint)"
IN_TASK_STATE = ("keeps its privacy ledger in its task state (pre-trained by masked_lm_selected on a "
                 "corpus chosen with private data)")


def ledger_outside_model(state: dict) -> Tuple[Optional[Dict[str, torch.Tensor]], str]:
    """(the ledger entries a checkpoint keeps outside its model state or
    None, where): at the top level, or in the task state that fairseq saves
    from ``task.state_dict()`` (``masked_lm_selected``)."""
    task_state = state.get("task_state")
    for where, holder in ((AT_TOP_LEVEL, state), (IN_TASK_STATE, task_state)):
        entries = holder.get(TOP_LEVEL_KEY) if isinstance(holder, dict) else None
        if isinstance(entries, dict) and LEDGER_KEY in entries:
            return dict(entries), where
    return None, ""


def _saved_task_cfg(state: dict):
    cfg = state.get("cfg")
    task = cfg.get("task") if isinstance(cfg, dict) or hasattr(cfg, "get") else None
    if task is None and state.get("args") is not None:
        task = vars(state["args"])
    return task


def training_data_ledger_path(state: dict) -> Optional[str]:
    """The ``dp_ledger.pt`` in the training data directory of a checkpoint's
    saved config (the first of a colon-separated ``data``), if there is one:
    weights pre-trained by plain ``masked_lm`` on a corpus that
    ``fairseq-dp-select`` chose have spent its classifier's privacy."""
    task = _saved_task_cfg(state)
    data = task.get("data") if task is not None and hasattr(task, "get") else None
    if not data:
        return None
    path = corpus_ledger_path(str(data))
    return path if os.path.isfile(path) else None


def corpus_ledger_path(data: str) -> str:
    """Where a selected corpus keeps its selection's ledger: beside the
    binaries in the first directory of fairseq's ``data`` list (the others
    are shards of the same corpus)."""
    from fairseq import utils

    paths = utils.split_paths(data) if data else []
    return os.path.join(paths[0] if paths else "", LEDGER_FILE)


def read_checkpoint_history(path: str) -> Tuple[Optional[Dict[str, torch.Tensor]], bool, str]:
    """(the ledger entries the checkpoint's weights spent, kept outside their
    model state, or None; whether a DP task trained them; where the ledger
    was found, in words). Outside the model state: at the top level, in the task
    state, or, for a checkpoint that keeps neither, beside the training data
    its saved config names."""
    state = _load(path)
    entries, where = ledger_outside_model(state)
    if entries is None:
        corpus_ledger = training_data_ledger_path(state)
        if corpus_ledger is not None:
            accountant, what = read_ledger_file(corpus_ledger)
            entries = ledger_entries(accountant)
            where = (f"carries no privacy ledger, but its saved config trained it on the data beside "
                     f"{corpus_ledger}, the ledger of the selection that chose that corpus "
                     f"({what or 'no description'}): adopting that ledger")
    return entries, trained_by_dp_task(state), where


def read_ledger(path: str) -> Optional[Dict[str, torch.Tensor]]:
    """The ledger entries a checkpoint holds: in the model state, where training
    keeps them with the weights, or outside it (merged and exported
    checkpoints at the top level, ``masked_lm_selected``'s in the task
    state); None when it has none."""
    state = _load(path)
    entries, _ = ledger_outside_model(state)
    if entries is not None:
        return entries
    model = state.get("model") or {}
    entries = {k: v for key, v in model.items() for k in LEDGER_KEYS if key.split(".")[-1] == k}
    return entries if LEDGER_KEY in entries else None


def best_checkpoint_paths(save_dir: str, suffix: str = "") -> list:
    """fairseq's names for checkpoints chosen by validation:
    ``checkpoint_best.pt`` and ``--keep-best-checkpoints``' ``checkpoint.best_*``."""
    paths = [os.path.join(save_dir, f"checkpoint_best{suffix}.pt")]
    paths += glob.glob(os.path.join(glob.escape(save_dir), f"checkpoint.best_*{suffix}.pt"))
    return [p for p in paths if os.path.exists(p)]


def refresh_best_checkpoint_ledgers(save_dir: str, suffix: str, accountant: PrivacyAccountant) -> None:
    """Write the current ledger into every checkpoint chosen by validation
    whose ledger is behind it. fairseq's own atomic save (a temporary file,
    then a rename) keeps a crash from leaving half a file."""
    from fairseq.checkpoint_utils import torch_persistent_save

    current = ledger_entries(accountant)
    for path in best_checkpoint_paths(save_dir, suffix):
        state = torch.load(path, map_location="cpu")
        model = state.get("model", {})
        if LEDGER_KEY not in model or torch.equal(model[LEDGER_KEY], current[LEDGER_KEY]):
            continue
        for key in LEDGER_KEYS:
            model.pop(key, None)
        model.update(current)
        torch_persistent_save(state, path)
        logger.info(
            f"DP: {os.path.basename(path)} was chosen by validating the whole run so far: its "
            f"ledger now holds the {accountant.steps} updates run"
        )


# A ledger as a file of its own: what fairseq-dp-select writes beside the
# public corpus its DP classifier chose, so that the privacy the classifier
# spent on the private data follows that corpus into pre-training and from
# there into the fine-tuning run's ε.
LEDGER_FILE = "dp_ledger.pt"


def write_ledger_file(path: str, accountant: PrivacyAccountant, what: str) -> None:
    """Save ``accountant``'s ledger (with its digest) to ``path``; ``what``
    says in words which training spent it."""
    torch.save({"entries": ledger_entries(accountant), "mechanism": accountant.mechanism, "what": what}, path)


def read_ledger_file(path: str) -> Tuple[PrivacyAccountant, str]:
    """(an accountant holding the ledger saved at ``path``, what spent it).
    Raises LedgerMismatch if the file was edited."""
    from .accounting import restore_ledger
    from .errors import DPConfigError

    try:
        saved = torch.load(path, map_location="cpu")
    except (OSError, RuntimeError, EOFError) as e:
        raise DPConfigError(f"cannot read the privacy ledger {path}: {e}") from e
    if not isinstance(saved, dict) or "entries" not in saved:
        raise DPConfigError(f"{path} is not a privacy ledger written by fairseq_dp")
    accountant = PrivacyAccountant(saved.get("mechanism", "prv"))
    restore_ledger(accountant, saved["entries"])
    return accountant, str(saved.get("what", ""))
