# Copyright (c) fairseq_dp contributors. MIT license.
"""Type-keyed registry of per-example gradient rules (opacus style).

A rule turns one module call's input activation and output gradient into
per-example gradients of the quantities that get clipped and noised (the
"privatized" gradients: a Linear's weight and bias, RGP's carriers), and
writes the privatized sum back into the parameters' ``.grad``.
"""

from typing import Callable, Dict, List, Tuple, Type

import torch
import torch.nn as nn
from torch import Tensor

GRAD_SAMPLERS: Dict[Type[nn.Module], "GradSampler"] = {}


def register_grad_sampler(*module_types: Type[nn.Module]):
    """Class decorator: an instance of the rule serves exactly these types."""

    def wrapper(cls):
        for module_type in module_types:
            GRAD_SAMPLERS[module_type] = cls()
        return cls

    return wrapper


def find_grad_sampler(module: nn.Module) -> "GradSampler":
    # exact type: a subclass may change the forward, so it needs its own rule
    return GRAD_SAMPLERS.get(type(module))


class GradSampler:
    """Per-example gradient rule for one module type."""

    def batch_dim(self, module: nn.Module) -> int:
        """Where the batch is in this module's input and output: fairseq's
        encoder layers are time-major (T, B, C), embeddings and heads batch-major.
        Set per module as ``module.dp_batch_dim`` (default 0)."""
        return getattr(module, "dp_batch_dim", 0)

    def capture(self, module: nn.Module, args: tuple, kwargs: dict) -> Tensor:
        """What the rule needs from one call's arguments (the input activation)."""
        return args[0]

    def trainable_params(self, module: nn.Module) -> Dict[str, nn.Parameter]:
        """The module's trainable parameters this rule accounts for."""
        return {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad}

    def per_example(self, module: nn.Module, activation: Tensor, grad_out: Tensor) -> Dict[str, Tensor]:
        """Materialized per-example gradients, each of shape (B, ...)."""
        raise NotImplementedError

    def norms_and_sum(
        self, module: nn.Module, activation: Tensor, grad_out: Tensor, ghost: bool = False
    ) -> Tuple[Tensor, Callable[[Tensor], Dict[str, Tensor]]]:
        """Per-example squared norms (B,), and a map from clip factors (B,) to
        the clipped sum of the per-example gradients.

        ``ghost=False`` materializes the per-example gradients and sums them
        with the factors (the reference path). ``ghost=True`` lets a rule get
        the norms without materializing them, when that is cheaper, and form
        the clipped sum from the recorded activations and output gradients
        with the factors folded in (book-keeping). Rules whose per-example
        gradients are small always materialize."""
        grads = self.per_example(module, activation, grad_out)
        norms_sq = sum(g.flatten(1).pow(2).sum(1) for g in grads.values())

        def clipped_sum(factors: Tensor) -> Dict[str, Tensor]:
            return {k: torch.einsum("b,b...->...", factors.to(g.dtype), g) for k, g in grads.items()}

        return norms_sq, clipped_sum

    def zero_sum(self, module: nn.Module) -> Dict[str, Tensor]:
        """The privatized sum of an empty batch (noise still gets added to it)."""
        return {k: torch.zeros_like(p) for k, p in self.trainable_params(module).items()}

    def param_grads(self, module: nn.Module, summed: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """The gradients of the module's parameters (by attribute name) that
        the privatized sums ``summed`` stand for: the sums themselves, unless
        the privatized quantities are not the parameters (RGP's carriers)."""
        return summed

    def accumulate_grad(self, module: nn.Module, summed: Dict[str, Tensor]) -> None:
        """Add privatized sums into the parameters' ``.grad``."""
        for name, value in self.param_grads(module, summed).items():
            _add_grad(getattr(module, name), value)


def _add_grad(param: nn.Parameter, value: Tensor, owned: bool = False) -> None:
    """``owned``: ``value`` is a fresh tensor nothing else refers to, so it can
    become ``.grad`` without a copy."""
    converted = value.to(param.dtype)
    if param.grad is None:
        param.grad = converted if owned or converted is not value else value.clone()
    else:
        param.grad.add_(converted)


def batch_first(t: Tensor, batch_dim: int) -> Tensor:
    """(B, N, C): batch first, all other leading dims flattened into N."""
    t = t.movedim(batch_dim, 0)
    return t.reshape(t.shape[0], -1, t.shape[-1])


__all__: List[str] = [
    "GRAD_SAMPLERS",
    "GradSampler",
    "register_grad_sampler",
    "find_grad_sampler",
    "batch_first",
]
