"""Physically removing pruned channel groups: a smaller tf-keras model, and what it saves.

Masks (TF-MOT or ours) leave zeros in full-size tensors; the MCU still stores and computes
them. `remove_channels` rebuilds the graph with smaller layers (fewer filters / units /
depthwise channels, sliced BatchNorm statistics, sliced consumer kernels) whose outputs
equal the masked model's::

    from dgst_tf.pruning import mask_groups, remove_channels, footprint, select_groups

    removed = select_groups(model, 0.3)           # or channel_pruner(...).removed_groups()
    masked = mask_groups(model, removed)           # same shapes, zeros (what TF-MOT leaves)
    small = remove_channels(masked)                # groups found from the zeros
    footprint(model).flash_bytes, footprint(small).flash_bytes

A masked group sends exactly zero downstream when its output filters, biases and
BatchNorm gamma/beta are zero, and consumers ignore it when their input slices are zero;
`mask_groups` and the TF-MOT wrappers zero all of them, so removal changes no output.

Sizes (`footprint`) assume the deployed int8 graph of REFERENCE section 1: BatchNorm
folded into the conv before it, int8 weights (1 byte) and int32 biases (4 bytes; every
conv/dense followed by a folded BatchNorm gets one); an unfolded BatchNorm costs a
per-channel int32 scale and shift. The activation peak is the int8 inference peak of
`dgst_tf.planning.memory.MemoryModel` at batch 1 (perfect buffer packing).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from dgst_tf.core.bn_folding import foldable_pairs
from dgst_tf.core.graph import check_functional, nodes_in_order, rebuild
from dgst_tf.core.keras_compat import keras
from dgst_tf.pruning.dependency_graph import DependencyGraph
from dgst_tf.pruning.structured import (ChannelGroupPruner, GroupL2, groups_to_prune,
                                        masked_weights)

__all__ = ["remove_channels", "mask_groups", "zeroed_groups", "footprint", "Footprint",
           "flash_bytes", "sparsity_for_budget", "reduction"]

L = keras.layers


def _keep_vector(graph: DependencyGraph, removed) -> np.ndarray:
    keep = np.ones(graph.num_groups, bool)
    if removed is None:
        return keep
    removed = np.asarray(removed, dtype=np.int64).reshape(-1)
    if removed.size:
        if removed.min() < 0 or removed.max() >= graph.num_groups:
            raise ValueError(f"group indices must be in [0, {graph.num_groups}), got "
                             f"{removed.min()}..{removed.max()}")
        pinned = removed[~graph.prunable[removed]]
        if pinned.size:
            g = graph.group_by_index(int(pinned[0]))
            raise ValueError(f"channel group {int(pinned[0])} cannot be removed "
                             f"({g.reason}); members: {g.layers()}")
    keep[removed] = False
    return keep


def zeroed_groups(model: keras.Model, graph: DependencyGraph | None = None) -> np.ndarray:
    """Prunable groups whose weights (filters, biases, BN gamma/beta, input slices) are all
    exactly zero, e.g. after ``tfmot.sparsity.keras.strip_pruning``.

        zeroed_groups(tfmot.sparsity.keras.strip_pruning(pruning_model))
    """
    graph = graph or DependencyGraph(model)
    pruner = ChannelGroupPruner(graph)
    total = GroupL2(("kernel", "depthwise_kernel", "bias", "gamma", "beta"))(
        pruner.weight_terms(), graph.num_groups).numpy()
    return np.flatnonzero((total == 0) & graph.prunable)


def mask_groups(model: keras.Model, removed, graph: DependencyGraph | None = None
                ) -> keras.Model:
    """A copy of ``model`` with the weights of the ``removed`` groups set to zero (the
    masked model: same shapes, same outputs as `remove_channels` gives).

        masked = mask_groups(model, [3, 17])
    """
    check_functional(model, "mask_groups")
    graph = graph or DependencyGraph(model)
    keep = _keep_vector(graph, removed)
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    for layer in graph.layers():
        axes = graph.weight_axes(layer.name)
        if not axes:
            continue
        target = copy.get_layer(layer.name)
        for attr in masked_weights(graph, layer.name):
            value = getattr(target, attr).numpy()
            for name, axis, groups in axes:
                if name == attr:
                    shape = [1] * value.ndim
                    shape[axis] = -1
                    value = value * keep[groups].reshape(shape)
            getattr(target, attr).assign(value)
    return copy


def _kept(keep, groups) -> np.ndarray:
    return np.flatnonzero(keep[groups])


def remove_channels(model: keras.Model, removed=None, graph: DependencyGraph | None = None,
                    name: str | None = None) -> keras.Model:
    """A smaller model without the ``removed`` channel groups (new layers, same names).

    ``removed``: group indices (`select_groups`, ``channel_pruner(m).removed_groups()``);
    None removes the groups `zeroed_groups` finds. The result computes what the masked
    model computes (to float rounding) with fewer parameters and smaller activations.

        small = remove_channels(tfmot.sparsity.keras.strip_pruning(pruning_model))
    """
    check_functional(model, "remove_channels")
    graph = graph or DependencyGraph(model)
    if removed is None:
        removed = zeroed_groups(model, graph)
    keep = _keep_vector(graph, removed)

    def call_layer(layer, args, kwargs):
        ins = _kept(keep, graph.input_groups(layer.name))
        out = _kept(keep, graph.output_groups(layer.name))
        config = layer.get_config()
        weights = layer.get_weights()
        if isinstance(layer, (L.Conv2D, L.Dense, L.DepthwiseConv2D)) and not len(out):
            raise ValueError(f"removing these groups leaves layer {layer.name!r} "
                             f"({type(layer).__name__}) without output channels")
        if isinstance(layer, L.DepthwiseConv2D):
            weights = [layer.depthwise_kernel.numpy()[:, :, ins, :]]
            if layer.use_bias:
                weights.append(layer.bias.numpy()[out])
        elif isinstance(layer, L.Conv2D):
            config["filters"] = len(out)
            weights = [layer.kernel.numpy()[:, :, ins, :][..., out]]
            if layer.use_bias:
                weights.append(layer.bias.numpy()[out])
        elif isinstance(layer, L.Dense):
            config["units"] = len(out)
            weights = [layer.kernel.numpy()[ins][:, out]]
            if layer.use_bias:
                weights.append(layer.bias.numpy()[out])
        elif isinstance(layer, L.BatchNormalization):
            weights = [w[ins] for w in weights]
        elif isinstance(layer, L.Normalization):
            mean = np.reshape(np.asarray(layer.mean), [-1])
            variance = np.reshape(np.asarray(layer.variance), [-1])
            config.update(mean=mean[ins].tolist(), variance=variance[ins].tolist(), axis=-1)
            config.pop("count", None)
            weights = None
        elif isinstance(layer, L.Rescaling):
            for key in ("scale", "offset"):
                if np.size(config[key]) > 1:
                    config[key] = np.reshape(config[key], [-1])[ins].tolist()
        new = type(layer).from_config(config)
        result = new(*args, **kwargs)
        if weights:
            new.set_weights(weights)
        return result

    return rebuild(model, call_layer, name=name or f"{model.name}_pruned")


# ----------------------------------------------------------------------------- sizes
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
    if isinstance(layer, L.DepthwiseConv2D):
        k = shape_of("depthwise_kernel")
        biased = layer.use_bias or layer.name in folded
        return math.prod(k), (k[2] * k[3] if biased else 0)
    if isinstance(layer, (L.Conv2D, L.Dense)):
        k = shape_of("kernel")
        biased = layer.use_bias or layer.name in folded
        return math.prod(k), (k[-1] if biased else 0)
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
    if removed is not None:
        graph = graph or DependencyGraph(model)
        keep = _keep_vector(graph, removed)
    weights = biases = 0
    for node in nodes_in_order(model):
        layer = node.layer
        if layer.name in folded_bns:
            continue

        def shape_of(attr, layer=layer):
            shape = list(getattr(layer, attr).shape)
            if removed is not None:
                for name, axis, groups in graph.weight_axes(layer.name):
                    if name == attr:
                        shape[axis] = int(keep[groups].sum())
            return [int(d) for d in shape]

        w, b = _layer_sizes(layer, folded, shape_of)
        weights += w
        biases += b
    return weights, biases


def _macs(model: keras.Model) -> int:
    total = 0
    for node in nodes_in_order(model):
        layer = node.layer
        out = node.outputs.shape
        if isinstance(layer, L.DepthwiseConv2D):
            k = layer.depthwise_kernel.shape
            total += int(np.prod(out[1:])) * int(k[0] * k[1])
        elif isinstance(layer, L.Conv2D):
            k = layer.kernel.shape
            total += int(np.prod(out[1:])) * int(k[0] * k[1] * k[2])
        elif isinstance(layer, L.Dense):
            total += int(np.prod(out[1:])) * int(layer.kernel.shape[0])
    return total


def footprint(model: keras.Model, input_shape=None) -> Footprint:
    """`Footprint` of ``model`` (``input_shape`` (H, W, C) if the model's is not fixed).

        fp = footprint(small); fp.flash_bytes, fp.activation_peak_bytes
    """
    from dgst_tf.planning.memory import MemoryModel, MemoryModelError
    from dgst_tf.training.scheme import SchemeError, UpdateScheme

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
    """Fraction saved per figure: ``{"flash_bytes": 0.55, ...}`` (0 = nothing saved)."""
    result = {}
    for key in ("parameters", "deployed_weights", "flash_bytes", "activation_peak_bytes",
                "macs"):
        a, b = getattr(before, key), getattr(after, key)
        if a and b is not None:
            result[key] = 1.0 - b / a
    return result


def sparsity_for_budget(model: keras.Model, budget_bytes: int,
                        graph: DependencyGraph | None = None, exclude=(), round_to: int = 1,
                        min_channels: int = 1, tolerance: float = 1e-4) -> tuple[float, int]:
    """The smallest family sparsity whose pruned model fits ``budget_bytes`` of flash
    (int8 weights + int32 biases), and its flash bytes.

        sparsity, nbytes = sparsity_for_budget(model, parse_budget("1MB"))
    """
    graph = graph or DependencyGraph(model)

    def size(s):
        return flash_bytes(model, groups_to_prune(graph, s, exclude, round_to, min_channels),
                           graph)

    if size(0.0) <= budget_bytes:
        return 0.0, size(0.0)
    high = 0.999
    if size(high) > budget_bytes:
        raise ValueError(f"even pruning {high:.1%} of every prunable family leaves "
                         f"{size(high)} bytes, more than the {budget_bytes}-byte budget "
                         "(the unprunable parts are too large)")
    low = 0.0
    while high - low > tolerance:
        mid = (low + high) / 2
        if size(mid) <= budget_bytes:
            high = mid
        else:
            low = mid
    return float(high), int(size(high))

