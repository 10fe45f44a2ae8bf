"""The Keras graph as the memory model sees it: which ops run, which tensors they read and
write, which buffer holds each tensor and when, and the per-layer facts the accounting needs
(what a layer saves for its backward pass, its bias count). Scheme-independent: analysed once.

    from dgst_tf.planning.memory_graph import analyse_graph

    graph = analyse_graph(model, (128, 128, 3))
    graph.buffers                      # which tensor lives in which buffer, when
    graph.fusable_chains(stop=10)      # conv -> depthwise -> 1x1 chains run as one fused op

The steps run in the order the TFLite converter emits their ops (`converter_order`: of the
layer calls ready to run, the one whose name sorts first), so that a projection shortcut and
the block beside it run -- and their gradients are computed -- in the exported step's order.

A swish / SiLU or sigmoid activation (an ``Activation`` layer or a layer's ``activation``)
and MobileNetV3's hard-swish ``Multiply([x, ReLU6(x + 3) * (1 / 6)])`` are table
activations (`Step.table_activation`): the converter computes them with their own ops
(``LOGISTIC`` + ``MUL``, ``LOGISTIC``, one ``HARD_SWISH``) after the op that writes their
int8 input, which the training step keeps for ``DGST_ACTIVATION_GRAD``
(`dgst_tf.training.int8_activations`); the hard-swish's x + 3, ReLU6 and / 6 layers are
inside that one op and run nothing of their own.

The runtime assumptions (fused activations and padding, in-place ops, buffer lifetimes) are
stated in `dgst_tf.planning.memory`; the ops and tensors of the exported training step built
on this graph are `dgst_tf.planning.step_timeline`.
"""
from __future__ import annotations

import dataclasses
import functools
import heapq
import math

from dgst_tf.core.block_fusion_rule import ChainOp, fusable_chains
from dgst_tf.core.geometry import extra_taps_for_same
from dgst_tf.core.graph import UnsupportedModelError, nodes_in_order
from dgst_tf.core.keras_compat import keras, tf
from tf_keras.src.engine.keras_tensor import KerasTensor
from tf_keras.src.layers.core.tf_op_layer import TFOpLambda  # a TF op on Keras tensors
from dgst_tf.core.layer_kinds import (CONV2D, DEPTHWISE, is_dense, is_depthwise, kernel_of,
                                      kind_of)
from dgst_tf.core.multiply_patterns import hard_swish_patterns
from dgst_tf.training.int8_activations import TABLE_ACTIVATIONS

__all__ = ["ACTIVATION_BYTES", "MemoryModelError", "Value", "Step", "StepFacts", "Buffer",
           "MemoryGraph", "analyse_graph", "has_weights", "bias_count", "mask_bits",
           "saved_for_backward", "table_activation", "converter_order"]

ACTIVATION_BYTES = 1  # int8 activations

# Layers whose output is their input, computed in place or fused into the producer.
_FUSED = (keras.layers.BatchNormalization, keras.layers.ReLU, keras.layers.Activation,
          keras.layers.LeakyReLU, keras.layers.ELU, keras.layers.Softmax,
          keras.layers.ZeroPadding2D, keras.layers.Dropout, keras.layers.SpatialDropout2D,
          keras.layers.GaussianNoise, keras.layers.GaussianDropout, keras.layers.Flatten,
          keras.layers.Reshape, keras.layers.Rescaling, keras.layers.Identity)
# Ops that may write into an input that dies at them.
_ELEMENTWISE = (keras.layers.Add, keras.layers.Subtract, keras.layers.Multiply,
                keras.layers.Average, keras.layers.Maximum, keras.layers.Minimum)
# Ops whose backward needs nothing saved from the forward pass (linear in their inputs).
_LINEAR = (keras.layers.Add, keras.layers.Subtract, keras.layers.Average,
           keras.layers.Concatenate, keras.layers.GlobalAveragePooling2D,
           keras.layers.GlobalAveragePooling1D, keras.layers.AveragePooling2D,
           keras.layers.ZeroPadding2D, keras.layers.Cropping2D, keras.layers.UpSampling2D,
           keras.layers.Flatten, keras.layers.Reshape, keras.layers.Permute,
           keras.layers.Dropout, keras.layers.SpatialDropout2D, keras.layers.GaussianNoise,
           keras.layers.GaussianDropout, keras.layers.BatchNormalization,
           keras.layers.Rescaling, keras.layers.Identity)
