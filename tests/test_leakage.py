"""Gradient leakage harness (`dgst_tf.federated.leakage`), on a tiny model and an 8x8 image.

Oracles: the tape gradient of the device's loss (the update a device sends must give it
back), the hockey-stick divergence of two Gaussians integrated numerically (the analytic
epsilon), softmax gradients built by hand (iDLG's label rule), and the image itself: the
attacks must recover it from a dense update and must not from a noised one, so a broken
attack and a broken defence both fail here.
"""
import math

import numpy as np
import pytest

from dgst_tf.federated.leakage import metrics, privacy
from dgst_tf.federated.leakage.labels import label_from_classifier, recover_label
from dgst_tf.federated.leakage.what_is_sent import Scenario, observe

LEARNING_RATE = 0.1
LABEL = 3


# --------------------------------------------------------------------------- epsilon
def _numerical_delta(noise_multiplier: float, epsilon: float) -> float:
    """sup over events of P[N(0, z^2) in S] - e^eps P[N(1, z^2) in S], integrated."""
    z = noise_multiplier
    x = np.linspace(-30 * z, 1 + 30 * z, 2_000_001)
    p = np.exp(-x ** 2 / (2 * z * z)) / (z * math.sqrt(2 * math.pi))
    q = np.exp(-(x - 1) ** 2 / (2 * z * z)) / (z * math.sqrt(2 * math.pi))
    return float(np.trapezoid(np.maximum(p - math.exp(epsilon) * q, 0.0), x))


@pytest.mark.parametrize("noise_multiplier, delta", [(0.5, 1e-5), (1.0, 1e-5), (2.0, 1e-3)])
def test_epsilon_is_where_the_gaussians_privacy_profile_reaches_delta(noise_multiplier,
                                                                      delta):
    epsilon = privacy.gaussian_epsilon(noise_multiplier, delta)
    assert epsilon > 0
    assert _numerical_delta(noise_multiplier, epsilon) == pytest.approx(delta, rel=1e-3)
    assert _numerical_delta(noise_multiplier, 0.9 * epsilon) > 1.1 * delta  # the smallest
    assert privacy.noise_multiplier_for(epsilon, delta) == pytest.approx(noise_multiplier,
                                                                         rel=1e-6)


def test_epsilon_known_values_and_the_classic_bound():
    # at epsilon 0 the privacy profile is the total variation 2 Phi(1 / 2z) - 1
    assert privacy.gaussian_delta(1.0, 0.0) == pytest.approx(math.erf(0.5 / math.sqrt(2)),
                                                             rel=1e-12)
    assert privacy.gaussian_epsilon(1.0, 0.39) == 0.0
    for epsilon in (0.1, 0.5, 0.9):  # Dwork & Roth's sufficient noise is enough, not exact
        classic = privacy.classic_noise_multiplier(epsilon, 1e-5)
        assert 0.5 * epsilon < privacy.gaussian_epsilon(classic, 1e-5) < epsilon
    with pytest.raises(ValueError, match="delta"):
        privacy.gaussian_epsilon(1.0, 0.0)


def test_clipping_bounds_the_norm_and_the_noise_has_the_stated_scale():
    rng = np.random.default_rng(0)
    big = [rng.normal(size=(30, 40)), rng.normal(size=(7,))]
    clipped = privacy.clip_and_noise(big, clip_norm=2.0, noise_multiplier=0.0)
    norm = math.sqrt(sum(float(np.sum(c.astype(np.float64) ** 2)) for c in clipped))
    assert norm == pytest.approx(2.0, rel=1e-5)
    np.testing.assert_allclose(clipped[0] / big[0], clipped[1][0] / big[1][0], rtol=1e-4)
    small = [np.full((5,), 0.1)]
    np.testing.assert_allclose(privacy.clip_and_noise(small, 2.0, 0.0)[0], small[0],
                               rtol=1e-6)
    zeros = [np.zeros((200_000,))]
    noise = privacy.clip_and_noise(zeros, clip_norm=2.0, noise_multiplier=0.5, seed=1)[0]
    assert noise.std() == pytest.approx(1.0, rel=0.01)
    np.testing.assert_array_equal(noise, privacy.clip_and_noise(zeros, 2.0, 0.5, seed=1)[0])
    assert not np.array_equal(noise, privacy.clip_and_noise(zeros, 2.0, 0.5, seed=2)[0])


