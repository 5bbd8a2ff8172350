"""GPT-2 BPE offline (fairseq_dp.gpt2_bpe) and fairseq-dp-prepare-lm.

Oracles, none of them the code under test:
- the GPT-2 files in ../shared/data/gpt2_bpe (when present) for the converted files;
- tiktoken's algorithm (merge the adjacent pair of lowest rank, straight from
  the whisper ranks, no merges list) written out here, for the conversion on any machine;
- HuggingFace ``tokenizers``' byte-level BPE for encoding;
- fairseq's own ``--bpe gpt2`` + ``Dictionary.encode_line`` for the binarized items.
"""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st

from fairseq_dp import gpt2_bpe
from fairseq_dp.errors import DPConfigError
from fairseq_dp.gpt2_bpe import (
    fairseq_ids_to_gpt2,
    gpt2_bpe_files,
    gpt2_dictionary,
    gpt2_ids_to_fairseq,
    load_gpt2_bpe,
    read_tiktoken,
    whisper_tiktoken_path,
    write_gpt2_dict,
)
from fairseq_dp.prepare_lm import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_BPE = os.path.join(REPO, "..", "shared", "data", "gpt2_bpe")
SHARED_E2E = os.path.join(REPO, "..", "shared", "data", "e2e", "devset.csv")

# real text: accents, CJK, emoji (with ZWJ and skin tone), RTL, combining marks,
# whitespace runs, tabs, leading/trailing spaces, contractions, digits, markup
TEXTS = [
    "The Eagle is a coffee shop near Burger King in the riverside area, rated 5 out of 5.",
    "  two leading spaces, then a run of    four, and a trailing one ",
    "\ttab first\tthen tabs\t\tdoubled\t",
    "Café crème, naïve façade, Ångström, Šibenik, Łódź, São Paulo, Zürich.",
    "東京は日本の首都です。北京是中国的首都。서울은 한국의 수도입니다.",
    "Emoji: 🙂👍🏽 👩‍👩‍👧‍👦 🇫🇷 — and a snowman ☃ and ∑ x² ≤ ∞",
    "مرحبا بالعالم · שלום עולם · Привет, мир · Γειά σου κόσμε",
    "e\u0301 combining, ｆｕｌｌｗｉｄｔｈ, non\u00a0breaking\u2009thin space, zero\u200bwidth",
    "It's, we've, they'll, I'd, she's, don't — CAN'T, WON'T (contractions).",
    "Numbers 3.14159, 1,000,000 and 2024-06-25T12:00:00Z; code: x = f(y) + 1 # comment",
    "<|endoftext|> is plain text here, as is <s> and </s>.",
    "multi\n\nline\r\nwith a lone \r return and\u2028a line separator",
    " ",
    "a",
]

