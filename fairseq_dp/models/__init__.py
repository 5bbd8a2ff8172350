from . import roberta_lora, roberta_pooled, roberta_rgp  # noqa: F401
