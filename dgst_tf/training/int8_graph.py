"""The int8 training graph: the exported TFLM training step's algorithm as a Keras model that
`model.fit` trains.

`int8_training_graph` converts a BN-folded float model with the TFLite converter
(`dgst_tf.core.int8_conversion.convert_int8`, the same call `export_int8` and
`export_training` make, so the same model and calibration images give the same parameters)
and rebuilds the Keras graph from the converted model's parameters: every conv / depthwise /
dense layer keeps its name and holds the converter's int8 weights ``W_bar`` (per-output-channel
scale ``s_w``) and int32 biases ``b_bar`` as its trainable values, and every op computes what
TFLM computes (`dgst_tf.training.int8_ops`): integer accumulation, TFLM's fixed-point
requantization and fused-activation clamp per output, int8 ADD and MEAN, int8 logits
dequantized for the loss. The backward pass is the device's: at each weight layer the
gradient of its real output is masked by the 1-bit ReLU mask of its int8 output and
quantized per example to int8 (``max|g| / 127``), the input gradient is computed from that
error signal in the device's float32 order, and the weight and bias gradients from it; ADD
and MEAN pass the real gradient through, Flatten / Reshape reshape it back (the exported
graph's backward RESHAPE). Swish, sigmoid and MobileNetV3's hard-swish
(``Multiply([x, ReLU6(x + 3) / 6])``) are `Int8Activation` tables: forward the output codes
of TFLite's builtin ops, backward ``g * f'(x)`` at the int8 input code, as
``DGST_ACTIVATION_GRAD`` (`dgst_tf.training.int8_activations`); a squeeze-and-excitation
Multiply runs forward only (`Int8Multiply`). Dropout layers disappear (the device has none).

`SparseUpdateModel` and the update schemes apply to it unchanged; with
`QuantizationAwareScalingSGD` the step is the exported graph's ``DGST_SGD_QAS_UPDATE``, and
``graph.loss`` is the device's softmax cross-entropy::

    from dgst_tf.training.int8_graph import int8_training_graph
    from dgst_tf.training.qas import QuantizationAwareScalingSGD

    graph = int8_training_graph(fold_batchnorm(model), calibration_images)
    sparse = SparseUpdateModel(graph.model, scheme, fold_bn=False)
    sparse.compile(optimizer=QuantizationAwareScalingSGD(0.01, graph.qas_scales),
                   loss=graph.loss)

Exactness (batch 1, as on the device). The forward pass is bit-exact with TFLM as long as
every int32 accumulator and bias stays below 2**24 in magnitude (float32 holds those
integers and their partial sums exactly; the accumulators of a calibrated int8 model stay far
below: `max_accumulator` measures it, a larger bias is refused). The backward pass and the
update step are the device's float32 operations in the device's order, so the int8 weights,
int32 biases and kept channels equal the exported graph's step after step; the exceptions
are C library functions: the softmax's ``expf`` (correctly rounded here; glibc's differs
for ~0.07% of arguments, which can change an error-signal code) and an int32 weight
gradient recovered from a float32 one with an error above 0.5 (needs a sum of
``|x - z| * |dy|`` near 2**23 / pixels). With larger batches the error-signal scale is per
example and the update falls back to the QAS float formula.

``Int8TrainingGraph.qas_scales`` are the per-channel scales Quantization-Aware Scaling
(`dgst_tf.training.qas`) divides the gradients by.
"""
import dataclasses

import numpy as np

from dgst_tf.core.classifier import logits_model
from dgst_tf.core.graph import UnsupportedModelError, check_functional, rebuild
from dgst_tf.core.int8_conversion import (DEFAULT_HEAD_LOGIT_RANGE,
                                          DEFAULT_HEAD_WEIGHT_HEADROOM, DEFAULT_NUM_SAMPLES,
                                          ConvertedModel, convert_int8, layer_names_in)
from dgst_tf.core.keras_compat import keras, tf
from dgst_tf.core.layer_kinds import is_depthwise, is_unsupported_conv, kernel_of, kind_of
from dgst_tf.core.multiply_patterns import hard_swish_patterns
from dgst_tf.core.tflite_requantization import (RELU, RELU6, activation_range,
                                                add_multipliers, conv_multipliers,
                                                mean_multiplier, quantize_multiplier)
from dgst_tf.training.int8_activations import (TABLE_ACTIVATIONS, Int8Activation,
                                               derivative_table, find_activations,
                                               forward_table)
