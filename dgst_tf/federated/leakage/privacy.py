"""The Gaussian mechanism on a device's update: clip, add noise, and the epsilon it buys.

    from dgst_tf.federated.leakage.privacy import clip_and_noise, gaussian_epsilon
    noised = clip_and_noise(gradients, clip_norm=1.0, noise_multiplier=0.8, seed=0)
    epsilon = gaussian_epsilon(noise_multiplier=0.8, delta=1e-5)     # one release
    epsilon = composed_epsilon(0.8, releases=20, delta=1e-5)         # 20 rounds

DP-SGD style (Abadi et al. 2016) at batch size 1: the device's gradient, all the arrays it
sends taken together as one vector, is scaled to L2 norm at most ``clip_norm`` C, and every
sent value gets independent Gaussian noise of standard deviation ``noise_multiplier * C``.
Adding or removing the device's one example changes the clipped gradient by at most C (the
L2 sensitivity), so releasing the noised gradient once is (epsilon, delta)-DP with the
epsilon of the *analytic* Gaussian mechanism (Balle & Wang, "Improving the Gaussian
Mechanism for Differential Privacy", ICML 2018, Theorem 8): the smallest epsilon with

    Phi(1/(2z) - epsilon z) - e^epsilon Phi(-1/(2z) - epsilon z) <= delta,     z = sigma / C.

This is exact for one release (the mechanism's privacy profile), tighter than the classic
sufficient condition sigma >= sqrt(2 ln(1.25/delta)) C / epsilon (Dwork & Roth 2014,
Theorem A.1, valid for epsilon < 1; `classic_noise_multiplier`). A device that releases
several noised updates (one per federated round) composes them: a Gaussian mechanism with
noise multiplier z is (1/z)-GDP and k of them compose to (sqrt(k)/z)-GDP exactly, adaptive
choices included (Dong, Roth & Su, "Gaussian Differential Privacy", JRSS-B 2022,
Corollary 3.3), so k releases have the epsilon of one with noise z / sqrt(k)
(`composed_epsilon`). Without subsampling this is tight; the leakage harness attacks one
batch-1 step, one release. Which entries are noised (a sparse update's channels) must not
depend on the data for the guarantee to hold: DGSU's weight-norm selection and Lin et al.'s
static channels depend only on the weights.

In a federated round (`clip_and_noise_entries` on the whole round's update, DP-FedAvg
style with the noise added on the device) the unit of privacy is the device: C bounds how
much its whole local data can move the update. There the noise covers the channels the
round changed (`payload.sparse_update`); a channel whose every step had an exactly zero
gradient is not sent, which the stated epsilon does not cover (the leakage harness's
noised scenarios send, and noise, every channel of the updated arrays).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np


def _check(noise_multiplier: float, delta: float) -> None:
    if not noise_multiplier > 0:
        raise ValueError(f"noise_multiplier must be > 0, got {noise_multiplier!r}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")


def gaussian_delta(noise_multiplier: float, epsilon: float) -> float:
    """The smallest delta for which one release with noise ``noise_multiplier`` times the
    sensitivity is (epsilon, delta)-DP (Balle & Wang 2018, Theorem 8).

        gaussian_delta(1.0, 0.0)      # 2 Phi(1/2) - 1 = 0.3829...
    """
    from scipy import special

    z = float(noise_multiplier)
    _check(z, 0.5)
    if epsilon < 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon!r}")
    low, high = 0.5 / z - epsilon * z, -0.5 / z - epsilon * z
    # e^eps Phi(high) in log space: e^eps overflows long before the product does
    return float(special.ndtr(low) - math.exp(epsilon + special.log_ndtr(high)))


def gaussian_epsilon(noise_multiplier: float, delta: float) -> float:
    """The epsilon of one Gaussian-mechanism release at ``delta`` (analytic, exact).

        gaussian_epsilon(noise_multiplier=1.0, delta=1e-5)     # about 4.4
    """
    from scipy import optimize

    _check(noise_multiplier, delta)
    if gaussian_delta(noise_multiplier, 0.0) <= delta:
        return 0.0
    high = 1.0
    while gaussian_delta(noise_multiplier, high) > delta:
        high *= 2.0
    return float(optimize.brentq(lambda e: gaussian_delta(noise_multiplier, e) - delta,
                                 0.0, high, xtol=1e-12, rtol=1e-12))


def noise_multiplier_for(epsilon: float, delta: float) -> float:
    """The smallest noise multiplier whose one release is (epsilon, delta)-DP.

        z = noise_multiplier_for(8.0, 1e-5)
    """
    from scipy import optimize

    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon!r}")
    _check(1.0, delta)
    low, high = 1e-3, 1.0
    while gaussian_epsilon(high, delta) > epsilon:
        high *= 2.0
    while gaussian_epsilon(low, delta) <= epsilon:
        low /= 2.0
    return float(optimize.brentq(lambda z: gaussian_epsilon(z, delta) - epsilon, low, high,
                                 xtol=1e-12, rtol=1e-10))


def classic_noise_multiplier(epsilon: float, delta: float) -> float:
    """sqrt(2 ln(1.25 / delta)) / epsilon: Dwork & Roth's sufficient noise for epsilon < 1."""
    if not 0 < epsilon < 1:
        raise ValueError(f"the classic bound holds for 0 < epsilon < 1, got {epsilon!r}")
    _check(1.0, delta)
    return math.sqrt(2.0 * math.log(1.25 / delta)) / epsilon


