"""bf16 under DP: ``common.bf16=true`` (fairseq casts the model to bfloat16 and
steps float32 master weights in its ``FP16Optimizer``; with
``memory_efficient_bf16`` it steps the bf16 weights, the optimizer working in
float32). The norms, clip factors, clipped sums and noise are float32; the
step is compared with a float64 loop over one-example batches and with the
float32 step through fairseq's own Trainer, on the CPU.

fairseq-train's ``--bf16`` turns ``--tpu`` on (fairseq 0.12), so these tests
set ``common.bf16`` in the config, as ``fairseq-hydra-train ...
common.bf16=true`` does; the last test runs that command."""

import copy
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from fairseq import tasks
from fairseq.logging import metrics
from fairseq.optim import FP16Optimizer, MemoryEfficientFP16Optimizer
from fairseq.trainer import Trainer

from fairseq_dp.accounting import PrivacyAccountant, history_from_tensor
from fairseq_dp.carriers import CarrierSchedule
from fairseq_dp.clipping import clipped_sums
from fairseq_dp.errors import DPConfigError
from fairseq_dp.modules import LowRankLinear
from fairseq_dp.noise import add_noise
from fairseq_dp.recording import Recorder
from fairseq_dp.tasks.dp_task import signal_gradients_written
from fairseq_dp.trainer import DPSettings, DPTrainer

from helpers import (PLUGIN_DIR, batch, data_dir, parse, per_example_oracle, randomize_lora_b, task_step_grads,
                     train_args)

B_MICRO, UPDATE_FREQ = 4, 2
NO_DROPOUT = ["--dropout", "0", "--attention-dropout", "0", "--activation-dropout", "0",
              "--pooler-dropout", "0"]
# bf16's machine epsilon (8 significant bits): one rounding moves a number by at most half of it
BF16_EPS = 2.0 ** -8


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return data_dir(tmp_path_factory, n_train=64, n_valid=16)


def set_precision(cfg, *, bf16, memory_efficient_bf16=False, world_size=1):
    """What fairseq-hydra-train's ``common.bf16=true`` gives (fairseq-train's
    ``--bf16`` sets ``--tpu`` too). The task's copies of these settings are
    interpolations of them under Hydra; fairseq's command-line parser fills
    in their values, so both are set."""
    for node in (cfg.common, cfg.task):
        node.bf16 = bf16
        node.memory_efficient_bf16 = memory_efficient_bf16
    cfg.distributed_training.distributed_world_size = cfg.task.distributed_world_size = world_size
    return cfg


def make(data, *, bf16, arch="roberta_rgp", sigma=0.0, clip=1.0, optimizer=("sgd",),
         memory_efficient=False, extra=()):
    """(cfg, task, model, criterion), the model's weights rounded to bf16
    values in float32, so that the float32 and bf16 runs start from the same
    weights."""
    argv = train_args(data, "--update-freq", str(UPDATE_FREQ), "--lr", "1", "--dp-clip-norm", str(clip),
                      *NO_DROPOUT, *extra, noise=("--dp-noise-multiplier", str(sigma)))
    argv[argv.index("--batch-size") + 1] = str(B_MICRO)
    argv[argv.index("--arch") + 1] = arch
    i = argv.index("--optimizer")
    del argv[i:i + 2]
    argv += ["--optimizer", *optimizer]
    cfg = set_precision(parse(argv), bf16=bf16, memory_efficient_bf16=memory_efficient)
    torch.manual_seed(cfg.common.seed)
    task = tasks.setup_task(cfg.task)
    task.load_dataset("train")
    model = task.build_model(cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16))
    return cfg, task, model, task.build_criterion(cfg.criterion)


def micro_batches(task):
    return [batch(task, size=B_MICRO, start=0), batch(task, size=B_MICRO, start=B_MICRO)]


def relative_error(got, expected):
    num = sum((got[k].double() - expected[k].double()).pow(2).sum() for k in expected)
    den = sum(expected[k].double().pow(2).sum() for k in expected)
    return (num / den).sqrt().item()


def carriers_of(model):
    return {n: (m.left.clone(), m.right.clone())
            for n, m in model.named_modules() if isinstance(m, LowRankLinear)}


