"""What a model stores and computes once deployed, and what channel removal saves.

Sizes assume the deployed int8 graph (TensorFlow Lite Micro, as in Lin et al. 2022 "On-Device
Training Under 256KB Memory"): BatchNorm folded into the conv before it, int8 weights (1 byte)
and int32 biases (4 bytes; every conv/dense followed by a folded BatchNorm gets one); an
unfolded BatchNorm costs a per-channel int32 scale and shift. The activation peak is the int8
inference peak of `dgst_tf.planning.memory.MemoryModel` at batch 1 (perfect buffer packing).
`flash_bytes` also counts a model with some groups removed without building it. ::

    from dgst_tf.pruning import flash_bytes, footprint, reduction, select_groups

    flash_bytes(model), flash_bytes(model, select_groups(model, 0.3))
    reduction(footprint(model), footprint(small))     # {"flash_bytes": 0.55, ...}
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from dgst_tf.core.bn_folding import foldable_pairs
from dgst_tf.core.graph import check_functional, nodes_in_order
from dgst_tf.core.keras_compat import keras
from dgst_tf.core.layer_kinds import kind_of
from dgst_tf.planning.memory import MemoryModel, MemoryModelError
from dgst_tf.pruning.dependency_graph import DependencyGraph
from dgst_tf.training.scheme import SchemeError, UpdateScheme

__all__ = ["Footprint", "footprint", "flash_bytes", "reduction"]

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
    if removed is not None:
        graph = graph or DependencyGraph(model)
        keep = graph.keep_vector(removed)
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
