"""TensorFlow Lite Micro's int8 kernels and the exported training step's backward pass, as
Keras layers and a loss: the pieces of the Keras int8 simulation (`dgst_tf.training.int8_graph`).

Between layers flow **centered int8 codes** ``c = q - zero_point`` (integers held in float32,
real value ``s * c``): TFLite's kernels compute with ``q + input_offset`` = ``c``, and zero
padding of ``c`` is padding with real 0, as TFLite's PAD does. The gradients flowing between
these layers are, as on the device, those of the **real** activations (``dL/d(s c)``).

Forward, bit for bit as TFLM's reference kernels (double-rounding requantization, the
default build): `Requantize` (conv / depthwise / fully-connected output: fixed-point
``MultiplyByQuantizedMultiplier`` per channel in int64, zero point, fused-activation clamp),
`Int8Add` (int8 ADD, left shift 20), `Int8Mean` (int8 MEAN over height and width),
`InputQuantizer` (the image's int8 codes as `train_tflm` makes them) and `Dequantize` (the
logits the loss reads).

Backward, as the exported graph computes it, in the same float32 operations and order:
`DeviceSoftmaxCrossEntropy` (``DGST_SOFTMAX_XENT_GRAD``); `Requantize` turns the gradient of
its layer's real output into the device's int8 error signal -- the 1-bit ReLU mask from the
int8 output (``lo < q < hi``, only with a fused activation), then per example ``scale =
max|g| / 127`` (1 if all zero) and ``dy = round(g / scale)`` half away from zero
(``DGST_QUANTIZE_GRAD``) -- computes the layer's input gradient from it as
``DGST_CONV2D_INPUT_GRAD`` / ``DGST_DEPTHWISE_INPUT_GRAD`` do (`device_input_gradient`), and
passes ``dy * scale * s_w * s_x`` to the layer's int32 accumulator, the true gradient the
layer's weight and bias gradients are taken from; it also keeps ``scale`` (`error_scale`)
for `dgst_tf.training.qas`, which then reproduces the device's update step exactly.
`Int8Add` and `Int8Mean` pass the real gradient through (ADD: to both inputs; MEAN:
``g * (1 / pixels)`` to every pixel). Exact except where a C library function is involved:
the softmax's ``expf`` is computed correctly rounded (float64 ``exp`` rounded to float32),
which glibc's ``expf`` also returns for all but ~0.07% of arguments.

    y = Requantize(multipliers, shifts, ..., layer=conv, name="conv_rescale")([acc, x])
"""
from __future__ import annotations

import numpy as np

from dgst_tf.core.keras_compat import keras, tf
from dgst_tf.core.layer_kinds import kernel_of, kind_of
from dgst_tf.core.tflite_requantization import ADD_LEFT_SHIFT

__all__ = ["multiply_by_quantized_multiplier", "ordered_mul", "ordered_div", "round_half_away",
           "quantize_error",
           "device_input_gradient", "device_softmax_cross_entropy", "InputQuantizer",
           "Requantize", "HoldGradient", "Int8Add", "Int8Multiply", "Int8Mean", "Dequantize",
           "DeviceSoftmaxCrossEntropy"]

_INT32_MIN, _TWO_32 = -2 ** 31, 2 ** 32


def multiply_by_quantized_multiplier(x, multiplier, shift):
    """TFLite's ``MultiplyByQuantizedMultiplier`` (int32 input, double rounding:
    ``SaturatingRoundingDoublingHighMul`` then ``RoundingDivideByPOT``) on int64 tensors;
    ``multiplier`` (in [0, 2**31)) and ``shift`` broadcast against ``x`` (per channel: the
    last axis). The TF twin of `dgst_tf.tflm_ops.reference.multiply_by_quantized_multiplier`.

        multiply_by_quantized_multiplier(tf.constant([100], tf.int64), [1 << 30], [-1])  # [25]
    """
    a = tf.convert_to_tensor(x, tf.int64)
    m = tf.constant(np.asarray(multiplier, np.int64))
    shift = np.asarray(shift, np.int64)
    if (shift > 0).any():
        a = tf.bitwise.left_shift(a, tf.constant(np.maximum(shift, 0)))
        a = tf.math.floormod(a - _INT32_MIN, _TWO_32) + _INT32_MIN  # C's int32 product wraps
    product = a * m  # |a|, m < 2**31: exact in int64; m >= 0 never saturates
    nudge = tf.where(product >= 0, tf.constant(1 << 30, tf.int64),
                     tf.constant(1 - (1 << 30), tf.int64))
    high = tf.truncatediv(product + nudge, tf.constant(1 << 31, tf.int64))  # C: toward 0
    right = np.maximum(-shift, 0)
    if not right.any():
        return high
    # RoundingDivideByPOT: divide by 2**right, rounding half away from zero
    half = tf.constant(np.left_shift(np.int64(1), right) >> 1)
    magnitude = tf.bitwise.right_shift(tf.abs(high) + half, tf.constant(right))
    return tf.where(high < 0, -magnitude, magnitude)


