"""ε next to the validation metric: validation log lines, TensorBoard's
validation curves, and fairseq-dp-report over real fairseq-train logs."""

import glob
import json
import os
import re
import shutil
import struct
import subprocess
import sys

import pytest
from prv_accountant import PRVAccountant as ReferencePRV
from prv_accountant.privacy_random_variables import PoissonSubsampledGaussianMechanism

from fairseq_dp import report

from helpers import data_dir, train_args

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_TRAIN, BATCH, UPDATE_FREQ, DELTA = 256, 8, 2, 1e-5
Q = BATCH * UPDATE_FREQ / N_TRAIN
VALID_EPS = re.compile(r"valid on 'valid' subset \|.*\| accuracy ([0-9.]+) \|.*\| num_updates (\d+) \|(?:.*\|)? dp_epsilon ([0-9.]+)")


def env():
    return dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")


def fairseq_train(data, run_dir, log_name, sigma, *extra):
    os.makedirs(run_dir, exist_ok=True)
    argv = train_args(
        data, "--update-freq", str(UPDATE_FREQ), "--max-epoch", "2", "--no-save",
        "--save-dir", os.path.join(run_dir, "ckpt"), "--log-interval", "4",
        "--log-file", os.path.join(run_dir, log_name), "--dp-delta", str(DELTA), *extra,
        noise=("--dp-noise-multiplier", str(sigma)),
    )
    result = subprocess.run([sys.executable, "-m", "fairseq_cli.train", *argv], capture_output=True,
                            text=True, env=env(), timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return os.path.join(run_dir, log_name)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    data = data_dir(tmp_path_factory, n_train=N_TRAIN, n_valid=32)
    root = tmp_path_factory.mktemp("runs")
    simple = fairseq_train(data, str(root / "sigma1"), "train.log", 1.0, "--log-format", "simple",
                           "--tensorboard-logdir", str(root / "sigma1" / "tb"))
    as_json = fairseq_train(data, str(root / "sigma07"), "run.log", 0.7, "--log-format", "json")
    return root, simple, as_json


def reference_prv_epsilon(sigma, q, steps, delta):
    mechanism = PoissonSubsampledGaussianMechanism(sampling_probability=q, noise_multiplier=sigma)
    accountant = ReferencePRV(mechanism, max_self_compositions=steps, eps_error=0.01, delta_error=delta / 1000)
    return accountant.compute_epsilon(delta=delta, num_self_compositions=steps)[2]


def tensorboard_scalars(event_dir):
    """{tag: {step: value}} from the TFRecord event files of one directory."""
    from tensorboardX.proto import event_pb2

    scalars = {}
    for path in glob.glob(os.path.join(event_dir, "events.out.tfevents.*")):
        with open(path, "rb") as f:
            while True:
                header = f.read(12)  # uint64 length, uint32 its CRC
                if len(header) < 12:
                    break
                (length,) = struct.unpack("<Q", header[:8])
                event = event_pb2.Event()
                event.ParseFromString(f.read(length))
                f.read(4)  # the data's CRC
                for value in event.summary.value:
                    scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


def valid_lines(log):
    with open(log) as f:
        found = {int(m.group(2)): (float(m.group(1)), float(m.group(3)))
                 for line in f for m in [VALID_EPS.search(line)] if m}
    return found


def test_validation_lines_carry_epsilon(runs):
    _, simple, _ = runs
    found = valid_lines(simple)
    per_epoch = N_TRAIN // (BATCH * UPDATE_FREQ)
    assert sorted(found) == [per_epoch, 2 * per_epoch]
    for update, (_, eps) in found.items():
        # Poisson sampling: the ledger holds one step per update
        assert eps == pytest.approx(reference_prv_epsilon(1.0, Q, update, DELTA), abs=0.03)


def test_tensorboard_validation_curve_has_epsilon(runs):
    root, simple, _ = runs
    scalars = tensorboard_scalars(str(root / "sigma1" / "tb" / "valid"))
    logged = valid_lines(simple)
    assert set(scalars["dp_epsilon"]) == set(logged)
    for update, (accuracy, eps) in logged.items():
        assert scalars["dp_epsilon"][update] == pytest.approx(eps, abs=1e-4)
        assert scalars["accuracy"][update] == pytest.approx(accuracy, abs=0.05)


def json_validations(log):
    rows = {}
    with open(log) as f:
        for line in f:
            if line.startswith("{") and '"valid_num_updates"' in line:
                record = json.loads(line)
                rows[int(record["valid_num_updates"])] = (float(record["valid_accuracy"]),
                                                           float(record["valid_dp_epsilon"]))
    return rows


def table_rows(stdout):
    return [line.split() for line in stdout.splitlines() if re.match(r"\S+\s+\d+\s+\d+\s+[0-9.]+\s+[0-9.]+$", line)]


def test_report_table_and_plot_of_several_runs(runs, tmp_path):
    root, simple, as_json = runs
    out = tmp_path / "privacy.png"
    result = subprocess.run(
        [sys.executable, "-m", "fairseq_dp.report", str(root / "sigma1"), str(root / "sigma07"), "--out", str(out)],
        capture_output=True, text=True, env=env(), timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    # which file each run directory resolved to
    assert f"sigma1: {simple}" in result.stdout and f"sigma07: {as_json}" in result.stdout
    rows = table_rows(result.stdout)
    expected = [("sigma1", u, a, e) for u, (a, e) in sorted(valid_lines(simple).items())]
    expected += [("sigma07", u, a, e) for u, (a, e) in sorted(json_validations(as_json).items())]
    assert [(r[0], int(r[2]), float(r[4]), float(r[3])) for r in rows] == [
        (name, u, pytest.approx(a), pytest.approx(e, abs=1e-6)) for name, u, a, e in expected
    ]
    import matplotlib.image

    image = matplotlib.image.imread(str(out))
    assert image.shape[0] >= 300 and image.shape[1] >= 900
    assert image[..., :3].std() > 0.05  # something was drawn


def test_old_logs_without_validation_epsilon_use_the_train_lines(runs, tmp_path):
    _, simple, _ = runs
    old = tmp_path / "old.log"
    with open(simple) as src, open(old, "w") as dst:
        for line in src:
            if "valid on" in line:
                line = re.sub(r" \| dp_epsilon [0-9.]+", "", line)
            dst.write(line)
    run = report.parse_log(str(old))
    assert all("dp_epsilon" not in stats for stats in run.valid.values())
    validations = run.validations("valid")
    assert [(r["num_updates"], r["dp_epsilon"]) for r in validations] == [
        (u, pytest.approx(e, abs=5e-4)) for u, (_, e) in sorted(valid_lines(simple).items())
    ]


def test_run_directory_resolution(tmp_path, runs):
    _, simple, _ = runs
    assert report.find_log(simple) == simple
    shutil.copy(simple, tmp_path / "hydra_train.log")
    assert report.find_log(str(tmp_path)) == str(tmp_path / "hydra_train.log")
    shutil.copy(simple, tmp_path / "train.log")
    assert report.find_log(str(tmp_path)) == str(tmp_path / "train.log")


@pytest.mark.parametrize("setup, args, message", [
    ("empty", [], "no log file in this directory"),
    ("two", [], "several *.log files (a.log, b.log)"),
    ("copy", ["--metric", "f1"], "no 'f1' in its validation lines; use --metric with one of"),
    ("copy", ["--subset", "test"], "no validation lines for subset 'test' (found: valid; use --subset)"),
    ("copy", ["--labels", "a,b"], "--labels has 2 names for 1 runs"),
    ("missing", [], "no such file or directory"),
])
def test_user_mistakes_get_a_message(setup, args, message, tmp_path, runs, capsys):
    _, simple, _ = runs
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    if setup == "two":
        (run_dir / "a.log").write_text("")
        (run_dir / "b.log").write_text("")
    if setup == "copy":
        shutil.copy(simple, run_dir / "train.log")
    target = str(tmp_path / "nowhere") if setup == "missing" else str(run_dir)
    with pytest.raises(SystemExit) as exit_info:
        report.main([target, *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_the_command_prints_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "fairseq_dp.report", str(tmp_path)],
                            capture_output=True, text=True, env=env(), timeout=600)
    assert result.returncode == 2
    assert "no log file in this directory" in result.stderr
    assert "Traceback" not in result.stderr


def test_default_plot_file_and_no_plot(runs, tmp_path, monkeypatch, capsys):
    _, simple, _ = runs
    monkeypatch.chdir(tmp_path)
    report.main([simple, "--no-plot"])
    assert "wrote" not in capsys.readouterr().out and os.listdir(tmp_path) == []
    report.main([simple])
    assert "wrote dp_report.png" in capsys.readouterr().out
    assert os.listdir(tmp_path) == ["dp_report.png"]
