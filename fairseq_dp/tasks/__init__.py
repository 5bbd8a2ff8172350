from . import dp_sentence_prediction  # noqa: F401
from . import dp_language_modeling  # noqa: F401
from . import masked_lm_selected  # noqa: F401
