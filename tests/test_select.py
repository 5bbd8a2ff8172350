"""fairseq-dp-select: a DP domain classifier picks the in-domain part of a
generated pool; the word budget, the length filter and the random baseline
hold exactly; the classifier's ledger goes with the corpus."""

import collections
import json
import os
import random

import numpy as np
import pytest
import torch
from scipy import stats

from fairseq_dp import select
from fairseq_dp.accounting import PrivacyAccountant, restore_ledger
from fairseq_dp.checkpoint_ledger import LEDGER_FILE, read_ledger, read_ledger_file
from fairseq_dp.data.restaurants import draw_record, realize
from fairseq_dp.data.synthetic import sentiment_sentence
from fairseq_dp.errors import DPConfigError

TINY = ["--encoder-layers", "1", "--encoder-embed-dim", "32", "--encoder-ffn-embed-dim", "64",
        "--encoder-attention-heads", "4", "--classification-pooling", "mean"]


def review(rng):
    return sentiment_sentence(rng.randint(0, 1), rng)


def restaurant(rng):
    return realize(draw_record(rng), rng)


def write_vocab(path, texts):
    """A WordPiece vocab.txt (whole words) and the fairseq dict.txt with the same tokens."""
    from tokenizers.pre_tokenizers import BertPreTokenizer

    pre = BertPreTokenizer()
    counts = collections.Counter(tok for t in texts for tok, _ in pre.pre_tokenize_str(t.lower()))
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "vocab.txt"), "w") as f:
        f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(counts)) + "\n")
    with open(os.path.join(path, "dict.txt"), "w") as f:
        f.writelines(f"{tok} {n}\n" for tok, n in counts.most_common())
    return path


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """Private reviews; a pool of 250 reviews (in-domain) and 750 restaurant
    descriptions, with its source column saying which is which."""
    root = tmp_path_factory.mktemp("select")
    rng = random.Random(3)
    private_train = [review(rng) for _ in range(300)]
    private_dev = [review(rng) for _ in range(60)]
    pool = [("reviews", review(rng)) for _ in range(250)] + [("restaurants", restaurant(rng)) for _ in range(750)]
    rng.shuffle(pool)
    glue = root / "private"
    glue.mkdir()
    for name, rows in (("train.tsv", private_train), ("dev.tsv", private_dev)):
        (glue / name).write_text("sentence\tlabel\n" + "".join(f"{s}\t1\n" for s in rows))
    (root / "pool.tsv").write_text("".join(f"{src}\t{s}\n" for src, s in pool))
    vocab = write_vocab(str(root / "vocab"), private_train + private_dev + [s for _, s in pool])
    return {"root": root, "glue": str(glue), "pool": str(root / "pool.tsv"), "vocab": vocab, "rows": pool}


@pytest.fixture(scope="module")
def selected(generated):
    """One run of stages 1-2 at a generous ε, from scratch on a tiny model."""
    out = str(generated["root"] / "selection")
    budget = 1500
    select.main([
        "--private", generated["glue"], "--pool", generated["pool"], "--out", out, "--words", str(budget),
        "--encoder", generated["vocab"], "--tokenizer", generated["vocab"], "--method", "full",
        "--arch", "roberta_pooled", "--epsilon", "8", "--delta", "1e-5", "--updates", "30",
        "--batch-size", "64", "--micro-batch", "32", "--lr", "3e-3", "--negatives-per-positive", "2",
        "--seed", "2", "--train-flags", *TINY,
    ])
    with open(os.path.join(out, select.SELECTION_FILE)) as f:
        summary = json.load(f)
    return out, summary, budget


def ranked(out):
    with open(os.path.join(out, select.RANKED_FILE)) as f:
        return [line.rstrip("\n").split("\t") for line in f]


