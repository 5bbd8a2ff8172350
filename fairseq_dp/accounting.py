# Copyright (c) fairseq_dp contributors. MIT license.
"""Privacy accounting: one interface over opacus's PRV and RDP accountants.

The ledger of a run is a list of ``(noise_multiplier, sample_rate, steps)``
entries, as in opacus. ε is computed on demand and cached per ledger state,
because a PRV evaluation takes about half a second.
"""

import math
from typing import Any, Dict, List, Tuple

from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

ACCOUNTANTS = {"prv": PRVAccountant, "rdp": RDPAccountant}


def _check_mechanism(mechanism: str) -> None:
    if mechanism not in ACCOUNTANTS:
        raise ValueError(
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

    def state_dict(self) -> Dict[str, Any]:
        return {"mechanism": self.mechanism, "history": list(self.history)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        _check_mechanism(state["mechanism"])
        self.mechanism = state["mechanism"]
        self.history = [tuple(entry) for entry in state["history"]]
        self._cache = {}


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
        raise ValueError(f"--dp-target-epsilon must be > 0, got {target_epsilon}")
    if steps < 1:
        raise ValueError(f"cannot calibrate σ for {steps} updates")
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
