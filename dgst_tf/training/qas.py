"""Quantization-Aware Scaling (Lin et al. 2022) and the int8 weight update of the device.

Training the int8 values ``W_bar = W / s_w`` of `dgst_tf.training.int8_graph` directly
distorts the weight/gradient ratio by ``s_w^-2``; QAS rescales the gradients per output
channel: ``g(W_bar) * s_w^-2`` and ``g(b_bar) * (s_w * s_x)^-2``. It has no hyperparameter.
`QuantizationAwareScalingSGD` applies it and updates the int8 kernels as the exported graph's
``DGST_SGD_QAS_UPDATE`` does: stochastic rounding by default, with the same random numbers
(`stochastic_uniform_bits`, `layer_stream`, `tflite_weight_index`), or round to nearest::

    from dgst_tf.training.int8_graph import int8_training_graph
    from dgst_tf.training.qas import QuantizationAwareScalingSGD

    graph = int8_training_graph(fold_batchnorm(model), calibration_images)
    sparse = SparseUpdateModel(graph.model, scheme, fold_bn=False)
    sparse.compile(optimizer=QuantizationAwareScalingSGD(0.01, graph.qas_scales), loss=...)
"""
import dataclasses
import zlib

import numpy as np

from dgst_tf.core.keras_compat import keras, tf
from dgst_tf.training.int8_ops import ordered_div, ordered_mul, round_half_away

ROUNDINGS = ("stochastic", "nearest")  # as DGST_SGD_QAS_UPDATE
_MASK32 = 0xFFFFFFFF


def _mul32(x, c: int):
    """(x * c) mod 2^32 for int64 x in [0, 2^32): in 16-bit halves, so nothing overflows."""
    low = tf.bitwise.bitwise_and(x, 0xFFFF) * c
    high = tf.bitwise.left_shift(tf.bitwise.bitwise_and(
        tf.bitwise.right_shift(x, 16) * c, 0xFFFF), 16)
    return tf.bitwise.bitwise_and(low + high, _MASK32)


def _mix32(x):
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 16))
    x = _mul32(x, 0x7FEB352D)
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 15))
    x = _mul32(x, 0x846CA68B)
    return tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 16))


def stochastic_uniform_bits(seed, stream, step, index):
    """int64 hash bits h in [0, 2^32) of the stochastic-rounding PRNG, the TF twin of the C
    ``dgst_mix32`` chain (uint32 arithmetic emulated in int64):
    h = mix32(mix32(mix32(seed ^ stream * 0x9E3779B9) ^ step) ^ index).

        u = tf.cast(stochastic_uniform_bits(0, 7, step, tf.range(10, dtype=tf.int64)) // 256,
                    tf.float32) * 2.0**-24
    """
    def u32(v):
        return tf.bitwise.bitwise_and(tf.cast(v, tf.int64), _MASK32)

    key = _mix32(tf.bitwise.bitwise_xor(u32(seed), _mul32(u32(stream), 0x9E3779B9)))
    key = _mix32(tf.bitwise.bitwise_xor(key, u32(step)))
    return _mix32(tf.bitwise.bitwise_xor(key, u32(index)))


def layer_stream(name: str) -> int:
    """The PRNG stream of a layer: CRC-32 of its name, known to Keras and to the exporter.

        layer_stream("project")  # the same in QuantizationAwareScalingSGD and export_training
    """
    return zlib.crc32(name.encode("utf-8")) & _MASK32


def tflite_weight_index(shape, depthwise: bool) -> np.ndarray:
    """int64 array of a Keras kernel's shape: each element's index in the TFLite layout
    (conv HWIO -> OHWI, depthwise HWC1 -> 1HWC, Dense IO -> OI)."""
    shape = tuple(int(d) for d in shape)
    if depthwise:  # [kh, kw, C, 1]: the TFLite order already
        return np.arange(np.prod(shape), dtype=np.int64).reshape(shape)
    if len(shape) == 2:  # Dense [in, out] <- [out, in]
        return np.arange(np.prod(shape), dtype=np.int64).reshape(shape[::-1]).T
    kh, kw, c_in, c_out = shape
    ohwi = np.arange(np.prod(shape), dtype=np.int64).reshape(c_out, kh, kw, c_in)
    return ohwi.transpose(1, 2, 3, 0)


