"""User mistakes end with the message alone and a non-zero exit status, from
fairseq's entry points and from the plugin's own commands; bugs keep their
traceback; the Python API raises DPConfigError with the same text."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from fairseq.trainer import Trainer

from fairseq_dp.checkpoint_fit import fit_message
from fairseq_dp.errors import DPConfigError

from helpers import PLUGIN_DIR, build, data_dir, train_args

BIN = os.path.dirname(sys.executable)
SIZES = ["--encoder-layers", "2", "--encoder-embed-dim", "32", "--encoder-ffn-embed-dim", "48",
         "--encoder-attention-heads", "4"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return data_dir(tmp_path_factory, n_train=32, n_valid=8)


def run(cmd, cwd, expect_ok=False):
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=600)
    out = proc.stdout + proc.stderr
    if expect_ok:
        assert proc.returncode == 0, out[-3000:]
    return proc.returncode, out


def assert_message_only(returncode, out, *messages):
    assert returncode != 0, out[-2000:]
    assert "Traceback" not in out, out[-4000:]
    for message in messages:
        assert message in out, out[-3000:]


def fairseq_train(data, *extra, model=("--arch", "roberta_rgp", *SIZES), noise=("--dp-noise-multiplier", "1.0")):
    return [os.path.join(BIN, "fairseq-train"), *train_args(data, *extra, model=list(model), noise=noise)]


def test_refused_dp_configuration(data, tmp_path):
    rc, out = run(fairseq_train(data, "--fp16", "--dp-target-epsilon", "3", "--save-dir", str(tmp_path)), tmp_path)
    assert_message_only(rc, out, "fairseq-train: error: invalid DP configuration:",
                        "- give exactly one of --dp-noise-multiplier and --dp-target-epsilon",
                        "- --fp16 is not supported with DP")
    # the Python API: the same text, as the typed exception
    with pytest.raises(DPConfigError, match="give exactly one of --dp-noise-multiplier"):
        build(train_args(data, "--fp16", "--dp-target-epsilon", "3", model=["--arch", "roberta_rgp", *SIZES]))


def test_missing_data_directory(tmp_path):
    missing = str(tmp_path / "no_such_dir")
    rc, out = run([sys.executable, "-m", "fairseq_cli.train", *train_args(missing, model=["--arch", "roberta_rgp", *SIZES])],
                  tmp_path)
    assert_message_only(rc, out, f"data directory '{missing}' does not exist")


def save_tiny_checkpoint(data, path, sizes):
    argv = train_args(data, model=["--arch", "roberta_rgp", *sizes], noise=("--dp-noise-multiplier", "0"))
    cfg, task, model, criterion = build(argv, dtype=torch.float32)
    cfg.checkpoint.save_dir = os.path.dirname(path)
    trainer = Trainer(cfg, task, model, criterion)
    trainer.consolidate_optimizer()
    trainer.save_checkpoint(path, {})


WIDE = ["--encoder-layers", "3", "--encoder-embed-dim", "48", "--encoder-ffn-embed-dim", "64",
        "--encoder-attention-heads", "4"]
FIT_LINES = ["Its encoder has 3 layers, embedding dim 48, FFN dim 64",
             "--encoder-layers 3 --encoder-embed-dim 48 --encoder-ffn-embed-dim 64", "convert.json"]


@pytest.mark.parametrize("arch", ["roberta_rgp", "roberta"])
def test_finetune_from_a_checkpoint_that_does_not_fit_the_arch(data, tmp_path, arch):
    checkpoint = str(tmp_path / "wide.pt")
    save_tiny_checkpoint(data, checkpoint, WIDE)
    rc, out = run(fairseq_train(data, "--finetune-from-model", checkpoint, "--save-dir", str(tmp_path / "run"),
                                "--max-update", "1", model=("--arch", arch, *SIZES)), tmp_path)
    assert_message_only(rc, out, f"fairseq-train: error: {checkpoint}: the checkpoint does not fit --arch {arch}",
                        *FIT_LINES)
    assert "size mismatch" not in out
    assert len(out.splitlines()) < 200  # was one line per mismatched tensor


def test_resume_with_flags_that_do_not_fit(data, tmp_path):
    """Resuming checkpoint_last.pt with other sizes: fairseq's load raises its
    own "Cannot load model parameters" from the plugin's error; the hook
    prints both lines."""
    save_dir = tmp_path / "run"
    save_dir.mkdir()
    save_tiny_checkpoint(data, str(save_dir / "checkpoint_last.pt"), WIDE)
    rc, out = run(fairseq_train(data, "--save-dir", str(save_dir), "--max-update", "1"), tmp_path)
    assert_message_only(rc, out, f"Cannot load model parameters from checkpoint {save_dir}/checkpoint_last.pt",
                        "the checkpoint does not fit --arch roberta_rgp", *FIT_LINES)


def test_hydra_finetune_from_a_checkpoint_that_does_not_fit(data, tmp_path):
    checkpoint = str(tmp_path / "wide.pt")
    save_tiny_checkpoint(data, checkpoint, WIDE)
    overrides = [f"task.data={data}", f"common.user_dir={PLUGIN_DIR}", "common.cpu=true", "model._name=roberta_rgp",
                 "++model.encoder_layers=2", "++model.encoder_embed_dim=32", "++model.encoder_ffn_embed_dim=48",
                 "++model.encoder_attention_heads=4", "task.max_positions=64", "dataset.batch_size=8",
                 "dataset.num_workers=0", f"checkpoint.save_dir={tmp_path}/ckpt",
                 f"checkpoint.finetune_from_model={checkpoint}"]
    rc, out = run([os.path.join(BIN, "fairseq-hydra-train"), "--config-dir", os.path.join(PLUGIN_DIR, "config"),
                   "--config-name", "rgp_sst2", *overrides], tmp_path)
    assert_message_only(rc, out, f"{checkpoint}: the checkpoint does not fit --arch roberta_rgp", *FIT_LINES)


def test_missing_finetune_checkpoint(data, tmp_path):
    missing = str(tmp_path / "no_such.pt")
    rc, out = run(fairseq_train(data, "--finetune-from-model", missing, "--save-dir", str(tmp_path / "run")), tmp_path)
    assert_message_only(rc, out, f"--finetune-from-model {missing}: no such checkpoint file")


def test_fit_message_names_the_arch_of_known_sizes():
    minilm = {"layers": 6, "embed_dim": 384, "ffn_dim": 1536, "vocabulary": 30522, "max_positions": 512}
    base = {"layers": 12, "embed_dim": 768, "ffn_dim": 3072, "vocabulary": 30522, "max_positions": 512}
    assert "Use --arch roberta_rgp_minilm" in fit_message("roberta_rgp_base", minilm, base, "e.g.")
    assert "Use --arch roberta_lora_minilm" in fit_message("roberta_lora", minilm, base, "e.g.")
    # fairseq has no roberta_minilm: the flags instead
    assert "Give --encoder-layers 6 --encoder-embed-dim 384" in fit_message("roberta_base", minilm, base, "e.g.")


def test_lora_rank_that_does_not_fit(data):
    """The encoder fits, the adapters do not: the message names the rank."""
    _, task, model, _ = build(train_args(data, model=["--arch", "roberta_lora", *SIZES, "--lora-rank", "4"],
                                         noise=("--dp-noise-multiplier", "0")))
    _, _, other, _ = build(train_args(data, model=["--arch", "roberta_lora", *SIZES, "--lora-rank", "2"],
                                      noise=("--dp-noise-multiplier", "0")))
    with pytest.raises(DPConfigError, match=r"(?s)does not fit --arch roberta_lora.*give --lora-rank 4"):
        other.load_state_dict(model.state_dict(), strict=True)


def test_fairseq_validate_on_a_checkpoint_that_does_not_fit(data, tmp_path):
    checkpoint = str(tmp_path / "wide.pt")
    save_tiny_checkpoint(data, checkpoint, ["--encoder-layers", "3", *SIZES[2:]])
    rc, out = run([os.path.join(BIN, "fairseq-validate"), data, "--path", checkpoint, "--user-dir", PLUGIN_DIR,
                   "--cpu", "--task", "dp_sentence_prediction", "--criterion", "dp_sentence_prediction",
                   "--batch-size", "8", "--model-overrides", "{'encoder_layers': 2}"], tmp_path)
    assert_message_only(rc, out, "fairseq-validate: error: the checkpoint does not fit --arch roberta_rgp",
                        "3 layers in the checkpoint, 2 in the model")


def test_hydra_train_refused_configuration(data, tmp_path):
    overrides = [f"task.data={data}", f"common.user_dir={PLUGIN_DIR}", "common.cpu=true",
                 "task.dp_target_epsilon=5", "++task.dp_noise_multiplier=1", "dataset.batch_size=8",
                 "dataset.num_workers=0", f"checkpoint.save_dir={tmp_path}/ckpt"]
    rc, out = run([os.path.join(BIN, "fairseq-hydra-train"), "--config-dir", os.path.join(PLUGIN_DIR, "config"),
                   "--config-name", "rgp_sst2", *overrides], tmp_path)
    assert_message_only(rc, out, "invalid DP configuration:",
                        "give exactly one of --dp-noise-multiplier and --dp-target-epsilon")


@pytest.mark.parametrize("argv,message", [
    (["-m", "fairseq_dp.convert", "no_such_hf_dir", "out"], "no_such_hf_dir is not a HuggingFace checkpoint directory"),
    (["-m", "fairseq_dp.prepare_glue", "no_such_glue", "out", "--dict", "dict.txt", "--tokenizer", "minilm"],
     "no_such_glue: no such directory"),
    (["-m", "fairseq_dp.merge_lora", "no_such.pt", "merged.pt"], "no_such.pt: no such checkpoint file"),
    (["-m", "fairseq_dp.export", "no_such.pt", "exported.pt"], "no_such.pt: no such checkpoint file"),
])
def test_plugin_commands_usage_mistakes(tmp_path, argv, message):
    rc, out = run([sys.executable, *argv], tmp_path)
    assert_message_only(rc, out, message)


def test_merge_lora_on_a_checkpoint_that_is_not_lora(data, tmp_path):
    checkpoint = str(tmp_path / "rgp.pt")
    save_tiny_checkpoint(data, checkpoint, SIZES)
    rc, out = run([sys.executable, "-m", "fairseq_dp.merge_lora", checkpoint, str(tmp_path / "m.pt")], tmp_path)
    assert_message_only(rc, out, "is not a roberta_lora checkpoint (architecture 'roberta_rgp')")
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    rc, out = run([sys.executable, "-m", "fairseq_dp.merge_lora", str(text), str(tmp_path / "m.pt")], tmp_path)
    assert_message_only(rc, out, "is not a fairseq checkpoint")


def test_console_scripts_of_the_plugin(tmp_path):
    """The installed console scripts (if this environment installed them) take
    the same route."""
    script = os.path.join(BIN, "fairseq-dp-convert")
    if not os.path.exists(script):
        pytest.skip("fairseq-dp-convert is not installed in this environment")
    rc, out = run([script, "no_such_hf_dir", "out"], tmp_path)
    assert_message_only(rc, out, "fairseq-dp-convert: error: no_such_hf_dir is not a HuggingFace")


PROGRAMS = {
    # a bug inside the plugin: the traceback stays
    "bug": """
        import fairseq_dp
        def plugin_code():
            raise KeyError("a bug")
        plugin_code()
    """,
    # fairseq-style wrapping: only the implicit context holds the user error
    "wrapped": """
        import fairseq_dp
        from fairseq_dp.errors import DPConfigError
        try:
            raise DPConfigError("what to change")
        except Exception:
            raise Exception("Cannot load model parameters from checkpoint x.pt")
    """,
    # a worker started by torch.multiprocessing.spawn, as fairseq's call_main does
    "spawned": """
        import torch.multiprocessing
        import fairseq_dp
        from fairseq_dp.errors import DPConfigError
        from fairseq_dp.trainer import PrivacyBudgetExhausted

        def worker(rank):
            try:
                raise DPConfigError("an inner reason")
            except DPConfigError:
                # a subclass of DPConfigError, raised while handling another
                raise PrivacyBudgetExhausted("invalid DP configuration:\\n  - from worker " + str(rank))

        if __name__ == "__main__":
            torch.multiprocessing.spawn(worker, nprocs=1, join=True)
    """,
}


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_excepthook(tmp_path, name):
    script = tmp_path / f"{name}.py"
    script.write_text(textwrap.dedent(PROGRAMS[name]))
    rc, out = run([sys.executable, str(script)], tmp_path)
    assert rc != 0
    if name == "bug":
        assert "Traceback" in out and "KeyError: 'a bug'" in out
    elif name == "wrapped":
        assert_message_only(rc, out, f"{name}.py: error: Cannot load model parameters from checkpoint x.pt\n"
                                     "what to change")
    else:
        assert_message_only(rc, out, "error: invalid DP configuration:\n  - from worker 0")
        assert "an inner reason" not in out
