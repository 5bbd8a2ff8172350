# Copyright (c) fairseq_dp contributors. MIT license.
"""What one DP forward records: every tracked module's input and output gradient.

A module is tracked when a per-example gradient rule (``fairseq_dp.grad_sample``)
covers its type and it has trainable parameters; every trainable parameter
must be covered, or DP training is refused before it starts. During a
recorded forward, each tracked module adds one record ``[module, input,
output gradient]``: a forward hook captures the input and passes the output
through :class:`_OutputGradTap`, whose backward fills in the output gradient
(a :class:`~fairseq_dp.modules.LowRankLinear` fills its record itself). One
``autograd.grad`` with respect to the zero "taps" (:meth:`Recorder.graph_leaves`)
runs the backward through every tracked output without forming any weight
gradient, which the rules then form per example.
"""

from collections import defaultdict
from contextlib import contextmanager
from typing import Dict, List, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from .errors import DPConfigError
from .grad_sample import find_grad_sampler
from .grad_sample.tied import find_tied_rule
from .modules import LowRankLinear
from .prepare import prepare_recording


def check_plain_weights(name: str, module: nn.Module) -> None:
    """Per-example rules read a module's parameters directly; a module whose
    weight is computed from them (spectral norm, weight norm, any
    parametrization or pre-hook) would get gradients for the wrong tensor."""
    if getattr(module, "parametrizations", None) or module._forward_pre_hooks:
        raise DPConfigError(
            f"DP training cannot give per-example gradients to '{name}': its weight is "
            "reparametrized or changed by a forward pre-hook (e.g. "
            "--spectral-norm-classification-head, weight norm). Remove that option or "
            "freeze the module"
        )


class _OutputGradTap(torch.autograd.Function):
    """Identity on a module's output whose backward hands the output gradient
    to ``record`` (slot 2). A copy, not a view, so that fairseq may change it in
    place (attention scales q in place; a tensor hook on an output changed in
    place would see the wrong gradient or none). ``tap`` is a zero leaf: asking
    autograd for its gradient runs the backward through this output without
    forming any weight gradient."""

    @staticmethod
    def forward(ctx, output, tap, record):
        ctx.record = record
        return output.clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.record[2] = grad.detach()
        return grad, None, None


