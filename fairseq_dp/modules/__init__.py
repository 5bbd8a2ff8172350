from .low_rank_linear import LowRankLinear, orthonormalize, power_iteration  # noqa
from .low_rank_attention import LowRankMultiheadAttention  # noqa

__all__ = ["LowRankLinear", "LowRankMultiheadAttention", "orthonormalize", "power_iteration"]
