"""The backward pass of the training step, from the loss back to the first updated layer:
the loss gradient (``DGST_SOFTMAX_XENT_GRAD``), then per op in reverse order

- ADD / QUANTIZE: the gradient passes to the inputs (summed with builtin ADD where residual
  gradients meet);
- RESHAPE (Flatten, Reshape): the gradient, a builtin RESHAPE of it to the input's shape
  (the same float32 values in the same order; the offline plan runs it in place where the
  output's gradient dies there);
- swish (LOGISTIC + MUL), HARD_SWISH, sigmoid (LOGISTIC): the gradient times the
  activation's derivative at its saved int8 input (``DGST_ACTIVATION_GRAD``, a 256-entry
  table from `dgst_tf.training.int8_activations.derivative_table`);
- MEAN (global average pooling): builtin MUL by 1 / pixels, or nothing when the next layer
  quantizes straight from the pooled gradient;
- conv / depthwise / dense: the int8 error signal (``DGST_QUANTIZE_GRAD``, ReLU mask
  applied), for updated layers the bias gradient and its update (`update`), the input
  gradient (``DGST_*_INPUT_GRAD``), then the kept-weights gradient and its update; a large
  weight gradient is computed and applied in chunks of kept input channels (`weight_grad_chunks`).

    add_backward_pass(graph)     # after add_variables and add_forward_records
"""
from __future__ import annotations

import collections
import dataclasses

import numpy as np

from dgst_tf.core.geometry import same_pad_before
from dgst_tf.core.tflite_builder import int32_options
from dgst_tf.export.tflite_file import schema
from dgst_tf.export.training import update
from dgst_tf.export.training.forward import merged_weights
from dgst_tf.export.training.plan import (PASS_THROUGH_OPS, TrainedLayer, TrainingExportError,
                                          conv_options)
from dgst_tf.export.training.schedule import schedule_words, step_counter
from dgst_tf.export.training.state import TrainingGraph
from dgst_tf.planning.arena_plan import DEFAULT_WEIGHT_GRAD_CHUNK_BYTES, weight_grad_chunks
from dgst_tf.training.int8_activations import derivative_table

__all__ = ["GradientFlow", "add_backward_pass", "DEFAULT_WEIGHT_GRAD_CHUNK_BYTES"]

_OPS = schema.BuiltinOperator


class GradientFlow:
    """The float gradients of activations on the way back: which activation has one, how
    many ops will still read each gradient tensor, and the pooled gradients of MEAN ops."""

    def __init__(self, graph: TrainingGraph, logits: int, logits_grad: int):
        self.graph = graph
        self.gradients = {logits: logits_grad}  # activation -> its gradient tensor
        self.readers = collections.Counter({logits_grad: 1})  # gradient -> pending readers
        # gradient of a MEAN input -> (pooled gradient, its MUL op, 1 / pixels)
        self.pooled = {}

    def give(self, tensor: int, gradient: int) -> None:
        """Record ``gradient`` as (a part of) the gradient of activation ``tensor``."""
        if tensor in self.gradients:  # gradients meeting at a fork: sum them
            for summand in (self.gradients[tensor], gradient):  # the ADD reads them
                self.pooled.pop(summand, None)
            editor = self.graph.editor
            total = editor.add_tensor(f"{editor.name(tensor)}/grad_sum", editor.shape(tensor),
                                      np.float32)
            self.graph.backward_ops.append(editor.builtin_op(
                _OPS.ADD, [self.gradients[tensor], gradient], [total],
                schema.BuiltinOptions.AddOptions, schema.AddOptionsT()))
            self.readers[self.gradients[tensor]] -= 1
            gradient = total
        self.gradients[tensor] = gradient
        self.readers[gradient] += 1

    def take(self, tensor: int) -> int | None:
        """The gradient of ``tensor`` (None if it has none), now read by its producer."""
        if tensor not in self.gradients:
            return None
        gradient = self.gradients.pop(tensor)
        self.readers[gradient] -= 1
        return gradient


@dataclasses.dataclass(frozen=True)
class _GradientGeometry:
    """int32 options of a weight op's gradients, and where its input gradient goes."""

    weight: tuple  # (stride h, w, dilation h, w, pad top, left) of the weight gradient
    input: tuple  # the same for the input gradient (a folded-away PAD's padding)
    grad_input: int  # the activation the input gradient is for (before a PAD)
    kernel_hw: tuple  # (kh, kw); (1, 1) for dense


