"""Forward-graph preparation of the training step: PAD folding, trainable tensors as
variables, and what the forward pass keeps for the backward pass (1-bit ReLU masks, the kept
input channels of weight-updated layers, the full kernels of kept-weights-in-RAM layers).

    folded = fold_pads(editor, keep_layers=["conv_3"])   # before planning
    add_variables(graph, model)                          # then, in this order
    add_forward_records(graph)
"""
from __future__ import annotations

import collections

import numpy as np

from dgst_tf.core.geometry import extra_taps_for_same
from dgst_tf.export import block_fusion
from dgst_tf.core.tflite_builder import int32_options
from dgst_tf.export.tflite_editor import ModelEditor
from dgst_tf.export.tflite_file import schema
from dgst_tf.export.training.plan import (RELU, RELU6, WEIGHT_OP_KINDS, TrainedLayer,
                                          TrainingExportError, conv_options,
                                          select_kept_channels)
from dgst_tf.export.training.schedule import schedule_words, step_counter
from dgst_tf.export.training.state import TrainingGraph

__all__ = ["fold_pads", "make_variable", "merged_weights", "add_variables",
           "add_forward_records"]


# ----------------------------------------------------------------------------- PAD folding
def fold_pads(editor: ModelEditor, keep_layers=()) -> int:
    """Replace ``PAD`` + VALID conv/depthwise by one SAME conv whose kernel gets trailing zero
    taps where that is exact (stride-2 3x3 after a symmetric 1-pixel pad -> 4x4 SAME): the
    padded copy of the activation (e.g. 66x66x48 int8 in MobileNetV2) then never exists.
    Ops whose weights name a layer in ``keep_layers`` are left alone. Returns the count."""
    subgraph = editor.subgraph
    ops = subgraph.operators
    readers = collections.Counter(int(t) for op in ops for t in op.inputs if t >= 0)
    producer = {int(t): index for index, op in enumerate(ops) for t in op.outputs}
    dropped_pads = set()
    for op in ops:
        pad_index = _foldable_pad(editor, op, ops, producer, readers, keep_layers)
        if pad_index is None:
            continue
        extra_taps = _extra_taps_for_same(editor, op, ops[pad_index])
        if extra_taps is None:
            continue
        _grow_kernel_to_same(editor, op, extra_taps, int(ops[pad_index].inputs[0]))
        dropped_pads.add(pad_index)
    subgraph.operators = [op for index, op in enumerate(ops) if index not in dropped_pads]
    if dropped_pads:
        editor.prune()
    return len(dropped_pads)


def _foldable_pad(editor, op, ops, producer, readers, keep_layers) -> int | None:
    """The index of the spatial-only PAD that alone feeds VALID conv ``op``, else None."""
    if editor.builtin(op) not in ("CONV_2D", "DEPTHWISE_CONV_2D") or \
            op.builtinOptions.padding != schema.Padding.VALID:
        return None
    if any(f"/{name}/" in f"/{editor.name(op.inputs[1])}" for name in keep_layers):
        return None
    pad_index = producer.get(int(op.inputs[0]))
    if pad_index is None or editor.builtin(ops[pad_index]) != "PAD" or \
            readers[int(op.inputs[0])] != 1:
        return None
    paddings = editor.data(ops[pad_index].inputs[1])
    if paddings is None or np.any(paddings[0]) or np.any(paddings[3]):
        return None
    return pad_index


def _extra_taps_for_same(editor, op, pad) -> tuple | None:
    """Zero taps to append to the kernel (rows, columns) so that SAME padding equals the
    PAD's, or None where no such kernel exists."""
    (stride_h, stride_w), (dilation_h, dilation_w), _, _ = conv_options(op)
    paddings = editor.data(pad.inputs[1])
    kernel = editor.shape(op.inputs[1])
    in_h, in_w = editor.shape(int(pad.inputs[0]))[1:3]
    out_h, out_w = editor.shape(op.outputs[0])[1:3]
    extra = (extra_taps_for_same(in_h, out_h, kernel[1], stride_h, dilation_h, paddings[1][0]),
             extra_taps_for_same(in_w, out_w, kernel[2], stride_w, dilation_w, paddings[2][0]))
    return None if None in extra else extra


