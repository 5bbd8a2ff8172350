# Copyright (c) fairseq_dp contributors. MIT license.
"""``fairseq-dp-eval-e2e``: the five metrics of the E2E NLG challenge, offline.

Scores generated restaurant descriptions against the E2E references the way the
challenge's official script (``measure_scores.py`` of tuetschek/e2e-metrics) does
with a plain-text system output, and prints BLEU, NIST, METEOR, ROUGE_L and CIDEr
on that script's scales (BLEU, METEOR and ROUGE_L in [0, 1], NIST around 0-10+,
CIDEr around 0-10)::

    fairseq-dp-eval-e2e outputs.txt ../shared/data/e2e/testset_w_refs.csv --json scores.json

The references are the E2E CSV (header ``mr,ref``, one row per reference); rows
are grouped by MR, in the order the MRs first appear (the official script groups
consecutive rows of the same MR; in the E2E files each MR's rows are consecutive,
so both give the same groups). The hypotheses file has one line per MR, in that
order (every line counts, an empty one too). As the official script does, each
hypothesis is stripped of surrounding whitespace and the reference text gets its
fixes for mis-encoded characters (``Ł``, ``Â£`` -> ``£``, ``Ã©``, ``ã©`` -> ``é``).

What is replicated, metric by metric:

- BLEU: mteval-v13a's corpus BLEU as the official script's Python MTEval
  (``measure_scores.py -p``, ``metrics/pymteval.py``) computes it: mteval-v13a
  tokenization, case-insensitive, n-grams up to 4, each n-gram's count clipped
  by its largest count in any one reference of the MR, brevity penalty from the
  reference closest in length to each hypothesis (the shorter one on a tie),
  summed over the corpus. Computed by sacrebleu (``tokenize="13a"``,
  ``lowercase=True``); its ``floor`` smoothing with 1e-15 is pymteval's own
  floor for an n-gram order without any match.
- NIST: mteval-v13a's NIST as pymteval computes it, n-grams up to 5: the
  information weight of an n-gram is log2(count of its first n-1 words / count
  of the n-gram) over all references of the corpus (the count of the empty
  prefix is the number of reference words), hits clipped as for BLEU, each
  order's information sum divided by the number of hypothesis n-grams of that
  order, times the NIST brevity penalty exp(-beta * log(min(1, L_sys /
  L_ref))^2) with beta = -log(0.5) / log(1.5)^2 and L_ref the sum over MRs of
  their mean reference length. Implemented here on sacrebleu's 13a tokenizer:
  no maintained package computes this multi-reference form (nltk's
  ``corpus_nist`` scores each hypothesis against its single best reference and
  uses that reference's length; it agrees with this one only with one
  reference per MR).
- METEOR, ROUGE_L, CIDEr: the MS-COCO caption evaluation's scorers from
  ``pycocoevalcap`` (METEOR 1.5 jar with ``-l en -norm``, ROUGE-L as an
  F-measure with beta = 1.2 of the best precision and best recall over the
  references, CIDEr as coco-caption computes it, i.e. CIDEr-D with sigma = 6,
  clipping and x10), after the Stanford PTBTokenizer of the same package
  (lowercased, punctuation tokens removed), exactly as the official script runs
  them (without pycocotools, which only carries the data there).

Java: the PTBTokenizer and METEOR are Java programs. Without a working ``java``
on the PATH, METEOR is skipped (reported as skipped, value null) and the PTB
tokenization falls back to :func:`ptb_tokenize_python`, a pure-Python
imitation of the jar's output (it gives the jar's output for all 9,365
references of the E2E dev and test sets); ROUGE_L and CIDEr are then computed
from that. The output says which tokenization each metric used.

Known differences from the official script:

- The Perl mteval route (the script's default without ``-p``) is not run;
  pymteval's own notes say its NIST differs from the edited Perl script when
  MRs have different numbers of references.
- Hypothesis n-gram totals are the real counts (sacrebleu, mteval's Perl), where
  pymteval subtracts n-1 from every hypothesis' length even below zero: BLEU and
  NIST differ only for hypotheses shorter than 4 (BLEU) or 5 (NIST) tokens.
- An empty hypothesis has no tokens here; pymteval counts it as one empty token.
  With no match at all BLEU is 0 here, about 1e-15 there.
- The hypotheses file is read as UTF-8 lines (``str.splitlines``, like the
  script's codecs reader); the reference file with Python's csv reader, which
  also reads quoted fields spanning lines (the script would not).
"""

import argparse
import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter, defaultdict
from typing import Dict, List, Optional, Sequence, Tuple

from .errors import DPConfigError

