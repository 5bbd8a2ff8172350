"""σ calibration and ε against independent accountants."""

import math

import numpy as np
import pytest
from prv_accountant import PRVAccountant as ReferencePRV
from prv_accountant.privacy_random_variables import PoissonSubsampledGaussianMechanism

from fairseq_dp.accounting import PrivacyAccountant, calibrate_noise_multiplier

# the RGP paper's SST-2 setting: logical batch 2000 of 67,349, 30 epochs
Q, STEPS, TARGET, DELTA = 2000 / 67349, 990, 8.0, 1e-5


def reference_prv_epsilon(sigma, q, steps, delta):
    mechanism = PoissonSubsampledGaussianMechanism(sampling_probability=q, noise_multiplier=sigma)
    accountant = ReferencePRV(mechanism, max_self_compositions=steps, eps_error=0.01, delta_error=delta / 1000)
    _, _, eps_upper = accountant.compute_epsilon(delta=delta, num_self_compositions=steps)
    return eps_upper


def integer_order_rdp_epsilon(sigma, q, steps, delta, orders):
    """RDP of the sampled Gaussian at integer orders (Mironov, Talwar, Zhang 2019,
    binomial expansion), composed over steps, converted with Balle et al. 2020."""
    best = math.inf
    for a in orders:
        terms = [
            math.lgamma(a + 1) - math.lgamma(k + 1) - math.lgamma(a - k + 1)
            + (a - k) * math.log1p(-q) + k * math.log(q) + (k * k - k) / (2 * sigma**2)
            for k in range(a + 1)
        ]
        log_a = np.logaddexp.reduce(terms)
        rdp = steps * log_a / (a - 1)
        eps = rdp - (math.log(delta) + math.log(a)) / (a - 1) + math.log((a - 1) / a)
        best = min(best, eps)
    return best


def test_prv_calibration_at_the_rgp_sst2_setting():
    sigma = calibrate_noise_multiplier(target_epsilon=TARGET, delta=DELTA, sample_rate=Q, steps=STEPS)
    assert sigma == pytest.approx(0.879, abs=0.01)  # the published configuration's σ
    reference = reference_prv_epsilon(sigma, Q, STEPS, DELTA)
    assert 0.97 * TARGET <= reference <= TARGET + 0.02
    accountant = PrivacyAccountant("prv")
    accountant.step(noise_multiplier=sigma, sample_rate=Q, num_steps=STEPS)
    assert accountant.get_epsilon(DELTA) == pytest.approx(reference, abs=0.03)
    assert accountant.get_epsilon(DELTA) <= TARGET


def test_rdp_against_integer_order_computation():
    sigma = calibrate_noise_multiplier(target_epsilon=TARGET, delta=DELTA, sample_rate=Q, steps=STEPS,
                                       mechanism="rdp")
    accountant = PrivacyAccountant("rdp")
    accountant.step(noise_multiplier=sigma, sample_rate=Q, num_steps=STEPS)
    eps = accountant.get_epsilon(DELTA)
    # opacus also uses fractional orders, so it can only be tighter, and not by much
    oracle = integer_order_rdp_epsilon(sigma, Q, STEPS, DELTA, orders=range(2, 64))
    assert 0.95 * oracle <= eps <= oracle + 1e-9
    assert 0.97 * TARGET <= eps <= TARGET


@pytest.mark.parametrize("target", [0.5, 3.0])
def test_calibration_reaches_target_from_below(target):
    sigma = calibrate_noise_multiplier(target_epsilon=target, delta=DELTA, sample_rate=0.01, steps=300)
    eps = reference_prv_epsilon(sigma, 0.01, 300, DELTA)
    assert 0.97 * target <= eps <= target * 1.005


def test_ledger_composes_merges_and_round_trips():
    a = PrivacyAccountant("prv")
    for _ in range(5):
        a.step(noise_multiplier=1.0, sample_rate=0.02)
    assert a.history == [(1.0, 0.02, 5)] and a.steps == 5
    b = PrivacyAccountant("prv")
    b.step(noise_multiplier=1.0, sample_rate=0.02, num_steps=5)
    assert a.get_epsilon(DELTA) == b.get_epsilon(DELTA)
    c = PrivacyAccountant("rdp")
    c.load_state_dict(a.state_dict())
    assert c.mechanism == "prv" and c.get_epsilon(DELTA) == a.get_epsilon(DELTA)
    a.step(noise_multiplier=0.0, sample_rate=0.02)
    assert a.get_epsilon(DELTA) == math.inf
    assert PrivacyAccountant("rdp").get_epsilon(DELTA) == 0.0


def test_bad_accountant_arguments():
    with pytest.raises(ValueError, match="--dp-accountant 'gdp' is unknown"):
        PrivacyAccountant("gdp")
    with pytest.raises(ValueError, match="must be > 0"):
        calibrate_noise_multiplier(target_epsilon=0, delta=DELTA, sample_rate=0.1, steps=10)
