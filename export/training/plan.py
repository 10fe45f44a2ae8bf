"""What the training graph contains, per layer: which converted op is which Keras layer, which
layers the step updates, which input channels they keep, and the check that every op between
the first updated layer and the loss is one the backward pass supports.

    plan = plan_training(editor, model, scheme, classifier, where)
    plan.updates            # {layer name: LayerUpdate} in op order, classifier in full
    plan.first_op           # where the backward pass stops
    plan.needs_gradient     # tensors whose gradient the step computes
"""
from __future__ import annotations

import collections
import dataclasses

import numpy as np

from dgst_tf.core.int8_conversion import layer_names_in
from dgst_tf.export.tflite_editor import ModelEditor
from dgst_tf.training.int8_activations import find_activations
from dgst_tf.tflm_ops.reference import top_k_channels

__all__ = ["TrainingExportError", "TrainedLayer", "TrainingPlan", "WEIGHT_OP_KINDS",
           "PASS_THROUGH_OPS", "RELU", "RELU6", "find_layer_ops",
           "plan_training",
           "select_kept_channels", "conv_options"]

# converted op -> the layer kind the manifest names
WEIGHT_OP_KINDS = {"CONV_2D": "conv", "DEPTHWISE_CONV_2D": "depthwise",
                   "FULLY_CONNECTED": "dense"}
PASS_THROUGH_OPS = {"QUANTIZE"}  # int8 -> int8 requantization: straight-through gradient
# ops the backward pass can differentiate through (the activation ops only as the swish,
# hard-swish or sigmoid they compute: `dgst_tf.training.int8_activations.find_activations`)
GRADIENT_OPS = set(WEIGHT_OP_KINDS) | {"ADD", "MEAN", "PAD", "RESHAPE"} | PASS_THROUGH_OPS
ACTIVATION_OPS = {"LOGISTIC", "MUL", "HARD_SWISH"}
RELU, RELU6 = 1, 3  # TFLite fused activation codes


class TrainingExportError(ValueError):
    """The model or scheme cannot be exported as a TFLM training step (names the layer)."""


@dataclasses.dataclass
class TrainedLayer:
    """One layer the step updates, and the tensors the export made for it."""

    name: str
    op_index: int
    kind: str  # conv, depthwise, dense
    update: object  # LayerUpdate
    kept: np.ndarray | None = None  # input channels whose weights are updated
    kept_tensor: int = -1  # the int32 tensor holding them (constant, or chosen on device)
    policy: str | None = None  # dynamic selection policy evaluated on device, or None
    selection_state_bytes: int = 0  # its arena state: visited bitmask / step counter
    schedule: tuple | None = None  # (index, layers, per_step) under layers_per_step, or None
    compact: int = -1  # RAM variable with the kept input channels' weights only (static)
    flash: int = -1  # then: the read-only full kernel the other channels are read from
    weights_entry: dict | None = None  # then: its manifest "params" entry


@dataclasses.dataclass
class TrainingPlan:
    """The converted graph's layers and data flow, as the training export sees them."""

    ops: list  # the forward ops, in order (their indices name ops everywhere else)
    op_layer: dict  # op index -> Keras layer name (conv, depthwise and dense ops)
    layer_ops: dict  # Keras layer name -> op index
    updates: dict  # layer name -> LayerUpdate of every layer the step updates, in op order
    classifier: str
    logits: int  # the tensor the model outputs
    producer: dict  # tensor -> index of the op writing it
    consumers: dict  # tensor -> indices of the ops reading it
    first_op: int  # the first updated layer's op: the backward pass stops there
    needs_gradient: set  # tensors that depend on a trained parameter
    # op index -> the swish / hard-swish / sigmoid (ActivationOps) it belongs to
    activations: dict = dataclasses.field(default_factory=dict)


def conv_options(op):
    """(stride, dilation, padding, fused activation) of a CONV_2D / DEPTHWISE_CONV_2D op."""
    options = op.builtinOptions
    stride = (int(options.strideH), int(options.strideW))
    dilation = (int(getattr(options, "dilationHFactor", 1) or 1),
                int(getattr(options, "dilationWFactor", 1) or 1))
    return stride, dilation, int(options.padding), int(options.fusedActivationFunction)


def find_layer_ops(editor: ModelEditor, model, where) -> dict:
    """{op index: keras layer name} for conv/depthwise/dense ops, from the weight names."""
    from dgst_tf.training.scheme import updatable_layers

    names = [layer.name for layer in updatable_layers(model)]
    found = {}
    for index, op in enumerate(editor.subgraph.operators):
        op_kind = editor.builtin(op)
        if op_kind not in WEIGHT_OP_KINDS:
            continue
        weight_name = editor.name(op.inputs[1])
        matches = layer_names_in(weight_name, names)
        if len(matches) != 1:
            raise TrainingExportError(f"{where}: cannot tell which Keras layer op {index} "
                                      f"({op_kind}, weights {weight_name!r}) belongs to: "
                                      f"{matches or 'none'}")
        found[index] = matches[0]
    return found


