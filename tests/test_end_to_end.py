"""fairseq's own entry points with the plugin, on tiny generated data."""

import logging
import math
import os
import re
import subprocess
import sys

import pytest
import torch
from fairseq.distributed import utils as distributed_utils
from fairseq_cli import train

from fairseq_dp.accounting import PrivacyAccountant
from fairseq_dp.errors import DPConfigError

from helpers import PLUGIN_DIR, batch, build, data_dir, parse, train_args

BIN = os.path.dirname(sys.executable)
SMALL = ["--arch", "roberta_rgp", "--encoder-layers", "2", "--encoder-embed-dim", "64",
         "--encoder-ffn-embed-dim", "128", "--encoder-attention-heads", "4"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return data_dir(tmp_path_factory, n_train=256, n_valid=64)


@pytest.fixture(scope="module")
def learn_data(tmp_path_factory):
    return data_dir(tmp_path_factory, n_train=2000, n_valid=400, name="learn")


def run_main(argv, caplog):
    caplog.clear()
    with caplog.at_level(logging.INFO):
        distributed_utils.call_main(parse(argv), train.main)
    return [r.getMessage() for r in caplog.records]


def summary_value(messages, key):
    """Last value of `key` in the end-of-epoch train summaries."""
    found = [float(m.group(1)) for msg in messages
             for m in [re.search(rf"\| {key} ([0-9.e+-]+|inf)", msg)] if m and "num_updates" in msg
             and "valid on" not in msg]
    return found[-1]


def test_fairseq_train_learns_above_chance_at_high_epsilon(learn_data, tmp_path, caplog):
    argv = train_args(
        learn_data, "--max-epoch", "3", "--save-dir", str(tmp_path), "--no-save",
        "--dp-accountant", "rdp", "--log-format", "simple", "--log-interval", "10",
        model=SMALL, noise=("--dp-noise-multiplier", "0.01"),
    )
    argv[argv.index("--batch-size") + 1] = "64"
    messages = run_main(argv, caplog)
    train_lines = [m for m in messages if "dp_epsilon=" in m]
    assert train_lines, "train log lines must carry dp_epsilon"
    assert all("dp_sigma=0.01" in m for m in train_lines)
    accuracies = [float(m.group(1)) for msg in messages if "valid on" in msg
                  for m in [re.search(r"\| accuracy ([0-9.]+)", msg)] if m]
    assert max(accuracies) > 70, accuracies
    assert math.isfinite(summary_value(messages, "dp_epsilon"))


def test_target_epsilon_is_reached_from_below(data, tmp_path, caplog):
    target = 3.0
    argv = train_args(data, "--max-epoch", "2", "--save-dir", str(tmp_path), "--no-save",
                      "--log-format", "simple", "--log-interval", "1",
                      noise=("--dp-target-epsilon", str(target)))
    messages = run_main(argv, caplog)
    eps = summary_value(messages, "dp_epsilon")
    sigma = summary_value(messages, "dp_sigma")
    assert 0.97 * target <= eps <= target
    # the logged ε is the reference accountant's for the run's σ, q and update count
    from prv_accountant import PRVAccountant
    from prv_accountant.privacy_random_variables import PoissonSubsampledGaussianMechanism

    steps = 2 * math.ceil(256 / 8)
    prv = PoissonSubsampledGaussianMechanism(sampling_probability=8 / 256, noise_multiplier=sigma)
    _, _, eps_up = PRVAccountant(prv, max_self_compositions=steps, eps_error=0.01,
                                 delta_error=1e-8).compute_epsilon(delta=1e-5, num_self_compositions=steps)
    assert eps == pytest.approx(eps_up, rel=0.02, abs=0.02)


def test_noise_zero_is_reported_as_not_private(data, tmp_path, caplog):
    argv = train_args(data, "--max-update", "2", "--save-dir", str(tmp_path), "--no-save",
                      "--log-format", "simple", "--log-interval", "1",
                      noise=("--dp-noise-multiplier", "0"))
    messages = run_main(argv, caplog)
    assert any("THIS RUN IS NOT PRIVATE" in m for m in messages)
    assert summary_value(messages, "dp_epsilon") == math.inf


def test_resume_from_checkpoint_last_keeps_the_ledger(data, tmp_path, caplog):
    common = ["--save-dir", str(tmp_path), "--log-format", "simple", "--log-interval", "1"]
    run_main(train_args(data, "--max-update", "4", *common), caplog)
    assert os.path.exists(tmp_path / "checkpoint_last.pt")
    messages = run_main(train_args(data, "--max-update", "8", *common), caplog)
    assert any("Loaded checkpoint" in m for m in messages)
    expected = PrivacyAccountant("prv")
    expected.step(noise_multiplier=1.0, sample_rate=8 / 256, num_steps=8)
    assert summary_value(messages, "dp_epsilon") == pytest.approx(expected.get_epsilon(1e-5), abs=1e-3)


def run_cli(cmd, cwd):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_python_m_fairseq_cli_train(data, tmp_path):
    argv = train_args(data, "--max-update", "3", "--save-dir", str(tmp_path), "--no-save",
                      "--log-format", "simple", "--log-interval", "1")
    out = run_cli([sys.executable, "-m", "fairseq_cli.train", *argv], tmp_path)
    assert "dp_epsilon=" in out and "dp_sigma=1" in out


def test_fairseq_hydra_train_with_shipped_config(data, tmp_path):
    overrides = [
        f"task.data={data}", f"common.user_dir={PLUGIN_DIR}", "common.cpu=true",
        "checkpoint.finetune_from_model=null",  # the config asks for MiniLM's weights
        "model._name=roberta_rgp", "++model.encoder_layers=2", "++model.encoder_embed_dim=32",
        "++model.encoder_ffn_embed_dim=48", "++model.encoder_attention_heads=4",
        "task.max_positions=64", "dataset.batch_size=8", "dataset.num_workers=0",
        "optimization.update_freq=[2]", "optimization.max_epoch=2", "common.log_interval=1",
        "task.dp_target_epsilon=5", f"checkpoint.save_dir={tmp_path}/ckpt",
        "checkpoint.no_save=true",
    ]
    out = run_cli([os.path.join(BIN, "fairseq-hydra-train"), "--config-dir",
                   os.path.join(PLUGIN_DIR, "config"), "--config-name", "rgp_sst2", *overrides],
                  tmp_path)
    eps = [float(x) for x in re.findall(r"dp_epsilon[= ]([0-9.]+)", out)]
    assert eps and 0.97 * 5 <= eps[-1] <= 5


BAD_INPUTS = [
    (["--dp-target-epsilon", "0", "--max-epoch", "1"], None, "--dp-target-epsilon must be > 0"),
    (["--dp-target-epsilon", "-1", "--max-epoch", "1"], None, "--dp-target-epsilon must be > 0"),
    (["--dp-delta", "0"], "keep", r"--dp-delta must be in \(0, 1\)"),
    (["--dp-delta", "1.5"], "keep", r"--dp-delta must be in \(0, 1\)"),
    (["--dp-target-epsilon", "8", "--max-epoch", "1"], "keep", "exactly one of"),
    ([], None, "exactly one of"),
    (["--dp-target-epsilon", "8"], None, "needs the number of updates"),
    (["--dp-noise-multiplier", "-1"], None, "must be >= 0"),
    (["--dp-clip-norm", "0"], "keep", "--dp-clip-norm must be > 0"),
    (["--fp16"], "keep", "--fp16 is not supported with DP"),
    (["--memory-efficient-fp16"], "keep", "--memory-efficient-fp16 is not supported"),
    (["--amp"], "keep", "--amp is not supported"),
    (["--clip-norm", "1.0"], "keep", "use --clip-norm 0"),
    (["--max-tokens", "100"], "keep", "--max-tokens makes batch sizes"),
    (["--distributed-world-size", "2", "--ddp-backend", "c10d"], "keep",
     "c10d reduces gradients during backward.*needs --ddp-backend legacy_ddp"),
    (["--distributed-world-size", "2", "--ddp-backend", "fully_sharded"], "keep",
     "needs --ddp-backend legacy_ddp"),
    (["--dp-max-epsilon", "0"], "keep", "--dp-max-epsilon must be > 0"),
    (["--use-bmuf"], "keep", "--use-bmuf steps every worker on its own gradients"),
    (["--batch-size", "300"], "keep", r"expected logical batch .* is larger than the training set \(256"),
    (["--dp-max-epsilon", "-2"], "keep", "--dp-max-epsilon must be > 0"),
    (["--dp-max-epsilon", "3", "--dp-noise-multiplier", "0"], None, "cannot be met with --dp-noise-multiplier 0"),
    (["--encoder-layerdrop", "0.1"], "keep", "--encoder-layerdrop skips layers"),
    (["--mha-reg-scale-factor", "0.1"], "keep", "--mha-reg-scale-factor adds a regularizer"),
    (["--spectral-norm-classification-head"], "keep", "reparametrized or changed by a forward pre-hook"),
    (["--criterion", "sentence_prediction"], "keep", "needs --criterion dp_sentence_prediction"),
    (["--rgp-rank", "0"], "keep", "--rgp-rank must be >= 1"),
    (["--rgp-rank", "40"], "keep", "--rgp-rank 40 is invalid for a 32x32 matrix"),
    (["--arch", "roberta", "--dp-freeze", "embed_tokens,no_such_parameter"], "keep",
     "'no_such_parameter' matches no parameter name"),
    (["--dp-freeze", "embed_(tokens"], "keep", "--dp-freeze: invalid regular expression"),
    (["--arch", "roberta_lora", "--lora-rank", "0"], "keep", "--lora-rank must be >= 1"),
    (["--arch", "roberta_lora", "--lora-targets", "q,query"], "keep", "--lora-targets must be"),
]


@pytest.mark.parametrize("extra,noise,message", BAD_INPUTS)
def test_bad_input_stops_before_training_with_a_clear_message(data, extra, noise, message):
    noise_args = ("--dp-noise-multiplier", "1.0") if noise == "keep" else ()
    argv = train_args(data, *extra, noise=noise_args)
    with pytest.raises(DPConfigError, match=message):
        build(argv)


def test_training_example_longer_than_max_positions_is_refused(data, tmp_path, caplog):
    # fairseq would skip it silently; q = B/N would then count an example
    # that can never be sampled
    argv = train_args(data, "--max-update", "1", "--save-dir", str(tmp_path), "--no-save")
    argv[argv.index("--max-positions") + 1] = "6"
    with pytest.raises(ValueError, match="longer than max positions 6.*--shorten-method truncate"):
        run_main(argv, caplog)


def test_bad_input_stops_fairseq_train_before_the_first_update(data, tmp_path, caplog):
    argv = train_args(data, "--fp16", "--save-dir", str(tmp_path), "--max-update", "2")
    with pytest.raises(ValueError, match="--fp16 is not supported with DP"):
        run_main(argv, caplog)
    assert not os.path.exists(tmp_path / "checkpoint_last.pt")


def test_trainable_layer_without_a_rule_is_refused(data):
    from fairseq_dp.recording import Recorder

    _, task, model, _ = build(train_args(data))
    model.encoder.lm_head.bias.requires_grad_(True)
    with pytest.raises(ValueError, match="have none: encoder.lm_head.bias"):
        Recorder(model)


def test_parameter_unfrozen_after_build_is_checked_again(data):
    """A head registered or a layer unfrozen after the task built its DP
    trainer (fairseq's load_checkpoint_heads does this) must not train
    silently without per-example clipping."""
    _, task, model, criterion = build(train_args(data))
    first = task.recorder
    norm = model.encoder.sentence_encoder.layers[0].final_layer_norm
    norm.weight.requires_grad_(True)
    task.train_step(batch(task), model, criterion, None, 0)
    assert task.recorder is not first
    assert any(m is norm for _, m, _ in task.recorder.tracked)
    assert norm.weight.grad is not None and torch.isfinite(norm.weight.grad).all()
    # one that no rule covers stops the step
    model.encoder.lm_head.bias.requires_grad_(True)
    with pytest.raises(ValueError, match="lm_head.bias"):
        task.train_step(batch(task), model, criterion, None, 1)


def test_plain_roberta_checkpoint_loads_unchanged(data):
    """roberta_rgp keeps plain RoBERTa's parameter names: a plain fairseq
    `roberta` state dict loads strictly, and gives the same outputs."""
    from fairseq import tasks

    cfg = parse(train_args(data))
    plain_argv = train_args(data, model=["--arch", "roberta", "--encoder-layers", "2",
                                         "--encoder-embed-dim", "32", "--encoder-ffn-embed-dim",
                                         "48", "--encoder-attention-heads", "4"], noise=())
    # the stock task and criterion, without DP flags
    plain_argv = [a.replace("dp_sentence_prediction", "sentence_prediction") for a in plain_argv]
    i = plain_argv.index("--dp-clip-norm")
    del plain_argv[i:i + 2]
    cfg_plain = parse(plain_argv)
    task = tasks.setup_task(cfg.task)
    plain = tasks.setup_task(cfg_plain.task).build_model(cfg_plain.model).double().eval()
    rgp = task.build_model(cfg.model).double().eval()
    rgp.load_state_dict(plain.state_dict(), strict=True)
    tokens = torch.randint(4, 50, (3, 7))
    tokens[:, 0] = 0
    out_plain, _ = plain(tokens, classification_head_name="sentence_classification_head")
    out_rgp, _ = rgp(tokens, classification_head_name="sentence_classification_head")
    assert torch.allclose(out_plain, out_rgp, atol=1e-12)
