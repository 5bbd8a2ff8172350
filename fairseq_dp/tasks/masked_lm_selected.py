# Copyright (c) fairseq_dp contributors. MIT license.
"""``masked_lm_selected``: fairseq's ``masked_lm`` on a public corpus that a DP
domain classifier chose with private data (selective pre-training, Yu et al.,
TMLR 2024; ``fairseq-dp-select`` chooses it, ``fairseq-dp-pretrain`` runs this).

Pre-training itself touches public text only, but which text it reads was
decided with the private data: the weights have spent the classifier's ε, and
the DP fine-tuning on that private data must compose with it. So the task
requires the classifier's ledger, ``dp_ledger.pt``, in the data directory,
logs the ε it spent, and saves it into every checkpoint. It goes into the
task state (fairseq saves ``task.state_dict()`` as the checkpoint's
``task_state``), not the model state: stock fairseq tasks, such as
non-private ``sentence_prediction``, still restore the weights strictly,
while ``dp_sentence_prediction`` finds it there (``checkpoint_ledger.
read_checkpoint_history``) and counts it in its ε.
"""

import logging
import os
from dataclasses import dataclass

import torch
from fairseq.tasks import register_task
from fairseq.tasks.masked_lm import MaskedLMConfig, MaskedLMTask

from ..accounting import LEDGER_KEY, ledger_entries
from ..checkpoint_ledger import (
    LEDGER_FILE,
    TOP_LEVEL_KEY,
    corpus_ledger_path,
    read_ledger,
    read_ledger_file,
    restored_checkpoint_path,
)
from ..errors import DPConfigError

logger = logging.getLogger(__name__)


@dataclass
class MaskedLMSelectedConfig(MaskedLMConfig):
    """fairseq's masked_lm options; the data directory must also hold the
    selection's ``dp_ledger.pt``."""


@register_task("masked_lm_selected", dataclass=MaskedLMSelectedConfig)
class MaskedLMSelectedTask(MaskedLMTask):
    @classmethod
    def setup_task(cls, cfg: MaskedLMSelectedConfig, **kwargs):
        path = corpus_ledger_path(cfg.data)
        if not os.path.isfile(path):
            raise DPConfigError(
                f"--task masked_lm_selected: {path} is missing. This task pre-trains on a corpus that "
                f"fairseq-dp-select chose with private data, and needs that selection's privacy ledger "
                f"({LEDGER_FILE}, which fairseq-dp-select writes and fairseq-dp-pretrain copies beside "
                "the binaries) so that fine-tuning counts it. For a public corpus not chosen with "
                "private data, use plain --task masked_lm"
            )
        selection, what = read_ledger_file(path)
        task = super().setup_task(cfg, **kwargs)
        task.selection = selection
        task.selection_path = path
        task._restored_checked = False
        delta = selection.delta
        spent = f"ε = {selection.get_epsilon(delta):.4g} at δ = {delta}" if delta is not None else (
            "no δ stated")
        logger.info(
            f"masked_lm_selected: the corpus was chosen by {what or 'a DP selection'}, which spent "
            f"{spent} ({selection.steps} updates) on the private data; every checkpoint carries that "
            "ledger, and DP fine-tuning from it counts it in its ε"
        )
        return task

    def load_dataset(self, split, epoch=1, combine=False, **kwargs):
        super().load_dataset(split, epoch=epoch, combine=combine, **kwargs)
        if not self._restored_checked:
            # a run that continues from a checkpoint: weights pre-trained on
            # a corpus chosen by another selection have spent that one's
            # privacy too, which a single ledger cannot say
            self._restored_checked = True
            self.check_restored_selection()

    def check_restored_selection(self) -> None:
        root = self.cfg._get_root() if hasattr(self.cfg, "_get_root") else None
        checkpoint_cfg = getattr(root, "checkpoint", None)
        path = restored_checkpoint_path(checkpoint_cfg) if checkpoint_cfg is not None else None
        if path is None:
            return
        entries = read_ledger(path)
        if entries is None:
            return
        if not torch.equal(entries[LEDGER_KEY], ledger_entries(self.selection)[LEDGER_KEY]):
            raise DPConfigError(
                f"masked_lm_selected: the restored checkpoint {path} was pre-trained on a corpus "
                f"chosen by another selection (its ledger differs from {self.selection_path}): its "
                "weights have spent both selections' privacy, which one ledger cannot hold. Pre-train "
                "from scratch on this corpus, or continue on the corpus it was started on"
            )

    def state_dict(self):
        # a copy: fairseq's own state is its StatefulContainer's live dict
        state = dict(super().state_dict())
        state[TOP_LEVEL_KEY] = ledger_entries(self.selection)
        return state

    def load_state_dict(self, state_dict):
        # the ledger of a loaded checkpoint is read by the DP task that
        # restores it; this task's own is the data directory's
        state = {k: v for k, v in state_dict.items() if k != TOP_LEVEL_KEY}
        super().load_state_dict(state)