def test_classifier_ranks_in_domain_first(generated, selected):
    out, summary, budget = selected
    rows = ranked(out)
    precision = np.mean([source == "reviews" for _, source, _ in rows])
    # the random baseline's expected precision is the in-domain share of eligible words
    words = [(src, select.word_count(s)) for src, s in generated["rows"] if select.word_count(s) >= 6]
    base = sum(w for src, w in words if src == "reviews") / sum(w for _, w in words)
    assert precision >= 0.9 and base < 0.35, (precision, base)
    assert summary["sources"]["reviews"]["share_of_selected_words"] >= 0.9
    # held out: private dev sentences against pool sentences, a quarter of which
    # are reviews too (labelled 0): a perfect domain ranker reaches R-precision
    # 60/90 and AUC 0.875 there, a random one 1/3 and 0.5
    held_out = summary["held_out"]
    assert held_out["r_precision"] > 0.5 and held_out["roc_auc"] > 0.75, held_out


def test_word_budget_and_length_filter_hold_exactly(generated, selected):
    out, summary, budget = selected
    rows = ranked(out)
    lengths = [select.word_count(s) for _, _, s in rows]
    assert min(lengths) >= 6 and sum(lengths) <= budget
    assert summary["selected_words"] == sum(lengths)
    # the selection is a prefix of the ranking: the best eligible sentence left
    # out is the one that would have broken the budget
    chosen = {s for _, _, s in rows}
    scores = [float(score) for score, _, _ in rows]
    assert scores == sorted(scores, reverse=True)
    with open(os.path.join(out, select.CORPUS_FILE)) as f:
        corpus = [line.rstrip("\n") for line in f]
    assert sorted(corpus) == sorted(s for _, _, s in rows)
    assert chosen  # and no eligible sentence outside it scored higher than the last one in:
    classifier = select.Classifier(summary["classifier"])
    from fairseq_dp.prepare_glue import Tokenizer

    left = [s for _, s in generated["rows"] if s not in chosen and select.word_count(s) >= 6]
    left_scores = classifier.score(left, Tokenizer(generated["vocab"]), 32)
    best_left = int(np.argmax(left_scores))
    assert left_scores[best_left] <= min(scores) + 1e-6
    assert sum(lengths) + select.word_count(left[best_left]) > budget


