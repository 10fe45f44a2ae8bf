"""Which Keras layers and activations the exported int8 training step can train through, in one
table. A layer on the gradient path (a trained layer, or anything between one and the loss)
needs an exact int8 backward kernel in the exported graph (`dgst_tf.export.training`) and in
its Keras int8 simulation (`dgst_tf.training.int8_graph`); the table says which have one, and
`check_gradient_path` refuses the others up front, naming the layer and what is unsupported.
Layers in front of the first trained layer only run forward (frozen).

    from dgst_tf.core.training_support import SUPPORT, check_gradient_path, unsupported_reason

    check_gradient_path(model, {"block_16_project", "classifier"}, "export_training")
    unsupported_reason(model.get_layer("multiply"))   # "elementwise multiply: ...", or None
    for row in SUPPORT: print(row.label, row.trains, row.note)   # the README table
"""
from __future__ import annotations

import dataclasses

from dgst_tf.core.graph import UnsupportedModelError, nodes_in_order
from dgst_tf.core.keras_compat import keras
from dgst_tf.core.layer_kinds import kind_of
from dgst_tf.core.multiply_patterns import hard_swish_patterns, squeeze_excite_gates
from tf_keras.src.layers.core.tf_op_layer import TFOpLambda  # a TF op on Keras tensors

__all__ = ["LayerSupport", "SUPPORT", "ACTIVATIONS", "TRAINABLE_ACTIVATIONS",
           "unsupported_reason", "check_gradient_path", "supported_summary"]



@dataclasses.dataclass(frozen=True)
class LayerSupport:
    """One row: Keras ``types``, the TFLite ``op`` they become, whether the training step
    ``trains`` through them (exact int8 backward), and a ``note`` (conditions, or why not)."""

    label: str
    types: tuple
    op: str
    trains: bool
    note: str = ""


# Most specific first (DepthwiseConv2D subclasses Conv2D).
SUPPORT = (
    LayerSupport("DepthwiseConv2D", (keras.layers.DepthwiseConv2D,), "DEPTHWISE_CONV_2D", True,
                 "any kernel size (3x3, 5x5, 7x7), stride, SAME / VALID; activation none, "
                 "ReLU, ReLU6, swish or sigmoid"),
    LayerSupport("Conv2D", (keras.layers.Conv2D,), "CONV_2D", True,
                 "any kernel size, stride, dilation, SAME / VALID; activation none, ReLU, "
                 "ReLU6, swish or sigmoid; a 1x1 Conv2D of the pooled map is a Dense layer"),
    LayerSupport("Dense", (keras.layers.Dense,), "FULLY_CONNECTED", True,
                 "activation none, ReLU, ReLU6, swish or sigmoid; the classifier (Dense or 1x1 "
                 "Conv2D) may end in a softmax, dropped for training and kept for inference"),
    LayerSupport("BatchNormalization", (keras.layers.BatchNormalization,),
                 "folded into the layer before it", True,
                 "must directly follow a Conv2D / DepthwiseConv2D / Dense read by nothing "
                 "else (otherwise it stays a separate op, which is not supported)"),
    LayerSupport("ReLU, ReLU6, Activation('relu' | 'relu6' | 'linear')",
                 (keras.layers.ReLU, keras.layers.Activation),
                 "fused into the conv / dense before it", True,
                 "no negative slope or threshold, max value none or 6; right after a "
                 "Conv2D / DepthwiseConv2D / Dense"),
    LayerSupport("swish / SiLU, sigmoid (Activation, or a layer's activation)", (),
                 "LOGISTIC + MUL (swish), LOGISTIC", True,
                 "backward DGST_ACTIVATION_GRAD: the gradient times f' at the saved int8 "
                 "input (a 256-entry table); tested after Conv2D / DepthwiseConv2D / Dense "
                 "(EfficientNet's conv-BN-swish)"),
    LayerSupport("hard-swish (MobileNetV3's Multiply([x, ReLU6(x + 3) * (1 / 6)]))", (),
                 "HARD_SWISH", True,
                 "the four layers become one HARD_SWISH op; backward DGST_ACTIVATION_GRAD "
                 "as for swish"),
    LayerSupport("Add", (keras.layers.Add,), "ADD", True, "two inputs (residual connections)"),
    LayerSupport("ZeroPadding2D", (keras.layers.ZeroPadding2D,), "PAD", True,
                 "folded into the next conv where it can be"),
    LayerSupport("GlobalAveragePooling2D", (keras.layers.GlobalAveragePooling2D,), "MEAN",
                 True, "keepdims or not"),
    LayerSupport("Dropout", (keras.layers.Dropout, keras.layers.SpatialDropout2D), "none",
                 True, "the device has no dropout (inference behaviour)"),
    LayerSupport("Flatten, Reshape", (keras.layers.Flatten, keras.layers.Reshape), "RESHAPE",
                 True, "backward: a builtin RESHAPE of the float32 gradient to the input's "
                 "shape (in place); a Dense after it must read it whole (Flatten first), "
                 "not per position"),
    LayerSupport("Softmax, Activation('softmax')", (keras.layers.Softmax,), "SOFTMAX", False,
                 "only as the classifier's last layer (dropped for training)"),
    LayerSupport("Multiply", (keras.layers.Multiply,), "MUL", False,
                 "elementwise multiply of two tensors, e.g. a squeeze-and-excitation gate "
                 "(EfficientNet, MobileNetV3): no int8 backward kernel for MUL (its exact "
                 "gradient goes into the feature map, error x gate, and through the gate's "
                 "pooling, 1x1 convs and sigmoid); train only layers after the SE block. "
                 "A hard-swish Multiply trains (row above)"),
    LayerSupport("TFOpLambda (TensorFlow ops on Keras tensors)", (TFOpLambda,),
                 "ADD / MUL / ... by a constant", False,
                 "no int8 backward kernels for them, except the x + 3 and * (1 / 6) of a "
                 "hard-swish (row above)"),
    LayerSupport("MaxPooling2D, GlobalMaxPooling2D",
                 (keras.layers.MaxPooling2D, keras.layers.GlobalMaxPooling2D),
                 "MAX_POOL_2D / REDUCE_MAX", False, "no backward kernel for max pooling"),
    LayerSupport("AveragePooling2D", (keras.layers.AveragePooling2D,), "AVERAGE_POOL_2D",
                 False, "no backward kernel for local average pooling"),
    LayerSupport("Concatenate", (keras.layers.Concatenate,), "CONCATENATION", False,
                 "no backward kernel for CONCATENATION"),
    LayerSupport("Rescaling, Normalization",
                 (keras.layers.Rescaling, keras.layers.Normalization), "MUL / ADD / SUB",
                 False, "preprocessing inside the model: apply it to the images instead"),
    LayerSupport("LeakyReLU, PReLU, ELU", (keras.layers.LeakyReLU, keras.layers.PReLU,
                                           keras.layers.ELU), "LEAKY_RELU / PRELU / ELU",
                 False, "no int8 backward kernel"),
)