_MAX_POOLS = (keras.layers.MaxPooling2D, keras.layers.GlobalMaxPooling2D)
_RESHAPES = (keras.layers.Flatten, keras.layers.Reshape)
_NO_PADDING = ((0, 0), (0, 0))
_CHAIN_KINDS = {CONV2D: "conv", DEPTHWISE: "depthwise"}


class MemoryModelError(ValueError):
    """The memory model cannot analyse this model or input shape (says why)."""


# ------------------------------------------------------------------------------ per layer
def has_weights(layer) -> bool:
    """A Conv2D, DepthwiseConv2D or Dense layer (`dgst_tf.core.layer_kinds`)."""
    return kind_of(layer) is not None


def bias_count(layer) -> int:
    """Output channels: the biases the layer has (or would have)."""
    if is_depthwise(layer):
        shape = layer.depthwise_kernel.shape
        return int(shape[2] * shape[3])
    return int(kernel_of(layer).shape[-1])


def _activation_name(layer) -> str:
    """What ``layer`` applies elementwise: "none", "relu", "relu6" or another name."""
    if isinstance(layer, keras.layers.ReLU):
        if float(layer.negative_slope) or float(layer.threshold):
            return "leaky_relu"
        if layer.max_value is None:
            return "relu"
        return "relu6" if float(layer.max_value) == 6.0 else "relu_clipped"
    if isinstance(layer, keras.layers.Activation) or has_weights(layer):
        fn = layer.activation
        name = getattr(fn, "__name__", str(fn))
        return "none" if name == "linear" else name
    if isinstance(layer, (keras.layers.LeakyReLU, keras.layers.ELU, keras.layers.Softmax)):
        return type(layer).__name__.lower()
    return "none"


def table_activation(layer) -> str | None:
    """The table activation ``layer`` applies ("swish", "hard_swish", "sigmoid"), or None."""
    return TABLE_ACTIVATIONS.get(_activation_name(layer))


def mask_bits(layer) -> int:
    """Bits per element a nonlinear activation saves for its backward pass: 1 for a ReLU
    kind (the clamp mask), 8 for others, 0 for none and for a table activation (its int8
    input is kept instead: `Step.table_activation`)."""
    name = _activation_name(layer)
    if name == "none" or name in TABLE_ACTIVATIONS:
        return 0
    relu_layer = isinstance(layer, (keras.layers.ReLU, keras.layers.LeakyReLU))
    return 1 if relu_layer or name in ("relu", "relu6") else 8


# ------------------------------------------------------------------------------ the graph
@dataclasses.dataclass
class Value:
    """A tensor value computed by one op (fused ops do not create values)."""

    index: int
    shape: tuple
    producer: int              # step, -1 for a model input
    readers: list              # steps that read it
    buffer: int = -1

    @property
    def elements(self) -> int:
        return int(math.prod(self.shape))

    @property
    def last_use(self) -> int:
        return max(self.readers, default=self.producer)


@dataclasses.dataclass
class Step:
    """One op that runs (fused layers are folded into the op that feeds them)."""

    index: int
    layer: object
    inputs: list               # value indices
    output: int                # value index
    fused: list = dataclasses.field(default_factory=list)  # activations applied on output
    # zero padding of fused ZeroPadding2D layers between the input value and this op
    explicit_padding: tuple = _NO_PADDING
    # the swish / hard_swish / sigmoid the exported graph applies to the op's int8 output
    # with ops of its own (the output value is then the activation's; module doc)
    table_activation: str | None = None

    def activation(self) -> str:
        """The activation on the output ("none", "relu", "relu6", "swish", ...; several joined
        by +)."""
        names = [n for n in map(_activation_name, [self.layer, *self.fused])
                 if n != "none" and n not in TABLE_ACTIVATIONS]
        if self.table_activation:
            names.append(self.table_activation)
        return "+".join(names) or "none"


@dataclasses.dataclass
class Buffer:
    """One activation buffer: its size and the steps from its first writer to last reader."""

    size_bytes: int
    first_step: int
    last_step: int


