# Copyright (c) fairseq_dp contributors. MIT license.
"""``roberta_tiny``: the tiny encoder of selective pre-training (Yu et al.,
TMLR 2024) as an architecture of fairseq's own ``roberta`` model, for
pre-training from scratch with ``--task masked_lm_selected`` (or fairseq's
``masked_lm``). Its checkpoints fine-tune with ``roberta_pooled_tiny``,
``roberta_lora_tiny`` and ``roberta_rgp_tiny`` (same sizes, fairseq's
LayerNorm ε), or with stock ``roberta`` given the same size flags.

It is fairseq's model, not a plugin one: pre-training on public text needs
none of the plugin's options, and its checkpoints keep fairseq's plain
RoBERTa state."""

from fairseq.models import register_model_architecture
from fairseq.models.roberta.model import base_architecture

from .sentence_encoder import tiny_sizes


@register_model_architecture("roberta", "roberta_tiny")
def roberta_tiny_architecture(args):
    tiny_sizes(args)
    base_architecture(args)
