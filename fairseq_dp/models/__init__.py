from . import roberta_rgp  # noqa: F401
