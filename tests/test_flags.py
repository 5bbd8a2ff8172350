"""The plugin's flags and metrics are listed from the command line: by
``fairseq-dp-flags`` and after fairseq's own ``fairseq-train --help``.

The oracle for which flags exist is fairseq's own parser: what
``parse_args_and_arch`` adds for the plugin's task and archs, minus what it
adds for fairseq's ``sentence_prediction`` and ``roberta``. Their help texts
and the defaults each arch gives them must appear in the listing. The metrics
are every name the plugin's sources log through ``fairseq.logging.metrics``.
"""

import os
import re
import subprocess
import sys

import pytest
from fairseq import options

import fairseq_dp

from helpers import PLUGIN_DIR

BIN = os.path.dirname(sys.executable)
ARCHS = ["roberta_rgp", "roberta_rgp_minilm", "roberta_lora", "roberta_lora_base", "roberta_pooled",
         "roberta_pooled_minilm"]
# causal LMs: (arch, the family of flags the plugin adds besides --dp-*)
LM_ARCHS = {"transformer_lm": "--untie-output-embedding", "transformer_lm_lora": "--lora-",
            "transformer_lm_lora_gpt2_medium": "--lora-", "transformer_lm_rgp": "--rgp-"}


def fairseq_parse(task, arch):
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, ["DATA", "--user-dir", PLUGIN_DIR, "--task", task, "--arch", arch])
    return parser, args


def plugin_actions(arch):
    """(action, parsed default) of every flag the plugin adds for ``arch``."""
    lm = arch.startswith("transformer_lm")
    fairseq_parser, _ = fairseq_parse(*(("language_modeling", "transformer_lm") if lm
                                        else ("sentence_prediction", "roberta")))
    theirs = {a.dest for a in fairseq_parser._actions}
    parser, args = fairseq_parse("dp_language_modeling" if lm else "dp_sentence_prediction", arch)
    return [(a, getattr(args, a.dest, a.default)) for a in parser._actions
            if a.dest not in theirs and a.option_strings]


def run(cmd):
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


@pytest.fixture(scope="module", params=["fairseq-dp-flags", "fairseq-train --help"])
def listing(request):
    if request.param == "fairseq-dp-flags":
        return run([sys.executable, "-m", "fairseq_dp.flags"])
    out = run([os.path.join(BIN, "fairseq-train"), "--user-dir", PLUGIN_DIR, "--task", "dp_sentence_prediction",
               "--help"])
    assert out.startswith("usage: fairseq-train")  # fairseq's own help comes first, unchanged
    return out


def block(listing, flag):
    """The lines that describe ``flag``: its line up to the next flag or section."""
    lines = listing.splitlines()
    starts = [i for i, line in enumerate(lines) if re.match(rf"^  {re.escape(flag)}( |$)", line)]
    assert len(starts) == 1, f"{flag} listed {len(starts)} times"
    end = starts[0] + 1
    while end < len(lines) and lines[end].startswith("    "):
        end += 1
    return " ".join(" ".join(lines[starts[0]:end]).split())


def listed_default(text, arch):
    default = text.split("default: ", 1)[1]
    if " (" not in default:
        return default
    for group in default.split("; "):
        value, archs = group.split(" (", 1)
        if arch in re.findall(r"[a-z0-9_]+", archs):
            return value
    raise AssertionError(f"no default for {arch} in {default!r}")


@pytest.mark.parametrize("arch", ARCHS + list(LM_ARCHS))
def test_every_plugin_flag_with_its_help_and_default(listing, arch):
    actions = plugin_actions(arch)
    flags = {a.option_strings[0] for a, _ in actions}
    # the families the issue names, so that the oracle itself is not empty
    assert any(f.startswith("--dp-") for f in flags)
    family = LM_ARCHS.get(arch) or ("--rgp-" if "rgp" in arch else "--lora-" if "lora" in arch else "--layer-norm")
    assert any(f.startswith(family) for f in flags)
    for action, default in actions:
        text = block(listing, action.option_strings[0])
        assert " ".join((action.help or "").split()) in text
        assert listed_default(text, arch) == str(default), (action.dest, arch)


def test_every_logged_metric_is_explained(listing):
    names = set()
    for root, _, files in os.walk(os.path.dirname(fairseq_dp.__file__)):
        for name in files:
            if name.endswith(".py"):
                with open(os.path.join(root, name)) as f:
                    source = f.read()
                names |= set(re.findall(r"(?:log_scalar|log_derived|add_meter)\(\s*\"(\w+)\"", source))
    assert {"dp_sigma", "dp_clipped", "dp_epsilon"} <= names
    metrics = listing.split("metrics in the train log lines and epoch summaries", 1)[1]
    for name in names:
        assert re.search(rf"^  {name}\n      \S", metrics, re.M), name


def test_no_listing_without_help():
    """A plain run (no --help) prints nothing of the listing."""
    out = run([sys.executable, "-c", "import sys; sys.argv = ['fairseq-train']; import fairseq_dp"])
    assert "fairseq_dp: the flags" not in out
