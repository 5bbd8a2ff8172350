# Copyright (c) fairseq_dp contributors. MIT license.
"""``roberta_pooled``: fairseq's RoBERTa, every parameter trainable as usual,
with the options the plugin's other models share (``--classification-pooling``,
``--layer-norm-eps``). It is the model for non-private fine-tuning and for DP
full fine-tuning (``--dp-clipping``) of a converted sentence encoder with the
same head input as ``roberta_rgp``. Parameter names equal RoBERTa's."""

from fairseq.models import register_model, register_model_architecture
from fairseq.models.roberta.model import RobertaModel, base_architecture

from .sentence_encoder import (
    SentenceEncoderMixin,
    add_sentence_encoder_args,
    minilm_architecture,
    tiny_architecture,
    sentence_encoder_architecture,
)


@register_model("roberta_pooled")
class RobertaPooledModel(SentenceEncoderMixin, RobertaModel):
    @staticmethod
    def add_args(parser):
        RobertaModel.add_args(parser)
        add_sentence_encoder_args(parser)

    @classmethod
    def build_model(cls, args, task):
        base_pooled_architecture(args)
        return super().build_model(args, task)


@register_model_architecture("roberta_pooled", "roberta_pooled")
def base_pooled_architecture(args):
    sentence_encoder_architecture(args)
    base_architecture(args)


@register_model_architecture("roberta_pooled", "roberta_pooled_minilm")
def roberta_pooled_minilm_architecture(args):
    minilm_architecture(args)
    base_pooled_architecture(args)


@register_model_architecture("roberta_pooled", "roberta_pooled_tiny")
def roberta_pooled_tiny_architecture(args):
    """The tiny encoder ``fairseq-dp-pretrain`` pre-trains (``roberta_tiny``)."""
    tiny_architecture(args)
    base_pooled_architecture(args)
