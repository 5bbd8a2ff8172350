# Copyright (c) fairseq_dp contributors. MIT license.
"""A small sentiment-like classification task the project generates itself.

Each sentence mixes a few neutral words with one to four "positive" or
"negative" cue words; the label is the cue polarity, flipped for
``label_noise`` of the examples. ``n_cues`` limits the cue vocabulary: a
"public" set that uses only some cues gives a stand-in for a pretrained model,
which DP fine-tuning on the full "private" set then improves. Used by the
end-to-end tests.

``write_sentiment_tsv`` writes English movie-review-like sentences in GLUE
SST-2 format for ``make demo``, which tokenizes them with the converted
checkpoint's WordPiece vocabulary through ``fairseq_dp.prepare_glue``.
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


# English sentences for the demo on the converted MiniLM checkpoint: real words,
# so that its WordPiece vocabulary and pretrained encoder have something to read.
# Negation flips a cue, so a bag of cue words is not enough.
SUBJECTS = ["the movie", "this film", "the plot", "the acting", "the story", "the soundtrack",
            "the director 's new picture", "the second half", "the cast", "the script", "every scene",
            "the ending", "the dialogue", "the camera work", "the sequel"]
POSITIVE_WORDS = ["wonderful", "moving", "brilliant", "charming", "delightful", "gripping", "funny",
                  "beautiful", "smart", "touching", "memorable", "fresh"]
NEGATIVE_WORDS = ["dull", "boring", "clumsy", "tedious", "awful", "predictable", "shallow", "messy",
                  "lifeless", "forgettable", "annoying", "stale"]
ADVERBS = ["", "", "really ", "quite ", "surprisingly ", "truly ", "rather ", "utterly "]
FILLERS = ["", "", "", "to be honest , ", "in the end , ", "for the most part , ", "at times , ",
           "from start to finish , ", "as expected , "]
TAILS = ["", "", " for a friday night", " despite the long running time", " , and the audience knew it",
         " in its own way", " , which surprised me"]


def sentiment_sentence(label: int, rng: random.Random) -> str:
    negate = rng.random() < 0.3
    polarity = label if not negate else 1 - label
    adjective = rng.choice(POSITIVE_WORDS if polarity else NEGATIVE_WORDS)
    verb = rng.choice(["is", "was", "feels", "seemed"])
    negation = rng.choice(["not ", "never ", "hardly "]) if negate else ""
    words = f"{rng.choice(FILLERS)}{rng.choice(SUBJECTS)} {verb} {negation}{rng.choice(ADVERBS)}{adjective}"
    if rng.random() < 0.4:  # a second clause of either polarity, weaker cue
        other = rng.choice(POSITIVE_WORDS + NEGATIVE_WORDS)
        words += f" , although {rng.choice(SUBJECTS)} {rng.choice(['is', 'was'])} a bit {other}"
    return words + rng.choice(TAILS) + " ."


def write_sentiment_tsv(out_dir: str, n_train: int, n_dev: int, seed: int = 0, label_noise: float = 0.05) -> str:
    """GLUE SST-2-format ``train.tsv`` and ``dev.tsv`` (``sentence<TAB>label``)."""
    rng = random.Random(seed)
    os.makedirs(out_dir, exist_ok=True)
    for name, n in (("train.tsv", n_train), ("dev.tsv", n_dev)):
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            f.write("sentence\tlabel\n")
            for _ in range(n):
                label = rng.randint(0, 1)
                sentence = sentiment_sentence(label, rng)
                if rng.random() < label_noise:
                    label = 1 - label
                f.write(f"{sentence}\t{label}\n")
    return out_dir


def make_synthetic_lm_dataset(out_dir: str, n_train: int = 256, n_valid: int = 64, prompts: bool = True,
                              seed: int = 0) -> str:
    """A small private-language-modeling directory in ``fairseq-dp-prepare-lm``'s
    layout (``dict.txt``, ``{split}.bin/.idx``, ``loss_start/{split}.npy``).

    With ``prompts``, each example is a (prompt, target) pair whose target is
    the prompt's words reversed followed by a cue word of the prompt's first
    word's parity (learnable from the prompt alone); without, each example is
    one line of two to twelve words."""
    import numpy as np
    import torch
    from fairseq.data import Dictionary, indexed_dataset

    from .lm_examples import loss_start_path

    rng = random.Random(seed)
    os.makedirs(out_dir, exist_ok=True)
    write_dictionary(os.path.join(out_dir, "dict.txt"))
    dictionary = Dictionary.load(os.path.join(out_dir, "dict.txt"))
    for split, n in (("train", n_train), ("valid", n_valid)):
        prefix = os.path.join(out_dir, split)
        builder = indexed_dataset.make_builder(prefix + ".bin", impl="mmap", vocab_size=len(dictionary))
        loss_start = []
        for _ in range(n):
            if prompts:
                prompt = rng.choices(NEUTRAL, k=rng.randint(1, 6))
                cue = POSITIVE[0] if NEUTRAL.index(prompt[0]) % 2 else NEGATIVE[0]
                target = list(reversed(prompt)) + [cue]
                ids = [dictionary.index(w) for w in prompt] + [dictionary.eos()]
                loss_start.append(len(ids))
                ids += [dictionary.index(w) for w in target] + [dictionary.eos()]
            else:
                ids = [dictionary.index(w) for w in rng.choices(NEUTRAL, k=rng.randint(2, 12))]
                ids.append(dictionary.eos())
                loss_start.append(0)
            builder.add_item(torch.IntTensor(ids))
        builder.finalize(prefix + ".idx")
        os.makedirs(os.path.dirname(loss_start_path(out_dir, split)), exist_ok=True)
        np.save(loss_start_path(out_dir, split), np.asarray(loss_start, dtype=np.int64))
    return out_dir