def ordered_mul(a, b):
    """``a * b`` in float32, as one product that TF's graph optimizer leaves alone: Grappler's
    arithmetic and constant-folding passes reassociate chains of ``Mul`` / ``Div`` (changing
    float32 results), not ``MulNoNan`` (equal to ``a * b`` unless ``b`` is 0, then +0)."""
    return tf.math.multiply_no_nan(a, tf.cast(b, tf.float32))


def ordered_div(a, b):
    """``a / b`` in float32 (``b`` != 0), one ``DivNoNan`` (see `ordered_mul`)."""
    return tf.math.divide_no_nan(tf.cast(a, tf.float32), tf.cast(b, tf.float32))


def round_half_away(x):
    """C ``roundf`` on a float tensor: half away from zero, exact (no ``x + 0.5``)."""
    whole = tf.where(x < 0, tf.math.ceil(x), tf.math.floor(x))
    fraction = x - whole
    return whole + tf.cast(fraction >= 0.5, x.dtype) - tf.cast(fraction <= -0.5, x.dtype)


def quantize_error(g):
    """``(dy, scale)`` of ``DGST_QUANTIZE_GRAD`` per example (axis 0): ``scale = max|g| /
    127`` (1 if all zero), ``dy = clamp(round(g / scale), -127, 127)`` half away from zero,
    float32 as on the device (``dy`` integer-valued; ``scale`` keeps the batch axis)."""
    axes = list(range(1, len(g.shape)))
    top = tf.reduce_max(tf.abs(g), axis=axes, keepdims=True)
    scale = tf.where(top > 0, ordered_div(top, np.float32(127.0)), tf.ones_like(top))
    return round_half_away(tf.clip_by_value(ordered_div(g, scale), -127.0, 127.0)), scale


def _codes(values, zero_point: int, low: int, high: int):
    """int64 requantized values -> centered float32 codes: + zero point, clamp, - zero point."""
    codes = tf.clip_by_value(values + zero_point, low, high) - zero_point
    return tf.cast(codes, tf.float32)


class InputQuantizer(keras.layers.Layer):
    """Float image -> centered int8 codes, as `train_tflm` quantizes images:
    ``clip(round(x / s) + z, -128, 127) - z`` (float32 division, round half to even). The
    device computes no image gradient; neither does this layer."""

    def __init__(self, scale: float, zero_point: int, **kwargs):
        super().__init__(trainable=False, **kwargs)
        self.scale, self.zero_point = float(scale), int(zero_point)

    def call(self, x):
        q = tf.round(ordered_div(x, np.float32(self.scale))) + self.zero_point
        return tf.stop_gradient(tf.clip_by_value(q, -128.0, 127.0) - self.zero_point)

    def get_config(self):
        return {**super().get_config(), "scale": self.scale, "zero_point": self.zero_point}


class _LayerRef:
    """A plain holder of a Keras layer: Keras does not track it as a sublayer."""

    def __init__(self, layer):
        self.layer = layer


def _one_hot_taps(kernel_hw, dilations, channels):
    """The taps (i, j) of a kernel in the device's order, each as a depthwise filter of
    ``channels`` channels that picks that tap alone (the dilation spread into the filter:
    TF's CPU backprop ignores dilations)."""
    (kh, kw), (dh, dw) = kernel_hw, dilations
    size = ((kh - 1) * dh + 1, (kw - 1) * dw + 1)
    for i in range(kh):
        for j in range(kw):
            pick = np.zeros((*size, 1, 1), np.float32)
            pick[i * dh, j * dw] = 1.0
            yield i, j, tf.tile(tf.constant(pick), tf.stack([1, 1, channels, 1]))


