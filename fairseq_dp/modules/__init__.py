from ..carriers import orthonormalize, power_iteration  # noqa
from .low_rank_linear import LowRankLinear  # noqa
from .lora_linear import LoRALinear  # noqa

__all__ = ["LoRALinear", "LowRankLinear", "orthonormalize", "power_iteration"]
