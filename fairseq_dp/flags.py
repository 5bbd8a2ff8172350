# Copyright (c) fairseq_dp contributors. MIT license.
"""Every flag the plugin adds to ``fairseq-train``, with its help and default,
and every metric it logs.

    fairseq-dp-flags            (or: python -m fairseq_dp.flags)

Why this exists: ``fairseq-train --help`` cannot list a task's or a model's
flags. fairseq 0.12's ``parse_args_and_arch`` first parses the command line
with a parser that knows only fairseq's common options, to learn ``--task`` and
``--arch``, and adds the task's and the model's flags after that; ``--help`` is
acted on (printed, then exit) by that first parse. Nothing of the plugin runs
between the two short of patching fairseq. So the plugin prints its own flags:
with this command, and after fairseq's help when ``fairseq-train`` (or
``fairseq-validate``, ``python -m fairseq_cli.train``) is given ``--help``
together with ``--user-dir`` pointing at the plugin
(:func:`show_after_fairseq_help`, registered when the plugin is imported).
"""

import argparse
import atexit
import dataclasses
import os
import sys
import textwrap
from typing import Dict, List, Tuple

# the metrics the plugin logs (fairseq.logging.metrics), as the help explains them
METRICS = {
    "dp_epsilon": (
        "privacy spent so far: the ε of the (ε, δ = --dp-delta) guarantee after every update "
        "taken, counting the updates in the privacy ledger saved with the weights (a resumed or "
        "continued run starts from it). Shown in the train and validation log lines and epoch summaries."
    ),
    "dp_sigma": (
        "the noise multiplier σ in use: the clipped sum gets N(0, σ²C²) noise once per logical "
        "batch. Calibrated before training from --dp-target-epsilon, or --dp-noise-multiplier."
    ),
    "dp_clipped": (
        "fraction of the examples of the logged updates whose per-example gradient norm exceeded "
        "--dp-clip-norm C and was scaled down to C (0 to 1). Near 1 is normal with DP's small "
        "clip norms (the update is then mostly the direction of each gradient); near 0 means C is "
        "larger than the gradients, so the noise σC is larger than it needs to be. It is computed "
        "from the private examples and logged without noise."
    ),
    "dp_rng": (
        "only in runs with --dp-insecure-seeded-rng, on every train and validation line: "
        "'seeded-INSECURE'. Their noise and samples are functions of --seed, which every "
        "checkpoint stores, so their ε holds only against someone who does not know the seed."
    ),
}


def _dataclass_flags(config_cls, parent_cls) -> List[Tuple[str, str, str, str]]:
    """(flag, metavar, help, default) of the fields ``config_cls`` adds to
    ``parent_cls`` (fairseq's own config), skipping values read from other
    groups (``II(...)``)."""
    from fairseq.dataclass.utils import gen_parser_from_dataclass

    inherited = {f.name for f in dataclasses.fields(parent_cls)}
    parser = argparse.ArgumentParser(add_help=False)
    gen_parser_from_dataclass(parser, config_cls())
    by_dest = {a.dest: a for a in parser._actions}
    rows = []
    for f in dataclasses.fields(config_cls):
        if f.name in inherited or f.name not in by_dest:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if isinstance(default, str) and default.startswith("${"):
            continue
        action = by_dest[f.name]
        rows.append((action.option_strings[0], _metavar(action), f.metadata.get("help", ""), str(default)))
    return rows


def _metavar(action) -> str:
    if action.nargs == 0:
        return ""
    if action.choices:
        return "{" + ",".join(str(c) for c in action.choices) + "}"
    return action.metavar or action.dest.upper()


def _model_flags(model_name: str, archs=None) -> List[Tuple[str, str, str, str]]:
    """The flags a plugin model adds to RoBERTa's, with the default of each
    arch (of ``archs``, default the model's own)."""
    from fairseq.models import ARCH_CONFIG_REGISTRY, ARCH_MODEL_INV_REGISTRY, MODEL_REGISTRY
    from fairseq.models.roberta import RobertaModel

    base = argparse.ArgumentParser(add_help=False)
    RobertaModel.add_args(base)
    known = {a.dest for a in base._actions}
    parser = argparse.ArgumentParser(add_help=False)
    MODEL_REGISTRY[model_name].add_args(parser)
    archs = sorted(archs or ARCH_MODEL_INV_REGISTRY[model_name])
    defaults = {}
    for arch in archs:
        args = argparse.Namespace()
        ARCH_CONFIG_REGISTRY[arch](args)
        defaults[arch] = args
    rows = []
    for action in parser._actions:
        if action.dest in known:
            continue
        values: Dict[str, List[str]] = {}
        for arch in archs:
            value = getattr(defaults[arch], action.dest, None)
            values.setdefault(str(value), []).append(arch)
        if len(values) == 1:
            default = next(iter(values))
        else:
            default = "; ".join(f"{v} ({', '.join(a)})" for v, a in values.items())
        rows.append((action.option_strings[0], _metavar(action), action.help or "", default))
    return rows