def saved_for_backward(step: Step, values: list) -> tuple:
    """``(mask_bits, saved_input_elements, note)`` that ``step`` keeps for its backward pass
    when the gradient flows through it: bits per output element (ReLU masks, max-pool
    argmax...), whole input elements (Multiply and unknown nonlinear ops) and a note for
    the report when the saved inputs are an assumption (or None)."""
    layer = step.layer
    weighted = has_weights(layer)
    bits = mask_bits(layer) if weighted else 0
    bits += sum(mask_bits(f) for f in step.fused)
    saved, note = 0, None
    if not weighted and step.table_activation:  # its input is kept (`Step.table_activation`)
        return bits, 0, None
    if not weighted and not isinstance(layer, _LINEAR):
        bits += mask_bits(layer)
        if isinstance(layer, _MAX_POOLS):
            bits += 8
        elif isinstance(layer, keras.layers.Multiply):
            saved = sum(values[v].elements for v in step.inputs)
        elif not mask_bits(layer):
            saved = sum(values[v].elements for v in step.inputs)
            note = (f"{layer.name} ({type(layer).__name__}): backward assumed to need its "
                    "inputs (saved in full)")
    return bits, saved, note


@dataclasses.dataclass(frozen=True)
class StepFacts:
    """What the accounting asks about a step, worked out once: its op ``kind`` ("conv",
    "depthwise", "dense", "sum" for Add, "pool" for global average pooling, "reshape" for a
    Flatten / Reshape that runs, "activation" for a table activation of its own, "other"),
    output ``channels`` (biases) of a weight layer, what it saves for its backward pass
    (`saved_for_backward`) and the table ``activation`` it applies
    (`Step.table_activation`)."""

    kind: str
    channels: int = 0
    mask_bits: int = 0
    saved_elements: int = 0
    note: str | None = None
    activation: str | None = None

    @property
    def weighted(self) -> bool:
        return self.kind in ("conv", "depthwise", "dense")


_FACT_KINDS = {CONV2D: "conv", DEPTHWISE: "depthwise"}
_POOLS = (keras.layers.GlobalAveragePooling2D, keras.layers.GlobalAveragePooling1D)


def _step_facts(step: "Step", values: list) -> StepFacts:
    layer = step.layer
    bits, saved, note = saved_for_backward(step, values)
    if has_weights(layer):
        kind = "dense" if is_dense(layer) else _FACT_KINDS[kind_of(layer)]
        return StepFacts(kind, bias_count(layer), bits, saved, note, step.table_activation)
    kind = "sum" if isinstance(layer, keras.layers.Add) else \
        "pool" if isinstance(layer, _POOLS) else \
        "reshape" if isinstance(layer, _RESHAPES) else \
        "activation" if step.table_activation else "other"
    return StepFacts(kind, 0, bits, saved, note, step.table_activation)


@dataclasses.dataclass
class MemoryGraph:
    """Steps, values and buffers of one model at one input shape (see `analyse_graph`)."""

    steps: list
    values: list
    output_values: list        # value indices of the model outputs
    buffers: list = dataclasses.field(default_factory=list)

    @functools.cached_property
    def by_layer(self) -> dict:
        """Layer name -> its step (layers fused into a step have none)."""
        return {s.layer.name: s for s in self.steps}

    @functools.cached_property
    def facts(self) -> list:
        """`StepFacts` of every step, in order."""
        return [_step_facts(step, self.values) for step in self.steps]

    @functools.cached_property
    def _chains(self) -> dict:
        return {}

    def folded_kernel(self, step: Step) -> tuple | None:
        """The (kh, kw) kernel with which ``step`` computes its explicit zero padding as an
        exact ``SAME`` convolution (the training export's PAD folding: trailing zero taps),
        or None when it has no padding to fold or no such kernel exists.

            graph.folded_kernel(graph.by_layer["block_1_depthwise"])   # (4, 4)
        """
        if step.index not in self._folded:
            self._folded[step.index] = self._fold(step)
        return self._folded[step.index]

    @functools.cached_property
    def _folded(self) -> dict:
        return {}

    def _fold(self, step: Step) -> tuple | None:
        layer = step.layer
        if step.explicit_padding == _NO_PADDING or kind_of(layer) not in _CHAIN_KINDS \
                or str(layer.padding).lower() != "valid" or len(step.inputs) != 1:
            return None
        inp, out = self.values[step.inputs[0]], self.values[step.output]
        taps = [extra_taps_for_same(inp.shape[axis], out.shape[axis],
                                    int(layer.kernel_size[axis]), int(layer.strides[axis]),
                                    int(layer.dilation_rate[axis]),
                                    step.explicit_padding[axis][0]) for axis in (0, 1)]
        if None in taps:
            return None
        return tuple(int(k) + t for k, t in zip(layer.kernel_size, taps))

    def fusable_chains(self, stop: int | None = None, fold_pads: bool = True) -> list:
        """(conv, depthwise, 1x1 conv) steps before step ``stop`` that the training export
        runs as one ``DGST_FUSED_BLOCK`` (`dgst_tf.core.block_fusion_rule`); a padding that
        stays a PAD op (``fold_pads=False``, or no exact SAME kernel) breaks a chain.

            [(a.layer.name, b.layer.name, c.layer.name) for a, b, c in graph.fusable_chains()]
        """
        key = (stop, bool(fold_pads))
        if key not in self._chains:  # the search asks again for every candidate
            described = [_chain_op(step, self._reads_pad(step, fold_pads))
                         for step in self.steps]
            chains = fusable_chains(described, stop, {0, *self.output_values})
            self._chains[key] = [tuple(self.steps[i] for i in chain) for chain in chains]
        return list(self._chains[key])

    def _reads_pad(self, step: Step, fold_pads: bool) -> bool:
        """Whether ``step`` reads the output of a PAD op in the exported graph."""
        if step.explicit_padding == _NO_PADDING:
            return False
        return not (fold_pads and self.folded_kernel(step) is not None)