def add_backward_pass(graph: TrainingGraph) -> None:
    """Append the loss gradient, the backward ops and the update ops to ``graph``."""
    flow = _add_loss_gradient(graph)
    plan, editor = graph.plan, graph.editor
    for index in range(len(plan.ops) - 1, plan.first_op - 1, -1):
        op = plan.ops[index]
        gradient = flow.take(int(op.outputs[0]))
        if gradient is None:
            continue
        op_kind = editor.builtin(op)
        if index in plan.activations:
            _activation_gradient(graph, flow, plan.activations[index], gradient)
        elif op_kind in ("ADD",) + tuple(PASS_THROUGH_OPS):
            _pass_gradient_through(graph, flow, index, op, op_kind, gradient)
        elif op_kind == "RESHAPE":
            _reshape_gradient(graph, flow, op, gradient)
        elif op_kind == "PAD":
            raise TrainingExportError(f"{graph.where}: PAD op {index} "
                                      f"({editor.name(op.outputs[0])!r}) must feed a VALID "
                                      f"convolution only")
        elif op_kind == "MEAN":
            _average_pooling_gradient(graph, flow, index, op, gradient)
        else:
            _weight_op_gradients(graph, flow, index, op, gradient)


def _add_loss_gradient(graph: TrainingGraph) -> GradientFlow:
    editor, logits = graph.editor, graph.plan.logits
    graph.label = editor.add_tensor("label", (1,), np.int32)
    graph.loss = editor.add_tensor("loss", (1,), np.float32)
    logits_scale, logits_zero_point = editor.quantization(logits)
    logits_grad = editor.add_tensor("logits/grad", editor.shape(logits), np.float32)
    graph.backward_ops.append(editor.custom_op(
        "DGST_SOFTMAX_XENT_GRAD", [logits, graph.label], [logits_grad, graph.loss],
        int32_options(float(logits_scale[0]), int(logits_zero_point[0]))))
    return GradientFlow(graph, logits, logits_grad)


def _pass_gradient_through(graph, flow, index, op, op_kind, gradient) -> None:
    if op_kind == "ADD" and op.builtinOptions.fusedActivationFunction:
        raise TrainingExportError(f"{graph.where}: ADD op {index} "
                                  f"({graph.editor.name(op.outputs[0])!r}) has a fused "
                                  f"activation; not supported")
    for tensor in op.inputs[:2 if op_kind == "ADD" else 1]:
        if int(tensor) in graph.plan.needs_gradient:
            flow.give(int(tensor), gradient)


def _reshape_gradient(graph, flow, op, gradient) -> None:
    """A RESHAPE's input gradient: its output's gradient reshaped back (builtin RESHAPE)."""
    source = int(op.inputs[0])
    if source not in graph.plan.needs_gradient:
        return
    flow.pooled.pop(gradient, None)  # read here: a pooling's MUL must run
    flow.give(source, _reshaped(graph, gradient, source, "grad", "grad_shape"))


def _activation_gradient(graph, flow, activation, gradient) -> None:
    """``dx = g * f'(x)`` of a swish / hard-swish / sigmoid from its saved int8 input x
    (``DGST_ACTIVATION_GRAD``; only the op writing the activation's output gets here: the
    sigmoid inside a swish gets no gradient of its own)."""
    editor, x = graph.editor, activation.input
    if x not in graph.plan.needs_gradient:
        return
    flow.pooled.pop(gradient, None)  # read here: a pooling's MUL must run
    scale, zero_point = editor.quantization(x)
    table = editor.add_tensor(f"{editor.name(x)}/{activation.kind}_derivative", (256,),
                              np.float32, data=derivative_table(activation.kind,
                                                                float(scale[0]),
                                                                int(zero_point[0])))
    x_grad = editor.add_tensor(f"{editor.name(x)}/grad", editor.shape(x), np.float32)
    graph.backward_ops.append(editor.custom_op("DGST_ACTIVATION_GRAD", [gradient, x, table],
                                               [x_grad]))
    flow.give(x, x_grad)


