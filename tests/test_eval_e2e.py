"""fairseq-dp-eval-e2e: the E2E challenge's five metrics against values worked
out by hand from their definitions (mteval-v13a BLEU and NIST, METEOR 1.5's
formula, coco-caption's ROUGE-L and CIDEr-D), the pure-Python PTB tokenization
against the Stanford jar, the command line, and a sanity run on the E2E test set.

Java starts twice at most (the METEOR jar loads its paraphrase table each time,
several seconds): once for the METEOR case, once for the test set."""

import json
import math
import os
import shutil
import subprocess
import sys
import time

import pytest

from fairseq_dp import eval_e2e
from fairseq_dp.errors import DPConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTSET = os.path.join(REPO, "..", "shared", "data", "e2e", "testset_w_refs.csv")
HAVE_JAVA = eval_e2e.java_status() is None
needs_java = pytest.mark.skipif(not HAVE_JAVA, reason="java is not installed")
needs_testset = pytest.mark.skipif(not os.path.isfile(TESTSET), reason="shared E2E data absent")

# ---- corpus B: BLEU and NIST by hand (mteval tokens: lowercased, '.' split off)
B_HYPS = ["The cheap pub is near the river.", "Blue Spice serves food."]
B_REFS = [
    ["A cheap pub near the river.", "This pub by the river is very cheap."],
    ["Blue Spice serves good French food.", "Blue Spice is a French restaurant."],
]


def bleu_by_hand() -> float:
    # hyp 1: the cheap pub is near the river .   (8 tokens)
    #   refs: a cheap pub near the river . (7) | this pub by the river is very cheap . (9)
    #   1-grams: 'the' twice but at most once in either reference -> 7 of 8
    #   2-grams: cheap pub, near the, the river, river .            -> 4 of 7
    #   3-grams: near the river, the river .                        -> 2 of 6
    #   4-grams: near the river .                                    -> 1 of 5
    #   closest reference length: 7 and 9 are both 1 away -> the shorter, 7
    # hyp 2: blue spice serves food .   (5 tokens)
    #   refs: blue spice serves good french food . (7) | blue spice is a french restaurant . (7)
    #   1-grams 5 of 5; 2-grams blue spice, spice serves, food . -> 3 of 4
    #   3-grams blue spice serves -> 1 of 3; 4-grams 0 of 2; closest length 7
    hits, totals = [7 + 5, 4 + 3, 2 + 1, 1 + 0], [8 + 5, 7 + 4, 6 + 3, 5 + 2]
    sys_len, ref_len = 13, 7 + 7
    brevity = math.exp(1 - ref_len / sys_len)
    return brevity * math.exp(sum(math.log(h / t) for h, t in zip(hits, totals)) / 4)


def nist_by_hand() -> float:
    # reference counts over the whole corpus: 7 + 9 + 7 + 7 = 30 words;
    # the 2, cheap 2, pub 2, is 2, near 1, river 2, '.' 4, blue 2, spice 2, serves 1, food 1
    log2 = math.log2
    # matched 1-grams, info = log2(30 / count); 'the' counts once (clipped)
    info1 = (log2(30 / 2) * 5  # the, cheap, pub, is, river
             + log2(30 / 1) * 1  # near
             + log2(30 / 4) * 2  # '.' of both hypotheses
             + log2(30 / 2) * 2  # blue, spice
             + log2(30 / 1) * 2)  # serves, food
    # matched 2-grams, info = log2(count(w1) / count(w1 w2)):
    # cheap pub 2/1, near the 1/1, the river 2/2, river . 2/1, blue spice 2/2, spice serves 2/1, food . 1/1
    info2 = 1 + 0 + 0 + 1 + 0 + 1 + 0
    # 3-grams: near the river 1/1, the river . 2/1, blue spice serves 2/1
    info3 = 0 + 1 + 1
    # 4-grams: near the river . 1/1; no 5-gram matches
    info4 = 0
    precision_sum = info1 / 13 + info2 / 11 + info3 / 9 + info4 / 7 + 0 / 5
    # system length 13 against the mean reference lengths (7 + 9) / 2 + (7 + 7) / 2 = 15
    beta = -math.log(0.5) / math.log(1.5) ** 2
    return math.exp(-beta * math.log(13 / 15) ** 2) * precision_sum


# ---- corpus C: ROUGE-L with precision and recall maxed over different references
C_HYPS = ["The pub is near the river.", "Cheap food."]
C_REFS = [["The pub.", "A pub that is near a river in the city centre."], ["cheap food"]]


def f_beta(p: float, r: float, beta: float = 1.2) -> float:
    return (1 + beta ** 2) * p * r / (r + beta ** 2 * p)


def rouge_by_hand() -> float:
    # PTB tokens: the pub is near the river (6) | the pub (2) | a pub that is near a river in the city centre (11)
    # LCS: 2 with 'the pub' (P 2/6, R 2/2), 4 with the long one ('pub is near river', P 4/6, R 4/11)
    first = f_beta(max(2 / 6, 4 / 6), max(2 / 2, 4 / 11))
    return (first + 1.0) / 2  # 'cheap food' is its reference


