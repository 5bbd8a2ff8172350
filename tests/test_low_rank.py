"""Carriers, projection and power iteration of RGP's low-rank reparametrization."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fairseq_dp.modules import LowRankLinear, orthonormalize, power_iteration


pytestmark = pytest.mark.usefixtures("float64")


def module_with_carriers(p, d, r, seed=0, reference=False):
    g = torch.Generator().manual_seed(seed)
    m = LowRankLinear(d, p, rank=r, batch_dim=0, reference_projection=reference).double()
    left, right = power_iteration(torch.randn(p, d, generator=g, dtype=torch.float64), r, 1, g)
    m.set_carriers(left, right, 0)
    return m, g


def project_full(m, G):
    """Π(G) through the carriers' gradients dL = G Rᵀ, dR = Lᵀ G."""
    return m.project(G @ m.right.t(), m.left.t() @ G)


@settings(deadline=None, max_examples=30)
@given(p=st.integers(2, 12), d=st.integers(2, 12), r=st.integers(1, 3), seed=st.integers(0, 1000))
def test_carriers_orthonormal_and_projection_is_a_projection(p, d, r, seed):
    r = min(r, p, d)
    m, g = module_with_carriers(p, d, r, seed)
    eye = torch.eye(r)
    assert torch.allclose(m.left.t() @ m.left, eye, atol=1e-10)
    assert torch.allclose(m.right @ m.right.t(), eye, atol=1e-10)
    G = torch.randn(p, d, generator=g)
    P = project_full(m, G)
    assert torch.allclose(project_full(m, P), P, atol=1e-10)  # idempotent
    assert P.norm() <= G.norm() + 1e-10
    # the orthogonal projection onto {L X + Y R}: the residual is orthogonal to it
    X, Y = torch.randn(r, d, generator=g), torch.randn(p, r, generator=g)
    assert abs(torch.sum((G - P) * (m.left @ X + Y @ m.right))) < 1e-9
    # noisy carrier gradients never give a larger weight gradient than their norm
    dL, dR = torch.randn(p, r, generator=g), torch.randn(r, d, generator=g)
    assert m.project(dL, dR).norm() <= torch.sqrt(dL.norm() ** 2 + dR.norm() ** 2) + 1e-10


def test_reference_projection_differs_by_the_overlap_sign():
    m, g = module_with_carriers(6, 5, 2, reference=False)
    ref, _ = module_with_carriers(6, 5, 2, reference=True)
    dL, dR = torch.randn(6, 2, generator=g), torch.randn(2, 5, generator=g)
    overlap = m.left @ m.left.t() @ dL @ m.right
    assert torch.allclose(ref.project(dL, dR) - m.project(dL, dR), 2 * overlap)


def test_power_iteration_recovers_top_subspace_with_a_gap():
    g = torch.Generator().manual_seed(0)
    U = orthonormalize(torch.randn(40, 40, generator=g))
    V = orthonormalize(torch.randn(30, 30, generator=g))
    s = torch.tensor([10.0, 8.0] + [1.0 / (i + 1) for i in range(28)])
    W = U[:, :30] @ torch.diag(s) @ V.t()
    left, right = power_iteration(W, 2, iters=4, generator=g)
    top_u, top_v = U[:, :2], V[:, :2]
    assert torch.allclose(left @ left.t(), top_u @ top_u.t(), atol=1e-3)
    assert torch.allclose(right.t() @ right, top_v @ top_v.t(), atol=1e-3)


def test_power_iteration_is_deterministic_and_handles_zero():
    W = torch.randn(7, 5)
    a = power_iteration(W, 2, 1, torch.Generator().manual_seed(3))
    b = power_iteration(W, 2, 1, torch.Generator().manual_seed(3))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    left, right = power_iteration(torch.zeros(7, 5), 2, 1, torch.Generator().manual_seed(3))
    assert torch.allclose(left.t() @ left, torch.eye(2), atol=1e-10)
    assert torch.allclose(right @ right.t(), torch.eye(2), atol=1e-10)


def textbook_power_iteration(matrix, rank, iters, generator):
    """Zero check on the whole matrix first, then alternate products and QR."""
    p, d = matrix.shape
    right = orthonormalize(torch.randn(d, rank, generator=generator))
    if not torch.any(matrix):
        return orthonormalize(torch.randn(p, rank, generator=generator)), right.t()
    for _ in range(iters):
        left = orthonormalize(matrix @ right)
        right = orthonormalize(matrix.t() @ left)
    return left, right.t()


@pytest.mark.parametrize("iters", [1, 3])
def test_power_iteration_matches_the_textbook_loop(iters):
    """Including the matrices where the first product is zero: a zero matrix,
    and a nonzero one whose rows are orthogonal to the random start."""
    start = orthonormalize(torch.randn(5, 1, generator=torch.Generator().manual_seed(3)))[:, 0]
    # v·start = s1·s0 − s0·s1 and powers of two in u keep it exactly 0 in floating point
    v = torch.tensor([start[1], -start[0], 0.0, 0.0, 0.0])
    orthogonal_to_start = torch.tensor([[1.0], [2.0], [0.5], [-4.0], [1.0], [0.25], [8.0]]) @ v[None]
    for W in (torch.randn(7, 5), torch.zeros(7, 5), orthogonal_to_start):
        rank = 1 if W is orthogonal_to_start else 2
        got = power_iteration(W, rank, iters, torch.Generator().manual_seed(3))
        expected = textbook_power_iteration(W, rank, iters, torch.Generator().manual_seed(3))
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert torch.any(orthogonal_to_start) and not torch.any(orthogonal_to_start @ start[:, None])


def test_rank_larger_than_matrix_is_refused():
    with pytest.raises(ValueError, match="--rgp-rank 9 is invalid for a 4x8 matrix"):
        LowRankLinear(8, 4, rank=9)
    with pytest.raises(ValueError, match="--rgp-rank 0"):
        LowRankLinear(8, 4, rank=0)