def _average_pooling_gradient(graph, flow, index, op, gradient) -> None:
    editor = graph.editor
    output, pooled_input = int(op.outputs[0]), int(op.inputs[0])
    axes = editor.data(op.inputs[1])
    shape = editor.shape(pooled_input)
    if axes is None or sorted(int(a) for a in np.ravel(axes)) != [1, 2] or len(shape) != 4:
        raise TrainingExportError(f"{graph.where}: MEAN op {index} ({editor.name(output)!r}) "
                                  f"must be a global average pooling over height and width")
    if pooled_input not in graph.plan.needs_gradient:
        return
    height, width = shape[1], shape[2]
    inverse_area = editor.add_tensor(f"{editor.name(output)}/inverse_area",
                                     (1, height, width, 1), np.float32,
                                     data=np.full((1, height, width, 1), 1.0 / (height * width),
                                                  np.float32))
    input_grad = editor.add_tensor(f"{editor.name(pooled_input)}/grad", shape, np.float32)
    mul = editor.builtin_op(_OPS.MUL, [gradient, inverse_area], [input_grad],
                            schema.BuiltinOptions.MulOptions, schema.MulOptionsT())
    graph.backward_ops.append(mul)
    flow.pooled[input_grad] = (gradient, mul, 1.0 / (height * width))
    flow.give(pooled_input, input_grad)


def _weight_op_gradients(graph, flow, index, op, gradient) -> None:
    """Error signal, input gradient and (for an updated layer) parameter gradients and
    updates of a conv / depthwise / dense op."""
    editor = graph.editor
    name = graph.plan.op_layer[index]
    layer = graph.layers.get(index)
    weights = int(op.inputs[1])
    dy, dy_scale = _quantized_error(graph, flow, index, op, name, gradient)
    weight_scales, _ = editor.quantization(weights)
    weight_scale = editor.add_tensor(f"{name}/weight_scale", weight_scales.shape, np.float32,
                                     data=weight_scales)
    geometry = _gradient_geometry(graph, op, name)
    error = (dy, dy_scale, weight_scale)
    if layer is not None:  # first: a bias-only layer's dy then dies at the input gradient
        _bias_gradient(graph, layer, op, error)
    if geometry.grad_input in graph.plan.needs_gradient:
        _input_gradient(graph, flow, layer, op, weights, geometry, error)
    if layer is not None:
        _weight_gradients(graph, layer, index, op, geometry, error)


def _quantized_error(graph, flow, index, op, name, gradient) -> tuple[int, int]:
    """(dy, dy_scale): the int8 error signal of op ``index`` (ReLU mask applied)."""
    editor = graph.editor
    output = int(op.outputs[0])
    mask = graph.relu_masks.get(index, -1)
    dy = editor.add_tensor(f"{name}/dy", editor.shape(output), np.int8)
    dy_scale = editor.add_tensor(f"{name}/dy_scale", (1,), np.float32)
    if gradient in flow.pooled and flow.readers[gradient] == 0:
        # the gradient of a global average pooling's input, quantized straight from the
        # pooled gradient: the float [1, H, W, C] copy (80 KB at MobileNetV2's head conv)
        # is never materialized
        pooled_grad, mul, factor = flow.pooled[gradient]
        graph.backward_ops.remove(mul)
        factor_tensor = editor.add_tensor(f"{name}/pool_factor", (1,), np.float32,
                                          data=np.array([factor], np.float32))
        graph.backward_ops.append(editor.custom_op(
            "DGST_QUANTIZE_GRAD", [pooled_grad, mask, factor_tensor], [dy, dy_scale]))
        return dy, dy_scale
    # read here, so the pooling's MUL must run: a later reader cannot quantize from the
    # pooled gradient instead (a projection shortcut and a block both read an Add's gradient)
    flow.pooled.pop(gradient, None)
    if mask >= 0 and flow.readers[gradient] > 0:  # also another tensor's gradient: copy it
        gradient = _copy_of(graph, gradient, output)
    graph.backward_ops.append(editor.custom_op("DGST_QUANTIZE_GRAD", [gradient, mask],
                                               [dy, dy_scale]))
    return dy, dy_scale


def _copy_of(graph, gradient, output) -> int:
    """A copy of ``gradient`` (builtin RESHAPE to the same shape), which the masked
    quantization may then overwrite."""
    return _reshaped(graph, gradient, output, "grad_copy", "grad_shape")


def _reshaped(graph, gradient, like, suffix, shape_suffix) -> int:
    """A new float32 tensor ``{like}/{suffix}`` of activation ``like``'s shape holding
    ``gradient``'s values in order (builtin RESHAPE, its shape ``{like}/{shape_suffix}``;
    TFLM copies unless both share memory)."""
    editor = graph.editor
    shape = [int(d) for d in editor.shape(like)]
    if int(np.prod(shape)) != int(np.prod(editor.shape(gradient))):
        raise TrainingExportError(f"{graph.where}: gradient {editor.name(gradient)!r} "
                                  f"{tuple(editor.shape(gradient))} cannot be reshaped to "
                                  f"{editor.name(like)!r} {tuple(shape)}")
    result = editor.add_tensor(f"{editor.name(like)}/{suffix}", shape, np.float32)
    shape_tensor = editor.add_tensor(f"{editor.name(like)}/{shape_suffix}", (len(shape),),
                                     np.int32, data=np.array(shape, np.int32))
    options = schema.ReshapeOptionsT()
    options.newShape = shape
    graph.backward_ops.append(editor.builtin_op(_OPS.RESHAPE, [gradient, shape_tensor],
                                                [result], schema.BuiltinOptions.ReshapeOptions,
                                                options))
    return result