# ---- corpus D: CIDEr(-D) by hand; every n-gram occurs in one MR's references at most,
# so each idf is log(2 MRs) - log(1) = L, also for n-grams of no reference (df floored at 1)
D_HYPS = ["red blue pink", "cat dog"]
D_REFS = [["red blue green", "red blue"], ["cat dog"]]


def cider_by_hand() -> float:
    # all weights are L, so each cosine is (shared n-grams) / sqrt(|hyp n-grams| * |ref n-grams|)
    vs_first = [2 / 3, 1 / 2, 0, 0]  # red blue green: 1-grams 2 of 3x3, 2-grams 1 of 2x2, no 3-gram shared
    vs_second = [2 / math.sqrt(6), 1 / math.sqrt(2), 0, 0]  # red blue: 3x2 1-grams, 2x1 2-grams
    # Gaussian length penalty, sigma 6: coco-caption's length is the number of 2-grams
    # (2 and 2 for the first reference, 2 and 1 for the second; word counts give the same gaps)
    penalty_second = math.exp(-(1 ** 2) / (2 * 6.0 ** 2))
    mr1 = 10 * (sum(vs_first) / 4 + penalty_second * sum(vs_second) / 4) / 2
    mr2 = 10 * (1 + 1 + 0 + 0) / 4  # identical 2-word texts: 1-gram and 2-gram cosines 1
    return (mr1 + mr2) / 2


# ---- corpus M: METEOR 1.5 (English defaults alpha 0.85, beta 0.2, gamma 0.6), content words only
M_HYPS = ["cheap food riverside pub serves", "cheap food riverside pub"]
M_REFS = [["riverside pub serves cheap food"], ["riverside pub serves cheap food"]]


def meteor_by_hand() -> float:
    # all words match exactly; the corpus score pools the statistics of both MRs:
    # matches 5 + 4 of hypothesis lengths 5 + 4 and reference lengths 5 + 5, chunks 2 + 2
    precision, recall = 9 / 9, 9 / 10
    fmean = precision * recall / (0.85 * precision + 0.15 * recall)
    penalty = 0.6 * (4 / 9) ** 0.2
    return fmean * (1 - penalty)


def rouge_m_by_hand() -> float:
    # LCS 3 of 5 and 5 (riverside pub serves); 2 of 4 and 5 (cheap food)
    return (f_beta(3 / 5, 3 / 5) + f_beta(2 / 4, 2 / 5)) / 2


def test_bleu_nist_by_hand():
    scores = eval_e2e.score_e2e(B_HYPS, B_REFS, java=False)
    assert scores["BLEU"] == pytest.approx(bleu_by_hand(), rel=1e-12)
    assert scores["NIST"] == pytest.approx(nist_by_hand(), rel=1e-12)
    # the tie rule matters: the longer reference (9) would give another brevity penalty
    assert 0 < bleu_by_hand() < 1


def test_rouge_l_takes_the_best_precision_and_recall_separately():
    scores = eval_e2e.score_e2e(C_HYPS, C_REFS, java=False)
    assert scores["ROUGE_L"] == pytest.approx(rouge_by_hand(), rel=1e-12)
    # the per-reference best F would be lower: the test tells the two rules apart
    assert max(f_beta(2 / 6, 1.0), f_beta(4 / 6, 4 / 11)) < rouge_by_hand() - 0.1


def test_cider_by_hand():
    scores = eval_e2e.score_e2e(D_HYPS, D_REFS, java=False)
    assert scores["CIDEr"] == pytest.approx(cider_by_hand(), rel=1e-12)


@needs_java
def test_meteor_formula_and_jar_tokenization():
    scores = eval_e2e.score_e2e(M_HYPS, M_REFS)
    assert scores["skipped"] == []
    assert scores["METEOR"] == pytest.approx(meteor_by_hand(), abs=1e-9)
    assert scores["ROUGE_L"] == pytest.approx(rouge_m_by_hand(), rel=1e-12)
    assert scores["tokenization"]["ROUGE_L"] == eval_e2e.TOKENIZATION_PTB_JAR


def test_missing_java_skips_meteor_and_tokenizes_in_python(tmp_path, monkeypatch, capsys):
    hyps, refs = tmp_path / "hyps.txt", tmp_path / "refs.csv"
    hyps.write_text("\n".join(B_HYPS) + "\n")
    write_csv(refs, B_REFS)
    out = tmp_path / "scores.json"
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH without java
    assert shutil.which("java") is None
    eval_e2e.main([str(hyps), str(refs), "--json", str(out)])
    printed = capsys.readouterr().out
    assert "METEOR: skipped (java not found on the PATH)" in printed
    assert "pure-Python" in printed
    scores = json.loads(out.read_text())
    assert set(eval_e2e.METRICS) <= set(scores)
    assert scores["METEOR"] is None and scores["skipped"] == ["METEOR"]
    assert scores["n_mrs"] == 2 and scores["n_references"] == 4
    assert scores["BLEU"] == pytest.approx(bleu_by_hand(), rel=1e-12)
    assert scores["NIST"] == pytest.approx(nist_by_hand(), rel=1e-12)
    assert f"BLEU: {bleu_by_hand():.4f}" in printed
    assert "tokenization of ROUGE_L, CIDEr: " + eval_e2e.TOKENIZATION_PTB_PYTHON in printed


