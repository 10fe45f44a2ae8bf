"""Which channels of a tf-keras functional model must be removed together (DepGraph).

Removing output channel ``c`` of a convolution also removes channel ``c`` of the
BatchNormalization and ReLU after it, the matching input slice of every layer that reads
it, the depthwise filter ``c`` and everything a depthwise conv passes it on to, and, across
a residual ``Add``, channel ``c`` of every other tensor added to it. Such a set is a
*channel group*: either all of it goes or none of it does. `DependencyGraph` finds the
groups by labelling every feature (last-axis entry) of every tensor and merging labels
that layers tie together (union-find), the idea of Fang et al.'s DepGraph (CVPR 2023)
written for Keras graphs::

    from dgst_tf.pruning import DependencyGraph

    graph = DependencyGraph(model)
    group = graph.group("block_1_project", 3)      # what goes with output channel 3
    for layer, role, indices in group:             # e.g. ("block_2_expand", "in", (3,))
        print(layer, role, indices)
    graph.groups()                                 # every prunable group
    graph.families()                               # groups sharing the same layers

Roles of a group member: ``"out"`` output channels of a Conv2D / Dense (kernel last axis
and bias), ``"in"`` input channels of a Conv2D (kernel axis 2) or input rows of a Dense
(after ``Flatten`` of an HxWxC map channel ``c`` is the H*W rows ``c, c+C, ...``; a
``Reshape`` either keeps the channel axis, e.g. the [1, 1, C] <-> [C] around a 1x1-conv
classifier, or flattens like ``Flatten``; any other reshape is refused),
``"depthwise"`` channels of a DepthwiseConv2D (kernel axis 2; with a depth multiplier m
output channels ``c*m .. c*m+m-1`` go too), ``"channel"`` per-channel parameters
(BatchNormalization, Normalization, per-channel Rescaling or TensorFlow-function
constants) and ``"pass"`` feature indices of the output of a parameter-free layer
(activations, padding, pooling, Add, Concatenate, Flatten, Reshape, Dropout, elementwise
TensorFlow functions), listed so the group shows every tensor it touches.

TensorFlow functions called on Keras tensors become ``TFOpLambda`` layers (MobileNetV3's
hard-swish ``ReLU(6.0)(x + 3.0) * (1.0 / 6.0)`` is two of them). Those in `TF_ELEMENTWISE`
act on each element on its own: a constant operand must be the same for every channel
(last axis of size 1, e.g. a scalar: ``"pass"``) or hold one entry per channel on its last
axis (``"channel"``: removal slices the constant), and Keras-tensor operands are tied like
a `Multiply`'s. Those in `TF_REDUCTIONS` pass the channels on when the channel axis is
not reduced (``tf.reduce_mean(x, [1, 2], keepdims=True)``). Any other TensorFlow function
(slicing, transposes, reshapes, reductions over channels, a softmax) is refused naming the
layer and the function.

The model's input channels and its outputs (the classifier's logits) are not prunable,
nor is anything coupled to them; channels that enter a softmax over channels are pinned
too. Layers outside the list below raise `UnsupportedLayerError` naming the layer and its
class.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator, NamedTuple

import numpy as np

from dgst_tf.core.graph import (UnsupportedModelError, check_functional, check_single_use,
                                nodes_in_order)
from dgst_tf.core.keras_compat import keras
from dgst_tf.core.layer_kinds import CONV2D, DENSE, UNSUPPORTED_CONV_TYPES, WEIGHT_TYPES, kind_of
from tf_keras.src.engine.keras_tensor import KerasTensor
from tf_keras.src.layers.core.tf_op_layer import TFOpLambda  # a TF function on Keras tensors

__all__ = ["DependencyGraph", "ChannelGroup", "Member", "Family", "UnsupportedLayerError",
           "SUPPORTED_LAYERS", "TF_ELEMENTWISE", "TF_REDUCTIONS"]

L = keras.layers
_CHANNEL_PARAMS = (L.BatchNormalization, L.Normalization)
# One input, same channels out, no channel-dependent parameters.
_PASS = (L.ReLU, L.LeakyReLU, L.ELU, L.Activation, L.ZeroPadding2D, L.Cropping2D,
         L.UpSampling2D, L.MaxPooling2D, L.AveragePooling2D, L.GlobalMaxPooling2D,
         L.GlobalAveragePooling2D, L.Dropout, L.SpatialDropout2D, L.GaussianNoise,
         L.GaussianDropout, L.Identity, L.Rescaling, L.Softmax)
_MERGE = (L.Add, L.Subtract, L.Multiply, L.Average, L.Maximum, L.Minimum)
SUPPORTED_LAYERS = (WEIGHT_TYPES + _CHANNEL_PARAMS + _PASS + _MERGE
                    + (L.Concatenate, L.Flatten, L.Reshape, TFOpLambda))
# TFOpLambda functions (by TensorFlow symbol) that act on every element on its own, with
# scalar or per-channel constants (either operand order) and tensors of the same channels.
TF_ELEMENTWISE = frozenset({
    "__operators__.add", "math.add", "math.subtract", "math.multiply", "math.truediv",
    "math.maximum", "math.minimum", "math.pow", "clip_by_value", "identity",
    "nn.relu", "nn.relu6", "nn.leaky_relu", "nn.elu", "nn.selu", "nn.gelu", "nn.silu",
    "math.sigmoid", "math.tanh", "math.softplus", "math.abs", "math.negative",
    "math.square"})
# TFOpLambda reductions: they keep the channels unless the channel axis is reduced.
TF_REDUCTIONS = frozenset({"math.reduce_mean", "math.reduce_sum", "math.reduce_max",
                           "math.reduce_min"})
_PARAM_ROLES = ("out", "in", "depthwise", "channel")


class UnsupportedLayerError(UnsupportedModelError):
    """A layer the channel dependency graph cannot reason about (names it and its class)."""


class Member(NamedTuple):
    """One part of a channel group: ``(layer name, role, indices along that role's axis)``."""

    layer: str
    role: str
    indices: tuple


@dataclasses.dataclass(frozen=True)
class ChannelGroup:
    """Channels that must be removed together. Iterating yields `Member` tuples.

        for layer, role, indices in graph.group("expand", 0): ...
    """

    index: int
    members: tuple
    family: str
    prunable: bool
    reason: str = ""

    def __iter__(self) -> Iterator[Member]:
        return iter(self.members)

    def __len__(self) -> int:
        return len(self.members)

    def layers(self, role: str | None = None) -> list[str]:
        """Names of the member layers (with ``role`` only if given), in graph order."""
        return [m.layer for m in self.members if role is None or m.role == role]

    def member(self, layer: str, role: str | None = None) -> Member:
        """The member for ``layer`` (and ``role``); KeyError if the group does not touch it."""
        for m in self.members:
            if m.layer == layer and (role is None or m.role == role):
                return m
        raise KeyError(f"channel group {self.index} has no member {layer!r}"
                       + (f" with role {role!r}" if role else ""))


@dataclasses.dataclass(frozen=True)
class Family:
    """Groups touching the same layers in the same roles (e.g. all channels of one expansion).

    ``groups`` are group indices; pruning a fraction of a family removes that fraction of
    the channels of every layer in it.
    """

    name: str
    groups: tuple
    layers: tuple

    @property
    def size(self) -> int:
        return len(self.groups)


class _UnionFind:
    def __init__(self):
        self.parent: list[int] = []

    def new(self, n: int) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return np.arange(start, start + n)

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:  # path compression
            self.parent[i], i = root, self.parent[i]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(int(a)), self.find(int(b))
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _channels_last(layer) -> bool:
    return getattr(layer, "data_format", "channels_last") in (None, "channels_last")


def _last_axis(axis, rank: int) -> bool:
    axes = axis if isinstance(axis, (list, tuple)) else [axis]
    return len(axes) == 1 and axes[0] in (-1, rank - 1)


def _is_channel_softmax(layer, rank: int) -> bool:
    if isinstance(layer, L.Softmax):
        return _last_axis(layer.axis, rank)
    if isinstance(layer, L.Activation):
        return getattr(layer.activation, "__name__", "") in ("softmax", "log_softmax")
    return False


def _per_channel(value) -> bool:
    return np.ndim(value) > 0 and np.size(value) > 1


def _layer_kind(layer) -> str:
    """The class name, and for a TFOpLambda the TensorFlow function it calls."""
    if isinstance(layer, TFOpLambda):
        function = f"tf.{layer.symbol}" if layer.symbol else getattr(
            layer.function, "__name__", repr(layer.function))
        return f"{type(layer).__name__} {function}"
    return type(layer).__name__


def _constant_operands(node) -> Iterator[tuple[str, object]]:
    """(description, value) of every argument of a TFOpLambda call that is no Keras tensor."""
    for position, value in enumerate(node.call_args):
        if not isinstance(value, KerasTensor):
            yield f"argument {position}", value
    for key, value in node.call_kwargs.items():
        if key != "name" and not isinstance(value, KerasTensor):
            yield f"argument {key}=", value


def _reduced_axes(node) -> object:
    """The ``axis`` of a ``tf.reduce_*(input_tensor, axis=None, keepdims=False)`` call."""
    arguments = dict(zip(("input_tensor", "axis"), node.call_args))
    arguments.update(node.call_kwargs)
    return arguments.get("axis")


class DependencyGraph:
    """The channel groups of a functional tf-keras model (see the module doc).

        graph = DependencyGraph(model)
        graph.group("stem_conv", 0).layers()      # every layer the channel runs through
        [g.index for g in graph.groups()]         # prunable groups
        graph.output_groups("block_3_expand")     # group index of each output channel
    """

    def __init__(self, model: keras.Model):
        check_functional(model, "DependencyGraph")
        check_single_use(model, "DependencyGraph")
        self.model = model
        self._uf = _UnionFind()
        self._raw: dict[str, np.ndarray] = {}       # tensor id -> raw label per feature
        self._pinned_raw: dict[int, str] = {}       # raw label -> why it cannot be pruned
        self._io: dict[str, tuple[list[str], str]] = {}  # layer -> (input ids, output id)
        self._order: list = []                      # layers in execution order
        self._shapes: dict[str, tuple] = {}         # tensor id -> shape without batch
        self._per_channel_ops: set[str] = set()     # TFOpLambdas with per-channel constants
        for tensor, layer in zip(model.inputs, model._input_layers):
            tid = str(id(tensor))
            self._shapes[tid] = tuple(tensor.shape[1:])
            labels = self._uf.new(int(tensor.shape[-1]))
            self._raw[tid] = labels
            for label in labels:
                self._pinned_raw[int(label)] = f"model input {layer.name!r}"
        for node in nodes_in_order(model):
            self._visit(node)
        for tensor in model.outputs:
            for label in self._raw[str(id(tensor))]:
                self._pinned_raw.setdefault(int(label), "model output")
        self._finish()

    # -- construction ----------------------------------------------------------------------
    def _visit(self, node) -> None:
        layer = node.layer
        self._check_supported(layer)
        in_ids = list(node.flat_input_ids)
        if len(node.flat_output_ids) != 1:
            raise UnsupportedLayerError(
                f"DependencyGraph: layer {layer.name!r} ({type(layer).__name__}) has "
                f"{len(node.flat_output_ids)} outputs; only single-output layers are supported")
        out_id = node.flat_output_ids[0]
        inputs = [self._raw[t] for t in in_ids]
        in_shapes = [self._shapes[t] for t in in_ids]
        out_shape = tuple(node.outputs.shape[1:] if not isinstance(node.outputs, (list, tuple))
                          else node.outputs[0].shape[1:])
        self._shapes[out_id] = out_shape
        self._io[layer.name] = (in_ids, out_id)
        self._order.append(layer)
        if not _channels_last(layer):
            self._unsupported(layer, "channels_first data format")
        kind = kind_of(layer)
        if kind is not None:
            out = self._weight_layer_labels(layer, kind, inputs[0])
        elif isinstance(layer, L.Reshape):
            out = self._reshaped_labels(layer, inputs[0], in_shapes[0], out_shape)
        elif isinstance(layer, TFOpLambda):
            out = self._tf_function_labels(layer, node, inputs)
        else:
            out = self._other_layer_labels(layer, inputs, in_shapes)
        if len(out) != int(out_shape[-1]):
            self._unsupported(layer, f"{len(out)} channels expected, output has "
                                     f"{out_shape[-1]}")
        self._raw[out_id] = np.asarray(out)

    @staticmethod
    def _check_supported(layer) -> None:
        if isinstance(layer, keras.Model):
            raise UnsupportedLayerError(
                f"DependencyGraph: layer {layer.name!r} ({type(layer).__name__}) is a nested "
                "model; flatten it into one functional model first")
        # Conv2DTranspose subclasses Conv2D but its kernel axes are (kh, kw, out, in)
        if isinstance(layer, UNSUPPORTED_CONV_TYPES) or not isinstance(layer, SUPPORTED_LAYERS):
            names = sorted({c.__name__ for c in SUPPORTED_LAYERS})
            raise UnsupportedLayerError(
                f"DependencyGraph: layer {layer.name!r} ({type(layer).__name__}) is not "
                f"supported by channel pruning; supported layers: {', '.join(names)}")

    def _weight_layer_labels(self, layer, kind, inputs: np.ndarray) -> np.ndarray:
        """Output labels of a Conv2D / Dense (new channels) or DepthwiseConv2D (its input's)."""
        if kind is CONV2D:
            if int(getattr(layer, "groups", 1)) != 1:
                self._unsupported(layer, f"grouped convolution (groups={layer.groups})")
            return self._uf.new(int(layer.filters))
        if kind is DENSE:
            return self._uf.new(int(layer.units))
        return np.repeat(inputs, int(layer.depth_multiplier))  # out c*m + j comes from in c

    def _other_layer_labels(self, layer, inputs: list, in_shapes: list) -> np.ndarray:
        """Output labels of the other supported layers (merges tie their inputs together)."""
        rank = len(in_shapes[0]) + 1
        if isinstance(layer, _CHANNEL_PARAMS):
            if not _last_axis(layer.axis, rank):
                self._unsupported(layer, f"normalization over axis {layer.axis} (needs the "
                                         "last axis)")
            return inputs[0]
        if isinstance(layer, _PASS):
            self._check_pass_layer(layer, inputs[0], rank)
            return inputs[0]
        if isinstance(layer, _MERGE):
            widths = {len(x) for x in inputs}
            if len(widths) != 1:
                self._unsupported(layer, f"inputs with different channel counts "
                                         f"{[len(x) for x in inputs]} (broadcasting)")
            return self._merged(inputs)
        if isinstance(layer, L.Concatenate):
            if _last_axis(layer.axis, rank):
                return np.concatenate(inputs)  # channel offsets: inputs one after the other
            return self._merged(inputs)  # along space: the same channel in every input
        if isinstance(layer, L.Flatten):
            spatial = in_shapes[0][:-1]
            if any(d is None for d in spatial):
                self._unsupported(layer, f"input shape {in_shapes[0]} with unknown "
                                         "spatial size")
            # row-major flatten of (..., C): feature f holds channel f % C
            return np.tile(inputs[0], int(np.prod(spatial, dtype=np.int64)))
        self._unsupported(layer, "no channel rule")  # pragma: no cover - SUPPORTED_LAYERS

    def _reshaped_labels(self, layer, inputs: np.ndarray, in_shape: tuple,
                         out_shape: tuple) -> np.ndarray:
        """A Reshape that keeps the last axis (row-major: feature ``f`` stays channel
        ``f % C``) passes the channels on; one to a vector flattens like ``Flatten``."""
        if any(d is None for d in (*in_shape, *out_shape)):
            self._unsupported(layer, f"a reshape of {in_shape} to {out_shape} with unknown "
                                     "sizes")
        if int(out_shape[-1]) == int(in_shape[-1]):
            return inputs
        if len(out_shape) == 1:
            return np.tile(inputs, int(np.prod(in_shape[:-1], dtype=np.int64)))
        self._unsupported(layer, f"a reshape of {in_shape} to {out_shape} that mixes features "
                                 "of different channels in one axis (only reshapes that keep "
                                 "the channel axis, or flatten to a vector, are)")

    def _tf_function_labels(self, layer, node, inputs: list) -> np.ndarray:
        """Output labels of a TensorFlow function on Keras tensors (`TF_ELEMENTWISE`,
        `TF_REDUCTIONS`)."""
        if layer.symbol in TF_ELEMENTWISE:
            self._check_elementwise_constants(layer, node, len(inputs[0]))
            if len({len(x) for x in inputs}) != 1:
                self._unsupported(layer, f"Keras tensors with different channel counts "
                                         f"{[len(x) for x in inputs]} (broadcasting)")
            return self._merged(inputs)
        if layer.symbol in TF_REDUCTIONS:
            axis = _reduced_axes(node)
            in_rank = len(self._shapes[node.flat_input_ids[0]]) + 1
            if axis is None:
                self._unsupported(layer, "a reduction over every axis, the channel axis "
                                         "among them")
            if in_rank - 1 in np.reshape(np.asarray(axis), [-1]) % in_rank:
                self._unsupported(layer, f"a reduction over axis {axis}, which combines "
                                         "the channels")
            return inputs[0]
        self._unsupported(layer, "a TensorFlow function without a channel rule (supported: "
                                 f"{', '.join(sorted(TF_ELEMENTWISE | TF_REDUCTIONS))}, the "
                                 "reductions not over the channel axis)")

    def _check_elementwise_constants(self, layer, node, channels: int) -> None:
        """Constants of an elementwise function: the same for every channel (last axis of
        size 1, e.g. a scalar), or one entry per channel (then the layer has ``"channel"``
        parameters that removal slices); a constant that widens the channels is refused."""
        for where, value in _constant_operands(node):
            last = np.shape(value)[-1] if np.ndim(value) else 1
            if last == 1:
                continue
            if last != channels:
                self._unsupported(layer, f"a constant ({where}) of shape {np.shape(value)}: "
                                         f"its last axis is neither 1 nor the input's "
                                         f"{channels} channels")
            self._per_channel_ops.add(layer.name)

    def _check_pass_layer(self, layer, inputs: np.ndarray, rank: int) -> None:
        if _is_channel_softmax(layer, rank):
            for label in inputs:
                self._pinned_raw.setdefault(int(label), f"softmax over channels in "
                                                        f"{layer.name!r}")
        if isinstance(layer, L.Rescaling):
            for value in (layer.scale, layer.offset):
                if _per_channel(value) and np.size(value) != len(inputs):
                    self._unsupported(layer, "a scale/offset that is neither a scalar "
                                             "nor one value per channel")

    def _merged(self, inputs: list) -> np.ndarray:
        """Tie channel c of every input together; the output carries the first's labels."""
        for other in inputs[1:]:
            for a, b in zip(inputs[0], other):
                self._uf.union(a, b)
        return inputs[0]

    @staticmethod
    def _unsupported(layer, what: str):
        raise UnsupportedLayerError(
            f"DependencyGraph: layer {layer.name!r} ({_layer_kind(layer)}) uses {what}, "
            "which channel pruning does not support")

    def _finish(self) -> None:
        roots = {}
        for labels in self._raw.values():
            for label in labels:
                root = self._uf.find(int(label))
                roots.setdefault(root, len(roots))
        self.num_groups = len(roots)
        self._groups_of = {tid: np.array([roots[self._uf.find(int(l))] for l in labels],
                                         dtype=np.int64)
                           for tid, labels in self._raw.items()}
        self._reason = [""] * self.num_groups
        for label, why in self._pinned_raw.items():
            g = roots[self._uf.find(label)]
            if not self._reason[g]:
                self._reason[g] = why
        self.prunable = np.array([not r for r in self._reason], dtype=bool)
        members = [[] for _ in range(self.num_groups)]
        for layer in self._order:
            for role, groups in self._layer_roles(layer):
                order = np.argsort(groups, kind="stable")
                sorted_groups = groups[order]
                starts = np.flatnonzero(np.r_[True, sorted_groups[1:] != sorted_groups[:-1]])
                ends = np.r_[starts[1:], len(sorted_groups)]
                for s, e in zip(starts, ends):
                    idx = tuple(int(i) for i in np.sort(order[s:e]))
                    members[int(sorted_groups[s])].append(Member(layer.name, role, idx))
        families = {}
        for g, ms in enumerate(members):
            key = tuple((m.layer, m.role, len(m.indices)) for m in ms)
            if key not in families:
                name = next((m.layer for m in ms if m.role == "out"), ms[0].layer if ms
                            else "input")
                families[key] = (name, [])
            families[key][1].append(g)
        names_seen = {}
        self._families = []
        family_of = {}
        for key, (name, groups) in families.items():
            prunable = tuple(g for g in groups if self.prunable[g])
            if not prunable:
                continue
            # a name can repeat (e.g. channels of one conv split by a Concatenate)
            count = names_seen.get(name, 0)
            names_seen[name] = count + 1
            unique = name if count == 0 else f"{name}#{count}"
            self._families.append(Family(unique, prunable,
                                         tuple(dict.fromkeys(k[0] for k in key))))
            for g in prunable:
                family_of[g] = unique
        self._group_objects = [ChannelGroup(g, tuple(members[g]), family_of.get(g, ""),
                                            bool(self.prunable[g]), self._reason[g])
                               for g in range(self.num_groups)]

    def _layer_roles(self, layer) -> list[tuple[str, np.ndarray]]:
        """(role, group index per entry along that role's axis) for one layer."""
        in_ids, out_id = self._io[layer.name]
        ins = self._groups_of[in_ids[0]]
        out = self._groups_of[out_id]
        kind = kind_of(layer)
        if kind is not None:
            return [("depthwise", ins)] if kind.depthwise else [("in", ins), ("out", out)]
        if isinstance(layer, _CHANNEL_PARAMS):
            return [("channel", ins)]
        if isinstance(layer, L.Rescaling) and (_per_channel(layer.scale)
                                               or _per_channel(layer.offset)):
            return [("channel", ins)]
        if layer.name in self._per_channel_ops:
            return [("channel", ins)]
        return [("pass", out)]

    # -- queries ---------------------------------------------------------------------------
    def _layer(self, name: str):
        if name not in self._io:
            known = [l.name for l in self._order]
            raise KeyError(f"layer {name!r} is not in model {self.model.name!r} "
                           f"(layers: {', '.join(known)})")
        return self.model.get_layer(name)

    def input_groups(self, layer_name: str, index: int = 0) -> np.ndarray:
        """Group index of every input feature (last axis) of ``layer_name``'s input ``index``."""
        self._layer(layer_name)
        return self._groups_of[self._io[layer_name][0][index]].copy()

    def output_groups(self, layer_name: str) -> np.ndarray:
        """Group index of every output feature (last axis) of ``layer_name``."""
        self._layer(layer_name)
        return self._groups_of[self._io[layer_name][1]].copy()

    def tensor_groups(self, tensor) -> np.ndarray:
        """Group index of every feature of a Keras tensor of the model (inputs, outputs)."""
        return self._groups_of[str(id(tensor))].copy()

    def group(self, layer_name: str, channel: int, role: str = "out") -> ChannelGroup:
        """The channel group of output channel ``channel`` of ``layer_name`` (``role="in"``:
        of its input channel).

            g = graph.group("block_1_project", 0)
            g.prunable, g.layers("in"), g.member("block_2_add").indices
        """
        if role not in ("out", "in"):
            raise ValueError(f"role must be 'out' or 'in', got {role!r}")
        groups = (self.output_groups(layer_name) if role == "out"
                  else self.input_groups(layer_name))
        if not 0 <= channel < len(groups):
            raise IndexError(f"layer {layer_name!r} has {len(groups)} {role}put channels; "
                             f"got channel {channel}")
        return self._group_objects[int(groups[channel])]

    def groups(self, prunable: bool = True) -> list[ChannelGroup]:
        """Every prunable channel group (all groups if ``prunable=False``)."""
        return [g for g in self._group_objects if g.prunable or not prunable]

    def group_by_index(self, index: int) -> ChannelGroup:
        """The group with this index (``ChannelGroup.index``)."""
        return self._group_objects[index]

    def families(self) -> list[Family]:
        """Families of prunable groups, in graph order (see `Family`)."""
        return list(self._families)

    def family(self, name: str) -> Family:
        for f in self._families:
            if f.name == name:
                return f
        raise KeyError(f"no prunable family {name!r}; families: "
                       f"{[f.name for f in self._families]}")

    def layers(self) -> list:
        """The model's layers in execution order (input layers excluded)."""
        return list(self._order)

    def weight_axes(self, layer_name: str) -> list[tuple[str, int, np.ndarray]]:
        """Channel-dependent weights of a layer: ``(weight attribute, axis, group per entry)``.

        Conv2D ``kernel`` axis 2 (in) and 3 (out), ``bias`` axis 0; Dense ``kernel`` axis 0
        and 1; DepthwiseConv2D ``depthwise_kernel`` axis 2, ``bias`` axis 0 (output
        channels); BatchNormalization ``gamma``/``beta``/``moving_mean``/``moving_variance``
        axis 0. Parameter-free layers give an empty list.
        """
        layer = self._layer(layer_name)
        in_ids, out_id = self._io[layer_name]
        ins, out = self._groups_of[in_ids[0]], self._groups_of[out_id]
        kind = kind_of(layer)
        if kind is None:
            if not isinstance(layer, L.BatchNormalization):
                return []
            return [(name, 0, ins) for name in ("gamma", "beta", "moving_mean",
                                                "moving_variance")
                    if getattr(layer, name, None) is not None]
        axes = [(kind.kernel_attr, kind.channel_axis, ins)]
        if not kind.depthwise:  # output channels: the kernel's last axis
            axes.append((kind.kernel_attr, len(kind.kernel(layer).shape) - 1, out))
        if layer.use_bias:
            axes.append(("bias", 0, out))
        return axes

    def keep_vector(self, removed=None) -> np.ndarray:
        """One bool per group, False for the ``removed`` group indices (None: keep all).

        Raises ValueError for indices out of range or groups that cannot be removed::

            keep = graph.keep_vector([3, 17]); keep[graph.output_groups("expand")]
        """
        keep = np.ones(self.num_groups, bool)
        if removed is None:
            return keep
        removed = np.asarray(removed, dtype=np.int64).reshape(-1)
        if removed.size:
            if removed.min() < 0 or removed.max() >= self.num_groups:
                raise ValueError(f"group indices must be in [0, {self.num_groups}), got "
                                 f"{removed.min()}..{removed.max()}")
            pinned = removed[~self.prunable[removed]]
            if pinned.size:
                g = self.group_by_index(int(pinned[0]))
                raise ValueError(f"channel group {int(pinned[0])} cannot be removed "
                                 f"({g.reason}); members: {g.layers()}")
        keep[removed] = False
        return keep

    def describe(self) -> str:
        """One line per family: name, channels, layers."""
        lines = [f"{self.model.name}: {len(self.groups())} prunable channel groups in "
                 f"{len(self._families)} families ({self.num_groups} groups in all)"]
        for f in self._families:
            lines.append(f"  {f.name}: {f.size} channels, {len(f.layers)} layers "
                         f"({', '.join(f.layers[:4])}{', ...' if len(f.layers) > 4 else ''})")
        return "\n".join(lines)