def _gradient_geometry(graph, op, name) -> _GradientGeometry:
    editor, plan = graph.editor, graph.plan
    layer_input = int(op.inputs[0])
    if editor.builtin(op) == "FULLY_CONNECTED":
        _check_one_row(graph, op, name)
        unit = (1, 1, 1, 1, 0, 0)
        return _GradientGeometry(unit, unit, layer_input, (1, 1))
    (stride_h, stride_w), (dilation_h, dilation_w), padding, _ = conv_options(op)
    in_shape, out_shape = editor.shape(layer_input), editor.shape(op.outputs[0])
    kernel_shape = editor.shape(op.inputs[1])
    kernel_h, kernel_w = kernel_shape[1], kernel_shape[2]
    pads = (0, 0)
    if padding == schema.Padding.SAME:
        pads = (same_pad_before(in_shape[1], out_shape[1], kernel_h, stride_h, dilation_h),
                same_pad_before(in_shape[2], out_shape[2], kernel_w, stride_w, dilation_w))
    weight_geometry = (stride_h, stride_w, dilation_h, dilation_w, *pads)
    geometry = _GradientGeometry(weight_geometry, weight_geometry, layer_input,
                                 (kernel_h, kernel_w))
    pad_index = plan.producer.get(layer_input)
    if pad_index is not None and editor.builtin(plan.ops[pad_index]) == "PAD" and \
            padding == schema.Padding.VALID:
        pad = plan.ops[pad_index]
        paddings = editor.data(pad.inputs[1])
        if len(plan.consumers[layer_input]) != 1 or paddings is None:
            raise TrainingExportError(f"{graph.where}: PAD before layer {name!r} feeds other "
                                      f"ops too; not supported")
        geometry = dataclasses.replace(
            geometry, grad_input=int(pad.inputs[0]),
            input=(stride_h, stride_w, dilation_h, dilation_w, int(paddings[1][0]),
                   int(paddings[2][0])))
    if editor.builtin(op) == "DEPTHWISE_CONV_2D" and kernel_shape[3] != in_shape[3]:
        raise TrainingExportError(f"{graph.where}: depthwise layer {name!r} has a depth "
                                  f"multiplier other than 1; not supported")
    return geometry


def _check_one_row(graph, op, name) -> None:
    """A FULLY_CONNECTED's gradients treat its input as one row of input channels (a 4-D
    [1, 1, 1, C] input too: the converter drops the Flatten of a 1x1 map); a Dense applied
    per position (several rows) or an input flattened inside the op is refused."""
    editor = graph.editor
    in_shape = tuple(editor.shape(op.inputs[0]))
    in_channels = editor.shape(op.inputs[1])[-1]
    if in_shape[-1] != in_channels or int(np.prod(in_shape)) != in_channels:
        raise TrainingExportError(f"{graph.where}: dense layer {name!r} reads a "
                                  f"{in_shape} input as rows of {in_channels} values; its "
                                  f"gradients need one row of all input values (a Dense "
                                  f"after Flatten or global pooling, not one applied per "
                                  f"position)")


def _input_gradient(graph, flow, layer: TrainedLayer | None, op, weights, geometry,
                    error) -> None:
    editor = graph.editor
    dy, dy_scale, weight_scale = error
    if layer is not None and layer.compact >= 0:  # weights before this step's update
        weights, scatter = merged_weights(editor, layer, "backward")
        graph.backward_ops.append(scatter)
    input_grad = editor.add_tensor(f"{editor.name(geometry.grad_input)}/grad",
                                   editor.shape(geometry.grad_input), np.float32)
    op_name = ("DGST_DEPTHWISE_INPUT_GRAD" if editor.builtin(op) == "DEPTHWISE_CONV_2D"
               else "DGST_CONV2D_INPUT_GRAD")
    graph.backward_ops.append(editor.custom_op(op_name, [dy, dy_scale, weights, weight_scale],
                                               [input_grad], int32_options(*geometry.input)))
    flow.give(geometry.grad_input, input_grad)