TRICKY = [
    "It (the pub) is [cheap] {ok}.", "Don't go; it's cannot gonna I'm we'd you've.",
    "e.g. the U.S. Mr. Smith went.", "Costs €20 or $5 or ¥3, 5% off & more <unk> stuff",
    "Wait... what -- really?! 'quoted' \"dq\"", "", "A 3.5 star rating, 1,000 people, 20-25 pounds.",
    "The café's food is good.It is near.", "located in the city center., close to it",
    "It isn’t cheap, it’s near St. John's.", "the price range is £20-£25, or 20£-25",
    "«quote» “smart” ‘single’ – dash — em", "riverside,Travellers Rest Beefeater, near it",
]


@needs_java
@needs_testset
def test_python_ptb_tokenization_matches_the_jar():
    _, refs = eval_e2e.read_e2e_references(TESTSET)
    texts = TRICKY + [ref for group in refs for ref in group]
    jar = eval_e2e._ptb_tokenize_jar({i: [t] for i, t in enumerate(texts)})
    differ = [(t, jar[i][0], eval_e2e.ptb_tokenize_python(t)) for i, t in enumerate(texts)
              if jar[i][0] != eval_e2e.ptb_tokenize_python(t)]
    assert differ == []


def write_csv(path, refs, mrs=None):
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["mr", "ref"])
        for i, group in enumerate(refs):
            for ref in group:
                writer.writerow([mrs[i] if mrs else f"name[MR {i}]", ref])


def test_references_grouped_by_first_appearance(tmp_path):
    path = tmp_path / "refs.csv"
    path.write_text('mr,ref\n"a[1]",one\n"b[2]",two\n"a[1]","three, with Â£20"\n\n"c[3]",four\n', encoding="utf-8")
    mrs, refs = eval_e2e.read_e2e_references(str(path))
    assert mrs == ["a[1]", "b[2]", "c[3]"]
    assert refs == [["one", "three, with £20"], ["two"], ["four"]]
    path.write_text("meaning,text\nx,y\n")
    with pytest.raises(DPConfigError, match="one MR column and one reference column"):
        eval_e2e.read_e2e_references(str(path))


def test_cli_count_mismatch_and_missing_files(tmp_path, capsys):
    hyps, refs = tmp_path / "hyps.txt", tmp_path / "refs.csv"
    hyps.write_text("only one line\n")
    write_csv(refs, B_REFS)
    cases = [
        ([str(hyps), str(refs)], "has 1 lines but"),
        ([str(hyps), str(refs)], "has 2 distinct MRs"),
        ([str(tmp_path / "none.txt"), str(refs)], "none.txt' does not exist"),
        ([str(hyps), str(tmp_path / "none.csv")], "none.csv' does not exist"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            eval_e2e.main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    with pytest.raises(DPConfigError, match="1 hypotheses for 2 MRs"):
        eval_e2e.score_e2e(["x"], B_REFS)


@needs_testset
def test_test_set_first_reference_against_all(tmp_path):
    """Each MR's first reference as its hypothesis, scored against all of its
    references (itself included): every n-gram and every word is matched. Run
    as ``python -m fairseq_dp.eval_e2e``, the way other tools call it."""
    mrs, refs = eval_e2e.read_e2e_references(TESTSET)
    assert len(mrs) == 630 and sum(map(len, refs)) == 4693
    hyps = tmp_path / "first_refs.txt"
    hyps.write_text("\n".join(group[0] for group in refs) + "\n", encoding="utf-8")
    out = tmp_path / "scores.json"
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "fairseq_dp.eval_e2e", str(hyps), TESTSET, "--json", str(out)],
                            capture_output=True, text=True, env=env, timeout=600)
    seconds = time.perf_counter() - start
    assert result.returncode == 0, result.stderr
    print(f"\nE2E test set, first reference of each MR ({seconds:.1f} s with the start):\n{result.stdout}")
    scores = json.loads(out.read_text())
    assert scores["n_mrs"] == 630 and scores["n_references"] == 4693
    # each hypothesis is one of its references: BLEU's n-grams all match with the
    # closest reference length its own, ROUGE-L's LCS is the whole text
    assert scores["BLEU"] == pytest.approx(1.0, abs=1e-12)
    assert scores["ROUGE_L"] == pytest.approx(1.0, abs=1e-12)
    assert scores["NIST"] > 10 and scores["CIDEr"] > 2
    if HAVE_JAVA:
        assert scores["METEOR"] == pytest.approx(1.0, abs=1e-9)  # METEOR gives 1 to exact matches
        assert scores["skipped"] == []
    else:
        assert scores["METEOR"] is None
    assert f"BLEU: {scores['BLEU']:.4f}" in result.stdout
