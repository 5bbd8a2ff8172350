"""The ledger across restarts, the privacy budget, and the noise generator."""

import math
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

from opacus.accountants import PRVAccountant as OpacusPRV

from fairseq_dp.accounting import LedgerMismatch, PrivacyAccountant
from fairseq_dp.trainer import PrivacyBudgetExhausted

from helpers import batch, build, data_dir, train_args
from test_accounting import reference_prv_epsilon
from test_end_to_end import run_main, summary_value

LOG = ["--log-format", "simple", "--log-interval", "1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return data_dir(tmp_path_factory, n_train=256, n_valid=32)


def train_command(data, save_dir, *extra):
    argv = train_args(data, "--save-dir", str(save_dir), "--save-interval-updates", "2",
                      "--max-update", "10", *LOG, *extra)
    return [sys.executable, "-m", "fairseq_cli.train", *argv]


def epsilons_by_update(text):
    """{update: ε} from the train log lines (--log-interval 1)."""
    found = {}
    for line in text.splitlines():
        update, eps = re.search(r"num_updates=(\d+)", line), re.search(r"dp_epsilon=([0-9.]+)", line)
        if update and eps:
            found[int(update.group(1))] = float(eps.group(1))
    return found


def final_weights(save_dir):
    state = torch.load(os.path.join(save_dir, "checkpoint_last.pt"), weights_only=False)
    return state["model"], state["optimizer_history"][-1]["num_updates"]


def test_sigkill_and_resume_matches_an_uninterrupted_run(data, tmp_path):
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    # the same weights only with the same noise and draws: the seeded mode
    seeded = "--dp-insecure-seeded-rng"
    whole = subprocess.run(train_command(data, tmp_path / "whole", seeded), capture_output=True, text=True,
                           env=env, timeout=600)
    assert whole.returncode == 0, whole.stderr[-3000:]
    expected = epsilons_by_update(whole.stdout + whole.stderr)
    assert sorted(expected) == list(range(1, 11))

    # killed once update 7 is logged: the checkpoint of update 6 is complete
    proc = subprocess.Popen(train_command(data, tmp_path / "killed", seeded), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    before = ""
    for line in proc.stdout:
        before += line
        if re.search(r"num_updates=7\b", line):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    _, saved_at = final_weights(tmp_path / "killed")
    assert saved_at == 6

    resumed = subprocess.run(train_command(data, tmp_path / "killed", seeded), capture_output=True, text=True,
                             env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    out = resumed.stdout + resumed.stderr
    assert "Loaded checkpoint" in out
    got = epsilons_by_update(out)
    assert sorted(got) == [7, 8, 9, 10]
    for update, eps in got.items():
        assert eps == expected[update], update
    # same draws, same noise, same optimizer state: the same model
    whole_model, n_whole = final_weights(tmp_path / "whole")
    resumed_model, n_resumed = final_weights(tmp_path / "killed")
    assert n_whole == n_resumed == 10
    for name, value in whole_model.items():
        torch.testing.assert_close(resumed_model[name], value, rtol=0, atol=1e-6, msg=name)
    assert resumed_model["dp_ledger"].tolist() == [[1.0, 8 / 256, 10]]


def test_reset_optimizer_keeps_the_ledger_of_the_weights(data, tmp_path, caplog):
    first = tmp_path / "first"
    run_main(train_args(data, "--max-update", "4", "--save-dir", str(first), *LOG), caplog)
    # a new run from those weights restarts fairseq's update count at 0, but
    # the privacy they spent is still spent
    messages = run_main(train_args(
        data, "--max-update", "4", "--save-dir", str(tmp_path / "second"), *LOG,
        "--restore-file", str(first / "checkpoint_last.pt"),
        "--reset-optimizer", "--reset-dataloader", "--reset-meters"), caplog)
    assert summary_value(messages, "num_updates") == 4
    expected = PrivacyAccountant("prv")
    expected.step(noise_multiplier=1.0, sample_rate=8 / 256, num_steps=8)
    assert summary_value(messages, "dp_epsilon") == pytest.approx(expected.get_epsilon(1e-5), abs=1e-3)


def test_budget_stops_at_the_last_update_within_it_and_refuses_to_resume(data, tmp_path, caplog):
    budget = 1.0
    common = ["--max-epoch", "5", "--save-dir", str(tmp_path), "--dp-max-epsilon", str(budget), *LOG]
    messages = run_main(train_args(data, *common), caplog)
    stop = int(summary_value(messages, "num_updates"))
    assert stop < 5 * 32
    assert any("privacy budget reached" in m for m in messages)
    # update `stop` is the last within budget: opacus's accountant evaluated
    # directly at every count (the run found it by bisection), and Microsoft's
    # PRV accountant within its error
    def opacus_eps(steps):
        accountant = OpacusPRV()
        accountant.history = [(1.0, 8 / 256, steps)]
        return accountant.get_epsilon(delta=1e-5)

    assert opacus_eps(stop) <= budget < opacus_eps(stop + 1)
    assert reference_prv_epsilon(1.0, 8 / 256, stop, 1e-5) <= budget + 0.02
    assert reference_prv_epsilon(1.0, 8 / 256, stop + 1, 1e-5) > budget - 0.02
    assert summary_value(messages, "dp_epsilon") <= budget
    state = torch.load(tmp_path / "checkpoint_last.pt", weights_only=False)
    assert state["optimizer_history"][-1]["num_updates"] == stop

    with pytest.raises(PrivacyBudgetExhausted, match="budget is spent"):
        run_main(train_args(data, *common[:-len(LOG)], "--max-epoch", "6", *LOG), caplog)
    state = torch.load(tmp_path / "checkpoint_last.pt", weights_only=False)
    assert state["optimizer_history"][-1]["num_updates"] == stop


def noisy_grads(task, model, criterion, update_num):
    task.train_step(batch(task, size=8), model, criterion, None, update_num)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_zeroing_grads_in_place_starts_a_new_noisy_update(data):
    """A Python-API loop with zero_grad(set_to_none=False), and even a frozen
    update number, still gets noise and a ledger step every update."""
    _, task, model, criterion = build(train_args(data, "--dp-clip-norm", "1e-8"))
    first = noisy_grads(task, model, criterion, 0)
    for p in model.parameters():
        if p.grad is not None:
            p.grad.zero_()
    second = noisy_grads(task, model, criterion, 0)
    assert task.accountant.steps == 2
    head = "classification_heads.sentence_classification_head.dense.weight"
    # clip ~0: the gradient is the noise alone, std σC/B with C = 1e-8
    for grads in (first, second):
        assert grads[head].std().item() == pytest.approx(1e-8 / 8, rel=0.15)
    assert not torch.equal(first[head], second[head])


def test_default_noise_and_draws_are_secret_and_the_seeded_flag_reproduces(data):
    """Two default runs with the same --seed (an lr sweep, say) must not share
    their noise or their batches; --dp-insecure-seeded-rng reproduces both."""
    head = "classification_heads.sentence_classification_head.dense.weight"

    def first_update(*extra):
        _, task, model, criterion = build(train_args(data, "--dp-clip-norm", "1e-8", *extra))
        torch.manual_seed(123)  # what fairseq does before every update
        itr = task.get_batch_iterator(task.dataset("train"), max_sentences=8, max_positions=64, epoch=1)
        # a Poisson draw may be empty (probability about 3e-4 each here): fairseq gets {}
        draws = [b["id"].tolist() if b else [] for b in itr.next_epoch_itr(shuffle=False)]
        return noisy_grads(task, model, criterion, 0)[head].flatten(), draws, task

    secret_a, draws_a, task_a = first_update()
    secret_b, draws_b, task_b = first_update()
    # the noise alone (clip ~0): N(0, σ²C²) / B, and two runs' draws uncorrelated
    for g in (secret_a, secret_b):
        assert g.std().item() == pytest.approx(1e-8 / 8, rel=0.15)
        assert abs(g.mean().item()) < 4 * 1e-8 / 8 / math.sqrt(g.numel())
    correlation = torch.corrcoef(torch.stack([secret_a, secret_b]))[0, 1].item()
    assert abs(correlation) < 4 / math.sqrt(secret_a.numel())
    assert draws_a != draws_b
    assert task_a.sampling_seed() != task_b.sampling_seed() != 1

    seeded_a, seeded_draws_a, task_a = first_update("--dp-insecure-seeded-rng")
    seeded_b, seeded_draws_b, task_b = first_update("--dp-insecure-seeded-rng")
    assert torch.equal(seeded_a, seeded_b) and seeded_draws_a == seeded_draws_b
    assert task_a.sampling_seed() == task_b.sampling_seed() == 1


def test_seeded_runs_say_so_on_every_line(data, tmp_path, caplog):
    messages = run_main(train_args(data, "--max-update", "3", "--save-dir", str(tmp_path), "--no-save",
                                   "--dp-insecure-seeded-rng", *LOG), caplog)
    lines = [m for m in messages if "dp_epsilon" in m]
    assert lines and all("dp_rng seeded-INSECURE" in m or "dp_rng=seeded-INSECURE" in m for m in lines)
    assert any("holds ONLY against someone who does not know the seed" in m for m in messages)


def test_continuing_from_weights_with_a_ledger_draws_new_batches_and_noise(data):
    """fairseq's update count and epoch restart when a run continues from DP
    weights (--reset-optimizer, --finetune-from-model); seeded by them alone,
    the batches and the noise would repeat the first run's, and the
    difference of two updates would cancel the noise."""
    def first_update(ledger_steps):
        _, task, model, criterion = build(train_args(data, "--dp-clip-norm", "1e-8", "--dp-insecure-seeded-rng"))
        task.accountant.step(noise_multiplier=1.0, sample_rate=task.sample_rate, num_steps=ledger_steps)
        itr = task.get_batch_iterator(task.dataset("train"), max_sentences=8, max_positions=64, epoch=1)
        draw = next(itr.next_epoch_itr(shuffle=True))["id"].tolist()
        head = noisy_grads(task, model, criterion, 0)[
            "classification_heads.sentence_classification_head.dense.weight"]
        return draw, head

    draw_a, noise_a = first_update(0)
    draw_a2, noise_a2 = first_update(0)
    draw_b, noise_b = first_update(4)
    assert draw_a == draw_a2 and torch.equal(noise_a, noise_a2)  # reproducible
    assert draw_a != draw_b
    assert not torch.equal(noise_a, noise_b)


def test_averaged_checkpoint_ledger_is_refused_and_ema_copies_leave_it_alone(data):
    import copy

    _, task, model, _ = build(train_args(data))
    task.accountant.step(noise_multiplier=1.0, sample_rate=task.sample_rate, num_steps=100)
    early = model.state_dict()
    task.accountant.step(noise_multiplier=1.0, sample_rate=task.sample_rate, num_steps=100)
    late = model.state_dict()
    assert late["dp_ledger"].tolist() == [[1.0, task.sample_rate, 200]]
    # fairseq's average_checkpoints.py: floats averaged, integers floor-divided
    averaged = {k: (early[k] + late[k]) / 2 if late[k].is_floating_point() else (early[k] + late[k]) // 2
                for k in late}
    with pytest.raises(LedgerMismatch, match="averaged or edited"):
        model.load_state_dict(averaged)
    model.load_state_dict(late)  # the untouched checkpoint loads
    assert task.accountant.steps == 200

    # fairseq's EMA keeps a deepcopy and loads states into it every update
    ema = copy.deepcopy(model)
    assert "dp_ledger" not in ema.state_dict()
    ema.load_state_dict({k: v.float() for k, v in model.state_dict().items() if not k.startswith("dp_")})
    assert task.accountant.history == [(1.0, task.sample_rate, 200)]


def test_division_is_by_the_expected_batch_not_the_drawn_one(data):
    """A Poisson micro-batch of 5 when 8 are expected: the gradient is the sum
    over the 5 examples divided by 8 (here, with nothing clipped, the plain
    gradient of the summed loss, from autograd, divided by 8)."""
    import copy

    no_dropout = ["--dropout", "0", "--attention-dropout", "0", "--pooler-dropout", "0"]
    _, task, model, criterion = build(train_args(data, "--dp-clip-norm", "1e6", *no_dropout,
                                                 noise=("--dp-noise-multiplier", "0")))
    sample = batch(task, size=5)
    reference = copy.deepcopy(model)
    reference.train()
    loss, _, _ = criterion(reference, sample)
    head = "classification_heads.sentence_classification_head.dense.weight"
    expected = torch.autograd.grad(loss, dict(reference.named_parameters())[head])[0] / 8
    task.train_step(sample, model, criterion, None, 0)
    got = dict(model.named_parameters())[head].grad
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
