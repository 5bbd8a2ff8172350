# Copyright (c) fairseq_dp contributors. MIT license.
"""``transformer_lm_lora``: a GPT-2-shaped fairseq ``transformer_lm`` with
frozen pretrained weights plus LoRA adapters (DP-LoRA, Yu et al. ICLR 2022).

fairseq builds its own ``TransformerLanguageModel``; then the chosen matrices
of every decoder layer (``--lora-targets``, default ``q,v`` as Yu et al.'s
GPT-2 recipe) become :class:`LoRALinear` with rank ``--lora-rank`` (default 4)
and scale ``--lora-alpha / --lora-rank`` (default 32 / 4). Everything else is
frozen, the tied token embedding / output projection included: only the LoRA
factors train.

Parameter names are ``transformer_lm``'s plus ``lora_A`` / ``lora_B``, so a
plain ``transformer_lm`` checkpoint (``fairseq-dp-convert`` of a GPT-2) loads;
the factors missing from it keep their initialization (B = 0: the model starts
as the checkpoint). ``python -m fairseq_dp.merge_lora`` turns a trained
checkpoint into a plain ``transformer_lm`` one that stock fairseq loads.

Architectures (GPT-2's shape: see :mod:`fairseq_dp.models.causal_lm`):
``transformer_lm_lora`` and ``transformer_lm_lora_gpt2_small`` (768 x 12
layers, 12 heads, FFN 3072), ``_gpt2_medium`` (1024 x 24, 16, 4096),
``_gpt2_large`` (1280 x 36, 20, 5120). These follow OpenAI's GPT-2 sizes, not
fairseq's ``transformer_lm_gpt2_small`` (which is GPT-2 medium's size).
"""

import logging

from fairseq.dataclass.utils import gen_parser_from_dataclass
from fairseq.models import register_model, register_model_architecture
from fairseq.models.transformer_lm import TransformerLanguageModel, TransformerLanguageModelConfig
from fairseq.utils import safe_getattr

from ..modules import LoRALinear
from .causal_lm import DP_LM_TASK, PLAIN_LM_ARCH, check_causal_lm_args, finish_build, gpt2_architecture
from .swap import ALL_TARGETS, add_lora, check_lora_args, keep_missing_parameters

logger = logging.getLogger(__name__)

# Yu et al.'s GPT-2 recipe: rank 4, alpha 32, adapters on the query and value projections
LM_LORA_DEFAULTS = {"lora_rank": 4, "lora_alpha": 32.0, "lora_targets": "q,v", "non_private_baseline": False}
# the plain architecture each LoRA one merges into: the saved options carry
# every size, so stock transformer_lm rebuilds any of them
PLAIN_ARCH = {
    "transformer_lm_lora": PLAIN_LM_ARCH,
    "transformer_lm_lora_gpt2_small": PLAIN_LM_ARCH,
    "transformer_lm_lora_gpt2_medium": PLAIN_LM_ARCH,
    "transformer_lm_lora_gpt2_large": PLAIN_LM_ARCH,
}


def add_non_private_baseline_arg(parser) -> None:
    parser.add_argument(
        "--non-private-baseline", action="store_true",
        help=f"train this DP architecture under a non-DP task (fairseq's language_modeling) on purpose, "
        f"without any privacy; without it only --task {DP_LM_TASK} may train it",
    )


@register_model("transformer_lm_lora")
class TransformerLMLoRAModel(TransformerLanguageModel):
    @staticmethod
    def add_args(parser):
        # transformer_lm's own options (fairseq adds them from its dataclass)
        gen_parser_from_dataclass(parser, TransformerLanguageModelConfig(), delete_default=True)
        parser.add_argument("--lora-rank", type=int, metavar="R",
                            help="rank of the LoRA factors B (out x R) and A (R x in)")
        parser.add_argument("--lora-alpha", type=float, metavar="A",
                            help="LoRA scale numerator: the update is (A / R) * B A")
        parser.add_argument("--lora-targets", type=str, metavar="LIST",
                            help="comma-separated matrices of every decoder layer that get adapters, "
                            f"from {ALL_TARGETS}")
        add_non_private_baseline_arg(parser)

    @classmethod
    def build_model(cls, args, task):
        check_causal_lm_args(args, task)
        check_lora_args(args.lora_rank, args.lora_targets)  # refused before the model is built
        model = super().build_model(args, task)
        targets = add_lora(model, args.lora_rank, args.lora_alpha, args.lora_targets, "transformer_lm_lora")
        finish_build(model, args, "transformer_lm_lora",
                     f"LoRA rank {args.lora_rank} on {','.join(targets)}, scale {args.lora_alpha / args.lora_rank:g}")
        return model

    def lora_modules(self):
        return [m for m in self.modules() if isinstance(m, LoRALinear)]

    def upgrade_state_dict_named(self, state_dict, name):
        super().upgrade_state_dict_named(state_dict, name)
        # a plain transformer_lm checkpoint has no adapters: they keep their initialization
        added = keep_missing_parameters(self, state_dict, name, LoRALinear, ("lora_A", "lora_B"))
        if added:
            logger.info(f"transformer_lm_lora: {added} LoRA factors not in the checkpoint keep their initialization")


def lm_lora_defaults(args) -> None:
    for name, default in LM_LORA_DEFAULTS.items():
        if safe_getattr(args, name, None) is None:
            setattr(args, name, default)


@register_model_architecture("transformer_lm_lora", "transformer_lm_lora")
def transformer_lm_lora_architecture(args):
    """GPT-2 small's shape (OpenAI's 124M model)."""
    lm_lora_defaults(args)
    gpt2_architecture(args, "gpt2_small")


@register_model_architecture("transformer_lm_lora", "transformer_lm_lora_gpt2_small")
def transformer_lm_lora_gpt2_small(args):
    """OpenAI's GPT-2 small: 768 x 12 layers, 12 heads, FFN 3072."""
    lm_lora_defaults(args)
    gpt2_architecture(args, "gpt2_small")


@register_model_architecture("transformer_lm_lora", "transformer_lm_lora_gpt2_medium")
def transformer_lm_lora_gpt2_medium(args):
    """OpenAI's GPT-2 medium: 1024 x 24 layers, 16 heads, FFN 4096."""
    lm_lora_defaults(args)
    gpt2_architecture(args, "gpt2_medium")


@register_model_architecture("transformer_lm_lora", "transformer_lm_lora_gpt2_large")
def transformer_lm_lora_gpt2_large(args):
    """OpenAI's GPT-2 large: 1280 x 36 layers, 20 heads, FFN 5120."""
    lm_lora_defaults(args)
    gpt2_architecture(args, "gpt2_large")
