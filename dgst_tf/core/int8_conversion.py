"""The TFLite converter's full-int8 model: the one definition of int8 calibration.

`convert_int8` turns a tf-keras model and representative samples into the flatbuffer bytes of
a full-int8 TFLite model (per-output-channel int8 weights, per-tensor int8 activations
calibrated on the samples, int32 biases, int8 input and output, batch 1). Both the exported
files (`dgst_tf.export.inference.export_int8`, `dgst_tf.export.training.export_training`) and
the Keras int8 simulation (`dgst_tf.training.int8_graph`) start from it, so they share every
scale and zero point.

The classifier head a user fine-tunes is usually new, so its calibration sees an untrained
layer: logits within a fraction of their trained range and weights at their initial size.
Trained on the device with those parameters, the logits clamp at the int8 limits and the
loss stops falling. `convert_int8` therefore widens the head (the conv / dense op producing the
model output) to a logit range of at least ``+-head_logit_range`` and can give its weights
``head_weight_headroom`` times their calibrated range (int8 weights and int32 biases
requantized to the wider scales; off by default, see `DEFAULT_HEAD_WEIGHT_HEADROOM`); pass
``head_logit_range=0`` for the converter's parameters unchanged. `ConvertedModel` reads the tensors and ops back::

    from dgst_tf.core.int8_conversion import ConvertedModel, convert_int8

    converted = ConvertedModel(convert_int8(model, images[:64]))
    op = converted.ops[0]                      # ConvertedOp: kind, inputs, outputs, options
    converted.tensor(op.inputs[1]).data        # its int8 weights, .scales per channel
"""
from __future__ import annotations

import dataclasses

import numpy as np

from dgst_tf.core.keras_compat import require_keras2, tf

__all__ = ["Int8ConversionError", "DEFAULT_NUM_SAMPLES", "DEFAULT_HEAD_LOGIT_RANGE",
           "DEFAULT_HEAD_WEIGHT_HEADROOM", "convert_int8", "widen_head", "ConvertedModel",
           "ConvertedOp", "ConvertedTensor", "layer_names_in"]

DEFAULT_NUM_SAMPLES = 100
# Softmax cross-entropy is flat beyond a logit margin of ~16, so +-16 covers trained logits.
# Weight headroom costs resolution: on CIFAR-10 (MobileNetV2-1.0, 96 px, 3,000 int8 DGSU steps,
# validation split) 4x gave 54.2% against 58.1% without (float 59.5%), so it is off by default.
DEFAULT_HEAD_LOGIT_RANGE = 16.0
DEFAULT_HEAD_WEIGHT_HEADROOM = 1.0


class Int8ConversionError(RuntimeError):
    """The model could not be converted to a full-int8 TFLite model."""


def _strip_pruning(model):
    if not any(type(layer).__name__ == "PruneLowMagnitude" for layer in model.layers):
        return model
    import tensorflow_model_optimization as tfmot

    return tfmot.sparsity.keras.strip_pruning(model)


def _input_specs(model, where):
    specs = []
    names = list(getattr(model, "input_names", None) or [])
    for i, tensor in enumerate(model.inputs):
        name = names[i] if i < len(names) else f"input_{i}"
        shape = list(tensor.shape)
        if any(d is None for d in shape[1:]):
            raise ValueError(f"{where}: model input {name!r} has shape {tuple(shape)}; "
                             f"the MCU model needs a fixed size (build it with a full "
                             f"input_shape)")
        specs.append(tf.TensorSpec([1, *shape[1:]], tf.float32, name=name))
    return specs


def _samples(data, specs, where, num_samples):
    """Calibration samples as lists of (1, ...) float32 arrays, one per model input."""
    if callable(data) and not isinstance(data, (np.ndarray, tf.data.Dataset)):
        items = data()
    elif len(specs) != 1:
        raise ValueError(f"{where}: a model with {len(specs)} inputs needs representative_data"
                         f" as a callable yielding lists of arrays, one per input")
    else:
        items = data
    sample_shape = tuple(specs[0].shape[1:]) if len(specs) == 1 else None
    count = 0
    for item in items:
        if isinstance(item, (tuple, list)) and len(specs) == 1:
            item = item[0]  # (images, labels) or [image]
        arrays = [np.asarray(a, np.float32) for a in (item if len(specs) > 1 else [item])]
        if sample_shape is not None and arrays[0].shape == sample_shape:
            arrays[0] = arrays[0][None]
        rows = arrays[0].shape[0]
        for a, spec in zip(arrays, specs):
            if a.shape[1:] != tuple(spec.shape[1:]):
                raise ValueError(f"{where}: representative sample of shape {a.shape} does not "
                                 f"fit model input {spec.name!r} of shape {tuple(spec.shape)}")
        for r in range(rows):
            yield [a[r:r + 1] for a in arrays]
            count += 1
            if count >= num_samples:
                return
    if count == 0:
        raise ValueError(f"{where}: representative_data yielded no samples")


