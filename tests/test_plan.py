"""fairseq-dp-plan: the same plan as the training run's own log, before it runs."""

import logging
import os
import re
import subprocess
import sys

import pytest
from fairseq.distributed import utils as distributed_utils
from fairseq_cli import train
from prv_accountant import PRVAccountant as ReferencePRV
from prv_accountant.privacy_random_variables import PoissonSubsampledGaussianMechanism

from fairseq_dp import plan

from helpers import data_dir, parse, train_args

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLAN_LINE = re.compile(
    r"DP: N=(\d+) examples, expected logical batch (\d+), q=([^,]+), planned updates (\d+), "
    r"C=[^,]+, σ=([^,]+),"
)
EPS_LINE = re.compile(r"DP: ε after the planned (\d+) updates: (\S+)")
HEADLINE = re.compile(r"sigma=(\S+) q=(\S+) updates=(\d+) epsilon=(\S+)")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return data_dir(tmp_path_factory, n_train=256, n_valid=32)


def run_plan(*args):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "fairseq_dp.plan", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=600)


def training_plan(argv, caplog):
    """(N, expected batch, q, updates, σ, ε) as the training run logs them, and
    the ε of its end-of-epoch train summaries."""
    caplog.clear()
    with caplog.at_level(logging.INFO):
        distributed_utils.call_main(parse(argv), train.main)
    messages = [r.getMessage() for r in caplog.records]
    plan = [m.groups() for msg in messages for m in [PLAN_LINE.search(msg)] if m]
    eps = [m.groups() for msg in messages for m in [EPS_LINE.search(msg)] if m]
    assert len(plan) == 1 and len(eps) == 1, messages
    assert eps[0][0] == plan[0][3]
    summaries = [float(m.group(1)) for msg in messages
                 for m in [re.search(r"\| dp_epsilon ([0-9.]+)", msg)] if m and "valid on" not in msg]
    return plan[0] + (eps[0][1],), summaries