def _grow_kernel_to_same(editor, op, extra_taps, unpadded_input) -> None:
    weights = editor.data(op.inputs[1])
    grown = np.zeros((weights.shape[0], weights.shape[1] + extra_taps[0],
                      weights.shape[2] + extra_taps[1], weights.shape[3]), weights.dtype)
    grown[:, :weights.shape[1], :weights.shape[2], :] = weights
    editor.tensor(op.inputs[1]).shape = list(grown.shape)
    editor.tensor(op.inputs[1]).buffer = editor.add_buffer(grown)
    op.builtinOptions.padding = schema.Padding.SAME
    op.inputs = [unpadded_input] + list(op.inputs[1:])


# ----------------------------------------------------------------------------- variables
def make_variable(editor: ModelEditor, index, init_ops: list, label) -> dict:
    """Turn constant tensor ``index`` into a variable initialised from a copy of its data;
    returns the tensor fields of its manifest "params" entry."""
    data = editor.data(index)
    if data is None:
        raise TrainingExportError(f"{label}: tensor {editor.name(index)!r} has no constant "
                                  f"data")
    tensor = editor.tensor(index)
    initial = editor.add_tensor(f"{editor.name(index)}/initial", data.shape, data.dtype,
                                data=data)
    editor.tensor(initial).quantization = tensor.quantization
    tensor.buffer = 0
    tensor.isVariable = True
    init_ops.append(editor.custom_op("DGST_VARIABLE_INIT", [index, initial], []))
    return {"tensor": int(index), "initial": int(initial)}


def _compact_weights(editor: ModelEditor, flash: int, layer: TrainedLayer) -> int:
    """A new int8 constant with the weights of ``layer.kept`` only (last axis) of the kernel
    ``flash``, to become the layer's RAM variable; the full kernel stays read-only."""
    weights = editor.data(flash)
    scales, zero_points = editor.quantization(flash)
    dimension = int(editor.tensor(flash).quantization.quantizedDimension)
    if dimension == len(weights.shape) - 1:  # depthwise: one scale per (kept) channel
        scales, zero_points = scales[layer.kept], zero_points[layer.kept]
    return editor.add_tensor(f"{layer.name}/kept_weights",
                             weights.shape[:-1] + (len(layer.kept),), np.int8,
                             data=weights[..., layer.kept], scale=scales,
                             zero_point=zero_points, quantized_dimension=dimension)


def merged_weights(editor: ModelEditor, layer: TrainedLayer, when: str):
    """(tensor, op): a temporary full kernel of ``layer``, the flash tensor with the kept
    channels taken from the RAM variable (``DGST_SCATTER_CHANNELS``)."""
    scales, zero_points = editor.quantization(layer.flash)
    merged = editor.add_tensor(f"{layer.name}/weights_{when}", editor.shape(layer.flash),
                               np.int8, scale=scales, zero_point=zero_points,
                               quantized_dimension=int(
                                   editor.tensor(layer.flash).quantization.quantizedDimension))
    return merged, editor.custom_op("DGST_SCATTER_CHANNELS",
                                    [layer.flash, layer.compact, layer.kept_tensor], [merged])


def add_variables(graph: TrainingGraph, model) -> None:
    """Make each updated layer's bias (and weights) variables, choosing the kept channels."""
    plan = graph.plan
    for name, update in plan.updates.items():
        index = plan.layer_ops[name]
        op = plan.ops[index]
        layer = TrainedLayer(name, index, WEIGHT_OP_KINDS[graph.editor.builtin(op)], update)
        graph.layers[index] = layer
        label = f"{graph.where}: layer {name!r}"
        _add_bias_variable(graph, layer, op, label)
        if update.updates_weights:
            _choose_kept_channels(graph, layer, op, model)
            _add_weight_variable(graph, layer, op, label)


