"""One simulated microcontroller: the project's batch-1 sparse training step on its own data,
inside its SRAM budget.

    from dgst_tf.federated.device import SimulatedDevice
    device = SimulatedDevice(config)            # MemoryBudgetError if the step does not fit
    after, loss = device.train(global_weights, images, labels, seed=3)
    accuracy = device.accuracy(global_weights, test_images, test_labels)

The model is built as `config` says (MobileNetV2 from `dgst_tf.models`, or a saved tf-keras
file), BatchNorm folded, and trained through `SparseUpdateModel` with the scheme and
selection callbacks of `dgst_tf.training.methods.build_method` (DGSU: new channels every
step; "sparse_update": Lin et al.'s static channels, chosen at the start of each round from
the round's global model, the same on every device), plain SGD at batch 1 without dropout,
as the exported training step runs. Before anything trains, the step's memory
(`dgst_tf.planning.budget.check_budget`, with whole kernels in SRAM when channels change every
step) must fit ``config.sram_budget``; otherwise `MemoryBudgetError` names the scheme, the
need and the budget.

With ``config.int8`` the device runs the exported graph's int8 step instead: the Keras int8
simulation (`dgst_tf.training.int8_graph.int8_training_graph`: int8 weights, int32 biases,
TFLM's integer arithmetic) trained by `QuantizationAwareScalingSGD` with stochastic rounding
and the device's loss. Its quantization parameters come from one calibration set every device
and the server share (``calibration``; fixed at deployment), so all devices exchange the same
integer codes: the weights they send and receive are int8 / int32 values (held as float32),
and `integer_ranges` tells the server which arrays to round back to integers after averaging.

The selection state (DGSU's visited channels and sweep, the step counter) belongs to the
device and persists across rounds: `selection_state` / `set_selection_state` move it in and
out, so one Keras model can serve many simulated devices in turn.
"""
from __future__ import annotations

import numpy as np

from dgst_tf import models
from dgst_tf.core import runtime
from dgst_tf.core.bn_folding import fold_batchnorm, foldable_pairs
from dgst_tf.core.keras_compat import keras
from dgst_tf.models.own_model import is_model_file, load_own_model
from dgst_tf.planning.budget import check_budget
from dgst_tf.training.int8_graph import int8_training_graph
from dgst_tf.training.methods import build_method
from dgst_tf.training.qas import QuantizationAwareScalingSGD
from dgst_tf.training.selection import DynamicChannelSelection
from dgst_tf.training.sparse_model import SparseUpdateModel


def build_model(config) -> keras.Model:
    """The federation's model: ``config.model`` is "mobilenet_v2" or a saved tf-keras file.

        model = build_model(FederatedConfig(width=0.35, image_size=32, classes=10))

    A file goes through the checks ``dgst --model`` applies (`load_own_model`: the file
    exists, was saved by tf-keras (Keras 2), has only supported layers, takes
    ``image_size`` x ``image_size`` x 3 images and, when ``config.classes`` is set, has that
    many outputs); `OwnModelError` names the file and what is wrong.
    """
    if is_model_file(config.model):
        return load_own_model(config.model, config.image_size, config.classes or None)
    if config.classes < 1:
        raise ValueError("config.classes must be set (>= 1) to build mobilenet_v2")
    return models.mobilenet_v2(config.width, (config.image_size,) * 2 + (3,),
                               classes=config.classes, weights=config.weights,
                               seed=config.seed)


class SimulatedDevice:
    """A microcontroller of the federation (see the module doc)."""

    def __init__(self, config, calibration=None):
        runtime.limit_threads(1)
        self.config = config
        model = build_model(config)
        if foldable_pairs(model):  # the device's graph has no BatchNorm
            model = fold_batchnorm(model, name=model.name)
        scheme, self.callbacks = build_method(config.method, model, config.target_fraction,
                                              blocks=config.blocks, seed=config.seed)
        self.dynamic = any(isinstance(c, DynamicChannelSelection) for c in self.callbacks)
        self.memory = None
        if config.sram_budget:
            self.memory = check_budget(model, scheme, tuple(model.input_shape[1:]),
                                       config.sram_budget, full_weights_in_sram=self.dynamic)
        self.graph = None
        if config.int8:
            if calibration is None:
                raise ValueError("an int8 device needs the shared calibration images")
            self.graph = int8_training_graph(model, calibration)
            model = self.graph.model
        self.sparse = SparseUpdateModel(model, scheme, fold_bn=False, dropout=False)
        self.sparse.compile(optimizer=self._optimizer(),
                            loss=self.graph.loss if self.graph else
                            keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        self._fresh_selection = self.selection_state()

    def _optimizer(self):
        if self.graph is None:
            return keras.optimizers.SGD(self.config.learning_rate)
        return QuantizationAwareScalingSGD(self.config.learning_rate, self.graph.qas_scales,
                                           rounding="stochastic", seed=self.config.seed)

    def integer_ranges(self) -> dict:
        """{weight index: (low, high)} of the int8 kernels and int32 biases the int8 step
        trains (empty for a float device): the server rounds and clips them."""
        if self.graph is None:
            return {}
        trained = {ref for ref in self.graph.qas_scales}
        ranges = {}
        for index, variable in enumerate(self.sparse.base.trainable_weights):
            if variable.ref() in trained:
                ranges[index] = (-127, 127) if len(variable.shape) > 1 else (-2**31, 2**31 - 1)
        return ranges

    # -- state moved in and out between devices ---------------------------------------------
    def weights(self) -> list[np.ndarray]:
        """The (BatchNorm-folded) model's trainable arrays, the list the federation
        exchanges (the int8 graph's per-step scratch, such as error scales, stays local)."""
        return [np.asarray(v.numpy(), np.float32) for v in self.sparse.base.trainable_weights]

    def set_weights(self, weights) -> None:
        variables = self.sparse.base.trainable_weights
        if len(weights) != len(variables):
            raise ValueError(f"{len(weights)} weight arrays for a model with "
                             f"{len(variables)} trainable ones")
        for variable, value in zip(variables, weights):
            variable.assign(value)

    def selection_state(self) -> list[np.ndarray]:
        return [np.asarray(w) for w in self.sparse.selection.get_weights()]

    def set_selection_state(self, state=None) -> None:
        """Restore a device's selection state (None: a device that never trained)."""
        self.sparse.selection.set_weights(list(self._fresh_selection if state is None
                                               else state))

    # -- what the device does -------------------------------------------------------------
    def train(self, weights, images, labels, seed: int = 0) -> tuple[list, float]:
        """(weights after ``config.local_epochs`` epochs at batch 1, mean loss) from
        ``weights``; the images are visited in a seeded random order."""
        self.set_weights(weights)
        rng = np.random.default_rng(seed)
        order = np.concatenate([rng.permutation(len(labels))
                                for _ in range(self.config.local_epochs)])
        history = self.sparse.fit(np.asarray(images)[order], np.asarray(labels)[order],
                                  batch_size=1, epochs=1, shuffle=False, verbose=0,
                                  callbacks=self.callbacks)
        return self.weights(), float(history.history["loss"][-1])

    def accuracy(self, weights, images, labels, batch_size: int = 64) -> float:
        """Top-1 accuracy of the model with ``weights`` (the server's evaluation)."""
        self.set_weights(weights)
        logits = self.sparse.base.predict(np.asarray(images), batch_size=batch_size,
                                          verbose=0)
        return float(np.mean(np.argmax(logits, -1) == np.asarray(labels).ravel()))
