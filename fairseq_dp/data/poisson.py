# Copyright (c) fairseq_dp contributors. MIT license.
"""Poisson sampling of logical batches, as the privacy accountant assumes.

Every update draws its logical batch afresh: each training example is in it
independently with probability q. One draw serves the whole update across
all workers and ``--update-freq`` micro-batches: it is split into
``world_size × update_freq`` chunks laid out so that fairseq's own sharding
(``batches[rank::world_size]``) and grouping (``update_freq`` consecutive
batches per rank) hand every chunk of draw ``t`` to update ``t``, and no
example twice.

The micro-batches of a draw are grouped by length (``sizes``): sorted by
example length, then split into consecutive chunks, so each micro-batch pads
to about its own examples' length instead of to the longest of a random
handful (SST-2: mean 13 tokens, a random 50 pad to about 45). Per-example
clipping and the noise do not depend on how a logical batch is split, so the
update, and the guarantee, are those of any other split; only padding goes.

An "epoch" is ``ceil(N / expected batch)`` such draws, so ``--max-epoch``
keeps its meaning on average. Draw ``t`` of the privacy ledger (its t-th
update) is a function of (seed, t) alone: a run resumed mid-epoch sees the
batches of an uninterrupted one, and a run that continues from weights
carrying a ledger (fairseq's epoch and update counts restart there) draws
new batches instead of repeating the first run's.
"""

import math
from typing import Callable, List, Optional, Sequence

import numpy as np
from fairseq.data import iterators


def draw_logical_batch(
    num_examples: int, sample_rate: float, num_chunks: int, rng: np.random.Generator,
    sizes: Optional[np.ndarray] = None,
) -> List[List[int]]:
    """One Poisson sample of ``range(num_examples)`` at rate ``sample_rate``,
    shuffled and split into ``num_chunks`` (possibly empty) micro-batches;
    with ``sizes`` (example lengths), the chunks are consecutive runs of the
    sample sorted by length (ties in random order)."""
    # the size of a Bernoulli(q) subset is Binomial(N, q), and given its size
    # the subset is uniform: the same law, in O(size) per draw
    size = int(rng.binomial(num_examples, sample_rate))
    chosen = rng.choice(num_examples, size=size, replace=False)
    if sizes is not None:
        chosen = chosen[np.argsort(sizes[chosen], kind="stable")]
    return [chunk.tolist() for chunk in np.array_split(chosen, num_chunks)]


def draws_for_epoch(
    num_examples: int, sample_rate: float, first_draw: int, num_draws: int, num_chunks: int, seed: int,
    sizes: Optional[np.ndarray] = None,
) -> List[List[int]]:
    """The micro-batches of draws ``first_draw`` .. ``first_draw + num_draws - 1``
    of the ledger, draw t from a generator seeded by (seed, t)."""
    return [batch for t in range(first_draw, first_draw + num_draws)
            for batch in draw_logical_batch(num_examples, sample_rate, num_chunks,
                                            np.random.default_rng([seed, t]), sizes)]


def draws_per_epoch(num_examples: int, expected_batch_size: int) -> int:
    return max(1, math.ceil(num_examples / expected_batch_size))


class PoissonEpochBatchIterator(iterators.EpochBatchIterator):
    """fairseq's epoch iterator over Poisson draws.

    ``batch_sampler(first_draw)`` gives the micro-batches of one epoch whose
    first draw is the ledger's update ``first_draw``: the ledger's step count
    when the epoch starts, less the updates already taken from it when a run
    resumes mid-epoch (fairseq counts those in ``update_freq`` micro-batches).

    Batch order is part of the sampling scheme, so fairseq's per-epoch batch
    shuffling is off. The dummy batch fairseq keeps for workers that have
    nothing to do must hold real examples, so ``first_batch`` is the first
    non-empty micro-batch (a Poisson micro-batch may be empty).
    """

    def __init__(self, *args, batch_sampler: Callable[[int], List[List[int]]], ledger, update_freq: int, **kwargs):
        kwargs["disable_shuffling"] = True
        super().__init__(*args, batch_sampler=batch_sampler, **kwargs)
        self.ledger = ledger
        self.update_freq = update_freq
        self._first_draw = None

    @property
    def frozen_batches(self):
        if self._frozen_batches is None:
            if self._first_draw is None:
                self._first_draw = self.ledger.steps
            self._frozen_batches = tuple(self.batch_sampler(self._first_draw))
        return self._frozen_batches

    def _get_iterator_for_epoch(self, epoch, shuffle, fix_batches_to_gpus=False, offset=0):
        first_draw = self.ledger.steps - offset // self.update_freq
        if first_draw != self._first_draw:
            self._first_draw = first_draw
            self._frozen_batches = None
        return super()._get_iterator_for_epoch(epoch, False, fix_batches_to_gpus, offset)

    @property
    def first_batch(self):
        batch: Sequence[int] = next((b for b in self.frozen_batches if len(b) > 0), [0])
        return self.collate_fn([self.dataset[i] for i in batch])
