"""Selective pre-training's step 3: a tiny encoder pre-trained on a corpus
that a DP classifier chose, whose checkpoint fine-tunes with the plugin's
tiny archs and carries the classifier's ledger into the fine-tuning's ε.

Small sizes (``SMALL``) on generated text keep every run to a few updates.
The independent oracles: the pre-trained checkpoint file for the loaded
weights, and Microsoft's ``prv_accountant`` for the composed ε."""

import os
import random
import subprocess
import sys

import pytest
import torch
from fairseq import tasks
from fairseq.distributed import utils as distributed_utils
from fairseq.trainer import Trainer
from fairseq_cli import train
from prv_accountant import PoissonSubsampledGaussianMechanism, PRVAccountant

from fairseq_dp.accounting import PrivacyAccountant, history_from_tensor
from fairseq_dp.checkpoint_ledger import LEDGER_FILE, read_ledger, write_ledger_file
from fairseq_dp.data.synthetic import make_examples, make_synthetic_dataset
from fairseq_dp.errors import DPConfigError
from fairseq_dp.pretrain import (
    check_resumed_ledger,
    finetune_command,
    main as pretrain_main,
    prepare_corpus,
    pretrain_command,
)

from helpers import PLUGIN_DIR, parse
from test_end_to_end import run_main, summary_value

SMALL = ["--encoder-layers", "1", "--encoder-embed-dim", "24", "--encoder-ffn-embed-dim", "32",
         "--encoder-attention-heads", "2"]
LOG = ["--log-format", "simple", "--log-interval", "1"]
# the classifier's ledger that fairseq-dp-select would write
SELECTION = (1.5, 0.05, 20)
DELTA = 1e-5
N_TRAIN = 256


def split_words(texts):
    return [t.split() for t in texts]


@pytest.fixture(scope="module")
def finetune_data(tmp_path_factory):
    return make_synthetic_dataset(str(tmp_path_factory.mktemp("glue")), n_train=N_TRAIN, n_valid=32)


def write_corpus(directory, ledger=True, sentences=None):
    """What fairseq-dp-select writes: selected.txt and the classifier's ledger."""
    os.makedirs(directory, exist_ok=True)
    if sentences is None:
        sentences = [s for s, _ in make_examples(300, random.Random(1))]
    with open(os.path.join(directory, "selected.txt"), "w") as f:
        f.writelines(s + "\n" for s in sentences)
    if not ledger:  # what fairseq-dp-select --random writes: no classifier, no ledger
        with open(os.path.join(directory, "selection.json"), "w") as f:
            f.write('{"mode": "random"}')
    if ledger:
        accountant = PrivacyAccountant("prv")
        accountant.step(noise_multiplier=SELECTION[0], sample_rate=SELECTION[1], num_steps=SELECTION[2])
        accountant.delta = DELTA
        write_ledger_file(os.path.join(directory, LEDGER_FILE), accountant, "the test's domain classifier")
    return str(directory)


@pytest.fixture(scope="module")
def selected_data(tmp_path_factory, finetune_data):
    """The selection's corpus, binarized against the fine-tuning vocabulary."""
    corpus = write_corpus(tmp_path_factory.mktemp("selected"))
    out = str(tmp_path_factory.mktemp("pretrain_data"))
    summary = prepare_corpus(corpus, out, os.path.join(finetune_data, "input0", "dict.txt"), split_words,
                             tokens_per_sample=32)
    assert summary["splits"]["valid"]["lines"] == 3 and summary["splits"]["train"]["lines"] == 297
    assert os.path.isfile(os.path.join(out, LEDGER_FILE))
    return out


def pretrain_argv(data, save_dir, *extra):
    return pretrain_command(data, str(save_dir), 4, batch_size=8, tokens_per_sample=32, cpu=True,
                            extra=[*SMALL, "--num-workers", "0", "--seed", "1", *LOG, *extra])


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, selected_data):
    save_dir = tmp_path_factory.mktemp("pre")
    argv = pretrain_argv(selected_data, save_dir)
    assert argv[argv.index("--task") + 1] == "masked_lm_selected"
    distributed_utils.call_main(parse(argv), train.main)
    # not checkpoint_best.pt: fairseq keeps the best validation loss of a
    # process in a module attribute, across the runs of this one
    return str(save_dir / "checkpoint_last.pt")