# GPT-2's pre-tokenization pattern as tiktoken writes it
GPT2_PATTERN = regex.compile(r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")


def tiktoken_encode(text, ranks):
    """tiktoken's byte-pair encoding from ranks alone: in each piece, merge the
    adjacent pair whose concatenation has the lowest rank until none is a token."""
    ids = []
    for piece in GPT2_PATTERN.findall(text):
        parts = [bytes([b]) for b in piece.encode("utf-8")]
        while len(parts) > 1:
            candidates = [(ranks[parts[i] + parts[i + 1]], i) for i in range(len(parts) - 1)
                          if parts[i] + parts[i + 1] in ranks]
            if not candidates:
                break
            _, i = min(candidates)
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        ids += [ranks[p] for p in parts]
    return ids


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    """A private FAIRSEQ_DP_CACHE, so that tests never write to ~/.cache."""
    root = tmp_path_factory.mktemp("cache")
    old = os.environ.get("FAIRSEQ_DP_CACHE")
    os.environ["FAIRSEQ_DP_CACHE"] = str(root)
    yield root
    if old is None:
        del os.environ["FAIRSEQ_DP_CACHE"]
    else:
        os.environ["FAIRSEQ_DP_CACHE"] = old


@pytest.fixture(scope="module")
def bpe_files(cache_root):
    if whisper_tiktoken_path() is None:
        pytest.fail("openai-whisper is not installed (make install does: pip install --no-deps openai-whisper)")
    return gpt2_bpe_files()


@pytest.fixture(scope="module")
def oracle(bpe_files):
    """HuggingFace tokenizers' byte-level BPE on the same files: text -> GPT-2 ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE.from_file(*bpe_files))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return lambda text: tok.encode(text, add_special_tokens=False).ids


def e2e_texts(limit=300):
    if not os.path.isfile(SHARED_E2E):
        return []
    with open(SHARED_E2E, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))[:limit]
    return [r["mr"] for r in rows] + [r["ref"] for r in rows]


# ---------------------------------------------------------------- gpt2_bpe


def test_converted_files_are_cached_in_fairseq_dp_cache(bpe_files, cache_root):
    assert [os.path.dirname(p) for p in bpe_files] == [str(cache_root / "gpt2_bpe")] * 2
    with open(bpe_files[1], encoding="utf-8") as f:
        lines = f.read().split("\n")
    assert lines[0] == "#version: 0.2" and lines[-1] == "" and len(lines) == 50000 + 2
    with open(bpe_files[0]) as f:
        encoder = json.load(f)
    assert len(encoder) == 50257 and encoder["<|endoftext|>"] == 50256
    mtime = os.path.getmtime(bpe_files[0])
    assert gpt2_bpe_files() == bpe_files and os.path.getmtime(bpe_files[0]) == mtime  # not converted again


@pytest.mark.skipif(not os.path.isdir(SHARED_BPE), reason="../shared/data/gpt2_bpe not present")
def test_converted_files_equal_gpt2_originals(bpe_files):
    with open(bpe_files[0]) as f, open(os.path.join(SHARED_BPE, "encoder.json")) as g:
        assert json.load(f) == json.load(g)
    with open(bpe_files[1], encoding="utf-8") as f, open(os.path.join(SHARED_BPE, "vocab.bpe"), encoding="utf-8") as g:
        ours, theirs = f.read().splitlines(), g.read().splitlines()
    assert ours == theirs


def test_encoding_matches_tiktoken_ranks_and_hf_tokenizers(bpe_files, oracle):
    """The merges list reproduces rank-ordered BPE on the raw ranks (so the
    conversion is right without the original files), and fairseq's encoder
    agrees with HuggingFace's byte-level BPE on the same files."""
    ranks = read_tiktoken(whisper_tiktoken_path())
    enc = load_gpt2_bpe(*bpe_files)
    for text in TEXTS + e2e_texts():
        ids = enc.encode(text)
        assert ids == tiktoken_encode(text, ranks), text
        assert ids == oracle(text), text
    # one known anchor from GPT-2 itself: "Hello world"
    assert enc.encode("Hello world") == [15496, 995]


@pytest.mark.skipif(not os.path.isdir(SHARED_BPE), reason="../shared/data/gpt2_bpe not present")
def test_hf_gpt2_tokenizer_on_original_files_agrees(bpe_files):
    from transformers import GPT2TokenizerFast

    hf = GPT2TokenizerFast(os.path.join(SHARED_BPE, "encoder.json"), os.path.join(SHARED_BPE, "vocab.bpe"))
    enc = load_gpt2_bpe(*bpe_files)
    # HF reads "<|endoftext|>" in text as the special token; fairseq's --bpe gpt2 does not
    for text in [t for t in TEXTS if "<|endoftext|>" not in t]:
        assert enc.encode(text) == hf(text, add_special_tokens=False)["input_ids"], text


def test_round_trip_on_real_text(bpe_files):
    enc = load_gpt2_bpe(*bpe_files)
    for text in TEXTS + e2e_texts():
        assert enc.decode(enc.encode(text)) == text


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=80))
def test_round_trip_on_any_text(cache_root, text):
    enc = load_gpt2_bpe()
    assert enc.decode(enc.encode(text)) == text


def test_id_maps():
    assert gpt2_ids_to_fairseq([0, 1, 50255, 50256]) == [4, 5, 50259, 2]
    assert fairseq_ids_to_gpt2([4, 5, 50259, 2]) == [0, 1, 50255, 50256]
    for bad in (0, 1, 3, 50260):
        with pytest.raises(ValueError):
            fairseq_ids_to_gpt2([bad])
    with pytest.raises(ValueError):
        gpt2_ids_to_fairseq([50257])


def test_dictionary_layout(tmp_path):
    from fairseq.data import Dictionary

    d = gpt2_dictionary()
    path = tmp_path / "dict.txt"
    write_gpt2_dict(str(path))
    lines = path.read_text().splitlines()
    assert lines[0] == "0 1" and lines[-1] == "50255 1" and len(lines) == 50256
    loaded = Dictionary.load(str(path))
    assert loaded.symbols == d.symbols and len(d) == 50260
    assert (d.bos(), d.pad(), d.eos(), d.unk()) == (0, 1, 2, 3)
    assert d.index("0") == 4 and d.index("50255") == 50259 and d.index("50256") == d.unk()