def test_scores_are_the_validation_probabilities(generated, selected):
    """Scoring raw text gives what the classifier's own validation computed
    on the binarized held-out split (same tokens, same pooling)."""
    out, summary, _ = selected
    from fairseq_dp.prepare_glue import Tokenizer, read_tsv

    classifier = select.Classifier(summary["classifier"])
    dev_sentences = read_tsv(os.path.join(out, "classifier", "tsv", "dev.tsv"))[0]
    scores = classifier.score(dev_sentences, Tokenizer(generated["vocab"]), 32, batch_size=7)
    task = classifier.task
    task.load_dataset("valid")
    dataset = task.dataset("valid")
    sample = dataset.collater([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        logits, _ = classifier.model(**sample["net_input"], features_only=True,
                                     classification_head_name=classifier.head)
    expected = torch.softmax(logits.double(), -1)[:, classifier.positive].numpy()
    order = np.argsort(sample["id"].numpy())
    np.testing.assert_allclose(scores, expected[order], atol=1e-5)


def test_ledger_goes_with_the_corpus(selected):
    out, summary, _ = selected
    corpus_ledger, what = read_ledger_file(os.path.join(out, LEDGER_FILE))
    model_ledger = PrivacyAccountant("prv")
    restore_ledger(model_ledger, read_ledger(summary["classifier"]))
    assert corpus_ledger.history == model_ledger.history and len(corpus_ledger.history) == 1
    sigma, q, steps = corpus_ledger.history[0]
    assert steps == 30 and q == pytest.approx(64 / (300 + 600)) and sigma > 0
    assert corpus_ledger.delta == 1e-5 and "classifier" in what
    eps = summary["privacy"]["epsilon"]
    assert 0.97 * 8 <= eps <= 8


def test_random_baseline_is_uniform_and_spends_nothing(generated, tmp_path):
    words = [8] * 40  # equal lengths: every sentence equally likely to be in
    counts = np.zeros(40)
    trials = 2000
    for seed in range(trials):
        chosen = select.select_at_random(words, 80, 6, seed)
        assert len(chosen) == 10
        counts[chosen] += 1
    assert stats.chisquare(counts).pvalue > 1e-3
    out = str(tmp_path / "random")
    select.main(["--pool", generated["pool"], "--out", out, "--words", "1500", "--random"])
    assert not os.path.exists(os.path.join(out, LEDGER_FILE))
    with open(os.path.join(out, select.SELECTION_FILE)) as f:
        summary = json.load(f)
    assert summary["mode"] == "random" and 1500 - 40 < summary["selected_words"] <= 1500


def test_select_by_score_unit():
    scores = [0.9, 0.8, 0.7, 0.95, 0.1]
    words = [6, 7, 8, 3, 6]
    assert select.select_by_score(scores, words, 13, 6) == [0, 1]  # 3-word sentence filtered; 8 > 13-13
    assert select.select_by_score(scores, words, 12, 6) == [0]
    assert select.select_by_score(scores, words, 5, 6) == []


def test_a_rerun_with_other_settings_is_refused_and_leaves_no_corpus(generated, selected, tmp_path, capsys):
    """The classifier in OUT/classifier is reused only for the same settings
    and private data; a failed rerun leaves no corpus without its ledger."""
    import shutil

    out = str(tmp_path / "copy")
    shutil.copytree(selected[0], out)
    with pytest.raises(SystemExit):
        select.main(["--private", generated["glue"], "--pool", generated["pool"], "--out", out, "--words", "1500",
                     "--encoder", generated["vocab"], "--tokenizer", generated["vocab"], "--method", "full",
                     "--arch", "roberta_pooled", "--epsilon", "4", "--delta", "1e-5", "--updates", "30",
                     "--batch-size", "64", "--micro-batch", "32", "--lr", "3e-3", "--negatives-per-positive", "2",
                     "--seed", "2", "--train-flags", *TINY])
    assert "other settings or other private data" in capsys.readouterr().err
    for name in (select.CORPUS_FILE, select.RANKED_FILE, select.SELECTION_FILE, LEDGER_FILE):
        assert not os.path.exists(os.path.join(out, name)), name


def test_user_mistakes_get_messages(generated, selected, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        select.main(["--pool", str(tmp_path / "nope.tsv"), "--out", str(tmp_path / "o"), "--words", "10",
                     "--random"])
    assert e.value.code == 2 and "no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        select.main(["--pool", generated["pool"], "--out", str(tmp_path / "o"), "--words", "10",
                     "--classifier", str(tmp_path / "none.pt"), "--tokenizer", generated["vocab"]])
    assert e.value.code == 2 and "no such file" in capsys.readouterr().err
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(SystemExit) as e:
        select.main(["--pool", generated["pool"], "--out", str(tmp_path / "o"), "--words", "10",
                     "--classifier", str(tmp_path / "junk.pt"), "--tokenizer", generated["vocab"]])
    assert e.value.code == 2 and "not a fairseq checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        select.main(["--pool", generated["pool"], "--out", str(tmp_path / "o"), "--words", "10",
                     "--private", generated["glue"], "--micro-batch", "0"])
    assert e.value.code == 2 and "--micro-batch must be at least 1" in capsys.readouterr().err
    # a classifier without a ledger would let its privacy cost be forgotten
    out, summary, _ = selected
    state = torch.load(summary["classifier"], map_location="cpu", weights_only=False)
    for key in list(state["model"]):
        if key.startswith("dp_ledger"):
            del state["model"][key]
    stripped = str(tmp_path / "stripped.pt")
    torch.save(state, stripped)
    with pytest.raises(SystemExit):
        select.main(["--pool", generated["pool"], "--out", str(tmp_path / "o2"), "--words", "10",
                     "--classifier", stripped, "--tokenizer", generated["vocab"]])
    assert "carries no privacy ledger" in capsys.readouterr().err
