"""The layer kinds dgst-tf trains, in one table: what each kind's kernel is called, which kernel
axis indexes the channels a weight-update ratio counts, and how many weights hang off one.

Every stage asks this table instead of writing its own ``isinstance`` checks:

    from dgst_tf.core.layer_kinds import kind_of, kernel_of, input_channels

    kind = kind_of(layer)            # LayerKind or None (not a weight layer)
    if kind is not None and kind.depthwise:
        ...
    kernel_of(layer).shape, input_channels(layer), weights_per_channel(layer)

Order matters: tf-keras' ``DepthwiseConv2D`` subclasses ``Conv2D``, so the most specific kind
comes first.

A stage that needs its own per-kind fact (which TensorFlow op to call, say) keeps a small
registry keyed by these kinds, like TF-MOT's quantize registry, instead of an ``isinstance``
chain::

    SPARSE_OPS = {CONV2D: sparse_conv2d, DEPTHWISE: sparse_depthwise_conv2d, DENSE: sparse_dense}
    op = SPARSE_OPS[kind_of(layer)]
"""
from __future__ import annotations

import dataclasses

from dgst_tf.core.geometry import channels_for_ratio  # noqa: F401  (re-exported)
from dgst_tf.core.keras_compat import keras

__all__ = ["LayerKind", "KINDS", "CONV2D", "DEPTHWISE", "DENSE", "CONV_TYPES",
           "WEIGHT_TYPES", "UNSUPPORTED_CONV_TYPES", "kind_of", "is_conv", "is_depthwise",
           "is_dense", "is_pointwise", "is_unsupported_conv", "kernel_of", "input_channels",
           "weights_per_channel", "channels_for_ratio", "tflite_kernel_layout"]


@dataclasses.dataclass(frozen=True)
class LayerKind:
    """One trainable layer kind.

    ``channel_axis``: the kernel axis of the channels an update ratio counts (input channels;
    for depthwise, the layer's channels). ``spatial``: the kernel has (kh, kw) axes.
    """

    name: str
    keras_type: type
    kernel_attr: str
    channel_axis: int
    depthwise: bool = False
    spatial: bool = True

    def kernel(self, layer):
        return getattr(layer, self.kernel_attr)


DEPTHWISE = LayerKind("depthwise_conv2d", keras.layers.DepthwiseConv2D, "depthwise_kernel", 2,
                      depthwise=True)
CONV2D = LayerKind("conv2d", keras.layers.Conv2D, "kernel", 2)
DENSE = LayerKind("dense", keras.layers.Dense, "kernel", 0, spatial=False)
KINDS = (DEPTHWISE, CONV2D, DENSE)  # most specific first

CONV_TYPES = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)
WEIGHT_TYPES = CONV_TYPES + (keras.layers.Dense,)
UNSUPPORTED_CONV_TYPES = (keras.layers.Conv2DTranspose, keras.layers.SeparableConv2D,
                          keras.layers.Conv1D, keras.layers.Conv3D)


def kind_of(layer) -> LayerKind | None:
    """The layer's kind, or None for layers without trainable kernels we support."""
    if is_unsupported_conv(layer):
        return None
    for kind in KINDS:
        if isinstance(layer, kind.keras_type):
            return kind
    return None


def is_conv(layer) -> bool:
    """Conv2D or DepthwiseConv2D (not the unsupported conv variants)."""
    kind = kind_of(layer)
    return kind is not None and kind.spatial


def is_depthwise(layer) -> bool:
    return kind_of(layer) is DEPTHWISE


def is_dense(layer) -> bool:
    return kind_of(layer) is DENSE


def is_pointwise(layer) -> bool:
    """A 1x1 Conv2D (MobileNetV2's expansion and projection convs), not a depthwise one."""
    return kind_of(layer) is CONV2D and tuple(layer.kernel_size) == (1, 1)


def is_unsupported_conv(layer) -> bool:
    """A convolution dgst-tf does not train (Conv2DTranspose, SeparableConv2D, 1D/3D)."""
    return isinstance(layer, UNSUPPORTED_CONV_TYPES)


def _kind(layer) -> LayerKind:
    kind = kind_of(layer)
    if kind is None:
        raise TypeError(f"layer {layer.name!r} ({type(layer).__name__}) is not a Conv2D, "
                        "DepthwiseConv2D or Dense layer")
    return kind


def kernel_of(layer):
    """The weight variable of a Conv2D, DepthwiseConv2D or Dense layer."""
    return _kind(layer).kernel(layer)


def input_channels(layer) -> int:
    """Channels a weight-update ratio counts: input channels (depthwise: its channels)."""
    kind = _kind(layer)
    return int(kind.kernel(layer).shape[kind.channel_axis])


def weights_per_channel(layer) -> int:
    """Weights that hang off one counted channel (depthwise: one channel's filter)."""
    kind = _kind(layer)
    shape = [int(d) for d in kind.kernel(layer).shape]
    total = 1
    for d in shape:
        total *= d
    return total // shape[kind.channel_axis]


def tflite_kernel_layout(kernel):
    """A Keras kernel (Conv2D HWIO, DepthwiseConv2D HWC1, Dense IO) in TFLite's layout (OHWI,
    1HWC, OI); the input channel stays the last axis. Example::

        tflite_kernel_layout(kernel_of(layer).numpy()).shape
    """
    return kernel.transpose(3, 0, 1, 2) if kernel.ndim == 4 else kernel.T