def test_bpe_file_errors(tmp_path, monkeypatch):
    with pytest.raises(DPConfigError, match="--gpt2-vocab-bpe"):
        gpt2_bpe_files(encoder_json="x.json")
    with pytest.raises(DPConfigError, match="--gpt2-encoder-json .*missing.json: no such file"):
        gpt2_bpe_files(str(tmp_path / "missing.json"), str(tmp_path / "missing.bpe"))
    monkeypatch.setattr(gpt2_bpe, "whisper_tiktoken_path", lambda: None)
    with pytest.raises(DPConfigError) as e:
        gpt2_bpe_files()
    assert "--gpt2-encoder-json" in str(e.value) and "pip install --no-deps openai-whisper" in str(e.value)


# ---------------------------------------------------------------- prepare_lm


def run_main(argv, capsys):
    """main() in-process: (exit status, stdout, stderr)."""
    try:
        main(argv)
        status = 0
    except SystemExit as e:
        status = e.code
    out, err = capsys.readouterr()
    return status, out, err


def read_back(destdir, split):
    """Items through fairseq's own loader, and the loss starts."""
    from fairseq.data import Dictionary, data_utils

    d = Dictionary.load(os.path.join(destdir, "dict.txt"))
    ds = data_utils.load_indexed_dataset(os.path.join(destdir, split), d, dataset_impl="mmap")
    items = [ds[i].tolist() for i in range(len(ds))]
    return items, np.load(os.path.join(destdir, "loss_start", f"{split}.npy")).tolist(), d


def fairseq_items(texts, d, bpe_files):
    """fairseq's own --bpe gpt2 + Dictionary.encode_line: GPT-2 ids as
    symbols, </s> appended."""
    from fairseq.data.encoders.gpt2_bpe import GPT2BPE, GPT2BPEConfig

    bpe = GPT2BPE(GPT2BPEConfig(gpt2_encoder_json=bpe_files[0], gpt2_vocab_bpe=bpe_files[1]))
    return [d.encode_line(bpe.encode(t), add_if_not_exist=False, append_eos=True).tolist() for t in texts]


def bpe_flags(bpe_files):
    return ["--gpt2-encoder-json", bpe_files[0], "--gpt2-vocab-bpe", bpe_files[1]]


def test_text_format(tmp_path, capsys, bpe_files, oracle):
    lines = [t for t in TEXTS if "\n" not in t and "\r" not in t]
    (tmp_path / "train.txt").write_text("".join(t + "\n" for t in lines), encoding="utf-8")
    # a CRLF file, no final line end: the \r is the line end, not text; a lone \r
    # inside a line is text (one line is one privacy unit)
    (tmp_path / "valid.txt").write_bytes("first line\r\nsecond \u2028line with a lone \r inside".encode("utf-8"))
    dest = tmp_path / "out"
    status, out, err = run_main(["--format", "text", "--train", str(tmp_path / "train.txt"), "--valid",
                                 str(tmp_path / "valid.txt"), "--destdir", str(dest)] + bpe_flags(bpe_files), capsys)
    assert status == 0, err
    assert out.count("\n") == 2 and out.startswith("train: ") and "valid: 2 examples" in out
    items, loss_start, d = read_back(str(dest), "train")
    assert items == [[i + 4 for i in oracle(t)] + [2] for t in lines]
    assert items == fairseq_items(lines, d, bpe_files)
    assert loss_start == [0] * len(lines)
    items, loss_start, _ = read_back(str(dest), "valid")
    assert items == [[i + 4 for i in oracle(t)] + [2] for t in ("first line", "second \u2028line with a lone \r inside")]
    meta = json.loads((dest / "prepare_lm.json").read_text())
    assert meta["format"] == "text" and meta["splits"]["train"]["examples"] == len(lines)
    assert meta["splits"]["valid"]["examples"] == 2 and meta["max_length"] == 1024
    assert len(meta["tokenizer"]["encoder_json"]["sha256"]) == 64