_UNROLL = 16  # products added per loop iteration of `_sum_in_order`


def _sum_in_order(total, weights, values):
    """``(((total + w[0] v[0]) + w[1] v[1]) + ...)`` in float32, over the first axis of
    ``weights`` and ``values`` (broadcast against each other and ``total``), in that order:
    the sums of a C loop. A loop of unrolled subtractions of the negated products: TF's
    cumulative sum is sequential but slow, and Grappler regroups chains of additions (not of
    subtractions; ``a - (-t)`` is ``a + t`` exactly)."""
    count = tf.shape(weights)[0]
    padded = count + tf.math.floormod(-count, _UNROLL)  # zero products change no sum

    def pad(t):
        return tf.pad(t, tf.concat([[[0, padded - count]], tf.zeros([len(t.shape) - 1, 2],
                                                                      tf.int32)], 0))

    weights, values = pad(weights), pad(values)

    def body(o, total):
        negated = -ordered_mul(weights[o:o + _UNROLL], values[o:o + _UNROLL])
        for k in range(_UNROLL):
            total = tf.math.subtract(total, negated[k])
        return o + _UNROLL, total

    unknown = tf.TensorShape([None] * len(total.shape))
    return tf.while_loop(lambda o, _: o < padded, body, (tf.constant(0), total),
                         shape_invariants=(tf.TensorShape([]), unknown))[1]


def _nonzero_channels(dy, *tensors):
    """``tensors`` (last axis: output channels) restricted to the channels where ``dy`` is
    nonzero somewhere: adding the zero products of the others changes no sum."""
    active = tf.where(tf.reduce_any(dy != 0, axis=list(range(len(dy.shape) - 1))))[:, 0]
    return [tf.gather(t, active, axis=-1) for t in tensors]


def device_input_gradient(layer, dy, scale, weight_scales, x_shape, kernel=None):
    """The real input gradient of a conv / depthwise / dense ``layer`` from its int8 error
    signal ``dy`` (integer-valued float32, per example ``scale`` broadcastable against it),
    bit for bit as the device computes it: conv and dense (``DGST_CONV2D_INPUT_GRAD``)
    ``dx = scale * sum (s_w[o] * w[i, j, c, o]) * dy`` in float32, taps (i, j) then output
    channels o in increasing order; depthwise (``DGST_DEPTHWISE_INPUT_GRAD``, multiplier 1)
    ``dx = scale * (s_w[c] * sum w * dy)`` with the sum exact. ``kernel``: the weights the
    forward pass used (default: the layer's current ones)."""
    kind = kind_of(layer)
    kernel = kernel_of(layer) if kernel is None else kernel
    if kind.depthwise:
        if kernel.shape[-1] != 1:
            raise ValueError(f"layer {layer.name!r}: the device's depthwise input gradient "
                             f"needs depth multiplier 1")
        with tf.GradientTape() as tape:  # integers: exact in any order
            x = tf.zeros(x_shape, tf.float32)
            tape.watch(x)
            y = tf.nn.depthwise_conv2d(x, kernel, [1, *layer.strides, 1],
                                       layer.padding.upper(), dilations=layer.dilation_rate)
        total = tape.gradient(y, x, output_gradients=dy)
        return ordered_mul(scale, ordered_mul(tf.constant(weight_scales), total))
    scaled = ordered_mul(kernel, tf.constant(weight_scales))  # s_w[o] * w, as on the device
    scaled, dy = _nonzero_channels(dy, scaled, dy)
    if not kind.spatial:  # dense [in, out]: one pixel
        total = _sum_in_order(tf.zeros(tf.stack([tf.shape(dy)[0], tf.shape(scaled)[0]])),
                              tf.transpose(scaled)[:, None, :], tf.transpose(dy)[:, :, None])
        return ordered_mul(scale, total)
    kernel_hw = (int(kernel.shape[0]), int(kernel.shape[1]))
    in_shape = tf.concat([x_shape[:3], tf.shape(scaled)[2:3]], 0)
    total = tf.zeros(tf.stack([tf.reduce_prod(x_shape[:3]), tf.shape(scaled)[2]]))
    for i, j, pick in _one_hot_taps(kernel_hw, layer.dilation_rate, tf.shape(dy)[-1]):
        if kernel_hw == (1, 1) and tuple(layer.strides) == (1, 1):
            spread = dy  # the one tap reads the pixel it writes
        else:  # dy of the output pixel that tap (i, j) reads each input pixel for, else 0
            spread = tf.raw_ops.DepthwiseConv2dNativeBackpropInput(
                input_sizes=tf.concat([x_shape[:3], tf.shape(dy)[-1:]], 0), filter=pick,
                out_backprop=dy, strides=[1, *layer.strides, 1],
                padding=layer.padding.upper())
        pixels = tf.reshape(tf.transpose(spread, [3, 0, 1, 2]), tf.stack([
            tf.shape(spread)[3], -1, 1]))  # [o, pixel, 1]
        total = _sum_in_order(total, tf.transpose(scaled[i, j])[:, None, :], pixels)
    return ordered_mul(scale, tf.reshape(total, in_shape))


