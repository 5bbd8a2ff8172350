# Copyright (c) fairseq_dp contributors. MIT license.
"""Per-example gradients of ``nn.Linear`` (the classification head).

Batch dimension: ``module.dp_batch_dim`` when set, else 0. A 2-D input (one
vector per example, as in the head on ``<s>``) has rank-one per-example
gradients, so norms come from ``‖g_i‖·‖a_i‖`` without materializing them.
"""

from typing import Dict

import torch
import torch.nn as nn
from torch import Tensor

from .registry import GradSampler, batch_first, register_grad_sampler


@register_grad_sampler(nn.Linear)
class LinearGradSampler(GradSampler):
    def _inputs(self, module, activation, grad_out):
        batch_dim = getattr(module, "dp_batch_dim", 0)
        return batch_first(activation, batch_dim), batch_first(grad_out, batch_dim)

    def per_example(self, module: nn.Module, activation: Tensor, grad_out: Tensor) -> Dict[str, Tensor]:
        a, g = self._inputs(module, activation, grad_out)
        grads = {}
        if module.weight.requires_grad:
            grads["weight"] = torch.bmm(g.transpose(1, 2), a)
        if module.bias is not None and module.bias.requires_grad:
            grads["bias"] = g.sum(1)
        return grads

    def norms_and_sum(self, module, activation, grad_out):
        a, g = self._inputs(module, activation, grad_out)
        if a.shape[1] != 1:
            return super().norms_and_sum(module, activation, grad_out)
        a, g = a[:, 0], g[:, 0]  # one position per example: rank-one gradients
        g_sq = g.pow(2).sum(1)
        norms_sq = torch.zeros_like(g_sq)
        if module.weight.requires_grad:
            norms_sq = norms_sq + g_sq * a.pow(2).sum(1)
        if module.bias is not None and module.bias.requires_grad:
            norms_sq = norms_sq + g_sq

        def clipped_sum(factors):
            cg = g * factors.to(g.dtype).unsqueeze(1)
            summed = {}
            if module.weight.requires_grad:
                summed["weight"] = cg.t() @ a
            if module.bias is not None and module.bias.requires_grad:
                summed["bias"] = cg.sum(0)
            return summed

        return norms_sq, clipped_sum