def finetune_argv(data, restore, save_dir, arch, *extra, private=True):
    task = "dp_sentence_prediction" if private else "sentence_prediction"
    argv = [
        data, "--user-dir", PLUGIN_DIR, "--cpu", "--task", task, "--criterion", task,
        "--arch", arch, *SMALL, "--num-classes", "2", "--init-token", "0", "--separator-token", "2",
        "--max-positions", "512", "--optimizer", "adam", "--lr", "1e-3", "--lr-scheduler", "fixed",
        "--batch-size", "8", "--seed", "1", "--num-workers", "0", "--max-update", "2",
        "--save-dir", str(save_dir), "--restore-file", restore,
        "--reset-optimizer", "--reset-dataloader", "--reset-meters", "--reset-lr-scheduler", *LOG,
    ]
    if private:
        argv += ["--dp-clip-norm", "1.0", "--dp-delta", str(DELTA)]
    return argv + list(extra)


@pytest.fixture
def loaded_weights(monkeypatch):
    """The model's state right after fairseq's Trainer restored the checkpoint
    (strictly), before any update."""
    loaded = {}
    restore = Trainer.load_checkpoint

    def spy(self, *args, **kwargs):
        out = restore(self, *args, **kwargs)
        loaded.update({k: v.detach().clone() for k, v in self.model.state_dict().items()})
        return out

    monkeypatch.setattr(Trainer, "load_checkpoint", spy)
    return loaded


def reference_epsilon(history, delta):
    """Microsoft's PRV accountant composing every (σ, q, steps) of a ledger."""
    mechanisms = [PoissonSubsampledGaussianMechanism(sampling_probability=q, noise_multiplier=s)
                  for s, q, _ in history]
    steps = [n for _, _, n in history]
    accountant = PRVAccountant(prvs=mechanisms, max_self_compositions=steps, eps_error=0.01,
                               delta_error=delta / 1000)
    return accountant.compute_epsilon(delta=delta, num_self_compositions=steps)[2]


# --------------------------------------------------------------------- (i)
FINETUNE_ARCHS = [
    ("roberta_pooled_tiny", ["--dp-noise-multiplier", "1.0"], True),
    ("roberta_lora_tiny", ["--dp-noise-multiplier", "1.0", "--lora-rank", "2"], True),
    ("roberta_rgp_tiny", ["--dp-noise-multiplier", "1.0", "--rgp-rank", "2"], True),
    ("roberta_pooled_tiny", ["--non-private-baseline"], False),
    ("roberta", [], False),  # stock fairseq: its own arch, task and criterion
]


@pytest.mark.parametrize("arch,extra,private", FINETUNE_ARCHS,
                         ids=["pooled", "lora", "rgp", "pooled-nonprivate", "stock-roberta"])
def test_pretrained_checkpoint_loads_strictly_into_fine_tuning(
        pretrained, finetune_data, tmp_path, caplog, loaded_weights, arch, extra, private):
    run_main(finetune_argv(finetune_data, pretrained, tmp_path, arch, *extra, private=private), caplog)
    assert (tmp_path / "checkpoint_last.pt").exists()
    saved = torch.load(pretrained, weights_only=False)["model"]
    assert all(k.startswith("encoder.") for k in saved)  # no ledger among the weights
    assert any(k.endswith("layers.0.fc1.weight") for k in saved)
    for name, value in saved.items():
        assert torch.equal(loaded_weights[name], value), name


