"""Every full-model and LoRA per-example gradient rule, materialized and by
ghost norms / book-keeping sums, against a loop over one-example batches
(each example alone, without its padding), shapes drawn by hypothesis."""

import pytest
import torch
import torch.nn as nn
from fairseq.modules.layer_norm import Fp32LayerNorm
from fairseq.modules.learned_positional_embedding import LearnedPositionalEmbedding
from hypothesis import given, settings
from hypothesis import strategies as st

from fairseq_dp.grad_sample import find_grad_sampler
from fairseq_dp.grad_sample.linear import ghost_is_cheaper, weight_norms_sq, weight_per_example
from fairseq_dp.modules import LoRALinear


pytestmark = pytest.mark.usefixtures("float64")


def alone(t, batch_dim, i, length):
    """Example i alone, cut to its length: a one-example batch without padding."""
    one = t.narrow(batch_dim, i, 1)
    if length is None:
        return one
    time_dim = 1 - batch_dim
    return one.narrow(time_dim, 0, length)


def oracle(module, inputs, targets):
    """Per-example gradients of Σ (module(input_i) · target_i) by autograd."""
    grads = []
    for x, t in zip(inputs, targets):
        module.zero_grad()
        (module(x) * t).sum().backward()
        grads.append({n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
                      for n, p in module.named_parameters() if p.requires_grad})
    return grads


def check_rule(module, x, target, inputs, targets, g, atol=1e-10, rtol=1e-9):
    """Rule on the whole batch vs the oracle: per-example gradients, norms and
    clipped sums, in both clipping modes."""
    sampler = find_grad_sampler(module)
    expected = oracle(module, inputs, targets)
    activation = sampler.capture(module, (x,), {})
    y = module(x)
    (grad_out,) = torch.autograd.grad((y * target).sum(), y)
    B = len(inputs)
    per_example = sampler.per_example(module, activation, grad_out)
    assert set(per_example) == set(expected[0])
    for name, value in per_example.items():
        for i in range(B):
            torch.testing.assert_close(value[i], expected[i][name], atol=atol, rtol=rtol)
    expected_norms = torch.stack([sum(v.pow(2).sum() for v in e.values()) for e in expected])
    factors = torch.rand(B, generator=g)
    for ghost in (False, True):
        norms_sq, clipped_sum = sampler.norms_and_sum(module, activation, grad_out, ghost=ghost)
        torch.testing.assert_close(norms_sq, expected_norms, atol=atol, rtol=rtol)
        summed = clipped_sum(factors)
        assert set(summed) == set(expected[0])
        for name, value in summed.items():
            want = sum(factors[i] * expected[i][name] for i in range(B))
            torch.testing.assert_close(value, want, atol=atol, rtol=rtol)


def sequence(B, T, C, batch_dim, g):
    if T == 0:
        return torch.randn(B, C, generator=g)
    return torch.randn(*((B, T) if batch_dim == 0 else (T, B)), C, generator=g)


def padded_targets(x, p, batch_dim, lengths, g):
    """Output-gradient weights, zero at padded positions (as in the encoder,
    whose padded positions never reach the loss), and the one-example pieces."""
    target = torch.randn(*x.shape[:-1], p, generator=g)
    if x.dim() == 3:
        for i, n in enumerate(lengths):
            target.narrow(batch_dim, i, 1).narrow(1 - batch_dim, n, x.shape[1 - batch_dim] - n).zero_()
    B = len(lengths)
    lens = lengths if x.dim() == 3 else [None] * B
    bd = batch_dim if x.dim() == 3 else 0
    inputs = [alone(x, bd, i, n) for i, n in enumerate(lens)]
    targets = [alone(target, bd, i, n) for i, n in enumerate(lens)]
    return target, inputs, targets


shapes = dict(B=st.integers(1, 4), T=st.integers(0, 6), d=st.integers(1, 8), p=st.integers(1, 8),
              batch_dim=st.integers(0, 1), seed=st.integers(0, 10_000))


@settings(deadline=None, max_examples=60)
@given(bias=st.booleans(), freeze_weight=st.booleans(), data=st.data(), **shapes)
def test_linear(B, T, d, p, batch_dim, seed, bias, freeze_weight, data):
    g = torch.Generator().manual_seed(seed)
    layer = nn.Linear(d, p, bias=bias)
    if freeze_weight and bias:
        layer.weight.requires_grad_(False)
    layer.dp_batch_dim = batch_dim if T else 0
    lengths = [data.draw(st.integers(1, max(T, 1))) for _ in range(B)]
    x = sequence(B, T, d, batch_dim, g)
    target, inputs, targets = padded_targets(x, p, batch_dim, lengths, g)
    check_rule(layer, x, target, inputs, targets, g)