class Requantize(keras.layers.Layer):
    """int32 accumulator of a conv / depthwise / dense layer (``sum (x_q - z_x) w_q + b_q``)
    -> its centered int8 output codes, TFLM's per-channel requantization; backward: the
    device's masked, int8-quantized error signal and input gradient (see the module doc).

    Called on ``[accumulator, x]`` (``x``: the layer's input codes, which then get the
    device's input gradient; the layer itself must read ``x`` through a stop-gradient) or
    on the accumulator alone. ``multipliers``, ``shifts``: per output channel
    (`conv_multipliers`); ``output_scale``, ``output_zero_point``; ``activation_range``: the
    fused activation's clamp (``lo``, ``hi``); ``masked``: the layer has a fused ReLU / ReLU6
    (the device builds a mask only then); ``input_scale`` ``s_x`` and ``weight_scales``
    ``s_w`` (the accumulator's real scale is ``s_w * s_x``; `dgst_tf.training.selection`
    reads ``weight_scales``); ``layer``: the conv / depthwise / dense layer, for the input
    gradient. ``error_scale`` (a variable) holds the error signal's scale of the last
    backward pass (NaN unless the batch had one example).
    """

    def __init__(self, multipliers, shifts, output_scale: float, output_zero_point: int,
                 activation_range, masked: bool, input_scale: float, weight_scales,
                 layer=None, **kwargs):
        super().__init__(trainable=False, **kwargs)
        self.multipliers = np.asarray(multipliers, np.int64)
        self.shifts = np.asarray(shifts, np.int64)
        self.output_scale, self.output_zero_point = float(output_scale), int(output_zero_point)
        self.activation_range = tuple(int(v) for v in activation_range)
        self.masked, self.input_scale = bool(masked), float(input_scale)
        self.weight_scales = np.asarray(weight_scales, np.float32)
        self.accumulator_scales = self.weight_scales * np.float32(self.input_scale)
        self._layer = _LayerRef(layer)

    def build(self, input_shape):
        self.error_scale = self.add_weight(
            "error_scale", shape=(), dtype=tf.float32, trainable=False,
            initializer=keras.initializers.Constant(float("nan")))
        super().build(input_shape)

    def call(self, inputs):
        acc, x = (inputs if isinstance(inputs, (list, tuple)) else (inputs, None))
        low, high = self.activation_range
        zero_point = self.output_zero_point
        layer = self._layer.layer
        if x is not None and layer is None:
            raise ValueError(f"{self.name}: the input gradient needs the layer (layer=...)")
        # the weights as the forward pass reads them: the input gradient must use them, not
        # the values this step's update writes (a data dependency orders the read first)
        extra = [] if x is None else [x, tf.identity(kernel_of(layer))]

        @tf.custom_gradient
        def requantize(acc, *x_and_kernel):
            values = multiply_by_quantized_multiplier(tf.cast(acc, tf.int64), self.multipliers,
                                                      self.shifts)
            codes = _codes(values, zero_point, low, high)

            def grad(g):
                if self.masked:
                    q = codes + zero_point
                    g = tf.where((q > low) & (q < high), g, tf.zeros_like(g))
                dy, scale = quantize_error(g)
                single = tf.reshape(scale[:1], [-1])
                self.error_scale.assign(tf.reshape(tf.where(
                    tf.shape(scale)[0] == 1, single, tf.fill([tf.size(single)], np.nan)), []))
                d_acc = dy * (scale * tf.constant(self.accumulator_scales))
                if not x_and_kernel:
                    return d_acc
                x, kernel = x_and_kernel
                return d_acc, device_input_gradient(layer, dy, scale, self.weight_scales,
                                                    tf.shape(x), kernel), None

            return codes, grad

        return requantize(acc, *extra)

    def get_config(self):
        return {**super().get_config(), "multipliers": self.multipliers.tolist(),
                "shifts": self.shifts.tolist(), "output_scale": self.output_scale,
                "output_zero_point": self.output_zero_point,
                "activation_range": list(self.activation_range), "masked": self.masked,
                "input_scale": self.input_scale, "weight_scales": self.weight_scales.tolist()}


