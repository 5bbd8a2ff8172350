# Copyright (c) fairseq_dp contributors. MIT license.
"""Per-example gradients of LoRA factors.

With ``y = W₀x + s·B(Ax)``, example i's gradients are
``∇B = Σ_t g_t (s·A x_t)ᵀ`` and ``∇A = Σ_t (s·Bᵀ g_t) x_tᵀ``: each is a Linear
weight gradient with a modified input or output gradient, so the Linear
rule's materialized / ghost-norm / book-keeping forms apply unchanged.
"""

from typing import Dict

from torch import Tensor

from ..errors import DPConfigError
from ..modules.lora_linear import LoRALinear
from .linear import weight_clipped_sum, weight_norms_sq, weight_per_example
from .registry import GradSampler, batch_first, register_grad_sampler


@register_grad_sampler(LoRALinear)
class LoRALinearGradSampler(GradSampler):
    def trainable_params(self, module: LoRALinear):
        params = super().trainable_params(module)
        frozen_base = [n for n in ("weight", "bias") if n in params]
        if frozen_base:
            raise DPConfigError(
                f"LoRA trains only the low-rank factors: {', '.join(frozen_base)} of a "
                "LoRALinear must be frozen"
            )
        return params

    def _factors(self, module: LoRALinear, activation: Tensor, grad_out: Tensor):
        """[(name, input-like, output-gradient-like)] for lora_B and lora_A."""
        batch_dim = self.batch_dim(module)
        x = batch_first(activation, batch_dim)
        g = batch_first(grad_out, batch_dim)
        pairs = []
        # the factors in the records' dtype (float32 when the model is bf16:
        # clipping.py upcasts the records)
        if module.lora_B.requires_grad:
            pairs.append(("lora_B", module.scaling * (x @ module.lora_A.detach().t().to(x.dtype)), g))
        if module.lora_A.requires_grad:
            pairs.append(("lora_A", x, module.scaling * (g @ module.lora_B.detach().to(g.dtype))))
        return pairs

    def per_example(self, module, activation, grad_out) -> Dict[str, Tensor]:
        return {name: weight_per_example(a, g) for name, a, g in self._factors(module, activation, grad_out)}

    def norms_and_sum(self, module, activation, grad_out, ghost=False):
        if not ghost:
            return super().norms_and_sum(module, activation, grad_out)
        pairs = self._factors(module, activation, grad_out)
        norms_sq = sum(weight_norms_sq(a, g, ghost=True) for _, a, g in pairs)

        def clipped_sum(factors):
            return {name: weight_clipped_sum(a, g, factors) for name, a, g in pairs}

        return norms_sq, clipped_sum
