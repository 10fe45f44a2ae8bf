"""What a model stores and computes once deployed, and what channel removal saves.

Sizes assume the deployed int8 graph (TensorFlow Lite Micro, as in Lin et al. 2022 "On-Device
Training Under 256KB Memory"): BatchNorm folded into the conv before it, int8 weights (1 byte)
and int32 biases (4 bytes; every conv/dense followed by a folded BatchNorm gets one); an
unfolded BatchNorm costs a per-channel int32 scale and shift. The activation peak is the int8
inference peak of `dgst_tf.planning.memory.MemoryModel` at batch 1 (perfect buffer packing).
`flash_bytes` also counts a model with some groups removed without building it.

What a device flashes is more: the training-step ``.tflite`` `export_training` writes holds
the requantization constants, per-channel scales and zero points, the training step's
constants and the flatbuffer's tables and names. `deployable_size` sizes that file from the
Keras graph (with or without removed groups, no export), by part (`DeployableSize`)::

    from dgst_tf.pruning import flash_bytes, footprint, reduction, select_groups
    from dgst_tf.pruning.model_size import deployable_size

    flash_bytes(model), flash_bytes(model, select_groups(model, 0.3))
    reduction(footprint(model), footprint(small))     # {"flash_bytes": 0.55, ...}
    deployable_size(model).total                      # bytes of the training .tflite
"""
from __future__ import annotations

import collections
import dataclasses
import math

import numpy as np

from dgst_tf.core.bn_folding import foldable_pairs, folded_weights
from dgst_tf.core.geometry import channels_for_ratio
from dgst_tf.core.graph import check_functional, nodes_in_order
from dgst_tf.core.keras_compat import keras
from dgst_tf.core.layer_kinds import CONV2D, DENSE, DEPTHWISE, kind_of
from dgst_tf.planning.memory import MemoryModel, MemoryModelError
from dgst_tf.planning.memory_graph import analyse_graph
from dgst_tf.pruning.dependency_graph import DependencyGraph
from dgst_tf.training.scheme import LayerUpdate, SchemeError, UpdateScheme, classifier_layer

__all__ = ["Footprint", "footprint", "flash_bytes", "reduction", "DeployableSize",
           "DeployableSizeModel", "deployable_size", "deployable_bytes"]

L = keras.layers


@dataclasses.dataclass
class Footprint:
    """Sizes of one model (see the module doc for the deployment assumptions).

    ``parameters``: Keras ``count_params`` (BatchNorm statistics included);
    ``deployed_weights`` / ``deployed_biases``: after BN folding; ``flash_bytes``: int8
    weights + int32 biases; ``activation_peak_bytes``: int8 inference peak at batch 1;
    ``macs``: multiply-accumulates per image.
    """

    parameters: int
    deployed_weights: int
    deployed_biases: int
    flash_bytes: int
    activation_peak_bytes: int | None
    macs: int
    input_shape: tuple

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _layer_sizes(layer, folded: set, shape_of) -> tuple[int, int]:
    """(int8 weights, int32 values) a layer stores; ``shape_of(attr)`` gives kept shapes."""
    kind = kind_of(layer)
    if kind is not None:
        k = shape_of(kind.kernel_attr)
        outputs = k[2] * k[3] if kind.depthwise else k[-1]
        biased = layer.use_bias or layer.name in folded
        return math.prod(k), (outputs if biased else 0)
    if isinstance(layer, L.BatchNormalization) and layer.name not in folded:
        return 0, 2 * shape_of("moving_mean")[0]
    return 0, 0


def flash_bytes(model: keras.Model, removed=None, graph: DependencyGraph | None = None
                ) -> int:
    """int8 weights + int32 biases of the BN-folded ``model``, or of the model left after
    removing ``removed`` groups (counted without building it).

        flash_bytes(model), flash_bytes(model, select_groups(model, 0.3))
    """
    weights, biases = _deployed(model, removed, graph)
    return weights + 4 * biases


def _deployed(model, removed=None, graph=None) -> tuple[int, int]:
    check_functional(model, "flash_bytes")
    pairs = foldable_pairs(model)
    folded = set(pairs.values())
    folded_bns = set(pairs)
    keep = None
    if removed is not None:
        graph = graph or DependencyGraph(model)
        keep = graph.keep_vector(removed)
    weights = biases = 0
    for node in nodes_in_order(model):
        layer = node.layer
        if layer.name in folded_bns:
            continue

        def shape_of(attr, layer=layer):
            return _kept_shape(layer, attr, graph, keep)

        w, b = _layer_sizes(layer, folded, shape_of)
        weights += w
        biases += b
    return weights, biases


def _kept_shape(layer, attr: str, graph: DependencyGraph | None, keep) -> list:
    """The shape of weight ``attr`` of ``layer`` once the groups ``keep`` is False for are
    removed (``keep`` None: as it is)."""
    shape = [int(d) for d in getattr(layer, attr).shape]
    if keep is not None:
        for name, axis, groups in graph.weight_axes(layer.name):
            if name == attr:
                shape[axis] = int(keep[groups].sum())
    return shape


def _macs(model: keras.Model) -> int:
    total = 0
    for node in nodes_in_order(model):
        kind = kind_of(node.layer)
        if kind is None:
            continue
        k = [int(d) for d in kind.kernel(node.layer).shape]
        per_output = k[0] * k[1] if kind.depthwise else math.prod(k[:-1])
        total += int(np.prod(node.outputs.shape[1:])) * per_output
    return total