_MULTIPLY_NOTE = next(row.note for row in SUPPORT if row.label == "Multiply")

TRAINABLE_ACTIVATIONS = ("linear", "relu", "relu6", "swish", "silu", "sigmoid")
# fused into the op before them (ReLU / ReLU6), the others are table activations
# (`dgst_tf.training.int8_activations`) that may follow any layer
_FUSED_ACTIVATIONS = ("relu", "relu6")
# activation name -> why the training step cannot train through it
ACTIVATIONS = {
    "hard_swish": "write MobileNetV3's hard-swish as Multiply([x, ReLU(6.)(x + 3) * (1 / 6)]) "
                  "(keras.applications' form, converted to HARD_SWISH)",
    "hard_silu": "write MobileNetV3's hard-swish as Multiply([x, ReLU(6.)(x + 3) * (1 / 6)]) "
                 "(keras.applications' form, converted to HARD_SWISH)",
    "hard_sigmoid": "hard-sigmoid has no int8 backward kernel",
    "tanh": "tanh has no int8 backward kernel",
    "gelu": "GELU has no int8 backward kernel",
    "elu": "ELU has no int8 backward kernel",
    "selu": "SELU has no int8 backward kernel",
    "softplus": "softplus has no int8 backward kernel",
    "softmax": "a softmax is only supported as the classifier's last activation",
}


def _activation(layer) -> str:
    """The elementwise function ``layer`` applies: "linear", "relu", "relu6", "swish"..."""
    if isinstance(layer, keras.layers.ReLU):
        return "relu6" if layer.max_value is not None and float(layer.max_value) == 6.0 \
            else "relu"
    return getattr(getattr(layer, "activation", None), "__name__", "linear")


def _activation_reason(name: str) -> str | None:
    if name in TRAINABLE_ACTIVATIONS:
        return None
    return ACTIVATIONS.get(name, f"activation {name!r} has no int8 backward kernel")


def _row(layer) -> LayerSupport | None:
    for row in SUPPORT:
        if isinstance(layer, row.types):
            return row
    return None


