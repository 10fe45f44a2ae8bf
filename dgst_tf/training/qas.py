"""Training the int8 graph: a simulated real-quantized model and Quantization-Aware Scaling.

`int8_training_graph` turns a BN-folded float model into the graph the MCU trains:
per-output-channel int8 weights held as the trainable values ``W_bar = W / s_w``, int32
biases ``b_bar = b / (s_w * s_x)``, per-tensor int8 activations (scale and zero point from
calibration). It is built from ordinary Keras layers (the convs keep their names), so
`SparseUpdateModel` and the update schemes apply to it unchanged::

    from dgst_tf.training.qas import QuantizationAwareScalingSGD, int8_training_graph

    graph = int8_training_graph(fold_batchnorm(model), calibration_images)
    sparse = SparseUpdateModel(graph.model, scheme, fold_bn=False)
    sparse.compile(optimizer=QuantizationAwareScalingSGD(0.01, graph.qas_scales), loss=...)

Training ``W_bar`` directly distorts the weight/gradient ratio by ``s_w^-2``; QAS (Lin et
al. 2022) rescales the gradients per output channel: ``g(W_bar) * s_w^-2`` and
``g(b_bar) * (s_w * s_x)^-2``. It has no hyperparameter. The int8 kernels are updated with
stochastic rounding by default (``rounding="stochastic"``, the rule and the random numbers of
the exported graph's ``DGST_SGD_QAS_UPDATE``; see `QuantizationAwareScalingSGD`).
"""
import dataclasses
import zlib

import numpy as np

from dgst_tf.core.graph import UnsupportedModelError, check_functional, rebuild
from dgst_tf.core.keras_compat import keras, tf
from dgst_tf.core.layer_kinds import (WEIGHT_TYPES, is_depthwise, is_unsupported_conv, kernel_of,
                                      kind_of)

QUANTIZED_TYPES = WEIGHT_TYPES  # the layer kinds quantized (`dgst_tf.core.layer_kinds`)


def _quantized(layer) -> bool:
    """Conv2D, DepthwiseConv2D and Dense layers get int8 weights and inputs."""
    return kind_of(layer) is not None


class ActivationQuantizer(keras.layers.Layer):
    """Real activation -> its int8 code minus the zero point, as an integer-valued float.

    ``q = clip(round(x / scale) + zero_point, -128, 127) - zero_point``; real 0 maps to 0, so
    zero padding after it is exact. Straight-through gradient (of ``x / scale``).
    """

    def __init__(self, scale: float, zero_point: int, **kwargs):
        super().__init__(**kwargs)
        self.scale, self.zero_point = float(scale), int(zero_point)

    def call(self, x):
        y = x / self.scale
        q = tf.clip_by_value(tf.round(y) + self.zero_point, -128.0, 127.0) - self.zero_point
        return y + tf.stop_gradient(q - y)

    def get_config(self):
        return {**super().get_config(), "scale": self.scale, "zero_point": self.zero_point}


class ChannelRescale(keras.layers.Layer):
    """int32 accumulator -> real value: multiply output channel c by ``s_w[c] * s_x``."""

    def __init__(self, scales, **kwargs):
        super().__init__(**kwargs)
        self.scales = np.asarray(scales, np.float32)

    def call(self, accumulator):
        return accumulator * self.scales

    def get_config(self):
        return {**super().get_config(), "scales": self.scales.tolist()}


def activation_qparams(low: float, high: float) -> tuple[float, int]:
    """Asymmetric int8 (scale, zero point) for a range, which always includes 0."""
    low, high = min(float(low), 0.0), max(float(high), 0.0)
    scale = max(high - low, 1e-8) / 255.0
    zero_point = int(np.clip(-128 - round(low / scale), -128, 127))
    return scale, zero_point


def weight_scales(layer) -> np.ndarray:
    """Per output channel ``s_w = max|W_oc| / 127`` (depthwise: per channel x multiplier)."""
    kernel = kernel_of(layer).numpy()
    flat = kernel.reshape(-1, kernel.shape[-2] * kernel.shape[-1]) if is_depthwise(
        layer) else kernel.reshape(-1, kernel.shape[-1])
    return np.maximum(np.abs(flat).max(axis=0), 1e-8) / 127.0


def calibrate(model: keras.Model, images, batches: int | None = None) -> dict:
    """{layer name: (min, max)} of the input of every conv/dense layer over ``images``.

    ``images``: an array, or a dataset yielding images or (images, labels).
    """
    layers = [l for l in model.layers if _quantized(l)]
    probe = keras.Model(model.inputs, [l.input for l in layers])
    if isinstance(images, tf.data.Dataset):
        images = images.take(batches) if batches else images
    else:
        images = [images]
    lows = {l.name: np.inf for l in layers}
    highs = {l.name: -np.inf for l in layers}
    for item in images:
        x = item[0] if isinstance(item, tuple) else item
        outputs = probe(x, training=False)
        outputs = outputs if isinstance(outputs, list) else [outputs]
        for layer, value in zip(layers, outputs):
            lows[layer.name] = min(lows[layer.name], float(tf.reduce_min(value)))
            highs[layer.name] = max(highs[layer.name], float(tf.reduce_max(value)))
    return {name: (lows[name], highs[name]) for name in lows}


@dataclasses.dataclass
class Int8TrainingGraph:
    """The simulated int8 model and what the QAS optimizer and the exporter need."""

    model: keras.Model
    qas_scales: dict  # variable.ref() -> gradient scale s (QAS multiplies by s^-2)
    input_qparams: dict  # conv/dense layer name -> (s_x, zero point)
    weight_scales: dict  # conv/dense layer name -> s_w per output channel


