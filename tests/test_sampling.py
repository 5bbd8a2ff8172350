"""Poisson sampling: the law the accountant assumes, its layout over workers
and micro-batches, and empty batches."""

import numpy as np
import pytest
import torch
from fairseq.data import iterators
from fairseq.logging import metrics
from fairseq.trainer import Trainer
from scipy import stats

from fairseq_dp.data.poisson import draw_logical_batch

from helpers import build, data_dir, train_args

N, Q = 300, 0.04


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return data_dir(tmp_path_factory, n_train=256, n_valid=32)


def test_inclusion_frequencies_and_batch_sizes_follow_the_poisson_law():
    draws, chunks = 5000, 3
    rng = np.random.default_rng(0)
    batches = [b for _ in range(draws) for b in draw_logical_batch(N, Q, chunks, rng)]
    assert len(batches) == draws * chunks
    counts = np.zeros(N)
    sizes = []
    for t in range(draws):
        members = [i for chunk in batches[t * chunks:(t + 1) * chunks] for i in chunk]
        assert len(members) == len(set(members)), "an example twice in one logical batch"
        counts[members] += 1
        sizes.append(len(members))
    # each example's inclusion count is Binomial(draws, q)
    counts_p = stats.binomtest(int(counts.sum()), draws * N, Q).pvalue
    assert counts_p > 1e-3
    sd = np.sqrt(draws * Q * (1 - Q))
    assert np.abs(counts - draws * Q).max() < 5 * sd
    assert stats.chisquare(counts).pvalue > 1e-3  # no example favoured
    # logical batch sizes are Binomial(N, q): chi-square over binned sizes
    sizes = np.array(sizes)
    edges = np.array([-1, 6, 8, 10, 11, 12, 13, 14, 16, 18, N])
    observed = np.histogram(sizes, bins=edges + 0.5)[0]
    expected = np.diff(stats.binom.cdf(edges, N, Q)) * draws
    assert stats.chisquare(observed, expected * observed.sum() / expected.sum()).pvalue > 1e-3


def test_empty_draws_happen_at_small_rates():
    rng = np.random.default_rng(1)
    batches = [b for _ in range(400) for b in draw_logical_batch(50, 0.01, 1, rng)]
    empty = sum(len(b) == 0 for b in batches)
    # P(empty) = 0.99**50 ≈ 0.605
    assert stats.binomtest(empty, 400, 0.99**50).pvalue > 1e-3


@pytest.mark.parametrize("world_size,update_freq", [(2, 1), (2, 3), (3, 2)])
def test_each_update_gets_one_draw_split_over_workers_and_micro_batches(data, world_size, update_freq):
    # the draws are compared with (seed, t)'s, so the seeded (insecure) mode
    argv = train_args(data, "--update-freq", str(update_freq), "--distributed-world-size",
                      str(world_size), "--ddp-backend", "legacy_ddp", "--dp-insecure-seeded-rng")
    _, task, _, _ = build(argv)
    dataset = task.dataset("train")
    q = task.sample_rate
    assert q == pytest.approx(8 * update_freq * world_size / 256)
    per_rank = []
    for rank in range(world_size):
        itr = task.get_batch_iterator(dataset, max_sentences=8, max_positions=64, num_shards=world_size,
                                      shard_id=rank, epoch=3, seed=1)
        groups = iterators.GroupedIterator(itr.next_epoch_itr(shuffle=True), update_freq)
        per_rank.append([[s.get("id", torch.empty(0, dtype=torch.long)).tolist() for s in g] for g in groups])
    # update t's draw comes from (seed, t): a fresh ledger starts at t = 0
    chunks = world_size * update_freq
    expected = [b for t in range(len(per_rank[0]))
                for b in draw_logical_batch(256, q, chunks, np.random.default_rng([1, t]))]
    for t in range(len(per_rank[0])):
        got = sorted(i for rank in per_rank for i in sum(rank[t], []))
        draw = sorted(sum(expected[t * world_size * update_freq:(t + 1) * world_size * update_freq], []))
        assert got == draw


def test_length_grouping_keeps_the_draw_and_sorts_its_micro_batches():
    lengths = np.random.default_rng(5).integers(3, 60, size=N)
    for t in range(50):
        plain = draw_logical_batch(N, 0.2, 4, np.random.default_rng([7, t]))
        grouped = draw_logical_batch(N, 0.2, 4, np.random.default_rng([7, t]), lengths)
        # the same Poisson sample (the law above), only split differently
        assert sorted(sum(grouped, [])) == sorted(sum(plain, []))
        assert [len(b) for b in grouped] == [len(b) for b in plain]
        flat = [lengths[i] for b in grouped for i in b]
        assert flat == sorted(flat)


def test_the_task_hands_out_length_grouped_micro_batches(data):
    argv = train_args(data, "--update-freq", "4", "--dp-insecure-seeded-rng")
    _, task, _, _ = build(argv)
    dataset = task.dataset("train")
    itr = task.get_batch_iterator(dataset, max_sentences=8, max_positions=64, epoch=1, seed=1)
    groups = list(iterators.GroupedIterator(itr.next_epoch_itr(shuffle=True), 4))
    assert groups
    for group in groups:
        lengths = [dataset.num_tokens(i) for s in group if s for i in s["id"].tolist()]
        assert lengths == sorted(lengths)


def test_empty_logical_batch_still_adds_noise_and_counts(data):
    sigma, clip = 2.0, 1.0
    argv = train_args(data, "--optimizer", "sgd", "--lr", "1", "--dp-clip-norm", str(clip),
                      noise=("--dp-noise-multiplier", str(sigma)))
    cfg, task, model, criterion = build(argv, dtype=torch.float32)
    trainer = Trainer(cfg, task, model, criterion)
    trainer.get_train_iterator(epoch=1)  # sets fairseq's dummy batch
    head = model.classification_heads["sentence_classification_head"].dense.weight
    before = head.detach().clone()
    with metrics.aggregate(new_root=True):
        trainer.train_step([{}])  # an empty Poisson micro-batch
    assert task.accountant.steps == 1
    change = (head.detach() - before).flatten()
    # SGD with lr 1: the change is -noise / expected batch
    expected_std = sigma * clip / task.expected_batch_size
    assert change.std().item() == pytest.approx(expected_std, rel=0.15)
    assert abs(change.mean().item()) < 4 * expected_std / change.numel() ** 0.5
