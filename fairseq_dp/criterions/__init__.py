from . import dp_sentence_prediction  # noqa: F401
