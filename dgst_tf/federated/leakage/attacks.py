"""Gradient inversion attacks on one observed update: DLG, iDLG and Inverting Gradients.

    from dgst_tf.federated.leakage.attacks import DLG, IDLG, InvertingGradients
    matching = GradientMatching(model, seen, mean, std)
    found = InvertingGradients(matching, iterations=1000).run(label=recover_label(model, seen))
    found.image, found.label, found.loss
    found = DLG(matching).run(seed=1)               # the label is optimised too
    matching.load(next_seen)                         # the same attack objects, next image

- `DLG` (Zhu et al., "Deep Leakage from Gradients", NeurIPS 2019): a dummy image and dummy
  label logits, both optimised by L-BFGS to minimise the squared distance between their
  gradient and the observed one; the label is the argmax of the optimised soft label.
- `IDLG` (Zhao et al., "iDLG: Improved Deep Leakage from Gradients", 2020): the label is
  read off the classifier's gradient first (`labels.recover_label`), then DLG on the image.
- `InvertingGradients` (Geiping et al., "Inverting Gradients - How easy is it to break
  privacy in federated learning?", NeurIPS 2020): cosine distance plus ``tv`` times total
  variation, Adam on the image (``signed``: the sign of its gradient, their default),
  learning rate divided by 10 at 3/8, 5/8 and 7/8 of the iterations, pixels kept in
  [0, 1] (their "boxed"), the best of ``restarts`` random starts by final loss.

Here every attack works on pixels in [0, 1] (L-BFGS-B's box for DLG / iDLG, where Zhu et al.
leave the image unconstrained) from a seeded uniform start. Each attack object traces its
step once; `GradientMatching.load` swaps the observation without retracing.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np
from scipy import optimize

from dgst_tf.core.keras_compat import keras, tf
from dgst_tf.federated.leakage.matching import total_variation


@dataclasses.dataclass
class Reconstruction:
    """An attack's result: ``image`` (H, W, C) in [0, 1], ``label``, the final ``loss``
    of its objective, the objective ``evaluations`` (gradient computations) and ``seconds``."""
    image: np.ndarray
    label: int
    loss: float
    evaluations: int
    seconds: float


def _start(shape, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.0, 1.0, shape).astype(np.float32)


class DLG:
    """Zhu et al.'s attack (module doc): at most ``iterations`` L-BFGS iterations and
    ``evaluations`` objective evaluations (default ``2 * iterations``)."""

    optimise_label = True

    def __init__(self, matching, iterations: int = 300, evaluations: int | None = None):
        if iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {iterations}")
        self.matching = matching
        self.iterations, self.evaluations = iterations, evaluations or 2 * iterations
        self.pixels = int(np.prod(matching.shape))
        self.label = tf.Variable(tf.zeros((1, matching.classes)), trainable=False)
        size = self.pixels + (matching.classes if self.optimise_label else 0)
        self._objective = tf.function(self._value_and_gradient,
                                      input_signature=[tf.TensorSpec([size], tf.float32)])

    def _value_and_gradient(self, z):
        with tf.GradientTape() as tape:
            tape.watch(z)
            image = tf.reshape(z[:self.pixels], self.matching.shape)
            label = (tf.nn.softmax(z[None, self.pixels:]) if self.optimise_label
                     else self.label)
            loss = self.matching.l2(self.matching.gradients(image, label))
        return loss, tape.gradient(loss, z)

    def _scipy_objective(self, z):
        loss, grad = self._objective(tf.constant(z, tf.float32))
        return float(loss), np.asarray(grad, np.float64)

    def _start(self, seed: int) -> np.ndarray:
        start = _start(self.pixels, seed)
        if self.optimise_label:
            start = np.concatenate([start, np.random.default_rng(seed + 1).normal(
                size=self.matching.classes).astype(np.float32)])
        return start

    def run(self, label: int | None = None, seed: int = 0) -> Reconstruction:
        """Reconstruct the image (and, for DLG, the label) of the loaded observation."""
        start = time.perf_counter()
        if not self.optimise_label:
            if label is None:
                raise ValueError(f"{type(self).__name__} needs the label "
                                 "(labels.recover_label)")
            self.label.assign(tf.one_hot([int(label)], self.matching.classes))
        z0 = self._start(seed)
        bounds = [(0.0, 1.0)] * self.pixels + [(None, None)] * (len(z0) - self.pixels)
        # no tolerance stops (scipy's gtol / ftol are absolute): the matching loss scales
        # with the model's gradient norms, and on a model with small gradients (a pooled
        # head) the defaults ended the attack at its random start; the budget is the
        # iteration and evaluation count
        result = optimize.minimize(self._scipy_objective, z0.astype(np.float64), jac=True,
                                   method="L-BFGS-B", bounds=bounds,
                                   options={"maxiter": self.iterations,
                                            "maxfun": self.evaluations,
                                            "gtol": 0.0, "ftol": 0.0})
        image = result.x[:self.pixels].reshape(self.matching.shape[1:]).astype(np.float32)
        found = int(np.argmax(result.x[self.pixels:])) if self.optimise_label else int(label)
        return Reconstruction(image, found, float(result.fun), int(result.nfev),
                              time.perf_counter() - start)


class IDLG(DLG):
    """Zhao et al.'s attack: DLG on the image with the label given (module doc)."""

    optimise_label = False


class InvertingGradients:
    """Geiping et al.'s attack (module doc)."""

    def __init__(self, matching, iterations: int = 1000, learning_rate: float = 0.1,
                 tv: float = 1e-4, signed: bool = True, restarts: int = 1):
        if iterations < 8 or restarts < 1:
            raise ValueError(f"need iterations >= 8 and restarts >= 1, got {iterations}, "
                             f"{restarts}")
        self.matching, self.iterations, self.restarts = matching, iterations, restarts
        self.tv, self.signed = float(tv), signed
        steps = [int(iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)]
        schedule = keras.optimizers.schedules.PiecewiseConstantDecay(
            steps, [learning_rate * 0.1 ** k for k in range(4)])
        self.optimizer = keras.optimizers.Adam(schedule)
        self.image = tf.Variable(tf.zeros(matching.shape))
        self.label = tf.Variable(tf.zeros((1, matching.classes)), trainable=False)
        self.optimizer.build([self.image])
        self._step = tf.function(self._update)

    def _objective(self):
        grads = self.matching.gradients(self.image, self.label)
        return self.matching.cosine(grads) + self.tv * total_variation(self.image)

    def _update(self):
        with tf.GradientTape() as tape:
            loss = self._objective()
        grad = tape.gradient(loss, self.image)
        self.optimizer.apply_gradients([(tf.sign(grad) if self.signed else grad, self.image)])
        self.image.assign(tf.clip_by_value(self.image, 0.0, 1.0))
        return loss

    def _restart(self, seed: int) -> tuple[float, np.ndarray]:
        for variable in self.optimizer.variables:  # moments and step count: a fresh Adam
            variable.assign(tf.zeros_like(variable))
        self.image.assign(_start(self.matching.shape, seed))
        for _ in range(self.iterations):
            self._step()
        return float(self._objective()), self.image.numpy()[0]

    def run(self, label: int, seed: int = 0) -> Reconstruction:
        """Reconstruct the image of the loaded observation, its label given."""
        start = time.perf_counter()
        self.label.assign(tf.one_hot([int(label)], self.matching.classes))
        loss, image = min((self._restart(seed + k) for k in range(self.restarts)),
                          key=lambda found: found[0])
        return Reconstruction(image, int(label), loss, self.iterations * self.restarts,
                              time.perf_counter() - start)
