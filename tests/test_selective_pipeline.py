"""The whole selective pre-training pipeline at toy scale, through its
commands: fairseq-dp-select (DP classifier, scoring, selection) ->
fairseq-dp-pretrain (masked LM from scratch) -> DP fine-tuning with a total
target ε. The final checkpoint's ledger holds both private stages, and its
ε is the reference accountant's composition of them."""

import os
import random

import pytest
from prv_accountant import PoissonSubsampledGaussianMechanism, PRVAccountant

from fairseq_dp import pretrain, select
from fairseq_dp.accounting import PrivacyAccountant, restore_ledger
from fairseq_dp.checkpoint_ledger import read_ledger, read_ledger_file
from fairseq_dp.data.synthetic import write_sentiment_tsv
from fairseq_dp.prepare_glue import Tokenizer, prepare

from test_end_to_end import run_main
from test_select import TINY, restaurant, review, write_vocab

SIZES = TINY[:8]  # the encoder sizes, without the pooling flag
DELTA = 1e-5
TOTAL = 6.0


def reference_epsilon(history, delta):
    mechanisms = [PoissonSubsampledGaussianMechanism(sampling_probability=q, noise_multiplier=s)
                  for s, q, _ in history]
    # eps_error 0.01 fails its own discretisation check at this σ (≈ 0.66)
    accountant = PRVAccountant(prvs=mechanisms, max_self_compositions=[n for _, _, n in history],
                               eps_error=0.05, delta_error=delta / 1000)
    _, _, upper = accountant.compute_epsilon(delta=delta, num_self_compositions=[n for _, _, n in history])
    return upper


def test_select_pretrain_finetune(tmp_path, caplog):
    rng = random.Random(5)
    private = write_sentiment_tsv(str(tmp_path / "private"), n_train=300, n_dev=60, seed=5)
    pool = [("reviews", review(rng)) for _ in range(200)] + [("restaurants", restaurant(rng)) for _ in range(600)]
    rng.shuffle(pool)
    (tmp_path / "pool.tsv").write_text("".join(f"{src}\t{s}\n" for src, s in pool))
    texts = [s for _, s in pool] + open(os.path.join(private, "train.tsv")).read().split("\n")
    vocab = write_vocab(str(tmp_path / "vocab"), texts + open(os.path.join(private, "dev.tsv")).read().split("\n"))
    dict_txt = os.path.join(vocab, "dict.txt")

    # 1-2: the DP classifier chooses 1,200 words of the pool
    selection = str(tmp_path / "selection")
    select.main(["--private", private, "--pool", str(tmp_path / "pool.tsv"), "--out", selection,
                 "--words", "1200", "--encoder", vocab, "--tokenizer", vocab, "--method", "full",
                 "--arch", "roberta_pooled", "--epsilon", "2", "--delta", str(DELTA), "--updates", "20",
                 "--batch-size", "64", "--micro-batch", "32", "--lr", "3e-3", "--negatives-per-positive", "2",
                 "--train-flags", *TINY])
    classifier_ledger, _ = read_ledger_file(os.path.join(selection, "dp_ledger.pt"))
    assert len(classifier_ledger.history) == 1

    # 3: masked-LM pre-training from scratch on the selection
    pre = str(tmp_path / "pre")
    pretrain.main([selection, pre, "--dict", dict_txt, "--tokenizer", vocab, "--max-update", "4",
                   "--batch-size", "8", "--tokens-per-sample", "32", "--cpu", *SIZES,
                   "--num-workers", "0", "--log-format", "simple"])
    checkpoint = os.path.join(pre, "checkpoints", "checkpoint_last.pt")
    assert os.path.exists(checkpoint)

    # 4: DP fine-tuning on the private task, the total budget given
    glue_bin = str(tmp_path / "glue-bin")
    prepare(private, glue_bin, dict_txt, Tokenizer(vocab), 32)
    save_dir = str(tmp_path / "ft")
    run_main([
        glue_bin, "--user-dir", os.path.dirname(select.__file__), "--cpu", "--task", "dp_sentence_prediction",
        "--criterion", "dp_sentence_prediction", "--arch", "roberta_pooled_tiny", *SIZES,
        "--finetune-from-model", checkpoint, "--num-classes", "2", "--init-token", "0", "--separator-token", "2",
        "--max-positions", "512", "--optimizer", "adam", "--lr", "1e-3", "--lr-scheduler", "fixed",
        "--batch-size", "16", "--update-freq", "2", "--max-update", "5", "--seed", "1", "--num-workers", "0",
        "--dp-clip-norm", "1.0", "--dp-delta", str(DELTA), "--dp-target-epsilon", str(TOTAL),
        "--save-dir", save_dir, "--log-format", "simple",
    ], caplog)
    final = PrivacyAccountant("prv")
    restore_ledger(final, read_ledger(os.path.join(save_dir, "checkpoint_last.pt")))
    assert final.history[0] == classifier_ledger.history[0]
    assert len(final.history) == 2 and final.history[1][2] == 5 and final.history[1][1] == pytest.approx(32 / 300)
    eps = final.get_epsilon(DELTA)
    assert 0.97 * TOTAL <= eps <= TOTAL
    assert eps == pytest.approx(reference_epsilon(final.history, DELTA), rel=0.03)
    # the classifier alone spent less than the total: the fine-tuning had room
    assert classifier_ledger.get_epsilon(DELTA) < 0.8 * TOTAL
