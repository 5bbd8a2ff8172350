"""The README's recipes run as written, at tiny scale.

Conventions, for whoever edits README.md:

- Every fenced shell block (```sh) is preceded, on the line just above the fence,
  by ``<!-- recipe -->`` or by ``<!-- not a recipe: WHY -->``. Recipes are what a user
  copies and pastes; they must run as written, from the repository root.
- A recipe is plain commands: one per line (continued with a trailing backslash),
  comment lines allowed, no shell variables, substitutions, pipes or redirections.
- Recipes run in README order, in one working directory that holds what the README
  assumes the user has: a link to the ``fairseq_dp`` folder (as in a clone) and SST-2
  in GLUE format at ``glue_data/SST-2`` (here a small generated sentiment task in the
  same format). Commands that convert or prepare data run exactly as written.
- Training commands get flags appended that only make the run small: to
  ``fairseq-train``, ``--max-update 2 --batch-size 4 --update-freq 1 --num-workers 0``
  (fairseq takes the last value of a repeated flag); to ``fairseq-hydra-train``, the
  same as overrides. Everything else, model and checkpoint included, is the recipe's.
- Before each training command, every ``checkpoint_last.pt`` under ``checkpoints/``
  is removed, so that no recipe resumes another recipe's run (``checkpoint_best.pt``
  stays for the commands that use it). A command that appears twice runs once.
- A recipe passes when each command exits with 0 and prints no Python traceback.
  The command-line and Hydra versions of one recipe (the same ``checkpoints/``
  folder) must also be the same recipe: the configurations saved in their
  checkpoints (task, model, criterion, optimizer, schedule, optimization, dataset)
  agree on every setting both hold. (Not their weights: with secret noise and
  sampling two runs differ whatever their settings.)
"""

import argparse
import os
import re
import shlex
import subprocess
import sys

import pytest
import torch

from fairseq_dp.data.synthetic import write_sentiment_tsv

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")
BIN = os.path.dirname(sys.executable)

RECIPE = "<!-- recipe -->"
NOT_RECIPE = "<!-- not a recipe:"
SHELL_LANGS = ("sh", "bash", "shell", "console")
SMALL_TRAIN = ["--max-update", "2", "--batch-size", "4", "--update-freq", "1", "--num-workers", "0"]
SMALL_HYDRA = ["optimization.max_update=2", "dataset.batch_size=4", "optimization.update_freq=[1]",
               "dataset.num_workers=0"]
NOT_PLAIN = ("|", "||", "&&", ";", ">", ">>", "<", "&")


def fenced_blocks(text: str):
    """(marker line above the fence, language, body) of every fenced block."""
    lines = text.split("\n")
    blocks, i = [], 0
    while i < len(lines):
        m = re.match(r"^```(\S*)\s*$", lines[i])
        if m:
            end = lines.index("```", i + 1)
            blocks.append((lines[i - 1].strip() if i else "", m.group(1), "\n".join(lines[i + 1:end])))
            i = end
        i += 1
    return blocks


def recipes(text: str):
    return [body for marker, lang, body in fenced_blocks(text) if lang in SHELL_LANGS and marker == RECIPE]


def commands(block: str):
    """The block's commands, each as a token list (backslash continuations joined)."""
    joined = re.sub(r"\\\n", " ", block)
    found = []
    for line in joined.split("\n"):
        tokens = shlex.split(line, comments=True)
        if not tokens:
            continue
        bad = [t for t in tokens if t in NOT_PLAIN or "$" in t or "`" in t]
        assert not bad, f"a recipe is plain commands; {bad} in: {line}"
        found.append(tokens)
    return found


def is_training(tokens) -> bool:
    return tokens[0] in ("fairseq-train", "fairseq-hydra-train") or tokens[:3] == ["python", "-m", "fairseq_cli.train"]


def small(tokens):
    """The command with the flags that only make the run small (see the module doc)."""
    if tokens[0] == "fairseq-hydra-train":
        return tokens + SMALL_HYDRA
    if is_training(tokens):
        return tokens + SMALL_TRAIN
    return tokens


def write_e2e_csv(out_dir, n_train, n_dev):
    """E2E NLG's CSV layout (header ``mr,ref``; quoted fields with commas)."""
    import csv
    import random

    rng = random.Random(0)
    os.makedirs(out_dir, exist_ok=True)
    # the test file: 3 MRs with 2 references each (E2E's testset_w_refs.csv has several per MR)
    for name, n, refs in (("trainset.csv", n_train, 1), ("devset.csv", n_dev, 1), ("testset_w_refs.csv", 3, 2)):
        with open(os.path.join(out_dir, name), "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["mr", "ref"])
            for i in range(n):
                food, area = rng.choice(["Thai", "Italian", "French"]), rng.choice(["riverside", "city centre"])
                for r in range(refs):
                    writer.writerow([f"name[The Vaults {i}], food[{food}], area[{area}]",
                                     f"The Vaults {i} serves {food} food in the {area}." if r == 0 else
                                     f"In the {area}, The Vaults {i} has {food} food."])


def write_random_gpt2(out_dir):
    """A HuggingFace GPT-2 directory of GPT-2 small's shape with random weights
    (no GPT-2 weights are available offline), for the README's GPT-2 recipes."""
    import transformers

    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config()).save_pretrained(out_dir)