def footprint(model: keras.Model, input_shape=None) -> Footprint:
    """`Footprint` of ``model`` (``input_shape`` (H, W, C) if the model's is not fixed).

        fp = footprint(small); fp.flash_bytes, fp.activation_peak_bytes
    """
    weights, biases = _deployed(model)
    peak = None
    shape = tuple(input_shape or model.inputs[0].shape[1:])
    try:
        memory = MemoryModel(model, input_shape)
        peak = int(memory.report(UpdateScheme({}), dense=False).forward_peak_bytes)
        shape = memory.input_shape
    except (MemoryModelError, SchemeError):
        pass  # e.g. no Dense classifier: no activation figure
    return Footprint(parameters=int(model.count_params()), deployed_weights=int(weights),
                     deployed_biases=int(biases), flash_bytes=int(weights + 4 * biases),
                     activation_peak_bytes=peak, macs=_macs(model), input_shape=tuple(shape))


def reduction(before: Footprint, after: Footprint) -> dict[str, float]:
    """Fraction saved per figure: ``{"flash_bytes": 0.55, ...}`` (0 = nothing saved).

        reduction(footprint(model), footprint(small))["flash_bytes"]
    """
    result = {}
    for key in ("parameters", "deployed_weights", "flash_bytes", "activation_peak_bytes",
                "macs"):
        a, b = getattr(before, key), getattr(after, key)
        if a and b is not None:
            result[key] = 1.0 - b / a
    return result


# ============================================================ the deployable training file
# What `dgst_tf.export.training.export_training` writes (the file a device flashes; the JSON
# manifest beside it is not flashed), tensor by tensor and op by op, from the Keras graph.
# The exporter's defaults are mirrored: frozen conv -> depthwise -> 1x1 chains in front of the
# first trained layer fused (`dgst_tf.core.block_fusion_rule`), explicit paddings folded into
# SAME kernels with zero taps (not in front of weight-updated layers), every int8 convolution
# a ``DGST_CONV2D`` with its requantization constant (int32 [2, C_out]), per-channel float32
# scales and int64 zero points of weights and biases in the flatbuffer, each trainable tensor
# a variable initialised from a constant that takes over its data (buffers nothing reads are
# dropped), and the backward pass's constants (kept channel indices, kept-slice weight
# copies, weight scales). Tensor names follow the converter's; flatbuffer tables cost what
# the Python ``flatbuffers`` builder writes.
_EXPORT_OPTIONS = {"fold_pads": True, "fuse_blocks": True, "requant_in_flash": True,
                   "kept_weights_in_ram": True, "rounding": "stochastic", "policy": None,
                   "layers_per_step": None}
# export_training options that do not change the file's size
_SIZE_NEUTRAL_OPTIONS = {"learning_rate", "selection", "num_samples", "output_params", "seed",
                         "head_logit_range", "head_weight_headroom"}
# flatbuffer bytes (Python flatbuffers builder; vtables are shared, vectors 4-byte aligned)
_TENSOR_TABLE = 20          # table, its slot in the tensor list, the shape vector's length
_TYPE_FIELD = 4             # a tensor type other than float32
_BUFFER = 16                # a buffer with data: slot, table, data vector length
_BUFFER_FIELD = 4           # a tensor's buffer index (0, no data, is left out)
_EMPTY_BUFFER = 8           # the converter gives each activation an empty buffer of its own
_QUANTIZATION_TABLE = 28    # its table and the scale and zero-point vector lengths
_PER_CHANNEL = 4 + 8        # float32 scale + int64 zero point
_QUANTIZED_DIMENSION = 4    # a per-channel axis other than 0 (depthwise kernels)
_OPERATOR = 29              # table, slot, input and output vector lengths
_CUSTOM_OPTIONS = 8         # the options vector's field and length
_BUILTIN_OPTIONS = 12       # a builtin op's options table
_OPERATOR_CODE = 60
# the file's own tables: model, subgraph, description, the converter's two metadata entries
# (min_runtime_version: 16 bytes, CONVERSION_METADATA: 96 bytes) and their names
_FIXED = 360
_CONVERTER_CONSTANT = "arith.constant00"  # what the converter names a zero bias


def _padded(n: int) -> int:
    return -(-int(n) // 4) * 4


def _string(text: str) -> int:
    return 4 + _padded(len(text) + 1)


@dataclasses.dataclass(frozen=True)
class DeployableSize:
    """Bytes of the training-step ``.tflite`` `export_training` writes, by what they hold.

    ``weights``: int8 kernels, once (PAD-folded ones with their zero taps); ``biases``:
    int32 biases; ``requantization``: the int32 multipliers and shifts of ``DGST_CONV2D``
    and ``DGST_FUSED_BLOCK`` (8 bytes per output channel); ``training``: the constants only
    the training step reads (kept-slice weight copies, kept channel indices, the backward
    pass's weight scales); ``quantization``: per-channel float32 scales and int64 zero
    points in the flatbuffer; ``structure``: tables, tensor names, shapes and op lists.
    Everything but ``training`` (and a few tables) is there whichever layers train.

        size = deployable_size(model); size.total, size.training
    """

    weights: int
    biases: int
    requantization: int
    training: int
    quantization: int
    structure: int

    @property
    def total(self) -> int:
        """The file's bytes."""
        return (self.weights + self.biases + self.requantization + self.training
                + self.quantization + self.structure)

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "total": self.total}


