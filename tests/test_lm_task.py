"""``dp_language_modeling`` through the shared DP engine: the ledger, budget
stop, resume, Poisson sampling of whole examples, its own refusals, and the
data path from fairseq-dp-prepare-lm's GPT-2 BPE to a training run."""

import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from opacus.accountants import RDPAccountant

from fairseq_dp.errors import DPConfigError
from fairseq_dp.trainer import PrivacyBudgetExhausted

from helpers import LM_SIZES, build, lm_data_dir, lm_train_args
from test_end_to_end import run_main, summary_value

N_TRAIN, BATCH = 128, 8
LOG = ["--log-format", "simple", "--log-interval", "1", "--no-epoch-checkpoints"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return lm_data_dir(tmp_path_factory, n_train=N_TRAIN, n_valid=16)


def opacus_rdp_epsilon(sigma, q, steps, delta):
    accountant = RDPAccountant()
    accountant.history = [(sigma, q, steps)]
    return accountant.get_epsilon(delta=delta)


def test_ledger_resume_and_budget_stop(data, tmp_path, caplog):
    """ε in the logs is the reference accountant's at the ledger's updates,
    a resumed run continues the ledger, and --dp-max-epsilon stops at the last
    update within it and refuses to go on."""
    common = ["--save-dir", str(tmp_path), "--dp-accountant", "rdp", *LOG]
    messages = run_main(lm_train_args(data, "--max-update", "3", *common), caplog)
    q = BATCH / N_TRAIN
    assert summary_value(messages, "num_updates") == 3
    assert summary_value(messages, "dp_epsilon") == pytest.approx(opacus_rdp_epsilon(1.0, q, 3, 1e-3), abs=1e-3)
    assert any("valid on 'valid' subset" in m and "dp_epsilon" in m for m in messages)

    messages = run_main(lm_train_args(data, "--max-update", "5", *common), caplog)
    assert summary_value(messages, "num_updates") == 5
    assert summary_value(messages, "dp_epsilon") == pytest.approx(opacus_rdp_epsilon(1.0, q, 5, 1e-3), abs=1e-3)

    budget = opacus_rdp_epsilon(1.0, q, 7, 1e-3) + 1e-3  # room for exactly two more updates
    with_budget = [*common, "--dp-max-epsilon", f"{budget:.6f}"]
    messages = run_main(lm_train_args(data, "--max-update", "50", *with_budget), caplog)
    assert summary_value(messages, "num_updates") == 7
    assert any("privacy budget reached" in m for m in messages)
    with pytest.raises(PrivacyBudgetExhausted, match="budget is spent"):
        run_main(lm_train_args(data, "--max-update", "60", *with_budget), caplog)


def test_poisson_batches_are_whole_examples(data):
    cfg, task, model, criterion = build(lm_train_args(data, "--max-update", "10", "--dp-insecure-seeded-rng"))
    dataset = task.dataset("train")
    itr = task.get_batch_iterator(dataset, max_positions=task.max_positions(), seed=1, epoch=1)
    sizes = []
    for sample in itr.next_epoch_itr(shuffle=True):
        if not sample:
            continue
        ids = sample["id"].tolist()
        assert len(set(ids)) == len(ids)
        sizes.append(len(ids))
        for row, i in enumerate(ids):
            item = dataset.tokens[i].long()
            n = len(item)
            assert torch.equal(sample["target"][row, dataset.loss_start[i]:n], item[dataset.loss_start[i]:])
            assert torch.equal(sample["net_input"]["src_tokens"][row, 1:n], item[:-1])
    # Poisson: the number of examples per batch varies around the expected batch
    assert len(set(sizes)) > 1 and abs(np.mean(sizes) - BATCH) < 3


def test_label_smoothing_matches_its_formula(data):
    eps = 0.1
    cfg, task, model, criterion = build(lm_train_args(data, "--label-smoothing", str(eps), "--dropout", "0"))
    model.eval()
    dataset = task.dataset("train")
    one = dataset.collater([dataset[0]])
    loss, _, log = criterion(model, one)
    logp = F.log_softmax(model(**one["net_input"])[0][0].double(), -1)
    keep = one["target"][0] != task.source_dictionary.pad()
    logp, target = logp[keep], one["target"][0][keep]
    nll = -logp[torch.arange(len(target)), target]
    vocab = logp.shape[-1]
    # fairseq's label smoothing: ε spread over the other classes
    expected = (1 - eps - eps / (vocab - 1)) * nll.sum() - eps / (vocab - 1) * logp.sum()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(log["nll_loss"].double(), nll.sum(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("extra,message", [
    (("--fp16",), "--fp16 is not supported with DP"),
    (("--max-tokens", "100"), "--max-tokens makes batch sizes depend"),
    (("--shorten-method", "random_crop"), "random_crop would cut prompts"),
    (("--sample-break-mode", "complete"), "packs several examples into one sample"),
    (("--label-smoothing", "1.5"), "--label-smoothing must be in [0, 1)"),
    (("--tokens-per-sample", "6"), "longer than --tokens-per-sample 6"),
    (("--decoder-layerdrop", "0.1"), "--decoder-layerdrop skips layers"),
    (("--add-bos-token",), "always starts an example from </s>"),
])
def test_refusals(data, extra, message):
    argv = lm_train_args(data, *extra)
    if "--tokens-per-sample" in extra:  # the later value wins; keep one
        i = argv.index("--tokens-per-sample")
        del argv[i:i + 2]
    with pytest.raises(DPConfigError, match=re.escape(message)):
        cfg, task, model, criterion = build(argv)


def test_truncation_keeps_the_final_eos_and_refuses_prompts_that_fill_the_sample(data):
    def with_limit(limit):
        argv = lm_train_args(data, "--shorten-method", "truncate")
        argv[argv.index("--tokens-per-sample") + 1] = str(limit)
        return argv

    # prompts have up to 6 words, then the separator: a 7-token sample can hold no target
    with pytest.raises(DPConfigError, match="no target token within --tokens-per-sample 7"):
        build(with_limit(7))
    _, task, _, _ = build(with_limit(8))
    dataset = task.dataset("train")
    eos, pad = task.source_dictionary.eos(), task.source_dictionary.pad()
    cut = [i for i in range(len(dataset)) if len(dataset.tokens[i]) > 8]
    assert cut
    for i in cut:
        item = dataset[i]
        assert len(item["target"]) == 8 and item["target"][-1] == eos
        assert torch.equal(item["target"][dataset.loss_start[i]:-1], dataset.tokens[i].long()[dataset.loss_start[i]:7])
        assert (item["target"][:dataset.loss_start[i]] == pad).all()


def test_the_other_dp_tasks_criterion_is_refused(data):
    argv = lm_train_args(data)
    argv[argv.index("--criterion") + 1] = "dp_sentence_prediction"
    with pytest.raises(DPConfigError, match="--task dp_language_modeling needs --criterion dp_language_modeling"):
        build(argv)


def test_lm_criterion_outside_the_dp_task_is_refused(data):
    argv = lm_train_args(data)
    argv[argv.index("dp_language_modeling")] = "language_modeling"
    for flag in ("--dp-clip-norm", "--dp-delta", "--dp-noise-multiplier"):  # not flags of fairseq's task
        i = argv.index(flag)
        del argv[i:i + 2]
    with pytest.raises(DPConfigError, match=r"trains privately only under --task dp_language_modeling \(got --task language_modeling\)"):
        build(argv)


def test_prepare_lm_e2e_csv_then_train(tmp_path, caplog):
    """fairseq-dp-prepare-lm's GPT-2 BPE output trains under dp_language_modeling."""
    csv = tmp_path / "e2e.csv"
    rows = ['mr,ref'] + [f'"name[Place {i}], food[Thai], area[riverside]","Place {i} serves Thai food by the river."'
                         for i in range(40)]
    csv.write_text("\n".join(rows) + "\n")
    dest = tmp_path / "bin"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "fairseq_dp.prepare_lm", "--format", "e2e", "--train", str(csv),
                           "--valid", str(csv), str(csv), "--destdir", str(dest)],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # two validation sets (valid, valid1), as fairseq-preprocess names them
    argv = lm_train_args(str(dest), "--max-update", "2", "--save-dir", str(tmp_path / "ck"), *LOG,
                         "--dp-delta", "1e-3", "--batch-size", "4", "--valid-subset", "valid,valid1")
    messages = run_main(argv, caplog)
    assert summary_value(messages, "num_updates") == 2
    assert math.isfinite(summary_value(messages, "loss"))
    assert any("valid on 'valid1' subset" in m for m in messages)


def test_checkpoint_of_other_sizes_or_untied_gets_a_message(data):
    _, _, small, _ = build(lm_train_args(data))
    wider = lm_train_args(data)
    for flag in ("--decoder-embed-dim", "--decoder-input-dim", "--decoder-output-dim"):
        wider[wider.index(flag) + 1] = "16"
    _, _, other, _ = build(wider)
    with pytest.raises(DPConfigError, match="--decoder-layers 2 --decoder-embed-dim 32 --decoder-input-dim 32"):
        other.load_state_dict(small.state_dict())
    _, _, tied, _ = build(lm_train_args(data, "--share-decoder-input-output-embed"))
    untied_state = small.state_dict()
    assert not untied_state["decoder.embed_tokens.weight"].equal(untied_state["decoder.output_projection.weight"])
    with pytest.raises(DPConfigError, match="drop --share-decoder-input-output-embed"):
        tied.load_state_dict(untied_state)
    # a tied checkpoint loads into an untied model: both start from the embedding
    small.load_state_dict(tied.state_dict())
    assert small.decoder.output_projection.weight.equal(tied.decoder.embed_tokens.weight)


def test_checkpoint_with_other_layers_or_shape_flags_gets_a_message(data):
    _, _, small, _ = build(lm_train_args(data))
    deeper = lm_train_args(data)
    deeper[deeper.index("--decoder-layers") + 1] = "3"
    _, _, other, _ = build(deeper)
    with pytest.raises(DPConfigError, match="weights the checkpoint lacks.*--decoder-layers 2 "):
        other.load_state_dict(small.state_dict())
    # a LoRA model of other depth: its own adapter factors do not count as the checkpoint's layers
    lora = lm_train_args(data, model=["--arch", "transformer_lm_lora", *LM_SIZES])
    lora[lora.index("--decoder-layers") + 1] = "1"
    _, _, lora_model, _ = build(lora)
    with pytest.raises(DPConfigError, match="The checkpoint has 2 layers"):
        lora_model.load_state_dict(small.state_dict(), strict=False)
    sinusoidal = [a for a in lm_train_args(data) if a != "--decoder-learned-pos"]
    _, _, no_learned, _ = build(sinusoidal)
    with pytest.raises(DPConfigError, match="--decoder-learned-pos"):
        no_learned.load_state_dict(small.state_dict())


def test_starting_points_that_would_train_from_random_weights_are_refused(data, tmp_path, caplog):
    import transformers

    hf = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=4)).save_pretrained(hf)
    common = ["--max-update", "1", "--save-dir", str(tmp_path / "ck"), *LOG]
    with pytest.raises(DPConfigError, match="is a directory; give the checkpoint file"):
        run_main(lm_train_args(data, *common, "--finetune-from-model", str(hf)), caplog)
    with pytest.raises(DPConfigError, match="is not a fairseq checkpoint.*fairseq-dp-convert"):
        run_main(lm_train_args(data, *common, "--finetune-from-model", str(hf / "model.safetensors")), caplog)
    torch.save({"transformer.wte.weight": torch.zeros(2, 2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(DPConfigError, match="is not a fairseq checkpoint"):
        run_main(lm_train_args(data, *common, "--finetune-from-model", str(tmp_path / "pytorch_model.bin")), caplog)
    assert not os.path.exists(tmp_path / "ck" / "checkpoint_last.pt")


def test_validation_reads_every_example_with_a_small_batch(tmp_path_factory):
    data = lm_data_dir(tmp_path_factory, n_train=64, n_valid=13, name="small_valid")
    _, task, _, _ = build(lm_train_args(data, "--batch-size", "4"))
    task.load_dataset("valid")
    dataset = task.dataset("valid")
    itr = task.get_batch_iterator(dataset, max_sentences=4, max_positions=task.max_positions(),
                                  required_batch_size_multiple=8)
    seen = [i for sample in itr.next_epoch_itr(shuffle=False) for i in sample["id"].tolist()]
    assert sorted(seen) == list(range(13))


def test_starting_checkpoint_with_other_heads_or_activation_is_refused(data, tmp_path, caplog):
    first = tmp_path / "first"
    run_main(lm_train_args(data, "--max-update", "1", "--save-dir", str(first), *LOG), caplog)
    start = ["--max-update", "1", "--save-dir", str(tmp_path / "second"), *LOG,
             "--finetune-from-model", str(first / "checkpoint_last.pt")]
    other_heads = lm_train_args(data, *start)
    other_heads[other_heads.index("--decoder-attention-heads") + 1] = "8"
    with pytest.raises(DPConfigError, match="decoder_attention_heads is 4 in the checkpoint and 8 here"):
        run_main(other_heads, caplog)
    other_activation = lm_train_args(data, *start)
    other_activation[other_activation.index("gelu_accurate")] = "relu"
    with pytest.raises(DPConfigError, match="--activation-fn gelu_accurate"):
        run_main(other_activation, caplog)
    messages = run_main(lm_train_args(data, *start), caplog)  # the same settings train
    assert summary_value(messages, "num_updates") == 1
