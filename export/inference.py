"""Inference export: a tf-keras model -> a full-int8 `.tflite` for TensorFlow Lite Micro.

Int8 deployment as in Lin et al. 2022 ("On-Device Training Under 256KB Memory"):
per-output-channel symmetric int8 weights, per-tensor int8 activations calibrated on
representative data, int32 biases, int8 model input and output, batch 1. BatchNorm after a
conv is folded by the converter when the model is not BN-folded already
(`dgst_tf.fold_batchnorm` gives the same graph). Pruned models work as they are; TF-MOT
pruning wrappers are stripped first. ::

    from dgst_tf.export import export_int8, quantize, run_tflm

    info = export_int8(model, calibration_images, "model.tflite")   # images: (N, H, W, C)
    x = quantize(images[:1], info.input)                             # float -> int8
    logits_q = run_tflm("model.tflite", [x]).outputs[0]             # TFLM, bit-exact with
    logits_ref = reference_outputs("model.tflite", [x])[0]          # TFLite's ref kernels
"""
from __future__ import annotations

import collections
import dataclasses
import os
import pathlib

import numpy as np

from dgst_tf.core.files import write_atomically
from dgst_tf.core.int8_conversion import (DEFAULT_HEAD_LOGIT_RANGE, DEFAULT_HEAD_WEIGHT_HEADROOM,
                                          DEFAULT_NUM_SAMPLES, Int8ConversionError, convert_int8)
from dgst_tf.core.tflite_reference import builtin_ref_outputs
from dgst_tf.export.tflite_file import (TensorDetails, TfliteFileError, read_tflite, schema,
                                        tensor_details)

__all__ = ["export_int8", "Int8Export", "Int8ExportError", "quantize", "dequantize",
           "reference_outputs", "DEFAULT_NUM_SAMPLES"]

_BUILTIN_NAMES = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
_WEIGHT_OPS = {schema.BuiltinOperator.CONV_2D: (1, 0), schema.BuiltinOperator.DEPTHWISE_CONV_2D:
               (1, 3), schema.BuiltinOperator.FULLY_CONNECTED: (1, 0)}


# the model could not be converted to a full-int8 TFLite model (the converter's own error)
Int8ExportError = Int8ConversionError


@dataclasses.dataclass(frozen=True)
class Int8Export:
    """What `export_int8` wrote."""

    path: pathlib.Path
    size_bytes: int
    inputs: tuple  # TensorDetails per model input (int8, scale, zero point)
    outputs: tuple  # TensorDetails per model output
    ops: dict  # builtin op name -> count

    @property
    def input(self) -> TensorDetails:
        return self.inputs[0]

    @property
    def output(self) -> TensorDetails:
        return self.outputs[0]


def quantize(x, details: TensorDetails) -> np.ndarray:
    """Float values -> the int8 codes of a tensor: ``clip(round(x / s) + z, -128, 127)``.

        x_q = quantize(images[:1], info.input)
    """
    if not details.scales:
        raise ValueError(f"quantize: tensor {details.name!r} is not quantized")
    q = np.round(np.asarray(x, np.float32) / np.float32(details.scale)) + details.zero_point
    info = np.iinfo(details.dtype)
    return np.clip(q, info.min, info.max).astype(details.dtype)


def dequantize(q, details: TensorDetails) -> np.ndarray:
    """Int8 codes -> float values: ``s * (q - z)``.

        logits = dequantize(outputs[0], info.output)
    """
    if not details.scales:
        raise ValueError(f"dequantize: tensor {details.name!r} is not quantized")
    return (np.asarray(q, np.float32) - details.zero_point) * np.float32(details.scale)