def _chain_op(step: Step, reads_pad: bool = False) -> ChainOp:
    """A step in the fusion rule's terms (activations fused into it included); a step that
    reads a PAD op reads a tensor of its own."""
    layer = step.layer
    kind = _CHAIN_KINDS.get(kind_of(layer))
    inputs = tuple(("pad", v) if reads_pad else v for v in step.inputs)
    if kind is None:
        return ChainOp("other", inputs, step.output)
    return ChainOp(kind, inputs, step.output, kernel=tuple(layer.kernel_size),
                   strides=tuple(layer.strides), dilation=tuple(layer.dilation_rate),
                   depth_multiplier=int(getattr(layer, "depth_multiplier", 1)),
                   activation=step.activation())


# ------------------------------------------------------------------------------ analysis
def analyse_graph(model: keras.Model, input_shape: tuple,
                  inplace_depthwise: bool = False) -> MemoryGraph:
    """Steps, values and buffers of a functional ``model`` at ``input_shape`` (H, W, C),
    batch 1. Every value has its own buffer (TFLM's planner computes nothing in place);
    ``inplace_depthwise``: a runtime like tinyengine's, where elementwise ops write into an
    input that dies there and a depthwise conv (multiplier 1) overwrites its input.

        graph = analyse_graph(model, (128, 128, 3))
        len(graph.buffers)    # one per value here
    """
    graph = _GraphBuilder(model, input_shape).build()
    graph.buffers = _assign_buffers(graph, inplace_depthwise)
    return graph