PROG = "fairseq-dp-eval-e2e"
METRICS = ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr")

# the official script's header patterns for the MR and the reference column
HEADER_MR = re.compile(r"(mr|src|source|meaning(?:[_ .-]rep(?:resentation)?)?|da|dial(?:ogue)?[_ .-]act)s?$", re.I)
HEADER_REF = re.compile(r"(trg|tgt|target|ref(?:erence)?|human(?:[_ .-](?:ref(?:erence)?))?)s?$", re.I)
# the official script's repairs of mis-encoded characters in the reference file
ENCODING_FIXES = (("Ł", "£"), ("Â£", "£"), ("Ã©", "é"), ("ã©", "é"))

BLEU_ORDER = 4
NIST_ORDER = 5
# mteval-v13a: the brevity penalty is 0.5 when the output is 2/3 of the reference length
NIST_BETA = -math.log(0.5) / math.log(1.5) ** 2
# pymteval's floor for an n-gram order without any match (BLEU stays defined)
BLEU_FLOOR = 1e-15

TOKENIZATION_MTEVAL = "mteval-v13a (sacrebleu 13a tokenizer), lowercased"
TOKENIZATION_PTB_JAR = "Stanford PTBTokenizer jar of pycocoevalcap, lowercased, punctuation removed"
TOKENIZATION_PTB_PYTHON = "pure-Python imitation of the PTBTokenizer (no Java), lowercased, punctuation removed"


# ---------------------------------------------------------------- reading


def read_e2e_references(path: str) -> Tuple[List[str], List[List[str]]]:
    """The MRs of an E2E CSV (header ``mr,ref``) in the order they first
    appear, and the references of each, in file order."""
    if not os.path.isfile(path):
        raise DPConfigError(f"references file {path!r} does not exist (give the E2E CSV, e.g. testset_w_refs.csv)")
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            rows = [row for row in csv.reader(f) if any(field.strip() for field in row)]
    except UnicodeDecodeError as e:
        raise DPConfigError(f"references file {path!r} is not UTF-8 text: {e}") from None
    except csv.Error as e:
        raise DPConfigError(f"references file {path!r} is not a readable CSV: {e}") from None
    if not rows:
        raise DPConfigError(f"references file {path!r} is empty")
    header = [field.strip() for field in rows[0]]
    mr_cols = [i for i, name in enumerate(header) if HEADER_MR.match(name)]
    ref_cols = [i for i, name in enumerate(header) if HEADER_REF.match(name)]
    if len(mr_cols) != 1 or len(ref_cols) != 1:
        raise DPConfigError(
            f"references file {path!r} needs a header with one MR column and one reference column "
            f"(the E2E CSV's 'mr,ref'); its first row is {rows[0]!r}"
        )
    mr_col, ref_col = mr_cols[0], ref_cols[0]
    groups: Dict[str, List[str]] = {}
    for line_no, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise DPConfigError(
                f"references file {path!r}: row {line_no} has {len(row)} fields, the header {len(header)}"
            )
        mr, ref = row[mr_col].strip(), row[ref_col].strip()
        for wrong, right in ENCODING_FIXES:
            mr, ref = mr.replace(wrong, right), ref.replace(wrong, right)
        groups.setdefault(mr, []).append(ref)
    if not groups:
        raise DPConfigError(f"references file {path!r} has a header but no references")
    mrs = list(groups)
    return mrs, [groups[mr] for mr in mrs]


def read_hypotheses(path: str) -> List[str]:
    """One hypothesis per line, stripped (an empty line is an empty hypothesis)."""
    if not os.path.isfile(path):
        raise DPConfigError(f"hypotheses file {path!r} does not exist (give one generated text per line)")
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise DPConfigError(f"hypotheses file {path!r} is not UTF-8 text: {e}") from None
    return [line.strip() for line in text.splitlines()]


# ---------------------------------------------------------------- BLEU and NIST (mteval-v13a)


