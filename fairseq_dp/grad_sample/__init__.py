# Copyright (c) fairseq_dp contributors. MIT license.
"""Per-example gradient rules; importing this package registers them all."""

from .registry import GRAD_SAMPLERS, GradSampler, find_grad_sampler, register_grad_sampler  # noqa
from . import embedding, layer_norm, linear, lora, low_rank, tied  # noqa: F401  (registration side effect)

__all__ = ["GRAD_SAMPLERS", "GradSampler", "find_grad_sampler", "register_grad_sampler"]
