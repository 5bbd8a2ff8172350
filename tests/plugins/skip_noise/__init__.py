"""Test-only plugin: fairseq_dp with a deliberate privacy bug, for the audit's tests.

Loaded with ``--user-dir tests/plugins/skip_noise`` instead of the plugin: it
registers everything fairseq_dp does (by importing it), then drops the
Gaussian noise of all but one update in ``SKIP_NOISE_KEEP_EVERY`` (environment,
default: never noise). The accountant still records every update as noised,
so the run reports an ε it does not have: the audit must catch it.
"""

import os

import fairseq_dp  # noqa: F401  (registers the plugin's tasks, criterions and archs)
import fairseq_dp.trainer as dp_trainer

KEEP_EVERY = int(os.environ.get("SKIP_NOISE_KEEP_EVERY", "0"))
_real_add_noise = dp_trainer.add_noise
_updates = {"count": 0, "generator": None}


def _add_noise_sometimes(values, std, generator):
    # one generator per update: a new one marks the next update
    if generator is not _updates["generator"]:
        _updates["generator"] = generator
        _updates["count"] += 1
    if KEEP_EVERY and _updates["count"] % KEEP_EVERY == 0:
        return _real_add_noise(values, std, generator)
    return dict(values)


dp_trainer.add_noise = _add_noise_sometimes
