# Copyright (c) fairseq_dp contributors. MIT license.
"""Per-example clipping: one flat L2 norm per example over every privatized
gradient, clip factors ``min(1, C / (‖g_i‖ + 1e-6))``, and the clipped sum.

The per-example gradients themselves come from the registered rules
(``fairseq_dp.grad_sample``), one per module type, fed by what
:class:`~fairseq_dp.recording.Recorder` recorded of one forward: each tracked
module's input and output gradient. ``ghost`` lets a rule give the norms
without materializing per-example gradients where that is cheaper and form
the clipped sum with the factors folded in (book-keeping); ``materialize``
is the reference path. Both give the same update.

Under bf16 (or any precision below float32) the recorded activations and
output gradients are upcast to float32 first: the norms, the clip factors and
the clipped sums are float32, computed from the same numbers, so a clipped
example's contribution has norm C to float32 precision, not bf16's.
"""

from typing import Callable, Dict, List, Sequence, Tuple

import torch
from torch import Tensor

from .grad_sample import find_grad_sampler

# numerical floor of the clip factor's denominator, as in opacus
CLIP_STABILITY = 1e-6
CLIPPING_MODES = ("ghost", "materialize")
# float dtypes the norms, clip factors, sums and noise are never computed in
LOW_PRECISION = (torch.float16, torch.bfloat16)


def at_least_float32(t):
    """``t`` in float32 when it is a float tensor of lower precision (bf16,
    fp16); anything else (float32, float64, token indices, None) unchanged."""
    if t is not None and t.dtype in LOW_PRECISION:
        return t.float()
    return t


def clip_factors(norms: Tensor, clip_norm: float) -> Tensor:
    return (clip_norm / (norms + CLIP_STABILITY)).clamp(max=1.0)


def clipped_sums(records: List[list], name_of: Dict[int, str], clip_norm: float, *, ghost: bool,
                 like: Tensor, tied: Sequence[tuple] = ()) -> Tuple[Dict[str, Dict[str, Tensor]], int]:
    """The clipped sum of every tracked module's per-example gradients, by
    module name, and how many examples were clipped.

    ``records``: ``[module, input, output gradient]`` of one forward and
    backward; ``name_of``: module id -> name; ``like``: a tensor whose dtype
    and device the norms take (the loss); ``tied``: (module a, module b,
    rule) for weights two modules share, whose per-example norm needs the
    cross term 2⟨g_a, g_b⟩ (``grad_sample/tied.py``). Records in bf16 or fp16
    are upcast to float32, and the norms are at least float32 whatever
    ``like`` is."""
    records = [[module, at_least_float32(activation), at_least_float32(grad_out)]
               for module, activation, grad_out in records]
    batch_size = None
    norms_sq = 0.0
    partial: List[Tuple[str, Callable[[Tensor], Dict[str, Tensor]]]] = []
    for module, activation, grad_out in records:
        sampler = find_grad_sampler(module)
        name = name_of[id(module)]
        size = activation.shape[sampler.batch_dim(module)]
        if batch_size is not None and size != batch_size:
            raise RuntimeError(
                f"DP training: module '{name}' sees a batch of {size} along dimension "
                f"{sampler.batch_dim(module)}, other modules {batch_size}; its batch "
                "dimension (dp_batch_dim) is wrong"
            )
        batch_size = size
        if grad_out is None:  # the loss does not depend on this module
            partial.append((name, lambda factors, s=sampler, m=module: s.zero_sum(m)))
            continue
        n_sq, clipped_sum = sampler.norms_and_sum(module, activation, grad_out, ghost=ghost)
        norms_sq = norms_sq + n_sq
        partial.append((name, clipped_sum))
    by_module = {id(r[0]): r for r in records}
    for a, b, cross in tied:
        record_a, record_b = by_module[id(a)], by_module[id(b)]
        if record_a[2] is not None and record_b[2] is not None:
            norms_sq = norms_sq + 2 * cross(a, record_a, b, record_b)
    # rounding can leave a tiny negative sum when the two uses nearly cancel
    dtype = torch.promote_types(like.dtype, torch.float32)
    norms = torch.sqrt(torch.as_tensor(norms_sq, dtype=dtype, device=like.device).clamp(min=0))
    factors = clip_factors(norms, clip_norm)
    summed = {name: clipped_sum(factors) for name, clipped_sum in partial}
    return summed, int((factors < 1.0).sum().item())
