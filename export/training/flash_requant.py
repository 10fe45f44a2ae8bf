"""The training graph's convolutions as ``DGST_CONV2D``: requantization constants in flash.

TFLM's builtin int8 CONV_2D and DEPTHWISE_CONV_2D compute each output channel's
requantization multiplier and shift at Prepare into persistent arena memory (8 bytes per
output channel: 35 KB in the training part of MobileNetV2-0.35, more than a third of the
budget left after the trainable weights). They depend only on the scales, which training
does not change, so a firmware keeps them in flash (TinyEngine does; so does
``DGST_FUSED_BLOCK``). ``DGST_CONV2D`` (`tflm_ops/tflm/dgst_conv2d.cc`) is the same
convolution, bit for bit, reading them from a constant int32 ``[2, C_out]`` input::

    custom = flash_requant_op(editor, op)    # a DGST_CONV2D OperatorT, or None
    builtin = builtin_conv_op(editor, custom)   # the builtin op again (inference graphs)

Converted: int8 ops with per-channel (or per-tensor) symmetric int8 weights, dilation 1,
depth multiplier 1 and a NONE / RELU / RELU6 activation; anything else stays builtin. An op
without a bias gets a zero int32 bias constant (flash).
"""
from __future__ import annotations

import numpy as np

from dgst_tf.core.geometry import same_pad_before
from dgst_tf.core.tflite_requantization import activation_range, conv_multipliers
from dgst_tf.core.tflite_builder import int32_options
from dgst_tf.export.tflite_editor import ModelEditor
from dgst_tf.export.tflite_file import schema

__all__ = ["FLASH_REQUANT_OP", "flash_requant_op", "builtin_conv_op", "requant_constants"]

FLASH_REQUANT_OP = "DGST_CONV2D"
_KIND_CODES = {"CONV_2D": 0, "DEPTHWISE_CONV_2D": 1}
_ACTIVATIONS = (0, 1, 3)  # NONE, RELU, RELU6
_MAX_DEPTHWISE_KERNEL_H = 16  # DGST_DEPTHWISE_MAX_KERNEL_H of the C core
_OPTION_WORDS = 11  # after the version word


def requant_constants(editor: ModelEditor, x: int, weights: int, y: int) -> np.ndarray:
    """int32 ``[2, C_out]``: the multiplier and shift of every output channel, as TFLM's
    Prepare computes them (`conv_multipliers`).

        requant_constants(editor, op.inputs[0], op.inputs[1], op.outputs[0])
    """
    channels = editor.shape(y)[-1]
    w_scales = np.broadcast_to(editor.quantization(weights)[0], (channels,))
    return np.stack(conv_multipliers(editor.quantization(x)[0][0], w_scales,
                                     editor.quantization(y)[0][0])).astype(np.int32)


def _convertible(editor: ModelEditor, op) -> bool:
    kind = editor.builtin(op)
    if kind not in _KIND_CODES:
        return False
    x, w, y = int(op.inputs[0]), int(op.inputs[1]), int(op.outputs[0])
    options = op.builtinOptions
    int8 = all(editor.tensor(t).type == schema.TensorType.INT8 for t in (x, w, y))
    w_shape, x_shape, y_shape = editor.shape(w), editor.shape(x), editor.shape(y)
    scales, zero_points = editor.quantization(w)
    ok = (int8 and len(x_shape) == 4 and len(w_shape) == 4 and x_shape[0] == 1
          and len(scales) in (1, y_shape[-1]) and not np.any(zero_points)
          and len(editor.quantization(x)[0]) == 1 and len(editor.quantization(y)[0]) == 1
          and int(options.dilationHFactor) == 1 and int(options.dilationWFactor) == 1
          and int(options.fusedActivationFunction) in _ACTIVATIONS)
    if kind == "DEPTHWISE_CONV_2D":
        ok = ok and w_shape[0] == 1 and w_shape[3] == x_shape[3] == y_shape[3] and \
            w_shape[1] <= _MAX_DEPTHWISE_KERNEL_H
    return ok and (len(op.inputs) < 3 or op.inputs[2] < 0
                   or editor.tensor(op.inputs[2]).type == schema.TensorType.INT32)