def clip_and_noise(gradients, clip_norm: float, noise_multiplier: float,
                   seed: int = 0) -> list[np.ndarray]:
    """``gradients`` (a list of arrays, one vector together) scaled to L2 norm at most
    ``clip_norm``, plus N(0, (noise_multiplier * clip_norm)^2) on every value.

        noised = clip_and_noise([g_kernel, g_bias], clip_norm=1.0, noise_multiplier=0.5)
    """
    if not clip_norm > 0:
        raise ValueError(f"clip_norm must be > 0, got {clip_norm!r}")
    if noise_multiplier < 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier!r}")
    arrays = [np.asarray(g, np.float64) for g in gradients]
    norm = math.sqrt(sum(float(np.sum(a * a)) for a in arrays))
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    rng = np.random.default_rng(seed)
    return [(a * scale + rng.normal(0.0, noise_multiplier * clip_norm, a.shape)
             ).astype(np.float32) for a in arrays]


def composed_epsilon(noise_multiplier: float, releases: int, delta: float) -> float:
    """The epsilon of ``releases`` Gaussian-mechanism releases with one noise multiplier
    (exact GDP composition, module doc).

        composed_epsilon(2.0, releases=4, delta=1e-5) == gaussian_epsilon(1.0, 1e-5)
    """
    if int(releases) < 1:
        raise ValueError(f"releases must be >= 1, got {releases!r}")
    _check(noise_multiplier, delta)
    return gaussian_epsilon(noise_multiplier / math.sqrt(int(releases)), delta)


def clip_and_noise_entries(entries, clip_norm: float, noise_multiplier: float, seed: int = 0,
                           unit: float = 1.0) -> list:
    """`clip_and_noise` applied to the values of `payload.Entry` objects divided by
    ``unit`` (``-learning_rate``: clip and noise the gradient an SGD step's delta implies),
    multiplied back; the channels sent stay the same.

        entries = clip_and_noise_entries(payload.sparse_update(before, after), 0.1, 1.0)
    """
    noised = clip_and_noise([np.asarray(e.values) / unit for e in entries], clip_norm,
                            noise_multiplier, seed)
    return [dataclasses.replace(e, values=(np.float32(unit) * v).astype(np.float32))
            for e, v in zip(entries, noised)]
