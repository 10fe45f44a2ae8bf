"""The int8 training graph: a simulated real-quantized model that `model.fit` trains.

`int8_training_graph` turns a BN-folded float model into the graph the MCU trains:
per-output-channel int8 weights held as the trainable values ``W_bar = W / s_w``, int32
biases ``b_bar = b / (s_w * s_x)``, per-tensor int8 activations (scale and zero point from
calibration). It is built from ordinary Keras layers (the convs keep their names), so
`SparseUpdateModel` and the update schemes apply to it unchanged::

    from dgst_tf.training.int8_graph import int8_training_graph
    from dgst_tf.training.qas import QuantizationAwareScalingSGD

    graph = int8_training_graph(fold_batchnorm(model), calibration_images)
    sparse = SparseUpdateModel(graph.model, scheme, fold_bn=False)
    sparse.compile(optimizer=QuantizationAwareScalingSGD(0.01, graph.qas_scales), loss=...)

``Int8TrainingGraph.qas_scales`` are the per-channel scales Quantization-Aware Scaling
(`dgst_tf.training.qas`) divides the gradients by.
"""
import dataclasses

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