def test_tiny_archs_have_the_published_sizes(finetune_data):
    def model_cfg(*flags):
        return parse([finetune_data, "--user-dir", PLUGIN_DIR, "--task", "sentence_prediction", "--criterion",
                      "sentence_prediction", "--num-classes", "2", "--optimizer", "adam", "--lr", "1e-3",
                      *flags]).model

    for arch in ("roberta_tiny", "roberta_pooled_tiny", "roberta_lora_tiny", "roberta_rgp_tiny"):
        model = model_cfg("--arch", arch)
        sizes = [model.encoder_layers, model.encoder_embed_dim, model.encoder_attention_heads,
                 model.encoder_ffn_embed_dim, model.max_positions]
        assert sizes == [4, 312, 12, 1200, 512], arch
        if arch != "roberta_tiny":  # fairseq's own model has no such options
            assert model.layer_norm_eps == 1e-5 and model.classification_pooling == "mean", arch
    flagged = model_cfg("--arch", "roberta_pooled_tiny", "--classification-pooling", "cls")
    assert flagged.classification_pooling == "cls"


# --------------------------------------------------------------------- (ii), (iii)
def test_fine_tuning_ledger_starts_with_the_selection(pretrained, finetune_data, tmp_path, caplog):
    assert read_ledger(pretrained) is not None  # kept in the task state
    messages = run_main(finetune_argv(finetune_data, pretrained, tmp_path, "roberta_rgp_tiny",
                                      "--dp-noise-multiplier", "1.0", "--rgp-rank", "2",
                                      "--max-update", "4"), caplog)
    assert any("keeps its privacy ledger in its task state" in m for m in messages)
    history = history_from_tensor(read_ledger(str(tmp_path / "checkpoint_last.pt"))["dp_ledger"])
    assert history == [SELECTION, (1.0, 8 / N_TRAIN, 4)]
    reported = summary_value(messages, "dp_epsilon")
    reference = reference_epsilon(history, DELTA)
    assert reported == pytest.approx(reference, rel=0.03)
    assert reported > reference_epsilon([SELECTION], DELTA) + 0.1  # the fine-tuning's own share counts


def test_target_epsilon_is_the_total_with_the_selection(pretrained, finetune_data, tmp_path, caplog):
    target = round(reference_epsilon([SELECTION], DELTA) + 1.0, 2)
    messages = run_main(finetune_argv(finetune_data, pretrained, tmp_path, "roberta_pooled_tiny",
                                      "--dp-target-epsilon", str(target), "--max-update", "4"), caplog)
    reported = summary_value(messages, "dp_epsilon")
    assert 0.97 * target <= reported <= target
    history = history_from_tensor(read_ledger(str(tmp_path / "checkpoint_last.pt"))["dp_ledger"])
    assert history[0] == SELECTION and history[1][2] == 4
    assert reference_epsilon(history, DELTA) == pytest.approx(reported, rel=0.03)


# --------------------------------------------------------------------- (iv)
def test_plain_masked_lm_on_a_selected_corpus_keeps_its_ledger(selected_data, finetune_data, tmp_path, caplog):
    argv = pretrain_argv(selected_data, tmp_path / "pre")
    argv[argv.index("--task") + 1] = "masked_lm"  # stock fairseq's task: no ledger in its checkpoint
    run_main(argv, caplog)
    plain = str(tmp_path / "pre" / "checkpoint_last.pt")
    assert read_ledger(plain) is None
    messages = run_main(finetune_argv(finetune_data, plain, tmp_path / "ft", "roberta_pooled_tiny",
                                      "--dp-noise-multiplier", "1.0"), caplog)
    assert any("adopting that ledger" in m and LEDGER_FILE in m for m in messages)
    history = history_from_tensor(read_ledger(str(tmp_path / "ft" / "checkpoint_last.pt"))["dp_ledger"])
    assert history == [SELECTION, (1.0, 8 / N_TRAIN, 2)]


# --------------------------------------------------------------------- (v) and user mistakes
def test_masked_lm_selected_needs_the_selection_ledger(finetune_data, tmp_path):
    corpus = write_corpus(tmp_path / "public", ledger=False)
    data = str(tmp_path / "data")
    summary = prepare_corpus(corpus, data, os.path.join(finetune_data, "input0", "dict.txt"), split_words)
    assert summary["selection_ledger"] is None
    argv = pretrain_argv(data, tmp_path / "ck")
    assert argv[argv.index("--task") + 1] == "masked_lm"  # a public corpus: fairseq's own task
    argv[argv.index("--task") + 1] = "masked_lm_selected"
    with pytest.raises(DPConfigError, match=r"dp_ledger\.pt is missing.*plain --task masked_lm"):
        tasks.setup_task(parse(argv).task)


