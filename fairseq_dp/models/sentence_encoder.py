# Copyright (c) fairseq_dp contributors. MIT license.
"""Options every fairseq_dp RoBERTa model shares, for converted sentence encoders.

``--classification-pooling``: fairseq's RoBERTa heads read the first token
(``<s>``/``[CLS]``). Encoders trained as sentence embedders, such as
all-MiniLM-L6-v2, were trained on the mean of their token states instead; their
first token is a poor feature until fine-tuning has moved it, and DP's few,
noisy updates move it little (on SST-2 a frozen MiniLM's mean state is worth
about 5 accuracy points more than its first token).

``--layer-norm-eps``: BERT checkpoints use 1e-12, fairseq 1e-5.
"""

import contextlib
import logging
from typing import Optional

import torch
from torch import nn

from fairseq.models.roberta.model import RobertaClassificationHead
from fairseq.utils import safe_getattr

from ..checkpoint_fit import check_checkpoints_on_load
from ..errors import DPConfigError

logger = logging.getLogger(__name__)

POOLING_CHOICES = ("cls", "mean")
SENTENCE_ENCODER_DEFAULTS = {"classification_pooling": "cls", "layer_norm_eps": 1e-5, "non_private_baseline": False}


def add_sentence_encoder_args(parser) -> None:
    parser.add_argument(
        "--classification-pooling", choices=POOLING_CHOICES,
        help="input of the classification heads: the first token's state (fairseq's "
        "RoBERTa, default) or the mean over the non-padding tokens (sentence-embedding "
        "encoders such as all-MiniLM-L6-v2)",
    )
    parser.add_argument(
        "--layer-norm-eps", type=float, metavar="EPS",
        help="epsilon of every LayerNorm (fairseq: 1e-5; converted BERT checkpoints: 1e-12)",
    )
    parser.add_argument(
        "--non-private-baseline", action="store_true",
        help="train this DP architecture under a non-DP task (fairseq's sentence_prediction) "
        "on purpose, without any privacy; without it that combination is refused",
    )


def check_trained_privately(args, task, dp_task: str = "dp_sentence_prediction") -> None:
    """The plugin's archs exist for DP training; under a task that neither
    clips nor adds noise they would train without privacy and without a word.
    ``dp_task``: the DP task (and criterion) the message suggests."""
    if getattr(task, "accountant", None) is not None or safe_getattr(args, "non_private_baseline", False):
        return
    # fairseq's dataclass tasks keep their options as task.cfg, language_modeling as task.args
    task_cfg = getattr(task, "cfg", None) or getattr(task, "args", None)
    task_name = safe_getattr(task_cfg, "_name", None) or type(task).__name__
    arch = safe_getattr(args, "arch", None) or safe_getattr(args, "_name", "?")
    raise DPConfigError(
        f"--arch {arch} is a fairseq_dp architecture, but --task {task_name} "
        f"trains it without differential privacy. Use --task {dp_task} --criterion "
        f"{dp_task}, or add --non-private-baseline to train it without privacy on purpose"
    )


def sentence_encoder_architecture(args) -> None:
    for name, default in SENTENCE_ENCODER_DEFAULTS.items():
        if safe_getattr(args, name, None) is None:
            setattr(args, name, default)


def check_sentence_encoder_args(args) -> None:
    if args.classification_pooling not in POOLING_CHOICES:
        raise DPConfigError(
            f"--classification-pooling must be one of {POOLING_CHOICES}, got {args.classification_pooling!r}"
        )
    if not args.layer_norm_eps > 0:
        raise DPConfigError(f"--layer-norm-eps must be > 0, got {args.layer_norm_eps}")


def set_layer_norm_eps(model: nn.Module, eps: float) -> None:
    # fairseq builds apex's FusedLayerNorm instead of nn.LayerNorm when apex and
    # CUDA are there; both keep normalized_shape and eps
    for module in model.modules():
        if isinstance(module, nn.LayerNorm) or (hasattr(module, "normalized_shape") and hasattr(module, "eps")):
            module.eps = eps