class _FileSketch:
    """Bytes of a flatbuffer being sketched: tensors, ops and loose buffers, by part."""

    def __init__(self):
        self.parts = dict.fromkeys(("weights", "biases", "requantization", "training",
                                    "quantization", "structure"), 0)
        self.codes: set = set()

    def tensor(self, name: str, dims: int, *, typed: bool = True, data: int = 0,
               part: str = "training", quant: int = 0, channel_axis: bool = False,
               own_buffer: bool = False) -> str:
        """A tensor of ``dims`` dimensions; ``data`` constant bytes go to ``part``;
        ``quant`` per-channel scales; ``own_buffer``: an empty buffer of its own."""
        self.parts["structure"] += (_TENSOR_TABLE + 4 * dims + _string(name)
                                    + _TYPE_FIELD * typed)
        if data:
            self.buffer(data, part)
            self.parts["structure"] += _BUFFER_FIELD
        elif own_buffer:
            self.parts["structure"] += _EMPTY_BUFFER + _BUFFER_FIELD
        if quant:
            self.parts["quantization"] += (_QUANTIZATION_TABLE + _PER_CHANNEL * quant
                                           + _QUANTIZED_DIMENSION * channel_axis)
        return name

    def buffer(self, data: int, part: str) -> None:
        """A buffer of ``data`` bytes."""
        self.parts[part] += _padded(data)
        self.parts["structure"] += _BUFFER

    def drop_buffer(self, data: int, part: str) -> None:
        """A tensor's buffer the exporter drops (nothing reads the tensor)."""
        self.parts[part] -= _padded(data)
        self.parts["structure"] -= _BUFFER + _BUFFER_FIELD

    def op(self, code: str, inputs: int, outputs: int, options: int | None = None) -> None:
        """An op; ``options``: custom option bytes (None: a builtin op's options table,
        -1: none at all)."""
        self.codes.add(code)
        self.parts["structure"] += self._op_bytes(inputs, outputs, options)

    def drop_op(self, inputs: int, outputs: int, options: int | None = None) -> None:
        """An op taken out again (its operator code stays in the file)."""
        self.parts["structure"] -= self._op_bytes(inputs, outputs, options)

    @staticmethod
    def _op_bytes(inputs: int, outputs: int, options: int | None) -> int:
        extra = (_BUILTIN_OPTIONS if options is None else 0 if options < 0
                 else _CUSTOM_OPTIONS + _padded(options))
        return _OPERATOR + 4 * (inputs + outputs) + extra

    def size(self) -> DeployableSize:
        codes = sum(_OPERATOR_CODE + (_string(c) if c.startswith("DGST_") else 0)
                    for c in self.codes)
        parts = dict(self.parts, structure=self.parts["structure"] + codes + _FIXED)
        return DeployableSize(**{k: int(v) for k, v in parts.items()})


@dataclasses.dataclass
class _Layer:
    """One conv / depthwise / dense op of the file: names, kernel, channels, training."""

    step: object
    kind: str                 # "conv", "depthwise", "dense"
    kernel: tuple             # kept kernel as the file holds it (PAD-folded taps included)
    inputs: int               # kept input channels (depthwise: its channels)
    outputs: int              # kept output channels
    weights: str = ""         # tensor names
    bias: str | None = None
    output: str = ""
    update: object = None     # LayerUpdate, or None when frozen
    kept: int = 0             # input channels whose weights train
    pad_op: bool = False      # an explicit padding that stays a PAD op
    compact: bool = False     # kept weights in RAM: a kept-slice copy in flash
    dynamic: bool = False     # kept channels chosen on device
    scheduled: bool = False   # under a layers_per_step schedule

    @property
    def kernel_bytes(self) -> int:
        return int(math.prod(self.kernel))

    @property
    def scales(self) -> int:
        """Per-channel scales of the kernel (output channels; depthwise: its channels)."""
        return self.outputs

    @property
    def slice_bytes(self) -> int:
        """The int8 weights of the kept input channels."""
        return self.kernel_bytes // max(self.inputs, 1) * self.kept


class _Gradients:
    """The exporter's gradient bookkeeping on the way back (`backward.GradientFlow`): which
    value has a gradient tensor, how many ops will still read it, the pooled ones."""

    def __init__(self, sketch: _FileSketch, logits: int, logits_grad: str):
        self.sketch = sketch
        self.of = {logits: logits_grad}
        self.readers = collections.Counter({logits_grad: 1})
        self.pooled: dict = {}  # pooled gradient -> bytes of its inverse-area constant

    def give(self, value: int, gradient: str, name: str, dims: int) -> None:
        if value in self.of:  # gradients meeting at a fork: summed by a builtin ADD
            total = self.sketch.tensor(f"{name}/grad_sum", dims, typed=False)
            self.sketch.op("ADD", 2, 1)
            self.readers[self.of[value]] -= 1
            gradient = total
        self.of[value] = gradient
        self.readers[gradient] += 1

    def take(self, value: int) -> str | None:
        gradient = self.of.pop(value, None)
        if gradient is not None:
            self.readers[gradient] -= 1
        return gradient