def test_a_selection_that_lost_its_ledger_is_refused(finetune_data, tmp_path):
    """A selection directory without its ledger (an interrupted rerun of
    fairseq-dp-select removes it first) must not pass for public text."""
    corpus = write_corpus(tmp_path / "sel")
    os.remove(os.path.join(corpus, LEDGER_FILE))
    with pytest.raises(DPConfigError, match="no dp_ledger.pt"):
        prepare_corpus(corpus, str(tmp_path / "data"), os.path.join(finetune_data, "input0", "dict.txt"),
                       split_words)


def test_continuing_weights_on_a_corpus_with_another_ledger_is_refused(pretrained, selected_data, finetune_data,
                                                                       tmp_path):
    save_dir = os.path.dirname(pretrained)
    check_resumed_ledger(save_dir, selected_data)  # the same selection: fairseq may continue
    public = prepare_corpus(write_corpus(tmp_path / "public", ledger=False), str(tmp_path / "public-data"),
                            os.path.join(finetune_data, "input0", "dict.txt"), split_words)
    assert public["selection_ledger"] is None
    with pytest.raises(DPConfigError, match="Use a new OUT_DIR"):
        check_resumed_ledger(save_dir, str(tmp_path / "public-data"))


def test_pretrain_command_line_reports_user_mistakes(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        pretrain_main([str(tmp_path / "nowhere"), str(tmp_path / "out"), "--dict", str(tmp_path / "dict.txt"),
                       "--max-update", "2"])
    assert stop.value.code == 2
    assert "no such file or directory" in capsys.readouterr().err
    corpus = write_corpus(tmp_path / "sel")
    with pytest.raises(SystemExit) as stop:
        pretrain_main([corpus, str(tmp_path / "out"), "--dict", str(tmp_path / "dict.txt"), "--max-update", "2"])
    assert stop.value.code == 2
    assert "fairseq-dp-convert" in capsys.readouterr().err


def test_command_line_pretrains_on_minilm_wordpiece(tmp_path):
    """The whole command, as a user runs it: MiniLM's tokenizer and vocabulary
    (dict.txt as fairseq-dp-convert writes it), the ledger copied, a
    checkpoint, and the fine-tuning command printed."""
    from fairseq_dp.convert import fairseq_vocabulary, minilm_dir, read_vocabulary

    _, tokens = fairseq_vocabulary(read_vocabulary(minilm_dir(), "bert"), "bert")
    dict_path = tmp_path / "dict.txt"
    dict_path.write_text("".join(f"{t} 1\n" for t in tokens), encoding="utf-8")
    sentences = ["the movie was wonderful .", "an utterly boring plot !"] * 20
    corpus = write_corpus(tmp_path / "sel", sentences=sentences)
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "fairseq_dp.pretrain", corpus, str(out), "--dict", str(dict_path),
         "--max-update", "2", "--batch-size", "4", "--tokens-per-sample", "32", "--cpu", *SMALL,
         "--num-workers", "0"],
        capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "data" / LEDGER_FILE).exists()
    assert "masked_lm_selected: the corpus was chosen by the test's domain classifier" in done.stdout + done.stderr
    raw = (out / "data" / "raw" / "train.txt").read_text().split()
    assert "wonderful" in raw and "[UNK]" not in raw
    checkpoint = out / "checkpoints" / "checkpoint_last.pt"
    assert checkpoint.exists() and read_ledger(str(checkpoint)) is not None
    printed = finetune_command(str(checkpoint), size_flags=SMALL, delta=DELTA)
    assert printed in done.stdout
    assert "--encoder-layers 1 --encoder-embed-dim 24" in printed
