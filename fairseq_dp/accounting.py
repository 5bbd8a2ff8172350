# Copyright (c) fairseq_dp contributors. MIT license.
"""Privacy accounting: one interface over opacus's PRV and RDP accountants.

The ledger of a run is a list of ``(noise_multiplier, sample_rate, steps)``
entries, as in opacus. ε is computed on demand and cached per ledger state,
because a PRV evaluation takes about half a second.

Every ε reported is a valid upper bound. The PRV accountant discretizes the
privacy loss on a domain sized by RDP's ε; far outside the usual regime
(σ ≈ 0.01: PRV reports 707 where one step alone is worth 5,337) its numerics
break down and its run time explodes (minutes for σ = 0.05 and 100 steps).
So PRV is asked only where RDP's bound is at most ``PRV_TRUSTED_UP_TO``, and
the smaller of the two valid bounds is reported; beyond, RDP's bound is.
"""

import contextlib
import hashlib
import logging
import math
import re
import struct
import warnings
import weakref
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from opacus.accountants import PRVAccountant, RDPAccountant

from .errors import DPConfigError

ACCOUNTANTS = {"prv": PRVAccountant, "rdp": RDPAccountant}
# RDP ε above which PRV is not evaluated (see the module docstring); measured:
# PRV agrees with the exact one-step ε to 0.02 up to ε ≈ 240 at σ ≥ 0.05, but
# its grid grows with the bound (about 1 GB at ε ≈ 170): beyond 50 tightness buys nothing
PRV_TRUSTED_UP_TO = 50.0
# σ above this makes every update pure noise and overflows float32 norms
MAX_NOISE_MULTIPLIER = 1e4

History = Sequence[Tuple[float, float, int]]


def epsilon_of(history: History, delta: float, mechanism: str, explain: bool = True) -> float:
    """A valid upper bound on ε at ``delta`` for a history of subsampled
    Gaussian mechanisms: ``inf`` if any step had no noise, never negative.
    ``explain``: log opacus's order-at-the-edge warning once when it
    qualifies the reported RDP bound (not during a calibration's probes)."""
    history = [entry for entry in history if entry[2] > 0]
    if not history:
        return 0.0
    if any(not sigma > 0 for sigma, _, _ in history):
        return math.inf
    rdp_accountant = RDPAccountant()
    rdp_accountant.history = list(history)
    with _rdp_order_warnings(mechanism if explain else None):
        rdp = float(rdp_accountant.get_epsilon(delta=delta))
    if mechanism == "rdp" or not rdp <= PRV_TRUSTED_UP_TO:
        return max(0.0, rdp)
    accountant = PRVAccountant()
    accountant.history = list(history)
    try:
        with _rdp_order_warnings("prv"):  # RDP's, from PRV's domain sizing
            prv = float(accountant.get_epsilon(delta=delta))
    except (RuntimeError, ValueError, FloatingPointError):
        # e.g. "Discrete mean differs significantly from continuous mean"
        prv = math.inf
    return max(0.0, min(prv, rdp))

logger = logging.getLogger(__name__)

# opacus's RDP conversion warns when the best Rényi order is an end of its range
_ORDER_AT_EDGE = re.compile(r"Optimal order is the (largest|smallest) alpha")
_explained_edges = set()