class _GraphBuilder:
    """Walks the model's layer calls once, folding fused layers into their producer."""

    def __init__(self, model: keras.Model, input_shape: tuple):
        self.model, self.input_shape = model, tuple(input_shape)
        patterns = hard_swish_patterns(model)
        # the hard-swish Multiply -> its x; its helper layers run nothing of their own
        self.hard_swish = {name: _layer_output_id(model, p.source) for name, p in
                           patterns.items()}
        helpers = {name for p in patterns.values() for name in p.helpers}
        self.nodes = [n for n in converter_order(model) if n.layer.name not in helpers]
        self.readers = self._readers()  # tensor id -> node positions that read it
        first = str(id(model.inputs[0]))
        self.tensor_shape = {first: (1, *self.input_shape)}
        self.value_of = {first: 0}      # tensor id -> value index
        self.padding_of = {}            # tensor id -> fused zero padding ((t, b), (l, r))
        self.steps, self.values = [], [Value(0, self.input_shape, -1, [])]

    def _readers(self) -> dict:
        readers = {}
        for pos, node in enumerate(self.nodes):
            if isinstance(node.layer, keras.Model):
                raise UnsupportedModelError(
                    f"MemoryModel: layer {node.layer.name!r} is a nested model; flatten it")
            for tid in self._input_ids(node):
                readers.setdefault(tid, []).append(pos)
        return readers

    def _input_ids(self, node) -> list:
        """The tensors ``node`` reads (a hard-swish: its x only)."""
        if node.layer.name in self.hard_swish:
            return [self.hard_swish[node.layer.name]]
        return list(node.flat_input_ids)

    def build(self) -> MemoryGraph:
        for node in self.nodes:
            in_ids = self._input_ids(node)
            out_id = self._output_shape(node)
            layer = node.layer
            table = "hard_swish" if layer.name in self.hard_swish else table_activation(layer)
            single = len(in_ids) == 1 and len(self.readers.get(in_ids[0], [])) == 1
            if table and not has_weights(layer):
                if single and self._takes_activation(in_ids[0]):
                    self._fold_into_producer(layer, in_ids[0], out_id)
                    self.steps[self.values[self.value_of[out_id]].producer].table_activation = \
                        table
                else:  # its own op on a value other ops read too (or the model input)
                    self._add_step(layer, in_ids, out_id).table_activation = table
            elif isinstance(layer, _FUSED) and single and \
                    not _reshapes_a_map(layer, self.tensor_shape[in_ids[0]]):
                self._fold_into_producer(layer, in_ids[0], out_id)
            else:
                self._add_step(layer, in_ids, out_id).table_activation = table
        last = len(self.steps) - 1
        outputs = [self.value_of[str(id(out))] for out in self.model.outputs]
        for v in outputs:  # outputs live to the end (they are the result)
            self.values[v].readers.append(last)
        return MemoryGraph(self.steps, self.values, outputs)

    def _output_shape(self, node) -> str:
        """Infer and record the shape of the node's one output; returns its tensor id."""
        layer = node.layer
        if layer.name in self.hard_swish:  # elementwise on x
            out_id = node.flat_output_ids[0]
            self.tensor_shape[out_id] = self.tensor_shape[self.hard_swish[layer.name]]
            return out_id
        in_shapes = [self.tensor_shape[t] for t in node.flat_input_ids]
        if isinstance(layer, TFOpLambda):  # its compute_output_shape calls the TF op
            out_shape = self._run_for_shape(node)  # without tf.reduce_mean's axis, ...
        else:
            try:
                out_shape = layer.compute_output_shape(
                    in_shapes[0] if len(in_shapes) == 1 else in_shapes)
            except NotImplementedError:  # a layer without a shape rule: run it
                out_shape = self._run_for_shape(node)
            except Exception as err:  # noqa: BLE001 - reported with the layer name
                raise MemoryModelError(f"cannot infer the output shape of layer {layer.name!r} "
                                       f"({type(layer).__name__}): {err}") from err
        if len(node.flat_output_ids) != 1:
            raise UnsupportedModelError(f"MemoryModel: layer {layer.name!r} has "
                                        f"{len(node.flat_output_ids)} outputs")
        if is_dense(layer) and in_shapes[0][-1] != int(layer.kernel.shape[0]):
            raise MemoryModelError(
                f"input_shape {self.input_shape} gives layer {layer.name!r} "
                f"{in_shapes[0][-1]} input features, but its kernel takes "
                f"{int(layer.kernel.shape[0])}")
        out_id = node.flat_output_ids[0]
        self.tensor_shape[out_id] = tuple(tf.TensorShape(out_shape).as_list())
        return out_id

    def _run_for_shape(self, node) -> tuple:
        """The output shape of ``node``'s layer called on zeros of its inputs' shapes."""
        def zeros(value):
            if isinstance(value, KerasTensor):
                shape = self.tensor_shape[str(id(value))]
                return tf.zeros([1 if d is None else d for d in shape], value.dtype)
            return value

        try:
            args, kwargs = tf.nest.map_structure(zeros, (node.call_args, node.call_kwargs))
            return tuple(tf.nest.flatten(node.layer(*args, **kwargs))[0].shape)
        except Exception as err:  # noqa: BLE001 - reported with the layer name
            raise MemoryModelError(f"cannot infer the output shape of layer "
                                   f"{node.layer.name!r} ({type(node.layer).__name__}): "
                                   f"{err}") from err

    def _fold_into_producer(self, layer, in_id: str, out_id: str) -> None:
        """A fused layer: its output is its input's value; padding accumulates."""
        source = self.value_of[in_id]
        self.value_of[out_id] = source
        (t, b), (left, r) = self.padding_of.get(in_id, _NO_PADDING)
        if isinstance(layer, keras.layers.ZeroPadding2D):
            (pt, pb), (pl, pr) = layer.padding
            t, b, left, r = t + pt, b + pb, left + pl, r + pr
        self.padding_of[out_id] = ((t, b), (left, r))
        producer = self.values[source].producer
        if producer >= 0:
            self.steps[producer].fused.append(layer)

    def _takes_activation(self, in_id: str) -> bool:
        """Whether the op writing tensor ``in_id`` can take a table activation on its output
        (one per op; not on the model input)."""
        producer = self.values[self.value_of[in_id]].producer
        return producer >= 0 and self.steps[producer].table_activation is None

    def _add_step(self, layer, in_ids: list, out_id: str) -> Step:
        step = Step(len(self.steps), layer, [self.value_of[t] for t in in_ids],
                    len(self.values),
                    explicit_padding=self.padding_of.get(in_ids[0], _NO_PADDING))
        for v in step.inputs:
            self.values[v].readers.append(step.index)
        shape = _shape_without_batch(self.tensor_shape[out_id])
        self.values.append(Value(step.output, shape, step.index, []))
        self.value_of[out_id] = step.output
        self.steps.append(step)
        return step