def test_composition_of_gaussian_releases_is_one_release_with_less_noise():
    # k releases with noise z are one release with noise z / sqrt(k) (GDP composition)
    assert privacy.composed_epsilon(2.0, 4, 1e-5) == pytest.approx(
        privacy.gaussian_epsilon(1.0, 1e-5), rel=1e-9)
    assert privacy.composed_epsilon(1.0, 1, 1e-5) == privacy.gaussian_epsilon(1.0, 1e-5)
    eps = [privacy.composed_epsilon(1.0, k, 1e-5) for k in (1, 2, 10, 100)]
    assert eps == sorted(eps) and eps[-1] < 100 * eps[0]  # grows, sublinearly


def test_noised_entries_keep_their_channels_and_are_clipped_in_gradient_units():
    from dgst_tf.federated.payload import Entry

    entries = [Entry(0, np.array([1, 4]), np.full((2, 3), -0.3, np.float32)),
               Entry(2, np.arange(5), np.full((5,), 0.4, np.float32), all_channels=True)]
    lr = 0.1  # delta = -lr * gradient: gradient norm = sqrt(6 * 9 + 5 * 16) = sqrt(134)
    out = privacy.clip_and_noise_entries(entries, clip_norm=1.0, noise_multiplier=0.0,
                                         unit=-lr)
    for before, after in zip(entries, out):
        assert after.array == before.array and after.all_channels == before.all_channels
        np.testing.assert_array_equal(after.channels, before.channels)
        np.testing.assert_allclose(after.values, before.values / math.sqrt(134), rtol=1e-5)


# --------------------------------------------------------------------------- labels
@pytest.mark.parametrize("label", range(5))
def test_idlg_label_rule_reads_the_label_off_the_classifier_gradient(label):
    rng = np.random.default_rng(label)
    logits = rng.normal(size=5) * 3
    p = np.exp(logits) / np.exp(logits).sum()
    error = p - np.eye(5)[label]                                # dL/dz = dL/db
    features = np.maximum(rng.normal(size=16), 0)               # ReLU outputs, some zero
    assert label_from_classifier(bias_gradient=error) == label
    assert label_from_classifier(kernel_gradient=np.outer(features, error)) == label
    with pytest.raises(ValueError, match="kernel or bias"):
        label_from_classifier()


def test_psnr_and_ssim_of_known_pairs():
    image = np.zeros((8, 8, 3))
    assert metrics.psnr(image, image + 0.1) == pytest.approx(20.0)
    assert metrics.ssim(image + 0.5, image + 0.5) == pytest.approx(1.0)
    assert metrics.label_recovery_rate([1, 2, 3, 4], [1, 2, 0, 4]) == 0.75
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        metrics.psnr(image, image + 2)