# ------------------------------------------------------------ clipping in float32
@pytest.mark.parametrize("ghost", [True, False])
def test_bf16_records_are_clipped_with_float32_norms(ghost):
    """A Linear layer's records in bf16: the clipped sum equals the float64
    one formed from the same bf16 numbers to float32 precision. Norms or clip
    factors in bf16 would be off by up to 2^-9 relative."""
    g = torch.Generator().manual_seed(0)
    B, T, d, p = 6, 5, 16, 12
    layer = nn.Linear(d, p).to(torch.bfloat16)
    a = torch.randn(B, T, d, generator=g).to(torch.bfloat16)
    grad_out = torch.randn(B, T, p, generator=g).to(torch.bfloat16)
    per_example = torch.einsum("btp,btd->bpd", grad_out.double(), a.double())  # the oracle, float64
    per_bias = grad_out.double().sum(1)
    norms = (per_example.flatten(1).pow(2).sum(1) + per_bias.pow(2).sum(1)).sqrt()
    clip = norms.sort().values[2:4].mean().item()  # three clipped, three not
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    summed, nclipped = clipped_sums([[layer, a, grad_out]], {id(layer): "layer"}, clip, ghost=ghost,
                                    like=torch.zeros((), dtype=torch.bfloat16))
    assert nclipped == 3
    assert summed["layer"]["weight"].dtype == torch.float32
    torch.testing.assert_close(summed["layer"]["weight"].double(), torch.einsum("b,bpd->pd", factors, per_example),
                               rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(summed["layer"]["bias"].double(), factors @ per_bias, rtol=2e-6, atol=2e-6)


def test_noise_on_bf16_values_is_drawn_in_float32():
    values = {"w": torch.full((1000,), 0.5, dtype=torch.bfloat16)}
    noisy = add_noise(values, 0.3, torch.Generator().manual_seed(7))["w"]
    assert noisy.dtype == torch.float32
    draw = torch.normal(0.0, 0.3, size=(1000,), generator=torch.Generator().manual_seed(7), dtype=torch.float32)
    assert torch.equal(noisy, 0.5 + draw)  # bf16 noise would be rounded to 8 significant bits


# ------------------------------------------------------------ the DP step in bf16
@pytest.mark.parametrize("arch", ["roberta_rgp", "roberta", "roberta_lora"])
def test_bf16_dp_gradient_matches_per_example_loop(data, arch):
    """The gradient the DP step writes in a bf16 model (two micro-batches, some
    examples clipped) against every example run alone through the float64
    model with the same weights. The difference is bf16's forward and
    backward: about 1 % measured."""
    cfg, task, model, criterion = make(data, bf16=True, arch=arch)
    if arch == "roberta_lora":
        randomize_lora_b(model)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(torch.bfloat16))
    samples = micro_batches(task)
    # RGP's carriers of the first update, from the float32 weights (bf16 values)
    CarrierSchedule(task.recorder.low_rank, seed=task.cfg.seed, power_iters=1).compute(0)
    carriers = carriers_of(model)
    carriers64 = {k: (left.double(), right.double()) for k, (left, right) in carriers.items()}
    model64 = copy.deepcopy(model).double()
    _, norms = per_example_oracle(model64, criterion, task, samples, 1.0, 1, carriers64)
    clip = norms.median().item()
    task.cfg.dp_clip_norm = clip  # fixed when the first update starts
    model.to(torch.bfloat16)  # as fairseq's Trainer does under bf16
    got = task_step_grads(task, model, criterion, samples)
    assert all(g.dtype == torch.bfloat16 for g in got.values())
    for name, (left, right) in carriers_of(model).items():  # power iteration in float32
        assert torch.equal(left, carriers[name][0]) and torch.equal(right, carriers[name][1])
    expected, norms = per_example_oracle(model64, criterion, task, samples, clip, B_MICRO * UPDATE_FREQ,
                                         carriers64)
    assert (norms > clip).any() and (norms < clip).any()
    assert set(got) == set(expected)
    assert relative_error(got, expected) < 0.03


