# Copyright (c) fairseq_dp contributors. MIT license.
"""``dp_language_modeling`` criterion: the causal-LM cross-entropy (with
optional label smoothing) over each example's target tokens, plus the privacy
report (``dp_epsilon``, ``dp_sigma``) in every train log.

An example's loss is the sum over its target tokens: the DP step clips each
example's gradient of that sum and divides the noisy sum by the expected
batch size. The logs show fairseq's usual per-token loss and perplexity (base 2).
"""

from dataclasses import dataclass, field

import torch.nn.functional as F
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.criterions.label_smoothed_cross_entropy import (
    LabelSmoothedCrossEntropyCriterion,
    label_smoothed_nll_loss,
)
from fairseq.dataclass import FairseqDataclass

from ..errors import DPConfigError
from .privacy_report import PrivacyReportMixin


@dataclass
class DPLanguageModelingCriterionConfig(FairseqDataclass):
    label_smoothing: float = field(
        default=0.0,
        metadata={"help": "epsilon of label smoothing (0: plain cross-entropy; the DP-LoRA GPT-2 "
                          "recipe uses 0.1)"},
    )


@register_criterion("dp_language_modeling", dataclass=DPLanguageModelingCriterionConfig)
class DPLanguageModelingCriterion(PrivacyReportMixin, FairseqCriterion):
    non_private_criterion = "cross_entropy (or label_smoothed_cross_entropy) with --task language_modeling"

    def __init__(self, cfg, task):
        self.start_privacy_report(cfg, task)
        super().__init__(task)
        if not 0 <= cfg.label_smoothing < 1:
            raise DPConfigError(f"--label-smoothing must be in [0, 1), got {cfg.label_smoothing}")
        self.eps = cfg.label_smoothing

    def forward(self, model, sample, reduce=True):
        net_output = model(**sample["net_input"])
        if getattr(getattr(model, "decoder", None), "adaptive_softmax", None) is None:
            # fairseq's get_normalized_probs casts to float32; DP trains in fp32
            # anyway, and the float64 tests then check the step to 1e-9
            lprobs = F.log_softmax(net_output[0], dim=-1)
        else:
            lprobs = model.get_normalized_probs(net_output, log_probs=True)
        target = sample["target"]
        if self.eps == 0:
            # without smoothing, its term (a sum over every log-probability) is skipped
            nll_loss = F.nll_loss(lprobs.view(-1, lprobs.size(-1)), target.view(-1),
                                  ignore_index=self.padding_idx, reduction="sum" if reduce else "none")
            loss = nll_loss
        else:
            loss, nll_loss = label_smoothed_nll_loss(
                lprobs.view(-1, lprobs.size(-1)), target.view(-1), self.eps,
                ignore_index=self.padding_idx, reduce=reduce,
            )
        ntokens = sample["ntokens"]
        logging_output = {
            "loss": loss.data,
            "nll_loss": nll_loss.data,
            "ntokens": ntokens,
            "nsentences": sample["nsentences"],
            "sample_size": ntokens,
        }
        return loss, ntokens, logging_output

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        # fairseq's: loss and nll_loss per token in base 2, and perplexity
        LabelSmoothedCrossEntropyCriterion.reduce_metrics(logging_outputs)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
