# Copyright (c) fairseq_dp contributors. MIT license.
"""Per-example gradients of ``nn.Linear``: encoder projections, FFN, heads.

Batch dimension: ``module.dp_batch_dim`` when set, else 0. With inputs
``a_i`` (N × d) and output gradients ``g_i`` (N × p) of example i, the weight
gradient is ``G_i = Σ_t g_{i,t} a_{i,t}ᵀ``. Its squared norm is either formed
from ``G_i`` (materialized, B·p·d numbers) or from the two N × N Gram
matrices, ``‖G_i‖² = Σ_{t,t'} (a_t·a_t')(g_t·g_t')`` (the ghost-norm identity of
Li et al. 2022, B·N² numbers); ghost mode takes the cheaper one, with
private-transformers' rule 2N² < p·d. For a 2-D input (N = 1, the head on
``<s>``) that is ``‖g_i‖²·‖a_i‖²``.

In ghost mode the clipped sum ``Σ_i c_i G_i = Σ_{i,t} (c_i g_{i,t}) a_{i,t}ᵀ`` is
one matrix product of the recorded tensors: no per-example gradient is kept.
"""

from typing import Dict

import torch
import torch.nn as nn
from torch import Tensor

from .registry import GradSampler, batch_first, register_grad_sampler


def ghost_is_cheaper(positions: int, in_features: int, out_features: int) -> bool:
    return 2 * positions * positions < in_features * out_features


def weight_per_example(a: Tensor, g: Tensor) -> Tensor:
    """(B, p, d) from batch-first (B, N, d) inputs and (B, N, p) output gradients."""
    return torch.bmm(g.transpose(1, 2), a)


def weight_norms_sq(a: Tensor, g: Tensor, ghost: bool) -> Tensor:
    """(B,) squared norms of ``weight_per_example(a, g)``; with ``ghost``, by
    whichever of the Gram identity and materialization is cheaper."""
    if ghost and ghost_is_cheaper(a.shape[1], a.shape[2], g.shape[2]):
        if a.shape[1] == 1:
            return a[:, 0].pow(2).sum(1) * g[:, 0].pow(2).sum(1)
        gram_a = torch.bmm(a, a.transpose(1, 2))
        gram_g = torch.bmm(g, g.transpose(1, 2))
        return (gram_a * gram_g).sum((1, 2))
    return weight_per_example(a, g).flatten(1).pow(2).sum(1)


def weight_clipped_sum(a: Tensor, g: Tensor, factors: Tensor) -> Tensor:
    """``Σ_i c_i G_i`` (p × d) without per-example gradients."""
    scaled = g * factors.to(g.dtype).view(-1, 1, 1)
    return scaled.reshape(-1, g.shape[-1]).t() @ a.reshape(-1, a.shape[-1])


@register_grad_sampler(nn.Linear)
class LinearGradSampler(GradSampler):
    def _inputs(self, module, activation, grad_out):
        batch_dim = self.batch_dim(module)
        return batch_first(activation, batch_dim), batch_first(grad_out, batch_dim)

    def per_example(self, module: nn.Module, activation: Tensor, grad_out: Tensor) -> Dict[str, Tensor]:
        a, g = self._inputs(module, activation, grad_out)
        grads = {}
        if module.weight.requires_grad:
            grads["weight"] = weight_per_example(a, g)
        if module.bias is not None and module.bias.requires_grad:
            grads["bias"] = g.sum(1)
        return grads

    def norms_and_sum(self, module, activation, grad_out, ghost=False):
        if not ghost:
            return super().norms_and_sum(module, activation, grad_out)
        a, g = self._inputs(module, activation, grad_out)
        train_weight = module.weight.requires_grad
        train_bias = module.bias is not None and module.bias.requires_grad
        norms_sq = g.new_zeros(g.shape[0])
        if train_weight:
            norms_sq = norms_sq + weight_norms_sq(a, g, ghost=True)
        if train_bias:
            norms_sq = norms_sq + g.sum(1).pow(2).sum(1)

        def clipped_sum(factors):
            summed = {}
            if train_weight:
                summed["weight"] = weight_clipped_sum(a, g, factors)
            if train_bias:
                summed["bias"] = factors.to(g.dtype) @ g.sum(1)
            return summed

        return norms_sq, clipped_sum
