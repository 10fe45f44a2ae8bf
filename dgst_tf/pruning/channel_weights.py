"""A model's channel-dependent weights, each entry labelled with its channel group.

`DependencyGraph.weight_axes` says which axis of which weight belongs to which group; this
module turns that into what importances read (`WeightTerm` list) and what masks cover
(`masked_weights`). BatchNorm moving statistics are neither scored nor masked: they follow
the data, and removal slices them anyway. ::

    from dgst_tf.pruning.channel_weights import masked_weights, weight_terms

    terms = weight_terms(graph)                     # every kernel, bias, gamma, beta
    masked_weights(graph, "block_1_expand")         # ["kernel", "bias"]
"""
from __future__ import annotations

from dgst_tf.pruning.dependency_graph import DependencyGraph
from dgst_tf.pruning.group_importance import WeightTerm

__all__ = ["weight_terms", "masked_weights"]

_STATISTICS = ("moving_mean", "moving_variance")


def weight_terms(graph: DependencyGraph, layers: dict | None = None) -> list[WeightTerm]:
    """`WeightTerm` for every channel-dependent weight of ``graph``'s model (``layers``:
    name -> layer to read the weights from instead, e.g. the layers a wrapper holds).

        scores = GroupL2()(weight_terms(graph), graph.num_groups)
    """
    terms = []
    for layer in graph.layers():
        source = (layers or {}).get(layer.name, layer)
        for attr, axis, groups in graph.weight_axes(layer.name):
            if attr not in _STATISTICS:
                terms.append(WeightTerm(layer.name, attr, getattr(source, attr), axis, groups))
    return terms


def masked_weights(graph: DependencyGraph, layer_name: str) -> list[str]:
    """Attributes of the weights a mask covers in one layer (moving BatchNorm statistics
    are not), each once.

        masked_weights(graph, "block_1_expand_BN")    # ["gamma", "beta"]
    """
    names = []
    for attr, _, _ in graph.weight_axes(layer_name):
        if attr not in names and attr not in _STATISTICS:
            names.append(attr)
    return names
