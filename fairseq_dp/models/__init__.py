from . import roberta_lora, roberta_rgp  # noqa: F401
