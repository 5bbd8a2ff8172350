"""The E2E generation benchmark's pipeline at toy scale, on files the test writes
itself: public pre-training, the split by MR, a non-private and a DP fine-tuning
row, decoding and scoring, the JSON and the plot. The figures themselves are
never asserted, only what the pipeline must guarantee (no MR on both sides of
the split, the non-private row logged as not private, the DP row within its
target ε by its own ledger, one hypothesis per test MR)."""

import csv
import gzip
import json
import os
import random

import pytest

from benchmarks.e2e_generation import main, split_by_mr
from fairseq_dp.errors import DPConfigError

NAMES = ["Alimentum", "The Eagle", "Zizzi", "Cotto", "Green Man", "Aromi", "The Mill", "Loch Fyne"]
FOODS = ["Italian", "French", "English", "Japanese", "Chinese", "Indian"]
AREAS = ["city centre", "riverside"]


def toy_e2e(path, n_mrs, refs_per_mr, seed):
    rng = random.Random(seed)
    rows = []
    for i in range(n_mrs):
        name, food, area = NAMES[i % len(NAMES)], rng.choice(FOODS), rng.choice(AREAS)
        mr = f"name[{name}], food[{food}], area[{area}], customer rating[{i}]"
        for k in range(refs_per_mr):
            rows.append((mr, f"{name} serves {food} food in the {area}, rated {i} ({k})."))
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["mr", "ref"])
        writer.writerows(rows)
    return rows


def test_split_by_mr_keeps_every_mr_on_one_side():
    rows = [(f"mr{i // 3}", f"ref{i}") for i in range(60)]  # 20 MRs, 3 references each
    train, valid, n_train, n_valid = split_by_mr(rows, 0.1, seed=3)
    assert (n_train, n_valid) == (18, 2)
    assert len(valid) == 6 and len(train) == 54
    assert not {m for m, _ in train} & {m for m, _ in valid}
    assert sorted(train + valid) == sorted(rows)
    with pytest.raises(DPConfigError):
        split_by_mr(rows, 1.0, seed=3)


def test_toy_pipeline_end_to_end(tmp_path):
    pytest.importorskip("matplotlib")
    e2e = tmp_path / "e2e"
    e2e.mkdir()
    toy_e2e(e2e / "devset.csv", n_mrs=40, refs_per_mr=3, seed=1)
    test_rows = toy_e2e(e2e / "testset_w_refs.csv", n_mrs=6, refs_per_mr=2, seed=2)
    pool = tmp_path / "pool.tsv.gz"
    with gzip.open(pool, "wt") as f:
        for i in range(300):
            f.write(f"toy\tThe restaurant number {i} serves food near the river.\n")
    out = tmp_path / "results" / "e2e.json"
    work = tmp_path / "work"
    argv = [
        "--workdir", str(work), "--out", str(out), "--pool", str(pool), "--e2e-dir", str(e2e),
        "--layers", "1", "--embed-dim", "16", "--ffn-dim", "32", "--heads", "2", "--max-positions", "64",
        "--pretrain-valid-sentences", "20", "--pretrain-tokens-per-sample", "32", "--pretrain-batch-size", "4",
        "--pretrain-max-update", "6", "--pretrain-warmup", "2", "--pretrain-validate-interval", "3",
        "--prepare-workers", "1", "--log-interval", "1",
        "--rows", "nonprivate_full,dp_lora_eps8", "--finetune-epochs", "1", "--batch-size", "4",
        "--update-freq", "2", "--beam", "2", "--max-new-tokens", "8", "--decode-batch-size", "4",
    ]
    main(argv)
    results = json.loads(out.read_text())

    pre = results["pretraining"]
    assert pre["updates_done"] == 6
    assert pre["valid_ppl"] is not None and pre["valid_ppl"] > 1

    # the split: every MR on one side only, all 40 MRs and 120 rows accounted for
    def mrs(name):
        with open(work / "e2e" / name, newline="") as f:
            return [row["mr"] for row in csv.DictReader(f)]
    train_mrs, valid_mrs = mrs("train.csv"), mrs("valid.csv")
    assert not set(train_mrs) & set(valid_mrs)
    assert len(set(train_mrs)) + len(set(valid_mrs)) == 40 and len(train_mrs) + len(valid_mrs) == 120
    assert results["e2e_data"]["valid_mrs"] == 4

    rows = results["rows"]
    assert set(rows) == {"nonprivate_full", "dp_lora_eps8"}
    np_row, dp_row = rows["nonprivate_full"]["training"], rows["dp_lora_eps8"]["training"]
    assert np_row["not_private_logged"] and np_row["epsilon"] == "inf"
    assert not dp_row["not_private_logged"]
    assert 0 < dp_row["ledger_epsilon"] <= 8 * 1.01
    assert dp_row["ledger_updates"] == dp_row["updates"] > 0
    assert np_row["hyperparameters"]["epochs"] == dp_row["hyperparameters"]["epochs"] == 1

    n_test_mrs = len({mr for mr, _ in test_rows})
    for name in rows:
        dec = rows[name]["decoding"]
        assert set(dec["scores"]) >= {"BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"}
        hyps = (work / "decode" / name / f"{n_test_mrs}mrs" / "hyps.txt").read_text().splitlines()
        assert len(hyps) == n_test_mrs
        assert 1 <= len(dec["examples"]) <= 5
    assert results["test"]["mrs"] == n_test_mrs
    assert os.path.getsize(out.with_suffix(".png")) > 0

    # a rerun finds every stage done and changes nothing it recorded
    main(argv)
    again = json.loads(out.read_text())
    assert again["rows"] == results["rows"] and again["pretraining"] == results["pretraining"]
