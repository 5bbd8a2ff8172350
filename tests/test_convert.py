"""Checkpoint conversion and GLUE preparation, against HuggingFace ``transformers``.

``transformers`` (a test-only dependency) is the independent implementation:
its BERT/RoBERTa forward passes give the reference hidden states and MLM
logits, and its pure-Python ``BertTokenizer`` (not the ``tokenizers`` library
that ``prepare_glue`` uses) the reference WordPiece tokens.
"""

import json
import os

import pytest
import torch
from fairseq import tasks
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertModel,
    BertTokenizer,
    RobertaConfig,
    RobertaForMaskedLM,
)

from fairseq_dp.convert import build_fairseq_model, convert, fairseq_args, minilm_dir
from fairseq_dp.prepare_glue import Tokenizer, prepare

from helpers import PLUGIN_DIR, parse

SENTENCES = [
    "A gripping, beautifully acted drama that never loses its nerve.",
    "one long string of cliches .",
    "The director's 2nd film is a naïve, over-long mess -- but the café scene works!",
    "If you've ever entertained the notion of doing what the title implies, this may put you off.",
    "Émotion brute 🙂 and 100% worth it",
]


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    out = tmp_path_factory.mktemp("minilm")
    info = convert(minilm_dir(), str(out))
    return str(out), info


@pytest.fixture(scope="module")
def sst_like(tmp_path_factory, minilm):
    """SENTENCES as a binarized single-sentence task (dev = valid split)."""
    glue = tmp_path_factory.mktemp("glue")
    for name in ("train.tsv", "dev.tsv"):
        with open(glue / name, "w") as f:
            f.write("sentence\tlabel\n")
            f.writelines(f"{s}\t{i % 2}\n" for i, s in enumerate(SENTENCES))
    out = tmp_path_factory.mktemp("bin")
    prepare(str(glue), str(out), os.path.join(minilm[0], "dict.txt"), Tokenizer(minilm_dir()))
    return str(out)


def task_model(data, restore, arch_flags, task="dp_sentence_prediction"):
    """The model fairseq-train builds, with the checkpoint loaded the way
    ``--restore-file`` does (strict, after RoBERTa's state-dict upgrade)."""
    argv = [
        data, "--user-dir", PLUGIN_DIR, "--cpu", "--task", task, "--criterion", task,
        "--num-classes", "2", "--init-token", "0", "--separator-token", "2", "--max-positions", "512",
        "--optimizer", "adam", "--lr", "1e-3", "--batch-size", "8", *arch_flags,
    ]
    if task == "dp_sentence_prediction":
        argv += ["--dp-noise-multiplier", "1.0"]
    cfg = parse(argv)
    t = tasks.setup_task(cfg.task)
    t.load_dataset("valid")
    model = t.build_model(cfg.model)
    state = torch.load(restore, weights_only=False)
    model.load_state_dict(state["model"], strict=True, model_cfg=cfg.model)
    return t, model.eval()


def reference_hidden_states(sentences):
    hf = BertModel.from_pretrained(minilm_dir()).eval()
    tok = BertTokenizer.from_pretrained(minilm_dir())
    enc = tok(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = hf(**enc).last_hidden_state
    return enc, out, tok


def fairseq_hidden_states(task, model):
    dataset = task.dataset("valid")
    sample = dataset.collater([dataset[i] for i in range(len(dataset))])
    tokens = sample["net_input"]["src_tokens"]
    with torch.no_grad():
        features, _ = model(tokens, features_only=True)
    return tokens, features


@pytest.mark.parametrize("arch", [["--arch", "roberta_rgp_minilm"], ["--arch", "roberta_pooled_minilm"]],
                         ids=["roberta_rgp_minilm", "roberta_pooled_minilm"])
def test_minilm_hidden_states_match_transformers(minilm, sst_like, arch):
    task, model = task_model(sst_like, os.path.join(minilm[0], "model.pt"), arch)
    tokens, features = fairseq_hidden_states(task, model)
    enc, reference, tok = reference_hidden_states(SENTENCES)

    # the same tokens: the fairseq sample decoded through dict.txt equals the
    # independent tokenizer's [CLS] ... [SEP]
    specials = {"<s>": "[CLS]", "</s>": "[SEP]", "<unk>": "[UNK]"}
    for row, ids in zip(tokens, enc["input_ids"]):
        ours = [specials.get(t, t) for t in (task.source_dictionary[i] for i in row) if t != "<pad>"]
        theirs = [t for t in tok.convert_ids_to_tokens(ids) if t != "[PAD]"]
        assert ours == theirs
    assert "[UNK]" in sum((tok.tokenize(s) for s in SENTENCES), [])  # the emoji

    mask = enc["attention_mask"].bool()
    assert tokens.shape == mask.shape
    difference = (features - reference)[mask].abs().max().item()
    assert difference < 1e-4, difference
    assert reference[mask].abs().max() > 1  # not a trivially small comparison


def test_mean_pooled_head_reads_the_sentence_transformers_embedding(minilm, sst_like):
    """The _minilm archs pool as all-MiniLM-L6-v2 was trained: the head's input is
    sentence-transformers' mean of transformers' states over the attention mask."""
    task, model = task_model(sst_like, os.path.join(minilm[0], "model.pt"), ["--arch", "roberta_rgp_minilm"])
    assert model.args.classification_pooling == "mean"
    flags = minilm[1]["roberta_rgp_flags"]  # what the converter prints for roberta_rgp & co.
    assert flags[flags.index("--classification-pooling") + 1] == "mean"
    tokens, _ = fairseq_hidden_states(task, model)
    head = model.classification_heads["sentence_classification_head"]
    enc, reference, _ = reference_hidden_states(SENTENCES)
    mask = enc["attention_mask"].unsqueeze(-1).to(reference.dtype)
    embedding = (reference * mask).sum(1) / mask.sum(1)
    with torch.no_grad():
        logits, _ = model(tokens, classification_head_name="sentence_classification_head")
        expected = head(embedding.unsqueeze(1))
        first_token = head(reference[:, :1])
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)
    assert (logits - first_token).abs().max() > 1e-3


