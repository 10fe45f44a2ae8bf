"""Activation pattern pruning: store only a fixed pattern of a layer's input for its
weight gradient.

A weight-updated convolution keeps its input activation for the backward pass; that saved
tensor dominates the training memory of DGSU-style sparse update. The weight gradient is a
sum over output positions, ``dW = sum_p patch_x(p) (x) dy(p)``, so it can be estimated from
a fixed subset ``P`` of positions: store only the input pixels those positions read, and
``dW ~= |all| / |P| * sum_{p in P} patch_x(p) (x) dy(p)`` (``rescale=True``; exact when
``P`` is everything). The input gradient ``dx`` is untouched (it needs the kernel, not the
activation), and so is the bias gradient.

The family (`get_pattern` names):

- ``"full"``: every position (the reference);
- ``"stride2"``, ``"stride4"``...: every s-th output row and column (1/s^2 of the
  positions; for a 1x1 stride-1 conv the stored input is exactly ``x[:, ::s, ::s, :]``);
- ``"rows2"``, ``"cols2"``...: every s-th output row (column) only (1/s);
- ``"checker"``: a checkerboard, half of the positions, alternating in both directions;
- ``"cblock8/2"``: channel blocks: of every 2 blocks of 8 input channels keep one
  (contiguous runs, cheap to copy on an MCU); the other channels get no weight gradient
  this step. ``phase`` shifts the kept block (rotate it across steps to visit all).

Spatial patterns pay off on 1x1 convolutions (the expansion/projection layers that DGSU
updates) and whenever the row/column step is at least the kernel size; for a 3x3 stride-1
conv stride-2 subsampling still touches every input row (`stored_bytes` counts exactly
what must be kept). Example::

    from dgst_tf.training.activation_patterns import get_pattern, pattern_conv2d, stored_bytes

    pattern = get_pattern("stride2")
    y = pattern_conv2d(x, kernel, bias, strides=(1, 1), padding="SAME", pattern=pattern)
    stored_bytes(pattern, (12, 12, 96), kernel_size=(1, 1))     # 6*6*96 = 3456 (int8)

`pattern_conv2d` / `pattern_depthwise_conv2d` are the math; the sparse train step uses it
through `store` (what to keep, in the forward pass) and `weight_gradient` (in the backward
pass), see `store_for_conv` and `weight_gradient_from_stored`.
"""
from __future__ import annotations

import dataclasses
import re

import numpy as np

from dgst_tf.core.geometry import AxisGeometry, conv_axis
from dgst_tf.core.keras_compat import keras, tf
from dgst_tf.core.layer_kinds import is_conv, is_dense, is_depthwise, kernel_of

__all__ = ["ActivationPattern", "get_pattern", "PATTERNS", "ConvGeometry",
           "store_for_conv", "weight_gradient_from_stored", "pattern_conv2d",
           "pattern_depthwise_conv2d", "stored_bytes", "layer_stored_bytes",
           "with_activation_patterns"]

Grid = tuple  # (row_step, col_step, row_offset, col_offset)