class HoldGradient(keras.layers.Layer):
    """The identity whose gradient is zero: a conv / dense layer reads its input through it,
    so that only its `Requantize` gives the input gradient (the device's)."""

    def call(self, x):
        return tf.stop_gradient(x)


class Int8Add(keras.layers.Layer):
    """TFLM's int8 ADD of two centered code tensors (no fused activation): each input
    ``c_i * 2**20`` rescaled by its multiplier, summed, rescaled by the output's, plus the
    zero point, clamped to int8. ``multipliers``: `add_multipliers`. Backward: the real
    gradient goes to both inputs unchanged."""

    def __init__(self, multipliers: dict, output_zero_point: int, **kwargs):
        super().__init__(trainable=False, **kwargs)
        self.multipliers = {k: tuple(int(v) for v in pair) for k, pair in multipliers.items()}
        self.output_zero_point = int(output_zero_point)

    def call(self, inputs):
        def rescale(values, name):
            return multiply_by_quantized_multiplier(values, *self.multipliers[name])

        @tf.custom_gradient
        def add(c1, c2):
            def shifted(c):
                return tf.bitwise.left_shift(tf.cast(c, tf.int64),
                                             tf.constant(ADD_LEFT_SHIFT, tf.int64))
            total = rescale(shifted(c1), "input_1") + rescale(shifted(c2), "input_2")
            codes = _codes(rescale(total, "output"), self.output_zero_point, -128, 127)
            return codes, lambda g: (g, g)

        return add(*inputs)

    def get_config(self):
        return {**super().get_config(),
                "multipliers": {k: list(v) for k, v in self.multipliers.items()},
                "output_zero_point": self.output_zero_point}


class Int8Multiply(keras.layers.Layer):
    """TFLM's int8 MUL of two centered code tensors (broadcasting, no fused activation): the
    int32 product ``c_1 c_2`` rescaled by ``(multiplier, shift)`` (`quantize_multiplier` of
    ``s_1 s_2 / s_out``), plus the zero point, clamped to int8. Forward only (a squeeze-and-
    excitation gate in front of the trained layers): the device has no backward for MUL,
    and asking this layer for one raises."""

    def __init__(self, multiplier: int, shift: int, output_zero_point: int, **kwargs):
        super().__init__(trainable=False, **kwargs)
        self.multiplier, self.shift = int(multiplier), int(shift)
        self.output_zero_point = int(output_zero_point)

    def call(self, inputs):
        @tf.custom_gradient
        def multiply(c1, c2):
            product = tf.cast(c1, tf.int64) * tf.cast(c2, tf.int64)
            values = multiply_by_quantized_multiplier(product, self.multiplier, self.shift)

            def grad(g):
                raise ValueError(f"{self.name}: the int8 training step has no backward for "
                                 f"an elementwise MUL (squeeze-and-excitation gate): train "
                                 f"only layers after it")

            return _codes(values, self.output_zero_point, -128, 127), grad

        return multiply(*inputs)

    def get_config(self):
        return {**super().get_config(), "multiplier": self.multiplier, "shift": self.shift,
                "output_zero_point": self.output_zero_point}


