"""Paths that used to end in a model less private than its ε said, without a
word: each now composes, refuses, or reports a valid bound."""

import math
import os
import re
import subprocess
import sys

import pytest
import torch
from prv_accountant import PRVAccountant as ReferencePRV
from prv_accountant.privacy_random_variables import PoissonSubsampledGaussianMechanism
from scipy.optimize import brentq
from scipy.stats import norm

from fairseq import tasks

from fairseq_dp.accounting import LEDGER_KEYS, PrivacyAccountant, calibrate_noise_multiplier, history_from_tensor
from fairseq_dp.data.synthetic import binarize, write_raw
from fairseq_dp.errors import DPConfigError
from fairseq_dp.merge_lora import merge_lora_checkpoint
from fairseq_dp.checkpoint_ledger import TOP_LEVEL_KEY
from fairseq_dp.trainer import NoiseReuseError

from helpers import TINY_MODEL, batch, build, data_dir, parse, train_args
from test_accounting import reference_prv_epsilon
from test_distributed import HERE, free_port
from test_end_to_end import run_main, summary_value

LOG = ["--log-format", "simple", "--log-interval", "1"]
SIZES = ["--encoder-layers", "2", "--encoder-embed-dim", "32", "--encoder-ffn-embed-dim", "48",
         "--encoder-attention-heads", "4"]
LORA = ["--arch", "roberta_lora", *SIZES, "--lora-rank", "4", "--lora-alpha", "8"]
PLAIN = ["--arch", "roberta", *SIZES]
Q, DELTA = 8 / 256, 1e-5


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return data_dir(tmp_path_factory, n_train=256, n_valid=32)


def exact_one_step_epsilon(sigma, q, delta):
    """The tight ε of one Poisson-subsampled Gaussian step (add/remove
    neighbours, sensitivity 1), from the closed form of its privacy curve
    (both directions, in log space so that σ = 0.01 does not overflow).
    A composition of several steps is never more private than one of them,
    so this is a lower bound that any valid ε must reach."""
    def remove(eps):  # P = (1-q)N(0,σ²) + qN(1,σ²) against Q = N(0,σ²); P > e^ε Q for x > x0
        x0 = sigma**2 * (eps + math.log1p(-(1 - q) * math.exp(-eps)) - math.log(q)) + 0.5
        return ((1 - q) * norm.sf(x0 / sigma) + q * norm.sf((x0 - 1) / sigma)
                - math.exp(eps + norm.logsf(x0 / sigma)))

    def add(eps):  # Q > e^ε P for x < x1
        a = math.exp(-eps) - (1 - q)
        if a <= 0:
            return 0.0
        x1 = sigma**2 * math.log(a / q) + 0.5
        return norm.cdf(x1 / sigma) - math.exp(eps) * ((1 - q) * norm.cdf(x1 / sigma)
                                                       + q * norm.cdf((x1 - 1) / sigma))

    excess = lambda eps: max(remove(eps), add(eps)) - delta  # noqa: E731
    hi = 1.0
    while excess(hi) > 0:
        hi *= 2
    return brentq(excess, 0, hi, xtol=1e-9)


def reference_composed_epsilon(history, delta):
    """Microsoft's prv_accountant over a heterogeneous history."""
    prvs = [PoissonSubsampledGaussianMechanism(sampling_probability=q, noise_multiplier=s) for s, q, _ in history]
    steps = [n for _, _, n in history]
    accountant = ReferencePRV(prvs=prvs, max_self_compositions=steps, eps_error=0.01, delta_error=delta / 1000)
    return accountant.compute_epsilon(delta=delta, num_self_compositions=steps)[2]


def ledger_of(path):
    return history_from_tensor(torch.load(path, weights_only=False)["model"]["dp_ledger"])


