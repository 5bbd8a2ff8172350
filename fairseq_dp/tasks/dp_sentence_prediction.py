# Copyright (c) fairseq_dp contributors. MIT license.
"""``dp_sentence_prediction``: fairseq's sentence prediction, trained with DP.

Everything private about it is the shared DP engine (:class:`DPTaskMixin`);
what is here is sentence prediction's own: its data directory, its labels,
and old checkpoints' pooling.
"""

import logging
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
from fairseq.data import data_utils
from fairseq.tasks import register_task
from fairseq.tasks.sentence_prediction import SentencePredictionConfig, SentencePredictionTask

from ..dp_config import DPConfig
from ..errors import DPConfigError
from ..models.sentence_encoder import keep_first_token_pooling_of_old_checkpoint
from .dp_task import DPTaskMixin

logger = logging.getLogger(__name__)


@dataclass
class DPSentencePredictionConfig(SentencePredictionConfig, DPConfig):
    pass


def check_data_dir(data: str) -> None:
    """fairseq would fail on the first file it opens, with a traceback."""
    layout = ("a fairseq sentence-prediction directory has input0/dict.txt and label/dict.txt "
              "with the binarized splits (fairseq-dp-prepare-glue or fairseq-preprocess write them)")
    if not data or not os.path.isdir(data):
        raise DPConfigError(f"data directory {data!r} does not exist; {layout}")
    missing = [f for f in ("input0/dict.txt", "label/dict.txt") if not os.path.isfile(os.path.join(data, f))]
    if missing:
        raise DPConfigError(f"data directory {data!r} has no {' or '.join(missing)}; {layout}")


@register_task("dp_sentence_prediction", dataclass=DPSentencePredictionConfig)
class DPSentencePredictionTask(DPTaskMixin, SentencePredictionTask):
    """Sentence prediction with differentially private training."""

    @classmethod
    def check_data_dir(cls, cfg) -> None:
        check_data_dir(cfg.data)

    def train_tokens_path(self, split: str) -> Optional[str]:
        return os.path.join(self.cfg.data, "input0", f"{split}.bin")

    def train_size_on_disk(self) -> Optional[int]:
        train = data_utils.load_indexed_dataset(
            os.path.join(self.cfg.data, "input0", self.cfg.train_subset), self.source_dictionary
        )
        return None if train is None else len(train)

    def task_settings(self) -> dict:
        return {"num_classes": self.cfg.num_classes}

    def check_model_cfg(self, cfg, from_checkpoint: bool) -> None:
        if from_checkpoint:
            keep_first_token_pooling_of_old_checkpoint(cfg)

    def check_split(self, split: str) -> None:
        self.check_labels(split)

    def check_labels(self, split: str) -> None:
        """Every label inside --num-classes and in the label dictionary, before
        any privacy is spent (otherwise the first bad label stops the run at
        its update, after the updates before it were paid for)."""
        if self.cfg.regression_target:
            return
        dataset = self.datasets[split]
        while not hasattr(dataset, "defn") and hasattr(dataset, "dataset"):
            dataset = dataset.dataset  # fairseq's SortDataset around the nested one
        target = getattr(dataset, "defn", {}).get("target")
        if target is None:
            return
        labels = np.fromiter((int(target[i][0]) for i in range(len(target))), dtype=np.int64, count=len(target))
        unknown = np.flatnonzero(labels < 0)
        outside = np.flatnonzero(labels >= self.cfg.num_classes)
        problems = []
        if len(unknown):
            problems.append(
                f"{len(unknown)} labels are not in the label dictionary (first examples "
                f"{unknown[:5].tolist()}; it holds {', '.join(self.label_dictionary.symbols[self.label_dictionary.nspecial:])})"
            )
        if len(outside):
            problems.append(
                f"{len(outside)} labels are outside --num-classes {self.cfg.num_classes} (first "
                f"examples {outside[:5].tolist()}, label ids {sorted(set(labels[outside].tolist()))[:5]})"
            )
        if problems:
            raise DPConfigError(f"the '{split}' split: " + "; ".join(problems)
                                + ". Fix the data or --num-classes before training")
