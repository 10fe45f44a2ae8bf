"""What an eavesdropper (or an honest-but-curious server) sees after one batch-1 step.

    from dgst_tf.federated.leakage.what_is_sent import SCENARIOS, observe
    device = SimulatedDevice(dataclasses.replace(config, method="dgsu"))
    seen = observe(device, global_weights, image, label, SCENARIOS["dgsu"], seed=0)
    seen.gradients, seen.sent, seen.payload_bytes, seen.epsilon

The device (`dgst_tf.federated.device.SimulatedDevice`, a float device with a fresh
selection state: a device's very first step) trains one step on one image from the global
weights; its update is exactly the federated uplink: `payload.sparse_update` (the channels
it changed), optionally clipped and noised (`privacy.clip_and_noise`, applied to the
gradient the step implies, before encoding, as DP-SGD would, on every channel of the arrays
the step updated), `payload.encode` in the scenario's encoding and `payload.decode` on the
receiving side. The attacker knows the
global weights (the server sent them) and the learning rate, so plain SGD gives the
gradient back: ``gradient = -delta / learning_rate`` on every sent channel; the rest is
unknown (``sent`` is False there), not zero. A float32 delta carries the rounding of
``w - lr * g`` in float32, an int8 payload its quantization: the attacker sees both.

Scenarios (`SCENARIOS`): ``dense`` (full fine-tuning, float32: the classic DLG setting),
``last_layer``, ``sparse_update`` (Lin et al.'s static channels), ``dgsu`` (at the
device's ``target_fraction``, 2% by default), ``dense_int8`` / ``dgsu_int8`` (the int8
payload, one scale per array), ``dense_dp`` (clip to norm 1 and Gaussian noise for epsilon
8 at delta 1e-5, one release) and ``dense_noise`` (the same clipping, noise multiplier
1e-3: noise without a meaningful epsilon).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from dgst_tf.federated import payload
from dgst_tf.federated.leakage import privacy


@dataclasses.dataclass(frozen=True)
class Scenario:
    """How a device trains (``method``, a `dgst_tf.training.methods` name) and what it
    sends: ``encoding`` of the payload, and with ``clip_norm`` the Gaussian mechanism at
    ``noise_multiplier`` (or, if ``epsilon`` is given, the noise that buys it at ``delta``)."""
    name: str
    method: str
    encoding: str = "fp32"
    clip_norm: float | None = None
    noise_multiplier: float | None = None
    epsilon: float | None = None
    delta: float = 1e-5

    def __post_init__(self):
        if self.encoding not in payload.ENCODINGS:
            raise ValueError(f"scenario {self.name!r}: encoding must be one of "
                             f"{payload.ENCODINGS}, got {self.encoding!r}")
        if self.clip_norm is not None and (self.noise_multiplier is None) == (
                self.epsilon is None):
            raise ValueError(f"scenario {self.name!r}: with clip_norm give exactly one of "
                             "noise_multiplier and epsilon")

    def noise(self) -> float | None:
        """The noise multiplier (None: no clipping, no noise)."""
        if self.clip_norm is None:
            return None
        if self.noise_multiplier is not None:
            return float(self.noise_multiplier)
        return privacy.noise_multiplier_for(self.epsilon, self.delta)

    def privacy_epsilon(self) -> float | None:
        """The epsilon of the release at ``delta`` (None: not private; inf without noise)."""
        noise = self.noise()
        if noise is None:
            return None
        return float("inf") if noise == 0 else privacy.gaussian_epsilon(noise, self.delta)


SCENARIOS = {s.name: s for s in (
    Scenario("dense", "full"),
    Scenario("last_layer", "last_layer"),
    Scenario("sparse_update", "sparse_update"),
    Scenario("dgsu", "dgsu"),
    Scenario("dense_int8", "full", encoding="int8"),
    Scenario("dgsu_int8", "dgsu", encoding="int8"),
    Scenario("dense_dp", "full", clip_norm=1.0, epsilon=8.0),
    Scenario("dense_noise", "full", clip_norm=1.0, noise_multiplier=1e-3),
)}


@dataclasses.dataclass
class Observation:
    """What the attacker has: the global ``weights`` the device started from, the
    ``gradients`` its update implies (float32, the weights' shapes, 0 where not sent),
    ``sent`` (bool masks, the same shapes), the ``learning_rate``, the ``payload_bytes``
    of the uplink and the ``epsilon`` of the release (None if not noised)."""
    scenario: str
    weights: list
    gradients: list
    sent: list
    learning_rate: float
    payload_bytes: int
    epsilon: float | None = None


def _every_channel(entries, weights) -> list:
    """Every channel of the arrays the step updated: in a noised release a channel left out
    because its gradient was exactly zero (a dead ReLU) would say so without noise."""
    every = []
    for entry in entries:
        values = np.zeros_like(payload.by_channel(np.asarray(weights[entry.array], np.float32)))
        values[entry.channels] = entry.values
        every.append(payload.Entry(entry.array, np.arange(len(values)), values, True))
    return every


def observe(device, weights, image, label: int, scenario: Scenario,
            seed: int = 0) -> Observation:
    """The `Observation` of one batch-1 step of ``device`` on ``image`` (H, W, C, as the
    model takes it) with ``label``, from the global ``weights``, under ``scenario``.

        seen = observe(device, device.weights(), x[0], int(y[0]), SCENARIOS["dense"])
    """
    if device.config.method != scenario.method:
        raise ValueError(f"scenario {scenario.name!r} needs a device training with "
                         f"{scenario.method!r}; this one trains with "
                         f"{device.config.method!r}")
    if device.graph is not None:
        raise ValueError("observe needs a float device: the int8 step's update is not "
                         "-lr * gradient (int8 payloads: use an int8 encoding scenario)")
    if device.config.local_epochs != 1:
        raise ValueError(f"one step means local_epochs=1, got {device.config.local_epochs}")
    learning_rate = float(device.config.learning_rate)
    device.set_selection_state(None)
    after, _ = device.train(weights, np.asarray(image)[None], np.asarray([label]), seed=seed)
    entries = payload.sparse_update(weights, after)
    if scenario.clip_norm is not None:
        entries = privacy.clip_and_noise_entries(_every_channel(entries, weights),
                                                 scenario.clip_norm, scenario.noise(), seed,
                                                 unit=-learning_rate)
    blob = payload.encode(entries, scenario.encoding)
    shapes = [np.shape(w) for w in weights]
    received = payload.decode(blob, shapes)
    sent = [np.zeros(s, bool) for s in shapes]
    for entry in received:
        payload.by_channel(sent[entry.array])[entry.channels] = True
    gradients = [-d / np.float32(learning_rate) for d in payload.dense_deltas(received, shapes)]
    return Observation(scenario.name, [np.asarray(w, np.float32) for w in weights], gradients,
                       sent, learning_rate, len(blob), scenario.privacy_epsilon())