def int8_training_graph(model: keras.Model, calibration_images,
                        batches: int | None = None) -> Int8TrainingGraph:
    """The int8 training graph of a BN-folded float ``model`` (see the module doc)."""
    check_functional(model, "int8_training_graph")
    bn = [l.name for l in model.layers if isinstance(l, keras.layers.BatchNormalization)]
    if bn:
        raise ValueError(f"int8_training_graph: fold BatchNorm first (dgst_tf.fold_batchnorm); "
                         f"found {bn[:3]}")
    unsupported = [l for l in model.layers if is_unsupported_conv(l)]
    if unsupported:
        raise UnsupportedModelError(
            f"int8_training_graph: layer {unsupported[0].name!r} "
            f"({type(unsupported[0]).__name__}) is not supported; supported: Conv2D, "
            "DepthwiseConv2D, Dense")
    ranges = calibrate(model, calibration_images, batches)
    input_qparams, scales_w, new_layers = {}, {}, {}

    def call_layer(layer, args, kwargs):
        if not _quantized(layer):
            clone = type(layer).from_config(layer.get_config())
            out = clone(*args, **kwargs)
            clone.set_weights(layer.get_weights())
            return out
        s_x, zero_point = activation_qparams(*ranges[layer.name])
        s_w = weight_scales(layer)
        kernel = kernel_of(layer).numpy()
        bias = layer.bias.numpy() if layer.use_bias else np.zeros(s_w.shape, np.float32)
        w_shape = (kernel.shape[-2], kernel.shape[-1]) if is_depthwise(
            layer) else kernel.shape[-1]
        w_bar = np.clip(np.round(kernel / s_w.reshape(w_shape)), -127, 127)
        b_bar = np.round(bias / (s_w * s_x))
        x = ActivationQuantizer(s_x, zero_point, name=f"{layer.name}_input_quant")(*args)
        config = dict(layer.get_config(), use_bias=True, activation="linear")
        new = type(layer).from_config(config)
        accumulator = new(x)
        new.set_weights([w_bar.astype(np.float32), b_bar.astype(np.float32)])
        y = ChannelRescale(s_w * s_x, name=f"{layer.name}_rescale")(accumulator)
        input_qparams[layer.name], scales_w[layer.name] = (s_x, zero_point), s_w
        new_layers[layer.name] = (new, s_w, s_x, w_shape)
        return layer.activation(y) if layer.activation is not keras.activations.linear else y

    graph = rebuild(model, call_layer, name=f"{model.name}_int8")
    qas = {}
    for new, s_w, s_x, w_shape in new_layers.values():
        qas[kernel_of(new).ref()] = tf.constant(np.reshape(s_w, w_shape), tf.float32)
        qas[new.bias.ref()] = tf.constant(s_w * s_x, tf.float32)
    return Int8TrainingGraph(graph, qas, input_qparams, scales_w)


ROUNDINGS = ("stochastic", "nearest")
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
    Precision"). ``"nearest"``: float SGD (the kernels drift off the integers; the previous
    behaviour). Biases stay float in both (the device rounds them to nearest: their LSB is
    ``s_x`` times smaller than the weights', so rounding loses nothing measurable).
    Stochastic rounding needs plain SGD (no momentum). ``qas=False`` keeps the int8 kernels
    and their rounding but leaves the gradients unscaled: the "int8 SGD without QAS" ablation
    of Lin et al. 2022. Example::

        opt = QuantizationAwareScalingSGD(1e-3, graph.qas_scales, rounding="stochastic",
                                          seed=0)
    """

    def __init__(self, learning_rate=0.01, qas_scales=None, rounding: str = "stochastic",
                 seed: int = 0, qas: bool = True, **kwargs):
        super().__init__(learning_rate=learning_rate, **kwargs)
        if rounding not in ROUNDINGS:
            raise ValueError(f"QuantizationAwareScalingSGD: rounding must be one of "
                             f"{ROUNDINGS}, got {rounding!r}")
        if rounding == "stochastic" and (float(self.momentum) or self.nesterov):
            raise ValueError("QuantizationAwareScalingSGD: rounding='stochastic' needs plain "
                             "SGD (momentum=0)")
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

    def update_step(self, gradient, variable):
        kernel = self._int8_kernel(variable) if self.rounding == "stochastic" else None
        if kernel is None or isinstance(gradient, tf.IndexedSlices):
            return super().update_step(gradient, variable)
        stream, index = kernel
        step = tf.cast(self.learning_rate, tf.float32) * tf.cast(gradient, tf.float32)
        step = tf.clip_by_value(step, -1024.0, 1024.0)
        bits = stochastic_uniform_bits(self.seed, stream, self.iterations, tf.constant(index))
        u = tf.cast(tf.bitwise.right_shift(bits, 8), tf.float32) * (2.0 ** -24)
        new = tf.clip_by_value(variable + tf.floor(u - step), -127.0, 127.0)
        variable.assign(tf.cast(new, variable.dtype))

    def apply_gradients(self, grads_and_vars, *args, **kwargs):
        scaled = []
        for grad, var in grads_and_vars:
            scale = self.qas_scales.get(var.ref()) if self.qas else None
            if grad is not None and scale is not None:
                grad = grad / tf.square(scale)
            scaled.append((grad, var))
        return super().apply_gradients(scaled, *args, **kwargs)
