from ..carriers import orthonormalize, power_iteration  # noqa
from .low_rank_linear import LowRankLinear  # noqa
from .low_rank_attention import LowRankMultiheadAttention  # noqa
from .lora_linear import LoRALinear  # noqa

__all__ = ["LoRALinear", "LowRankLinear", "LowRankMultiheadAttention", "orthonormalize", "power_iteration"]