def _add_bias_variable(graph: TrainingGraph, layer: TrainedLayer, op, label) -> None:
    editor = graph.editor
    weight_scales, _ = editor.quantization(op.inputs[1])
    input_scale, _ = editor.quantization(op.inputs[0])
    if len(op.inputs) < 3 or op.inputs[2] < 0:  # converter dropped an all-zero bias
        out_channels = editor.shape(op.inputs[1])[0 if layer.kind != "depthwise" else 3]
        bias = editor.add_tensor(f"{layer.name}/bias", (out_channels,), np.int32,
                                 data=np.zeros(out_channels, np.int32),
                                 scale=weight_scales * input_scale[0],
                                 zero_point=[0] * out_channels)
        op.inputs = list(op.inputs[:2]) + [bias]
    graph.params.append({"layer": layer.name, "param": "bias",
                         **make_variable(editor, op.inputs[2], graph.init_ops, label)})


def _choose_kept_channels(graph: TrainingGraph, layer: TrainedLayer, op, model) -> None:
    from dgst_tf.training.scheme import kept_channels

    channels = graph.editor.shape(op.inputs[1])[-1]
    count = channels if layer.name == graph.plan.classifier else kept_channels(
        model.get_layer(layer.name), layer.update)
    if count == channels:
        layer.kept = np.arange(channels, dtype=np.int32)
    elif graph.settings.policy is not None:  # a placeholder: chosen on device every step
        layer.kept, layer.policy = np.arange(count, dtype=np.int32), graph.settings.policy
    else:
        layer.kept = select_kept_channels(graph.editor, op, layer.name, layer.kind, count,
                                          graph.settings.selection, graph.where)


def _add_weight_variable(graph: TrainingGraph, layer: TrainedLayer, op, label) -> None:
    """The weights variable: only the kept channels' weights (kept-weights-in-RAM, static
    selection of a conv), else the whole kernel."""
    editor = graph.editor
    channels = editor.shape(op.inputs[1])[-1]
    if (graph.settings.kept_weights_in_ram and layer.policy is None
            and len(layer.kept) < channels and layer.kind in ("conv", "depthwise")):
        layer.flash = int(op.inputs[1])
        layer.compact = _compact_weights(editor, layer.flash, layer)
        layer.weights_entry = {"layer": layer.name, "param": "weights", "flash": layer.flash,
                               "kept": [int(c) for c in layer.kept], "merged": [],
                               **make_variable(editor, layer.compact, graph.init_ops, label)}
        graph.params.append(layer.weights_entry)
    else:
        graph.params.append({"layer": layer.name, "param": "weights",
                             **make_variable(editor, op.inputs[1], graph.init_ops, label)})


# ----------------------------------------------------------------------------- forward records
def add_forward_records(graph: TrainingGraph) -> None:
    """What the forward pass keeps for the backward pass: masks after ReLU ops on the
    gradient path, kept-channel copies of the inputs of weight-updated layers."""
    plan = graph.plan
    for index in range(plan.first_op, len(plan.ops)):
        op = plan.ops[index]
        op_kind = graph.editor.builtin(op)
        if op_kind not in WEIGHT_OP_KINDS or int(op.outputs[0]) not in plan.needs_gradient:
            continue
        _add_relu_mask(graph, index, op, op_kind)
        layer = graph.layers.get(index)
        if layer is None or layer.kept is None:
            continue
        _add_kept_channels_tensor(graph, layer, op)
        if layer.compact >= 0:  # the conv reads a full kernel assembled just before it
            merged, scatter = merged_weights(graph.editor, layer, "forward")
            graph.ops_before[index].append(scatter)
            op.inputs = [int(op.inputs[0]), merged] + [int(t) for t in op.inputs[2:]]
            layer.weights_entry["merged"].append(merged)
        _keep_input_channels(graph, layer, index, op)


