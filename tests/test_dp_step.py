"""The whole DP training step, through fairseq's own Trainer and the real
``roberta_rgp`` model, against a loop over one-example batches (float64,
dropout 0), as private-transformers tests its engine."""

import copy

import pytest
import torch
from fairseq.logging import metrics
from fairseq.trainer import Trainer

from fairseq_dp.carriers import CarrierSchedule
from fairseq_dp.modules import LowRankLinear

from helpers import batch, build, data_dir, per_example_oracle, task_step_grads, train_args

B_MICRO, UPDATE_FREQ = 4, 2
NO_DROPOUT = ["--dropout", "0", "--attention-dropout", "0", "--activation-dropout", "0",
              "--pooler-dropout", "0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return data_dir(tmp_path_factory, n_train=64, n_valid=16)


def make(data, sigma, rank=2, clip=1.0, dtype=torch.float64, extra=()):
    argv = train_args(
        data, "--optimizer", "sgd", "--momentum", "0", "--weight-decay", "0", "--lr", "1",
        "--update-freq", str(UPDATE_FREQ), "--rgp-rank", str(rank), "--dp-clip-norm", str(clip),
        *NO_DROPOUT, *extra, noise=("--dp-noise-multiplier", str(sigma)),
    )
    argv[argv.index("--batch-size") + 1] = str(B_MICRO)
    i = argv.index("--optimizer")
    del argv[i:i + 2]  # the second --optimizer (sgd) wins either way; keep one
    argv += ["--optimizer", "sgd"]
    return build(argv, dtype=dtype)


def oracle_update(model0, criterion, task, samples, carriers, clip):
    """Σ_i clip(g_i) / B with every example run alone through the plain model,
    where g_i are the carrier gradients G_i Rᵀ, Lᵀ G_i and the head gradients."""
    return per_example_oracle(model0, criterion, task, samples, clip, B_MICRO * UPDATE_FREQ, carriers)


def carriers_of(model):
    return {n: (m.left.clone(), m.right.clone())
            for n, m in model.named_modules() if isinstance(m, LowRankLinear)}




def run_update(cfg, task, model, criterion, samples):
    model0 = copy.deepcopy(model)
    trainer = Trainer(cfg, task, model, criterion)
    with metrics.aggregate(new_root=True) as agg:
        trainer.train_step(samples)
    log = {"gnorm": float(agg["gnorm"].avg)}  # unrounded
    carriers = {n: (m.left.clone(), m.right.clone())
                for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    return model0, log, carriers


def median_clip(task, criterion, samples, dtype=torch.float64):
    """A clip norm between the per-example norms: some clipped, some not."""
    model = task.recorder.model
    CarrierSchedule(task.recorder.low_rank, seed=task.cfg.seed,
                    power_iters=model.args.rgp_power_iters).compute(0)
    carriers = {k: (a.to(dtype), b.to(dtype)) for k, (a, b) in carriers_of(model).items()}
    _, norms = oracle_update(copy.deepcopy(model).to(dtype), criterion, task, samples, carriers, 1.0)
    return norms.median().item()


@pytest.mark.parametrize("rank,pooling", [(1, "cls"), (3, "cls"), (2, "mean")])
def test_train_step_matches_per_example_loop_float64(data, rank, pooling):
    cfg, task, model, criterion = make(data, sigma=0.0, rank=rank,
                                       extra=("--classification-pooling", pooling))
    samples = [batch(task, size=B_MICRO, start=0), batch(task, size=B_MICRO, start=B_MICRO)]
    clip = median_clip(task, criterion, samples)
    task.cfg.dp_clip_norm = clip  # fixed when the first update starts
    model0 = copy.deepcopy(model)
    got = task_step_grads(task, model, criterion, samples)
    expected, norms = oracle_update(model0, criterion, task, samples, carriers_of(model), clip)
    assert (norms > clip).any() and (norms < clip).any()
    assert set(got) == set(expected)
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, atol=1e-9, rtol=1e-6)


def test_fairseq_trainer_update_matches_per_example_loop(data):
    """Through fairseq's Trainer (float32: its grad norm needs it): the SGD
    step with lr 1 is minus the DP gradient, gnorm is its norm and at most C."""
    cfg, task, model, criterion = make(data, sigma=0.0, rank=2, dtype=torch.float32)
    samples = [batch(task, size=B_MICRO, start=0), batch(task, size=B_MICRO, start=B_MICRO)]
    clip = median_clip(task, criterion, samples)
    task.cfg.dp_clip_norm = clip  # fixed when the first update starts
    model0, log, carriers = run_update(cfg, task, model, criterion, samples)
    carriers64 = {k: (a.double(), b.double()) for k, (a, b) in carriers.items()}
    expected, _ = oracle_update(model0.double(), criterion, task, samples, carriers64, clip)
    after = dict(model.named_parameters())
    before = dict(model0.named_parameters())
    for name, grad in expected.items():
        torch.testing.assert_close((before[name] - after[name].double()), grad, atol=2e-6, rtol=1e-4)
    for name, param in before.items():
        if not param.requires_grad:
            assert torch.equal(param, after[name].double()), name
    full = torch.sqrt(sum(g.pow(2).sum() for g in expected.values()))
    assert log["gnorm"] == pytest.approx(full.item(), rel=1e-4)
    assert log["gnorm"] <= clip * (1 + 1e-5)


def test_noise_std_is_sigma_c_over_b(data):
    sigma, clip = 3.0, 0.5
    runs = []
    for s in (0.0, sigma):
        cfg, task, model, criterion = make(data, sigma=s, rank=2, clip=clip, dtype=torch.float32)
        samples = [batch(task, size=B_MICRO, start=0), batch(task, size=B_MICRO, start=B_MICRO)]
        model0, log, carriers = run_update(cfg, task, model, criterion, samples)
        runs.append((model0, model, carriers))
    (c0, c1, carriers), (n0, n1, carriers_noisy) = runs
    for k in carriers:  # power iteration does not depend on the noise
        assert torch.equal(carriers[k][0], carriers_noisy[k][0])
    clean, noisy = dict(c1.named_parameters()), dict(n1.named_parameters())
    expected_std = sigma * clip / (B_MICRO * UPDATE_FREQ)
    head, carrier_coords = [], []
    for name, p in clean.items():
        if not p.requires_grad:
            continue
        noise = (clean[name] - noisy[name]).detach()  # = noise / B (SGD, lr 1)
        module = name.rpartition(".")[0]
        if module in carriers:
            L, R = carriers[module]
            # in carrier coordinates: Lᵀ ΔW = noise on ∂R; (ΔW − L Lᵀ ΔW) Rᵀ = (I − LLᵀ) noise on ∂L
            carrier_coords.append((L.t() @ noise).flatten())
            outside = noise - L @ L.t() @ noise
            assert torch.allclose(outside, outside @ R.t() @ R, atol=1e-6)
        else:
            head.append(noise.flatten())
    for coords in (torch.cat(head), torch.cat(carrier_coords)):
        n = coords.numel()
        assert n > 200
        ratio = coords.std().item() / expected_std
        assert abs(ratio - 1) < 5 / (2 * n) ** 0.5, (ratio, n)
        assert abs(coords.mean().item()) < 5 * expected_std / n ** 0.5
