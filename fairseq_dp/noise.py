# Copyright (c) fairseq_dp contributors. MIT license.
"""The Gaussian noise of DP-SGD, and where its randomness comes from.

The noise is secret by default: each update's generator is seeded with 63
fresh bits from the operating system's CSPRNG (``secrets``), used for that
update only and never stored. Knowing the code, ``--seed`` and every
checkpoint, recovering one update's noise means searching 2^63 seeds against
an update whose noise-free part is unknown; nothing in the run makes that
easier. (torch's generators are not cryptographic, so someone who can read
the training process's memory is outside this model.) ``seeded``
(``--dp-insecure-seeded-rng``) seeds it from ``(--seed, update)`` instead:
reproducible, for tests and debugging, and no protection against anyone who
knows the seed, which fairseq saves in every checkpoint.
"""

import secrets
from typing import Dict, Optional

import numpy as np
import torch
from torch import Tensor

from .clipping import at_least_float32

# keeps the noise's seed sequence apart from other streams seeded by --seed
NOISE_STREAM = 0x6E6F697365


def noise_generator(device, *, seeded: bool, seed: int, step: int) -> torch.Generator:
    """The generator of one update's noise: secret, or from (seed, ledger step)."""
    if not seeded:
        return torch.Generator(device=device).manual_seed(secrets.randbits(63))
    state = np.random.SeedSequence([seed, step, NOISE_STREAM]).generate_state(1, np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(state))


def gaussian_like(t: Tensor, std: float, generator: Optional[torch.Generator] = None) -> Tensor:
    device = generator.device if generator is not None else t.device
    return torch.normal(0.0, std, size=t.shape, generator=generator, dtype=t.dtype, device=device).to(t.device)


def add_noise(values: Dict[str, Tensor], std: float, generator: torch.Generator) -> Dict[str, Tensor]:
    """``values`` plus independent N(0, std²) noise on every coordinate. The
    noise is drawn and added in float32 at least: values in bf16 or fp16 are
    upcast first (and the sums come back in float32)."""
    noisy = {}
    for k, v in values.items():
        v = at_least_float32(v)
        noisy[k] = v + gaussian_like(v, std, generator)
    return noisy
