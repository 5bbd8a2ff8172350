# Copyright (c) fairseq_dp contributors. MIT license.
"""LoRA (Hu et al. 2021) as used for DP by Yu et al. (ICLR 2022):
``y = W₀x + b + s·B(Ax)`` with ``W₀`` and ``b`` frozen, ``A`` (r × in),
``B`` (out × r) trained, ``s = α / r``.

``weight`` and ``bias`` keep ``nn.Linear``'s names, so a plain RoBERTa
checkpoint loads into the frozen part unchanged, and :meth:`merged_weight`
gives the plain weight ``W₀ + s·BA`` after training.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..errors import DPConfigError
from .low_rank_linear import linear_subclass_copy


class LoRALinear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, rank: int, alpha: float):
        super().__init__(in_features, out_features, bias=bias)
        if rank < 1:
            raise DPConfigError(f"--lora-rank must be >= 1, got {rank}")
        self.rank = rank
        self.scaling = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        self.lora_B = nn.Parameter(torch.empty(out_features, rank))
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        # B = 0, so training starts from the pretrained function; A as nn.Linear's default
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> "LoRALinear":
        return linear_subclass_copy(cls, linear, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        low_rank = F.linear(F.linear(x, self.lora_A), self.lora_B)
        return F.linear(x, self.weight, self.bias) + self.scaling * low_rank

    @torch.no_grad()
    def merged_weight(self) -> Tensor:
        return self.weight + self.scaling * (self.lora_B @ self.lora_A)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", rank={self.rank}, scaling={self.scaling:g}"
