# Copyright (c) fairseq_dp contributors. MIT license.
"""``roberta_rgp``: RoBERTa with RGP's low-rank reparametrized encoder.

Every encoder layer's attention projections (q, k, v, out) and FFN matrices
(fc1, fc2) are :class:`LowRankLinear`; their weights are trained through
rank-``--rgp-rank`` gradient carriers. Everything else (embeddings, LayerNorms,
biases, the LM head) is frozen; classification heads stay trainable. Parameter
names equal plain RoBERTa's, so fairseq RoBERTa checkpoints load unchanged.
"""

import logging

from fairseq.models import register_model, register_model_architecture
from fairseq.models.roberta.model import (
    RobertaModel,
    base_architecture,
    roberta_base_architecture,
    roberta_large_architecture,
)
from fairseq.utils import safe_getattr

from ..modules import LowRankLinear
from .sentence_encoder import (
    SentenceEncoderMixin,
    add_sentence_encoder_args,
    check_trained_privately,
    minilm_architecture,
    tiny_architecture,
    sentence_encoder_architecture,
)
from .swap import ALL_TARGETS, CARRIER_SOURCES, RGP_HELP, add_rgp, check_rgp_args  # noqa: F401

logger = logging.getLogger(__name__)

RGP_DEFAULTS = {
    "rgp_rank": 1,
    "rgp_power_iters": 1,
    "rgp_carrier_source": "weight",
    "rgp_reference_projection": False,
}


@register_model("roberta_rgp")
class RobertaRGPModel(SentenceEncoderMixin, RobertaModel):
    @staticmethod
    def add_args(parser):
        RobertaModel.add_args(parser)
        add_sentence_encoder_args(parser)
        parser.add_argument("--rgp-rank", type=int, metavar="R", help=RGP_HELP["rgp_rank"])
        parser.add_argument("--rgp-power-iters", type=int, metavar="N", help=RGP_HELP["rgp_power_iters"])
        parser.add_argument("--rgp-carrier-source", choices=CARRIER_SOURCES, help=RGP_HELP["rgp_carrier_source"])
        parser.add_argument("--rgp-reference-projection", action="store_true",
                            help=RGP_HELP["rgp_reference_projection"])

    @classmethod
    def build_model(cls, args, task):
        base_rgp_architecture(args)
        check_trained_privately(args, task)
        check_rgp_args(args, "roberta_rgp")
        # fairseq builds and initializes stock RoBERTa; its encoder layers' six
        # matrices are then swapped for LowRankLinear (same parameter names)
        model = super().build_model(args, task)
        add_rgp(model, args.rgp_rank, args.rgp_reference_projection, ALL_TARGETS, "roberta_rgp")
        return model

    def low_rank_modules(self):
        return [m for m in self.modules() if isinstance(m, LowRankLinear)]

    def register_classification_head(self, name, num_classes=None, inner_dim=None, **kwargs):
        super().register_classification_head(name, num_classes, inner_dim, **kwargs)
        # heads are trained directly with DP; they are small next to the encoder
        for param in self.classification_heads[name].parameters():
            param.requires_grad_(True)


@register_model_architecture("roberta_rgp", "roberta_rgp")
def base_rgp_architecture(args):
    for name, default in RGP_DEFAULTS.items():
        if safe_getattr(args, name, None) is None:
            setattr(args, name, default)
    sentence_encoder_architecture(args)
    base_architecture(args)


@register_model_architecture("roberta_rgp", "roberta_rgp_base")
def roberta_rgp_base_architecture(args):
    roberta_base_architecture(args)
    base_rgp_architecture(args)


@register_model_architecture("roberta_rgp", "roberta_rgp_large")
def roberta_rgp_large_architecture(args):
    roberta_large_architecture(args)
    base_rgp_architecture(args)


@register_model_architecture("roberta_rgp", "roberta_rgp_minilm")
def roberta_rgp_minilm_architecture(args):
    """MiniLM-L6-H384 (all-MiniLM-L6-v2) as ``fairseq_dp.convert`` writes it."""
    minilm_architecture(args)
    base_rgp_architecture(args)


@register_model_architecture("roberta_rgp", "roberta_rgp_tiny")
def roberta_rgp_tiny_architecture(args):
    """The tiny encoder ``fairseq-dp-pretrain`` pre-trains (``roberta_tiny``)."""
    tiny_architecture(args)
    base_rgp_architecture(args)