@settings(deadline=None, max_examples=40)
@given(r=st.integers(1, 3), alpha=st.sampled_from([1.0, 8.0, 16.0]), data=st.data(), **shapes)
def test_lora(B, T, d, p, batch_dim, seed, r, alpha, data):
    g = torch.Generator().manual_seed(seed)
    layer = LoRALinear(d, p, rank=r, alpha=alpha)
    layer.weight.requires_grad_(False)
    layer.bias.requires_grad_(False)
    with torch.no_grad():  # B starts at 0, which would make ∇A zero
        layer.lora_B.normal_(generator=g)
    layer.dp_batch_dim = batch_dim if T else 0
    lengths = [data.draw(st.integers(1, max(T, 1))) for _ in range(B)]
    x = sequence(B, T, d, batch_dim, g)
    target, inputs, targets = padded_targets(x, p, batch_dim, lengths, g)
    check_rule(layer, x, target, inputs, targets, g)


@settings(deadline=None, max_examples=40)
@given(train_bias=st.booleans(), data=st.data(), **shapes)
def test_layer_norm(B, T, d, p, batch_dim, seed, train_bias, data):
    g = torch.Generator().manual_seed(seed)
    layer = nn.LayerNorm(d)
    with torch.no_grad():
        layer.weight.normal_(generator=g)
    if not train_bias:
        layer.bias.requires_grad_(False)
    layer.dp_batch_dim = batch_dim if T else 0
    lengths = [data.draw(st.integers(1, max(T, 1))) for _ in range(B)]
    x = sequence(B, T, d, batch_dim, g) * 3 + 1
    target, inputs, targets = padded_targets(x, d, batch_dim, lengths, g)
    check_rule(layer, x, target, inputs, targets, g)


@settings(deadline=None, max_examples=60)
@given(B=st.integers(1, 4), T=st.integers(1, 6), V=st.integers(2, 8), C=st.integers(1, 6),
       padding_idx=st.sampled_from([None, 0, 1]), batch_dim=st.integers(0, 1),
       seed=st.integers(0, 10_000))
def test_embedding(B, T, V, C, padding_idx, batch_dim, seed):
    """Token embedding: repeated tokens (small vocabularies), padding tokens
    anywhere (their row gets no gradient)."""
    g = torch.Generator().manual_seed(seed)
    layer = nn.Embedding(V, C, padding_idx=padding_idx)
    layer.dp_batch_dim = batch_dim
    tokens = torch.randint(0, V, (B, T) if batch_dim == 0 else (T, B), generator=g)
    target = torch.randn(*tokens.shape, C, generator=g)
    inputs = [tokens.narrow(batch_dim, i, 1) for i in range(B)]
    targets = [target.narrow(batch_dim, i, 1) for i in range(B)]
    check_rule(layer, tokens, target, inputs, targets, g)


@settings(deadline=None, max_examples=40)
@given(B=st.integers(1, 4), T=st.integers(1, 6), C=st.integers(1, 6), data=st.data(),
       seed=st.integers(0, 10_000))
def test_learned_positional_embedding(B, T, C, data, seed):
    """fairseq's positional embedding takes the (right-padded) tokens and
    derives the positions; padded positions get the padding row, which gets
    no gradient, so each example's gradient equals its unpadded one's."""
    g = torch.Generator().manual_seed(seed)
    pad = 1
    layer = LearnedPositionalEmbedding(T + pad + 1, C, padding_idx=pad)
    lengths = [data.draw(st.integers(1, T)) for _ in range(B)]
    tokens = torch.randint(pad + 1, 20, (B, T), generator=g)
    for i, n in enumerate(lengths):
        tokens[i, n:] = pad
    target = torch.randn(B, T, C, generator=g)
    inputs = [tokens[i:i + 1, :n] for i, n in enumerate(lengths)]
    targets = [target[i:i + 1, :n] for i, n in enumerate(lengths)]
    check_rule(layer, tokens, target, inputs, targets, g)


def test_fp32_layer_norm_normalizes_in_float32():
    """fairseq's Fp32LayerNorm normalizes in float32 even on float64 input:
    float32 agreement (its own kernel rounds differently from the rule's)."""
    g = torch.Generator().manual_seed(0)
    layer = Fp32LayerNorm(5)
    layer.dp_batch_dim = 1
    x = torch.randn(4, 3, 5, generator=g) * 3 + 1
    target = torch.randn(4, 3, 5, generator=g)
    inputs = [x[:, i:i + 1] for i in range(3)]
    targets = [target[:, i:i + 1] for i in range(3)]
    check_rule(layer, x, target, inputs, targets, g, atol=1e-6, rtol=1e-5)


def test_ghost_norm_branches_agree_with_materialized():
    """Both sides of the cheaper-path choice, on one input each way."""
    g = torch.Generator().manual_seed(0)
    for N, d, p in ((2, 8, 8), (9, 3, 4)):
        a, gr = torch.randn(3, N, d, generator=g), torch.randn(3, N, p, generator=g)
        expected = weight_per_example(a, gr).flatten(1).pow(2).sum(1)
        assert ghost_is_cheaper(N, d, p) == (N == 2)
        torch.testing.assert_close(weight_norms_sq(a, gr, ghost=True), expected)


def test_unsupported_embedding_options_are_refused():
    layer = nn.Embedding(5, 3, max_norm=1.0)
    with pytest.raises(ValueError, match="max_norm"):
        find_grad_sampler(layer).trainable_params(layer)