def _pads(editor: ModelEditor, op) -> tuple[int, int]:
    """(top, left) padding of a builtin conv."""
    options = op.builtinOptions
    if options.padding == schema.Padding.VALID:
        return 0, 0
    in_shape, out_shape = editor.shape(op.inputs[0]), editor.shape(op.outputs[0])
    kernel = editor.shape(op.inputs[1])
    return (same_pad_before(in_shape[1], out_shape[1], kernel[1], int(options.strideH)),
            same_pad_before(in_shape[2], out_shape[2], kernel[2], int(options.strideW)))


def _bias(editor: ModelEditor, op) -> int:
    """The op's int32 bias, or a new zero constant where the converter dropped it."""
    if len(op.inputs) > 2 and op.inputs[2] >= 0:
        return int(op.inputs[2])
    channels = editor.shape(op.outputs[0])[-1]
    return editor.add_tensor(f"{editor.name(op.outputs[0])}/zero_bias", (channels,), np.int32,
                             data=np.zeros(channels, np.int32))


def flash_requant_op(editor: ModelEditor, op):
    """The ``DGST_CONV2D`` op computing builtin conv ``op`` (same tensors, plus a constant
    requant input), or None if ``op`` is not a convolution it covers (module doc)."""
    if not _convertible(editor, op):
        return None
    x, w, y = int(op.inputs[0]), int(op.inputs[1]), int(op.outputs[0])
    options = op.builtinOptions
    activation = int(options.fusedActivationFunction)
    y_scale, y_zero_point = editor.quantization(y)
    act_min, act_max = activation_range(activation, float(y_scale[0]), int(y_zero_point[0]))
    requant = editor.add_tensor(f"{editor.name(y)}/requant", (2, editor.shape(y)[-1]),
                                np.int32, data=requant_constants(editor, x, w, y))
    words = [_KIND_CODES[editor.builtin(op)], int(options.strideH), int(options.strideW),
             *_pads(editor, op), int(editor.quantization(x)[1][0]), int(y_zero_point[0]),
             act_min, act_max, int(options.padding), activation]
    return editor.custom_op(FLASH_REQUANT_OP, [x, w, _bias(editor, op), requant], [y],
                            int32_options(*words))


def builtin_conv_op(editor: ModelEditor, op):
    """The builtin CONV_2D / DEPTHWISE_CONV_2D that ``DGST_CONV2D`` op ``op`` computes (its
    requant input dropped): an inference graph's convolution again."""
    words = np.frombuffer(bytes(op.customOptions), "<i4")
    if len(words) != 1 + _OPTION_WORDS:
        raise ValueError(f"{FLASH_REQUANT_OP} op writing {editor.name(op.outputs[0])!r} has "
                         f"{len(words)} option words, expected {1 + _OPTION_WORDS}")
    kind, stride_h, stride_w, padding, activation = (int(words[i]) for i in (1, 2, 3, 10, 11))
    if kind == _KIND_CODES["DEPTHWISE_CONV_2D"]:
        options, code = schema.DepthwiseConv2DOptionsT(), schema.BuiltinOperator.DEPTHWISE_CONV_2D
        options_type = schema.BuiltinOptions.DepthwiseConv2DOptions
        options.depthMultiplier = 1
    else:
        options, code = schema.Conv2DOptionsT(), schema.BuiltinOperator.CONV_2D
        options_type = schema.BuiltinOptions.Conv2DOptions
    options.padding, options.strideH, options.strideW = padding, stride_h, stride_w
    options.dilationHFactor = options.dilationWFactor = 1
    options.fusedActivationFunction = activation
    return editor.builtin_op(code, list(op.inputs[:3]), list(op.outputs), options_type, options)
