# Copyright (c) fairseq_dp contributors. MIT license.
"""The DP training step: power iteration, per-example clipping, Gaussian noise.

fairseq has no option that selects its ``Trainer`` class, and rebinding
``fairseq_cli.train.Trainer`` is silently bypassed by ``python -m
fairseq_cli.train``. So the DP trainer is this object, owned by the DP task and
driven from ``task.train_step``, which every entry point calls for every
micro-batch. fairseq's own ``Trainer`` then does what it does for any run:
sum micro-batches, all-reduce across workers (``legacy_ddp``), log ``gnorm``,
and step the optimizer.

Per micro-batch:
1. at the first micro-batch of an update, RGP carriers from power iteration;
2. forward, recording every tracked module's input and output;
3. one ``autograd.grad`` of the summed loss w.r.t. zero "taps" on those
   outputs, so autograd forms each output's gradient and no weight gradient;
4. per-example gradients (or their norms) from the registered rules, one flat
   norm over all of them, clip factors ``min(1, C / (‖g_i‖ + 1e-6))``;
5. the clipped sum, plus N(0, σ²C²) noise once per logical batch (on the
   first micro-batch, and on worker 0 only), divided by the expected logical
   batch size and written into ``.grad``; RGP carrier sums are projected onto
   the full weights. The accountant records the update at that point.

The noise is secret by default: each update's generator is seeded with 63
fresh bits from the operating system's CSPRNG (``secrets``), used for that
update only and never stored. Knowing the code, ``--seed`` and every
checkpoint, recovering one update's noise means searching 2^63 seeds against
an update whose noise-free part is unknown; nothing in the run makes that
easier. (torch's generators are not cryptographic, so someone who can read
the training process's memory is outside this model.) ``seeded_rng``
(``--dp-insecure-seeded-rng``) seeds it from ``(--seed, update)`` instead:
reproducible, for tests and debugging, and no protection against anyone who
knows the seed, which fairseq saves in every checkpoint.

The division happens here rather than in fairseq's trainer because fairseq
zeroes a worker's ``sample_size`` when its last micro-batch is a dummy (an
empty Poisson micro-batch, or a worker with fewer batches): the micro-batches
return ``sample_size`` 0, fairseq's ``multiply_grads(world_size / (0 or 1))``
then only undoes ``legacy_ddp``'s averaging, and the result is
``(Σ clipped + noise) / expected batch`` on every worker.
"""

import logging
import secrets
from collections import defaultdict
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from .accounting import PrivacyAccountant
from .errors import DPConfigError
from .grad_sample import find_grad_sampler
from .modules import LowRankLinear, power_iteration
from .prepare import prepare_recording

logger = logging.getLogger(__name__)

# numerical floor of the clip factor's denominator, as in opacus
CLIP_STABILITY = 1e-6
# keeps the noise's seed sequence apart from other streams seeded by --seed
NOISE_STREAM = 0x6E6F697365
CLIPPING_MODES = ("ghost", "materialize")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The fairseq model inside distributed / proxy wrappers."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


class PrivacyBudgetExhausted(DPConfigError, RuntimeError):
    """The next update would take ε past ``--dp-max-epsilon``."""


class NoiseReuseError(RuntimeError):
    """More private data would be added under a noise draw already used: more
    micro-batches than one logical batch holds, or after the optimizer
    stepped on that draw's noisy gradient."""


def gaussian_like(t: Tensor, std: float, generator: Optional[torch.Generator] = None) -> Tensor:
    device = generator.device if generator is not None else t.device
    return torch.normal(0.0, std, size=t.shape, generator=generator, dtype=t.dtype, device=device).to(t.device)


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