def _add_relu_mask(graph: TrainingGraph, index, op, op_kind) -> None:
    editor = graph.editor
    activation = (int(op.builtinOptions.fusedActivationFunction)
                  if op_kind == "FULLY_CONNECTED" else conv_options(op)[3])
    if activation not in (0, RELU, RELU6):
        raise TrainingExportError(f"{graph.where}: layer {graph.plan.op_layer[index]!r} has "
                                  f"fused activation {activation}; only none, ReLU and ReLU6 "
                                  f"are supported")
    if not activation:
        return
    output = int(op.outputs[0])
    scale, zero_point = editor.quantization(output)
    low, high = block_fusion.activation_range(activation, float(scale[0]), int(zero_point[0]))
    size = int(np.prod(editor.shape(output)))
    mask = editor.add_tensor(f"{graph.plan.op_layer[index]}/relu_mask", ((size + 7) // 8,),
                             np.uint8)
    graph.ops_after[index].append(editor.custom_op("DGST_RELU_MASK", [output], [mask],
                                                   int32_options(low, high)))
    graph.relu_masks[index] = mask


def _add_kept_channels_tensor(graph: TrainingGraph, layer: TrainedLayer, op) -> None:
    """The int32 kept channels: a constant, or chosen on device at the start of each step."""
    editor = graph.editor
    count = len(layer.kept)
    if layer.policy is None:
        layer.kept_tensor = editor.add_tensor(f"{layer.name}/kept", (count,), np.int32,
                                              data=layer.kept)
        return
    layer.kept_tensor = editor.add_tensor(f"{layer.name}/kept", (count,), np.int32)
    graph.selection_ops.append(_selection_op(graph, layer, op))


# DGST_SELECT_CHANNELS policy codes (tflm_ops/tflm/dgst_select_channels.cc)
SELECTION_POLICY_CODES = {"window": 0, "magnitude": 1, "traversal": 2}


def _selection_op(graph: TrainingGraph, layer: TrainedLayer, op):
    """``DGST_SELECT_CHANNELS`` for ``layer.policy``: the integer importance multipliers
    (`reference.score_multipliers` of the weight scales, a constant) and its state variable
    in the arena, zeroed by TFLM at allocation and kept across Invokes: the visited bitmask
    (traversal, ceil(C / 8) bytes) or the step counter (window, one int32). Traversal under
    a layer schedule also reads ``sgd/step`` and marks nothing at the steps the layer is
    inactive (`schedule`)."""
    from dgst_tf.tflm_ops.reference import score_multipliers

    editor = graph.editor
    channels = editor.shape(op.inputs[1])[-1]
    state = -1
    if layer.policy == "traversal":
        state = editor.add_tensor(f"{layer.name}/selection_visited", ((channels + 7) // 8,),
                                  np.uint8, variable=True)
    elif layer.policy == "window":
        state = editor.add_tensor(f"{layer.name}/selection_step", (1,), np.int32, variable=True)
    layer.selection_state_bytes = {"traversal": (channels + 7) // 8, "window": 4}.get(
        layer.policy, 0)
    weight_scales, _ = editor.quantization(op.inputs[1])
    multipliers = score_multipliers(weight_scales)
    importance = editor.add_tensor(f"{layer.name}/selection_multipliers", multipliers.shape,
                                   np.int32, data=multipliers)
    schedule = schedule_words(layer) if layer.policy == "traversal" else ()
    return editor.custom_op(
        "DGST_SELECT_CHANNELS", [int(op.inputs[1]), importance, state]
        + ([step_counter(graph)] if schedule else []), [layer.kept_tensor],
        int32_options(SELECTION_POLICY_CODES[layer.policy],
                      1 if layer.kind == "depthwise" else 0, *schedule))


def _keep_input_channels(graph: TrainingGraph, layer: TrainedLayer, index, op) -> None:
    """Keep the layer's input for its weight gradient: only the kept channels
    (``DGST_GATHER_CHANNELS``), or the input itself when all are kept."""
    editor = graph.editor
    layer_input = int(op.inputs[0])
    if len(layer.kept) == editor.shape(layer_input)[-1]:
        graph.kept_inputs[index] = layer_input
        return
    scale, zero_point = editor.quantization(layer_input)
    kept_input = editor.add_tensor(f"{layer.name}/input_kept",
                                   editor.shape(layer_input)[:-1] + (len(layer.kept),),
                                   np.int8, scale=scale, zero_point=zero_point)
    graph.ops_before[index].append(editor.custom_op(
        "DGST_GATHER_CHANNELS", [layer_input, layer.kept_tensor], [kept_input]))
    graph.kept_inputs[index] = kept_input
