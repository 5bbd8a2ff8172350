# Copyright (c) fairseq_dp contributors. MIT license.
"""Per-example gradients of LayerNorm over the last dimension: torch's
``nn.LayerNorm`` (what ``fairseq.modules.LayerNorm`` returns without apex),
fairseq's ``Fp32LayerNorm``, and apex's fused LayerNorm (fairseq's
``FusedLayerNorm`` on GPU) when apex is importable.

With ``x̂`` the normalized input, example i's gradients are
``Σ_t g_t ⊙ x̂_t`` (weight) and ``Σ_t g_t`` (bias): 2·C numbers per example, so
they are always materialized (as private-transformers does). Batch dimension:
``module.dp_batch_dim`` (fairseq encoder layers are time-major).
"""

from typing import Dict

import torch
import torch.nn as nn
from fairseq.modules.layer_norm import Fp32LayerNorm
from torch import Tensor

from ..errors import DPConfigError
from .registry import GradSampler, batch_first, register_grad_sampler

LAYER_NORM_TYPES = [nn.LayerNorm, Fp32LayerNorm]
try:  # apex is optional: fairseq uses it on GPU when it is installed
    from apex.normalization import FusedLayerNorm as ApexFusedLayerNorm

    LAYER_NORM_TYPES.append(ApexFusedLayerNorm)
except ImportError:
    pass
try:
    from fairseq.modules.layer_norm import FusedLayerNorm as FairseqFusedLayerNorm

    LAYER_NORM_TYPES.append(FairseqFusedLayerNorm)
except ImportError:  # defined by fairseq only when apex is importable
    pass


@register_grad_sampler(*LAYER_NORM_TYPES)
class LayerNormGradSampler(GradSampler):
    def trainable_params(self, module):
        params = super().trainable_params(module)
        if params and len(tuple(module.normalized_shape)) != 1:
            raise DPConfigError(
                "DP training supports LayerNorm over the last dimension only, got "
                f"normalized_shape={tuple(module.normalized_shape)}"
            )
        return params

    def per_example(self, module, activation: Tensor, grad_out: Tensor) -> Dict[str, Tensor]:
        batch_dim = self.batch_dim(module)
        x = batch_first(activation, batch_dim)
        g = batch_first(grad_out, batch_dim)
        grads = {}
        if module.weight is not None and module.weight.requires_grad:
            # Fp32LayerNorm normalizes in float32 whatever the input's dtype
            xf = x.float() if isinstance(module, Fp32LayerNorm) else x
            var, mean = torch.var_mean(xf, -1, unbiased=False, keepdim=True)
            normalized = ((xf - mean) * torch.rsqrt(var + module.eps)).to(g.dtype)
            grads["weight"] = (g * normalized).sum(1)
        if module.bias is not None and module.bias.requires_grad:
            grads["bias"] = g.sum(1)
        return grads
