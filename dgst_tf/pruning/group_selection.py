"""Which channel groups pruning at a sparsity masks: the rule, on its own.

Sparsity ``s`` means: in every `Family` not touched by ``exclude`` (e.g. the 96 expansion
channels of one block, or the channels of one residual stream) the ``floor(s * n)`` least
important groups are masked, rounded so the kept count is a multiple of ``round_to``, at
least ``min_channels`` kept. ``exclude`` names layers whose own channels (outputs,
depthwise or BatchNorm channels) are never pruned: every family they belong to is left
whole (their input channels may still shrink). Groups already masked score below all
others, so they stay masked as the sparsity grows. The TF-MOT wrappers apply this rule in
training (`dgst_tf.pruning.tfmot_wrapper`); here it runs once on the current weights::

    from dgst_tf.pruning.group_selection import select_groups, groups_to_prune

    removed = select_groups(model, 0.3)              # what pruning at 30% masks now
    groups_to_prune(DependencyGraph(model), 0.3)     # some set of that size (for counting)
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

from dgst_tf.core.keras_compat import keras, tf
from dgst_tf.pruning.channel_weights import weight_terms
from dgst_tf.pruning.dependency_graph import DependencyGraph
from dgst_tf.pruning.group_importance import (WeightTerm, get_group_importance,
                                              masked_weight_norm)

__all__ = ["GroupSelector", "select_groups", "group_scores", "groups_to_prune"]

_EPS = np.float32(1e-4)  # s * n a hair below an integer still counts as that integer


def _kept_count(sparsity, n: int, round_to: int, min_channels: int):
    """How many of ``n`` groups a family keeps at ``sparsity`` (NumPy or TF scalar)."""
    minimum = min(max(1, int(min_channels)), n)
    if tf.is_tensor(sparsity):
        pruned = tf.cast(tf.floor(tf.cast(sparsity, tf.float32) * np.float32(n) + _EPS),
                         tf.int32)
        kept = n - pruned
        kept = (kept + round_to - 1) // round_to * round_to
        return tf.clip_by_value(kept, minimum, n)
    pruned = int(np.floor(np.float32(sparsity) * np.float32(n) + _EPS))
    kept = -(-(n - pruned) // round_to) * round_to
    return int(min(max(kept, minimum), n))


class GroupSelector:
    """The selection rule for one model: its graph, the families to prune, the importance.

        selector = GroupSelector(DependencyGraph(model), "l2", exclude=["head"])
        keep = selector.keep_from_scores(selector.scores(), tf.constant(0.3))
        selector.family_sparsity_of(keep.numpy() > 0.5)      # {family: fraction masked}
    """

    def __init__(self, graph: DependencyGraph, importance=None, exclude: Iterable[str] = (),
                 round_to: int = 1, min_channels: int = 1):
        if int(round_to) < 1:
            raise ValueError(f"round_to must be >= 1, got {round_to}")
        self.graph = graph
        self.importance = get_group_importance(importance)
        self.exclude = tuple(exclude)
        known = {l.name for l in graph.layers()}
        unknown = [n for n in self.exclude if n not in known]
        if unknown:
            raise ValueError(f"exclude names layers not in the model: {unknown}")
        self.round_to = int(round_to)
        self.min_channels = int(min_channels)
        excluded = set(self.exclude)
        self.families = [f for f in graph.families()
                         if not any(m.layer in excluded and m.role != "in"
                                    for m in graph.group_by_index(f.groups[0]))]

    def kept_count(self, sparsity, n: int):
        """How many of a family's ``n`` groups stay at ``sparsity`` (NumPy or TF scalar)."""
        return _kept_count(sparsity, n, self.round_to, self.min_channels)

    def weight_terms(self, layers: dict | None = None) -> list[WeightTerm]:
        """`WeightTerm` for every channel-dependent weight (``layers``: name -> layer to
        read the weights from; default the graph's model)."""
        return weight_terms(self.graph, layers)

    def keep_from_scores(self, scores, sparsity):
        """Keep vector (float32, one per group) masking each family's lowest scores."""
        keep = tf.ones([self.graph.num_groups], tf.float32)
        for family in self.families:
            idx = np.asarray(family.groups, np.int32)
            n_pruned = len(idx) - self.kept_count(sparsity, len(idx))
            order = tf.argsort(tf.gather(scores, idx), stable=True)
            pruned = tf.gather(idx, order[:n_pruned])
            keep = tf.tensor_scatter_nd_update(keep, pruned[:, None],
                                               tf.zeros_like(pruned, tf.float32))
        return keep

    def scores(self, layers: dict | None = None, keep=None):
        """Group scores of the current weights (tensor of ``graph.num_groups``).

        Groups already masked (``keep`` is 0, or without ``keep`` all their weights are
        exactly zero) score -1 so they stay masked, whatever the importance says.
        """
        terms = self.weight_terms(layers)
        num_groups = self.graph.num_groups
        scores = tf.convert_to_tensor(self.importance(terms, num_groups), tf.float32)
        if keep is None:
            alive = masked_weight_norm(terms, num_groups) > 0
        else:
            alive = keep > 0.5
        return tf.where(alive, scores, tf.fill(tf.shape(scores), -1.0))

    def family_sparsity_of(self, keep: np.ndarray) -> dict[str, float]:
        """Fraction of each family's groups that ``keep`` (bool per group) masks."""
        return {f.name: float(1 - keep[list(f.groups)].mean()) for f in self.families}


def group_scores(model: keras.Model, importance="l2", graph: DependencyGraph | None = None
                 ) -> np.ndarray:
    """Importance of every group of ``model`` now (NumPy; masked groups score -1).

        scores = group_scores(model)            # GroupL2
    """
    graph = graph or DependencyGraph(model)
    return GroupSelector(graph, importance).scores().numpy()


def select_groups(model: keras.Model, sparsity: float, importance="l2",
                  graph: DependencyGraph | None = None, exclude: Iterable[str] = (),
                  round_to: int = 1, min_channels: int = 1) -> np.ndarray:
    """One-shot: the groups that pruning at ``sparsity`` would mask now (sorted indices).

    The same rule the TF-MOT wrappers apply in training, on the current weights::

        removed = select_groups(model, 0.3)
        small = remove_channels(model, removed)
    """
    graph = graph or DependencyGraph(model)
    selector = GroupSelector(graph, importance, exclude, round_to, min_channels)
    keep = selector.keep_from_scores(selector.scores(), tf.constant(sparsity, tf.float32))
    return np.flatnonzero(keep.numpy() < 0.5)


def groups_to_prune(graph: DependencyGraph, sparsity: float, exclude: Iterable[str] = (),
                    round_to: int = 1, min_channels: int = 1) -> np.ndarray:
    """Some group set of the size pruning at ``sparsity`` masks (the first groups of each
    family): enough to count parameters and bytes before any weights are looked at.

        flash_bytes(model, groups_to_prune(graph, 0.3), graph)
    """
    selector = GroupSelector(graph, None, exclude, round_to, min_channels)
    removed = []
    for family in selector.families:
        n = len(family.groups)
        removed += list(family.groups[:n - selector.kept_count(sparsity, n)])
    return np.array(sorted(removed), dtype=np.int64)
