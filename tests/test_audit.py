"""The privacy audit: its statistics against exact and simulated oracles, its
canary data, and whole audited runs (power without noise, no violation with
DP, a deliberately broken plugin caught)."""

import json
import math
import os
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest
import torch
from fairseq.data import Dictionary, data_utils

from fairseq_dp.audit.canaries import CANARY_SPLIT, write_audit_data
from fairseq_dp.audit.run import VIOLATION_EXIT, audited_command, training_args
from fairseq_dp.audit.statistics import audit_scores, epsilon_lower_bound, guess_sizes, p_value
from fairseq_dp.data.lm_examples import loss_start_path
from fairseq_dp.errors import DPConfigError

from helpers import PLUGIN_DIR, data_dir, lm_data_dir

TESTS = os.path.dirname(os.path.abspath(__file__))
BROKEN_PLUGIN = os.path.join(TESTS, "plugins", "skip_noise")
BIN = os.path.dirname(sys.executable)


# ------------------------------------------------------------- statistics
def exact_p_value(m, r, v, eps, delta):
    """Steinke et al.'s p-value with exact binomial sums (fractions, math.comb)."""
    q = Fraction(1) / (1 + Fraction(math.exp(-eps)))
    pmf = [math.comb(r, k) * q ** k * (1 - q) ** (r - k) for k in range(r + 1)]
    beta = sum(pmf[v:])
    alpha = max((sum(pmf[v - i:v]) / i for i in range(1, v + 1)), default=Fraction(0))
    return min(1.0, float(beta + 2 * m * Fraction(delta) * alpha))


@pytest.mark.parametrize("m,r,v", [(10, 10, 10), (20, 12, 9), (50, 8, 8), (30, 15, 4), (6, 0, 0)])
@pytest.mark.parametrize("eps", [0.0, 0.3, 1.0, 2.5])
@pytest.mark.parametrize("delta", [0.0, 1e-3, 0.02])
def test_p_value_equals_exact_binomial_sums(m, r, v, eps, delta):
    assert p_value(m, r, v, eps, delta) == pytest.approx(exact_p_value(m, r, v, eps, delta), rel=1e-9, abs=1e-12)


def test_p_value_grows_with_epsilon():
    for m, r, v, delta in [(200, 80, 70, 1e-5), (100, 40, 40, 0.0), (500, 300, 200, 1e-3)]:
        values = [p_value(m, r, v, eps, delta) for eps in np.linspace(0, 8, 81)]
        assert all(a <= b + 1e-15 for a, b in zip(values, values[1:]))


@pytest.mark.parametrize("m,r,v,delta", [(200, 80, 70, 1e-5), (100, 40, 40, 0.0), (1000, 200, 150, 1e-6),
                                         (100, 40, 22, 1e-5)])
def test_lower_bound_is_the_edge_of_rejection(m, r, v, delta):
    significance, tolerance = 0.05, 1e-4
    eps = epsilon_lower_bound(m, r, v, delta, significance, tolerance=tolerance)
    if eps == 0:
        assert exact_p_value(m, r, v, 0.0, delta) >= significance
    else:
        assert exact_p_value(m, r, v, eps, delta) < significance
        assert exact_p_value(m, r, v, eps + 2 * tolerance, delta) >= significance


def randomized_response_scores(rng, m, eps):
    """The worst case the test is tight for: each canary's score reveals its
    membership through ε-DP randomized response, nothing more."""
    included = rng.random(m) < 0.5
    truthful = rng.random(m) < math.exp(eps) / (1 + math.exp(eps))
    said_in = np.where(truthful, included, ~included)
    return said_in + 1e-3 * rng.random(m), included


def test_bound_is_valid_on_simulated_eps_dp_canaries():
    """A (1, 0)-DP mechanism must get a bound above 1 in at most 5 % of runs."""
    rng = np.random.default_rng(0)
    trials, eps = 60, 1.0
    over = sum(audit_scores(*randomized_response_scores(rng, 400, eps), delta=0.0).epsilon_lower_bound > eps
               for _ in range(trials))
    assert over <= 0.05 * trials + 2