def converter_order(model: keras.Model) -> list:
    """The model's layer calls in the order the TFLite converter emits their ops: of the
    calls whose inputs are computed, the one whose layer name sorts first (as the
    converter's op names ``<model>/<layer>/<op>`` do) -- e.g. a ResNet block's conv path
    before its projection shortcut ``block2_short``, whichever Keras builds first.

        [node.layer.name for node in converter_order(model)]
    """
    nodes = list(nodes_in_order(model))
    producer = {tid: i for i, node in enumerate(nodes) for tid in node.flat_output_ids}
    waiting = [{producer[t] for t in node.flat_input_ids if t in producer} for node in nodes]
    readers = {}
    for i, needs in enumerate(waiting):
        for j in needs:
            readers.setdefault(j, []).append(i)
    ready = [(nodes[i].layer.name + "/", i) for i, needs in enumerate(waiting) if not needs]
    heapq.heapify(ready)
    order = []
    while ready:
        _, i = heapq.heappop(ready)
        order.append(nodes[i])
        for j in readers.get(i, []):
            waiting[j].discard(i)
            if not waiting[j]:
                heapq.heappush(ready, (nodes[j].layer.name + "/", j))
    return order


def _reshapes_a_map(layer, shape: tuple) -> bool:
    """A Flatten / Reshape of a map of more than one pixel: the converter's ``RESHAPE`` op,
    with an output tensor of its own (of a 1x1 map the exporter's head drops it)."""
    return isinstance(layer, _RESHAPES) and len(shape) == 4 and shape[1] * shape[2] > 1


def _layer_output_id(model: keras.Model, name: str) -> str:
    """The tensor id of the output of layer ``name``'s (only) call."""
    for node in nodes_in_order(model):
        if node.layer.name == name:
            return node.flat_output_ids[0]
    return str(id(model.inputs[0]))  # an input layer


def _shape_without_batch(shape) -> tuple:
    dims = tuple(tf.TensorShape(shape).as_list()[1:])
    if any(d is None for d in dims):
        raise MemoryModelError(f"tensor shape {dims} is not fully defined")
    return tuple(int(d) for d in dims)


def _in_place(step: Step, inplace_depthwise: bool) -> bool:
    layer = step.layer
    if not inplace_depthwise:
        return False
    if isinstance(layer, _ELEMENTWISE):
        return True
    if is_depthwise(layer):
        return int(layer.depth_multiplier) == 1
    return False


def _assign_buffers(graph: MemoryGraph, inplace_depthwise: bool) -> list:
    """Values -> memory buffers (in-place ops share their input's buffer); sets
    ``value.buffer`` and returns the buffers."""
    buffers = []
    for value in graph.values:
        if value.producer >= 0:
            step = graph.steps[value.producer]
            if _in_place(step, inplace_depthwise):
                for v in step.inputs:
                    src = graph.values[v]
                    if src.last_use == step.index and src.elements >= value.elements \
                            and src.buffer >= 0:
                        value.buffer = src.buffer
                        buf = buffers[src.buffer]
                        buf.last_step = max(buf.last_step, value.last_use)
                        break
        if value.buffer < 0:
            value.buffer = len(buffers)
            buffers.append(Buffer(value.elements * ACTIVATION_BYTES,
                                  max(value.producer, 0), value.last_use))
    return buffers
