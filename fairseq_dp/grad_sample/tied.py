# Copyright (c) fairseq_dp contributors. MIT license.
"""Per-example gradients of a weight shared by two modules: GPT-2's token
embedding, which is also its output projection.

Example i's gradient of the shared weight W (V × d) is the sum of both uses,
``g_i = E_i + O_i``: the embedding's ``E_i = Σ_t onehot(x_t) δ_tᵀ`` (δ_t the
gradient of the embedded token at position t) and the projection's
``O_i = Σ_s e_s h_sᵀ`` (e_s the gradient of the logits, h_s the projection's
input). Clipping needs ``‖g_i‖² = ‖E_i‖² + ‖O_i‖² + 2⟨E_i, O_i⟩``: the two
squared norms come from each module's own rule, and the cross term from
``⟨E_i, O_i⟩ = Σ_{t,s} e_s[x_t] ⟨δ_t, h_s⟩``, a (T × S) product per example,
without forming any V × d matrix. The clipped sum is each rule's clipped sum
(both go into W's ``.grad``), and the noise is added once.

A rule is a function ``(module_a, record_a, module_b, record_b) -> (B,)``
registered for the pair of module types (exact types, as the other rules).
"""

from typing import Callable, Dict, Optional, Tuple, Type

import torch
import torch.nn as nn
from torch import Tensor

from .registry import batch_first

TIED_RULES: Dict[Tuple[Type[nn.Module], Type[nn.Module]], Callable] = {}


def register_tied_rule(type_a: Type[nn.Module], type_b: Type[nn.Module]):
    def wrapper(fn):
        TIED_RULES[(type_a, type_b)] = fn
        return fn

    return wrapper


def find_tied_rule(a: nn.Module, b: nn.Module) -> Optional[Tuple[Callable, bool]]:
    """The rule for modules ``a`` and ``b`` sharing a weight, and whether the
    rule takes them in the opposite order; None when there is none."""
    if (type(a), type(b)) in TIED_RULES:
        return TIED_RULES[(type(a), type(b))], False
    if (type(b), type(a)) in TIED_RULES:
        return TIED_RULES[(type(b), type(a))], True
    return None


@register_tied_rule(nn.Embedding, nn.Linear)
def embedding_and_projection(embedding: nn.Embedding, embedding_record, projection: nn.Linear,
                             projection_record) -> Tensor:
    """(B,) ``⟨E_i, O_i⟩`` for an embedding whose weight is a Linear's weight."""
    _, tokens, delta = embedding_record
    _, inputs, logits_grad = projection_record
    emb_dim = getattr(embedding, "dp_batch_dim", 0)
    x = tokens.movedim(emb_dim, 0).reshape(tokens.shape[emb_dim], -1)                # (B, T)
    d = batch_first(delta, emb_dim)                                                 # (B, T, C)
    if embedding.padding_idx is not None:  # padding rows get no gradient
        d = d * (x != embedding.padding_idx).unsqueeze(-1).to(d.dtype)
    proj_dim = getattr(projection, "dp_batch_dim", 0)
    h = batch_first(inputs, proj_dim)                                               # (B, S, C)
    e = batch_first(logits_grad, proj_dim)                                          # (B, S, V)
    at_tokens = e.gather(2, x.unsqueeze(1).expand(-1, e.shape[1], -1))              # (B, S, T): e_s[x_t]
    inner = torch.bmm(h, d.transpose(1, 2))                                         # (B, S, T): ⟨h_s, δ_t⟩
    return (at_tokens * inner).sum((1, 2))