class Int8Mean(keras.layers.Layer):
    """TFLM's int8 MEAN over height and width (global average pooling, ``[B, H, W, C]`` ->
    ``[B, C]`` or ``[B, 1, 1, C]`` with ``keepdims``): the int32 sum of the centered codes,
    requantized with `mean_multiplier`'s (multiplier, shift), plus the zero point, clamped.
    Backward: ``g * (1 / pixels)`` (float32, as the device) to every pixel."""

    def __init__(self, multiplier: int, shift: int, output_zero_point: int,
                 keepdims: bool = False, **kwargs):
        super().__init__(trainable=False, **kwargs)
        self.multiplier, self.shift = int(multiplier), int(shift)
        self.output_zero_point, self.keepdims = int(output_zero_point), bool(keepdims)

    def call(self, x):
        @tf.custom_gradient
        def mean(c):
            total = tf.reduce_sum(tf.cast(c, tf.int64), axis=[1, 2], keepdims=self.keepdims)
            values = multiply_by_quantized_multiplier(total, self.multiplier, self.shift)
            codes = _codes(values, self.output_zero_point, -128, 127)
            factor = np.float32(1.0 / (c.shape[1] * c.shape[2]))

            def grad(g):
                g = ordered_mul(g, factor)
                return tf.broadcast_to(g if self.keepdims else g[:, None, None, :],
                                       tf.shape(c))

            return codes, grad

        return mean(x)

    def get_config(self):
        return {**super().get_config(), "multiplier": self.multiplier, "shift": self.shift,
                "output_zero_point": self.output_zero_point, "keepdims": self.keepdims}


class Dequantize(keras.layers.Layer):
    """Centered int8 codes -> real values ``s * c`` (the logits the loss reads); the real
    gradient goes back unchanged."""

    def __init__(self, scale: float, **kwargs):
        super().__init__(trainable=False, **kwargs)
        self.scale = float(scale)

    def call(self, codes):
        @tf.custom_gradient
        def dequantize(c):
            return c * np.float32(self.scale), lambda g: g

        return dequantize(codes)

    def get_config(self):
        return {**super().get_config(), "scale": self.scale}


def device_softmax_cross_entropy(labels, logits, scale: float):
    """Per-example softmax cross-entropy of dequantized int8 ``logits`` (``s * c``) with the
    device's gradient (``DGST_SOFTMAX_XENT_GRAD``) in its float32 operations: ``e_i =
    expf(s * (c_i - max c))``, ``total`` summed in order, ``p = e * (1 / total)``, ``g = p -
    onehot``; loss ``log(total) - s * (c_label - max c)``."""
    scale = np.float32(scale)

    @tf.custom_gradient
    def xent(z):
        codes = tf.round(ordered_div(z, scale))  # the int8 codes, exactly
        shifted = codes - tf.reduce_max(codes, axis=-1, keepdims=True)
        e = tf.cast(tf.exp(tf.cast(ordered_mul(shifted, scale), tf.float64)), tf.float32)
        classes_first = tf.transpose(e)  # summed in class order, as the C loop
        total = _sum_in_order(tf.zeros_like(e[:, 0]), classes_first,
                              tf.ones_like(classes_first))[:, None]
        onehot = tf.one_hot(labels, tf.shape(z)[-1], dtype=tf.float32)
        gradient = ordered_mul(e, ordered_div(np.float32(1.0), total)) - onehot
        loss = (tf.cast(tf.math.log(tf.cast(total[..., 0], tf.float64)), tf.float32)
                - ordered_mul(tf.reduce_sum(shifted * onehot, axis=-1), scale))
        return loss, lambda upstream: ordered_mul(gradient, upstream[:, None])

    return xent(logits)


class DeviceSoftmaxCrossEntropy(keras.losses.Loss):
    """`device_softmax_cross_entropy` as a Keras loss for the int8 graph's logits (``scale``:
    the logits' int8 scale, `Int8TrainingGraph.loss` makes it); labels are class indices.

        sparse.compile(optimizer=..., loss=graph.loss)
    """

    def __init__(self, scale: float, name: str = "device_softmax_cross_entropy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.scale = float(scale)

    def call(self, y_true, y_pred):
        labels = tf.cast(tf.reshape(y_true, [-1]), tf.int32)
        return device_softmax_cross_entropy(labels, y_pred, self.scale)

    def get_config(self):
        return {**super().get_config(), "scale": self.scale}
