from . import roberta_lora, roberta_pooled, roberta_rgp, roberta_tiny, transformer_lm_lora, transformer_lm_rgp  # noqa: F401
