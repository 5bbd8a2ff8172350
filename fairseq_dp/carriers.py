# Copyright (c) fairseq_dp contributors. MIT license.
"""RGP's gradient carriers: power iteration, once per update.

Before each update every :class:`~fairseq_dp.modules.LowRankLinear` gets
carriers ``(L, R)``, the approximate top-r singular subspaces of its weight
(or of its change since training started, ``--rgp-carrier-source update``),
from power iteration seeded by ``(--seed, update)``. The carriers are a
function of the weights, which are already private (post-processing), so
every worker computes the same ones without communication and they cost no
privacy.
"""

from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from .clipping import at_least_float32


class CarrierSchedule:
    """Recomputes the carriers of ``modules`` (LowRankLinear) for an update."""

    def __init__(self, modules: List[nn.Module], *, seed: int, power_iters: int = 1,
                 source: str = "weight"):
        self.modules = modules
        self.seed = seed
        self.power_iters = max(power_iters or 1, 1)
        self.source = source or "weight"
        self._initial_weights: Optional[List[Tensor]] = None
        self.update: Optional[int] = None

    @torch.no_grad()
    def compute(self, update_num: int) -> None:
        """Power iteration for every reparametrized matrix, seeded from
        (seed, update_num), in a fixed module order."""
        if not self.modules:
            return
        if self.source == "update" and self._initial_weights is None:
            self._initial_weights = [m.weight.detach().clone() for m in self.modules]
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + update_num)
        for i, module in enumerate(self.modules):
            matrix = module.weight.detach()
            if self.source == "update":
                matrix = matrix - self._initial_weights[i]
            # QR has no bf16 kernel, and carriers orthonormal to bf16's
            # precision would make the projection grow the norm: float32
            matrix = at_least_float32(matrix)
            left, right = power_iteration(matrix, module.rank, self.power_iters, generator)
            module.set_carriers(left, right, update_num)
        self.update = update_num


def orthonormalize(m: Tensor) -> Tensor:
    """Orthonormal basis of the columns of ``m`` (reduced QR, signs fixed)."""
    q, r = torch.linalg.qr(m, mode="reduced")
    # QR is unique up to column signs; fixing them keeps carriers deterministic
    signs = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return q * signs.unsqueeze(-2)


def power_iteration(
    matrix: Tensor, rank: int, iters: int = 1, generator: Optional[torch.Generator] = None
) -> Tuple[Tensor, Tensor]:
    """Approximate top-``rank`` singular subspaces of ``matrix`` (p × d).

    Returns ``(L, R)`` with ``L`` (p × rank) orthonormal columns and ``R``
    (rank × d) orthonormal rows. A zero matrix (no update yet) gives the
    random orthonormal start, so carriers are always well defined.
    """
    p, d = matrix.shape
    start = torch.randn(d, rank, generator=generator, dtype=matrix.dtype,
                        device="cpu" if generator is None else generator.device)
    start = start.to(matrix.device)
    right = orthonormalize(start)  # (d, r)
    # Power iteration is memory-bound: every pass reads the whole matrix. A
    # nonzero first product proves the matrix nonzero, so the full zero check
    # (one more pass) only runs when that product is zero.
    product = matrix @ right
    if not torch.any(product) and not torch.any(matrix):
        left = torch.randn(p, rank, generator=generator, dtype=matrix.dtype,
                           device=start.device).to(matrix.device)
        return orthonormalize(left), right.t().contiguous()
    for i in range(max(iters, 1)):
        left = orthonormalize(product if i == 0 else matrix @ right)
        right = orthonormalize(matrix.t() @ left)
    return left, right.t().contiguous()
