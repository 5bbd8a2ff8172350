# Copyright (c) fairseq_dp contributors. MIT license.
"""Model set-up for DP training: which parameters train (done by the task on
the built model), where each module's batch dimension is and that every
trainable projection is called as a module (done by the DP trainer).

Nothing here edits fairseq's classes: it freezes parameters and sets the
instance attributes that fairseq itself (``skip_embed_dim_check``) and the
per-example gradient rules (``dp_batch_dim``) read.
"""

import logging
import re
from typing import List, Optional

import torch.nn as nn
from fairseq.models.roberta import RobertaModel
from fairseq.models.transformer import TransformerDecoderBase, TransformerEncoderBase
from fairseq.modules import MultiheadAttention
from fairseq.modules.transformer_layer import TransformerDecoderLayerBase, TransformerEncoderLayerBase

from .errors import DPConfigError

logger = logging.getLogger(__name__)


def freeze_patterns(spec: Optional[str]) -> List[str]:
    patterns = [p.strip() for p in (spec or "").split(",") if p.strip()]
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as e:
            raise DPConfigError(f"--dp-freeze: invalid regular expression {pattern!r}: {e}") from None
    return patterns


def _names(names: List[str], limit: int = 6) -> str:
    return ", ".join(names[:limit]) + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


def freeze_matching(model: nn.Module, patterns: List[str]) -> List[str]:
    """Freeze trainable parameters whose name matches one of ``patterns``
    (``re.search``); a pattern that matches nothing is an error (a typo would
    otherwise silently train what the user meant to freeze)."""
    frozen = []
    for pattern in patterns:
        matched = [(n, p) for n, p in model.named_parameters() if re.search(pattern, n)]
        if not matched:
            raise DPConfigError(f"--dp-freeze: {pattern!r} matches no parameter name")
        for name, param in matched:
            if param.requires_grad:
                param.requires_grad_(False)
                frozen.append(name)
    if frozen:
        logger.info(f"DP: --dp-freeze froze {len(frozen)} parameters: {_names(frozen)}")
    return frozen


def freeze_unused_lm_head(model: nn.Module) -> List[str]:
    """Sentence prediction reads the classification head, never RoBERTa's LM
    head: its own parameters would get no gradient and are frozen. Its
    projection is tied to the token embedding, which stays as configured
    (the DP trainer stops a forward that runs the LM head)."""
    if not isinstance(model, RobertaModel):
        return []
    encoder_params = {id(p) for p in model.encoder.sentence_encoder.parameters()}
    frozen = []
    for name, param in model.encoder.lm_head.named_parameters():
        if param.requires_grad and id(param) not in encoder_params:
            param.requires_grad_(False)
            frozen.append("encoder.lm_head." + name)
    if frozen:
        logger.info(f"DP: sentence prediction does not use the LM head; frozen: {_names(frozen)}")
    return frozen


def set_batch_dims(model: nn.Module) -> None:
    """fairseq's encoder and decoder layers run time-major (T, B, C): the
    encoder and ``TransformerDecoderBase.extract_features`` transpose to (T, B, C)
    before the layers and back only after the final LayerNorm, so that
    LayerNorm is time-major too. Embeddings, the embedding LayerNorm, the
    output projection and the heads run batch-major, the rules' default."""
    for module in model.modules():
        if isinstance(module, (TransformerEncoderLayerBase, TransformerDecoderLayerBase)):
            for sub in module.modules():
                sub.dp_batch_dim = 1
        if isinstance(module, (TransformerEncoderBase, TransformerDecoderBase)) and module.layer_norm is not None:
            module.layer_norm.dp_batch_dim = 1


def force_module_attention(model: nn.Module) -> None:
    """fairseq's attention fast path (``F.multi_head_attention_forward``)
    reads the projection weights and never calls q/k/v/out_proj, so their
    per-example gradients could not be recorded. ``skip_embed_dim_check`` is
    the switch fairseq itself checks to take the path that calls them."""
    for module in model.modules():
        if isinstance(module, MultiheadAttention):
            module._set_skip_embed_dim_check()


def prepare_recording(model: nn.Module) -> None:
    """What the DP trainer needs to record every tracked module correctly."""
    set_batch_dims(model)
    force_module_attention(model)


def prepare_model_for_dp(model: nn.Module, freeze: Optional[str] = None) -> nn.Module:
    """The task's choice of what trains privately: ``--dp-freeze`` and the
    unused LM head."""
    freeze_matching(model, freeze_patterns(freeze))
    freeze_unused_lm_head(model)
    return model
