# Copyright (c) fairseq_dp contributors. MIT license.
"""Privacy accounting: one interface over opacus's PRV and RDP accountants.

The ledger of a run is a list of ``(noise_multiplier, sample_rate, steps)``
entries, as in opacus. ε is computed on demand and cached per ledger state,
because a PRV evaluation takes about half a second.
"""

import hashlib
import math
import struct
import weakref
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from .errors import DPConfigError

ACCOUNTANTS = {"prv": PRVAccountant, "rdp": RDPAccountant}


def _check_mechanism(mechanism: str) -> None:
    if mechanism not in ACCOUNTANTS:
        raise DPConfigError(
            f"--dp-accountant {mechanism!r} is unknown; choose one of {sorted(ACCOUNTANTS)}"
        )


class PrivacyAccountant:
    """Tracks the (ε, δ) spent by a sequence of sampled Gaussian mechanisms.

    Args:
        mechanism: ``"prv"`` (Gopi et al. 2021, numerical composition, upper
            bound reported) or ``"rdp"`` (Rényi DP with the conversion of
            Balle et al. 2020).
    """

    def __init__(self, mechanism: str = "prv"):
        mechanism = str(mechanism)  # fairseq's ChoiceEnum members do not pickle
        _check_mechanism(mechanism)
        self.mechanism = mechanism
        self.history: List[Tuple[float, float, int]] = []
        self._cache: Dict[Tuple, float] = {}

    @property
    def steps(self) -> int:
        return sum(entry[2] for entry in self.history)

    def step(self, *, noise_multiplier: float, sample_rate: float, num_steps: int = 1) -> None:
        if num_steps <= 0:
            return
        if self.history and self.history[-1][:2] == (noise_multiplier, sample_rate):
            sigma, q, n = self.history[-1]
            self.history[-1] = (sigma, q, n + num_steps)
        else:
            self.history.append((noise_multiplier, sample_rate, num_steps))

    def get_epsilon(self, delta: float) -> float:
        """ε spent so far at ``delta``; ``inf`` once any step had no noise."""
        if not self.history:
            return 0.0
        if any(sigma <= 0 for sigma, _, _ in self.history):
            return math.inf
        key = (tuple(self.history), delta)
        if key not in self._cache:
            accountant = ACCOUNTANTS[self.mechanism]()
            accountant.history = list(self.history)
            self._cache = {key: float(accountant.get_epsilon(delta=delta))}
        return self._cache[key]

    def epsilon_after(self, delta: float, *, noise_multiplier: float, sample_rate: float, num_steps: int) -> float:
        """ε the ledger would report after ``num_steps`` more updates."""
        probe = PrivacyAccountant(self.mechanism)
        probe.history = list(self.history)
        probe.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate, num_steps=num_steps)
        return probe.get_epsilon(delta)

    def steps_within_budget(
        self,
        max_epsilon: float,
        delta: float,
        *,
        noise_multiplier: float,
        sample_rate: float,
        limit: Optional[int] = None,
    ) -> int:
        """How many more updates at (σ, q) keep ε ≤ ``max_epsilon`` (at most
        ``limit``; without a limit, up to 2**30).

        ε grows with the number of steps, so a bisection over the count finds
        the last one within budget with about log2(limit) evaluations.
        """
        def within(n: int) -> bool:
            eps = self.epsilon_after(delta, noise_multiplier=noise_multiplier, sample_rate=sample_rate, num_steps=n)
            return eps <= max_epsilon

        if not within(0):
            return 0
        if limit is None:
            limit = 1
            while limit < 2**30 and within(limit):
                limit *= 2
        if within(limit):
            return limit
        lo, hi = 0, limit  # within(lo) and not within(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if within(mid):
                lo = mid
            else:
                hi = mid
        return lo

    def state_dict(self) -> Dict[str, Any]:
        return {"mechanism": self.mechanism, "history": list(self.history)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        _check_mechanism(state["mechanism"])
        self.mechanism = state["mechanism"]
        self.history = [tuple(entry) for entry in state["history"]]
        self._cache = {}


LEDGER_KEY = "dp_ledger"
DIGEST_KEY = "dp_ledger_digest"


def history_to_tensor(history: List[Tuple[float, float, int]]) -> torch.Tensor:
    # float64 holds σ and q exactly and step counts exactly below 2**53
    return torch.tensor([list(entry) for entry in history], dtype=torch.float64).reshape(-1, 3)


def history_from_tensor(t: torch.Tensor) -> List[Tuple[float, float, int]]:
    return [(float(sigma), float(q), int(n)) for sigma, q, n in t.reshape(-1, 3).tolist()]


def ledger_digest(ledger: torch.Tensor) -> torch.Tensor:
    digest = hashlib.sha256(ledger.to(torch.float64).contiguous().numpy().tobytes()).digest()
    return torch.tensor(list(struct.unpack("<4q", digest)), dtype=torch.int64)


class LedgerMismatch(DPConfigError):
    """A checkpoint's ledger does not match its digest."""


def keep_ledger_with_weights(model: nn.Module, accountant: "PrivacyAccountant") -> None:
    """Save the ledger in the model's state dict, and restore it on load.

    fairseq's ``Trainer.load_checkpoint`` restores the model whatever the
    ``--reset-*`` flags, but not the task state, and ``--reset-optimizer``
    restarts the update count. The privacy already spent belongs with the
    weights that spent it, so it travels under ``dp_ledger`` in the model
    state. A checkpoint without that key (a pretrained or non-private model)
    loads strictly as before and leaves the ledger as it is.

    Tools that treat the model state as numbers would corrupt the ledger:
    averaging checkpoints (fairseq's ``average_checkpoints.py``) would average
    step counts, although an average of weights has spent the privacy of its
    latest member. A digest stored beside the ledger catches that on load.
    The hooks act on this model object only: copies made with ``deepcopy``
    (fairseq's EMA model) carry neither key and never touch the ledger.
    """
    owner = weakref.ref(model)

    def save(module, state_dict, prefix, local_metadata):
        if module is not owner():
            return
        ledger = history_to_tensor(accountant.history)
        state_dict[prefix + LEDGER_KEY] = ledger
        state_dict[prefix + DIGEST_KEY] = ledger_digest(ledger)

    def load(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        if module is not owner():
            return
        saved: Optional[torch.Tensor] = state_dict.pop(prefix + LEDGER_KEY, None)
        digest: Optional[torch.Tensor] = state_dict.pop(prefix + DIGEST_KEY, None)
        if saved is None:
            return
        if digest is None or not torch.equal(digest.to(torch.int64), ledger_digest(saved)):
            raise LedgerMismatch(
                "the privacy ledger saved with these weights (dp_ledger) does not match its "
                "digest: the checkpoint was averaged or edited. An average of checkpoints has "
                "spent the privacy of its latest member; average the weights only and account "
                "with the latest checkpoint's ledger"
            )
        accountant.load_state_dict({"mechanism": accountant.mechanism, "history": history_from_tensor(saved)})

    model.register_state_dict_post_hook(save)
    model.register_load_state_dict_pre_hook(load)


def calibrate_noise_multiplier(
    *, target_epsilon: float, delta: float, sample_rate: float, steps: int, mechanism: str = "prv"
) -> float:
    """Smallest σ (to 1% of ε) whose ε after ``steps`` updates is at most the target.

    The bisection keeps the upper end, so the ε reached is never above the
    target and at most 1% below it.
    """
    mechanism = str(mechanism)
    _check_mechanism(mechanism)
    if target_epsilon <= 0:
        raise DPConfigError(f"--dp-target-epsilon must be > 0, got {target_epsilon}")
    if steps < 1:
        raise DPConfigError(f"cannot calibrate σ for {steps} updates")
    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=mechanism,
            epsilon_tolerance=0.01 * target_epsilon,
        )
    )