def _bias_gradient(graph, layer: TrainedLayer, op, error) -> None:
    """The bias gradient of ``layer`` and its update (the input gradient does not read the
    bias, so the update may come first)."""
    editor = graph.editor
    dy, dy_scale, weight_scale = error
    out_channels = len(editor.quantization(int(op.inputs[1]))[0])
    bias_grad = editor.add_tensor(f"{layer.name}/bias_grad", (out_channels,), np.int32)
    graph.backward_ops.append(editor.custom_op("DGST_BIAS_GRAD", [dy], [bias_grad]))
    graph.backward_ops.append(update.bias_update(graph, op, bias_grad, weight_scale, dy_scale))


def _weight_gradients(graph, layer: TrainedLayer, index, op, geometry, error) -> None:
    """The kept weights' gradient and update of ``layer``, after its input gradient (which
    reads the weights before the update), chunk by chunk (`weight_grad_chunks`)."""
    dy, dy_scale, weight_scale = error
    if layer.kept is None:
        return
    out_channels = len(graph.editor.quantization(int(op.inputs[1]))[0])
    taps = int(np.prod(geometry.kernel_hw)) * (1 if layer.kind == "depthwise" else out_channels)
    chunks = weight_grad_chunks(len(layer.kept), 4 * taps, graph.settings.weight_grad_chunk_bytes,
                                dynamic=layer.policy is not None)
    for chunk in chunks:
        weight_grad = _weight_gradient(graph, layer, index, op, geometry, dy, out_channels,
                                       chunk)
        graph.backward_ops.append(update.weight_update(graph, layer, op, weight_grad,
                                                       weight_scale, dy_scale, chunk))


def _weight_gradient(graph, layer: TrainedLayer, index, op, geometry, dy, out_channels,
                     chunk: slice) -> int:
    """The int32 gradient of the kept input channels ``chunk`` (positions in ``layer.kept``)
    of the layer's weights (not computed at the steps a layer schedule leaves the layer
    out: its ops then read the step counter)."""
    editor = graph.editor
    count = chunk.stop - chunk.start
    whole = count == len(layer.kept)
    suffix = "" if whole else f"_{chunk.start}"
    kept_input = graph.kept_inputs[index] if whole else _input_chunk(graph, layer, index,
                                                                     chunk)
    _, input_zero_point = editor.quantization(int(op.inputs[0]))
    schedule = schedule_words(layer)
    step = [step_counter(graph)] if schedule else []
    options = int32_options(*geometry.weight, int(input_zero_point[0]), *schedule)
    kernel_h, kernel_w = geometry.kernel_hw
    if layer.kind == "depthwise":
        kept_tensor = layer.kept_tensor if whole else editor.add_tensor(
            f"{layer.name}/kept{suffix}", (count,), np.int32, data=layer.kept[chunk])
        weight_grad = editor.add_tensor(f"{layer.name}/weight_grad{suffix}",
                                        (kernel_h, kernel_w, count), np.int32)
        graph.backward_ops.append(editor.custom_op(
            "DGST_DEPTHWISE_WEIGHT_GRAD", [kept_input, kept_tensor, dy] + step,
            [weight_grad], options))
        return weight_grad
    shape = ((out_channels, count) if layer.kind == "dense"
             else (out_channels, kernel_h, kernel_w, count))
    weight_grad = editor.add_tensor(f"{layer.name}/weight_grad{suffix}", shape, np.int32)
    graph.backward_ops.append(editor.custom_op("DGST_CONV2D_WEIGHT_GRAD",
                                               [kept_input, dy] + step, [weight_grad],
                                               options))
    return weight_grad


def _input_chunk(graph, layer: TrainedLayer, index, chunk: slice) -> int:
    """The channels ``chunk`` of the input saved for the weight gradient (a copy,
    ``DGST_GATHER_CHANNELS``)."""
    editor = graph.editor
    saved = graph.kept_inputs[index]
    scale, zero_point = editor.quantization(saved)
    count = chunk.stop - chunk.start
    positions = editor.add_tensor(f"{layer.name}/chunk_{chunk.start}", (count,), np.int32,
                                  data=np.arange(chunk.start, chunk.stop, dtype=np.int32))
    part = editor.add_tensor(f"{layer.name}/input_kept_{chunk.start}",
                             editor.shape(saved)[:-1] + (count,), np.int8, scale=scale,
                             zero_point=zero_point)
    graph.backward_ops.append(editor.custom_op("DGST_GATHER_CHANNELS", [saved, positions],
                                               [part]))
    return part