# (training flags, planner flags): the same run described to each
CASES = {
    "target-prv-epochs": (
        ["--update-freq", "2", "--max-epoch", "2", "--dp-target-epsilon", "3"],
        ["--batch-size", 16, "--epochs", 2, "--target-epsilon", 3],
    ),
    "sigma-rdp-max-update": (
        ["--max-epoch", "3", "--max-update", "40", "--dp-accountant", "rdp"],
        ["--batch-size", 8, "--epochs", 3, "--max-update", 40, "--noise-multiplier", 1.0, "--accountant", "rdp"],
    ),
    "target-shuffle": (
        ["--update-freq", "3", "--max-epoch", "2", "--dp-target-epsilon", "2", "--dp-sampling", "shuffle"],
        ["--batch-size", 24, "--epochs", 2, "--target-epsilon", 2, "--sampling", "shuffle", "--update-freq", 3],
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_planner_prints_the_training_runs_plan(case, data, tmp_path, caplog):
    train_flags, plan_flags = CASES[case]
    argv = train_args(data, "--no-save", "--save-dir", str(tmp_path), "--log-format", "simple",
                      "--log-interval", "1000", "--dp-delta", "1e-4", *train_flags,
                      noise=() if "--dp-target-epsilon" in train_flags else ("--dp-noise-multiplier", "1.0"))
    (n, batch, q, updates, sigma, eps), summaries = training_plan(argv, caplog)

    result = run_plan("--data", data, "--delta", "1e-4", *plan_flags)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    headline = HEADLINE.search(result.stdout.splitlines()[0])
    assert headline, result.stdout
    assert headline.groups() == (sigma, q, updates, eps)
    assert f"N={n} examples" in result.stdout and f"expected logical batch {batch}" in result.stdout

    # the planner's per-epoch rows against the ε the run logged at each epoch
    # end (its train summaries, 4 decimals) for the plan's own accountant
    rows = [line.split() for line in result.stdout.splitlines() if re.match(r"\s+\d+\s+\d+\s+[0-9.]", line)]
    assert [int(r[0]) for r in rows] == list(range(1, len(summaries) + 1))
    assert [float(r[2]) for r in rows] == pytest.approx(summaries, abs=1e-3)
    assert float(rows[-1][2]) == pytest.approx(float(eps), abs=1e-3)


def reference_prv_epsilon(sigma, q, steps, delta):
    mechanism = PoissonSubsampledGaussianMechanism(sampling_probability=q, noise_multiplier=sigma)
    accountant = ReferencePRV(mechanism, max_self_compositions=steps, eps_error=0.01, delta_error=delta / 1000)
    return accountant.compute_epsilon(delta=delta, num_self_compositions=steps)[2]


def test_contract_target_epsilon_prints_sigma():
    result = run_plan("--num-examples", 20000, "--batch-size", 400, "--epochs", 3,
                      "--target-epsilon", 2, "--delta", 1e-5, "--accountant", "prv")
    assert result.returncode == 0, result.stderr
    sigma = float(re.search(r"sigma=([0-9.e+-]+)", result.stdout).group(1))
    # an independent accountant: ε at the printed σ reaches the target from below
    eps = reference_prv_epsilon(sigma, 400 / 20000, 3 * 50, 1e-5)
    assert 0.97 * 2 <= eps <= 2 + 0.02


def test_contract_noise_multiplier_prints_epsilon():
    result = run_plan("--num-examples", 20000, "--batch-size", 400, "--epochs", 3,
                      "--noise-multiplier", 1.1, "--delta", 1e-5)
    assert result.returncode == 0, result.stderr
    eps = float(re.search(r"epsilon=([0-9.e+-]+)", result.stdout).group(1))
    assert eps == pytest.approx(reference_prv_epsilon(1.1, 400 / 20000, 150, 1e-5), abs=0.03)
    assert "ε (PRV)" in result.stdout and "ε (RDP)" in result.stdout


def test_rdp_order_warning_is_explained_after_the_plan_not_raised():
    # σ = 30: the best Rényi order of the RDP side is the largest opacus tries
    result = run_plan("--num-examples", 1000, "--batch-size", 50, "--max-update", 10,
                      "--noise-multiplier", 30, "--accountant", "rdp")
    assert result.returncode == 0, result.stderr
    assert "Optimal order" not in result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("sigma=30 ")
    notes = [i for i, line in enumerate(lines) if "largest it tries" in line]
    assert len(notes) == 1 and notes[0] == len(lines) - 1


MISTAKES = [
    (["--num-examples", 100, "--batch-size", 10, "--noise-multiplier", 1], "give the length of the run"),
    (["--num-examples", 100, "--batch-size", 200, "--epochs", 1, "--noise-multiplier", 1],
     "larger than the training set (100 examples)"),
    (["--num-examples", 100, "--batch-size", 10, "--epochs", 1, "--noise-multiplier", 1, "--delta", 1.5],
     "--delta must be in (0, 1)"),
    (["--num-examples", 100, "--batch-size", 10, "--epochs", 1, "--target-epsilon", 1e-6],
     "no σ reaches ε = 1e-06"),
    (["--num-examples", 100, "--batch-size", 10, "--epochs", 1, "--target-epsilon", 1, "--noise-multiplier", 1],
     "not allowed with argument"),
    (["--num-examples", "many", "--batch-size", 10, "--epochs", 1, "--noise-multiplier", 1],
     "expected a whole number"),
    (["--data", "/nonexistent/dir", "--batch-size", 10, "--epochs", 1, "--noise-multiplier", 1],
     "no such directory"),
    (["--num-examples", 100, "--batch-size", 10, "--epochs", 1, "--noise-multiplier", 1,
      "--sampling", "shuffle", "--update-freq", 3], "must be --update-freq × --workers"),
    # ε ≈ 9400: opacus's PRV grid would take more memory than the machine has
    (["--num-examples", 1000, "--batch-size", 500, "--max-update", 3200, "--noise-multiplier", 0.3],
     "ε would be 9429 (RDP) after 3200 updates"),
]


def test_no_prv_column_where_it_would_exhaust_memory(capsys):
    plan.main(["--num-examples", "1000", "--batch-size", "500", "--max-update", "3200",
               "--noise-multiplier", "0.3", "--accountant", "rdp"])
    out = capsys.readouterr().out
    assert out.startswith("sigma=0.3 q=0.5 updates=3200 epsilon=9429 ")
    assert "ε (PRV)" not in out and "PRV not computed: ε > 200" in out


@pytest.mark.parametrize("args, message", MISTAKES)
def test_user_mistakes_get_a_message_and_exit_code(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        plan.main([str(a) for a in args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("case", [0, 6])  # one argparse check, one of the planner's own
def test_the_command_prints_no_traceback(case, tmp_path):
    args, message = MISTAKES[case]
    result = run_plan(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_data_directory_without_a_training_set(tmp_path, capsys):
    with pytest.raises(SystemExit):
        plan.main(["--data", str(tmp_path), "--batch-size", "10", "--epochs", "1", "--noise-multiplier", "1"])
    err = capsys.readouterr().err
    assert "no binarized training set" in err and "input0" in err
