# Copyright (c) fairseq_dp contributors. MIT license.
"""RGP's low-rank reparametrization W = L·R + W̃ of one weight matrix.

The forward value of ``W̃x + L(Rx)`` is exactly ``Wx``, so the layer computes
``Wx`` directly and the reparametrization only shapes the gradient: the
per-example gradients of the carriers are ``∂L = Σ_t g_t (R x_t)ᵀ`` and
``∂R = Σ_t (Lᵀ g_t) x_tᵀ`` (Yu et al., ICML 2021), formed from the layer's input
and output gradient without ever building a full per-example weight gradient.
Autograd never computes a gradient for ``W`` itself: that is what makes RGP
cheaper than non-private training.
"""

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..errors import DPConfigError


class _OutputGradLinear(torch.autograd.Function):
    """``y = x Wᵀ + b`` whose backward forms only the input gradient and hands
    the output gradient to ``record`` (slot 2).

    The output gradient is taken here rather than by a tensor hook because
    fairseq's attention scales q in place, and a hook on a view that is then
    changed in place never fires. ``tap`` is a zero scalar that requires grad:
    the first layer's input (frozen embeddings) does not, and without it the
    output would not be in the graph at all.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, tap, record):
        ctx.save_for_backward(weight)
        ctx.record = record
        # not a view, so it may be changed in place; filled through a 2-D view
        # of itself because a 3-D matmul with out= (or a non-contiguous 3-D
        # operand) runs as a batched matmul over a copy of the weight per time step
        out = torch.empty(*x.shape[:-1], weight.shape[0], dtype=x.dtype, device=x.device)
        flat_x, flat_out = x.reshape(-1, x.shape[-1]), out.view(-1, weight.shape[0])
        if bias is None:
            torch.mm(flat_x, weight.t(), out=flat_out)
        else:
            torch.addmm(bias, flat_x, weight.t(), out=flat_out)
        return out

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        if ctx.record is not None:
            ctx.record[2] = grad.detach()
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(grad.reshape(-1, grad.shape[-1]), weight).view(*grad.shape[:-1], weight.shape[1])
        return grad_x, None, None, None, None


def linear_subclass_copy(cls, linear: nn.Linear, **kwargs):
    """An instance of the nn.Linear subclass ``cls`` holding ``linear``'s
    weight and bias, on its device and in its dtype."""
    new = cls(linear.in_features, linear.out_features, linear.bias is not None, **kwargs)
    new.to(device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(linear.weight)
        if linear.bias is not None:
            new.bias.copy_(linear.bias)
    return new


class LowRankLinear(nn.Linear):
    """``nn.Linear`` whose weight gradient is carried by rank-``rank`` factors.

    State-dict keys are those of ``nn.Linear`` (``weight``, ``bias``), so plain
    fairseq RoBERTa checkpoints load unchanged. The carriers ``L`` (out × rank)
    and ``R`` (rank × in) are plain tensors set by :meth:`set_carriers` before
    every update (power iteration); they are not parameters and are not saved.

    Args:
        batch_dim: dimension of the batch in this layer's input (1 for
            fairseq's time-major encoder layers).
        reference_projection: rebuild the weight gradient with the published
            code's ``+ L Lᵀ ∂L R`` instead of the projection's ``−`` (for
            reproducing published numbers only).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        rank: int = 1,
        batch_dim: int = 1,
        reference_projection: bool = False,
    ):
        super().__init__(in_features, out_features, bias=bias)
        if rank < 1 or rank > min(in_features, out_features):
            raise DPConfigError(
                f"--rgp-rank {rank} is invalid for a {out_features}x{in_features} "
                f"matrix: it must be between 1 and {min(in_features, out_features)}"
            )
        self.rank = rank
        self.batch_dim = batch_dim
        self.reference_projection = reference_projection
        self.left: Optional[Tensor] = None
        self.right: Optional[Tensor] = None
        # the update whose carriers are set; a forward with stale carriers is a bug
        self.carrier_update: Optional[int] = None
        self._tap = torch.zeros((), requires_grad=True)
        # set by the DP trainer: called with (module, input), returns the
        # record whose slot 2 receives the output gradient, or None
        self.recorder = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> "LowRankLinear":
        return linear_subclass_copy(cls, linear, **kwargs)

    @property
    def carriers_active(self) -> bool:
        return self.training and self.left is not None

    def set_carriers(self, left: Tensor, right: Tensor, update_num: int) -> None:
        self.left, self.right, self.carrier_update = left, right, update_num

    def clear_carriers(self) -> None:
        self.left = self.right = self.carrier_update = None

    def forward(self, x: Tensor) -> Tensor:
        if not self.carriers_active:
            return F.linear(x, self.weight, self.bias)
        if self._tap.device != x.device or self._tap.dtype != x.dtype:
            self._tap = torch.zeros((), device=x.device, dtype=x.dtype, requires_grad=True)
        record = self.recorder(self, x) if self.recorder is not None else None
        bias = None if self.bias is None else self.bias.detach()
        # the weight is detached: autograd never forms its gradient
        return _OutputGradLinear.apply(x, self.weight.detach(), bias, self._tap, record)

    def carrier_grads(self, x: Tensor, grad_out: Tensor) -> Tuple[Tensor, Tensor]:
        """Per-example carrier gradients ``(∂L, ∂R)``, shapes (B, out, r) and
        (B, r, in), from batch-first inputs (B, N, in) and output gradients (B, N, out)."""
        rx = _matmul_last_dim(x, self.right.t())  # (B, N, r)
        ltg = _matmul_last_dim(grad_out, self.left)  # (B, N, r)
        grad_left = torch.bmm(grad_out.transpose(1, 2), rx)
        grad_right = torch.bmm(ltg.transpose(1, 2), x)
        return grad_left, grad_right

    def project(self, grad_left: Tensor, grad_right: Tensor) -> Tensor:
        """Full-weight gradient from carrier gradients.

        With orthonormal carriers this is the orthogonal projection of ``G``
        onto ``{L X + Y R}``: ``L ∂R + ∂L R − L Lᵀ ∂L R``, whose norm never
        exceeds that of ``(∂L, ∂R)``.
        """
        L, R = self.left, self.right
        overlap = L @ (L.t() @ grad_left)
        sign = 1.0 if self.reference_projection else -1.0
        # the two rank-r products as one matmul of inner size 2r: the full
        # (out x in) matrix is written once instead of three times
        return torch.cat([L, grad_left + sign * overlap], 1) @ torch.cat([grad_right, R], 0)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", rank={self.rank}"


def _matmul_last_dim(t: Tensor, m: Tensor) -> Tensor:
    """``t @ m`` for ``t`` (..., k) and ``m`` (k, n), as one 2-D matmul over
    ``t``'s memory when its leading dims are a permutation of a contiguous
    layout (the batch-first view of a time-major activation). ``matmul`` would
    instead run one small matrix-vector product per example over strided rows."""
    leading = sorted(range(t.dim() - 1), key=lambda d: t.stride(d), reverse=True)
    in_memory_order = t.permute(*leading, t.dim() - 1)
    if not in_memory_order.is_contiguous():
        return torch.matmul(t, m)
    flat = torch.mm(in_memory_order.reshape(-1, t.shape[-1]), m)
    result = flat.view(*in_memory_order.shape[:-1], m.shape[1])
    inverse = [leading.index(d) for d in range(t.dim() - 1)]
    return result.permute(*inverse, t.dim() - 1)