def convert_int8(model, representative_data, *, num_samples: int = DEFAULT_NUM_SAMPLES,
                 head_logit_range: float = DEFAULT_HEAD_LOGIT_RANGE,
                 head_weight_headroom: float = DEFAULT_HEAD_WEIGHT_HEADROOM,
                 where: str = "convert_int8") -> bytes:
    """The full-int8 TFLite flatbuffer of a tf-keras ``model`` (batch 1), calibrated on at
    most ``num_samples`` samples of ``representative_data``: an array ``(N, *input_shape)``,
    a ``tf.data.Dataset`` of samples or ``(samples, labels)`` (batched or not), or a callable
    yielding lists of arrays (one per model input). TF-MOT pruning wrappers are stripped.
    Raises ``Keras3ModelError``, ``ValueError`` for unusable inputs or data (naming
    ``where``) and `Int8ConversionError` if the converter fails. The head is widened by
    `widen_head` (see the module doc). Same model and samples, same bytes. Example::

        data = convert_int8(fold_batchnorm(model), x_train[:64])
    """
    require_keras2(model, where)
    model = _strip_pruning(model)
    specs = _input_specs(model, where)
    samples = list(_samples(representative_data, specs, where, int(num_samples)))

    function = tf.function(lambda *xs: model(list(xs) if len(xs) > 1 else xs[0],
                                              training=False), input_signature=specs)
    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [function.get_concrete_function()], model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: iter(samples)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    try:
        data = converter.convert()
    except Exception as error:
        raise Int8ConversionError(f"{where}: the TFLite converter failed (is every layer "
                                  f"int8-quantizable with builtin ops?): {error}") from error
    return widen_head(data, head_logit_range, head_weight_headroom)


def widen_head(data: bytes, logit_range: float, weight_headroom: float) -> bytes:
    """``data`` (a converted full-int8 model) with the conv / dense op producing the model's
    first output widened: output range covering at least ``[-logit_range, logit_range]``
    (never narrowed), weight scales times ``weight_headroom`` (>= 1) with the int8 weights
    and int32 biases requantized to them (round half away from zero, as the converter).
    A model whose output comes from another op is returned unchanged. Example::

        data = widen_head(data, logit_range=16.0, weight_headroom=4.0)
    """
    if weight_headroom < 1 or logit_range < 0:
        raise ValueError(f"widen_head: weight_headroom must be >= 1 and logit_range >= 0, got "
                         f"{weight_headroom} and {logit_range}")
    converted = ConvertedModel(data)
    head = converted.producer(converted.outputs[0])
    if head is None or head.kind not in ("FULLY_CONNECTED", "CONV_2D"):
        return data
    model, tensors = converted.model, converted.subgraph.tensors
    _widen_range(tensors[head.outputs[0]].quantization, logit_range)
    if weight_headroom > 1:
        for position in (1, 2):  # weights, then the bias (scale = s_in * s_w)
            if len(head.inputs) > position and head.inputs[position] >= 0:
                _rescale_constant(model, tensors[head.inputs[position]], weight_headroom)
    from dgst_tf.core.tflite_flatbuffer import pack_model

    return pack_model(model)


def _widen_range(quantization, half_range: float) -> None:
    scale, zero_point = float(quantization.scale[0]), int(quantization.zeroPoint[0])
    low = min((-128 - zero_point) * scale, -half_range)
    high = max((127 - zero_point) * scale, half_range)
    new_scale = np.float32((high - low) / 255.0)
    quantization.scale = [float(new_scale)]
    quantization.zeroPoint = [int(np.clip(np.round(-128 - low / new_scale), -128, 127))]


def _rescale_constant(model, tensor, factor: float) -> None:
    """Multiply a constant's scales by ``factor`` and requantize its data to them."""
    from ai_edge_litert import schema_py_generated as schema

    buffer = model.buffers[tensor.buffer]
    dtype, low, high = (("<i1", -127, 127) if tensor.type == schema.TensorType.INT8
                        else ("<i4", -2 ** 31, 2 ** 31 - 1))
    values = np.frombuffer(np.asarray(buffer.data, np.uint8).tobytes(), dtype).astype(
        np.float64)
    scaled = values / factor
    rounded = np.clip(np.sign(scaled) * np.floor(np.abs(scaled) + 0.5), low, high)
    buffer.data = np.frombuffer(rounded.astype(dtype).tobytes(), np.uint8).copy()
    tensor.quantization.scale = [float(np.float32(s * factor))
                                 for s in tensor.quantization.scale]


