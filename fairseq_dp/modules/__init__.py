from .low_rank_linear import LowRankLinear, orthonormalize, power_iteration  # noqa
from .lora_linear import LoRALinear  # noqa

__all__ = ["LoRALinear", "LowRankLinear", "orthonormalize", "power_iteration"]