class QuantizationAwareScalingSGD(keras.optimizers.SGD):
    """SGD that multiplies each registered variable's gradient by ``scale^-2`` (QAS).

    ``qas_scales``: ``Int8TrainingGraph.qas_scales``; other variables get plain SGD.
    ``rounding``: how the int8-valued kernels (registered variables of rank >= 2) are
    updated; ``"stochastic"`` (the default, as in the exported graph) keeps them integer:
    ``w = clip(w + floor(u - lr * g * s^-2), -127, 127)`` with ``u`` in [0, 1) from the
    counter-based hash `stochastic_uniform_bits` of (``seed``, `layer_stream` of the layer,
    the step ``iterations``, the element's TFLite index `tflite_weight_index`), the numbers
    the exported graph's ``DGST_SGD_QAS_UPDATE`` draws. Unbiased (E[update] = the float
    step), so steps below one LSB accumulate in expectation instead of being lost: Lin et al.
    2022 report that int8 SGD loses accuracy, stochastic rounding is the standard fix for
    low-precision training (Gupta et al. 2015, "Deep Learning with Limited Numerical
    Precision"). ``"nearest"``: ``w = clip(w - round(lr * g * s^-2), -127, 127)``, round half
    away from zero, the device's rule without stochastic rounding (steps below half an LSB
    are lost: the ablation). The int32 biases (registered variables of rank 1) round to
    nearest in both, as the device's update does: ``b = b - round(lr * g * s^-2)``, half
    away from zero (their LSB is ``s_x`` times smaller than the weights', so the rounding
    loses nothing measurable, and the simulated biases stay the device's integers).
    Plain SGD only (no momentum), as on the device. ``qas=False`` keeps the int8 kernels
    and their rounding but leaves the gradients unscaled: the "int8 SGD without QAS" ablation
    of Lin et al. 2022. With ``qas_scales`` of an `Int8Scales` (what `int8_training_graph`
    gives) and batches of one example, the QAS step is the device's in its float32
    operations: the int32 gradient ``round(g / (dy_scale * s_w * s_x))`` (exact: ``g`` is
    that integer times that scale up to float32 rounding), then ``((lr * s_x) * dy_scale) /
    s_w * grad`` for weights and ``((lr * dy_scale) * grad) / (s_w * s_x)`` for biases, with
    the error signal's scale ``dy_scale`` the layer kept (`ExactStep`). Example::

        opt = QuantizationAwareScalingSGD(1e-3, graph.qas_scales, rounding="stochastic",
                                          seed=0)
    """

    def __init__(self, learning_rate=0.01, qas_scales=None, rounding: str = "stochastic",
                 seed: int = 0, qas: bool = True, **kwargs):
        super().__init__(learning_rate=learning_rate, **kwargs)
        if rounding not in ROUNDINGS:
            raise ValueError(f"QuantizationAwareScalingSGD: rounding must be one of "
                             f"{ROUNDINGS}, got {rounding!r}")
        if float(self.momentum) or self.nesterov:
            raise ValueError("QuantizationAwareScalingSGD: the int8 weight update is plain "
                             "SGD, as on the device (momentum=0)")
        self._exact = dict(getattr(qas_scales, "exact_steps", None) or {})
        self.qas_scales = dict(qas_scales or {})
        self.rounding, self.seed, self.qas = rounding, int(seed), bool(qas)
        self._int8_kernels = {}  # var.ref() -> (stream, TFLite index constant)

    def _int8_kernel(self, variable):
        """(stream, index) of an int8-valued kernel, None for other variables."""
        ref = variable.ref()
        if ref not in self._int8_kernels:
            path = variable.name.split(":")[0].split("/")
            if ref not in self.qas_scales or len(variable.shape) < 2 or len(path) < 2:
                self._int8_kernels[ref] = None
            else:
                index = tflite_weight_index(variable.shape, path[-1] == "depthwise_kernel")
                self._int8_kernels[ref] = (layer_stream(path[-2]), index)  # NumPy: any graph
        return self._int8_kernels[ref]

    def _int8(self, variable) -> bool:
        """An int8 kernel or int32 bias, which `update_step` scales and rounds itself."""
        return self._int8_kernel(variable) is not None or (
            variable.ref() in self.qas_scales and len(variable.shape) == 1)

    def update_step(self, gradient, variable):
        kernel = self._int8_kernel(variable)
        if not self._int8(variable) or isinstance(gradient, tf.IndexedSlices):
            return super().update_step(gradient, variable)
        step = self._step(tf.cast(gradient, tf.float32), variable, kernel is not None)
        if kernel is None:  # an int32 bias: DGST_SGD_QAS_UPDATE rounds to nearest
            step = round_half_away(tf.clip_by_value(step, -2.0 ** 32, 2.0 ** 32))
            variable.assign(tf.cast(tf.clip_by_value(variable - step, -2.0 ** 31, 2.0 ** 31 - 1),
                                    variable.dtype))
            return
        step = tf.clip_by_value(step, -1024.0, 1024.0)
        if self.rounding == "nearest":  # C roundf (half away from zero), exact in float32
            change = -round_half_away(step)
        else:
            stream, index = kernel
            bits = stochastic_uniform_bits(self.seed, stream, self.iterations,
                                           tf.constant(index))
            u = tf.cast(tf.bitwise.right_shift(bits, 8), tf.float32) * (2.0 ** -24)
            change = tf.floor(u - step)
        new = tf.clip_by_value(variable + change, -127.0, 127.0)
        variable.assign(tf.cast(new, variable.dtype))

    def _step(self, gradient, variable, weights: bool):
        """lr times the QAS-scaled gradient; the device's float32 step where it is known."""
        learning_rate = tf.cast(self.learning_rate, tf.float32)
        scale = self.qas_scales.get(variable.ref()) if self.qas else None
        exact = self._exact.get(variable.ref()) if self.qas else None
        step = learning_rate * (gradient if scale is None else gradient / tf.square(scale))
        if exact is None:
            return step
        error_scale = exact.error_scale.read_value()
        accumulator_scales = tf.constant(exact.accumulator_scales)
        grad = tf.round(gradient / (error_scale * accumulator_scales))  # the int32 gradient
        if weights:  # the device's float32 operations, in its order
            factor = ordered_mul(ordered_mul(learning_rate, np.float32(exact.input_scale)),
                                 error_scale)
            device = ordered_mul(ordered_div(factor, exact.weight_scales), grad)
        else:
            device = ordered_div(ordered_mul(ordered_mul(learning_rate, error_scale), grad),
                                 accumulator_scales)
        return tf.where(tf.math.is_finite(error_scale), device, step)

    def apply_gradients(self, grads_and_vars, *args, **kwargs):
        scaled = []
        for grad, var in grads_and_vars:
            scale = self.qas_scales.get(var.ref()) if self.qas else None
            if grad is not None and scale is not None and (
                    not self._int8(var) or isinstance(grad, tf.IndexedSlices)):
                grad = grad / tf.square(scale)
            scaled.append((grad, var))
        return super().apply_gradients(scaled, *args, **kwargs)


@dataclasses.dataclass(frozen=True)
class ExactStep:
    """What the device's update step of one int8 kernel or int32 bias needs besides its
    gradient: the error signal's scale of the layer's last backward pass (a variable, NaN
    unless the batch had one example), ``s_x``, and ``s_w`` and ``s_w * s_x`` shaped to
    broadcast against the variable."""

    error_scale: object
    input_scale: float
    weight_scales: np.ndarray
    accumulator_scales: np.ndarray


class Int8Scales(dict):
    """``{variable.ref(): QAS scale}`` plus ``exact_steps`` ``{variable.ref(): ExactStep}``:
    `Int8TrainingGraph.qas_scales`, which `QuantizationAwareScalingSGD` takes."""

    def __init__(self, scales=(), exact_steps=None):
        super().__init__(scales)
        self.exact_steps = dict(exact_steps or {})
