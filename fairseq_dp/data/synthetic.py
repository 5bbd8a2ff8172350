# Copyright (c) fairseq_dp contributors. MIT license.
"""A small sentiment-like classification task the project generates itself.

Each sentence mixes a few neutral words with one to four "positive" or
"negative" cue words; the label is the cue polarity, flipped for
``label_noise`` of the examples. ``n_cues`` limits the cue vocabulary: a
"public" set that uses only some cues gives a stand-in for a pretrained model,
which DP fine-tuning on the full "private" set then improves. Used by
``make demo`` and the end-to-end tests until real data is given.
"""

import os
import random
from typing import List, Optional, Tuple

NEUTRAL = [f"w{i}" for i in range(200)]
POSITIVE = [f"good{i}" for i in range(10)]
NEGATIVE = [f"bad{i}" for i in range(10)]


def make_examples(
    n: int, rng: random.Random, label_noise: float = 0.05, n_cues: int = len(POSITIVE)
) -> List[Tuple[str, int]]:
    examples = []
    for _ in range(n):
        label = rng.randint(0, 1)
        cues = (POSITIVE if label else NEGATIVE)[:n_cues]
        words = rng.choices(NEUTRAL, k=rng.randint(2, 10))
        for _ in range(rng.randint(1, 4)):
            words.insert(rng.randrange(len(words) + 1), rng.choice(cues))
        if rng.random() < label_noise:
            label = 1 - label
        examples.append((" ".join(words), label))
    return examples


def write_raw(out_dir: str, n_train: int, n_valid: int, seed: int = 0, n_cues: int = len(POSITIVE)) -> str:
    """Writes ``{train,valid}.input0`` and ``{train,valid}.label`` under ``out_dir``."""
    rng = random.Random(seed)
    os.makedirs(out_dir, exist_ok=True)
    for split, n in (("train", n_train), ("valid", n_valid)):
        examples = make_examples(n, rng, n_cues=n_cues)
        with open(os.path.join(out_dir, f"{split}.input0"), "w") as f:
            f.writelines(sentence + "\n" for sentence, _ in examples)
        with open(os.path.join(out_dir, f"{split}.label"), "w") as f:
            f.writelines(f"{label}\n" for _, label in examples)
    return out_dir


def write_dictionary(path: str) -> str:
    """A fairseq dictionary of the whole vocabulary, shared by every split and set."""
    with open(path, "w") as f:
        f.writelines(f"{word} 1\n" for word in NEUTRAL + POSITIVE + NEGATIVE)
    return path


def binarize(raw_dir: str, dest_dir: str) -> str:
    """fairseq-preprocess the raw files into ``dest_dir/{input0,label}``, as
    fairseq's GLUE recipe lays them out."""
    from fairseq import options
    from fairseq_cli import preprocess

    os.makedirs(dest_dir, exist_ok=True)
    vocab = write_dictionary(os.path.join(raw_dir, "vocab.txt"))
    for key in ("input0", "label"):
        target = os.path.join(dest_dir, key)
        if os.path.exists(os.path.join(target, "dict.txt")):
            continue
        argv = [
            "--only-source",
            "--trainpref", os.path.join(raw_dir, f"train.{key}"),
            "--validpref", os.path.join(raw_dir, f"valid.{key}"),
            "--destdir", target,
            "--workers", "1",
        ]
        if key == "input0":
            argv += ["--srcdict", vocab]
        preprocess.main(options.get_preprocessing_parser().parse_args(argv))
    return dest_dir


def make_synthetic_dataset(
    dest_dir: str, n_train: int = 2000, n_valid: int = 400, seed: int = 0,
    n_cues: Optional[int] = None,
) -> str:
    """Raw text under ``dest_dir/raw`` and fairseq binaries in ``dest_dir``."""
    raw = write_raw(os.path.join(dest_dir, "raw"), n_train, n_valid, seed, n_cues or len(POSITIVE))
    return binarize(raw, dest_dir)


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("dest_dir")
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-valid", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-cues", type=int, default=len(POSITIVE))
    a = p.parse_args()
    print(make_synthetic_dataset(a.dest_dir, a.n_train, a.n_valid, a.seed, a.n_cues))