def _format(rows, width=100) -> str:
    out = []
    for flag, metavar, help_text, default in rows:
        out.append(f"  {flag} {metavar}".rstrip())
        body = textwrap.fill(" ".join(help_text.split()), width, initial_indent=" " * 6,
                             subsequent_indent=" " * 6, break_on_hyphens=False)
        out.append(body)
        out.append(textwrap.fill(f"default: {default}", width, initial_indent=" " * 6,
                                 subsequent_indent=" " * 8, break_on_hyphens=False))
    return "\n".join(out)


def plugin_help() -> str:
    import fairseq_dp  # noqa: F401  (registers the task, criterion and models)
    from fairseq.criterions.sentence_prediction import SentencePredictionConfig as CriterionBase
    from fairseq.tasks.sentence_prediction import SentencePredictionConfig as TaskBase

    from .criterions.dp_sentence_prediction import DPSentencePredictionCriterionConfig
    from .tasks.dp_sentence_prediction import DPSentencePredictionConfig

    from fairseq.tasks.language_modeling import LanguageModelingConfig

    from .criterions.dp_language_modeling import DPLanguageModelingCriterionConfig
    from .dp_config import DPConfig
    from .tasks.dp_language_modeling import DPLanguageModelingConfig

    dp_rows = _dataclass_flags(DPSentencePredictionConfig, TaskBase)
    dp_flags = {r[0] for r in dp_rows}
    sections = [
        "fairseq_dp: the flags the plugin adds to fairseq-train (fairseq's --help cannot list a "
        "task's or model's flags; see fairseq-dp-flags --help for why)",
        "",
        "DP training, every DP task: --task dp_sentence_prediction --criterion dp_sentence_prediction "
        "(classification), --task dp_language_modeling --criterion dp_language_modeling (causal LMs)",
        _format(dp_rows),
    ]
    criterion_rows = _dataclass_flags(DPSentencePredictionCriterionConfig, CriterionBase)
    if criterion_rows:
        sections += ["", "criterion dp_sentence_prediction", _format(criterion_rows)]
    lm_rows = [r for r in _dataclass_flags(DPLanguageModelingConfig, LanguageModelingConfig)
               if r[0] not in dp_flags]
    sections += ["", "task dp_language_modeling (besides fairseq's language_modeling flags)", _format(lm_rows)]
    lm_criterion_rows = _dataclass_flags(DPLanguageModelingCriterionConfig, DPConfig)
    sections += ["", "criterion dp_language_modeling", _format(lm_criterion_rows)]
    from fairseq.models import ARCH_MODEL_INV_REGISTRY

    shared = None
    model_sections = []
    plugin_models = (("roberta_rgp", "RGP (--arch roberta_rgp, _base, _large, _minilm)"),
                              ("roberta_lora", "DP-LoRA (--arch roberta_lora, _base, _large, _minilm)"),
                              ("roberta_pooled", "DP full fine-tuning of a converted encoder "
                               "(--arch roberta_pooled, roberta_pooled_minilm)"))
    for model_name, title in plugin_models:
        rows = _model_flags(model_name)
        flags = {r[0] for r in rows}
        shared = flags if shared is None else shared & flags
        model_sections.append((title, rows))
    every_arch = [a for name, _ in plugin_models for a in ARCH_MODEL_INV_REGISTRY[name]]
    common = [r for r in _model_flags(plugin_models[0][0], every_arch) if r[0] in shared]
    sections += ["", "every plugin model (roberta_rgp*, roberta_lora*, roberta_pooled*; defaults per arch)",
                 _format(common)]
    for title, rows in model_sections:
        own = [r for r in rows if r[0] not in shared]
        if own:
            sections += ["", title, _format(own)]
    sections += [
        "",
        "fairseq's plain RoBERTa archs (roberta, roberta_base, roberta_large) train every trainable "
        "parameter with DP under --task dp_sentence_prediction; their flags are fairseq's.",
        "",
        "metrics in the train log lines and epoch summaries",
    ]
    for name, text in METRICS.items():
        sections.append(f"  {name}")
        sections.append(textwrap.fill(text, 100, initial_indent=" " * 6, subsequent_indent=" " * 6,
                                      break_on_hyphens=False))
    return "\n".join(sections) + "\n"


def _is_fairseq_cli(argv0: str) -> bool:
    name = os.path.basename(argv0)
    # fairseq's own commands, not the plugin's (fairseq-dp-*), whose --help is their own
    return (name.startswith("fairseq-") and not name.startswith("fairseq-dp-")) or \
        os.path.basename(os.path.dirname(argv0)) == "fairseq_cli"


def show_after_fairseq_help() -> None:
    """With ``--help`` on a fairseq command line, print the plugin's flags once
    fairseq has printed its own help and exits. Only registers an exit
    handler; nothing of fairseq changes."""
    argv = sys.argv
    if not argv or not _is_fairseq_cli(argv[0]) or not any(a in ("-h", "--help") for a in argv[1:]):
        return
    if getattr(show_after_fairseq_help, "registered", False):
        return
    show_after_fairseq_help.registered = True

    def show():
        sys.stdout.write("\n" + plugin_help())
        sys.stdout.flush()

    atexit.register(show)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="fairseq-dp-flags", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.parse_args(argv)
    sys.stdout.write(plugin_help())


if __name__ == "__main__":
    main()