@dataclasses.dataclass(frozen=True)
class ActivationPattern:
    """Which output positions (a union of strided grids) and input channels a layer keeps
    for its weight gradient.

        ActivationPattern.stride(2)            # every 2nd row and column
        ActivationPattern.checkerboard()
        ActivationPattern.channel_blocks(8, 2, phase=1)
    """

    name: str
    grids: tuple = ((1, 1, 0, 0),)
    channel_block: int = 0        # 0: all channels
    channel_every: int = 1
    channel_phase: int = 0
    rescale: bool = True

    # -- constructors ----------------------------------------------------------------------
    @classmethod
    def full(cls) -> "ActivationPattern":
        return cls("full")

    @classmethod
    def stride(cls, step: int, offset: int = 0, rescale: bool = True) -> "ActivationPattern":
        _check_step(step)
        return cls(f"stride{step}", ((step, step, offset % step, offset % step),),
                   rescale=rescale)

    @classmethod
    def rows(cls, step: int, offset: int = 0, rescale: bool = True) -> "ActivationPattern":
        _check_step(step)
        return cls(f"rows{step}", ((step, 1, offset % step, 0),), rescale=rescale)

    @classmethod
    def cols(cls, step: int, offset: int = 0, rescale: bool = True) -> "ActivationPattern":
        _check_step(step)
        return cls(f"cols{step}", ((1, step, 0, offset % step),), rescale=rescale)

    @classmethod
    def checkerboard(cls, phase: int = 0, rescale: bool = True) -> "ActivationPattern":
        p = phase % 2
        return cls("checker" if not p else "checker1", ((2, 2, 0, p), (2, 2, 1, 1 - p)),
                   rescale=rescale)

    @classmethod
    def channel_blocks(cls, block: int, every: int, phase: int = 0) -> "ActivationPattern":
        if block < 1 or every < 1:
            raise ValueError(f"channel blocks need block >= 1 and every >= 1, got "
                             f"{block}, {every}")
        return cls(f"cblock{block}/{every}", channel_block=block, channel_every=every,
                   channel_phase=phase % every, rescale=False)

    # -- queries ----------------------------------------------------------------------------
    @property
    def is_full(self) -> bool:
        return self.grids == ((1, 1, 0, 0),) and not self.channel_block

    def output_grids(self, out_h: int, out_w: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Kept output positions as (rows, cols) index arrays, one pair per grid (empty
        grids dropped)."""
        result = []
        for rs, cs, ro, co in self.grids:
            rows, cols = np.arange(ro, out_h, rs), np.arange(co, out_w, cs)
            if len(rows) and len(cols):
                result.append((rows, cols))
        return result

    def kept_positions(self, out_h: int, out_w: int) -> int:
        return sum(len(r) * len(c) for r, c in self.output_grids(out_h, out_w))

    def scale(self, out_h: int, out_w: int) -> float:
        """Factor making the subsampled sum an estimate of the full one (1 if no rescale)."""
        kept = self.kept_positions(out_h, out_w)
        if not self.rescale or not kept:
            return 1.0
        return out_h * out_w / kept

    def kept_channels(self, channels: int) -> np.ndarray:
        """Input channels kept (all unless this is a channel-block pattern)."""
        c = np.arange(channels)
        if not self.channel_block:
            return c
        return c[(c // self.channel_block) % self.channel_every == self.channel_phase]

    def with_phase(self, phase: int) -> "ActivationPattern":
        """The same pattern shifted (grid offsets or channel block) by ``phase``: rotate
        it across steps so every position/channel is visited."""
        if self.channel_block:
            return dataclasses.replace(self, channel_phase=phase % self.channel_every)
        grids = tuple((rs, cs, (ro + phase) % rs, (co + phase) % cs)
                      for rs, cs, ro, co in self.grids)
        return dataclasses.replace(self, grids=grids)


def _check_step(step: int) -> None:
    if int(step) < 1:
        raise ValueError(f"pattern step must be >= 1, got {step}")


_NAMED = re.compile(r"^(stride|rows|cols)(\d+)$|^checker$|^full$|^cblock(\d+)/(\d+)$")
PATTERNS = ("full", "stride2", "stride3", "stride4", "rows2", "cols2", "checker",
            "cblock8/2", "cblock4/2")


def get_pattern(spec) -> ActivationPattern:
    """An `ActivationPattern` from a name (``"stride2"``, ``"rows2"``, ``"checker"``,
    ``"cblock8/2"``, ``"full"``), an existing pattern, or None (full).

        get_pattern("stride2").kept_positions(12, 12)     # 36
    """
    if spec is None:
        return ActivationPattern.full()
    if isinstance(spec, ActivationPattern):
        return spec
    match = _NAMED.match(str(spec))
    if not match:
        raise ValueError(f"unknown activation pattern {spec!r}; e.g. {', '.join(PATTERNS)}")
    if spec == "full":
        return ActivationPattern.full()
    if spec == "checker":
        return ActivationPattern.checkerboard()
    if match.group(1):
        return getattr(ActivationPattern, match.group(1))(int(match.group(2)))
    return ActivationPattern.channel_blocks(int(match.group(3)), int(match.group(4)))


# ----------------------------------------------------------------------------- geometry
@dataclasses.dataclass(frozen=True)
class ConvGeometry:
    """Static geometry of one (depthwise) convolution, NHWC."""

    kernel_size: tuple
    strides: tuple = (1, 1)
    padding: str = "SAME"
    dilations: tuple = (1, 1)

    @classmethod
    def of(cls, kernel_size, strides=(1, 1), padding="SAME", dilations=(1, 1)):
        def pair(v):
            return (int(v), int(v)) if np.ndim(v) == 0 else tuple(int(i) for i in v)

        return cls(pair(kernel_size), pair(strides), str(padding).upper(), pair(dilations))

    def effective(self, axis: int) -> int:
        return (self.kernel_size[axis] - 1) * self.dilations[axis] + 1

    def axis_geometry(self, size: int, axis: int) -> AxisGeometry:
        """Output size and padding along ``axis`` (0: rows, 1: columns) of an input ``size``
        (`dgst_tf.core.geometry.conv_axis`)."""
        return conv_axis(size, self.kernel_size[axis], self.strides[axis], self.dilations[axis],
                         self.padding)

    def output_size(self, size: int, axis: int) -> int:
        return self.axis_geometry(size, axis).out

    def pad_before(self, size: int, axis: int) -> int:
        return self.axis_geometry(size, axis).before

    def input_rows(self, out_rows: np.ndarray, size: int, axis: int) -> np.ndarray:
        """Padded-input coordinates read by ``out_rows``: for output k, the kernel taps
        in order (so row k*K + t of the gathered tensor is tap t of output k)."""
        taps = np.arange(self.kernel_size[axis]) * self.dilations[axis]
        return (out_rows[:, None] * self.strides[axis] + taps[None, :]).reshape(-1)


# ------------------------------------------------------------------- the math (hook)
def store_for_conv(x, pattern: ActivationPattern, geometry: ConvGeometry) -> list:
    """What the forward pass keeps of the input ``x`` (NHWC, static H and W): per grid of
    ``pattern`` the input pixels its output positions read (rows and columns gathered tap
    by tap) and only the pattern's channels. This is the ``kept`` tensor of the sparse
    train step when a pattern is set.

        stored = store_for_conv(x, get_pattern("stride2"), ConvGeometry.of(1))
    """
    h, w = int(x.shape[1]), int(x.shape[2])
    channels = pattern.kept_channels(int(x.shape[3]))
    if len(channels) != int(x.shape[3]):
        x = tf.gather(x, channels, axis=3)
    down, across = geometry.axis_geometry(h, 0), geometry.axis_geometry(w, 1)
    pads = [[0, 0], [down.before, down.after], [across.before, across.after], [0, 0]]
    padded = tf.pad(x, pads) if any(before or after for before, after in pads) else x
    out_h, out_w = down.out, across.out
    stored = []
    for rows, cols in pattern.output_grids(out_h, out_w):
        part = tf.gather(padded, geometry.input_rows(rows, h, 0), axis=1)
        stored.append(tf.gather(part, geometry.input_rows(cols, w, 1), axis=2))
    return stored


def weight_gradient_from_stored(stored: list, dy, pattern: ActivationPattern,
                                geometry: ConvGeometry, kernel_shape, input_channels: int,
                                depthwise: bool = False):
    """The weight-gradient estimate from `store_for_conv`'s tensors and the output
    gradient ``dy``: a full-shape kernel gradient (zeros for channels the pattern drops).

    Equals ``scale * d/dW sum_{p in pattern} <dy(p), conv(x, W)(p)>`` exactly.
    """
    kernel_shape = [int(d) for d in kernel_shape]
    out_h, out_w = int(dy.shape[1]), int(dy.shape[2])
    channels = pattern.kept_channels(input_channels)
    kh, kw = geometry.kernel_size
    sizes = list(kernel_shape)
    sizes[2] = len(channels)
    total = None
    for tensor, (rows, cols) in zip(stored, pattern.output_grids(out_h, out_w)):
        dy_part = tf.gather(tf.gather(dy, rows, axis=1), cols, axis=2)
        if depthwise:
            multiplier = kernel_shape[3]
            if len(channels) != input_channels:
                out_channels = (channels[:, None] * multiplier
                                + np.arange(multiplier)[None, :]).reshape(-1)
                dy_part = tf.gather(dy_part, out_channels, axis=3)
            grad = tf.raw_ops.DepthwiseConv2dNativeBackpropFilter(
                input=tensor, filter_sizes=sizes, out_backprop=dy_part,
                strides=[1, kh, kw, 1], padding="VALID")
        else:
            grad = tf.raw_ops.Conv2DBackpropFilter(
                input=tensor, filter_sizes=sizes, out_backprop=dy_part,
                strides=[1, kh, kw, 1], padding="VALID")
        total = grad if total is None else total + grad
    if total is None:
        total = tf.zeros(sizes, dy.dtype)
    total = total * pattern.scale(out_h, out_w)
    if len(channels) == input_channels:
        return total
    moved = tf.transpose(total, [2, 0, 1, 3])
    full = tf.scatter_nd(channels[:, None], moved,
                         [kernel_shape[2], kernel_shape[0], kernel_shape[1], kernel_shape[3]])
    return tf.transpose(full, [1, 2, 0, 3])


def _pattern_op(x, kernel, bias, strides, padding, dilations, pattern, input_grad,
                depthwise):
    pattern = get_pattern(pattern)
    geometry = ConvGeometry.of(kernel.shape[:2], strides, padding, dilations)
    strides4 = [1, *geometry.strides, 1]
    dilations4 = [1, *geometry.dilations, 1]

    @tf.custom_gradient
    def op(x, kernel, *bias):
        if depthwise:
            y = tf.nn.depthwise_conv2d(x, kernel, strides4, geometry.padding,
                                       dilations=geometry.dilations)
        else:
            y = tf.nn.conv2d(x, kernel, strides4, geometry.padding, dilations=dilations4)
        if bias:
            y = tf.nn.bias_add(y, bias[0])
        stored = store_for_conv(x, pattern, geometry)  # the only activation kept
        x_shape = tf.shape(x)

        def grad(dy):
            dx = None
            if input_grad and depthwise and geometry.dilations != (1, 1):
                # the native depthwise backprop ignores dilations on CPU: differentiate
                # the (space-to-batch) forward op instead
                with tf.GradientTape() as tape:
                    tape.watch(x)
                    y_again = tf.nn.depthwise_conv2d(x, kernel, strides4, geometry.padding,
                                                     dilations=geometry.dilations)
                dx = tape.gradient(y_again, x, output_gradients=dy)
            elif input_grad:
                backprop = (tf.raw_ops.DepthwiseConv2dNativeBackpropInput if depthwise
                            else tf.raw_ops.Conv2DBackpropInput)
                dx = backprop(input_sizes=x_shape, filter=kernel, out_backprop=dy,
                              strides=strides4, padding=geometry.padding,
                              dilations=dilations4)
            dk = weight_gradient_from_stored(stored, dy, pattern, geometry, kernel.shape,
                                             int(x.shape[3]), depthwise=depthwise)
            if bias:
                return dx, dk, tf.reduce_sum(dy, axis=[0, 1, 2])
            return dx, dk

        return y, grad

    return op(x, kernel, *([] if bias is None else [bias]))


def pattern_conv2d(x, kernel, bias=None, *, strides=(1, 1), padding="SAME",
                   dilations=(1, 1), pattern="full", input_grad=True):
    """Conv2D whose kernel gradient comes from the pattern-subsampled input (see module).

        y = pattern_conv2d(x, w, b, strides=(1, 1), padding="SAME", pattern="stride2")
    """
    return _pattern_op(x, kernel, bias, strides, padding, dilations, pattern, input_grad,
                       depthwise=False)


def pattern_depthwise_conv2d(x, kernel, bias=None, *, strides=(1, 1), padding="SAME",
                             dilations=(1, 1), pattern="full", input_grad=True):
    """DepthwiseConv2D (kernel [K, K, C, m]) with the pattern weight gradient."""
    return _pattern_op(x, kernel, bias, strides, padding, dilations, pattern, input_grad,
                       depthwise=True)


# ----------------------------------------------------------------------- memory count
def stored_bytes(pattern, input_shape, kernel_size=(1, 1), strides=(1, 1), padding="SAME",
                 dilations=(1, 1), kept_channels: int | None = None,
                 bytes_per_element: int = 1, explicit_padding=((0, 0), (0, 0))) -> int:
    """Bytes a layer keeps for its weight gradient under ``pattern``: the distinct input
    pixels (inside the unpadded input) read by the kept output positions, times the kept
    channels (``kept_channels``: the sparse update's selection; the pattern's channel
    blocks apply on top, proportionally), times ``bytes_per_element`` (int8: 1).
    ``explicit_padding`` ``((top, bottom), (left, right))``: a ZeroPadding2D between
    ``input_shape`` and the conv (zeros are not stored).

        stored_bytes("stride2", (12, 12, 96))          # 3456
        stored_bytes("full", (12, 12, 96), kept_channels=24)   # 3456
    """
    pattern = get_pattern(pattern)
    h, w, c = (int(d) for d in input_shape)
    (et, eb), (el, er) = explicit_padding
    hp, wp = h + et + eb, w + el + er   # what the conv reads
    geometry = ConvGeometry.of(kernel_size, strides, padding, dilations)
    out_h, out_w = geometry.output_size(hp, 0), geometry.output_size(wp, 1)
    pt, pl = geometry.pad_before(hp, 0) + et, geometry.pad_before(wp, 1) + el
    pixels = np.zeros((h, w), bool)
    for rows, cols in pattern.output_grids(out_h, out_w):
        r = geometry.input_rows(rows, hp, 0) - pt
        q = geometry.input_rows(cols, wp, 1) - pl
        r, q = r[(r >= 0) & (r < h)], q[(q >= 0) & (q < w)]
        pixels[np.ix_(r, q)] = True
    channels = c if kept_channels is None else int(kept_channels)
    if pattern.channel_block:
        channels = int(round(channels * len(pattern.kept_channels(c)) / c))
    return int(pixels.sum()) * channels * int(bytes_per_element)


def layer_stored_bytes(layer, input_shape, pattern, kept_channels: int | None = None,
                       explicit_padding=((0, 0), (0, 0))) -> int:
    """`stored_bytes` for a Keras Conv2D / DepthwiseConv2D / Dense layer (Dense: a 1x1
    conv on a 1x1 map, so spatial patterns change nothing)."""
    if is_dense(layer):
        features = int(input_shape[-1])
        return stored_bytes(pattern, (1, 1, features), kept_channels=kept_channels)
    return stored_bytes(pattern, input_shape, layer.kernel_size, layer.strides,
                        layer.padding, layer.dilation_rate, kept_channels,
                        explicit_padding=explicit_padding)


# ----------------------------------------------------------- Keras binding (benchmarks)
class _PatternConvCall(keras.layers.Layer):
    """Calls a Conv2D / DepthwiseConv2D with the pattern weight gradient."""

    def __init__(self, layer, pattern, **kwargs):
        super().__init__(name=f"{layer.name}_pattern", **kwargs)
        self.layer = layer
        self.pattern = get_pattern(pattern)

    def call(self, x):
        layer = self.layer
        kernel = kernel_of(layer)
        bias = layer.bias if layer.use_bias else None
        op = pattern_depthwise_conv2d if is_depthwise(layer) else pattern_conv2d
        y = op(x, kernel, bias, strides=layer.strides, padding=layer.padding,
               dilations=layer.dilation_rate, pattern=self.pattern)
        return layer.activation(y)


def with_activation_patterns(model: keras.Model, patterns: dict) -> keras.Model:
    """A model sharing ``model``'s variables whose named convs compute their kernel
    gradient from ``patterns[name]`` (forward outputs unchanged).

        train = with_activation_patterns(model, {"block_16_expand": "stride2"})
        train.fit(...)    # updates model's variables
    """
    from dgst_tf.core.graph import rebuild

    unknown = set(patterns) - {l.name for l in model.layers}
    if unknown:
        raise KeyError(f"patterns name layers not in the model: {sorted(unknown)}")

    def call_layer(layer, args, kwargs):
        if layer.name in patterns:
            if not is_conv(layer):
                raise TypeError(f"layer {layer.name!r} ({type(layer).__name__}): activation "
                                "patterns apply to Conv2D and DepthwiseConv2D layers")
            return _PatternConvCall(layer, patterns[layer.name])(*args)
        return layer(*args, **kwargs)

    return rebuild(model, call_layer, name=f"{model.name}_patterns")
