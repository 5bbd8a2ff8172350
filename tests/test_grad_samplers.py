"""Every per-example gradient rule against a loop over one-example batches."""

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from fairseq_dp.grad_sample import find_grad_sampler
from fairseq_dp.modules import LowRankLinear, power_iteration


pytestmark = pytest.mark.usefixtures("float64")


def layer_input(B, T, d, batch_dim, g):
    shape = (B, d) if T == 0 else ((B, T, d) if batch_dim == 0 else (T, B, d))
    return torch.randn(*shape, generator=g)


def oracle_weight_grads(layer, x, target, batch_dim):
    """Per-example full gradients by running each example alone."""
    grads = []
    for i in range(x.shape[batch_dim]):
        xi = x.narrow(batch_dim, i, 1)
        ti = target.narrow(batch_dim, i, 1)
        layer.zero_grad()
        loss = (nn.functional.linear(xi, layer.weight, layer.bias) * ti).sum()
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in layer.named_parameters() if p.requires_grad})
    return grads


def recorded(layer, x, target):
    y = layer(x)
    loss = (y * target).sum()
    (g,) = torch.autograd.grad(loss, y)
    return g


@settings(deadline=None, max_examples=40)
@given(B=st.integers(1, 5), T=st.integers(0, 4), d=st.integers(1, 6), p=st.integers(1, 6),
       batch_dim=st.integers(0, 1), bias=st.booleans(), seed=st.integers(0, 100))
def test_linear_rule(B, T, d, p, batch_dim, bias, seed):
    if T == 0:
        batch_dim = 0
    g = torch.Generator().manual_seed(seed)
    layer = nn.Linear(d, p, bias=bias)
    layer.dp_batch_dim = batch_dim
    x = layer_input(B, T, d, batch_dim, g)
    target = torch.randn(*x.shape[:-1], p, generator=g)
    oracle = oracle_weight_grads(layer, x, target, batch_dim)
    grad_out = recorded(layer, x, target)
    sampler = find_grad_sampler(layer)
    per_example = sampler.per_example(layer, x, grad_out)
    for i in range(B):
        for name, value in per_example.items():
            assert torch.allclose(value[i], oracle[i][name], atol=1e-10)
    norms_sq, clipped_sum = sampler.norms_and_sum(layer, x, grad_out)
    expected_norms = torch.stack([sum(v.pow(2).sum() for v in o.values()) for o in oracle])
    assert torch.allclose(norms_sq, expected_norms, atol=1e-10)
    factors = torch.rand(B, generator=g)
    summed = clipped_sum(factors)
    for name in summed:
        expected = sum(factors[i] * oracle[i][name] for i in range(B))
        assert torch.allclose(summed[name], expected, atol=1e-10)


@settings(deadline=None, max_examples=40)
@given(B=st.integers(1, 5), T=st.integers(1, 4), d=st.integers(1, 6), p=st.integers(1, 6),
       r=st.integers(1, 3), batch_dim=st.integers(0, 1), seed=st.integers(0, 100))
def test_low_rank_rule(B, T, d, p, r, batch_dim, seed):
    r = min(r, d, p)
    g = torch.Generator().manual_seed(seed)
    layer = LowRankLinear(d, p, rank=r, batch_dim=batch_dim)
    layer.bias.requires_grad_(False)
    left, right = power_iteration(torch.randn(p, d, generator=g), r, 1, g)
    x = layer_input(B, T, d, batch_dim, g)
    target = torch.randn(*x.shape[:-1], p, generator=g)
    layer.weight.grad = None
    oracle = oracle_weight_grads(layer, x, target, batch_dim)  # plain path: full G_i
    layer.weight.grad = None
    layer.train()
    layer.set_carriers(left, right, 0)
    grad_out = recorded(layer, x, target)
    sampler = find_grad_sampler(layer)
    per_example = sampler.per_example(layer, x, grad_out)
    for i in range(B):
        G = oracle[i]["weight"]
        assert torch.allclose(per_example["left"][i], G @ right.t(), atol=1e-10)
        assert torch.allclose(per_example["right"][i], left.t() @ G, atol=1e-10)
    factors = torch.rand(B, generator=g)
    _, clipped_sum = sampler.norms_and_sum(layer, x, grad_out)
    summed = clipped_sum(factors)
    layer.weight.grad = None
    sampler.accumulate_grad(layer, summed)
    G_sum = sum(factors[i] * oracle[i]["weight"] for i in range(B))
    projected = left @ left.t() @ G_sum + G_sum @ right.t() @ right - left @ left.t() @ G_sum @ right.t() @ right
    assert torch.allclose(layer.weight.grad, projected, atol=1e-10)


def test_low_rank_forward_is_exact_and_forms_no_weight_gradient():
    layer = LowRankLinear(5, 4, rank=2, batch_dim=1)
    x = torch.randn(3, 2, 5)
    plain = layer(x)
    g = torch.Generator().manual_seed(0)
    layer.set_carriers(*power_iteration(layer.weight.detach(), 2, 1, g), 0)
    y = layer(x)
    assert torch.equal(y, plain)
    assert y.requires_grad
    y.sum().backward()
    assert layer.weight.grad is None