_CONVERTER_OPS = {"conv": "Conv2D", "depthwise": "depthwise", "dense": "MatMul"}
_GRADIENT_OPS = {"conv": "DGST_CONV2D_INPUT_GRAD", "depthwise": "DGST_DEPTHWISE_INPUT_GRAD",
                 "dense": "DGST_CONV2D_INPUT_GRAD"}
_WEIGHT_GRADIENT_OPS = {"conv": "DGST_CONV2D_WEIGHT_GRAD", "dense": "DGST_CONV2D_WEIGHT_GRAD",
                        "depthwise": "DGST_DEPTHWISE_WEIGHT_GRAD"}
_SELECTION_STATE = {"traversal": "selection_visited", "window": "selection_step"}


class DeployableSizeModel:
    """The training-step ``.tflite`` of ``model`` (or of it with channel groups removed),
    sized without exporting: the graph and the names are analysed once, `size` is fast.

    ``scheme``: the `UpdateScheme` (None: only the classifier trains, the part every scheme
    shares); ``name``: the name the exported model will have (a pruned model built by
    `prune_while_training` is ``<name>_pruned``); ``fine_tuned``: count every bias as
    non-zero, as it will be after fine-tuning (else as the weights are: the converter names
    all-zero biases, e.g. of an untrained BatchNorm, shorter and shares their buffers);
    ``options``: `export_training`'s
    (``fold_pads``, ``fuse_blocks``, ``requant_in_flash``, ``kept_weights_in_ram``,
    ``rounding``, ``policy``, ``layers_per_step``; the others do not change the size).

        sizer = DeployableSizeModel(model)
        sizer.size().total, sizer.size(select_groups(model, 0.3)).total
    """

    def __init__(self, model: keras.Model, scheme=None, graph: DependencyGraph | None = None,
                 input_shape=None, name: str | None = None, fine_tuned: bool = False,
                 **options):
        check_functional(model, "DeployableSizeModel")
        self.model, self.graph = model, graph
        self.scheme = scheme if scheme is not None else UpdateScheme({})
        self.options = _export_options(options)
        self.memory = analyse_graph(model, _fixed_input_shape(model, input_shape))
        self.classifier = classifier_layer(model).name
        batchnorm = any(isinstance(layer, L.BatchNormalization) for layer in model.layers)
        self.prefix = f"{name or model.name}{'_folded' if batchnorm else ''}"
        self.nonzero_bias = ({layer.name for layer in model.layers if kind_of(layer)}
                             if fine_tuned else _nonzero_biases(model))

    def size(self, removed=None) -> DeployableSize:
        """`DeployableSize` of the file, with the ``removed`` groups gone (None: none)."""
        keep = None
        if removed is not None:
            self.graph = self.graph or DependencyGraph(self.model)
            keep = self.graph.keep_vector(removed)
        return _TrainingFile(self, keep).size()


def _export_options(options: dict) -> dict:
    unknown = set(options) - set(_EXPORT_OPTIONS) - _SIZE_NEUTRAL_OPTIONS
    if unknown:
        raise TypeError(f"deployable size: unknown export_training options {sorted(unknown)}")
    chosen = {**_EXPORT_OPTIONS, **{k: v for k, v in options.items() if k in _EXPORT_OPTIONS}}
    # a selection callback (DynamicChannelSelection) stands for its on-device policy
    chosen["policy"] = getattr(chosen["policy"], "device_policy", chosen["policy"])
    if chosen["rounding"] not in ("stochastic", "nearest"):
        raise ValueError(f"rounding must be 'stochastic' or 'nearest', got "
                         f"{chosen['rounding']!r}")
    if chosen["policy"] not in (None, "traversal", "magnitude", "window"):
        raise ValueError(f"policy must be None, 'traversal', 'magnitude' or 'window', got "
                         f"{chosen['policy']!r}")
    return chosen


def _fixed_input_shape(model, input_shape) -> tuple:
    shape = tuple(input_shape or model.inputs[0].shape[1:])
    if any(d is None for d in shape):
        raise ValueError(f"model {model.name!r} has input shape {shape}: give input_shape "
                         f"(H, W, C)")
    return tuple(int(d) for d in shape)


def _nonzero_biases(model) -> set:
    """Layers whose BN-folded bias is not all zero (the converter names the others'
    biases ``arith.constant``)."""
    bn_of = {conv: model.get_layer(bn) for bn, conv in foldable_pairs(model).items()}
    nonzero = set()
    for layer in model.layers:
        if kind_of(layer) is None:
            continue
        if layer.name in bn_of:
            bias = folded_weights(layer, bn_of[layer.name])[1]
        else:
            bias = layer.get_weights()[1] if layer.use_bias else np.zeros(1)
        if np.any(bias):
            nonzero.add(layer.name)
    return nonzero