class DPTrainer:
    """Runs DP-SGD micro-batch steps for one model.

    Args:
        model: the unwrapped fairseq model. Every trainable parameter must be
            covered by a per-example gradient rule (``fairseq_dp.grad_sample``).
        accountant: the run's privacy ledger; one step is recorded per logical
            batch, when its noise is drawn.
        clip_norm: per-example L2 clip norm C over all privatized gradients.
        noise_multiplier: σ; the noise added to the clipped sum has std σ·C.
        expected_batch_size: the logical batch size the gradient is divided by.
        sample_rate: q, recorded in the ledger with each step.
        seed: seeds power iteration (with the update number), so carriers are
            the same on every worker without communication (carriers are
            computed from the weights, already private: post-processing),
            and, with ``seeded_rng``, the noise.
        noise_generator: a generator for the noise, used as it is (tests).
        seeded_rng: INSECURE. ``False`` (default): every update's noise from a
            generator seeded by fresh bits from the OS's CSPRNG (see the
            module docstring). ``True``: seeded from (seed, the update's index
            in the ledger), so noise is reproducible and resumes exactly (and
            never repeats when training continues from weights that already
            carry a ledger), but anyone who knows the seed can remove it.
        micro_batches_per_update: how many micro-batches one logical batch
            has on this worker (``--update-freq``); more under one noise draw
            are refused.
        adds_noise: whether this worker adds the noise (worker 0 of a
            data-parallel run; the others add only their clipped sums).
        budget_steps: the ledger's step count that must not be exceeded
            (``--dp-max-epsilon``); ``None`` for no limit.
        clipping: ``ghost`` (per-example norms without materializing
            per-example gradients where that is cheaper, clipped sums by
            book-keeping) or ``materialize`` (the reference path); both give
            the same update.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        accountant: PrivacyAccountant,
        clip_norm: float,
        noise_multiplier: float,
        expected_batch_size: int,
        sample_rate: float,
        seed: int = 1,
        noise_generator: Optional[torch.Generator] = None,
        seeded_rng: bool = False,
        micro_batches_per_update: int = 1,
        adds_noise: bool = True,
        budget_steps: Optional[int] = None,
        clipping: str = "ghost",
    ):
        if clipping not in CLIPPING_MODES:
            raise DPConfigError(f"--dp-clipping must be one of {CLIPPING_MODES}, got {clipping!r}")
        self.clipping = clipping
        prepare_recording(model)
        self.model = model
        self.accountant = accountant
        self.clip_norm = clip_norm
        self.noise_multiplier = noise_multiplier
        self.expected_batch_size = expected_batch_size
        self.sample_rate = sample_rate
        self.seed = seed
        self.noise_generator = noise_generator
        self.seeded_rng = seeded_rng
        self.micro_batches_per_update = micro_batches_per_update
        self._micro_batches = 0
        self._param_sums: Optional[Tensor] = None
        self.adds_noise = adds_noise
        self.budget_steps = budget_steps
        # (update, [(id, version) of each .grad]) after this trainer last wrote them
        self._last_write: Optional[Tuple[int, List[Tuple[int, int]]]] = None

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
        self._guards = self._check_shared_parameters(model)

        args = getattr(model, "args", None)
        self.low_rank = [m for _, m, _ in self.tracked if isinstance(m, LowRankLinear)]
        self.power_iters = getattr(args, "rgp_power_iters", 1) or 1
        self.carrier_source = getattr(args, "rgp_carrier_source", "weight") or "weight"
        self._initial_weights: Optional[List[Tensor]] = None
        self._carrier_update: Optional[int] = None

        self._recording = False
        self._records: List[list] = []
        # Each record is [module, input, output gradient]. A
        # LowRankLinear fills it itself (its backward sees the output gradient
        # even when fairseq's attention scales q in place); other modules get
        # a forward hook that records the input and passes the output through
        # _OutputGradTap.
        self._hooks = list(self._guards)
        self._taps: Dict[int, Tensor] = {}
        for _, module, _ in self.tracked:
            if isinstance(module, LowRankLinear):
                module.recorder = self._new_record
            else:
                self._hooks.append(module.register_forward_hook(self._record_output, with_kwargs=True))

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
            if sum(id(m) in tracked_ids for _, m in shared) > 1:
                raise DPConfigError(
                    f"DP training cannot clip the tied trainable parameter {names} "
                    "(used by two modules); untie it or freeze it (e.g. --dp-freeze)"
                )
            for pname, module in shared:
                if id(module) not in tracked_ids:
                    guards.append(module.register_forward_pre_hook(self._tied_guard(pname, names)))
        return guards

    def _tied_guard(self, pname: str, names: str):
        def refuse(module, args):
            if self._recording:
                raise RuntimeError(
                    f"DP training: {pname} is tied ({names}) and its module ran in the forward; "
                    "per-example gradients of tied parameters are not supported: untie or freeze it"
                )

        return refuse

    def starts_update(self, update_num: int) -> bool:
        """Whether this micro-batch is the first of a logical batch.

        True when the update number moved on, or when anything touched the
        gradients since this trainer last wrote them (fairseq's
        ``zero_grad`` sets them to None; ``zero_grad(set_to_none=False)``
        zeroes them in place, which bumps the tensor's version counter). An
        update retried after an out-of-memory error thus draws noise again
        and is counted again, which is conservative.
        """
        if self._last_write is None or self._last_write[0] != update_num:
            return True
        return self._last_write[1] != self._grad_versions()

    def _grad_versions(self) -> List[Tuple[int, int]]:
        return [(-1, -1) if p.grad is None else (id(p.grad), p.grad._version) for p in self.params]

    def _noise_generator(self) -> torch.Generator:
        device = self.params[0].device
        if self.noise_generator is not None:
            return self.noise_generator
        if not self.seeded_rng:
            return torch.Generator(device=device).manual_seed(secrets.randbits(63))
        seed = np.random.SeedSequence([self.seed, self.accountant.steps, NOISE_STREAM]).generate_state(1, np.uint64)[0]
        return torch.Generator(device=device).manual_seed(int(seed))

    @torch.no_grad()
    def _param_fingerprint(self) -> Tensor:
        # optimizers update p.data, which does not bump the version counter,
        # so a step is detected by the values (one float64 sum per parameter)
        return torch.stack([p.detach().sum(dtype=torch.float64) for p in self.params]).nan_to_num().cpu()

    def _check_noise_not_reused(self, first_micro_batch: bool) -> None:
        """Refuse to add data under a noise draw already spent. Within one
        logical batch, the micro-batches share one draw; after the optimizer
        stepped on that sum, more data added to the same gradient would be
        released with no new noise (the difference of two steps would reveal
        it), and so would more micro-batches than the batch the accountant's
        q describes."""
        if first_micro_batch:
            self._micro_batches = 0
            return
        if not torch.equal(self._param_fingerprint(), self._param_sums):
            raise NoiseReuseError(
                "DP: the parameters changed since this logical batch's noisy gradient was "
                "written (an optimizer step), but the gradient was not reset: more data would "
                "be added under the same noise. Zero the gradients (optimizer.zero_grad()) and "
                "pass the next update number before the next batch"
            )
        if self._micro_batches >= self.micro_batches_per_update:
            raise NoiseReuseError(
                f"DP: micro-batch {self._micro_batches + 1} of one logical batch, which has "
                f"{self.micro_batches_per_update} (--update-freq): more data under one noise "
                "draw than the accountant's sampling rate describes. Zero the gradients and "
                "pass the next update number to start a new logical batch"
            )

    def catch_up_ledger(self, update_num: int) -> None:
        """A checkpoint from before the ledger was saved with the weights has
        none: record its updates at the current σ and q (constant in a run)."""
        if self.accountant.steps < update_num:
            logger.warning(
                f"DP: ledger has {self.accountant.steps} steps at update {update_num}; "
                "recording the missing updates at the current σ and q"
            )
            self.accountant.step(
                noise_multiplier=self.noise_multiplier,
                sample_rate=self.sample_rate,
                num_steps=update_num - self.accountant.steps,
            )

    def _new_record(self, module, activation):
        if not self._recording:
            return None
        record = [module, activation.detach(), None]
        self._records.append(record)
        return record

    def _record_output(self, module, args, kwargs, output):
        if not self._recording:
            return None
        sampler = find_grad_sampler(module)
        record = self._new_record(module, sampler.capture(module, args, kwargs))
        tap = self._taps.get(id(module))
        if tap is None or tap.dtype != output.dtype or tap.device != output.device:
            tap = torch.zeros((), dtype=output.dtype, device=output.device, requires_grad=True)
            self._taps[id(module)] = tap
        return _OutputGradTap.apply(output, tap, record)

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for module in self.low_rank:
            module.recorder = None

    # ------------------------------------------------------------------ RGP
    @torch.no_grad()
    def compute_carriers(self, update_num: int) -> None:
        """Power iteration for every reparametrized matrix, seeded from
        (seed, update_num), in a fixed module order."""
        if not self.low_rank:
            return
        if self.carrier_source == "update" and self._initial_weights is None:
            self._initial_weights = [m.weight.detach().clone() for m in self.low_rank]
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + update_num)
        for i, module in enumerate(self.low_rank):
            matrix = module.weight.detach()
            if self.carrier_source == "update":
                matrix = matrix - self._initial_weights[i]
            left, right = power_iteration(matrix, module.rank, self.power_iters, generator)
            module.set_carriers(left, right, update_num)
        self._carrier_update = update_num

    # ------------------------------------------------------------- the step
    def train_step(self, sample, model, criterion, update_num: int, ignore_grad: bool = False):
        """One micro-batch: returns ``(loss, sample_size, logging_output)`` as
        ``FairseqTask.train_step`` does. The gradient written is already
        divided by the expected logical batch size, so ``sample_size`` is 0
        and fairseq's division by ``(sample_size or 1)`` leaves it alone."""
        model.train()
        model.set_num_updates(update_num)
        first_micro_batch = self.starts_update(update_num)
        if first_micro_batch:
            self.catch_up_ledger(update_num)
        if first_micro_batch and self.budget_steps is not None and self.accountant.steps >= self.budget_steps:
            raise PrivacyBudgetExhausted(
                f"DP: the privacy budget is spent: the ledger holds {self.accountant.steps} updates "
                f"and --dp-max-epsilon allows {self.budget_steps}; refusing to train further"
            )
        self._check_noise_not_reused(first_micro_batch)
        if first_micro_batch or self._carrier_update != update_num:
            self.compute_carriers(update_num)

        self._records = []
        self._recording = True
        try:
            loss, _, logging_output = criterion(model, sample)
        finally:
            self._recording = False
        records, self._records = self._records, []
        self._check_records(records)

        nsentences = int(logging_output.get("nsentences", 0))
        if ignore_grad or nsentences == 0:
            # fairseq's dummy batch holds real examples: count none of them
            loss = loss.detach() * 0
            logging_output = {k: v * 0 if isinstance(v, (int, float, Tensor)) else v
                              for k, v in logging_output.items()}
            summed = None
        else:
            summed, nclipped = self._clipped_sums(loss, records)
            logging_output["dp_nclipped"] = nclipped

        add_noise = first_micro_batch and self.adds_noise and self.noise_multiplier > 0
        std = self.noise_multiplier * self.clip_norm
        generator = self._noise_generator() if add_noise else None
        scale = 1.0 / self.expected_batch_size
        for (name, module, sampler) in self.tracked:
            values = summed[name] if summed is not None else sampler.zero_sum(module)
            if add_noise:
                values = {k: v + gaussian_like(v, std, generator) for k, v in values.items()}
            sampler.accumulate_grad(module, {k: v * scale for k, v in values.items()})
        if first_micro_batch:
            self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        self._last_write = (update_num, self._grad_versions())
        self._param_sums = self._param_fingerprint()
        self._micro_batches += 1

        logging_output["dp_sample"] = 1
        # already divided by the expected batch size: see the module docstring
        return loss.detach(), 0, logging_output

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

    def _graph_leaves(self) -> List[Tensor]:
        """Leaves whose gradient makes autograd run back through every tracked
        module's output, and nothing more: the zero taps on the outputs. Asking
        for the parameters instead would make autograd form every weight
        gradient, which the rules then form again per example."""
        return [m._tap for m in self.low_rank] + list(self._taps.values())

    def _clipped_sums(self, loss: Tensor, records) -> Tuple[Dict[str, Dict[str, Tensor]], int]:
        # only to fill the records' output gradients; the taps' own gradients are dropped
        torch.autograd.grad(loss, self._graph_leaves(), allow_unused=True)
        name_of = {id(m): n for n, m, _ in self.tracked}
        ghost = self.clipping == "ghost"
        batch_size = None
        norms_sq = 0.0
        partial = []
        for module, activation, grad_out in records:
            sampler = find_grad_sampler(module)
            name = name_of[id(module)]
            size = activation.shape[sampler.batch_dim(module)]
            if batch_size is not None and size != batch_size:
                raise RuntimeError(
                    f"DP training: module '{name}' sees a batch of {size} along dimension "
                    f"{sampler.batch_dim(module)}, other modules {batch_size}; its batch "
                    "dimension (dp_batch_dim) is wrong"
                )
            batch_size = size
            if grad_out is None:  # the loss does not depend on this module
                partial.append((name, lambda factors, s=sampler, m=module: s.zero_sum(m)))
                continue
            n_sq, clipped_sum = sampler.norms_and_sum(module, activation, grad_out, ghost=ghost)
            norms_sq = norms_sq + n_sq
            partial.append((name, clipped_sum))
        norms = torch.sqrt(torch.as_tensor(norms_sq, dtype=loss.dtype, device=loss.device))
        factors = (self.clip_norm / (norms + CLIP_STABILITY)).clamp(max=1.0)
        summed = {name: clipped_sum(factors) for name, clipped_sum in partial}
        return summed, int((factors < 1.0).sum().item())