def test_tsv_format_masks_the_prompt(tmp_path, capsys, bpe_files, oracle):
    pairs = [("name[The Eagle], food[French]", "The Eagle serves French food."),
             ("  Café 日本語", " 🙂 emoji,  spaces and a leading space"),
             ("", "an empty prompt is an unconditional example")]
    (tmp_path / "train.tsv").write_text("".join(f"{p}\t{t}\n" for p, t in pairs), encoding="utf-8")
    dest = tmp_path / "out"
    status, _, err = run_main(["--format", "tsv", "--train", str(tmp_path / "train.tsv"), "--test",
                               str(tmp_path / "train.tsv"), "--destdir", str(dest)] + bpe_flags(bpe_files), capsys)
    assert status == 0, err
    for split in ("train", "test"):
        items, loss_start, _ = read_back(str(dest), split)
        expected = [[i + 4 for i in oracle(p)] + [2] + [i + 4 for i in oracle(t)] + [2] for p, t in pairs]
        assert items == expected
        assert loss_start == [len(oracle(p)) + 1 for p, _ in pairs]


def test_e2e_format_reads_quoted_csv(tmp_path, capsys, bpe_files, oracle):
    rows = [("name[Alimentum], area[city centre], familyFriendly[no]", "There is a place in the city centre, "
             "Alimentum, that is not family-friendly."),
            ("name[The Mill], eatType[pub]", 'A pub, "The Mill", with quotes\nand a line break.'),
            ("name[Zizzi]", "Plain ref")]
    with open(tmp_path / "dev.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["mr", "ref"])
        w.writerows(rows)
    dest = tmp_path / "out"
    status, _, err = run_main(["--format", "e2e", "--train", str(tmp_path / "dev.csv"), "--destdir", str(dest)]
                              + bpe_flags(bpe_files), capsys)
    assert status == 0, err
    items, loss_start, _ = read_back(str(dest), "train")
    assert items == [[i + 4 for i in oracle(p)] + [2] + [i + 4 for i in oracle(t)] + [2] for p, t in rows]
    assert loss_start == [len(oracle(p)) + 1 for p, _ in rows]


@pytest.mark.skipif(not os.path.isfile(SHARED_E2E), reason="../shared/data/e2e not present")
def test_e2e_devset(tmp_path, capsys, bpe_files):
    dest = tmp_path / "out"
    status, out, err = run_main(["--format", "e2e", "--train", SHARED_E2E, "--destdir", str(dest)]
                                + bpe_flags(bpe_files), capsys)
    assert status == 0, err
    assert "train: 4672 examples" in out
    with open(SHARED_E2E, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    items, loss_start, d = read_back(str(dest), "train")
    prompts = fairseq_items([r["mr"] for r in rows[:200]], d, bpe_files)
    targets = fairseq_items([r["ref"] for r in rows[:200]], d, bpe_files)
    assert items[:200] == [p + t for p, t in zip(prompts, targets)]
    assert loss_start[:200] == [len(p) for p in prompts]


def test_default_bpe_and_srcdict(tmp_path, capsys, cache_root, bpe_files):
    """Without BPE flags the whisper-derived files are used; --srcdict is
    copied when it is GPT-2's layout and refused otherwise."""
    (tmp_path / "t.txt").write_text("hello there\n", encoding="utf-8")
    write_gpt2_dict(str(tmp_path / "dict.txt"))
    dest = tmp_path / "out"
    status, _, err = run_main(["--format", "text", "--train", str(tmp_path / "t.txt"), "--destdir", str(dest),
                               "--srcdict", str(tmp_path / "dict.txt")], capsys)
    assert status == 0, err
    assert (dest / "dict.txt").read_bytes() == (tmp_path / "dict.txt").read_bytes()
    meta = json.loads((dest / "prepare_lm.json").read_text())
    assert meta["tokenizer"]["vocab_bpe"]["path"] == os.path.abspath(bpe_files[1])
    # a RoBERTa-style dict: GPT-2 ids as symbols, in another order
    lines = (tmp_path / "dict.txt").read_text().splitlines()
    (tmp_path / "other.txt").write_text("\n".join([lines[1], lines[0]] + lines[2:]) + "\n")
    status, _, err = run_main(["--format", "text", "--train", str(tmp_path / "t.txt"), "--destdir", str(dest),
                               "--srcdict", str(tmp_path / "other.txt")], capsys)
    assert status == 2 and "not a GPT-2 BPE dictionary" in err and "symbol 4 is '1'" in err
    (tmp_path / "small.txt").write_text("0 1\n1 1\n")
    status, _, err = run_main(["--format", "text", "--train", str(tmp_path / "t.txt"), "--destdir", str(dest),
                               "--srcdict", str(tmp_path / "small.txt")], capsys)
    assert status == 2 and "2 symbols, GPT-2 BPE has 50256" in err


def test_length_limit_and_truncation(tmp_path, capsys, bpe_files, oracle):
    text = "one two three four five six seven eight nine ten"  # 10 tokens + </s>
    (tmp_path / "t.txt").write_text(f"short\n{text}\n{text}\n", encoding="utf-8")
    dest = tmp_path / "out"
    base = ["--format", "text", "--train", str(tmp_path / "t.txt"), "--destdir", str(dest)] + bpe_flags(bpe_files)
    status, _, err = run_main(base + ["--max-length", "8"], capsys)
    assert status == 2 and "Traceback" not in err
    assert "2 example(s) longer than --max-length 8" in err and "longest has 11" in err
    assert "line 2, 3" in err and "--max-length 11" in err and "--truncate" in err
    assert not dest.exists()  # nothing written for a refused input
    status, out, err = run_main(base + ["--max-length", "8", "--truncate"], capsys)
    assert status == 0, err
    assert "2 truncated" in out
    items, loss_start, _ = read_back(str(dest), "train")
    ids = [i + 4 for i in oracle(text)]
    assert items[1] == ids[:7] + [2] and items[2] == ids[:7] + [2] and len(items[0]) == 2

    # pairs: cut the target, never the prompt
    (tmp_path / "p.tsv").write_text(f"{text}\tok\nshort\t{text}\n", encoding="utf-8")
    base = ["--format", "tsv", "--train", str(tmp_path / "p.tsv"), "--destdir", str(dest)] + bpe_flags(bpe_files)
    status, _, err = run_main(base + ["--max-length", "12", "--truncate"], capsys)
    assert status == 2 and "prompt alone does not fit" in err and "line 1" in err
    status, _, err = run_main(base + ["--max-length", "13", "--truncate"], capsys)
    assert status == 0, err
    items, loss_start, _ = read_back(str(dest), "train")
    short = [i + 4 for i in oracle("short")]
    assert items[0] == ids + [2] + [i + 4 for i in oracle("ok")] + [2] and len(items[0]) == 13
    assert items[1] == short + [2] + ids[: 13 - len(short) - 2] + [2]
    assert loss_start == [11, len(short) + 1]


@pytest.mark.parametrize(
    "fmt, content, message",
    [
        ("text", "", "no examples"),
        ("text", "a\n\nb\n", "1 empty line(s) at line 2"),
        ("tsv", "prompt\ttarget\nprompt only\t\n", "1 prompt-only row(s) (empty target"),
        ("tsv", "no tab here\nx\ty\tz\n", "2 line(s) without exactly one tab"),
        ("e2e", "meaning,text\nx,y\n", "the header is 'meaning,text', want 'mr,ref'"),
        ("e2e", "mr,ref\n\"name[X]\",\n", "prompt-only row(s) (empty ref) at line 2"),
        ("e2e", "", "empty file"),
        ("tsv", b"ok\tfine\n\xff\xfe\tbad\n", "not UTF-8 text at line 2"),
    ],
)
def test_bad_input_is_a_message(tmp_path, capsys, bpe_files, fmt, content, message):
    path = tmp_path / "in.txt"
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    status, out, err = run_main(["--format", fmt, "--train", str(path), "--destdir", str(tmp_path / "out")]
                                + bpe_flags(bpe_files), capsys)
    assert status == 2 and message in err and err.startswith("fairseq-dp-prepare-lm: error: "), err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_skip_empty(tmp_path, capsys, bpe_files):
    (tmp_path / "t.txt").write_text("a\n\nb\n\n", encoding="utf-8")
    status, out, err = run_main(["--format", "text", "--train", str(tmp_path / "t.txt"), "--skip-empty",
                                 "--destdir", str(tmp_path / "out")] + bpe_flags(bpe_files), capsys)
    assert status == 0, err
    assert "train: 2 examples" in out and "2 empty lines skipped" in out


def test_missing_file_through_the_console_command(tmp_path, bpe_files):
    """The real command line: a message, exit status 2, no traceback."""
    (tmp_path / "t.txt").write_text("hello\n")
    result = subprocess.run(
        [sys.executable, "-m", "fairseq_dp.prepare_lm", "--format", "text", "--train", str(tmp_path / "t.txt"),
         "--valid", str(tmp_path / "missing.txt"), "--destdir", str(tmp_path / "out")] + bpe_flags(bpe_files),
        capture_output=True, text=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1"),
    )
    assert result.returncode == 2
    assert result.stderr.strip() == f"fairseq-dp-prepare-lm: error: {tmp_path / 'missing.txt'}: no such file"