class _TrainingFile:
    """One sketch of the file: the forward graph as converted and simplified, the trainable
    variables, what the forward pass keeps, the backward pass and the updates."""

    def __init__(self, sizer: DeployableSizeModel, keep):
        self.sizer, self.keep, self.options = sizer, keep, sizer.options
        self.memory = sizer.memory
        self.sketch = _FileSketch()
        self.names: dict = {}       # value index -> tensor name
        self.layers: dict = {}      # step index -> _Layer
        self.zero_biases = collections.Counter()  # all-zero bias bytes -> tensors sharing it
        self.trained = self._trained_steps()
        self.first = min(self.trained)

    # ------------------------------------------------------------------ the whole file
    def size(self) -> DeployableSize:
        self._forward()
        self._variables()
        needs = self._needs_gradient()
        self._forward_records(needs)
        self._backward(needs)
        outputs = 2 + 2 * len(self.trained) + sum(layer.dynamic for layer in self.layers.values())
        self.sketch.parts["structure"] += 4 * (outputs + 2)  # graph outputs and inputs
        return self.sketch.size()

    def _trained_steps(self) -> dict:
        """{step index: LayerUpdate} of the layers the step trains (the classifier in full)."""
        updates = {}
        for step in self.memory.steps:
            name = step.layer.name
            update = (LayerUpdate("weights", 1.0) if name == self.sizer.classifier
                      else self.sizer.scheme.update_for(name))
            if kind_of(step.layer) is not None and update.mode != "frozen":
                updates[step.index] = update
        return updates

    # ------------------------------------------------------------------ forward graph
    def _forward(self) -> None:
        image = self.sizer.model.input_names[0]
        self.names[0] = self.sketch.tensor(f"serving_default_{image}:0", 4, quant=1,
                                           own_buffer=True)
        chains = {}
        if self.options["fuse_blocks"]:
            chains = {chain[0].index: chain for chain in self.memory.fusable_chains(
                self.first, fold_pads=self.options["fold_pads"])}
        fused = {step.index for chain in chains.values() for step in chain[1:]}
        for step in self.memory.steps:
            if step.index in chains:
                self._fused_block(chains[step.index])
            elif step.index not in fused:
                self._op(step)

    def _op(self, step) -> None:
        if kind_of(step.layer) is not None:
            self._weighted(step)
        elif isinstance(step.layer, L.Add):
            self._activation(step, f"{self.sizer.prefix}/{step.layer.name}/add")
            self.sketch.op("ADD", 2, 1)
        elif isinstance(step.layer, L.GlobalAveragePooling2D):
            mean = f"{self.sizer.prefix}/{step.layer.name}/Mean"
            self.sketch.tensor(f"{mean}/reduction_indices", 1, data=8, part="structure")
            self._activation(step, mean)
            self.sketch.op("MEAN", 2, 1)
        else:  # an op the training MobileNets lack: its output and a builtin op
            name = f"{self.sizer.prefix}/{step.layer.name}/{type(step.layer).__name__}"
            self._activation(step, name)
            self.sketch.op(type(step.layer).__name__, len(step.inputs), 1)

    def _activation(self, step, name: str) -> None:
        """The int8 output tensor of ``step`` (the model output has the converter's name)."""
        output = step.output
        if output in self.memory.output_values:
            name = "StatefulPartitionedCall:0"
        self.names[output] = self.sketch.tensor(name, self._dims(output), quant=1,
                                                own_buffer=True)

    def _dims(self, value: int) -> int:
        return 1 + len(self.memory.values[value].shape)

    def _layer(self, step) -> _Layer:
        """The kept kernel and channels of a weighted step, and its converter names."""
        layer, kind = step.layer, _KIND_NAMES[kind_of(step.layer)]
        shape = _kept_shape(layer, kind_of(layer).kernel_attr, self.sizer.graph, self.keep)
        update = self.trained.get(step.index)
        folded = None
        if self.options["fold_pads"] and not (update and update.updates_weights):
            folded = self.memory.folded_kernel(step)
        padded = step.explicit_padding != ((0, 0), (0, 0))
        if kind == "dense":
            kernel, inputs, outputs = (shape[1], shape[0]), shape[0], shape[1]
        else:
            kh, kw = folded or shape[:2]
            outputs = shape[2] * shape[3] if kind == "depthwise" else shape[3]
            kernel, inputs = (kh, kw, shape[2], shape[3]), shape[2]
        record = _Layer(step, kind, kernel, inputs, outputs, update=update,
                        pad_op=padded and folded is None)
        record.weights, record.output, record.bias = self._converter_names(step, kind)
        if update is not None and update.updates_weights:
            self._choose_kept(record)
        self.layers[step.index] = record
        return record

    def _converter_names(self, step, kind: str) -> tuple:
        """(weights, output, bias) tensor names the TFLite converter gives a weighted op."""
        prefix, name = self.sizer.prefix, step.layer.name
        op = f"{prefix}/{name}/{_CONVERTER_OPS[kind]}"
        if kind == "dense":
            bias = (f"{prefix}/{name}/BiasAdd/ReadVariableOp"
                    if name in self.sizer.nonzero_bias else None)
            return f"{op}1", f"{prefix}/{name}/BiasAdd", bias
        activations = [layer for layer in step.fused if _activation_op(layer)]
        parts = [f"{prefix}/{layer.name}/{_activation_op(layer)}" for layer in activations[-1:]]
        nonzero = name in self.sizer.nonzero_bias
        if nonzero:
            parts += [f"{prefix}/{name}/BiasAdd", op, f"{prefix}/{name}/BiasAdd/ReadVariableOp"]
        else:
            parts.append(op)
        joined = ";".join(parts)
        clash = nonzero or not activations  # the weights or the bias have that name
        return op, joined + ("1" if clash else ""), joined if nonzero else _CONVERTER_CONSTANT

    def _choose_kept(self, record: _Layer) -> None:
        update, name = record.update, record.step.layer.name
        if name == self.sizer.classifier:
            record.kept = record.inputs
            return
        record.kept = min(record.inputs, update.channels if update.channels is not None
                          else channels_for_ratio(update.ratio, record.inputs))
        if record.kept < record.inputs:
            record.dynamic = self.options["policy"] is not None
            record.compact = (self.options["kept_weights_in_ram"] and not record.dynamic
                              and record.kind != "dense")

    def _kernel_tensor(self, record: _Layer) -> None:
        self.sketch.tensor(record.weights, len(record.kernel), data=record.kernel_bytes,
                           part="weights", quant=record.scales,
                           channel_axis=record.kind == "depthwise")

    def _weighted(self, step) -> None:
        """A conv as ``DGST_CONV2D`` (requantization constant), or a builtin op; a padding
        that is not folded stays a PAD op."""
        record = self._layer(step)
        if record.pad_op:
            pad = f"{self.sizer.prefix}/{self._padding_layer(step)}/Pad"
            self.sketch.tensor(f"{pad}/paddings", 2, data=32, part="structure")
            self.sketch.tensor(pad, 4, quant=1, own_buffer=True)
            self.sketch.op("PAD", 2, 1)
        self._kernel_tensor(record)
        if record.bias is not None:
            self._bias_tensor(record)
        self._activation(step, record.output)
        record.output = self.names[step.output]
        if record.kind != "dense" and self._flash_requant(step):
            self.sketch.tensor(f"{record.output}/requant", 2, data=8 * record.outputs,
                               part="requantization")
            self.sketch.op("DGST_CONV2D", 4, 1, 48)
        else:
            self.sketch.op(record.kind, 2 + (record.bias is not None), 1)

    def _bias_tensor(self, record: _Layer) -> None:
        """The int32 bias; the converter stores equal all-zero biases in one buffer."""
        data = 4 * record.outputs
        zero = record.bias == _CONVERTER_CONSTANT
        shared = zero and self.zero_biases[data] > 0
        self.sketch.tensor(record.bias, 1, data=0 if shared else data, part="biases",
                           quant=record.outputs)
        if shared:
            self.sketch.parts["structure"] += _BUFFER_FIELD
        if zero:
            self.zero_biases[data] += 1

    def _padding_layer(self, step) -> str:
        """The name of the ZeroPadding2D in front of ``step`` (the memory graph folds it
        into the op that produced its input)."""
        producer = self.memory.values[step.inputs[0]].producer
        fused = self.memory.steps[producer].fused if producer >= 0 else []
        pads = [layer.name for layer in fused if isinstance(layer, L.ZeroPadding2D)]
        return pads[-1] if pads else "pad"

    def _flash_requant(self, step) -> bool:
        layer = step.layer
        return (self.options["requant_in_flash"] and tuple(layer.dilation_rate) == (1, 1)
                and int(getattr(layer, "depth_multiplier", 1)) == 1
                and step.activation() in ("none", "relu", "relu6"))

    def _fused_block(self, chain) -> None:
        """``DGST_FUSED_BLOCK``: three kernels and their [bias, multiplier, shift] rows."""
        records = [self._layer(step) for step in chain]
        self._activation(chain[-1], records[-1].output)
        output = self.names[chain[-1].output]
        for record, stage in zip(records, ("conv", "dw", "project")):
            self._kernel_tensor(record)
            self.sketch.tensor(f"{output}/fused_{stage}/requant", 2, part="requantization",
                               data=12 * record.outputs)
            self.sketch.parts["requantization"] -= 4 * record.outputs
            self.sketch.parts["biases"] += 4 * record.outputs
        self.sketch.op("DGST_FUSED_BLOCK", 7, 1, 84)

    # ------------------------------------------------------------------ training
    def _variables(self) -> None:
        """Each trained bias and weight tensor becomes a variable initialised by
        ``DGST_VARIABLE_INIT`` from a constant holding its data (the constant's buffer moves
        to it: the exporter drops the buffers nothing uses any more)."""
        for index in sorted(self.trained):
            record = self.layers[index]
            if record.bias is None:  # the converter dropped an all-zero dense bias
                record.bias = self.sketch.tensor(f"{record.step.layer.name}/bias", 1,
                                                 data=4 * record.outputs, part="biases",
                                                 quant=record.outputs)
            elif record.bias == _CONVERTER_CONSTANT:  # a buffer other zero biases share
                self.zero_biases[4 * record.outputs] -= 1
                if self.zero_biases[4 * record.outputs] > 0:
                    self.sketch.buffer(4 * record.outputs, "training")  # its own copy
            self._variable(record.bias, 1, record.outputs)
            if record.kept and record.compact:
                name = self.sketch.tensor(f"{record.step.layer.name}/kept_weights",
                                          len(record.kernel), data=record.slice_bytes,
                                          quant=self._slice_scales(record),
                                          channel_axis=record.kind == "depthwise")
                self._variable(name, len(record.kernel), self._slice_scales(record),
                               record.kind == "depthwise")
            elif record.kept:
                self._variable(record.weights, len(record.kernel), record.scales,
                               record.kind == "depthwise")

    def _variable(self, name: str, dims: int, quant: int, axis=False) -> None:
        """The constant ``name`` becomes a variable and ``<name>/initial`` holds its data
        (its buffer index moves along)."""
        self.sketch.tensor(f"{name}/initial", dims, quant=quant, channel_axis=axis)
        self.sketch.op("DGST_VARIABLE_INIT", 2, 0, -1)

    @staticmethod
    def _slice_scales(record: _Layer) -> int:
        return record.kept if record.kind == "depthwise" else record.outputs

    def _needs_gradient(self) -> set:
        """Values that depend on a trained parameter (their gradient is computed)."""
        needs = set()
        for step in self.memory.steps[self.first:]:
            if step.index in self.trained or needs.intersection(step.inputs):
                needs.add(step.output)
        return needs

    def _forward_records(self, needs: set) -> None:
        """1-bit ReLU masks on the gradient path; for weight-updated layers the kept channel
        indices, the full kernel assembled before the conv, the kept input channels."""
        schedule = self._schedule()
        for index, record in sorted(self.layers.items()):
            if index < self.first or record.step.output not in needs:
                continue
            name = record.step.layer.name
            if record.step.activation() != "none":
                self.sketch.tensor(f"{name}/relu_mask", 1)
                self.sketch.op("DGST_RELU_MASK", 1, 1, 12)
            if not record.kept:
                continue
            record.scheduled = name in schedule
            self.sketch.tensor(f"{name}/kept", 1, data=0 if record.dynamic else 4 * record.kept)
            if record.dynamic:
                self._selection(record)
            if record.compact:
                self._merged_kernel(record, "forward")
            if record.kept < record.inputs:
                self.sketch.tensor(f"{name}/input_kept", 4, quant=1)
                self.sketch.op("DGST_GATHER_CHANNELS", 2, 1, -1)

    def _schedule(self) -> set:
        """Weight-updated layers (classifier excluded) that a ``layers_per_step`` schedule
        leaves out at some steps."""
        per_step = self.options["layers_per_step"]
        names = [record.step.layer.name for index, record in sorted(self.layers.items())
                 if record.kept and record.step.layer.name != self.sizer.classifier]
        return set(names) if per_step is not None and per_step < len(names) else set()

    def _selection(self, record: _Layer) -> None:
        """``DGST_SELECT_CHANNELS``: integer importance multipliers and the policy's state."""
        name, policy = record.step.layer.name, self.options["policy"]
        self.sketch.tensor(f"{name}/selection_multipliers", 1, data=4 * record.scales)
        if policy in _SELECTION_STATE:
            self.sketch.tensor(f"{name}/{_SELECTION_STATE[policy]}", 1)
        scheduled = record.scheduled and policy == "traversal"
        self.sketch.op("DGST_SELECT_CHANNELS", 3 + scheduled, 1, 12 + 12 * scheduled)

    def _merged_kernel(self, record: _Layer, when: str) -> None:
        self.sketch.tensor(f"{record.step.layer.name}/weights_{when}", 4, quant=record.scales,
                           channel_axis=record.kind == "depthwise")
        self.sketch.op("DGST_SCATTER_CHANNELS", 3, 1, -1)

    def _backward(self, needs: set) -> None:
        """The loss gradient, then back to the first trained layer: error signals, input
        gradients, parameter gradients and SGD updates."""
        sketch = self.sketch
        sketch.tensor("label", 1)
        sketch.tensor("loss", 1, typed=False)
        logits = self.memory.output_values[0]
        gradients = _Gradients(sketch, logits, sketch.tensor("logits/grad", 2, typed=False))
        sketch.op("DGST_SOFTMAX_XENT_GRAD", 2, 2, 12)
        self._step_counter = False
        for step in reversed(self.memory.steps[self.first:]):
            gradient = gradients.take(step.output)
            if gradient is None:
                continue
            if step.index in self.layers:
                self._layer_gradients(self.layers[step.index], gradient, gradients, needs)
            elif isinstance(step.layer, L.GlobalAveragePooling2D):
                self._pooling_gradient(step, gradient, gradients, needs)
            elif isinstance(step.layer, (L.Flatten, L.Reshape)):
                self._reshape_gradient(step, gradients, needs)
            else:  # ADD (and what the exporter refuses): the gradient passes to the inputs
                for value in step.inputs:
                    if value in needs:
                        gradients.give(value, gradient, self.names[value], self._dims(value))
        if self._step_counter:
            sketch.tensor("sgd/step", 1)

    def _reshape_gradient(self, step, gradients: _Gradients, needs: set) -> None:
        """A Flatten / Reshape: a builtin RESHAPE of the gradient to the input's shape."""
        source = step.inputs[0]
        if source not in needs:
            return
        name, dims = self.names[source], self._dims(source)
        grad = self.sketch.tensor(f"{name}/grad", dims, typed=False)
        self.sketch.tensor(f"{name}/grad_shape", 1, data=4 * dims, part="structure")
        self.sketch.op("RESHAPE", 2, 1)
        gradients.give(source, grad, name, dims)

    def _pooling_gradient(self, step, gradient, gradients: _Gradients, needs: set) -> None:
        pooled = step.inputs[0]
        if pooled not in needs:
            return
        height, width = self.memory.values[pooled].shape[:2]
        self.sketch.tensor(f"{self.names[step.output]}/inverse_area", 4, typed=False,
                           data=4 * height * width)
        grad = self.sketch.tensor(f"{self.names[pooled]}/grad", self._dims(pooled), typed=False)
        self.sketch.op("MUL", 2, 1)
        gradients.pooled[grad] = 4 * height * width
        gradients.give(pooled, grad, self.names[pooled], self._dims(pooled))

    def _layer_gradients(self, record: _Layer, gradient, gradients: _Gradients,
                         needs: set) -> None:
        step, name = record.step, record.step.layer.name
        self._error_signal(record, gradient, gradients)
        self.sketch.tensor(f"{name}/weight_scale", 1, typed=False, data=4 * record.scales)
        source = step.inputs[0]
        if source in needs:
            if record.compact:
                self._merged_kernel(record, "backward")
            grad = self.sketch.tensor(f"{self.names[source]}/grad", self._dims(source),
                                      typed=False)
            self.sketch.op(_GRADIENT_OPS[record.kind], 4, 1, 28)
            gradients.give(source, grad, self.names[source], self._dims(source))
        if record.update is not None:
            self._parameter_updates(record)

    def _error_signal(self, record: _Layer, gradient, gradients: _Gradients) -> None:
        """``DGST_QUANTIZE_GRAD``: the int8 error signal (straight from a pooled gradient, or
        from a copy when a masked gradient is still read elsewhere)."""
        name = record.step.layer.name
        self.sketch.tensor(f"{name}/dy", self._dims(record.step.output))
        self.sketch.tensor(f"{name}/dy_scale", 1, typed=False)
        masked = record.step.activation() != "none"
        if gradient in gradients.pooled and gradients.readers[gradient] == 0:
            # the MUL goes: quantized straight from the pooled gradient; its inverse-area
            # constant, read by nothing, loses its buffer
            self.sketch.drop_op(2, 1)
            self.sketch.drop_buffer(gradients.pooled[gradient], "training")
            self.sketch.tensor(f"{name}/pool_factor", 1, typed=False, data=4)
            self.sketch.op("DGST_QUANTIZE_GRAD", 3, 2, -1)
            return
        if masked and gradients.readers[gradient] > 0:
            output, dims = self.names[record.step.output], self._dims(record.step.output)
            self.sketch.tensor(f"{output}/grad_copy", dims, typed=False)
            self.sketch.tensor(f"{output}/grad_shape", 1, data=4 * dims, part="structure")
            self.sketch.op("RESHAPE", 2, 1)
        self.sketch.op("DGST_QUANTIZE_GRAD", 2, 2, -1)

    def _parameter_updates(self, record: _Layer) -> None:
        """Bias gradient and update; kept-channel weight gradient and update."""
        name, sketch = record.step.layer.name, self.sketch
        sketch.tensor(f"{name}/bias_grad", 1)
        sketch.op("DGST_BIAS_GRAD", 1, 1, -1)
        sketch.op("DGST_SGD_QAS_UPDATE", 5, 0, 16)
        if not record.kept:
            return
        scheduled = record.scheduled
        sketch.tensor(f"{name}/weight_grad", len(record.kernel) - (record.kind == "depthwise"))
        inputs = (3 if record.kind == "depthwise" else 2) + scheduled
        sketch.op(_WEIGHT_GRADIENT_OPS[record.kind], inputs, 1, 32 + 12 * scheduled)
        if record.compact:
            sketch.tensor(f"{name}/compact_channels", 1, data=4 * record.kept)
            if record.kind == "depthwise":
                sketch.tensor(f"{name}/kept_weight_scale", 1, typed=False,
                              data=4 * record.kept)
        if self.options["rounding"] == "nearest":
            self._step_counter |= scheduled
            sketch.op("DGST_SGD_QAS_UPDATE", 5 + 2 * scheduled, 0, 16 + 32 * scheduled)
            return
        self._step_counter = True
        if record.compact:
            sketch.tensor(f"{name}/kept_in_kernel", 1, data=4 * record.kept)
        sketch.op("DGST_SGD_QAS_UPDATE", 7, 0, 36 + 12 * scheduled)