@dataclasses.dataclass(frozen=True)
class ConvertedTensor:
    """One tensor of a converted model: quantization and, for constants, the data."""

    index: int
    name: str
    shape: tuple
    scales: np.ndarray  # float32, one per tensor or per channel; empty if not quantized
    zero_points: np.ndarray  # int64
    data: np.ndarray | None  # constant data (weights, biases, paddings, axes), else None

    @property
    def scale(self) -> float:
        """The per-tensor scale as TFLite stores it (a float32, here as a Python float)."""
        return float(self.scales[0])

    @property
    def zero_point(self) -> int:
        return int(self.zero_points[0])


@dataclasses.dataclass(frozen=True)
class ConvertedOp:
    """One builtin op: its name (``"CONV_2D"``), tensor indices (-1: none) and options
    (the schema's builtin options object, None if the op has none)."""

    index: int
    kind: str
    inputs: tuple
    outputs: tuple
    options: object

    @property
    def activation(self) -> int:
        """The fused activation code (0 none, 1 ReLU, 3 ReLU6), 0 if the op has none."""
        return int(getattr(self.options, "fusedActivationFunction", 0) or 0)


class ConvertedModel:
    """The tensors and ops of a converted flatbuffer (first subgraph), read-only."""

    def __init__(self, data: bytes):
        from ai_edge_litert import schema_py_generated as schema

        self._schema = schema
        self.model = schema.ModelT.InitFromObj(schema.Model.GetRootAs(data, 0))
        self.subgraph = self.model.subgraphs[0]
        names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
        self.ops = []
        for index, op in enumerate(self.subgraph.operators):
            code = self.model.operatorCodes[op.opcodeIndex]
            builtin = max(code.builtinCode, code.deprecatedBuiltinCode)
            self.ops.append(ConvertedOp(index, names.get(builtin, str(builtin)),
                                        tuple(int(t) for t in op.inputs),
                                        tuple(int(t) for t in op.outputs), op.builtinOptions))
        self.inputs = tuple(int(t) for t in self.subgraph.inputs)
        self.outputs = tuple(int(t) for t in self.subgraph.outputs)

    def tensor(self, index: int) -> ConvertedTensor:
        t = self.subgraph.tensors[int(index)]
        q = t.quantization
        scales = np.asarray(q.scale if q is not None and q.scale is not None else [],
                            np.float32)
        zero_points = np.asarray(q.zeroPoint if q is not None and q.zeroPoint is not None
                                 else [0] * len(scales), np.int64)
        shape = tuple(int(d) for d in t.shape) if t.shape is not None else ()
        buffer = self.model.buffers[t.buffer]
        data = None
        if buffer.data is not None and len(buffer.data):
            dtype = {self._schema.TensorType.INT8: "<i1", self._schema.TensorType.INT32: "<i4",
                     self._schema.TensorType.INT64: "<i8",
                     self._schema.TensorType.FLOAT32: "<f4"}[t.type]
            data = np.frombuffer(np.asarray(buffer.data, np.uint8).tobytes(), dtype).reshape(
                shape)
        name = t.name.decode() if isinstance(t.name, bytes) else str(t.name)
        return ConvertedTensor(int(index), name, shape, scales, zero_points, data)

    def consumers(self, tensor: int) -> list:
        """The ops reading ``tensor``, in order."""
        return [op for op in self.ops if tensor in op.inputs]

    def producer(self, tensor: int):
        """The op writing ``tensor``, or None (a graph input or constant)."""
        return next((op for op in self.ops if tensor in op.outputs), None)


def layer_names_in(weight_name: str, names) -> list:
    """The layer ``names`` whose ``/name/`` occurs in tensor name ``weight_name``, without
    those that occur only inside a longer one (layer ``Conv`` in
    ``model/expanded_conv/squeeze_excite/Conv/Conv2D``, MobileNetV3)."""
    path = f"/{weight_name}"
    matches = [name for name in names if f"/{name}/" in path]
    return [name for name in matches
            if not any(other != name and f"/{name}/" in f"/{other}/"
                       and f"/{other}/" in path for other in matches)]