def select_kept_channels(editor: ModelEditor, op, layer_name, kind, count, selection,
                         where) -> np.ndarray:
    """The ``count`` kept input channels of a weight-updated layer (static selection):
    ``selection`` is ``"magnitude"`` (top-k L2 norm of the real weights), ``"first"`` or a
    dict ``{layer: channel indices}``."""
    channels = editor.shape(op.inputs[1])[-1]
    if isinstance(selection, dict):
        return _given_channels(selection, layer_name, count, channels, where)
    if selection == "first":
        return np.arange(count, dtype=np.int32)
    if selection != "magnitude":
        raise TrainingExportError(f"{where}: selection must be 'magnitude', 'first' or a dict "
                                  f"{{layer: channels}}, got {selection!r}")
    weights = editor.data(op.inputs[1]).astype(np.float64)
    scales, _ = editor.quantization(op.inputs[1])
    if kind == "depthwise":  # [1, kh, kw, C], one scale per channel
        real = weights * scales
    else:  # [C_out, ..., C_in], one scale per output channel; dense as a 1x1 conv
        real = weights * scales.reshape((-1,) + (1,) * (weights.ndim - 1))
        real = real.reshape(real.shape[0], -1, 1, channels)
    return top_k_channels(real, count, depthwise=kind == "depthwise")


def _given_channels(selection: dict, layer_name, count, channels, where) -> np.ndarray:
    if layer_name not in selection:
        raise TrainingExportError(f"{where}: selection has no channels for layer "
                                  f"{layer_name!r}")
    kept = np.asarray(selection[layer_name], np.int32)
    if (kept.ndim != 1 or len(kept) != count or len(set(kept.tolist())) != count
            or kept.min() < 0 or kept.max() >= channels):
        raise TrainingExportError(f"{where}: layer {layer_name!r} needs {count} distinct "
                                  f"channel indices in [0, {channels}), got {kept.tolist()}")
    return np.sort(kept)


def plan_training(editor: ModelEditor, model, scheme, classifier: str, where) -> TrainingPlan:
    """Map the converted graph's ops to the scheme's layers and check the graph can be
    trained: every updated layer has an op, one input, logits straight from the classifier,
    and only supported ops between the first updated layer and the loss."""
    from dgst_tf.training.scheme import LayerUpdate

    subgraph = editor.subgraph
    ops = list(subgraph.operators)
    op_layer = find_layer_ops(editor, model, where)
    layer_ops = {name: index for index, name in op_layer.items()}
    all_updates = {name: scheme.update_for(name) for name in layer_ops}
    all_updates[classifier] = LayerUpdate("weights", 1.0)
    updates = {name: u for name, u in all_updates.items() if u.mode != "frozen"}
    missing = [name for name in updates if name not in layer_ops]
    if missing:
        raise TrainingExportError(f"{where}: updated layers {missing} have no op in the "
                                  f"converted model")
    if len(subgraph.outputs) != 1 or len(subgraph.inputs) != 1:
        raise TrainingExportError(f"{where}: the model must have one input and one output")
    logits = int(subgraph.outputs[0])
    producer, consumers = _data_flow(ops)
    if producer.get(logits) is None or op_layer.get(producer[logits]) != classifier:
        raise TrainingExportError(f"{where}: the model output must come straight from the "
                                  f"classifier {classifier!r} (logits, no softmax)")
    first_op = min(layer_ops[name] for name in updates)
    plan = TrainingPlan(ops, op_layer, layer_ops, updates, classifier, logits, producer,
                        consumers, first_op, set(), _activations(editor, ops, consumers))
    plan.needs_gradient = _tensors_needing_gradients(editor, plan, where)
    return plan


def _data_flow(ops) -> tuple[dict, dict]:
    producer = {}
    consumers = collections.defaultdict(list)
    for index, op in enumerate(ops):
        for tensor in op.outputs:
            producer[int(tensor)] = index
        for tensor in op.inputs:
            if tensor >= 0:
                consumers[int(tensor)].append(index)
    return producer, consumers


def _activations(editor: ModelEditor, ops, consumers) -> dict:
    kinds = [editor.builtin(op) for op in ops]
    fused = [int(getattr(op.builtinOptions, "fusedActivationFunction", 0) or 0) for op in ops]
    return find_activations(kinds, [list(op.inputs) for op in ops],
                            [list(op.outputs) for op in ops], consumers, fused)


def _tensors_needing_gradients(editor: ModelEditor, plan: TrainingPlan, where) -> set:
    """Outputs of updated layers and of every op downstream of one; raises for an op there
    the backward pass cannot differentiate."""
    needs_gradient = set()
    for index, op in enumerate(plan.ops):
        trains = plan.op_layer.get(index) in plan.updates
        if trains or any(int(t) in needs_gradient for t in op.inputs if t >= 0):
            needs_gradient |= {int(t) for t in op.outputs}
            op_kind = editor.builtin(op)
            if op_kind in ACTIVATION_OPS and index not in plan.activations:
                raise TrainingExportError(
                    f"{where}: op {index} ({op_kind}, output {editor.name(op.outputs[0])!r}) "
                    f"lies between the first updated layer {plan.op_layer[plan.first_op]!r} "
                    f"and the loss; an elementwise MUL of two tensors (e.g. a squeeze-and-"
                    f"excitation gate) has no int8 backward kernel (only the MUL of a swish "
                    f"x * sigmoid(x) has)")
            if op_kind not in GRADIENT_OPS | ACTIVATION_OPS:
                raise TrainingExportError(
                    f"{where}: op {index} ({op_kind}, output {editor.name(op.outputs[0])!r}) "
                    f"lies between the first updated layer {plan.op_layer[plan.first_op]!r} "
                    f"and the loss; the training export supports CONV_2D, DEPTHWISE_CONV_2D, "
                    f"FULLY_CONNECTED, ADD, MEAN (global average pooling), PAD, QUANTIZE, "
                    f"RESHAPE and the activations swish (LOGISTIC + MUL), HARD_SWISH and "
                    f"LOGISTIC there")
    return needs_gradient
