# Copyright (c) fairseq_dp contributors. MIT license.
"""Per-example gradients of RGP's carriers, projected back onto the weight."""

from typing import Dict

from torch import Tensor

from ..errors import DPConfigError
from ..modules.low_rank_linear import LowRankLinear
from .registry import GradSampler, _add_grad, batch_first, register_grad_sampler


@register_grad_sampler(LowRankLinear)
class LowRankLinearGradSampler(GradSampler):
    def batch_dim(self, module: LowRankLinear) -> int:
        return module.batch_dim

    def trainable_params(self, module: LowRankLinear):
        if module.bias is not None and module.bias.requires_grad:
            raise DPConfigError(
                "RGP reparametrizes weights only: the bias of a LowRankLinear must be frozen"
            )
        return {"weight": module.weight} if module.weight.requires_grad else {}

    def per_example(self, module: LowRankLinear, activation: Tensor, grad_out: Tensor) -> Dict[str, Tensor]:
        grad_left, grad_right = module.carrier_grads(
            batch_first(activation, self.batch_dim(module)), batch_first(grad_out, self.batch_dim(module))
        )
        return {"left": grad_left, "right": grad_right}

    def zero_sum(self, module: LowRankLinear) -> Dict[str, Tensor]:
        return {
            "left": module.weight.new_zeros(module.out_features, module.rank),
            "right": module.weight.new_zeros(module.rank, module.in_features),
        }

    def param_grads(self, module: LowRankLinear, summed: Dict[str, Tensor]) -> Dict[str, Tensor]:
        return {"weight": module.project(summed["left"], summed["right"])}

    def accumulate_grad(self, module: LowRankLinear, summed: Dict[str, Tensor]) -> None:
        _add_grad(module.weight, self.param_grads(module, summed)["weight"], owned=True)