class Workspace:
    def __init__(self, path):
        self.path = str(path)
        os.symlink(os.path.join(REPO, "fairseq_dp"), os.path.join(self.path, "fairseq_dp"))
        write_sentiment_tsv(os.path.join(self.path, "glue_data", "SST-2"), 300, 24, seed=1)
        write_e2e_csv(os.path.join(self.path, "e2e"), 64, 16)
        write_random_gpt2(os.path.join(self.path, "gpt2"))
        self.env = dict(
            os.environ,
            # the venv's console scripts and python; this checkout's fairseq_dp
            PATH=BIN + os.pathsep + os.environ.get("PATH", ""),
            PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
            OMP_NUM_THREADS="1",
            PYTHONUNBUFFERED="1",
        )
        self.done = {}

    def run(self, tokens) -> str:
        """Runs one command (small) and returns its output; fails the test on a
        non-zero exit or a traceback."""
        cmd = small(tokens)
        key = shlex.join(cmd)
        if key in self.done:
            return self.done[key]
        if is_training(tokens):
            for root, _, files in os.walk(os.path.join(self.path, "checkpoints")):
                if "checkpoint_last.pt" in files:
                    os.remove(os.path.join(root, "checkpoint_last.pt"))
        proc = subprocess.run(cmd, cwd=self.path, env=self.env, capture_output=True, text=True, timeout=600)
        out = proc.stdout + proc.stderr
        if proc.returncode != 0 or "Traceback (most recent call last)" in out:
            pytest.fail(f"README command failed (exit {proc.returncode}):\n{key}\n\n{out[-4000:]}")
        self.done[key] = out
        return out


CONFIG_GROUPS = ("task", "model", "criterion", "optimizer", "lr_scheduler", "optimization", "dataset")


def saved_config(checkpoint: str) -> dict:
    """The run's configuration as fairseq saved it with the weights."""
    cfg = torch.load(checkpoint, map_location="cpu")["cfg"]  # the plugin allows fairseq's types
    # a command-line run keeps its model settings as an argparse Namespace
    return {g: dict(vars(cfg[g]) if isinstance(cfg[g], argparse.Namespace) else cfg[g]) for g in CONFIG_GROUPS}


def differences(a: dict, b: dict) -> dict:
    # the command line's model Namespace holds every flag, Hydra's only the model's
    return {f"{g}.{k}": (a[g][k], b[g][k]) for g in CONFIG_GROUPS for k in sorted(set(a[g]) & set(b[g]))
            if a[g][k] != b[g][k]}


def save_dir(out: str):
    dirs = re.findall(r"Saved checkpoint (\S+)/checkpoint_\w+\.pt", out)
    return dirs[-1] if dirs else None


@pytest.fixture(scope="module")
def readme():
    with open(README, encoding="utf-8") as f:
        return f.read()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return Workspace(tmp_path_factory.mktemp("readme"))


def test_every_shell_block_is_marked(readme):
    blocks = fenced_blocks(readme)
    assert blocks
    for marker, lang, body in blocks:
        assert lang, f"fenced block without a language:\n{body[:200]}"
        if lang in SHELL_LANGS:
            assert marker == RECIPE or marker.startswith(NOT_RECIPE), (
                f"shell block not marked as {RECIPE} or '{NOT_RECIPE} WHY -->':\n{body[:200]}")
    assert len(recipes(readme)) >= 4


def test_readme_recipes_run_and_agree(readme, workspace):
    configs = {}  # checkpoints folder -> saved configuration of each run there
    for block in recipes(readme):
        for tokens in commands(block):
            fresh = shlex.join(small(tokens)) not in workspace.done
            out = workspace.run(tokens)
            if is_training(tokens) and fresh:
                folder = save_dir(out)
                assert folder and "valid on 'valid' subset" in out, f"no checkpoint or validation:\n{out[-2000:]}"
                last = os.path.join(workspace.path, folder, "checkpoint_last.pt")
                configs.setdefault(folder, []).append(saved_config(last))
    assert len(configs) >= 4, list(configs)
    # the shipped Hydra configs run in the working directory and leave no .hydra/
    assert not os.path.exists(os.path.join(workspace.path, ".hydra"))
    assert not os.path.exists(os.path.join(workspace.path, "outputs"))
    for folder, runs in configs.items():
        for other in runs[1:]:
            assert not differences(runs[0], other), (
                f"the command-line and Hydra recipes writing {folder} differ: {differences(runs[0], other)}")


@pytest.mark.parametrize("mutate, expected", [
    # a misspelled flag
    (lambda t: [x.replace("--dp-clip-norm", "--dp-clip-nrom") for x in t], "unrecognized arguments"),
    # an RGP flag on a LoRA architecture ("the rest as for RGP")
    (lambda t: t + ["--rgp-rank", "8"] if "roberta_lora_minilm" in t else None, "unrecognized arguments"),
])
def test_a_wrong_recipe_fails(readme, workspace, mutate, expected):
    """The runner above catches a broken recipe (it needs the prepared data, so it
    runs after the recipes)."""
    trains = [t for block in recipes(readme) for t in commands(block) if t[0] == "fairseq-train"]
    broken = next(m for m in (mutate(t) for t in trains) if m is not None and m not in trains)
    with pytest.raises(pytest.fail.Exception, match=expected):
        workspace.run(broken)
