"""The attacker's objective: how far a candidate image's gradient is from the observed one.

    from dgst_tf.federated.leakage.matching import GradientMatching
    matching = GradientMatching(model, seen, mean=TORCH_MEAN, std=TORCH_STD)
    grads = matching.gradients(image, tf.one_hot([label], classes))  # image in [0, 1]
    matching.l2(grads), matching.cosine(grads), total_variation(image)
    matching.load(next_seen)     # the next observation of the same scenario, no retracing

``model`` is the architecture the devices train (the attacker knows it: the server sent
it), here the BN-folded Keras model whose trainable weights are the federation's weight
list; `load` assigns it the observation's global weights. Candidate images live in pixel
space [0, 1]; the model sees ``(image - mean) / std`` (the data pipeline's normalisation).
Only the observed values count: the arrays the update contains, and in them the sent
channels (`what_is_sent.Observation.sent`); targets, masks and weights are TF variables,
so one traced attack step serves every observation whose update sends the same arrays.
The gradient is that of the device's loss, the cross-entropy of the logits, at batch 1.
"""
from __future__ import annotations

import numpy as np

from dgst_tf.core.keras_compat import keras, tf


def total_variation(image):
    """Mean absolute difference of neighbouring pixels, summed over both axes (the
    anisotropic TV of Geiping et al. 2020); ``image`` is (1, H, W, C)."""
    dx = tf.reduce_mean(tf.abs(image[:, :, 1:, :] - image[:, :, :-1, :]))
    dy = tf.reduce_mean(tf.abs(image[:, 1:, :, :] - image[:, :-1, :, :]))
    return dx + dy


class GradientMatching:
    """Gradients of candidate images, compared with an observation's (module doc)."""

    def __init__(self, model: keras.Model, observation, mean=0.0, std=1.0):
        self.model = model
        self.shape = (1,) + tuple(model.input_shape[1:])
        self.classes = int(model.output_shape[-1])
        self.mean = tf.constant(np.broadcast_to(mean, self.shape[-1:]), tf.float32)
        self.std = tf.constant(np.broadcast_to(std, self.shape[-1:]), tf.float32)
        self.arrays = [i for i, m in enumerate(observation.sent) if np.any(m)]
        if not self.arrays:
            raise ValueError(f"observation {observation.scenario!r} sends nothing to match")
        variables = model.trainable_weights
        self.variables = [variables[i] for i in self.arrays]
        self.targets = [tf.Variable(tf.zeros(v.shape), trainable=False)
                        for v in self.variables]
        self.masks = [tf.Variable(tf.zeros(v.shape), trainable=False)
                      for v in self.variables]
        self.target_norm = tf.Variable(0.0, trainable=False)
        self.load(observation)

    def load(self, observation) -> None:
        """Make ``observation`` the one to match (same scenario: the same arrays sent)."""
        arrays = [i for i, m in enumerate(observation.sent) if np.any(m)]
        if arrays != self.arrays:
            raise ValueError(f"observation {observation.scenario!r} sends arrays {arrays}, "
                             f"this matching was built for {self.arrays}: build a new one")
        variables = self.model.trainable_weights
        if len(variables) != len(observation.weights):
            raise ValueError(f"model {self.model.name!r} has {len(variables)} trainable "
                             f"arrays, the observation {len(observation.weights)}")
        for variable, value in zip(variables, observation.weights):
            if tuple(variable.shape) != np.shape(value):
                raise ValueError(f"weight {variable.name}: shape {tuple(variable.shape)}, "
                                 f"observation {np.shape(value)}")
            variable.assign(value)
        norm = 0.0
        for target, mask, i in zip(self.targets, self.masks, self.arrays):
            sent = np.asarray(observation.sent[i], np.float32)
            value = np.asarray(observation.gradients[i], np.float32) * sent
            target.assign(value)
            mask.assign(sent)
            norm += float(np.sum(value.astype(np.float64) ** 2))
        self.target_norm.assign(np.sqrt(norm))

    def logits(self, image):
        return self.model((image - self.mean) / self.std, training=False)

    def gradients(self, image, label_probabilities) -> list:
        """The sent part of the loss gradient of ``image`` (1, H, W, C) in [0, 1] with
        soft or one-hot ``label_probabilities`` (1, classes)."""
        with tf.GradientTape() as tape:
            # written out: TF's fused softmax cross-entropy has no second derivative with
            # respect to the labels, which DLG's optimised soft label needs
            log_p = tf.nn.log_softmax(self.logits(image))
            loss = -tf.reduce_mean(tf.reduce_sum(label_probabilities * log_p, axis=-1))
        grads = tape.gradient(loss, self.variables)
        return [g * m for g, m in zip(grads, self.masks)]

    def l2(self, grads):
        """Squared Euclidean distance to the observed gradient (Zhu et al. 2019)."""
        return tf.add_n([tf.reduce_sum(tf.square(g - t)) for g, t in zip(grads, self.targets)])

    def cosine(self, grads):
        """1 - cosine similarity with the observed gradient, all sent values as one vector
        (Geiping et al. 2020)."""
        dot = tf.add_n([tf.reduce_sum(g * t) for g, t in zip(grads, self.targets)])
        norm = tf.sqrt(tf.add_n([tf.reduce_sum(tf.square(g)) for g in grads]))
        return 1.0 - dot / (norm * self.target_norm + 1e-12)
