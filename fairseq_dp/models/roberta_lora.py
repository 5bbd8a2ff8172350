# Copyright (c) fairseq_dp contributors. MIT license.
"""``roberta_lora``: RoBERTa with frozen pretrained weights plus LoRA adapters
(DP-LoRA, Yu et al. ICLR 2022).

The chosen matrices of every encoder layer (``--lora-targets``, from q, k, v,
out, fc1, fc2) become :class:`LoRALinear` with rank ``--lora-rank`` and scale
``--lora-alpha / --lora-rank``; everything else is frozen except the
classification heads. Parameter names are RoBERTa's plus ``lora_A`` /
``lora_B``, so a plain fairseq RoBERTa checkpoint loads (the factors missing
from it keep their initialization: B = 0, so the model starts as the
checkpoint), and ``python -m fairseq_dp.merge_lora`` turns a trained checkpoint
back into a plain RoBERTa one.
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

from ..modules import LoRALinear
from .sentence_encoder import (
    SentenceEncoderMixin,
    add_sentence_encoder_args,
    minilm_architecture,
    tiny_architecture,
    sentence_encoder_architecture,
)
# parse_targets stays importable from here, where it used to live
from .swap import LAYER_TARGETS, add_lora, check_lora_args, keep_missing_parameters, parse_targets  # noqa: F401

logger = logging.getLogger(__name__)

LORA_TARGETS = LAYER_TARGETS
LORA_DEFAULTS = {"lora_rank": 16, "lora_targets": ",".join(LORA_TARGETS)}
# the plain architecture each LoRA one merges into
PLAIN_ARCH = {"roberta_lora": "roberta", "roberta_lora_base": "roberta_base", "roberta_lora_large": "roberta_large",
              "roberta_lora_minilm": "roberta", "roberta_lora_tiny": "roberta"}
# merged checkpoints whose head pooling or LayerNorm ε stock RoBERTa cannot express
POOLED_ARCH = {"roberta_lora": "roberta_pooled", "roberta_lora_base": "roberta_pooled",
               "roberta_lora_large": "roberta_pooled", "roberta_lora_minilm": "roberta_pooled_minilm",
               "roberta_lora_tiny": "roberta_pooled_tiny"}


def lora_scaling(args) -> float:
    return args.lora_alpha / args.lora_rank


@register_model("roberta_lora")
class RobertaLoRAModel(SentenceEncoderMixin, RobertaModel):
    @staticmethod
    def add_args(parser):
        RobertaModel.add_args(parser)
        add_sentence_encoder_args(parser)
        parser.add_argument("--lora-rank", type=int, metavar="R",
                            help="rank of the LoRA factors B (out x R) and A (R x in)")
        parser.add_argument("--lora-alpha", type=float, metavar="A",
                            help="LoRA scale numerator: the update is (A / R) * B A; "
                            "default R (scale 1, as Yu et al.'s RoBERTa code)")
        parser.add_argument("--lora-targets", type=str, metavar="LIST",
                            help="comma-separated matrices of every encoder layer that get "
                            f"adapters, from {','.join(LORA_TARGETS)} (default all)")

    @classmethod
    def build_model(cls, args, task):
        base_lora_architecture(args)
        check_lora_args(args.lora_rank, args.lora_targets)  # refused before the model is built
        model = super().build_model(args, task)
        targets = add_lora(model, args.lora_rank, args.lora_alpha, args.lora_targets, "roberta_lora")
        n_lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
        logger.info(f"roberta_lora: rank {args.lora_rank} on {','.join(targets)}, "
                    f"scale {lora_scaling(args):g}, {n_lora} adapter parameters")
        return model

    def lora_modules(self):
        return [m for m in self.modules() if isinstance(m, LoRALinear)]

    def register_classification_head(self, name, num_classes=None, inner_dim=None, **kwargs):
        super().register_classification_head(name, num_classes, inner_dim, **kwargs)
        for param in self.classification_heads[name].parameters():
            param.requires_grad_(True)

    def upgrade_state_dict_named(self, state_dict, name):
        super().upgrade_state_dict_named(state_dict, name)
        # a plain RoBERTa checkpoint has no adapters: they keep their initialization
        added = keep_missing_parameters(self, state_dict, name, LoRALinear, ("lora_A", "lora_B"))
        if added:
            logger.info(f"roberta_lora: {added} LoRA factors not in the checkpoint keep their initialization")


@register_model_architecture("roberta_lora", "roberta_lora")
def base_lora_architecture(args):
    for name, default in LORA_DEFAULTS.items():
        if safe_getattr(args, name, None) is None:
            setattr(args, name, default)
    if safe_getattr(args, "lora_alpha", None) is None:
        args.lora_alpha = float(args.lora_rank)
    sentence_encoder_architecture(args)
    base_architecture(args)


@register_model_architecture("roberta_lora", "roberta_lora_base")
def roberta_lora_base_architecture(args):
    roberta_base_architecture(args)
    base_lora_architecture(args)


@register_model_architecture("roberta_lora", "roberta_lora_large")
def roberta_lora_large_architecture(args):
    roberta_large_architecture(args)
    base_lora_architecture(args)


@register_model_architecture("roberta_lora", "roberta_lora_minilm")
def roberta_lora_minilm_architecture(args):
    minilm_architecture(args)
    base_lora_architecture(args)


@register_model_architecture("roberta_lora", "roberta_lora_tiny")
def roberta_lora_tiny_architecture(args):
    """The tiny encoder ``fairseq-dp-pretrain`` pre-trains (``roberta_tiny``)."""
    tiny_architecture(args)
    base_lora_architecture(args)
