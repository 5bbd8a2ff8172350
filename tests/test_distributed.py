"""Two CPU workers (gloo on 127.0.0.1, legacy_ddp) against one worker, for
every DP task (the engine is shared: the same test runs on each)."""

import os
import socket
import subprocess
import sys

import pytest
import torch

from helpers import data_dir, lm_data_dir, lm_train_args, train_args

HERE = os.path.dirname(os.path.abspath(__file__))
UPDATES = 4
# no dropout, so runs compare exactly; SGD, because Adam would hide a scaled
# gradient (its step is nearly scale-free); seeded noise and draws, so that
# separate runs draw the same ones
COMPARABLE = ["--dropout", "0", "--attention-dropout", "0", "--optimizer", "sgd", "--lr", "0.5",
              "--dp-insecure-seeded-rng"]


@pytest.fixture(scope="module", params=["dp_sentence_prediction", "dp_language_modeling"])
def task_setup(request, tmp_path_factory):
    """(data directory, the task's training command line) of each DP task."""
    if request.param == "dp_language_modeling":
        return lm_data_dir(tmp_path_factory, n_train=256, n_valid=32), lm_train_args
    return data_dir(tmp_path_factory, n_train=256, n_valid=32), train_args


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out_dir, argv, world_size):
    """The CPU launch that works with fairseq 0.12: one process per rank,
    no spawn, gloo (fairseq-integration notes, §3)."""
    port = free_port()
    procs = []
    for rank in range(world_size):
        dist = [] if world_size == 1 else [
            "--distributed-world-size", str(world_size), "--distributed-rank", str(rank),
            "--distributed-init-method", f"tcp://127.0.0.1:{port}", "--distributed-no-spawn",
            "--distributed-backend", "gloo", "--device-id", "0", "--ddp-backend", "legacy_ddp",
        ]
        out = os.path.join(out_dir, f"rank{rank}.pt")
        env = dict(os.environ, PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
        procs.append((out, subprocess.Popen(
            [sys.executable, os.path.join(HERE, "dist_worker.py"), out, str(UPDATES), "--", *argv, *dist],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)))
    results = []
    for out, proc in procs:
        log, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, log[-4000:]
        results.append(torch.load(out, weights_only=False))
    return results


def test_two_workers_stay_identical_and_match_one_worker(task_setup, tmp_path):
    data, train_args = task_setup
    os.makedirs(tmp_path / "noisy")
    noisy = launch(str(tmp_path / "noisy"), train_args(data, *COMPARABLE), world_size=2)
    # noise drawn on worker 0 only, then all-reduced: the same parameters everywhere
    for name, p in noisy[0]["params"].items():
        assert torch.equal(p, noisy[1]["params"][name]), name
    assert noisy[0]["ledger"] == noisy[1]["ledger"] == [(1.0, 16 / 256, UPDATES)]
    # and it is the update of one worker drawing the same noise (from the
    # same seeded state) over two micro-batches: noise added once, not twice
    os.makedirs(tmp_path / "noisy_one")
    noisy_one = launch(str(tmp_path / "noisy_one"), train_args(data, *COMPARABLE, "--update-freq", "2"),
                       world_size=1)
    for name, p in noisy_one[0]["params"].items():
        torch.testing.assert_close(noisy[0]["params"][name], p, atol=1e-5, rtol=1e-4)

    # without noise, two workers with one micro-batch each take the update
    # one worker takes with two micro-batches of the same draws
    silent = ("--dp-noise-multiplier", "0")
    os.makedirs(tmp_path / "two")
    two = launch(str(tmp_path / "two"), train_args(data, *COMPARABLE, noise=silent), world_size=2)
    os.makedirs(tmp_path / "one")
    one = launch(str(tmp_path / "one"), train_args(data, *COMPARABLE, "--update-freq", "2", noise=silent),
                 world_size=1)
    moved = 0.0
    for name, p in one[0]["params"].items():
        torch.testing.assert_close(two[0]["params"][name], p, atol=1e-5, rtol=1e-4)
        assert torch.equal(two[0]["params"][name], two[1]["params"][name])
        moved = max(moved, (p - noisy[0]["params"][name]).abs().max().item())
    assert moved > 1e-3  # noise made a difference, so the comparison above is not vacuous