def test_perfect_separation_has_power_and_guess_sizes_are_corrected():
    rng = np.random.default_rng(1)
    included = rng.random(300) < 0.5
    result = audit_scores(included + rng.random(300), included, delta=1e-5)
    assert result.tried == len(guess_sizes(300)) and result.best.correct == result.best.guesses
    # the bound of the best guess at the Bonferroni-corrected level, checked exactly
    corrected = 0.05 / result.tried
    assert exact_p_value(300, result.best.guesses, result.best.correct, result.epsilon_lower_bound, 1e-5) < corrected
    assert result.epsilon_lower_bound > 2.5
    noise_only = audit_scores(rng.random(300), included, delta=1e-5)
    assert noise_only.epsilon_lower_bound < 0.5


# ------------------------------------------------------------- canary data
def test_sentence_prediction_canaries(tmp_path_factory, tmp_path):
    data = data_dir(tmp_path_factory, n_train=64, n_valid=16, name="audit_sp")
    canaries = write_audit_data("dp_sentence_prediction", data, str(tmp_path / "a"), 40, num_classes=2, seed=5)
    vocab = Dictionary.load(os.path.join(data, "input0", "dict.txt"))
    labels = Dictionary.load(os.path.join(data, "label", "dict.txt"))
    load = lambda root, sub, split, d: data_utils.load_indexed_dataset(os.path.join(root, sub, split), d)  # noqa: E731
    for sub, d in (("input0", vocab), ("label", labels)):
        original, audited = load(data, sub, "train", d), load(str(tmp_path / "a"), sub, "train", d)
        every = load(str(tmp_path / "a"), sub, CANARY_SPLIT, d)
        assert len(audited) == 64 + canaries.included.sum() and len(every) == 40
        assert all(torch.equal(original[i], audited[i]) for i in range(64))
        kept = [every[i] for i in np.flatnonzero(canaries.included)]
        assert all(torch.equal(a, b) for a, b in zip(kept, [audited[64 + j] for j in range(len(kept))]))
    tokens = load(str(tmp_path / "a"), "input0", CANARY_SPLIT, vocab)
    for i in range(40):
        item = tokens[i]
        assert len(item) == canaries.length and int(item[-1]) == vocab.eos()
        assert all(int(t) >= vocab.nspecial and not vocab[int(t)].startswith("madeupword") for t in item[:-1])
    label_items = load(str(tmp_path / "a"), "label", CANARY_SPLIT, labels)
    assert [int(label_items[i][0]) - labels.nspecial for i in range(40)] == canaries.labels.tolist()
    assert set(canaries.labels.tolist()) <= {0, 1}
    # every other file is the user's own, linked
    assert os.path.realpath(str(tmp_path / "a" / "input0" / "valid.bin")) == os.path.realpath(
        os.path.join(data, "input0", "valid.bin"))
    with pytest.raises(DPConfigError, match="exists"):
        write_audit_data("dp_sentence_prediction", data, str(tmp_path / "a"), 40, num_classes=2)


def test_language_modeling_canaries_keep_loss_starts(tmp_path_factory, tmp_path):
    data = lm_data_dir(tmp_path_factory, n_train=50, n_valid=8, prompts=True, name="audit_lm")
    canaries = write_audit_data("dp_language_modeling", data, str(tmp_path / "a"), 30, seed=2)
    n_in = int(canaries.included.sum())
    starts = np.load(loss_start_path(str(tmp_path / "a"), "train"))
    assert starts.shape == (50 + n_in,)
    assert np.array_equal(starts[:50], np.load(loss_start_path(data, "train"))) and not starts[50:].any()
    # without --seed, each audit draws its own (two draws agree with probability 2^-30)
    a = write_audit_data("dp_language_modeling", data, str(tmp_path / "b"), 30).included
    b = write_audit_data("dp_language_modeling", data, str(tmp_path / "c"), 30).included
    assert not np.array_equal(a, b)


# ------------------------------------------------------------- command line
def test_training_command_forms():
    assert training_args(["fairseq-train", "D", "--task", "x"]) == ["D", "--task", "x"]
    assert training_args([sys.executable, "-m", "fairseq_cli.train", "D"]) == ["D"]
    assert training_args(["D", "--lr", "1"]) == ["D", "--lr", "1"]
    with pytest.raises(DPConfigError, match="hydra"):
        training_args(["fairseq-hydra-train", "--config-dir", "x"])
    cmd = audited_command(["D", "--save-dir", "old", "--no-save", "--lr", "1", "--save-dir=o2"], "D", "A", "S")
    assert cmd[3:] == ["A", "--lr", "1", "--save-dir", "S"]