def unsupported_reason(layer, node=None) -> str | None:
    """Why the int8 training step cannot train through ``layer`` (None: it can). ``node``:
    the layer's call, for the checks that need its neighbours (a ReLU must follow a weight
    layer, an Add adds two tensors, a Dense reads a vector)."""
    if isinstance(layer, keras.layers.InputLayer):
        return None
    is_activation = isinstance(layer, (keras.layers.ReLU, keras.layers.Activation))
    if kind_of(layer) is not None or isinstance(layer, keras.layers.Activation):
        reason = _activation_reason(_activation(layer))
        if reason is not None:
            return f"activation {_activation(layer)!r}: {reason}"
    elif _row(layer) is None:
        return (f"{type(layer).__name__} is not a layer the int8 training step supports "
                f"(supported: {supported_summary()})")
    if isinstance(layer, keras.layers.ReLU):
        max_value = None if layer.max_value is None else float(layer.max_value)
        if float(layer.negative_slope) or float(layer.threshold) or max_value not in (None,
                                                                                      6.0):
            return (f"ReLU(max_value={max_value}, negative_slope={float(layer.negative_slope)}"
                    f", threshold={float(layer.threshold)}): only ReLU and ReLU6 fuse into "
                    "the int8 ops")
    if is_activation and node is not None and _activation(layer) in _FUSED_ACTIVATIONS \
            and not _follows_weight_layer(node):
        producer = node.parent_nodes[0].layer if node.parent_nodes else None
        return (f"a ReLU fuses into the Conv2D / DepthwiseConv2D / Dense right before it; "
                f"after {type(producer).__name__} {getattr(producer, 'name', '')!r} it has no "
                "int8 backward kernel (e.g. ResNet-v1's ReLU after the residual Add)")
    if isinstance(layer, keras.layers.Add) and node is not None and \
            len(node.parent_nodes) != 2:
        return f"Add of {len(node.parent_nodes)} tensors: only 2 are supported"
    if isinstance(layer, keras.layers.Dense) and node is not None and _per_position(node):
        return (f"Dense on a {tuple(node.input_shapes)[1:]} input, applied to the last axis "
                "at each position: the int8 step's dense gradients read the input as one "
                "row of all its values; put a Flatten in front of it")
    row = _row(layer)
    if kind_of(layer) is not None or is_activation or row.trains:
        return None
    return f"{row.op}: {row.note}"


def _follows_weight_layer(node) -> bool:
    """The layer reads one Conv2D / DepthwiseConv2D / Dense with a linear activation."""
    if len(node.parent_nodes) != 1:
        return False
    producer = node.parent_nodes[0].layer
    return kind_of(producer) is not None and _activation(producer) == "linear"


def _per_position(node) -> bool:
    """The Dense layer of ``node`` reads a tensor of more than one axis of features."""
    return len(tuple(node.input_shapes)) > 2


def supported_summary() -> str:
    """The layers the training step trains through, for error messages."""
    return ", ".join(row.label for row in SUPPORT if row.trains)


def check_gradient_path(model: keras.Model, trained, where: str) -> None:
    """Raise `UnsupportedModelError` for the first layer between a trained layer (names in
    ``trained``, inclusive) and the loss that the int8 training step cannot train through,
    naming it, its op and why; ``model``: BN folded, logits output
    (`dgst_tf.core.classifier.logits_model`). Example::

        check_gradient_path(model, {"conv", "classifier"}, "export_training(t.tflite)")
    """
    trained = set(trained)
    nodes = list(nodes_in_order(model))
    hard_swish = {name for pattern in hard_swish_patterns(model).values()
                  for name in (pattern.multiply, *pattern.helpers)}
    gate_of = {name: multiply for multiply, branch in squeeze_excite_gates(model).items()
               for name in (multiply, *branch)}
    first = next((n.layer.name for n in nodes if n.layer.name in trained), None)
    on_path = set()
    for node in nodes:
        if node.layer.name in trained or any(id(p) in on_path for p in node.parent_nodes):
            on_path.add(id(node))
            reason = None if node.layer.name in hard_swish else unsupported_reason(node.layer,
                                                                                    node)
            if reason is not None and node.layer.name in gate_of:
                multiply = gate_of[node.layer.name]
                raise UnsupportedModelError(
                    f"{where}: layer {multiply!r} (Multiply, MUL), a squeeze-and-excitation "
                    f"gate, lies between the first updated layer {first!r} and the loss, where "
                    f"the int8 training step cannot train through it: "
                    f"{_MULTIPLY_NOTE} (first unsupported layer of it: "
                    f"{node.layer.name!r}: {reason})")
            if reason is not None:
                row = _row(node.layer)
                op = f", {row.op}" if row is not None and not row.trains else ""
                raise UnsupportedModelError(
                    f"{where}: layer {node.layer.name!r} ({type(node.layer).__name__}{op}) "
                    f"lies between the first updated layer {first!r} and the loss, where the "
                    f"int8 training step cannot train through it: {reason}. Train only "
                    "layers after it, or replace it")
