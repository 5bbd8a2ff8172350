# Copyright (c) fairseq_dp contributors. MIT license.
"""Per-example gradients of ``nn.Embedding`` and fairseq's
``LearnedPositionalEmbedding`` (batch-major by default, ``module.dp_batch_dim``).

Example i's gradient puts ``Σ_{t: x_t = v} g_t`` in row v, and nothing in the
``padding_idx`` row (``F.embedding`` gives it no gradient). Its squared norm is
``Σ_{t,t'} 1[x_t = x_t'] g_t·g_t'`` over non-padding positions (the
token-equality identity, B·N² numbers), or is formed from the rows the batch
touches (U of them: B·U·C numbers); ghost mode takes the cheaper. The
clipped sum is one ``index_add`` of the factor-scaled output gradients.

fairseq's positional embedding is called with the tokens and derives the
positions from them (padding positions get ``padding_idx``); the rule
records those positions, so it sees exactly the rows the forward used.
"""

from typing import Dict, Tuple

import torch
import torch.nn as nn
from fairseq import utils
from fairseq.modules.learned_positional_embedding import LearnedPositionalEmbedding
from torch import Tensor

from ..errors import DPConfigError
from .registry import GradSampler, batch_first, register_grad_sampler


class EmbeddingGradSampler(GradSampler):
    def trainable_params(self, module: nn.Embedding):
        params = super().trainable_params(module)
        if params and (module.max_norm is not None or module.scale_grad_by_freq or module.sparse):
            raise DPConfigError(
                "DP training supports embeddings without max_norm, scale_grad_by_freq and "
                "sparse gradients: their per-example gradients are not implemented"
            )
        return params

    def _inputs(self, module, indices, grad_out) -> Tuple[Tensor, Tensor, Tensor]:
        batch_dim = self.batch_dim(module)
        idx = indices.movedim(batch_dim, 0)
        idx = idx.reshape(idx.shape[0], -1)
        g = batch_first(grad_out, batch_dim)
        if module.padding_idx is None:
            valid = torch.ones_like(idx, dtype=torch.bool)
        else:
            valid = idx != module.padding_idx
        return idx, g * valid.unsqueeze(-1).to(g.dtype), valid

    def _compact(self, module, indices, grad_out):
        """Per-example gradients restricted to the U rows the batch uses:
        (rows (U,), per-example (B, U, C))."""
        idx, g, _ = self._inputs(module, indices, grad_out)
        rows, slot = torch.unique(idx, return_inverse=True)
        per = g.new_zeros(idx.shape[0], rows.numel(), g.shape[-1])
        per.scatter_add_(1, slot.unsqueeze(-1).expand_as(g), g)
        return rows, per

    def per_example(self, module, activation, grad_out) -> Dict[str, Tensor]:
        rows, per = self._compact(module, activation, grad_out)
        full = per.new_zeros(per.shape[0], *module.weight.shape)
        full[:, rows] = per
        return {"weight": full}

    def norms_and_sum(self, module, activation, grad_out, ghost=False):
        idx, g, valid = self._inputs(module, activation, grad_out)
        positions = idx.shape[1]
        rows, per = None, None
        if ghost and positions * positions <= torch.unique(idx).numel() * g.shape[-1]:
            same = (idx.unsqueeze(2) == idx.unsqueeze(1)) & valid.unsqueeze(2) & valid.unsqueeze(1)
            norms_sq = (torch.bmm(g, g.transpose(1, 2)) * same.to(g.dtype)).sum((1, 2))
        else:
            rows, per = self._compact(module, activation, grad_out)
            norms_sq = per.flatten(1).pow(2).sum(1)
            if ghost:  # the sum comes from g: do not keep the per-example rows
                rows, per = None, None
        weight = module.weight

        def clipped_sum(factors):
            factors = factors.to(g.dtype)
            summed = torch.zeros_like(weight, dtype=g.dtype)
            if ghost:
                scaled = g * factors.view(-1, 1, 1)
                summed.index_add_(0, idx.flatten(), scaled.reshape(-1, g.shape[-1]))
            else:
                summed.index_add_(0, rows, torch.einsum("b,buc->uc", factors, per))
            return {"weight": summed}

        return norms_sq, clipped_sum


register_grad_sampler(nn.Embedding)(EmbeddingGradSampler)


@register_grad_sampler(LearnedPositionalEmbedding)
class LearnedPositionalEmbeddingGradSampler(EmbeddingGradSampler):
    def capture(self, module: LearnedPositionalEmbedding, args, kwargs) -> Tensor:
        names = ("input", "incremental_state", "positions")
        call = dict(zip(names, args), **kwargs)
        if call.get("incremental_state") is not None:
            raise DPConfigError("DP training does not support incremental (decoding) positions")
        if call.get("positions") is not None:
            return call["positions"]
        return utils.make_positions(call["input"], module.padding_idx, onnx_trace=module.onnx_trace)