def mteval_bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU in [0, 1], mteval-v13a tokenization, case-insensitive."""
    from sacrebleu.metrics import BLEU

    # sacrebleu takes reference streams; None pads MRs with fewer references
    n_streams = max(len(refs) for refs in references)
    streams = [[refs[k] if k < len(refs) else None for refs in references] for k in range(n_streams)]
    bleu = BLEU(lowercase=True, tokenize="13a", smooth_method="floor", smooth_value=BLEU_FLOOR, force=True)
    score = bleu.corpus_score(list(hypotheses), streams).score / 100.0
    # sacrebleu works in percent through exp(mean log): all n-grams matched can
    # come out as 1 + 4e-16, which is 1
    return min(score, 1.0)


def _mteval_tokens(text: str) -> List[str]:
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    tokenizer = getattr(_mteval_tokens, "tokenizer", None)
    if tokenizer is None:
        tokenizer = _mteval_tokens.tokenizer = Tokenizer13a()
    # pymteval lowercases the tokens; the 13a rules do not depend on case
    return tokenizer(text.rstrip()).lower().split()


def _ngrams(tokens: List[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def mteval_nist(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus NIST (n-grams up to 5), mteval-v13a tokenization, case-insensitive."""
    ref_counts = [Counter() for _ in range(NIST_ORDER + 1)]  # [0] holds the empty prefix
    hits = [[] for _ in range(NIST_ORDER)]  # per order: one {n-gram: clipped hits} per MR
    hyp_totals = [0] * NIST_ORDER
    hyp_len = 0
    ref_len = 0.0
    for hyp, refs in zip(hypotheses, references):
        hyp_tokens = _mteval_tokens(hyp)
        ref_tokens = [_mteval_tokens(ref) for ref in refs]
        hyp_len += len(hyp_tokens)
        ref_len += sum(len(tokens) for tokens in ref_tokens) / len(ref_tokens)
        ref_counts[0][()] += sum(len(tokens) for tokens in ref_tokens)
        for n in range(1, NIST_ORDER + 1):
            per_ref = [_ngrams(tokens, n) for tokens in ref_tokens]
            for counts in per_ref:
                ref_counts[n].update(counts)
            hyp_ngrams = _ngrams(hyp_tokens, n)
            hyp_totals[n - 1] += sum(hyp_ngrams.values())
            clipped = {g: min(c, max(counts[g] for counts in per_ref)) for g, c in hyp_ngrams.items()}
            hits[n - 1].append({g: c for g, c in clipped.items() if c})

    def info(ngram) -> float:
        return math.log2(ref_counts[len(ngram) - 1][ngram[:-1]] / ref_counts[len(ngram)][ngram])

    score = 0.0
    for n in range(NIST_ORDER):
        gained = sum(info(g) * c for per_mr in hits[n] for g, c in per_mr.items())
        # an order without hypothesis n-grams adds nothing (pymteval divides by 1 there)
        score += gained / max(hyp_totals[n], 1)
    ratio = hyp_len / ref_len if ref_len else 0.0
    if ratio <= 0:
        penalty = 0.0
    elif ratio >= 1:
        penalty = 1.0
    else:
        penalty = math.exp(-NIST_BETA * math.log(ratio) ** 2)
    return penalty * score


# ---------------------------------------------------------------- PTB tokenization

# what pycocoevalcap's PTBTokenizer removes after the jar's tokenization
PTB_PUNCTUATION = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"}
# the jar writes brackets as -LRB- ...; lowercased they no longer match the list above, so they stay
_PTB_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
# the jar turns these quotes and dashes into `` '' ` ' -- , which are then removed
_PTB_DROPPED = set('"«»“”‘’–—')
_PTB_SPLIT_WORDS = re.compile(r"\b(can)(not)\b|\b(gon|got|wan)(na|ta)\b")
_PTB_CLITIC = re.compile(r"(?<=\w)(n't|'(?:s|re|ll|ve|m|d))\b")
_PTB_TOKEN = re.compile(
    r"n't|'(?:s|re|ll|ve|m|d)\b"  # clitics, split off by _PTB_CLITIC
    r"|</?[^\W\d_]\w*>"  # SGML-like tags such as <unk> stay whole
    r"|(?:[^\W\d_]\.){2,}"  # acronyms: e.g. u.s.
    r"|(?:mr|mrs|ms|dr|st)\.(?!\w)"  # common abbreviations keep their period
    r"|[^\W\d_]+\.(?=,)"  # 'center.,': the jar takes the period as an abbreviation's
    r"|[#@]?\w+(?:(?:[-'/.]|(?<=\d),(?=\d))\w+)*"  # words, family-friendly, 20-25, 30.99, 1,000
    r"|-\d+(?:[.,]\d+)*"  # '-25' after a currency sign split off
    r"|\.\.\.|--|[?!]+|\S"
)


