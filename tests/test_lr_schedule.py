"""fairseq's polynomial_decay (linear warm-up and decay) without --total-num-update
decays over the updates the DP task plans, also when a run resumes."""

import logging
import re

import pytest
from fairseq import tasks
from fairseq.distributed import utils as distributed_utils
from fairseq_cli import train

from fairseq_dp.errors import DPConfigError

from helpers import data_dir, parse, train_args

N_TRAIN, MICRO_BATCH, UPDATE_FREQ = 256, 8, 4
UPDATES_PER_EPOCH = -(-N_TRAIN // (MICRO_BATCH * UPDATE_FREQ))  # ceil(N / expected logical batch)
PEAK_LR, WARMUP = 1e-3, 2


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return data_dir(tmp_path_factory, n_train=N_TRAIN, n_valid=16, name="lr")


def linear_args(data, save_dir, *extra):
    argv = train_args(
        data, "--update-freq", str(UPDATE_FREQ), "--save-dir", str(save_dir),
        "--log-format", "simple", "--log-interval", "1", "--no-epoch-checkpoints",
        "--lr-scheduler", "polynomial_decay", "--warmup-updates", str(WARMUP), *extra,
    )
    argv[argv.index("--lr") + 1] = str(PEAK_LR)
    return argv


def logged_lrs(argv, caplog):
    """{update: lr} from fairseq's per-update train log lines."""
    caplog.clear()
    with caplog.at_level(logging.INFO):
        distributed_utils.call_main(parse(argv), train.main)
    lrs = {}
    for record in caplog.records:
        msg = record.getMessage()
        m = re.search(r"num_updates=(\d+), lr=([0-9.e+-]+)", msg)
        if m:
            lrs[int(m.group(1))] = float(m.group(2))
    return lrs, [r.getMessage() for r in caplog.records]


def test_decay_over_the_planned_updates_equals_an_explicit_total(data, tmp_path, caplog):
    planned = 2 * UPDATES_PER_EPOCH
    implicit, messages = logged_lrs(linear_args(data, tmp_path / "implicit", "--max-epoch", "2"), caplog)
    assert any(f"decays over the planned {planned} updates" in m for m in messages)
    # oracle: fairseq's own scheduler given the total by hand
    explicit, _ = logged_lrs(linear_args(data, tmp_path / "explicit", "--max-epoch", "2",
                                         "--total-num-update", str(planned)), caplog)
    assert sorted(implicit) == list(range(1, planned + 1))
    assert implicit == pytest.approx(explicit, rel=1e-6)
    assert implicit[WARMUP] == pytest.approx(PEAK_LR)
    assert implicit[planned] == 0.0  # the decay ends exactly at the last planned update


def test_resumed_run_plans_its_own_updates(data, tmp_path, caplog):
    # The resumed launch restores the optimizer, so fairseq builds the scheduler
    # before the training set is loaded; the total must be known by then.
    first, _ = logged_lrs(linear_args(data, tmp_path, "--max-epoch", "1"), caplog)
    assert first[UPDATES_PER_EPOCH] == 0.0
    resumed, messages = logged_lrs(linear_args(data, tmp_path, "--max-epoch", "2"), caplog)
    assert any(f"decays over the planned {2 * UPDATES_PER_EPOCH} updates" in m for m in messages)
    assert sorted(resumed) == list(range(UPDATES_PER_EPOCH + 1, 2 * UPDATES_PER_EPOCH + 1))
    assert resumed[2 * UPDATES_PER_EPOCH] == 0.0


def test_explicit_total_is_kept(data, tmp_path):
    cfg = parse(linear_args(data, tmp_path, "--max-epoch", "2", "--total-num-update", "100"))
    tasks.setup_task(cfg.task)
    assert cfg.lr_scheduler.total_num_update == 100


def test_total_equal_to_max_update_becomes_the_planned_updates(data, tmp_path):
    # fairseq-hydra-train resolves an unset total to --max-update before the
    # plugin sees it; the run stops after the epochs, earlier than --max-update
    cfg = parse(linear_args(data, tmp_path, "--max-epoch", "1", "--max-update", "50",
                            "--total-num-update", "50"))
    tasks.setup_task(cfg.task)
    assert cfg.lr_scheduler.total_num_update == UPDATES_PER_EPOCH


def test_no_planned_updates_is_a_message(data, tmp_path):
    cfg = parse(linear_args(data, tmp_path))  # σ given, neither --max-epoch nor --max-update
    with pytest.raises(DPConfigError, match="polynomial_decay needs the number of updates"):
        tasks.setup_task(cfg.task)