def mean_over_tokens(features: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
    """(B, T, C) states and a (B, T) padding mask -> (B, 1, C), the mean over
    each row's non-padding tokens, shaped so that a RoBERTa head's
    ``features[:, 0, :]`` reads the mean."""
    keep = (~padding_mask).unsqueeze(-1).to(features.dtype)
    return ((features * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1)).unsqueeze(1)


# the attribute by which features_only outputs carry their padding mask to a head
PADDING_MASK_ATTR = "fairseq_dp_padding_mask"


class MeanPoolingClassificationHead(RobertaClassificationHead):
    """fairseq's RoBERTa classification head (same parameters and names) on the
    mean over the non-padding tokens instead of the first token.

    The pooling lives in the head, not only in the model's forward, because
    fairseq's ``RobertaHubInterface.predict`` (what ``RobertaModel.from_pretrained``
    returns) calls ``model(tokens, features_only=True)`` and applies the head to
    the result itself. The plugin's models attach the padding mask to that
    result, so the head pools exactly as in training and validation, batched and
    padded or not."""

    def forward(self, features, padding_mask: Optional[torch.Tensor] = None, **kwargs):
        if padding_mask is None:
            padding_mask = getattr(features, PADDING_MASK_ATTR, None)
        if padding_mask is None:
            if features.size(1) != 1:
                raise DPConfigError(
                    "this classification head reads the mean over the non-padding tokens "
                    "(--classification-pooling mean) and was given states without their padding "
                    "mask: use model(tokens, classification_head_name=...), the hub interface's "
                    "predict, or pass padding_mask=tokens.eq(pad)"
                )
            return super().forward(features)  # already one vector per example
        return super().forward(mean_over_tokens(features, padding_mask))


class SentenceEncoderMixin:
    """For a RobertaModel subclass: checks these options, applies
    ``--layer-norm-eps`` once the encoder is built, gives mean-pooling models
    :class:`MeanPoolingClassificationHead`, and refuses checkpoints whose encoder
    has other sizes with a message (:mod:`fairseq_dp.checkpoint_fit`)."""

    def __init__(self, args, encoder):
        check_sentence_encoder_args(args)
        super().__init__(args, encoder)
        set_layer_norm_eps(self, args.layer_norm_eps)
        check_checkpoints_on_load(self)

    @classmethod
    def build_model(cls, args, task):
        check_trained_privately(args, task)
        return super().build_model(args, task)

    def forward(self, src_tokens, features_only=False, return_all_hiddens=False,
                classification_head_name=None, **kwargs):
        if self.args.classification_pooling == "cls":
            return super().forward(src_tokens, features_only, return_all_hiddens,
                                   classification_head_name, **kwargs)
        padding_mask = src_tokens.eq(self.encoder.dictionary.pad())
        if classification_head_name is not None:
            x, extra = self.encoder(src_tokens, True, return_all_hiddens, **kwargs)
            return self.classification_heads[classification_head_name](x, padding_mask=padding_mask), extra
        x, extra = self.encoder(src_tokens, features_only, return_all_hiddens, **kwargs)
        if features_only:
            setattr(x, PADDING_MASK_ATTR, padding_mask)
        return x, extra

    def register_classification_head(self, name, num_classes=None, inner_dim=None, **kwargs):
        super().register_classification_head(name, num_classes, inner_dim, **kwargs)
        if self.args.classification_pooling == "mean":
            # RobertaModel.register_classification_head's head, pooling differently
            self.classification_heads[name] = MeanPoolingClassificationHead(
                input_dim=self.args.encoder_embed_dim,
                inner_dim=inner_dim or self.args.encoder_embed_dim,
                num_classes=num_classes,
                activation_fn=self.args.pooler_activation_fn,
                pooler_dropout=self.args.pooler_dropout,
                q_noise=self.args.quant_noise_pq,
                qn_block_size=self.args.quant_noise_pq_block_size,
                do_spectral_norm=self.args.spectral_norm_classification_head,
            )


def keep_first_token_pooling_of_old_checkpoint(model_cfg) -> None:
    """A checkpoint saved before ``--classification-pooling`` existed has no such
    key; its heads were trained on the first token, which the ``_minilm`` archs'
    ``mean`` default would silently replace. (A new command line or config
    always has the key, ``None`` when the flag is not given.)"""
    from omegaconf import OmegaConf, open_dict

    if isinstance(model_cfg, dict) or OmegaConf.is_config(model_cfg):
        if "classification_pooling" in model_cfg:
            return
        with open_dict(model_cfg) if OmegaConf.is_config(model_cfg) else contextlib.nullcontext():
            model_cfg["classification_pooling"] = "cls"
    elif hasattr(model_cfg, "classification_pooling"):
        return
    else:
        model_cfg.classification_pooling = "cls"
    from fairseq.models import ARCH_MODEL_REGISTRY

    get = model_cfg.get if hasattr(model_cfg, "get") else lambda k, d=None: getattr(model_cfg, k, d)
    model_class = ARCH_MODEL_REGISTRY.get(get("arch") or get("_name"))
    if model_class is not None and not model_class.__module__.startswith("fairseq_dp."):
        return  # fairseq's own RoBERTa archs have no such flag: first token is all they know
    logger.warning("the checkpoint predates --classification-pooling: its heads keep reading the first token")


def minilm_architecture(args) -> None:
    """all-MiniLM-L6-v2 (6 layers, hidden 384) as ``fairseq_dp.convert`` writes it:
    BERT's LayerNorm ε, and the mean pooling it was trained with as a sentence encoder."""
    args.encoder_layers = safe_getattr(args, "encoder_layers", 6)
    args.encoder_embed_dim = safe_getattr(args, "encoder_embed_dim", 384)
    args.encoder_ffn_embed_dim = safe_getattr(args, "encoder_ffn_embed_dim", 1536)
    args.encoder_attention_heads = safe_getattr(args, "encoder_attention_heads", 12)
    args.layer_norm_eps = safe_getattr(args, "layer_norm_eps", 1e-12)
    args.classification_pooling = safe_getattr(args, "classification_pooling", "mean")


# The "tiny" encoder of selective pre-training (Yu et al., TMLR 2024): BERT's
# shape at 4 layers, hidden 312, 12 heads, FFN 1200, on MiniLM's WordPiece
# vocabulary; 512 positions so that fine-tuning with --max-positions 512 loads
# a checkpoint pre-trained with a shorter --tokens-per-sample strictly.
TINY_SIZES = {"encoder_layers": 4, "encoder_embed_dim": 312, "encoder_ffn_embed_dim": 1200,
              "encoder_attention_heads": 12, "max_positions": 512}


def tiny_sizes(args) -> None:
    """The tiny encoder's sizes only (for fairseq's own ``roberta`` model,
    which has no sentence-encoder options)."""
    for name, default in TINY_SIZES.items():
        setattr(args, name, safe_getattr(args, name, default))


def tiny_architecture(args) -> None:
    """The tiny encoder pre-trained from scratch by ``fairseq-dp-pretrain``:
    fairseq's LayerNorm ε (the one pre-training used, unlike a converted BERT's
    1e-12), and mean pooling by default, as for MiniLM: DP's few, noisy updates
    move the first token little, and a from-scratch MLM never trained it as a
    sentence feature."""
    tiny_sizes(args)
    args.layer_norm_eps = safe_getattr(args, "layer_norm_eps", 1e-5)
    args.classification_pooling = safe_getattr(args, "classification_pooling", "mean")