class Recorder:
    """The tracked modules of ``model`` and the hooks that record them.

    Raises :class:`DPConfigError` when a trainable parameter has no rule, is
    shared by two tracked modules, or belongs to a reparametrized module.
    """

    def __init__(self, model: nn.Module):
        prepare_recording(model)
        self.model = model
        self.tracked: List[Tuple[str, nn.Module, object]] = []
        covered = set()
        for name, module in model.named_modules():
            sampler = find_grad_sampler(module)
            if sampler is None:
                continue
            params = sampler.trainable_params(module)
            if params:
                check_plain_weights(name, module)
                self.tracked.append((name, module, sampler))
                covered.update(id(p) for p in params.values())
        uncovered = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in covered]
        if uncovered:
            raise DPConfigError(
                "DP training needs a per-example gradient rule for every trainable "
                f"parameter, and these have none: {', '.join(uncovered[:8])}"
                + (f" (and {len(uncovered) - 8} more)" if len(uncovered) > 8 else "")
                + ". Freeze them (--dp-freeze PATTERN, or requires_grad=False) or use "
                "an architecture built for DP such as --arch roberta_rgp or roberta_lora."
            )
        if not self.tracked:
            raise DPConfigError("DP training found no trainable parameter")
        self.params = [p for _, p in model.named_parameters() if p.requires_grad]
        self.name_of = {id(m): n for n, m, _ in self.tracked}
        self.low_rank = [m for _, m, _ in self.tracked if isinstance(m, LowRankLinear)]
        self.recording = False
        self._records: List[list] = []
        # weights shared by two tracked modules: (module a, module b, cross-term
        # rule), and the (module id, parameter) entries that must not get noise
        # again (the weight gets it once, through its first owner)
        self.tied: List[tuple] = []
        self.noise_skip = set()
        self._hooks = list(self._check_shared_parameters(model))
        self._taps: Dict[int, Tensor] = {}
        for _, module, _ in self.tracked:
            if isinstance(module, LowRankLinear):
                module.recorder = self._new_record
            else:
                self._hooks.append(module.register_forward_hook(self._record_output, with_kwargs=True))

    def covers(self, model: nn.Module) -> bool:
        """Whether this recorder was built for ``model`` as it is now (the same
        trainable parameters: a head registered or a layer unfrozen later
        needs a new one)."""
        return self.model is model and [id(p) for p in self.params] == [
            id(p) for p in model.parameters() if p.requires_grad]

    def _check_shared_parameters(self, model: nn.Module) -> list:
        """A trainable parameter used by two tracked modules would get two
        separately clipped halves of its per-example gradient: refused. One
        owned by a module without a rule (RoBERTa's LM head, tied to the token
        embedding) is allowed only while that module does not run: the returned
        hooks stop a DP forward that calls it."""
        tracked_ids = {id(m) for _, m, _ in self.tracked}
        owners = defaultdict(list)
        seen = set()
        for name, module in model.named_modules(remove_duplicate=False):
            if id(module) in seen:
                continue
            seen.add(id(module))
            for pname, param in module.named_parameters(recurse=False):
                if param.requires_grad:
                    owners[id(param)].append((f"{name}.{pname}" if name else pname, module))
        guards = []
        for shared in (o for o in owners.values() if len(o) > 1):
            names = " and ".join(n for n, _ in shared)
            tracked_owners = [(n, m) for n, m in shared if id(m) in tracked_ids]
            if len(tracked_owners) > 1:
                rule = find_tied_rule(tracked_owners[0][1], tracked_owners[1][1]) \
                    if len(tracked_owners) == 2 else None
                if rule is None:
                    raise DPConfigError(
                        f"DP training cannot clip the tied trainable parameter {names} "
                        "(used by two modules, and no rule covers the pair); untie it (for a "
                        "language model: --untie-output-embedding) or freeze it (e.g. --dp-freeze)"
                    )
                fn, swapped = rule
                (_, a), (_, b) = tracked_owners[::-1] if swapped else tracked_owners
                self.tied.append((a, b, fn))
                # the weight gets its noise once, through its first owner
                skip_name, skip_module = tracked_owners[1]
                self.noise_skip.add((id(skip_module), skip_name.rpartition(".")[2]))
            for pname, module in shared:
                if id(module) not in tracked_ids:
                    guards.append(module.register_forward_pre_hook(self._tied_guard(pname, names)))
        return guards

    def _tied_guard(self, pname: str, names: str):
        def refuse(module, args):
            if self.recording:
                raise RuntimeError(
                    f"DP training: {pname} is tied ({names}) and its module ran in the forward; "
                    "per-example gradients of tied parameters are not supported: untie or freeze it"
                )

        return refuse

    @contextmanager
    def record(self):
        """Records every tracked module's call inside the block; the records
        are then in :meth:`take_records`."""
        self._records = []
        self.recording = True
        try:
            yield
        finally:
            self.recording = False

    def take_records(self) -> List[list]:
        records, self._records = self._records, []
        self._check_records(records)
        return records

    def _new_record(self, module, activation):
        if not self.recording:
            return None
        record = [module, activation.detach(), None]
        self._records.append(record)
        return record

    def _record_output(self, module, args, kwargs, output):
        if not self.recording:
            return None
        sampler = find_grad_sampler(module)
        record = self._new_record(module, sampler.capture(module, args, kwargs))
        tap = self._taps.get(id(module))
        if tap is None or tap.dtype != output.dtype or tap.device != output.device:
            tap = torch.zeros((), dtype=output.dtype, device=output.device, requires_grad=True)
            self._taps[id(module)] = tap
        return _OutputGradTap.apply(output, tap, record)

    def _check_records(self, records) -> None:
        calls: Dict[int, int] = {}
        for module, *_ in records:
            calls[id(module)] = calls.get(id(module), 0) + 1
        for name, module, _ in self.tracked:
            n = calls.get(id(module), 0)
            if n != 1:
                raise RuntimeError(
                    f"DP training expects module '{name}' to run exactly once per "
                    f"forward, but it ran {n} times: a module that is skipped (e.g. "
                    "by a fused fast path) or shared cannot be given per-example "
                    "gradients; freeze it or untie it"
                )

    def fill_output_grads(self, loss: Tensor) -> None:
        """Runs the backward of ``loss`` through every recorded output,
        filling the records' output gradients. Asking for the gradients of the
        zero taps (not of the parameters) keeps autograd from forming every
        weight gradient, which the rules then form again per example."""
        leaves = [m._tap for m in self.low_rank] + list(self._taps.values())
        torch.autograd.grad(loss, leaves, allow_unused=True)

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for module in self.low_rank:
            module.recorder = None