class OneWeight(nn.Module):
    """y = w·x: example x's gradient of w is x (the loss is the sum of y)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(1, 1, bias=False)

    def set_num_updates(self, num_updates):
        pass


def sum_criterion(model, sample):
    return model.proj(sample).sum(), 0, {"nsentences": sample.shape[0]}


def test_bf16_gradient_is_summed_in_float32_over_micro_batches():
    """Two micro-batches of one logical batch, σ = 0, nothing clipped: the
    bf16 gradient is the float32 sum of both, rounded once. Examples 1 and
    2^-8, then 2^-8: the sum 1 + 2^-7 is a bf16 number, while the first
    micro-batch alone (1 + 2^-8, halfway between two bf16 numbers) rounds to
    1, and 1 + 2^-8 rounded again would stay 1."""
    model = OneWeight().to(torch.bfloat16)
    settings = DPSettings(clip_norm=100.0, noise_multiplier=0.0, expected_batch_size=1, sample_rate=0.5,
                          micro_batches_per_update=2)
    trainer = DPTrainer(Recorder(model), PrivacyAccountant("rdp"), settings)
    tiny = 2.0 ** -8
    trainer.train_step(torch.tensor([[1.0], [tiny]], dtype=torch.bfloat16), model, sum_criterion, 0)
    assert model.proj.weight.grad.dtype == torch.bfloat16
    assert model.proj.weight.grad.item() == 1.0
    trainer.train_step(torch.tensor([[tiny]], dtype=torch.bfloat16), model, sum_criterion, 0)
    assert model.proj.weight.grad.item() == 1.0 + 2.0 ** -7


def test_bf16_running_sum_restarts_when_an_update_is_retried():
    """fairseq retries an update after an out-of-memory error with the
    gradients set to None and the same update number: the float32 running sum
    of the abandoned attempt must not leak into the retried gradient, nor into
    the next update's."""
    model = OneWeight().to(torch.bfloat16)
    settings = DPSettings(clip_norm=100.0, noise_multiplier=0.0, expected_batch_size=1, sample_rate=0.5,
                          micro_batches_per_update=2)
    accountant = PrivacyAccountant("rdp")
    trainer = DPTrainer(Recorder(model), accountant, settings)
    x = torch.tensor([[2.0]], dtype=torch.bfloat16)
    trainer.train_step(x, model, sum_criterion, 0)  # first micro-batch of an attempt that fails
    model.proj.weight.grad = None  # fairseq's zero_grad before the retry
    trainer.train_step(x, model, sum_criterion, 0)
    trainer.train_step(x, model, sum_criterion, 0)
    assert model.proj.weight.grad.item() == 4.0  # the retry's two micro-batches, not three
    assert accountant.steps == 2  # the retried attempt is counted again (conservative)
    model.proj.weight.grad = None
    trainer.train_step(3 * x, model, sum_criterion, 1)
    assert model.proj.weight.grad.item() == 6.0  # nothing of update 0 carried over


def run_update(cfg, task, model, criterion):
    before = {n: p.detach().clone().float() for n, p in model.named_parameters()}
    trainer = Trainer(cfg, task, model, criterion)
    with metrics.aggregate(new_root=True) as agg:
        trainer.train_step(micro_batches(task))
    after = {n: p.detach().float() for n, p in trainer.model.named_parameters()}
    step = {n: before[n] - after[n] for n, p in trainer.model.named_parameters() if p.requires_grad}
    return trainer, step, float(agg["gnorm"].avg)


@pytest.mark.parametrize("arch", ["roberta_rgp", "roberta"])
@pytest.mark.parametrize("memory_efficient,optimizer,wrapper,tolerance", [
    # lr 100: the weights after the step are bf16, and a step much larger than
    # their rounding makes the comparison one of the gradients (measured 0.6 %
    # and 0.8 % apart)
    (False, ("sgd", "--lr", "100"), FP16Optimizer, 0.03),
    # Adam's first step is lr·g/(|g| + eps): with eps 1 nearly linear in g. The
    # memory-efficient optimizer keeps no float32 weights: a coordinate's step
    # under half a bf16 ulp of its weight is lost or doubled (1.1 % and 2.6 %)
    (True, ("adam", "--adam-eps", "1", "--lr", "100"), MemoryEfficientFP16Optimizer, 0.05),
])
def test_bf16_trainer_step_matches_float32_step(data, arch, memory_efficient, optimizer, wrapper, tolerance):
    """One update through fairseq's Trainer in bf16 moves the weights as the
    float32 run does, within bf16 precision. A master gradient that was never
    refreshed from the bf16 model would leave them where they were."""
    steps = {}
    for bf16 in (False, True):
        cfg, task, model, criterion = make(data, bf16=bf16, arch=arch, optimizer=optimizer,
                                           memory_efficient=memory_efficient and bf16)
        trainer, steps[bf16], gnorm = run_update(cfg, task, model, criterion)
        if bf16:
            assert isinstance(trainer.optimizer, wrapper)
            assert next(trainer.model.parameters()).dtype == torch.bfloat16
            assert gnorm > 0
    assert sum(s.abs().sum() for s in steps[False].values()) > 0
    assert relative_error(steps[True], steps[False]) < tolerance


def test_bf16_noise_std_is_sigma_c_over_b(data):
    """σ = 1000 through fairseq's Trainer in bf16: the gradient the optimizer
    steps on is the noise (std σC/B on every coordinate) plus the clipped sum
    over B, whose norm is at most C (8 examples of norm ≤ C, divided by
    B = 8); the tolerance adds that bound and bf16's rounding of each
    coordinate to the sampling error."""
    sigma, clip = 1000.0, 1.0
    cfg, task, model, criterion = make(data, bf16=True, arch="roberta", sigma=sigma, clip=clip)
    trainer, step, _ = run_update(cfg, task, model, criterion)
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    assert all(p.grad.dtype == torch.bfloat16 for p in params)
    grad = torch.cat([p.grad.double().flatten() for p in params])
    # SGD with lr 1 stepped on it: the float32 master weights moved by it
    moved = torch.cat([s.double().flatten() for s in step.values()])
    torch.testing.assert_close(moved, grad, rtol=2 * BF16_EPS, atol=0.05)
    n = grad.numel()
    expected = sigma * clip / (B_MICRO * UPDATE_FREQ)
    data_bound = clip / (n - 1) ** 0.5  # what the clipped sum can move the sample std by
    assert n > 10_000
    assert abs(grad.std().item() - expected) < expected * (5 / (2 * n) ** 0.5 + BF16_EPS) + data_bound
    assert abs(grad.mean().item()) < 5 * expected / n ** 0.5 + clip / n ** 0.5