def test_plain_fairseq_roberta_loads_the_checkpoint_strictly(minilm, sst_like):
    """Plain ``--arch roberta`` with the converted sizes: strict load; its
    LayerNorm epsilon stays fairseq's 1e-5, a small documented difference."""
    task, model = task_model(sst_like, os.path.join(minilm[0], "model.pt"),
                             ["--arch", "roberta", *minilm[1]["fairseq_flags"][:-2]],
                             task="sentence_prediction")
    _, features = fairseq_hidden_states(task, model)
    enc, reference, _ = reference_hidden_states(SENTENCES)
    mask = enc["attention_mask"].bool()
    difference = (features - reference)[mask].abs().max().item()
    assert 1e-5 < difference < 5e-3, difference


def tiny_vocab(kind):
    words = ["the", "movie", "was", "good", "bad", "not", "##s", "##ly", "film", "a", ",", "."]
    if kind == "bert":
        return ["[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    return ["<s>", "<pad>", "</s>", "<unk>"] + ["Ġ" + w for w in words] + words + ["<mask>"]


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_mlm_checkpoint_logits_match_transformers(kind, tmp_path):
    """A random checkpoint with an MLM head and a non-zero type-0 embedding:
    hidden states and MLM logits (permuted into fairseq's vocabulary order)
    equal transformers'."""
    torch.manual_seed(0)
    vocab = tiny_vocab(kind)
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    common = dict(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=24, hidden_act="gelu", layer_norm_eps=1e-12)
    if kind == "bert":
        config = BertConfig(max_position_embeddings=40, type_vocab_size=2, pad_token_id=0, **common)
        hf = BertForMaskedLM(config)
        (hf_dir / "vocab.txt").write_text("\n".join(vocab) + "\n")
    else:
        config = RobertaConfig(max_position_embeddings=42, type_vocab_size=1, pad_token_id=1,
                               bos_token_id=0, eos_token_id=2, **common)
        hf = RobertaForMaskedLM(config)
        (hf_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    with torch.no_grad():  # random init leaves some parts zero; make every tensor matter
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf.save_pretrained(str(hf_dir))
    hf.eval()

    out = tmp_path / "fairseq"
    convert(str(hf_dir), str(out))
    with open(hf_dir / "config.json") as f:
        cfg = json.load(f)
    n_positions = cfg["max_position_embeddings"] - (2 if kind == "roberta" else 0)
    model = build_fairseq_model(fairseq_args(cfg, n_positions), str(out / "dict.txt"), 1e-12)
    model.load_state_dict(torch.load(out / "model.pt", weights_only=False)["model"], strict=True)
    model.eval()

    dictionary = model.encoder.dictionary
    assert len(dictionary) == len(vocab)
    specials = {"[CLS]": "<s>", "[PAD]": "<pad>", "[SEP]": "</s>", "[UNK]": "<unk>", "[MASK]": "<mask>"}
    to_fairseq = torch.tensor([dictionary.index(specials.get(t, t)) for t in vocab])
    assert sorted(to_fairseq.tolist()) == list(range(len(vocab)))

    cls, sep, pad = (3, 4, 0) if kind == "bert" else (0, 2, 1)
    body = torch.randint(6, len(vocab) - 1, (3, 9))
    ids = torch.cat([torch.full((3, 1), cls), body, torch.full((3, 1), sep)], dim=1)
    ids[2, 7:] = pad  # right padding, as fairseq's sentence prediction batches
    mask = ids != pad
    with torch.no_grad():
        reference = hf(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True)
        logits, extra = model(to_fairseq[ids], return_all_hiddens=True)
    hidden = extra["inner_states"][-1].transpose(0, 1)
    assert (hidden - reference.hidden_states[-1])[mask].abs().max() < 1e-5
    reference_logits = reference.logits[..., torch.argsort(to_fairseq)]  # fairseq vocabulary order
    assert (logits - reference_logits)[mask].abs().max() < 1e-4


def test_pairs_are_truncated_longest_first_and_match_the_reference_tokenizer(minilm, tmp_path):
    glue = tmp_path / "qnli"
    glue.mkdir()
    question = "what did the critics say about the long , slow and very quiet second half of the film ?"
    rows = [("is it good ?", "the movie was good .", "entailment"),
            (question, "it was fine .", "not_entailment"),
            ("why ?", "because the acting is wonderful .", "entailment")]
    for name in ("train.tsv", "dev.tsv"):
        with open(glue / name, "w") as f:
            f.write("index\tquestion\tsentence\tlabel\n")
            f.writelines(f"{i}\t{q}\t{s}\t{l}\n" for i, (q, s, l) in enumerate(rows))
    out = tmp_path / "bin"
    max_length = 16
    summary = prepare(str(glue), str(out), os.path.join(minilm[0], "dict.txt"), Tokenizer(minilm_dir()), max_length)
    assert summary["splits"]["valid"]["max_length"] <= max_length

    cfg = parse([str(out), "--user-dir", PLUGIN_DIR, "--task", "sentence_prediction",
                 "--criterion", "sentence_prediction", "--arch", "roberta",
                 "--num-classes", "2", "--init-token", "0", "--separator-token", "2", "--batch-size", "4"])
    task = tasks.setup_task(cfg.task)
    task.load_dataset("valid")
    dataset = task.dataset("valid")
    reference = BertTokenizer.from_pretrained(minilm_dir())
    d = task.source_dictionary
    for i, (q, s, label) in enumerate(rows):
        item = dataset[i]
        tokens = [d[t] for t in item["net_input.src_tokens"]]
        assert len(tokens) <= max_length
        a, b = reference.tokenize(q), reference.tokenize(s)
        while len(a) + len(b) > max_length - 4:
            (a if len(a) >= len(b) else b).pop()
        assert tokens == ["<s>", *a, "</s>", "</s>", *b, "</s>"]
        predicted = task.label_dictionary[item["target"].item() + task.label_dictionary.nspecial]
        assert predicted == label
    assert len(reference.tokenize(question)) > max_length  # the truncation was exercised


def test_hub_encode_with_bert_bpe_gives_the_prepared_tokens(minilm, sst_like):
    """The inference recipe for a converted WordPiece checkpoint:
    ``from_pretrained(..., bpe="bert", bpe_vocab_file=<vocab.txt>)`` makes
    ``hub.encode`` produce exactly the ids that fairseq-dp-prepare-glue wrote
    (with the task's --init-token 0 in front)."""
    from types import SimpleNamespace

    from fairseq.data import Dictionary, data_utils
    from fairseq.data.encoders.hf_bert_bpe import BertBPE, BertBPEConfig
    from fairseq.models.roberta.hub_interface import RobertaHubInterface

    vocab = Dictionary.load(os.path.join(sst_like, "input0", "dict.txt"))
    prepared = data_utils.load_indexed_dataset(os.path.join(sst_like, "input0", "valid"), vocab)
    bpe = BertBPE(BertBPEConfig(bpe_vocab_file=os.path.join(minilm_dir(), "vocab.txt")))
    # the hub's encode needs only these two attributes
    hub = SimpleNamespace(bpe=bpe, task=SimpleNamespace(source_dictionary=vocab))
    plugin_tokenizer = Tokenizer(minilm_dir())
    for i, sentence in enumerate(SENTENCES):
        expected = [vocab.bos()] + prepared[i].tolist()
        assert RobertaHubInterface.encode(hub, sentence).tolist() == expected
        # the recipe without transformers: the plugin's tokenizer and the dictionary
        line = "<s> " + " ".join(plugin_tokenizer([sentence])[0]) + " </s>"
        assert vocab.encode_line(line, append_eos=False, add_if_not_exist=False).tolist() == expected


def test_converted_checkpoint_for_another_arch_is_refused_with_its_flags(minilm, sst_like):
    """--arch roberta_rgp at its default (base) sizes would meet 214 'size
    mismatch' lines; instead one message with the arch of MiniLM's sizes and
    the converter's own flags."""
    from fairseq_dp.checkpoint_fit import check_checkpoint_fits
    from fairseq_dp.errors import DPConfigError

    argv = [sst_like, "--user-dir", PLUGIN_DIR, "--cpu", "--task", "dp_sentence_prediction", "--criterion",
            "dp_sentence_prediction", "--num-classes", "2", "--max-positions", "512", "--batch-size", "8",
            "--dp-noise-multiplier", "1.0", "--arch", "roberta_rgp", "--encoder-layers", "2",
            "--encoder-embed-dim", "32", "--encoder-ffn-embed-dim", "48", "--encoder-attention-heads", "4"]
    cfg = parse(argv)
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    state = torch.load(os.path.join(minilm[0], "model.pt"), weights_only=False)
    flags = " ".join(minilm[1]["roberta_rgp_flags"])
    with pytest.raises(DPConfigError) as refused:
        check_checkpoint_fits(model, state["model"], conversion=state["fairseq_dp_conversion"])
    message = str(refused.value)
    assert "Use --arch roberta_rgp_minilm" in message
    assert flags in message and "--classification-pooling mean" in flags
    assert len(message.splitlines()) < 10