@contextlib.contextmanager
def _rdp_order_warnings(mechanism: Optional[str]):
    """Handle opacus's "Optimal order is the largest alpha" warning.

    The PRV accountant runs opacus's RDP code only to size the domain of its
    discretization (``compute_safe_domain_size``, at δ/4000 and per-step
    δ/(8000·T)); at such δ the best order is often the largest, which at most
    widens the domain, and the ε it reports is unaffected. A calibration also
    passes through σ values far from the answer. In both cases the warning
    says nothing about the run, so ``mechanism=None`` (calibration) and
    ``"prv"`` silence it. For the RDP accountant it qualifies the reported ε,
    so it is explained once in the log instead. Other warnings pass through.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        edge = _ORDER_AT_EDGE.search(str(w.message))
        if edge is None:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        elif mechanism == "rdp" and edge.group(1) not in _explained_edges:
            _explained_edges.add(edge.group(1))
            if edge.group(1) == "largest":
                logger.info(
                    "DP: the RDP accountant's best Rényi order here is the largest it tries "
                    f"({max(RDPAccountant.DEFAULT_ALPHAS)}), so its ε is a valid but loose upper "
                    "bound (opacus warns \"Optimal order is the largest alpha\"); the PRV "
                    "accountant (--dp-accountant prv) gives a tighter one"
                )
            else:
                logger.info(
                    "DP: the RDP accountant's best Rényi order here is the smallest it tries "
                    f"({min(RDPAccountant.DEFAULT_ALPHAS)}): ε is large (weak privacy), and the "
                    "bound still holds (opacus warns \"Optimal order is the smallest alpha\")"
                )


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
        # the δ the ledger's ε has been stated at (the smallest used): a later
        # run with a larger δ would find "fresh room" in a spent budget
        self.delta: Optional[float] = None
        # what the last load of weights said about their history: None (no
        # load), "ledger" (the weights carried one) or "none" (they did not)
        self.loaded_history: Optional[str] = None
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
        """ε spent so far at ``delta`` (a valid upper bound, see the module
        docstring); ``inf`` once any step had no noise."""
        key = (tuple(self.history), delta)
        if key not in self._cache:
            self._cache = {key: epsilon_of(self.history, delta, self.mechanism)}
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
        return {"mechanism": self.mechanism, "history": list(self.history), "delta": self.delta}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        _check_mechanism(state["mechanism"])
        self.mechanism = state["mechanism"]
        self.history = [tuple(entry) for entry in state["history"]]
        self.delta = state.get("delta")
        self._cache = {}


LEDGER_KEY = "dp_ledger"
DIGEST_KEY = "dp_ledger_digest"
DELTA_KEY = "dp_ledger_delta"
LEDGER_KEYS = (LEDGER_KEY, DIGEST_KEY, DELTA_KEY)


def history_to_tensor(history: List[Tuple[float, float, int]]) -> torch.Tensor:
    # float64 holds σ and q exactly and step counts exactly below 2**53
    return torch.tensor([list(entry) for entry in history], dtype=torch.float64).reshape(-1, 3)


def history_from_tensor(t: torch.Tensor) -> List[Tuple[float, float, int]]:
    return [(float(sigma), float(q), int(n)) for sigma, q, n in t.reshape(-1, 3).tolist()]


def ledger_digest(ledger: torch.Tensor, delta: Optional[torch.Tensor] = None) -> torch.Tensor:
    """An unkeyed SHA-256 of the ledger (and its δ): it detects accidents
    (averaging, edits by tools), not a forger, who can recompute it."""
    data = ledger.to(torch.float64).contiguous().numpy().tobytes()
    if delta is not None:
        data += delta.to(torch.float64).contiguous().numpy().tobytes()
    digest = hashlib.sha256(data).digest()
    return torch.tensor(list(struct.unpack("<4q", digest)), dtype=torch.int64)


class LedgerMismatch(DPConfigError):
    """A checkpoint's ledger does not match its digest."""


def ledger_entries(accountant: "PrivacyAccountant") -> Dict[str, torch.Tensor]:
    """The ledger as the tensors saved with the weights (``LEDGER_KEYS``)."""
    ledger = history_to_tensor(accountant.history)
    entries = {LEDGER_KEY: ledger}
    if accountant.delta is not None:
        entries[DELTA_KEY] = torch.tensor([accountant.delta], dtype=torch.float64)
    entries[DIGEST_KEY] = ledger_digest(ledger, entries.get(DELTA_KEY))
    return entries