def test_a_fp16_optimizer_that_does_not_mark_its_gradients_is_refused(data, monkeypatch):
    """If fairseq's FP16Optimizer stopped marking its master gradients for
    copying in backward(), the DP task stops instead of stepping on stale
    gradients."""
    cfg, task, model, criterion = make(data, bf16=True, arch="roberta")
    optimizer = Trainer(cfg, task, model, criterion).optimizer
    assert isinstance(optimizer, FP16Optimizer)
    optimizer.zero_grad()
    signal_gradients_written(optimizer)  # fairseq 0.12: marked
    optimizer.zero_grad()
    monkeypatch.setattr(optimizer, "backward", lambda loss: loss.backward())  # a fairseq that does not
    with pytest.raises(RuntimeError, match="stale gradients"):
        signal_gradients_written(optimizer)


# ------------------------------------------------------------ what stays refused
@pytest.mark.parametrize("flags,message", [
    (["--fp16"], r"--fp16 is not supported with DP \(dynamic loss scaling.*or in bf16"),
    (["--memory-efficient-fp16"], "--memory-efficient-fp16 is not supported with DP.*or in bf16"),
    (["--amp"], "--amp is not supported with DP.*or in bf16"),
    # fairseq-train's --bf16 implies --tpu
    (["--bf16"], "--tpu: DP training on TPUs.*common.bf16=true"),
    (["--memory-efficient-bf16"], "--tpu: DP training on TPUs.*common.bf16=true"),
])
def test_command_line_mixed_precision_is_refused_with_a_message(data, flags, message):
    argv = train_args(data, *flags)
    with pytest.raises(DPConfigError, match=message):
        tasks.setup_task(parse(argv).task)


@pytest.mark.parametrize("settings,message", [
    (dict(bf16=False, memory_efficient_bf16=True), "memory_efficient_bf16 without common.bf16 trains in fp32"),
    (dict(bf16=True, world_size=2), "bf16 with several workers is not supported"),
])
def test_bf16_configurations_that_would_mislead_are_refused(data, settings, message):
    cfg = set_precision(parse(train_args(data, "--ddp-backend", "legacy_ddp")), **settings)
    with pytest.raises(DPConfigError, match=message):
        tasks.setup_task(cfg.task)


# ------------------------------------------------------------ the entry point
def test_fairseq_hydra_train_in_bf16(data, tmp_path):
    overrides = [
        f"task.data={data}", f"common.user_dir={PLUGIN_DIR}", "common.cpu=true", "common.bf16=true",
        "checkpoint.finetune_from_model=null", "model._name=roberta_rgp", "++model.encoder_layers=2",
        "++model.encoder_embed_dim=32", "++model.encoder_ffn_embed_dim=48",
        "++model.encoder_attention_heads=4", "task.max_positions=64", "dataset.batch_size=8",
        "dataset.num_workers=0", "optimization.update_freq=[2]", "optimization.max_update=3",
        "common.log_interval=1", "common.log_format=simple", "task.dp_target_epsilon=5",
        f"checkpoint.save_dir={tmp_path}/ckpt", "checkpoint.no_epoch_checkpoints=true",
    ]
    env = dict(os.environ, PYTHONWARNINGS="ignore",
               PYTHONPATH=os.path.dirname(PLUGIN_DIR) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "fairseq_cli.hydra_train", "--config-dir", os.path.join(PLUGIN_DIR, "config"),
         "--config-name", "rgp_sst2", *overrides],
        cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "DP: the model trains in bfloat16: per-example norms, clip factors" in out
    gnorms = [float(x) for x in re.findall(r"gnorm=([0-9.]+)", out)]
    assert len(gnorms) >= 3 and all(g > 0 for g in gnorms)
    assert re.search(r"dp_epsilon=[0-9.]+", out)
    state = torch.load(tmp_path / "ckpt" / "checkpoint_last.pt", weights_only=False)
    assert history_from_tensor(state["model"]["dp_ledger"])[0][2] == 3  # every update in the ledger