def ptb_tokenize_python(text: str) -> str:
    """Pure-Python imitation of pycocoevalcap's tokenization (the Stanford
    PTBTokenizer jar with ``-preserveLines -lowerCase``, then its punctuation
    tokens removed), used when Java is missing. It reproduces the jar on all
    E2E dev and test references (£ -> #, clitics and "cannot" split, hyphenated
    words and number ranges whole, brackets as -lrb- ...); on other text it is
    an approximation."""
    text = " ".join(text.split()).lower().replace("’", "'").replace("£", " # ").replace("€", " $ ")
    text = _PTB_SPLIT_WORDS.sub(lambda m: " ".join(g for g in m.groups() if g), text)
    text = _PTB_CLITIC.sub(r" \1", text)
    tokens = (_PTB_BRACKETS.get(t, t) for t in _PTB_TOKEN.findall(text))
    return " ".join(t for t in tokens if t not in PTB_PUNCTUATION and t not in _PTB_DROPPED)


def java_status() -> Optional[str]:
    """None when ``java`` on the PATH runs, else why not."""
    java = shutil.which("java")
    if java is None:
        return "java not found on the PATH"
    try:
        done = subprocess.run([java, "-version"], capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        return f"{java} -version failed: {e}"
    if done.returncode != 0:
        return f"{java} -version exited with status {done.returncode}"
    return None


def _coco_inputs(texts_per_key: Dict[int, List[str]]) -> Dict[int, List[dict]]:
    return {key: [{"caption": text} for text in texts] for key, texts in texts_per_key.items()}


def _ptb_tokenize_jar(texts_per_key: Dict[int, List[str]]) -> Dict[int, List[str]]:
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenized = PTBTokenizer().tokenize(_coco_inputs(texts_per_key))
    # the wrapper pairs the jar's output lines with the sentences by position:
    # a missing line would shift or drop sentences without an error
    if {k: len(v) for k, v in tokenized.items()} != {k: len(v) for k, v in texts_per_key.items()}:
        raise RuntimeError(
            f"the PTBTokenizer jar returned {sum(map(len, tokenized.values()))} lines "
            f"for {sum(map(len, texts_per_key.values()))} sentences"
        )
    return tokenized


# ---------------------------------------------------------------- COCO metrics


def _meteor(gts: Dict[int, List[str]], res: Dict[int, List[str]]) -> float:
    from pycocoevalcap.meteor.meteor import Meteor

    meteor = Meteor()
    try:
        score, _ = meteor.compute_score(gts, res)
    except (ValueError, OSError) as e:
        # the jar died (a failed start reads as an empty line): say why
        meteor.meteor_p.kill()
        stderr = meteor.meteor_p.stderr.read().decode("utf-8", "replace").strip()
        raise RuntimeError(f"the METEOR jar failed ({e}){': ' + stderr[-500:] if stderr else ''}") from None
    finally:
        # stop the JVM now rather than whenever the wrapper is collected
        meteor.meteor_p.stdin.close()
        meteor.meteor_p.kill()
        meteor.meteor_p.wait()
    return float(score)


def _coco_scores(hypotheses: Sequence[str], references: Sequence[Sequence[str]], java_problem: Optional[str]):
    """METEOR (None when skipped), ROUGE_L, CIDEr, the tokenization used, and
    {metric: why skipped}."""
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    # the jar reads one sentence per line and also breaks lines at \r, \u2028 ...,
    # which would shift every later sentence: any whitespace run becomes one
    # space (the official script replaces only \n; tokens are the same)
    gts_raw = {i: [" ".join(ref.split()) for ref in refs] for i, refs in enumerate(references)}
    res_raw = {i: [" ".join(hyp.split())] for i, hyp in enumerate(hypotheses)}
    skipped: Dict[str, str] = {}
    tokenization = TOKENIZATION_PTB_JAR
    gts = res = None
    if java_problem is None:
        try:
            # tokenized separately, as COCOEvalCap does
            gts, res = _ptb_tokenize_jar(gts_raw), _ptb_tokenize_jar(res_raw)
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            java_problem = f"the PTBTokenizer jar failed: {e}"
    if gts is None:
        tokenization = f"{TOKENIZATION_PTB_PYTHON} [{java_problem}]"
        gts = {k: [ptb_tokenize_python(t) for t in v] for k, v in gts_raw.items()}
        res = {k: [ptb_tokenize_python(t) for t in v] for k, v in res_raw.items()}

    meteor = None
    if java_problem is None:
        try:
            meteor = _meteor(gts, res)
        except RuntimeError as e:
            skipped["METEOR"] = str(e)
    else:
        skipped["METEOR"] = java_problem
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    return meteor, float(rouge), float(cider), tokenization, skipped


# ---------------------------------------------------------------- scoring


def score_e2e(hypotheses: List[str], references: List[List[str]], java: Optional[bool] = None) -> dict:
    """The five E2E metrics of ``hypotheses[i]`` against ``references[i]``.

    Keys: BLEU, NIST, METEOR (None when skipped), ROUGE_L, CIDEr, and
    n_mrs, n_references, skipped (metric names), skipped_reasons,
    tokenization (metric -> tokenization used), seconds.
    ``java``: None uses Java when ``java`` runs, False never does (METEOR
    skipped, pure-Python PTB tokenization), True requires it.
    """
    if len(hypotheses) != len(references):
        raise DPConfigError(
            f"{len(hypotheses)} hypotheses for {len(references)} MRs: give one hypothesis per MR, "
            "in the order the MRs first appear in the references file"
        )
    if not references:
        raise DPConfigError("nothing to score: no MRs")
    empty = [i for i, refs in enumerate(references) if not refs]
    if empty:
        raise DPConfigError(f"MR number {empty[0] + 1} has no reference")
    try:
        import pycocoevalcap  # noqa: F401
    except ImportError:
        raise DPConfigError(
            "METEOR, ROUGE_L and CIDEr need pycocoevalcap: pip install --no-deps pycocoevalcap==1.2 "
            "(make install does)"
        ) from None
    start = time.perf_counter()
    if java is False:
        java_problem = "Java not used (java=False)"
    else:
        java_problem = java_status()
        if java and java_problem:
            raise DPConfigError(f"Java is required here but {java_problem}")

    bleu = mteval_bleu(hypotheses, references)
    nist = mteval_nist(hypotheses, references)
    meteor, rouge, cider, ptb, skipped = _coco_scores(hypotheses, references, java_problem)
    return {
        "BLEU": bleu,
        "NIST": nist,
        "METEOR": meteor,
        "ROUGE_L": rouge,
        "CIDEr": cider,
        "n_mrs": len(references),
        "n_references": sum(len(refs) for refs in references),
        "skipped": sorted(skipped),
        "skipped_reasons": skipped,
        "tokenization": {
            "BLEU": TOKENIZATION_MTEVAL,
            "NIST": TOKENIZATION_MTEVAL,
            "METEOR": TOKENIZATION_PTB_JAR if meteor is not None else None,
            "ROUGE_L": ptb,
            "CIDEr": ptb,
        },
        "seconds": round(time.perf_counter() - start, 2),
    }


def format_scores(scores: dict) -> List[str]:
    """The official script's SCORES block, then what was skipped and how each
    metric tokenized."""
    lines = ["SCORES:", "=============="]
    for metric in METRICS:
        value = scores[metric]
        if value is None:
            lines.append(f"{metric}: skipped ({scores['skipped_reasons'].get(metric, 'not computed')})")
        else:
            lines.append(f"{metric}: {value:.4f}")
    lines.append("")
    lines.append(f"{scores['n_mrs']} MRs, {scores['n_references']} references, {scores['seconds']:.1f} s")
    by_tokenization: Dict[str, List[str]] = defaultdict(list)
    for metric in METRICS:
        if scores["tokenization"].get(metric):
            by_tokenization[scores["tokenization"][metric]].append(metric)
    for tokenization, metrics in by_tokenization.items():
        lines.append(f"tokenization of {', '.join(metrics)}: {tokenization}")
    return lines


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="BLEU, NIST, METEOR, ROUGE_L and CIDEr of generated E2E NLG texts, as the official "
        "E2E challenge script (measure_scores.py) computes them. METEOR and the PTB tokenization "
        "of METEOR/ROUGE_L/CIDEr need Java; without it METEOR is skipped.",
    )
    parser.add_argument(
        "hypotheses", metavar="HYPOTHESES", help="text file, one generated text per MR, in the references' MR order"
    )
    parser.add_argument(
        "references",
        metavar="REFERENCES_CSV",
        help="E2E CSV with header mr,ref (e.g. testset_w_refs.csv); rows are grouped by MR",
    )
    parser.add_argument("--json", metavar="OUT", help="also write the scores to this JSON file")
    return parser


def evaluate(args) -> Tuple[dict, List[str]]:
    hypotheses = read_hypotheses(args.hypotheses)
    mrs, references = read_e2e_references(args.references)
    if len(hypotheses) != len(mrs):
        raise DPConfigError(
            f"{args.hypotheses} has {len(hypotheses)} lines but {args.references} has {len(mrs)} distinct MRs: "
            "give one hypothesis line per MR, in the order the MRs first appear"
        )
    if args.json:
        folder = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(folder):
            raise DPConfigError(f"--json {args.json}: folder {folder} does not exist")
    scores = score_e2e(hypotheses, references)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(scores, f, indent=2)
            f.write("\n")
    return scores, format_scores(scores)


def main(argv: Optional[List[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        _, lines = evaluate(args)
    except DPConfigError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        sys.exit(2)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
