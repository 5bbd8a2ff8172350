# Copyright (c) fairseq_dp contributors. MIT license.
"""The privacy plan of a DP run: sampling rate, number of updates, σ and ε.

One implementation for the training task (which logs the plan when it loads
the training set) and for ``fairseq-dp-plan`` (which prints it before anything
runs), so that both give the same numbers for the same settings.
"""

import math
from typing import List, Optional, Sequence, Tuple

from .accounting import PrivacyAccountant, calibrate_noise_multiplier
from .data.poisson import draws_per_epoch

SAMPLINGS = ("poisson", "shuffle")


def sample_rate(num_examples: int, expected_batch_size: int) -> float:
    """q: the probability that one example is in one logical batch."""
    return min(1.0, expected_batch_size / num_examples)


def updates_per_epoch(
    num_examples: int,
    *,
    expected_batch_size: int,
    sampling: str = "poisson",
    batch_size: Optional[int] = None,
    update_freq: int = 1,
    world_size: int = 1,
) -> int:
    """Updates in one epoch of ``num_examples`` training examples.

    Args:
        expected_batch_size: the expected logical batch (``--batch-size`` ×
            ``--update-freq`` × workers in a training run).
        sampling: ``poisson``: an epoch is ``ceil(N / expected batch)`` draws;
            ``shuffle``: fairseq's own batches of ``batch_size`` examples.
        batch_size, update_freq, world_size: the micro-batch layout; only
            ``shuffle`` depends on them beyond their product.
    """
    if str(sampling) == "poisson":
        return draws_per_epoch(num_examples, expected_batch_size)
    if batch_size is None:
        batch_size = expected_batch_size // (update_freq * world_size)
    # fairseq shards the batches over workers, then groups --update-freq of them
    batches = math.ceil(num_examples / batch_size)
    return math.ceil(math.ceil(batches / world_size) / update_freq)


def planned_updates(per_epoch: int, max_epoch: int = 0, max_update: int = 0) -> Optional[int]:
    """The updates a run takes: the first of --max-epoch and --max-update
    reached (0 means unset, as in fairseq); None when neither is set."""
    limits = [max_epoch * per_epoch] if max_epoch and max_epoch > 0 else []
    limits += [max_update] if max_update and max_update > 0 else []
    return min(limits) if limits else None


def noise_multiplier(
    *,
    sample_rate: float,
    updates: Optional[int],
    delta: float,
    mechanism: str,
    target_epsilon: Optional[float] = None,
    given: Optional[float] = None,
) -> float:
    """σ of the run: ``given``, or calibrated so that ε after ``updates`` is at
    most ``target_epsilon``."""
    if target_epsilon is None:
        return float(given)
    return calibrate_noise_multiplier(
        target_epsilon=target_epsilon, delta=delta, sample_rate=sample_rate, steps=updates,
        mechanism=mechanism,
    )


def epsilon(sigma: float, q: float, updates: int, delta: float, mechanism: str) -> float:
    """ε after ``updates`` updates at (σ, q), from a fresh ledger."""
    return PrivacyAccountant(mechanism).epsilon_after(
        delta, noise_multiplier=sigma, sample_rate=q, num_steps=updates
    )


def epoch_ends(per_epoch: int, updates: int, every: int = 1) -> List[Tuple[int, int]]:
    """``(epoch, updates so far)`` at the end of every ``every``-th epoch and
    at the last update (which may fall inside an epoch with --max-update)."""
    ends = []
    epoch = every
    while epoch * per_epoch < updates:
        ends.append((epoch, epoch * per_epoch))
        epoch += every
    ends.append((math.ceil(updates / per_epoch), updates))
    return ends


def epsilon_table(
    sigma: float, q: float, ends: Sequence[Tuple[int, int]], delta: float, mechanisms: Sequence[str]
) -> List[Tuple[int, int, List[float]]]:
    """``(epoch, updates, [ε for each mechanism])`` for each row of ``ends``."""
    return [(epoch, n, [epsilon(sigma, q, n, delta, m) for m in mechanisms]) for epoch, n in ends]