# --------------------------------------------------------------------------- a device
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A float device training a conv(sigmoid)-dense model (DLG's setting) at lr 0.1, its
    initial weights and a smooth seeded 8x8 image in [0, 1]."""
    from dgst_tf.core.keras_compat import keras, tf
    from dgst_tf.federated.config import FederatedConfig
    from dgst_tf.federated.device import SimulatedDevice

    keras.utils.set_random_seed(0)
    image_in = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="sigmoid", name="conv")(image_in)
    x = keras.layers.Flatten(name="flatten")(x)
    path = tmp_path_factory.mktemp("leakage") / "tiny.keras"
    keras.Model(image_in, keras.layers.Dense(10, name="classifier")(x)).save(path)
    devices = {m: SimulatedDevice(FederatedConfig(
        model=str(path), method=m, sram_budget=None, learning_rate=LEARNING_RATE,
        image_size=8)) for m in ("full", "last_layer")}
    rng = np.random.default_rng(0)
    image = tf.image.resize(rng.uniform(0, 1, (1, 3, 3, 3)), (8, 8)).numpy()[0]
    return devices, devices["full"].weights(), image.astype(np.float32)


def _tape_gradient(model, image):
    from dgst_tf.core.keras_compat import keras, tf

    with tf.GradientTape() as tape:
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(
            [LABEL], model(image[None], training=False))
    return [g.numpy() for g in tape.gradient(loss, model.trainable_weights)]


def test_the_observed_update_gives_the_devices_gradient_back(tiny):
    from dgst_tf.federated import payload

    devices, weights, image = tiny
    device = devices["full"]
    seen = observe(device, weights, image, LABEL, Scenario("dense", "full"))
    device.set_weights(weights)
    for got, want, sent in zip(seen.gradients, _tape_gradient(device.sparse.base, image),
                               seen.sent):
        assert sent.all()
        np.testing.assert_allclose(got, want, atol=2e-6 / LEARNING_RATE)
    assert seen.payload_bytes == payload.payload_bytes(
        payload.sparse_update(weights, [w - LEARNING_RATE * g
                                        for w, g in zip(weights, seen.gradients)]), "fp32")
    last = observe(devices["last_layer"], weights, image, LABEL,
                   Scenario("last_layer", "last_layer"))
    assert [s.all() for s in last.sent] == [False, False, True, True]
    assert [s.any() for s in last.sent] == [False, False, True, True]
    assert not any(np.any(g) for g in last.gradients[:2])
    with pytest.raises(ValueError, match="'last_layer'"):
        observe(device, weights, image, LABEL, Scenario("last_layer", "last_layer"))


def _matching(tiny, scenario, method="full"):
    from dgst_tf.federated.leakage.matching import GradientMatching

    devices, weights, image = tiny
    seen = observe(devices[method], weights, image, LABEL, scenario, seed=5)
    model = devices[method].sparse.base
    return GradientMatching(model, seen), recover_label(model, seen), seen


@pytest.mark.parametrize("method", ["full", "last_layer"])
def test_the_true_image_matches_its_own_observed_gradient(tiny, method):
    from dgst_tf.core.keras_compat import tf

    matching, label, _ = _matching(tiny, Scenario(method, method), method)
    truth = tiny[2][None]
    grads = matching.gradients(truth, tf.one_hot([LABEL], 10))
    assert label == LABEL
    assert float(matching.cosine(grads)) < 1e-5
    assert float(matching.l2(grads)) < 1e-8
    other = np.random.default_rng(1).uniform(0, 1, truth.shape).astype(np.float32)
    assert float(matching.cosine(matching.gradients(other, tf.one_hot([LABEL], 10)))) > 1e-3


def test_only_the_sent_channels_are_matched(tiny):
    """A partial update (2 of the conv's 3 input channels, not its bias): the true image
    matches it exactly only if the unsent values are left out, not compared with zeros."""
    import dataclasses

    from dgst_tf.core.keras_compat import tf
    from dgst_tf.federated.leakage.matching import GradientMatching

    devices, weights, image = tiny
    seen = observe(devices["full"], weights, image, LABEL, Scenario("dense", "full"))
    sent = [np.zeros_like(s) for s in seen.sent]
    sent[0][:, :, :2, :] = True
    partial = dataclasses.replace(seen, sent=sent, gradients=[
        np.where(s, g, 0) for s, g in zip(sent, seen.gradients)])
    matching = GradientMatching(devices["full"].sparse.base, partial)
    assert matching.arrays == [0]
    grads = matching.gradients(image[None], tf.one_hot([LABEL], 10))
    assert float(matching.cosine(grads)) < 1e-5
    with pytest.raises(ValueError, match="build a new one"):
        matching.load(seen)


def test_attacks_recover_the_image_from_a_dense_update(tiny):
    from dgst_tf.federated.leakage.attacks import DLG, IDLG, InvertingGradients

    matching, label, _ = _matching(tiny, Scenario("dense", "full"))
    image = tiny[2]
    assert label == LABEL
    for found in (InvertingGradients(matching, iterations=300).run(label, seed=0),
                  IDLG(matching, iterations=150).run(label, seed=0),
                  DLG(matching, iterations=150).run(seed=0)):
        assert found.label == LABEL
        assert metrics.psnr(image, found.image) > 30
        assert metrics.ssim(image, found.image) > 0.95


def test_lbfgs_attacks_spend_their_budget_when_the_gradients_are_small(tiny, tmp_path):
    """On a pooled head the matching loss and its pixel gradient are small: scipy's
    absolute tolerances (gtol 1e-5 by default) ended iDLG after 27 evaluations here, near
    its random start; the attack's budget is its iteration count."""
    from dgst_tf.core.keras_compat import keras
    from dgst_tf.federated.config import FederatedConfig
    from dgst_tf.federated.device import SimulatedDevice
    from dgst_tf.federated.leakage.attacks import IDLG
    from dgst_tf.federated.leakage.matching import GradientMatching

    keras.utils.set_random_seed(0)
    image_in = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="sigmoid", name="conv")(image_in)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    keras.Model(image_in, keras.layers.Dense(10, name="classifier")(x)).save(
        tmp_path / "pooled.keras")
    device = SimulatedDevice(FederatedConfig(model=str(tmp_path / "pooled.keras"),
                                             method="full", sram_budget=None,
                                             learning_rate=LEARNING_RATE, image_size=8))
    seen = observe(device, device.weights(), tiny[2], LABEL, Scenario("dense", "full"))
    found = IDLG(GradientMatching(device.sparse.base, seen), iterations=150).run(LABEL, seed=0)
    assert found.evaluations > 100


def test_a_noised_update_does_not_give_the_image_back(tiny):
    from dgst_tf.federated.leakage.attacks import IDLG, InvertingGradients

    scenario = Scenario("dp", "full", clip_norm=1.0, noise_multiplier=1.0)
    matching, label, seen = _matching(tiny, scenario)
    assert seen.epsilon == pytest.approx(privacy.gaussian_epsilon(1.0, 1e-5))
    assert all(s.all() for s in seen.sent)
    image = tiny[2]
    for found in (InvertingGradients(matching, iterations=300).run(LABEL, seed=0),
                  IDLG(matching, iterations=150).run(LABEL, seed=0)):
        assert metrics.psnr(image, found.image) < 15
        assert metrics.ssim(image, found.image) < 0.5


def test_a_federated_device_sends_its_round_update_clipped_and_noised(tiny):
    """`FederatedConfig.clip_norm` / ``noise_multiplier``: the same local round, its update
    scaled to the clip norm (no noise), or scattered by noise of the stated size."""
    import dataclasses

    from dgst_tf.federated import payload
    from dgst_tf.federated.client import device_update
    from dgst_tf.federated.config import FederatedConfig

    config = FederatedConfig(model=tiny[0]["full"].config.model, method="full",
                             dataset="fashion_mnist", image_size=8, classes=10, clients=2,
                             train_examples=6, test_examples=2, sram_budget=None,
                             learning_rate=LEARNING_RATE, encoding="fp32")
    weights = tiny[1]
    shapes = [w.shape for w in weights]

    def deltas(**dp):
        blob, _, _ = device_update(dataclasses.replace(config, **dp), weights, 0, 1)
        return np.concatenate([d.ravel() for d in payload.dense_deltas(
            payload.decode(blob, shapes), shapes)])

    clean = deltas()
    clipped = deltas(clip_norm=1e-3)
    np.testing.assert_allclose(clipped, clean * 1e-3 / np.linalg.norm(clean), rtol=1e-4,
                               atol=1e-9)
    noise = deltas(clip_norm=1e-3, noise_multiplier=2.0) - clipped
    assert noise.std() == pytest.approx(2e-3, rel=0.1)
    with pytest.raises(ValueError, match="noise needs a clip_norm"):
        dataclasses.replace(config, noise_multiplier=1.0)
