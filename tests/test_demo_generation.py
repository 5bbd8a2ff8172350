"""``make demo-generation``: its data generator, and one reduced run end to end."""

import csv
import json
import os
import re

import pytest

from fairseq_dp.data import restaurants
from fairseq_dp.demo_generation import main


def read_csv(path):
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["mr", "ref"]
    return rows[1:]


def attributes(mr):
    """The MR's attribute -> value, parsed here with a regex (not restaurants.parse_mr)."""
    pairs = re.findall(r"([A-Za-z ]+)\[([^\]]*)\](?:, |$)", mr)
    assert ", ".join(f"{a}[{v}]" for a, v in pairs) == mr, mr
    return dict(pairs)


def test_generator_is_deterministic_and_test_combinations_are_unseen(tmp_path):
    a = restaurants.write_private_csvs(str(tmp_path / "a"), 600, 100, 40, refs_per_test=4, seed=3)
    b = restaurants.write_private_csvs(str(tmp_path / "b"), 600, 100, 40, refs_per_test=4, seed=3)
    c = restaurants.write_private_csvs(str(tmp_path / "c"), 600, 100, 40, refs_per_test=4, seed=4)
    for split in ("train", "valid", "test"):
        assert open(a[split], "rb").read() == open(b[split], "rb").read()
        assert open(a[split], "rb").read() != open(c[split], "rb").read()
    assert restaurants.public_lines(50, seed=3) == restaurants.public_lines(50, seed=3)
    assert restaurants.public_lines(50, seed=3) != restaurants.public_lines(50, seed=4)

    train, valid, test = (read_csv(a[s]) for s in ("train", "valid", "test"))
    assert (len(train), len(valid), len(test)) == (600, 100, 40 * 4)

    def without_name(mr):
        return frozenset((k, v) for k, v in attributes(mr).items() if k != "name")

    seen = {without_name(mr) for mr, _ in train + valid}
    test_mrs = list(dict.fromkeys(mr for mr, _ in test))
    assert len(test_mrs) == 40
    assert all(without_name(mr) not in seen for mr in test_mrs)
    # each test MR has its references together, all different sentences for the same MR
    for i, mr in enumerate(test_mrs):
        rows = test[4 * i: 4 * (i + 1)]
        assert {m for m, _ in rows} == {mr}
    assert sum(len({r for m, r in test if m == mr}) for mr in test_mrs) > 3 * 40


def test_sentences_say_their_attributes():
    train, _, _ = restaurants.make_private_splits(400, 0, 0, seed=5)
    # what must appear in the sentence for each value (hand-written, not the generator's tables)
    must = {
        "food": lambda v: ["fast food"] if v == "Fast food" else [v],
        "eatType": lambda v: [v],
        "near": lambda v: [v],
        "name": lambda v: [v],
        "area": lambda v: ["city centre", "centre of the city"] if v == "city centre" else ["riverside"],
    }
    for mr, sentence in train:
        record = attributes(mr)
        assert 3 <= len(record) <= 8 and list(record)[0] == "name"
        for attribute, value in record.items():
            if attribute in must:
                assert any(text in sentence for text in must[attribute](value)), (mr, sentence)
            if attribute in ("priceRange", "customer rating") and ("£" in value or "out of" in value):
                assert value in sentence, (mr, sentence)
        assert sentence.startswith(record["name"]) and sentence.endswith(".") and "[" not in sentence


def test_public_text_is_not_the_private_task():
    lines = restaurants.public_lines(300, seed=1)
    assert len(lines) >= 600
    assert not any("[" in line or "]" in line for line in lines)  # no MR anywhere
    # other venues than the private records' (the town's landmarks are public)
    assert not any(name in line for line in lines for name in restaurants.NAMES)
    private = {sentence for _, sentence in restaurants.make_private_splits(300, 0, 0, seed=1)[0]}
    assert not private & set(lines)


def reference_prv_epsilon(sigma, q, steps, delta):
    from prv_accountant import PRVAccountant
    from prv_accountant.privacy_random_variables import PoissonSubsampledGaussianMechanism

    mechanism = PoissonSubsampledGaussianMechanism(sampling_probability=q, noise_multiplier=sigma)
    accountant = PRVAccountant(mechanism, max_self_compositions=steps, eps_error=0.01, delta_error=delta / 1000)
    return accountant.compute_epsilon(delta=delta, num_self_compositions=steps)[2]


def test_quick_demo_end_to_end(tmp_path, capsys):
    out = str(tmp_path / "demo")
    main(["--quick", "--out", out])
    printed = capsys.readouterr().out

    for path in ("public_lm/checkpoint_last.pt", "checkpoints/checkpoint_last.pt", "train.log", "pretrain.log",
                 "data/private/testset_w_refs.csv", "data/public/train.txt", "private-bin/dict.txt"):
        assert os.path.isfile(os.path.join(out, path)), path
    with open(os.path.join(out, "results.json")) as f:
        result = json.load(f)
    mrs = list(dict.fromkeys(mr for mr, _ in read_csv(os.path.join(out, "data/private/testset_w_refs.csv"))))
    for name in ("hyps.txt", "hyps_public.txt"):
        with open(os.path.join(out, name), encoding="utf-8") as f:
            assert len(f.read().split("\n")) == len(mrs) + 1  # one line per test MR
    assert mrs[0] in printed  # the examples

    m = re.search(r"privacy: ε = ([0-9.]+) at δ = ([0-9.e-]+) \(target ε = 8.0\), σ = ([0-9.]+), (\d+) updates "
                  r"of expected batch (\d+) over (\d+) private examples", printed)
    assert m, printed[-2000:]
    eps, delta, sigma, updates, batch, n = (float(g) for g in m.groups())
    assert 0 < eps <= 8.0 and delta == 1e-5 and updates >= 1
    assert (eps, sigma, updates) == (result["epsilon"], result["sigma"], result["updates"])
    # the ε the run reports agrees with an independent accountant on its printed σ, q and updates
    reference = reference_prv_epsilon(sigma, batch / n, int(updates), delta)
    assert reference == pytest.approx(eps, abs=0.05)
    assert re.search(r"BLEU on \d+ unseen test MRs", printed)
    assert 0 <= result["bleu"] <= 100 and 0 <= result["public_bleu"] <= 100


def test_user_mistakes_get_a_message(tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit) as e:
        main(["--quick", "--batch-size", "30", "--micro-batch", "20"])
    assert e.value.code == 2 and "--batch-size must be a multiple of --micro-batch" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--quick", "--test-mrs", "0"])
    assert e.value.code == 2 and "--test-mrs must be at least 1" in capsys.readouterr().err
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    with pytest.raises(SystemExit) as e:
        main(["--quick", "--out", str(not_a_dir)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "is a file" in err and "Traceback" not in err
    # a test set that covers so much that training MRs can hardly be drawn: an error, not an endless loop
    monkeypatch.setattr(restaurants, "MAX_REDRAWS", 1)
    with pytest.raises(restaurants.DPConfigError, match="ask for fewer test MRs"):
        restaurants.make_private_splits(200, 0, 500, refs_per_test=1)
