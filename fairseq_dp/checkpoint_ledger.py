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


def trained_by_dp_task(state: dict) -> bool:
    """Whether a checkpoint's saved configuration is that of a DP task: its
    task config has DP options, or (merged and exported checkpoints, whose task
    became fairseq's own) they are kept under ``dp_task``."""
    if state.get("dp_task"):
        return True
    cfg = state.get("cfg")
    task = cfg.get("task") if isinstance(cfg, dict) or hasattr(cfg, "get") else None
    if task is None and state.get("args") is not None:
        task = vars(state["args"])
    if task is None:
        return False
    keys = task.keys() if hasattr(task, "keys") else []
    return any(str(k).startswith("dp_") for k in keys)


def read_checkpoint_history(path: str) -> Tuple[Optional[Dict[str, torch.Tensor]], bool]:
    """(the ledger entries kept at the top level or None, whether a DP task
    trained these weights)."""
    state = _load(path)
    top = state.get(TOP_LEVEL_KEY)
    entries = dict(top) if isinstance(top, dict) and LEDGER_KEY in top else None
    return entries, trained_by_dp_task(state)


def read_ledger(path: str) -> Optional[Dict[str, torch.Tensor]]:
    """The ledger entries a checkpoint holds: in the model state, where training
    keeps them with the weights, or at the top level (merged and exported
    checkpoints); None when it has neither."""
    state = _load(path)
    top = state.get(TOP_LEVEL_KEY)
    if isinstance(top, dict) and LEDGER_KEY in top:
        return dict(top)
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
