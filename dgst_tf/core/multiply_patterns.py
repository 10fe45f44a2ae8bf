"""The two elementwise Multiply patterns of mobile CNNs, found in a Keras graph:

- MobileNetV3's hard-swish ``Multiply([x, ReLU(6)(x + 3) * (1 / 6)])``
  (`keras.applications.MobileNetV3*`'s ``hard_swish``), which the TFLite converter turns into
  one ``HARD_SWISH`` op: the int8 training step treats the four layers as that one
  activation (`dgst_tf.core.training_support`, `dgst_tf.training.int8_graph`);
- a squeeze-and-excitation gate ``Multiply([x, gate(GlobalAveragePooling(x))])``
  (EfficientNet, MobileNetV3), which the step cannot train through: the refusal names it.

    from dgst_tf.core.multiply_patterns import hard_swish_patterns, squeeze_excite_gates

    patterns = hard_swish_patterns(model)      # {"multiply": HardSwish(...)}
    patterns["multiply"].helpers               # ("tf.__operators__.add", "re_lu", ...)
    squeeze_excite_gates(model)                # {"block1a_se_excite": {"block1a_se_squeeze", ...}}
"""
from __future__ import annotations

import dataclasses

from dgst_tf.core.graph import nodes_in_order
from dgst_tf.core.keras_compat import keras, tf
from tf_keras.src.layers.core.tf_op_layer import TFOpLambda

__all__ = ["HardSwish", "hard_swish_patterns", "hard_swish_helpers", "squeeze_excite_gates"]


@dataclasses.dataclass(frozen=True)
class HardSwish:
    """One hard-swish: the ``Multiply`` layer computing it, the name of the layer whose
    output ``x`` it reads, and the names of its three helper layers (x + 3, ReLU6, / 6)."""

    multiply: str
    source: str
    x_position: int  # which of the Multiply's two inputs is x
    helpers: tuple


def _history(tensor):
    layer, node_index, tensor_index = tensor._keras_history
    return layer.name, node_index, tensor_index


def _node(tensor):
    layer, node_index, _ = tensor._keras_history
    return layer._inbound_nodes[node_index]


def _output(node):
    return tf.nest.flatten(node.outputs)[0]


def _only_input(node, readers):
    """The one input tensor of ``node``, if the node's output has one reader, else None."""
    inputs = node.keras_inputs
    if len(inputs) != 1 or readers.get(_history(_output(node)), 0) != 1:
        return None
    return inputs[0]


def _constant_op(node, symbols, value) -> bool:
    """``node`` is a TFOpLambda call ``tensor <symbol> value``."""
    if not isinstance(node.layer, TFOpLambda) or node.layer.symbol not in symbols:
        return False
    args = node.call_args
    return (len(args) == 2 and isinstance(args[1], (int, float))
            and abs(float(args[1]) - value) < 1e-6)


def _gate_source(gate, readers):
    """(history of ``x``, helper layer names) if ``gate`` is ``ReLU(6)(x + 3) * (1 / 6)``
    (or ``/ 6``) and nothing else reads its parts, else None."""
    scale = _node(gate)
    if not (_constant_op(scale, ("math.multiply",), 1.0 / 6.0)
            or _constant_op(scale, ("math.truediv",), 6.0)):
        return None
    relu_out = _only_input(scale, readers)
    relu = _node(relu_out) if relu_out is not None else None
    if relu is None or not (isinstance(relu.layer, keras.layers.ReLU)
                            and relu.layer.max_value is not None
                            and float(relu.layer.max_value) == 6.0
                            and not float(relu.layer.negative_slope)
                            and not float(relu.layer.threshold)):
        return None
    shifted = _only_input(relu, readers)
    add = _node(shifted) if shifted is not None else None
    if add is None or not _constant_op(add, ("__operators__.add", "math.add"), 3.0):
        return None
    x = _only_input(add, readers)
    if x is None:
        return None
    return _history(x), (add.layer.name, relu.layer.name, scale.layer.name)


def hard_swish_patterns(model) -> dict:
    """{Multiply layer name: `HardSwish`} for every hard-swish of ``model``."""
    nodes = list(nodes_in_order(model))
    readers = {}
    for node in nodes:
        for tensor in node.keras_inputs:
            readers[_history(tensor)] = readers.get(_history(tensor), 0) + 1
    found = {}
    for node in nodes:
        if not isinstance(node.layer, keras.layers.Multiply) or len(node.keras_inputs) != 2:
            continue
        inputs = node.keras_inputs
        for position in (0, 1):
            gate = _gate_source(inputs[1 - position], readers)
            if gate is not None and gate[0] == _history(inputs[position]):
                found[node.layer.name] = HardSwish(node.layer.name, gate[0][0], position,
                                                   gate[1])
                break
    return found


def hard_swish_helpers(model) -> set:
    """Names of the x + 3, ReLU6 and / 6 layers that belong to a hard-swish of ``model``."""
    return {name for pattern in hard_swish_patterns(model).values()
            for name in pattern.helpers}


def _branch_to(tensor, source, limit: int = 32):
    """Names of the layers from ``source`` (a history, exclusive) to ``tensor`` through
    single-input layers, or None if ``tensor`` does not come from ``source`` that way."""
    names = []
    for _ in range(limit):
        if _history(tensor) == source:
            return names
        node = _node(tensor)
        inputs = node.keras_inputs
        if len(inputs) != 1:
            return None
        names.append(node.layer.name)
        tensor = inputs[0]
    return None


def squeeze_excite_gates(model) -> dict:
    """{Multiply layer name: names of its gate branch's layers} for every squeeze-and-
    excitation gate of ``model``: a Multiply of ``x`` and a branch from ``x`` through
    single-input layers that pools globally (``GlobalAveragePooling2D``)."""
    hard_swish = hard_swish_patterns(model)
    found = {}
    for node in nodes_in_order(model):
        if not isinstance(node.layer, keras.layers.Multiply) or len(node.keras_inputs) != 2 \
                or node.layer.name in hard_swish:
            continue
        x, gate = node.keras_inputs
        for first, second in ((x, gate), (gate, x)):
            branch = _branch_to(second, _history(first))
            if branch and any(isinstance(_layer(model, name),
                                         keras.layers.GlobalAveragePooling2D)
                              for name in branch):
                found[node.layer.name] = set(branch)
                break
    return found


def _layer(model, name):
    try:
        return model.get_layer(name)
    except ValueError:
        return None