from dgst_tf.training.int8_ops import (Dequantize, DeviceSoftmaxCrossEntropy, HoldGradient,
                                       InputQuantizer, Int8Add, Int8Mean, Int8Multiply,
                                       Requantize)
from dgst_tf.training.qas import ExactStep, Int8Scales

__all__ = ["Int8TrainingGraph", "int8_training_graph", "max_accumulator"]

_WEIGHT_OPS = {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"}
# activation function name -> TFLite fused activation code
_ACTIVATION_CODES = {"linear": 0, "relu": RELU, "relu6": RELU6}
_SUPPORTED = ("Conv2D, DepthwiseConv2D, Dense, ReLU / ReLU6 fused into them, swish / "
              "sigmoid / MobileNetV3's hard-swish (Multiply([x, ReLU6(x + 3) / 6])), Add, "
              "ZeroPadding2D, GlobalAveragePooling2D, Flatten / Reshape, Dropout")


@dataclasses.dataclass
class Int8TrainingGraph:
    """The simulated int8 model and what the QAS optimizer and the exporter need."""

    model: keras.Model
    qas_scales: dict  # Int8Scales: variable.ref() -> gradient scale s (QAS multiplies by
    # s^-2), and what the device's exact update step needs
    input_qparams: dict  # conv/dense layer name -> (s_x, zero point)
    weight_scales: dict  # conv/dense layer name -> s_w per output channel
    tflite_model: bytes = b""  # the converter's int8 model whose parameters the graph holds
    op_layers: dict = dataclasses.field(default_factory=dict)  # its op index -> the layer
    # of ``model`` computing that op's output (centered int8 codes)
    loss: object = None  # DeviceSoftmaxCrossEntropy: the device's loss on the int8 logits


def int8_training_graph(model: keras.Model, calibration_images,
                        num_samples: int = DEFAULT_NUM_SAMPLES, *,
                        head_logit_range: float = DEFAULT_HEAD_LOGIT_RANGE,
                        head_weight_headroom: float = DEFAULT_HEAD_WEIGHT_HEADROOM
                        ) -> Int8TrainingGraph:
    """The int8 training graph of a BN-folded float ``model`` (see the module doc), with the
    parameters of its TFLite conversion calibrated on at most ``num_samples`` of
    ``calibration_images`` (anything `convert_int8` takes; the head widened as there). Raises `UnsupportedModelError`
    naming the layer for a layer without a counterpart in the converted model. Example::

        graph = int8_training_graph(fold_batchnorm(model), x_train[:64])
        graph.model(x_train[:1])            # the device's logits, dequantized
        graph.weight_scales["conv_1"]       # s_w per output channel, as in the exported file
    """
    where = "int8_training_graph"
    check_functional(model, where)
    bn = [l.name for l in model.layers if isinstance(l, keras.layers.BatchNormalization)]
    if bn:
        raise ValueError(f"{where}: fold BatchNorm first (dgst_tf.fold_batchnorm); "
                         f"found {bn[:3]}")
    model = logits_model(model)  # the head as export_training converts it (core.classifier)
    unsupported = [l for l in model.layers if is_unsupported_conv(l)]
    if unsupported:
        raise UnsupportedModelError(
            f"{where}: layer {unsupported[0].name!r} ({type(unsupported[0]).__name__}) is not "
            "supported; supported: Conv2D, DepthwiseConv2D, Dense")
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise UnsupportedModelError(f"{where}: model {model.name!r} must have one input and "
                                    f"one output")
    data = convert_int8(model, calibration_images, num_samples=num_samples, where=where,
                        head_logit_range=head_logit_range,
                        head_weight_headroom=head_weight_headroom)
    builder = _GraphBuilder(model, ConvertedModel(data))
    rebuilt = rebuild(model, builder.call_layer, name=f"{model.name}_int8")
    logits = builder.check_complete(rebuilt.outputs[0])
    graph = keras.Model(rebuilt.inputs,
                        Dequantize(logits.scale, name="logits_dequantize")(rebuilt.outputs[0]),
                        name=rebuilt.name)
    return Int8TrainingGraph(graph, Int8Scales(builder.qas_scales, builder.exact_steps),
                             builder.input_qparams, builder.weight_scales, data,
                             builder.op_layers, DeviceSoftmaxCrossEntropy(logits.scale))


def max_accumulator(graph: Int8TrainingGraph, images) -> float:
    """The largest |int32 accumulator| of any conv / dense layer of ``graph`` on ``images``:
    below 2**24 the float32 forward pass is exact (see the module doc).

        assert max_accumulator(graph, x[:8]) < 2 ** 24
    """
    layers = [l for l in graph.model.layers if kind_of(l) is not None]
    probe = keras.Model(graph.model.inputs, [l.output for l in layers])
    outputs = probe(images, training=False)
    outputs = outputs if isinstance(outputs, list) else [outputs]
    return max(float(tf.reduce_max(tf.abs(o))) for o in outputs)


class _GraphBuilder:
    """The `rebuild` callback: each Keras layer call becomes the int8 ops of its converted
    counterpart, found by structure (weights by layer name, the other ops as consumers of
    the tensors already matched)."""

    def __init__(self, model: keras.Model, converted: ConvertedModel):
        self.model, self.converted = model, converted
        self.tensors = {}  # id(Keras tensor) -> (tensor, converted tensor index)
        self.op_layers = {}  # converted op index -> Keras layer name
        self.qas_scales, self.input_qparams, self.weight_scales = {}, {}, {}
        self.exact_steps = {}
        self.weight_ops = self._weight_ops()
        ops = converted.ops
        consumers = {}
        for op in ops:
            for tensor in op.inputs:
                consumers.setdefault(tensor, []).append(op.index)
        self.activations = find_activations([op.kind for op in ops], [op.inputs for op in ops],
                                            [op.outputs for op in ops], consumers,
                                            [op.activation for op in ops])
        self.hard_swish = hard_swish_patterns(model)
        self.hard_swish_helpers = {name for pattern in self.hard_swish.values()
                                   for name in pattern.helpers}

    def _weight_ops(self) -> dict:
        """Keras layer name -> its converted conv / depthwise / fully-connected op."""
        names = [l.name for l in self.model.layers if kind_of(l) is not None]
        found = {}
        for op in self.converted.ops:
            if op.kind not in _WEIGHT_OPS:
                continue
            weight_name = f"/{self.converted.tensor(op.inputs[1]).name}"
            matches = layer_names_in(weight_name[1:], names)
            if len(matches) == 1:
                found[matches[0]] = op
        return found

    # -- tensors ---------------------------------------------------------------------------
    def _index(self, tensor) -> int:
        """The converted tensor a Keras tensor holds the codes of (the image: quantized)."""
        if id(tensor) not in self.tensors:
            layer = tensor._keras_history.layer
            if not isinstance(layer, keras.layers.InputLayer):
                raise UnsupportedModelError(f"int8_training_graph: tensor of layer "
                                            f"{layer.name!r} has no converted counterpart")
            image = self.converted.tensor(self.converted.inputs[0])
            codes = InputQuantizer(image.scale, image.zero_point,
                                   name=f"{layer.name}_quantize")(tensor)
            self.tensors[id(tensor)] = (codes, image.index)
        return self.tensors[id(tensor)][1]

    def _codes(self, tensor):
        self._index(tensor)
        return self.tensors[id(tensor)][0]

    def _bind(self, keras_tensor, index: int, op=None):
        self.tensors[id(keras_tensor)] = (keras_tensor, int(index))
        if op is not None:
            self.op_layers[op.index] = keras_tensor._keras_history.layer.name
        return keras_tensor

    def _consumer(self, layer, index: int, kind: str):
        """The one ``kind`` op reading converted tensor ``index``, for Keras ``layer``."""
        ops = [op for op in self.converted.consumers(index)
               if op.kind == kind and op.index not in self.op_layers]
        if len(ops) != 1:
            kinds = sorted({op.kind for op in self.converted.consumers(index)})
            raise UnsupportedModelError(
                f"int8_training_graph: layer {layer.name!r} ({type(layer).__name__}) has no "
                f"{kind} counterpart in the converted model (ops reading its input: {kinds})")
        return ops[0]

    # -- layers ----------------------------------------------------------------------------
    def call_layer(self, layer, args, kwargs):
        if kind_of(layer) is not None:
            return self._weight_layer(layer, args[0])
        if layer.name in self.hard_swish_helpers:
            return args[0]  # x, unchanged: the Multiply computes the whole hard-swish
        if layer.name in self.hard_swish:
            pattern = self.hard_swish[layer.name]
            return self._table_activation(layer.name, args[0][pattern.x_position],
                                          "hard_swish")
        table_kind = _table_kind(layer)
        if table_kind is not None:
            return self._table_activation(layer.name, args[0], table_kind)
        code = _relu_code(layer)
        if code is not None:
            return self._fused_activation(layer, args[0], code)
        if isinstance(layer, keras.layers.Add):
            return self._add(layer, args[0])
        if isinstance(layer, keras.layers.Multiply):
            return self._multiply(layer, args[0])
        if isinstance(layer, keras.layers.ZeroPadding2D):
            return self._pad(layer, args[0])
        if isinstance(layer, keras.layers.GlobalAveragePooling2D):
            return self._mean(layer, args[0])
        if isinstance(layer, (keras.layers.Flatten, keras.layers.Reshape)):
            return self._reshape(layer, args[0])
        if isinstance(layer, keras.layers.Dropout) or _is_linear_activation(layer):
            return args[0]  # no op on the device
        raise UnsupportedModelError(
            f"int8_training_graph: layer {layer.name!r} ({type(layer).__name__}) is not "
            f"supported; supported: {_SUPPORTED}")

    def _weight_layer(self, layer, x):
        where = f"int8_training_graph: layer {layer.name!r}"
        op = self.weight_ops.get(layer.name)
        if op is None or op.inputs[0] != self._index(x):
            raise UnsupportedModelError(f"{where} ({type(layer).__name__}) has no converted "
                                        f"op reading its input")
        activation_name = getattr(layer.activation, "__name__", "")
        table_kind = TABLE_ACTIVATIONS.get(activation_name)
        own = 0 if table_kind else _ACTIVATION_CODES.get(activation_name)
        if own is None or own not in (0, op.activation):
            raise UnsupportedModelError(f"{where}: activation {layer.activation!r} is not "
                                        f"supported (none, ReLU or ReLU6 fused by the "
                                        f"converter, swish, hard-swish or sigmoid)")
        if op.activation not in (0, RELU, RELU6):
            raise UnsupportedModelError(f"{where}: fused activation {op.activation} is not "
                                        f"supported (none, ReLU or ReLU6)")
        kernel, bias, s_w = self._parameters(layer, op, where)
        source, output = (self.converted.tensor(i) for i in (op.inputs[0], op.outputs[0]))
        new = type(layer).from_config(dict(layer.get_config(), use_bias=True,
                                           activation="linear"))
        codes = self._codes(x)
        accumulator = new(HoldGradient(name=f"{layer.name}_input")(codes))
        new.set_weights([kernel.astype(np.float32), bias.astype(np.float32)])
        multipliers, shifts = conv_multipliers(source.scale, s_w, output.scale)
        requantize = Requantize(multipliers, shifts, output.scale, output.zero_point,
                                activation_range(op.activation, output.scale,
                                                 output.zero_point),
                                op.activation != 0, source.scale, s_w, layer=new,
                                name=f"{layer.name}_rescale")
        y = requantize([accumulator, codes])
        w_shape = kernel.shape[-2:] if is_depthwise(layer) else (kernel.shape[-1],)
        for variable, shape in ((kernel_of(new), w_shape), (new.bias, s_w.shape)):
            self.qas_scales[variable.ref()] = tf.constant(
                (s_w if variable is kernel_of(new) else requantize.accumulator_scales
                 ).reshape(shape), tf.float32)
            self.exact_steps[variable.ref()] = ExactStep(
                requantize.error_scale, source.scale, s_w.reshape(shape),
                requantize.accumulator_scales.reshape(shape))
        self.input_qparams[layer.name] = (source.scale, source.zero_point)
        self.weight_scales[layer.name] = s_w
        y = self._bind(y, op.outputs[0], op)
        if table_kind is not None:
            return self._table_activation(f"{layer.name}_{activation_name}", y, table_kind)
        return y

    def _table_activation(self, name, x, kind):
        """A swish / hard-swish / sigmoid of the codes ``x``: its converted ops' int8
        forward table and derivative table (`dgst_tf.training.int8_activations`)."""
        index = self._index(x)
        pattern = next((p for p in self.activations.values() if p.input == index
                        and p.kind == kind and p.ops[0] not in self.op_layers), None)
        if pattern is None:
            kinds = sorted({op.kind for op in self.converted.consumers(index)})
            raise UnsupportedModelError(
                f"int8_training_graph: layer {name!r} ({kind}) has no converted "
                f"{kind} ops reading its input (ops reading it: {kinds})")
        tensors = [self.converted.tensor(i) for i in (index, *pattern.inner, pattern.output)]
        codes = forward_table(kind, [(t.scale, t.zero_point) for t in tensors])
        y = Int8Activation(codes, derivative_table(kind, tensors[0].scale,
                                                   tensors[0].zero_point),
                           tensors[0].zero_point, tensors[-1].zero_point,
                           name=name)(self._codes(x))
        for op_index in pattern.ops:
            self.op_layers[op_index] = name
        return self._bind(y, pattern.output)

    def _parameters(self, layer, op, where):
        """(Keras-layout int8 kernel, int32 bias, float32 s_w per output channel)."""
        weights = self.converted.tensor(op.inputs[1])
        w = weights.data.astype(np.int32)
        if op.kind == "CONV_2D":
            kernel = w.transpose(1, 2, 3, 0)  # OHWI -> HWIO
        elif op.kind == "DEPTHWISE_CONV_2D":  # [1, kh, kw, C * m] -> [kh, kw, C, m]
            kernel = w[0].reshape(kernel_of(layer).shape)
        else:
            kernel = w.T  # [out, in] -> [in, out]
        if kernel.shape != tuple(kernel_of(layer).shape):
            raise UnsupportedModelError(f"{where}: converted weights {weights.shape} do not "
                                        f"fit kernel {tuple(kernel_of(layer).shape)}")
        channels = int(np.prod(kernel.shape[-2:])) if is_depthwise(layer) else kernel.shape[-1]
        s_w = np.broadcast_to(weights.scales, (channels,)).astype(np.float32)
        has_bias = len(op.inputs) > 2 and op.inputs[2] >= 0
        bias = (self.converted.tensor(op.inputs[2]).data.astype(np.int64) if has_bias
                else np.zeros(channels, np.int64))
        if np.abs(bias).max(initial=0) >= 2 ** 24:
            raise UnsupportedModelError(f"{where}: an int32 bias of {np.abs(bias).max()} is "
                                        f"not exact in float32 (>= 2**24)")
        return kernel, bias, s_w

    def _fused_activation(self, layer, x, code: int):
        """A ReLU / ReLU6 layer: the clamp of the producing op's fused activation."""
        index = self._index(x)
        producer = self.converted.producer(index)
        if producer is None or producer.kind not in _WEIGHT_OPS or producer.activation != code:
            raise UnsupportedModelError(
                f"int8_training_graph: layer {layer.name!r} ({type(layer).__name__}) must "
                f"directly follow a Conv2D / DepthwiseConv2D / Dense whose converted op fuses "
                f"it (the device has no separate int8 ReLU)")
        return x

    def _add(self, layer, inputs):
        if len(inputs) != 2:
            raise UnsupportedModelError(f"int8_training_graph: layer {layer.name!r} adds "
                                        f"{len(inputs)} tensors; only 2 are supported")
        first, second = (self._index(t) for t in inputs)
        op = next((op for op in self.converted.consumers(first) if op.kind == "ADD"
                   and set(op.inputs) == {first, second} and op.index not in self.op_layers),
                  None)
        if op is None or op.activation:
            raise UnsupportedModelError(f"int8_training_graph: layer {layer.name!r} (Add) has "
                                        f"no converted ADD without fused activation")
        if op.inputs[0] != first:
            inputs = inputs[::-1]
        scales = [self.converted.tensor(i).scale for i in (*op.inputs[:2], op.outputs[0])]
        y = Int8Add(add_multipliers(*scales), self.converted.tensor(op.outputs[0]).zero_point,
                    name=layer.name)(
            [self._codes(t) for t in inputs])
        return self._bind(y, op.outputs[0], op)

    def _multiply(self, layer, inputs):
        """A squeeze-and-excitation gate (forward only: `Int8Multiply`)."""
        indices = [self._index(t) for t in inputs] if len(inputs) == 2 else []
        op = next((op for op in self.converted.consumers(indices[0]) if op.kind == "MUL"
                   and sorted(op.inputs[:2]) == sorted(indices)
                   and op.index not in self.op_layers), None) if indices else None
        if op is None or op.activation:
            raise UnsupportedModelError(f"int8_training_graph: layer {layer.name!r} "
                                        f"(Multiply) has no converted MUL of its two inputs "
                                        f"without fused activation")
        if op.inputs[0] != indices[0]:
            inputs = inputs[::-1]
        s1, s2, out = (self.converted.tensor(i) for i in (*op.inputs[:2], op.outputs[0]))
        multiplier, shift = quantize_multiplier(float(np.float32(s1.scale))
                                                * float(np.float32(s2.scale))
                                                / float(np.float32(out.scale)))
        y = Int8Multiply(multiplier, shift, out.zero_point, name=layer.name)(
            [self._codes(t) for t in inputs])
        return self._bind(y, op.outputs[0], op)

    def _pad(self, layer, x):
        op = self._consumer(layer, self._index(x), "PAD")
        source, output = (self.converted.tensor(i) for i in (op.inputs[0], op.outputs[0]))
        paddings = self.converted.tensor(op.inputs[1]).data
        expected = [[0, 0], *[list(p) for p in layer.padding], [0, 0]]
        if (paddings is None or paddings.tolist() != expected or source.scale != output.scale
                or source.zero_point != output.zero_point):
            raise UnsupportedModelError(f"int8_training_graph: layer {layer.name!r}: its PAD "
                                        f"differs in padding or quantization")
        clone = type(layer).from_config(layer.get_config())
        return self._bind(clone(self._codes(x)), op.outputs[0], op)

    def _mean(self, layer, x):
        op = self._consumer(layer, self._index(x), "MEAN")
        axes = self.converted.tensor(op.inputs[1]).data
        source, output = (self.converted.tensor(i) for i in (op.inputs[0], op.outputs[0]))
        if axes is None or sorted(np.ravel(axes).tolist()) != [1, 2] or \
                getattr(layer, "data_format", "channels_last") != "channels_last":
            raise UnsupportedModelError(f"int8_training_graph: layer {layer.name!r}: its MEAN "
                                        f"is not over height and width")
        pixels = int(source.shape[1] * source.shape[2])
        multiplier, shift = mean_multiplier(source.scale, output.scale, pixels)
        y = Int8Mean(multiplier, shift, output.zero_point,
                     keepdims=bool(getattr(layer, "keepdims", False)), name=layer.name)(
            self._codes(x))
        return self._bind(y, op.outputs[0], op)

    def _reshape(self, layer, x):
        """A Flatten / Reshape: the same codes in a new shape, forward and backward (the
        gradient reshaped back, as the exported graph's RESHAPE does). Its converted
        RESHAPE writes the shape, or the converter dropped it (a Flatten of a 1x1 map, read
        by a FULLY_CONNECTED as it is) or merged it into the next RESHAPE: then its output
        stands for the same converted tensor as its input."""
        index = self._index(x)
        clone = type(layer).from_config(layer.get_config())
        y = clone(self._codes(x))
        shape = tuple(y.shape[1:])
        op = next((op for op in self.converted.consumers(index) if op.kind == "RESHAPE"
                   and op.index not in self.op_layers
                   and tuple(self.converted.tensor(op.outputs[0]).shape[1:]) == shape), None)
        if op is None:
            return self._bind(y, index)
        source, output = (self.converted.tensor(i) for i in (index, op.outputs[0]))
        if (source.scale, source.zero_point) != (output.scale, output.zero_point):
            raise UnsupportedModelError(f"int8_training_graph: layer {layer.name!r}: its "
                                        f"RESHAPE changes the quantization")
        return self._bind(y, op.outputs[0], op)

    def check_complete(self, output):
        """The logits tensor; raises unless every converted op has a Keras counterpart and
        the model's output is the converted model's."""
        unused = [f"{op.index} ({op.kind})" for op in self.converted.ops
                  if op.index not in self.op_layers]
        if unused:
            raise UnsupportedModelError(f"int8_training_graph: converted ops {unused} have no "
                                        f"Keras counterpart")
        if self._index(output) != self.converted.outputs[0]:
            raise UnsupportedModelError("int8_training_graph: the model's output is not the "
                                        "converted model's")
        return self.converted.tensor(self.converted.outputs[0])


def _relu_code(layer) -> int | None:
    """The TFLite fused activation a ReLU / ReLU6 layer becomes, None for other layers."""
    if isinstance(layer, keras.layers.ReLU):
        if float(layer.negative_slope) or float(layer.threshold):
            return None
        if layer.max_value is None:
            return RELU
        return RELU6 if float(layer.max_value) == 6.0 else None
    if isinstance(layer, keras.layers.Activation):
        return _ACTIVATION_CODES.get(getattr(layer.activation, "__name__", "")) or None
    return None


def _table_kind(layer) -> str | None:
    """swish / hard_swish / sigmoid for an Activation layer computing one, else None."""
    if not isinstance(layer, keras.layers.Activation):
        return None
    return TABLE_ACTIVATIONS.get(getattr(layer.activation, "__name__", ""))


def _is_linear_activation(layer) -> bool:
    return isinstance(layer, keras.layers.Activation) and \
        _ACTIVATION_CODES.get(getattr(layer.activation, "__name__", "")) == 0
