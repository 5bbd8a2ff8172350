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
    RobertaEncoder,
    RobertaModel,
    base_architecture,
    roberta_base_architecture,
    roberta_large_architecture,
)
from fairseq.models.transformer import TransformerConfig, TransformerEncoder
from fairseq.modules.transformer_layer import TransformerEncoderLayerBase
from fairseq.utils import safe_getattr, safe_hasattr

from ..errors import DPConfigError
from ..modules import LowRankLinear, LowRankMultiheadAttention
from .sentence_encoder import (
    SentenceEncoderMixin,
    add_sentence_encoder_args,
    check_trained_privately,
    minilm_architecture,
    sentence_encoder_architecture,
)

logger = logging.getLogger(__name__)

CARRIER_SOURCES = ("weight", "update")
RGP_DEFAULTS = {
    "rgp_rank": 1,
    "rgp_power_iters": 1,
    "rgp_carrier_source": "weight",
    "rgp_reference_projection": False,
}


class RGPTransformerEncoderLayer(TransformerEncoderLayerBase):
    def __init__(self, cfg, rgp_args):
        self.rgp_args = rgp_args  # read by the build_* factories during __init__
        super().__init__(cfg)

    def _low_rank(self, input_dim, output_dim):
        return LowRankLinear(
            input_dim,
            output_dim,
            rank=self.rgp_args.rgp_rank,
            batch_dim=1,  # time-major (T, B, C)
            reference_projection=self.rgp_args.rgp_reference_projection,
        )

    def build_fc1(self, input_dim, output_dim, q_noise, qn_block_size):
        return self._low_rank(input_dim, output_dim)

    def build_fc2(self, input_dim, output_dim, q_noise, qn_block_size):
        return self._low_rank(input_dim, output_dim)

    def build_self_attention(self, embed_dim, cfg):
        return LowRankMultiheadAttention(
            embed_dim,
            cfg.encoder.attention_heads,
            rank=self.rgp_args.rgp_rank,
            reference_projection=self.rgp_args.rgp_reference_projection,
            dropout=cfg.attention_dropout,
            self_attention=True,
        )


class RGPTransformerEncoder(TransformerEncoder):
    def build_encoder_layer(self, args):
        cfg = TransformerConfig.from_namespace(args)
        if cfg.checkpoint_activations or cfg.quant_noise.pq > 0:
            raise DPConfigError(
                "roberta_rgp does not support --checkpoint-activations or --quant-noise-pq"
            )
        return RGPTransformerEncoderLayer(cfg, self.args)


class RGPRobertaEncoder(RobertaEncoder):
    def build_encoder(self, args, dictionary, embed_tokens):
        from fairseq.modules.transformer_sentence_encoder import init_bert_params

        encoder = RGPTransformerEncoder(args, dictionary, embed_tokens)
        encoder.apply(init_bert_params)
        return encoder


@register_model("roberta_rgp")
class RobertaRGPModel(SentenceEncoderMixin, RobertaModel):
    @staticmethod
    def add_args(parser):
        RobertaModel.add_args(parser)
        add_sentence_encoder_args(parser)
        parser.add_argument(
            "--rgp-rank", type=int, metavar="R",
            help="rank of the gradient carriers L (out x R) and R (R x in) of every "
            "reparametrized matrix",
        )
        parser.add_argument(
            "--rgp-power-iters", type=int, metavar="N",
            help="power iterations computing the carriers before each update",
        )
        parser.add_argument(
            "--rgp-carrier-source", choices=CARRIER_SOURCES,
            help="matrix whose top singular subspace gives the carriers: the current "
            "weight (the published language code) or the update since the start of "
            "training (the paper's historical update)",
        )
        parser.add_argument(
            "--rgp-reference-projection", action="store_true",
            help="rebuild weight gradients with the published code's '+ L Lt dL R' "
            "instead of the projection's '-' (only to reproduce published numbers)",
        )

    @classmethod
    def build_model(cls, args, task):
        base_rgp_architecture(args)
        check_trained_privately(args, task)
        if args.rgp_rank < 1:
            raise DPConfigError(f"--rgp-rank must be >= 1, got {args.rgp_rank}")
        if args.rgp_power_iters < 1:
            raise DPConfigError(f"--rgp-power-iters must be >= 1, got {args.rgp_power_iters}")
        if args.rgp_carrier_source not in CARRIER_SOURCES:
            raise DPConfigError(
                f"--rgp-carrier-source must be one of {CARRIER_SOURCES}, got {args.rgp_carrier_source!r}"
            )
        from omegaconf import OmegaConf

        if OmegaConf.is_config(args):
            OmegaConf.set_struct(args, False)
        if not safe_hasattr(args, "max_positions"):
            if not safe_hasattr(args, "tokens_per_sample"):
                args.tokens_per_sample = task.max_positions()
            args.max_positions = args.tokens_per_sample
        model = cls(args, RGPRobertaEncoder(args, task.source_dictionary))
        if OmegaConf.is_config(args):
            OmegaConf.set_struct(args, True)
        for param in model.parameters():
            param.requires_grad_(False)
        for module in model.low_rank_modules():
            module.weight.requires_grad_(True)
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