def _check_int8(model, label):
    """Full-int8 checks of the converted flatbuffer; returns {op name: count}."""
    subgraph = model.subgraphs[0]
    for kind in ("inputs", "outputs"):
        for index in getattr(subgraph, kind):
            d = tensor_details(model, int(index))
            if d.dtype != np.int8:
                raise Int8ExportError(f"{label}: model {kind[:-1]} {d.name!r} is "
                                      f"{np.dtype(d.dtype).name}, not int8")
    ops = collections.Counter()
    for op in subgraph.operators:
        code = model.operatorCodes[op.opcodeIndex]
        builtin = max(code.builtinCode, code.deprecatedBuiltinCode)
        ops[_BUILTIN_NAMES.get(builtin, str(builtin))] += 1
        for index in list(op.inputs) + list(op.outputs):
            if index < 0:
                continue
            tensor = subgraph.tensors[index]
            if tensor.type == schema.TensorType.FLOAT32:
                raise Int8ExportError(f"{label}: op {_BUILTIN_NAMES.get(builtin)} still has the "
                                      f"float32 tensor {tensor.name.decode()!r}: not full int8")
        if builtin in _WEIGHT_OPS:
            position, channel_axis = _WEIGHT_OPS[builtin]
            weights = subgraph.tensors[op.inputs[position]]
            scales = weights.quantization.scale if weights.quantization else None
            channels = weights.shape[channel_axis]
            if weights.type != schema.TensorType.INT8 or scales is None or len(
                    scales) != channels:
                raise Int8ExportError(f"{label}: weights {weights.name.decode()!r} are not int8 "
                                      f"with one scale per output channel")
    return dict(ops)


def export_int8(model, representative_data, path, *, num_samples: int = DEFAULT_NUM_SAMPLES,
                head_logit_range: float = DEFAULT_HEAD_LOGIT_RANGE,
                head_weight_headroom: float = DEFAULT_HEAD_WEIGHT_HEADROOM) -> Int8Export:
    """Convert a tf-keras ``model`` to a full-int8 TFLite file at ``path`` (written atomically).

    ``representative_data`` calibrates the activation ranges: an array of samples
    ``(N, *input_shape)``, a ``tf.data.Dataset`` of samples or ``(samples, labels)``
    (batched or not), or a callable yielding lists of arrays (one per model input). At most
    ``num_samples`` samples are used. The model may be BN-folded or not and pruned
    (TF-MOT wrappers are stripped). Its input size must be fixed; the file has batch 1.
    The classifier head gets ``head_logit_range`` / ``head_weight_headroom`` room to train
    (`dgst_tf.core.int8_conversion.widen_head`; 0 and 1 keep the converter's parameters).

    Raises ``Keras3ModelError`` for Keras 3 models, ``ValueError`` for unusable inputs or
    data, `Int8ExportError` if the converter fails or the result is not full int8; on any
    error nothing is written. Example::

        info = export_int8(fold_batchnorm(model), x_train[:64], "model.tflite")
        info.input.scale, info.input.zero_point, info.size_bytes
    """
    where = f"export_int8({os.fspath(path)})"
    data = convert_int8(model, representative_data, num_samples=num_samples, where=where,
                        head_logit_range=head_logit_range,
                        head_weight_headroom=head_weight_headroom)
    try:
        data, parsed = read_tflite(data, what=f"converted for {os.fspath(path)}")
    except TfliteFileError as error:
        raise Int8ExportError(str(error)) from None
    ops = _check_int8(parsed, where)
    written = write_atomically(path, data)
    subgraph = parsed.subgraphs[0]
    return Int8Export(written, len(data),
                      tuple(tensor_details(parsed, int(i)) for i in subgraph.inputs),
                      tuple(tensor_details(parsed, int(i)) for i in subgraph.outputs), ops)


def reference_outputs(model, inputs) -> list:
    """Outputs of TFLite's reference kernels (``BUILTIN_REF``, via ai-edge-litert): the
    golden values TFLM must match bit for bit. ``inputs``: one array per model input, of the
    input's exact shape (no stacking).

        expected = reference_outputs("model.tflite", [x_q])[0]
    """
    data, _ = read_tflite(model)
    return builtin_ref_outputs(data, inputs)