# ---------------------------------------------------------------- the ledger
def test_merged_lora_checkpoint_loads_in_stock_fairseq_and_continuing_it_composes(data, tmp_path, caplog):
    first = tmp_path / "lora"
    run_main(train_args(data, "--max-update", "4", "--save-dir", str(first), *LOG, model=LORA), caplog)
    merged = tmp_path / "merged.pt"
    merge_lora_checkpoint(str(first / "checkpoint_last.pt"), str(merged))
    state = torch.load(merged, weights_only=False)
    assert not any(k in state["model"] for k in LEDGER_KEYS)  # stock fairseq loads it strictly
    messages = run_main(train_args(
        data, "--max-update", "4", "--save-dir", str(tmp_path / "second"), *LOG, "--restore-file", str(merged),
        "--reset-optimizer", "--reset-dataloader", "--reset-meters", model=PLAIN), caplog)
    assert any("keeps its privacy ledger at the top level" in m for m in messages)
    # 4 updates before the merge and 4 after, all at σ = 1, q = 8/256
    assert summary_value(messages, "dp_epsilon") == pytest.approx(
        reference_prv_epsilon(1.0, Q, 8, DELTA), abs=0.03)
    assert ledger_of(tmp_path / "second" / "checkpoint_last.pt") == [(1.0, Q, 8)]
    # the merged file without its top-level ledger (its task is fairseq's own now,
    # the DP options kept under dp_task) is refused as any stripped DP checkpoint
    del state[TOP_LEVEL_KEY]
    torch.save(state, tmp_path / "merged_stripped.pt")
    with pytest.raises(DPConfigError, match="carries no privacy ledger"):
        run_main(train_args(
            data, "--max-update", "4", "--save-dir", str(tmp_path / "third"), *LOG,
            "--restore-file", str(tmp_path / "merged_stripped.pt"), "--reset-optimizer", "--reset-dataloader",
            "--reset-meters", model=PLAIN), caplog)


def test_weights_of_a_dp_run_without_their_ledger_are_refused_unless_stated_fresh(data, tmp_path, caplog):
    first = tmp_path / "first"
    run_main(train_args(data, "--max-update", "2", "--save-dir", str(first), *LOG), caplog)
    state = torch.load(first / "checkpoint_last.pt", weights_only=False)
    for key in LEDGER_KEYS:
        state["model"].pop(key, None)
    stripped = tmp_path / "stripped.pt"
    torch.save(state, stripped)
    resume = ["--restore-file", str(stripped), "--reset-optimizer", "--reset-dataloader", "--reset-meters",
              "--max-update", "2", *LOG]
    with pytest.raises(DPConfigError, match="carries no privacy ledger"):
        run_main(train_args(data, *resume, "--save-dir", str(tmp_path / "refused")), caplog)
    assert not os.path.exists(tmp_path / "refused" / "checkpoint_last.pt")
    messages = run_main(train_args(data, *resume, "--save-dir", str(tmp_path / "stated"),
                                   "--dp-assume-fresh-weights"), caplog)
    assert summary_value(messages, "dp_epsilon") == pytest.approx(reference_prv_epsilon(1.0, Q, 2, DELTA), abs=0.03)


def test_best_checkpoint_carries_every_update_that_chose_it(data, tmp_path, caplog):
    # validated every 2 updates; the smallest num_updates "wins", so the best
    # weights are those of update 2, chosen by validating all 8
    from fairseq import checkpoint_utils

    if hasattr(checkpoint_utils.save_checkpoint, "best"):  # fairseq keeps it across runs in one process
        del checkpoint_utils.save_checkpoint.best
    run_main(train_args(data, "--max-update", "8", "--save-dir", str(tmp_path), "--save-interval-updates", "2",
                        "--validate-interval-updates", "2", "--best-checkpoint-metric", "num_updates", *LOG),
             caplog)
    best = torch.load(tmp_path / "checkpoint_best.pt", weights_only=False)
    assert best["optimizer_history"][-1]["num_updates"] == 2
    assert ledger_of(tmp_path / "checkpoint_best.pt") == [(1.0, Q, 8)]
    assert ledger_of(tmp_path / "checkpoint_last.pt") == [(1.0, Q, 8)]


def test_a_target_epsilon_is_the_total_with_the_ledger_of_the_weights(data, tmp_path, caplog):
    first = tmp_path / "first"
    run_main(train_args(data, "--max-update", "4", "--save-dir", str(first), *LOG), caplog)
    spent = reference_prv_epsilon(1.0, Q, 4, DELTA)
    target = round(spent + 1.0, 2)
    resume = ["--restore-file", str(first / "checkpoint_last.pt"), "--reset-optimizer", "--reset-dataloader",
              "--reset-meters", "--max-update", "4", *LOG]
    messages = run_main(train_args(data, *resume, "--save-dir", str(tmp_path / "second"),
                                   noise=("--dp-target-epsilon", str(target))), caplog)
    sigma = [float(re.search(r"σ=([0-9.e+-]+)", m).group(1)) for m in messages if "planned updates" in m][-1]
    ledger = ledger_of(tmp_path / "second" / "checkpoint_last.pt")
    assert ledger[0] == (1.0, Q, 4) and ledger[1][1:] == (Q, 4) and ledger[1][0] == pytest.approx(sigma, rel=1e-5)
    sigma = ledger[1][0]
    total = reference_composed_epsilon([(1.0, Q, 4), (sigma, Q, 4)], DELTA)
    assert 0.97 * target - 0.02 <= total <= target + 0.02
    assert summary_value(messages, "dp_epsilon") <= target

    with pytest.raises(DPConfigError, match="already spent"):
        run_main(train_args(data, *resume, "--save-dir", str(tmp_path / "third"),
                            noise=("--dp-target-epsilon", str(round(spent / 2, 3)))), caplog)


