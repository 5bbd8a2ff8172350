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

Under bf16 (``common.bf16``: fairseq casts the model to bfloat16 and keeps
float32 master weights in its ``FP16Optimizer``) the norms, clip factors,
clipped sums and noise are float32 (``clipping.py``, ``noise.py``), and a
parameter in bf16 gets its gradient through a float32 running sum over the
logical batch's micro-batches: its ``.grad`` is that sum rounded to bf16 once,
after the noise is in it, never a sum of separately rounded micro-batches.

The noise and its secret randomness are in ``noise.py``; recording in
``recording.py``; clipping in ``clipping.py``; RGP's carriers in
``carriers.py``; the ledger in ``accounting.py``.

The division happens here rather than in fairseq's trainer because fairseq
zeroes a worker's ``sample_size`` when its last micro-batch is a dummy (an
empty Poisson micro-batch, or a worker with fewer batches): the micro-batches
return ``sample_size`` 0, fairseq's ``multiply_grads(world_size / (0 or 1))``
then only undoes ``legacy_ddp``'s averaging, and the result is
``(Σ clipped + noise) / expected batch`` on every worker.
"""

import logging
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from .accounting import PrivacyAccountant
from .carriers import CarrierSchedule
from .clipping import CLIPPING_MODES, LOW_PRECISION, at_least_float32, clipped_sums
from .errors import DPConfigError
from .noise import add_noise, noise_generator
from .recording import Recorder

logger = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class DPSettings:
    """Every privacy parameter of one training process, fixed before its
    first update (when the ledger restored with the weights, σ and q are
    known) and never changed after.

    Attributes:
        clip_norm: per-example L2 clip norm C over all privatized gradients.
        noise_multiplier: σ; the noise added to the clipped sum has std σ·C.
        expected_batch_size: the logical batch size the gradient is divided by.
        sample_rate: q, recorded in the ledger with each step.
        seed: seeds power iteration (with the update number) and, with
            ``seeded_rng``, the noise.
        seeded_rng: INSECURE: noise from (seed, the update's index in the
            ledger) instead of secret randomness (see ``noise.py``).
        micro_batches_per_update: how many micro-batches one logical batch
            has on this worker (``--update-freq``); more under one noise draw
            are refused.
        adds_noise: whether this worker adds the noise (worker 0 of a
            data-parallel run; the others add only their clipped sums).
        budget_steps: the ledger's step count that must not be exceeded
            (``--dp-max-epsilon``); ``None`` for no limit.
        clipping: ``ghost`` or ``materialize`` (see ``clipping.py``).
    """

    clip_norm: float
    noise_multiplier: float
    expected_batch_size: int
    sample_rate: float
    seed: int = 1
    seeded_rng: bool = False
    micro_batches_per_update: int = 1
    adds_noise: bool = True
    budget_steps: Optional[int] = None
    clipping: str = "ghost"

    def __post_init__(self):
        if self.clipping not in CLIPPING_MODES:
            raise DPConfigError(f"--dp-clipping must be one of {CLIPPING_MODES}, got {self.clipping!r}")


class DPTrainer:
    """Runs DP-SGD micro-batch steps for the model of ``recorder``.

    Args:
        recorder: the model's tracked modules (every trainable parameter is
            covered by a per-example gradient rule).
        accountant: the run's privacy ledger; one step is recorded per logical
            batch, when its noise is drawn.
        settings: the privacy parameters, fixed for this trainer's life.
        noise_generator: a generator for the noise, used as it is (tests).
    """

    def __init__(self, recorder: Recorder, accountant: PrivacyAccountant, settings: DPSettings,
                 noise_generator: Optional[torch.Generator] = None):
        self.recorder = recorder
        self.model = recorder.model
        self.accountant = accountant
        self.settings = settings
        self.noise_generator = noise_generator
        args = getattr(self.model, "args", None)
        self.carriers = CarrierSchedule(
            recorder.low_rank, seed=settings.seed,
            power_iters=getattr(args, "rgp_power_iters", 1),
            source=getattr(args, "rgp_carrier_source", "weight"),
        )
        self._micro_batches = 0
        # float32 running sums of this logical batch's gradients of bf16 (or
        # fp16) parameters, by parameter id
        self._grad32: Dict[int, Tensor] = {}
        self._param_sums: Optional[Tensor] = None
        # (update, [(id, version) of each .grad]) after this trainer last wrote them
        self._last_write: Optional[Tuple[int, List[Tuple[int, int]]]] = None

    @property
    def params(self) -> List[nn.Parameter]:
        return self.recorder.params

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
        if self.noise_generator is not None:
            return self.noise_generator
        return noise_generator(self.params[0].device, seeded=self.settings.seeded_rng,
                               seed=self.settings.seed, step=self.accountant.steps)

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
        if self._micro_batches >= self.settings.micro_batches_per_update:
            raise NoiseReuseError(
                f"DP: micro-batch {self._micro_batches + 1} of one logical batch, which has "
                f"{self.settings.micro_batches_per_update} (--update-freq): more data under one noise "
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
                noise_multiplier=self.settings.noise_multiplier,
                sample_rate=self.settings.sample_rate,
                num_steps=update_num - self.accountant.steps,
            )

    @torch.no_grad()
    def _accumulate_in_float32(self, param: nn.Parameter, value: Tensor) -> None:
        """``param.grad`` += ``value`` for a bf16 (or fp16) parameter, with the
        sum kept in float32 over the logical batch: ``.grad`` becomes the
        float32 sum rounded once. The first write of a logical batch starts
        from whatever ``.grad`` holds (as ``_add_grad`` adds to it)."""
        total = self._grad32.get(id(param))
        if total is None:
            total = value.float().clone()
            if param.grad is not None:
                total += param.grad.float()
            self._grad32[id(param)] = total
        else:
            total += value.float()
        if param.grad is None:
            param.grad = total.to(param.dtype)
        else:
            param.grad.copy_(total)

    # ------------------------------------------------------------- the step
    def train_step(self, sample, model, criterion, update_num: int, ignore_grad: bool = False):
        """One micro-batch: returns ``(loss, sample_size, logging_output)`` as
        ``FairseqTask.train_step`` does. The gradient written is already
        divided by the expected logical batch size, so ``sample_size`` is 0
        and fairseq's division by ``(sample_size or 1)`` leaves it alone."""
        settings = self.settings
        model.train()
        model.set_num_updates(update_num)
        first_micro_batch = self.starts_update(update_num)
        if first_micro_batch:
            # a new logical batch (or an update retried after fairseq zeroed the
            # gradients): no float32 running sum carries over, and none is held
            # through this micro-batch's forward pass
            self._grad32 = {}
            self.catch_up_ledger(update_num)
        if first_micro_batch and settings.budget_steps is not None and self.accountant.steps >= settings.budget_steps:
            raise PrivacyBudgetExhausted(
                f"DP: the privacy budget is spent: the ledger holds {self.accountant.steps} updates "
                f"and --dp-max-epsilon allows {settings.budget_steps}; refusing to train further"
            )
        self._check_noise_not_reused(first_micro_batch)
        if first_micro_batch or self.carriers.update != update_num:
            self.carriers.compute(update_num)

        with self.recorder.record():
            loss, _, logging_output = criterion(model, sample)
        records = self.recorder.take_records()

        nsentences = int(logging_output.get("nsentences", 0))
        if ignore_grad or nsentences == 0:
            # fairseq's dummy batch holds real examples: count none of them
            loss = loss.detach() * 0
            logging_output = {k: v * 0 if isinstance(v, (int, float, Tensor)) else v
                              for k, v in logging_output.items()}
            summed = None
        else:
            self.recorder.fill_output_grads(loss)
            summed, nclipped = clipped_sums(records, self.recorder.name_of, settings.clip_norm,
                                            ghost=settings.clipping == "ghost", like=loss,
                                            tied=self.recorder.tied)
            logging_output["dp_nclipped"] = nclipped

        add = first_micro_batch and settings.adds_noise and settings.noise_multiplier > 0
        std = settings.noise_multiplier * settings.clip_norm
        generator = self._noise_generator() if add else None
        scale = 1.0 / settings.expected_batch_size
        for (name, module, sampler) in self.recorder.tracked:
            values = summed[name] if summed is not None else sampler.zero_sum(module)
            values = {k: at_least_float32(v) for k, v in values.items()}
            if add:
                # a tied weight gets its noise once, through its first owner
                skip = {k: v for k, v in values.items() if (id(module), k) in self.recorder.noise_skip}
                values = {**add_noise({k: v for k, v in values.items() if k not in skip}, std, generator), **skip}
            values = {k: v * scale for k, v in values.items()}
            if any(p.dtype in LOW_PRECISION for p in sampler.trainable_params(module).values()):
                for pname, value in sampler.param_grads(module, values).items():
                    self._accumulate_in_float32(getattr(module, pname), value)
            else:
                sampler.accumulate_grad(module, values)
        if first_micro_batch:
            self.accountant.step(noise_multiplier=settings.noise_multiplier, sample_rate=settings.sample_rate)
        self._last_write = (update_num, self._grad_versions())
        self._param_sums = self._param_fingerprint()
        self._micro_batches += 1
        if self._micro_batches >= settings.micro_batches_per_update:
            self._grad32 = {}  # a further micro-batch would be refused

        logging_output["dp_sample"] = 1
        # already divided by the expected batch size: see the module docstring
        return loss.detach(), 0, logging_output