def run_audit(out, train_flags, env=None):
    cmd = [os.path.join(BIN, "fairseq-dp-audit"), "--canaries", "200", "--seed", "3", "--out", str(out),
           "--", "fairseq-train", *train_flags]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=900)
    report = None
    if os.path.exists(os.path.join(out, "audit.json")):
        with open(os.path.join(out, "audit.json")) as f:
            report = json.load(f)
    return proc, report


def lm_flags(data, plugin, privacy):
    return [data, "--user-dir", plugin, "--cpu", "--task", "dp_language_modeling",
            "--criterion", "dp_language_modeling", "--tokens-per-sample", "32", "--arch", "transformer_lm",
            "--decoder-layers", "2", "--decoder-embed-dim", "64", "--decoder-ffn-embed-dim", "128",
            "--decoder-attention-heads", "4", "--decoder-input-dim", "64", "--decoder-output-dim", "64",
            "--optimizer", "adam", "--lr", "3e-3", "--lr-scheduler", "fixed", "--batch-size", "32",
            "--max-epoch", "15", "--seed", "1", "--num-workers", "0", "--dp-clip-norm", "1.0",
            *privacy, "--dp-delta", "1e-5", "--log-format", "simple", "--no-epoch-checkpoints",
            "--disable-validation"]


@pytest.fixture(scope="module")
def audit_lm_data(tmp_path_factory):
    return lm_data_dir(tmp_path_factory, n_train=256, n_valid=32, prompts=False, name="audit_run")


def test_audit_has_power_without_noise(audit_lm_data, tmp_path):
    proc, report = run_audit(tmp_path / "out", lm_flags(audit_lm_data, PLUGIN_DIR, ["--dp-noise-multiplier", "0"]))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert report["accountant_epsilon"] == "inf" and not report["violation"]
    assert report["audited_epsilon_lower_bound"] > 1.0
    assert report["canaries"] == 200 and len(report["scores"]["all"]) == 200
    assert os.path.exists(tmp_path / "out" / "scores.png")


def test_audit_finds_no_violation_with_dp_and_catches_dropped_noise(audit_lm_data, tmp_path):
    privacy = ["--dp-target-epsilon", "1"]
    proc, report = run_audit(tmp_path / "dp", lm_flags(audit_lm_data, PLUGIN_DIR, privacy))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 0.9 < report["accountant_epsilon"] <= 1.0
    assert report["audited_epsilon_lower_bound"] <= report["accountant_epsilon"] and not report["violation"]
    # the same configuration with the noise dropped while the ledger records it
    proc, broken = run_audit(tmp_path / "broken", lm_flags(audit_lm_data, BROKEN_PLUGIN, privacy))
    assert proc.returncode == VIOLATION_EXIT, proc.stderr[-2000:]
    assert broken["accountant_epsilon"] == pytest.approx(report["accountant_epsilon"])
    assert broken["violation"] and broken["audited_epsilon_lower_bound"] > broken["accountant_epsilon"]
    assert "VIOLATION" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("argv,message", [
    (["--out", "o"], "after --"),
    (["--out", "o", "--", "fairseq-train", "/nonexistent", "--task", "language_modeling",
      "--arch", "transformer_lm"], "dp_"),
    (["--out", "o", "--", "fairseq-train", "D", "--arch", "no_such_arch"], "--arch"),
    (["--out", "o", "--significance", "2", "--", "fairseq-train", "D"], "significance"),
])
def test_user_mistakes_get_a_message(argv, message, tmp_path, monkeypatch, capsys):
    from fairseq_dp.audit.run import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_command_line_mistake_has_no_traceback(tmp_path):
    proc = subprocess.run([os.path.join(BIN, "fairseq-dp-audit"), "--out", "o", "--", "fairseq-train", "D",
                           "--arch", "no_such_arch"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and "--arch" in proc.stderr and "Traceback" not in proc.stderr