def test_a_larger_delta_cannot_turn_spent_privacy_into_fresh_room(data, tmp_path, caplog):
    first = tmp_path / "first"
    run_main(train_args(data, "--max-update", "2", "--save-dir", str(first), *LOG), caplog)
    assert torch.load(first / "checkpoint_last.pt", weights_only=False)["model"]["dp_ledger_delta"].item() == DELTA
    resume = ["--restore-file", str(first / "checkpoint_last.pt"), "--reset-optimizer", "--reset-dataloader",
              "--reset-meters", "--max-update", "2", "--dp-max-epsilon", "50", *LOG]
    with pytest.raises(DPConfigError, match="larger than the δ = 1e-05"):
        run_main(train_args(data, *resume, "--dp-delta", "1e-3", "--save-dir", str(tmp_path / "larger")), caplog)
    # a smaller δ is a stronger statement: allowed, and the ledger keeps it
    run_main(train_args(data, *resume, "--dp-delta", "1e-6", "--save-dir", str(tmp_path / "smaller")), caplog)
    saved = torch.load(tmp_path / "smaller" / "checkpoint_last.pt", weights_only=False)["model"]
    assert saved["dp_ledger_delta"].item() == 1e-6


# ------------------------------------------------------- refused configurations
def test_workers_with_different_settings_are_refused_before_the_first_update(data, tmp_path):
    port = free_port()
    procs = []
    for rank, extra in enumerate([[], ["--seed", "2", "--batch-size", "4"]]):
        argv = train_args(data, "--distributed-world-size", "2", "--distributed-rank", str(rank),
                          "--distributed-init-method", f"tcp://127.0.0.1:{port}", "--distributed-no-spawn",
                          "--distributed-backend", "gloo", "--device-id", "0", "--ddp-backend", "legacy_ddp")
        for flag, value in zip(extra[::2], extra[1::2]):
            argv[argv.index(flag) + 1] = value
        env = dict(os.environ, PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
        out = str(tmp_path / f"rank{rank}.pt")
        procs.append(subprocess.Popen([sys.executable, os.path.join(HERE, "dist_worker.py"), out, "2", "--", *argv],
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env))
    for proc in procs:
        log, _ = proc.communicate(timeout=300)
        assert proc.returncode != 0
        assert re.search(r"workers disagree on batch_size \(8 / 4\).*seed \(1 / 2\)", log), log[-3000:]
    assert not any(os.path.exists(tmp_path / f"rank{r}.pt") for r in range(2))


def test_dp_criterion_or_arch_outside_a_dp_task_is_refused(data):
    stock = [data, "--user-dir", os.path.dirname(sys.modules["fairseq_dp"].__file__), "--task",
             "sentence_prediction", "--num-classes", "2", "--batch-size", "8"]
    cfg = parse([*stock, "--criterion", "dp_sentence_prediction", *PLAIN])
    task = tasks.setup_task(cfg.task)
    with pytest.raises(DPConfigError, match="trains privately only under --task dp_sentence_prediction"):
        task.build_criterion(cfg.criterion)
    cfg = parse([*stock, "--criterion", "sentence_prediction", *TINY_MODEL])
    with pytest.raises(DPConfigError, match="roberta_rgp is a fairseq_dp architecture.*--non-private-baseline"):
        tasks.setup_task(cfg.task).build_model(cfg.model)
    cfg = parse([*stock, "--criterion", "sentence_prediction", "--non-private-baseline",
                 "--arch", "roberta_pooled", *SIZES])
    tasks.setup_task(cfg.task).build_model(cfg.model)  # said explicitly: allowed


@pytest.mark.parametrize("extra,noise,message", [
    (["--dp-delta", "0.5"], None, r"not below 1/N = 0.0039"),
    (["--dp-delta", "0.004"], None, r"not below 1/N"),
    (["--update-freq", "0"], None, "--update-freq must be >= 1"),
    ([], ("--dp-noise-multiplier", "inf"), "--dp-noise-multiplier must be >= 0 and at most"),
    ([], ("--dp-noise-multiplier", "1e20"), "--dp-noise-multiplier must be >= 0 and at most"),
    (["--dp-clip-norm", "inf"], None, "--dp-clip-norm must be > 0 and finite"),
    (["--max-update", "5"], ("--dp-target-epsilon", "inf"), "--dp-target-epsilon must be > 0 and finite"),
    (["--dp-hide-private-stats", "--valid-subset", "valid,train"], None, "includes the training subset"),
    (["--dp-secure-rng", "--dp-insecure-seeded-rng"], None, "contradict each other"),
])
def test_settings_that_would_under_report_are_refused(data, extra, noise, message):
    with pytest.raises(DPConfigError, match=message):
        build(train_args(data, *extra, noise=noise or ("--dp-noise-multiplier", "1.0")))


def test_epsilon_is_never_negative():
    accountant = PrivacyAccountant("prv")
    accountant.step(noise_multiplier=1.0, sample_rate=0.03)
    assert accountant.get_epsilon(0.5) >= 0.0
    assert PrivacyAccountant("rdp").get_epsilon(0.5) == 0.0


@pytest.mark.parametrize("sigma,q,steps", [(0.01, 8 / 256, 1), (0.01, 1.0, 1), (0.05, 0.001, 100), (0.2, 0.03, 10)])
def test_extreme_noise_levels_report_a_valid_upper_bound(sigma, q, steps):
    for mechanism in ("prv", "rdp"):
        accountant = PrivacyAccountant(mechanism)
        accountant.step(noise_multiplier=sigma, sample_rate=q, num_steps=steps)
        assert accountant.get_epsilon(DELTA) >= exact_one_step_epsilon(sigma, q, DELTA)


def test_a_huge_target_calibrates_without_hanging_and_within_it():
    sigma = calibrate_noise_multiplier(target_epsilon=1000, delta=DELTA, sample_rate=0.03, steps=100)
    accountant = PrivacyAccountant("prv")
    accountant.step(noise_multiplier=sigma, sample_rate=0.03, num_steps=100)
    assert accountant.get_epsilon(DELTA) <= 1000
    assert exact_one_step_epsilon(sigma, 0.03, DELTA) <= 1000  # the independent lower bound agrees


def labelled_data(tmp_path, edit):
    raw = write_raw(str(tmp_path / "raw"), 64, 16)
    edit(raw)
    return binarize(raw, str(tmp_path / "bin"))


def replace_label(raw, split, line, label):
    path = os.path.join(raw, f"{split}.label")
    labels = open(path).read().split("\n")
    labels[line] = label
    open(path, "w").write("\n".join(labels))


def test_bad_labels_stop_before_the_first_update(tmp_path):
    outside = labelled_data(tmp_path / "a", lambda raw: replace_label(raw, "train", 5, "2"))
    with pytest.raises(DPConfigError, match=r"'train' split: 1 labels are outside --num-classes 2 \(first examples \[5\]"):
        build(train_args(outside))
    missing = labelled_data(tmp_path / "b", lambda raw: replace_label(raw, "valid", 3, "7"))
    _, task, _, _ = build(train_args(missing))
    with pytest.raises(DPConfigError, match=r"'valid' split: 1 labels are not in the label dictionary"):
        task.load_dataset("valid")


def test_an_empty_training_split_is_refused(tmp_path):
    def empty_train(raw):
        for key in ("input0", "label"):
            open(os.path.join(raw, f"train.{key}"), "w").close()

    with pytest.raises(DPConfigError, match="training split 'train' is empty"):
        build(train_args(labelled_data(tmp_path, empty_train)))


# ------------------------------------------------------------ the Python API
def test_one_noise_draw_cannot_serve_two_steps(data):
    _, task, model, criterion = build(train_args(data))
    task.train_step(batch(task), model, criterion, None, 0)
    with torch.no_grad():  # an optimizer step, without zero_grad afterwards
        for p in model.parameters():
            if p.grad is not None:
                p.add_(p.grad, alpha=-0.1)
    with pytest.raises(NoiseReuseError, match="an optimizer step"):
        task.train_step(batch(task, start=8), model, criterion, None, 0)

    _, task, model, criterion = build(train_args(data, "--update-freq", "2"))
    task.train_step(batch(task), model, criterion, None, 0)
    task.train_step(batch(task, start=8), model, criterion, None, 0)
    with pytest.raises(NoiseReuseError, match="micro-batch 3 of one logical batch, which has 2"):
        task.train_step(batch(task, start=16), model, criterion, None, 0)
    assert task.accountant.steps == 1
    for p in model.parameters():  # a new logical batch starts normally
        p.grad = None
    task.train_step(batch(task, start=16), model, criterion, None, 1)
    assert task.accountant.steps == 2


# ------------------------------------------------------------------ the logs
def test_hidden_private_stats_leave_only_noisy_and_public_numbers_in_train_lines(data, tmp_path, caplog):
    messages = run_main(train_args(data, "--max-update", "3", "--save-dir", str(tmp_path), "--no-save",
                                   "--dp-hide-private-stats", *LOG), caplog)
    train_lines = [m for m in messages if "num_updates" in m and "valid on" not in m and "dp_epsilon" in m]
    assert train_lines
    for line in train_lines:
        for private in ("accuracy", "bsz", "wpb", "dp_clipped", "nll_loss"):
            assert private not in line, line
        assert re.search(r"loss[ =]-1\b", line), line
        assert "gnorm" in line and "dp_sigma" in line
    valid_lines = [m for m in messages if "valid on" in m]
    assert valid_lines and all("accuracy" in m for m in valid_lines)  # held-out data: allowed


# ------------------------------------------------- checkpoints for stock fairseq
STOCK_FAIRSEQ = r"""
import sys, torch
from fairseq.models.roberta import RobertaModel
directory, data, tokens, out = sys.argv[1:5]
logits = {}
for name in sys.argv[5:]:
    hub = RobertaModel.from_pretrained(directory, checkpoint_file=name, data_name_or_path=data, bpe="characters")
    hub.eval()
    logits[name] = hub.predict("sentence_classification_head", torch.load(tokens), return_logits=True)
assert not any(m.startswith("fairseq_dp") for m in sys.modules)
torch.save(logits, out)
"""


def test_exported_and_merged_checkpoints_load_in_fairseq_without_the_plugin(data, tmp_path, caplog):
    from fairseq import checkpoint_utils

    from fairseq_dp.export import export_checkpoint

    run_main(train_args(data, "--max-update", "2", "--save-dir", str(tmp_path / "full"), *LOG, model=PLAIN), caplog)
    run_main(train_args(data, "--max-update", "2", "--save-dir", str(tmp_path / "lora"), *LOG, model=LORA), caplog)
    export_checkpoint(str(tmp_path / "full" / "checkpoint_last.pt"), str(tmp_path / "exported.pt"))
    merge_lora_checkpoint(str(tmp_path / "lora" / "checkpoint_last.pt"), str(tmp_path / "merged.pt"))
    with pytest.raises(DPConfigError, match="plugin's architecture 'roberta_lora'"):
        export_checkpoint(str(tmp_path / "lora" / "checkpoint_last.pt"), str(tmp_path / "no.pt"))

    sample = batch(build(train_args(data))[1], size=8)  # padded: lengths differ
    tokens = sample["net_input"]["src_tokens"]
    assert (tokens == 1).any()
    torch.save(tokens, tmp_path / "tokens.pt")
    script = tmp_path / "stock.py"
    script.write_text(STOCK_FAIRSEQ)
    # torch >= 2.6 refuses fairseq's pickled configs by default; a stock
    # fairseq user opts out of weights_only as fairseq's own docs require
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1",
               PYTHONPATH="")
    done = subprocess.run([sys.executable, str(script), str(tmp_path), data, str(tmp_path / "tokens.pt"),
                           str(tmp_path / "logits.pt"), "exported.pt", "merged.pt"],
                          capture_output=True, text=True, env=env, timeout=300, cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    stock = torch.load(tmp_path / "logits.pt")
    for name, source in (("exported.pt", tmp_path / "full" / "checkpoint_last.pt"),
                         ("merged.pt", tmp_path / "lora" / "checkpoint_last.pt")):
        models, _, _ = checkpoint_utils.load_model_ensemble_and_task([str(source)])
        models[0].eval()
        with torch.no_grad():
            expected, _ = models[0](tokens, classification_head_name="sentence_classification_head")
        torch.testing.assert_close(stock[name], expected, atol=1e-5, rtol=1e-5)
        assert "dp_ledger" in torch.load(tmp_path / name, weights_only=False)


def test_relaunching_a_finished_run_spends_nothing(data, tmp_path, caplog):
    """fairseq's loop takes one update before it checks --max-update: each
    relaunch of a finished run would spend privacy beyond the plan."""
    argv = train_args(data, "--max-update", "2", "--save-dir", str(tmp_path), *LOG)
    run_main(argv, caplog)
    with pytest.raises(DPConfigError, match="already taken its --max-update 2 updates"):
        run_main(argv, caplog)
    assert ledger_of(tmp_path / "checkpoint_last.pt") == [(1.0, Q, 2)]
