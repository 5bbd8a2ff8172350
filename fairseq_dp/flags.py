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


# the plugin's models, the fairseq model whose flags they extend, and a title
PLUGIN_MODELS = (
    ("roberta_rgp", "roberta", "RGP (--arch roberta_rgp, _base, _large, _minilm, _tiny)"),
    ("roberta_lora", "roberta", "DP-LoRA (--arch roberta_lora, _base, _large, _minilm, _tiny)"),
    ("roberta_pooled", "roberta", "DP full fine-tuning of a converted encoder "
     "(--arch roberta_pooled, roberta_pooled_minilm, roberta_pooled_tiny)"),
    ("transformer_lm_lora", "transformer_lm", "DP-LoRA for causal LMs (--arch transformer_lm_lora, "
     "_gpt2_small, _gpt2_medium, _gpt2_large)"),
    ("transformer_lm_rgp", "transformer_lm", "RGP for causal LMs (--arch transformer_lm_rgp, "
     "_gpt2_small, _gpt2_medium, _gpt2_large)"),
)


def _model_actions(model_name: str, base_name: str) -> Dict[str, argparse.Action]:
    """The flags ``model_name`` adds to its fairseq base model's, by dest."""
    from fairseq.models import MODEL_REGISTRY

    base = argparse.ArgumentParser(add_help=False)
    MODEL_REGISTRY[base_name].add_args(base)
    known = {a.dest for a in base._actions}
    parser = argparse.ArgumentParser(add_help=False)
    MODEL_REGISTRY[model_name].add_args(parser)
    return {a.dest: a for a in parser._actions if a.dest not in known and a.option_strings}


def _plugin_model_sections() -> List[Tuple[str, List[Tuple[str, str, str, str]]]]:
    """(title, rows) for the plugin models' flags: each flag once, in the
    section of the models that have it, with the default of every arch."""
    from fairseq.models import ARCH_CONFIG_REGISTRY, ARCH_MODEL_INV_REGISTRY

    owners: Dict[str, List[str]] = {}
    actions: Dict[str, argparse.Action] = {}
    helps: Dict[str, Dict[str, List[str]]] = {}  # dest -> help -> models
    for model_name, base_name, _ in PLUGIN_MODELS:
        for dest, action in _model_actions(model_name, base_name).items():
            owners.setdefault(dest, []).append(model_name)
            actions.setdefault(dest, action)
            helps.setdefault(dest, {}).setdefault(" ".join((action.help or "").split()), []).append(model_name)
    arch_defaults = {}
    for model_name, _, _ in PLUGIN_MODELS:
        for arch in sorted(ARCH_MODEL_INV_REGISTRY[model_name]):
            args = argparse.Namespace()
            ARCH_CONFIG_REGISTRY[arch](args)
            arch_defaults[arch] = (model_name, args)
    titles = {m: t for m, _, t in PLUGIN_MODELS}
    groups: Dict[Tuple[str, ...], List[Tuple[str, str, str, str]]] = {}
    for dest, models in owners.items():
        values: Dict[str, List[str]] = {}
        for arch, (model_name, args) in arch_defaults.items():
            if model_name in models:
                values.setdefault(str(getattr(args, dest, None)), []).append(arch)
        if len(values) == 1:
            default = next(iter(values))
        else:
            default = "; ".join(f"{v} ({', '.join(a)})" for v, a in values.items())
        action = actions[dest]
        # a flag whose help differs between models (encoder vs decoder layers) shows each
        help_text = next(iter(helps[dest])) if len(helps[dest]) == 1 else " | ".join(
            f"{', '.join(m + '*' for m in ms)}: {h}" for h, ms in helps[dest].items())
        groups.setdefault(tuple(models), []).append(
            (action.option_strings[0], _metavar(action), help_text, default))
    sections = []
    for models, rows in sorted(groups.items(), key=lambda g: (-len(g[0]), g[0])):
        if len(models) == 1:
            title = titles[models[0]]
        else:
            title = "plugin models " + ", ".join(f"{m}*" for m in models) + " (defaults per arch)"
        sections.append((title, rows))
    return sections


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
    for title, rows in _plugin_model_sections():
        sections += ["", title, _format(rows)]
    sections += [
        "",
        "fairseq's plain RoBERTa archs (roberta, roberta_base, roberta_large) train every trainable "
        "parameter with DP under --task dp_sentence_prediction, and its plain transformer_lm archs "
        "under --task dp_language_modeling; their flags are fairseq's.",
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