def restore_ledger(accountant: "PrivacyAccountant", entries: Dict[str, torch.Tensor]) -> None:
    """Load saved ``LEDGER_KEYS`` into ``accountant``, after checking the digest."""
    saved, digest, delta = (entries.get(k) for k in (LEDGER_KEY, DIGEST_KEY, DELTA_KEY))
    if digest is None or not torch.equal(digest.to(torch.int64), ledger_digest(saved, delta)):
        raise LedgerMismatch(
            "the privacy ledger saved with these weights (dp_ledger) does not match its "
            "digest: the checkpoint was averaged or edited. An average of checkpoints has "
            "spent the privacy of its latest member; average the weights only and account "
            "with the latest checkpoint's ledger"
        )
    accountant.load_state_dict({
        "mechanism": accountant.mechanism,
        "history": history_from_tensor(saved),
        "delta": None if delta is None else float(delta.reshape(-1)[0]),
    })


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
        for key, value in ledger_entries(accountant).items():
            state_dict[prefix + key] = value

    def load(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        if module is not owner():
            return
        entries = {k: state_dict.pop(prefix + k) for k in LEDGER_KEYS if prefix + k in state_dict}
        if LEDGER_KEY not in entries:
            accountant.loaded_history = "none"
            return
        restore_ledger(accountant, entries)
        accountant.loaded_history = "ledger"

    model.register_state_dict_post_hook(save)
    model.register_load_state_dict_pre_hook(load)


def calibrate_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    mechanism: str = "prv",
    spent: History = (),
) -> float:
    """Smallest σ (to 1% of ε) whose ε after ``steps`` updates, on top of the
    ``spent`` history (a ledger carried by the weights), is at most the target.

    A bisection over log σ that keeps the upper end, so the ε reached is never
    above the target and at most 1% below it. Every evaluation is
    :func:`epsilon_of`, so a large target (small σ) is evaluated by RDP and
    does not hang in PRV.
    """
    mechanism = str(mechanism)
    _check_mechanism(mechanism)
    if not 0 < target_epsilon < math.inf:
        raise DPConfigError(f"--dp-target-epsilon must be > 0 and finite, got {target_epsilon}")
    if steps < 1:
        raise DPConfigError(f"cannot calibrate σ for {steps} updates")
    spent = [tuple(entry) for entry in spent if entry[2] > 0]

    def eps(sigma: float) -> float:
        return epsilon_of(spent + [(sigma, sample_rate, steps)], delta, mechanism, explain=False)

    already = epsilon_of(spent, delta, mechanism)
    if already >= target_epsilon:
        raise DPConfigError(
            f"--dp-target-epsilon {target_epsilon} is the total budget, and the weights' ledger "
            f"has already spent ε = {already:.4g} at δ = {delta}: no noise level leaves room for "
            "more updates. Raise the target knowingly, or start from weights that have not seen "
            "this data"
        )
    low, high = 0.0, 1.0
    eps_high = eps(high)
    while eps_high > target_epsilon:
        low, high = high, high * 2
        if high > MAX_NOISE_MULTIPLIER:
            raise DPConfigError(
                f"--dp-target-epsilon {target_epsilon} needs σ above {MAX_NOISE_MULTIPLIER:g} for "
                f"{steps} updates at q = {sample_rate:.4g}: lower the number of updates or the "
                "sampling rate, or raise the target"
            )
        eps_high = eps(high)
    if low == 0.0:  # σ = 1 meets the target: search below it, down to a floor
        low = high / 2
        while low > 1e-3 and eps(low) <= target_epsilon:
            high, low = low, low / 2
        eps_high = eps(high)
    for _ in range(60):
        if target_epsilon - eps_high <= 0.01 * target_epsilon:
            break
        mid = math.sqrt(low * high)
        eps_mid = eps(mid)
        if eps_mid <= target_epsilon:
            high, eps_high = mid, eps_mid
        else:
            low = mid
    return float(high)