_KIND_NAMES = {CONV2D: "conv", DEPTHWISE: "depthwise", DENSE: "dense"}


def _activation_op(layer) -> str | None:
    """The converter's op name for an activation fused into a conv (None: not one)."""
    if isinstance(layer, L.ReLU):
        return "Relu6" if layer.max_value is not None and float(layer.max_value) == 6.0 \
            else "Relu"
    if isinstance(layer, L.Activation):
        name = getattr(layer.activation, "__name__", "")
        return {"relu": "Relu", "relu6": "Relu6", "linear": None}.get(name, name.capitalize())
    return None


def deployable_size(model: keras.Model, removed=None, graph: DependencyGraph | None = None,
                    scheme=None, *, input_shape=None, name: str | None = None,
                    fine_tuned: bool = False, **options) -> DeployableSize:
    """`DeployableSize` of the training-step ``.tflite`` `export_training` writes for
    ``model`` (with the ``removed`` groups gone, counted without building the model), by
    part. See `DeployableSizeModel` for ``scheme``, ``name``, ``fine_tuned`` and
    ``options``; within 3 % of the real file (tests/test_flash_budget.py).

        deployable_size(model).total, deployable_size(model, select_groups(model, 0.3)).total
    """
    return DeployableSizeModel(model, scheme, graph, input_shape, name, fine_tuned,
                               **options).size(removed)


def deployable_bytes(model: keras.Model, removed=None, graph: DependencyGraph | None = None,
                     scheme=None, **options) -> int:
    """Bytes of the training-step ``.tflite`` (`deployable_size`'s total).

        deployable_bytes(model), deployable_bytes(model, select_groups(model, 0.3))
    """
    return deployable_size(model, removed, graph, scheme, **options).total
