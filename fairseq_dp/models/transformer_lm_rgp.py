# Copyright (c) fairseq_dp contributors. MIT license.
"""``transformer_lm_rgp``: a GPT-2-shaped fairseq ``transformer_lm`` trained
with RGP's low-rank reparametrization (Yu et al., ICML 2021).

fairseq builds its own ``TransformerLanguageModel``; then the chosen matrices
of every decoder layer (``--rgp-targets``, default all six: q, k, v, out, fc1,
fc2, as ``roberta_rgp``) become :class:`LowRankLinear`, whose weights train
through rank-``--rgp-rank`` gradient carriers. Everything else (embeddings and
the tied output projection, LayerNorms, biases) is frozen.

``LowRankLinear`` keeps ``nn.Linear``'s parameter names and adds none, so a
plain ``transformer_lm`` checkpoint loads unchanged, and a trained checkpoint's
weights are a plain ``transformer_lm``'s: ``fairseq-dp-export`` writes it as
one (architecture ``transformer_lm``, task ``language_modeling``, privacy ledger
at the top level) for stock fairseq.

Architectures: ``transformer_lm_rgp`` and ``transformer_lm_rgp_gpt2_small``
(OpenAI's GPT-2 small shape), ``_gpt2_medium``, ``_gpt2_large``; see
:mod:`fairseq_dp.models.causal_lm`.
"""

from fairseq.dataclass.utils import gen_parser_from_dataclass
from fairseq.models import register_model, register_model_architecture
from fairseq.models.transformer_lm import TransformerLanguageModel, TransformerLanguageModelConfig
from fairseq.utils import safe_getattr

from ..modules import LowRankLinear
from .causal_lm import PLAIN_LM_ARCH, check_causal_lm_args, finish_build, gpt2_architecture
from .roberta_rgp import RGP_DEFAULTS
from .swap import ALL_TARGETS, CARRIER_SOURCES, RGP_HELP, add_rgp, check_rgp_args, parse_targets
from .transformer_lm_lora import add_non_private_baseline_arg

LM_RGP_DEFAULTS = {**RGP_DEFAULTS, "rgp_targets": ALL_TARGETS, "non_private_baseline": False}
# a trained checkpoint's weights are plain: fairseq-dp-export renames the arch
PLAIN_ARCH = {
    "transformer_lm_rgp": PLAIN_LM_ARCH,
    "transformer_lm_rgp_gpt2_small": PLAIN_LM_ARCH,
    "transformer_lm_rgp_gpt2_medium": PLAIN_LM_ARCH,
    "transformer_lm_rgp_gpt2_large": PLAIN_LM_ARCH,
}


@register_model("transformer_lm_rgp")
class TransformerLMRGPModel(TransformerLanguageModel):
    @staticmethod
    def add_args(parser):
        # transformer_lm's own options (fairseq adds them from its dataclass)
        gen_parser_from_dataclass(parser, TransformerLanguageModelConfig(), delete_default=True)
        parser.add_argument("--rgp-rank", type=int, metavar="R", help=RGP_HELP["rgp_rank"])
        parser.add_argument("--rgp-power-iters", type=int, metavar="N", help=RGP_HELP["rgp_power_iters"])
        parser.add_argument("--rgp-carrier-source", choices=CARRIER_SOURCES, help=RGP_HELP["rgp_carrier_source"])
        parser.add_argument("--rgp-reference-projection", action="store_true",
                            help=RGP_HELP["rgp_reference_projection"])
        parser.add_argument("--rgp-targets", type=str, metavar="LIST", help=RGP_HELP["rgp_targets"])
        add_non_private_baseline_arg(parser)

    @classmethod
    def build_model(cls, args, task):
        check_causal_lm_args(args, task)
        check_rgp_args(args, "transformer_lm_rgp")
        parse_targets(args.rgp_targets, "--rgp-targets")  # refused before the model is built
        model = super().build_model(args, task)
        targets = add_rgp(model, args.rgp_rank, args.rgp_reference_projection, args.rgp_targets,
                          "transformer_lm_rgp")
        finish_build(model, args, "transformer_lm_rgp", f"RGP rank {args.rgp_rank} on {','.join(targets)}")
        return model

    def low_rank_modules(self):
        return [m for m in self.modules() if isinstance(m, LowRankLinear)]


def lm_rgp_defaults(args) -> None:
    for name, default in LM_RGP_DEFAULTS.items():
        if safe_getattr(args, name, None) is None:
            setattr(args, name, default)


@register_model_architecture("transformer_lm_rgp", "transformer_lm_rgp")
def transformer_lm_rgp_architecture(args):
    """GPT-2 small's shape (OpenAI's 124M model)."""
    lm_rgp_defaults(args)
    gpt2_architecture(args, "gpt2_small")


@register_model_architecture("transformer_lm_rgp", "transformer_lm_rgp_gpt2_small")
def transformer_lm_rgp_gpt2_small(args):
    """OpenAI's GPT-2 small: 768 x 12 layers, 12 heads, FFN 3072."""
    lm_rgp_defaults(args)
    gpt2_architecture(args, "gpt2_small")


@register_model_architecture("transformer_lm_rgp", "transformer_lm_rgp_gpt2_medium")
def transformer_lm_rgp_gpt2_medium(args):
    """OpenAI's GPT-2 medium: 1024 x 24 layers, 16 heads, FFN 4096."""
    lm_rgp_defaults(args)
    gpt2_architecture(args, "gpt2_medium")


@register_model_architecture("transformer_lm_rgp", "transformer_lm_rgp_gpt2_large")
def transformer_lm_rgp_gpt2_large(args):
    """OpenAI's GPT-2 large: 1280 x 36 layers, 20 heads, FFN 5120."""
    lm_rgp_defaults(args)
    gpt2_architecture(args, "gpt2_large")
