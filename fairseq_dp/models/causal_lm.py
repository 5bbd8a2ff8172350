# Copyright (c) fairseq_dp contributors. MIT license.
"""What the plugin's causal language models (``transformer_lm_lora``,
``transformer_lm_rgp``) share: GPT-2's shape as fairseq ``transformer_lm``
options, and the set-up after fairseq has built the stock model.

GPT-2 in fairseq's ``transformer_lm`` terms: learned positions
(``--decoder-learned-pos``), unscaled embeddings (``--no-scale-embedding``),
``gelu_accurate`` (GPT-2's tanh GELU), pre-LayerNorm with a final LayerNorm
(``--decoder-normalize-before``, which ``transformer_lm`` always sets), the
output projection tied to the token embedding
(``--share-decoder-input-output-embed``), 1024 positions, dropout 0.1 on
activations and attention weights. The sizes are OpenAI's GPT-2 small /
medium / large (124M / 355M / 774M parameters with its 50,257-token vocabulary).
Note that fairseq's own ``transformer_lm_gpt2_small`` is 1024 x 24 layers
(GPT-2 *medium*'s size) and ``transformer_lm_gpt2_medium`` is 1280 x 36 (GPT-2
*large*'s), with fairseq's sinusoidal positions and scaled embeddings; the
plugin's ``_gpt2_*`` archs follow OpenAI's names.

The same shape on stock fairseq (full fine-tuning, or loading a merged or
exported checkpoint) is ``--arch transformer_lm`` plus
:func:`stock_transformer_lm_flags`. fairseq runs no architecture function for
``--arch transformer_lm`` itself, so its dataclass defaults apply to every
flag left out: ``--decoder-input-dim`` and ``--decoder-output-dim`` default to
512 whatever ``--decoder-embed-dim`` is (a width other than 512 without them
gets extra projection matrices), and ``--decoder-normalize-before`` is off.
"""

import logging
from typing import Dict, List, Tuple

from fairseq.models.transformer_lm import base_lm_architecture
from fairseq.utils import safe_getattr

from .sentence_encoder import check_trained_privately

logger = logging.getLogger(__name__)

# (embed dim, layers, attention heads, FFN dim) of OpenAI's GPT-2 sizes
GPT2_SIZES: Dict[str, Tuple[int, int, int, int]] = {
    "gpt2_small": (768, 12, 12, 3072),
    "gpt2_medium": (1024, 24, 16, 4096),
    "gpt2_large": (1280, 36, 20, 5120),
}
GPT2_POSITIONS = 1024
# what stock `--arch transformer_lm` needs for GPT-2's shape, besides the sizes
STOCK_GPT2_FLAGS = ("--decoder-learned-pos", "--no-scale-embedding", "--activation-fn", "gelu_accurate",
                    "--decoder-normalize-before", "--share-decoder-input-output-embed")


def stock_transformer_lm_flags(size: str = "gpt2_small") -> List[str]:
    """The flags that make fairseq's ``--arch transformer_lm`` GPT-2 ``size``
    (with 1024 positions: add ``--max-target-positions 1024`` when
    ``--tokens-per-sample`` is shorter and a GPT-2 checkpoint is loaded)."""
    embed_dim, layers, heads, ffn = GPT2_SIZES[size]
    return ["--arch", "transformer_lm", *STOCK_GPT2_FLAGS, "--dropout", "0.1", "--attention-dropout", "0.1",
            "--decoder-embed-dim", str(embed_dim), "--decoder-input-dim", str(embed_dim),
            "--decoder-output-dim", str(embed_dim), "--decoder-layers", str(layers),
            "--decoder-attention-heads", str(heads), "--decoder-ffn-embed-dim", str(ffn)]


# the stock architecture every plugin causal LM's weights load into
PLAIN_LM_ARCH = "transformer_lm"
DP_LM_TASK = "dp_language_modeling"


def gpt2_architecture(args, size: str = "gpt2_small") -> None:
    """GPT-2's shape and ``size`` for every option the command line leaves
    unset (fairseq's arch-function convention: explicit flags win)."""
    embed_dim, layers, heads, ffn = GPT2_SIZES[size]
    args.decoder_embed_dim = safe_getattr(args, "decoder_embed_dim", embed_dim)
    args.decoder_layers = safe_getattr(args, "decoder_layers", layers)
    args.decoder_attention_heads = safe_getattr(args, "decoder_attention_heads", heads)
    args.decoder_ffn_embed_dim = safe_getattr(args, "decoder_ffn_embed_dim", ffn)
    args.decoder_learned_pos = safe_getattr(args, "decoder_learned_pos", True)
    args.no_scale_embedding = safe_getattr(args, "no_scale_embedding", True)
    args.activation_fn = safe_getattr(args, "activation_fn", "gelu_accurate")
    args.decoder_normalize_before = True  # pre-LN (base_lm_architecture forces it too)
    args.share_decoder_input_output_embed = safe_getattr(args, "share_decoder_input_output_embed", True)
    args.dropout = safe_getattr(args, "dropout", 0.1)
    args.attention_dropout = safe_getattr(args, "attention_dropout", 0.1)
    # the task's options: argparse gives them to the model as None when unset.
    # GPT-2 checkpoints have 1024 learned positions; a shorter --tokens-per-sample
    # must not shrink the position table they load into
    for name in ("tokens_per_sample", "max_target_positions"):
        if safe_getattr(args, name, None) is None:
            setattr(args, name, GPT2_POSITIONS)
    base_lm_architecture(args)


def check_causal_lm_args(args, task) -> None:
    """The plugin's LM archs exist for DP training (as its RoBERTa ones)."""
    check_trained_privately(args, task, dp_task=DP_LM_TASK)


def finish_build(model, args, arch: str, what: str) -> None:
    """Keep the options on the model, where the DP engine reads RGP's
    (``model.args``, as RoBERTa models have them), and log what trains."""
    model.args = args
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info(f"{arch}: {what}; {trainable} of {total} parameters train")
