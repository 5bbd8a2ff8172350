# Copyright (c) fairseq_dp contributors. MIT license.
"""``dp_sentence_prediction`` criterion: sentence-prediction loss plus the
privacy ledger's report (``dp_epsilon``, ``dp_sigma``) in every train log."""

from dataclasses import dataclass

from fairseq.criterions import register_criterion
from fairseq.criterions.sentence_prediction import (
    SentencePredictionConfig,
    SentencePredictionCriterion,
)

from .privacy_report import PrivacyReportMixin


@dataclass
class DPSentencePredictionCriterionConfig(SentencePredictionConfig):
    pass


@register_criterion("dp_sentence_prediction", dataclass=DPSentencePredictionCriterionConfig)
class DPSentencePredictionCriterion(PrivacyReportMixin, SentencePredictionCriterion):
    non_private_criterion = "sentence_prediction"

    def __init__(self, cfg, task):
        self.start_privacy_report(cfg, task)
        super().__init__(cfg, task)
