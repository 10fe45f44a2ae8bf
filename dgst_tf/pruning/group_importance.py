"""How important each channel group is: the scores pruning masks the lowest of.

An importance is a callable ``(terms, num_groups) -> scores`` over the `WeightTerm` list of
a model's channel-dependent weights (`dgst_tf.pruning.channel_weights.weight_terms`); it
runs inside the training graph (TensorFlow ops).
The named ones are in `GROUP_IMPORTANCES`: `GroupL2` (``"l2"``, the default: L2 norm of all
coupled conv/dense/depthwise weights), `BatchNormScale` (``"bn_scale"``, network slimming)
and `RandomGroupImportance` (``"random"``, a baseline). ::

    from dgst_tf.pruning.channel_weights import weight_terms
    from dgst_tf.pruning.group_importance import get_group_importance

    scores = get_group_importance("l2")(weight_terms(graph), graph.num_groups)
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

import numpy as np

from dgst_tf.core.keras_compat import tf

__all__ = ["WeightTerm", "segment_sum_of_squares", "GroupImportance", "GroupL2",
           "BatchNormScale", "RandomGroupImportance", "GROUP_IMPORTANCES", "get_group_importance",
           "masked_weight_norm", "KERNEL_WEIGHTS"]

KERNEL_WEIGHTS = ("kernel", "depthwise_kernel")
_MASKED = KERNEL_WEIGHTS + ("bias", "gamma", "beta")


@dataclasses.dataclass(frozen=True)
class WeightTerm:
    """One channel-dependent weight seen by an importance: ``groups[i]`` is the group of
    entry ``i`` along ``axis`` of ``value`` (a tensor)."""

    layer: str
    weight: str          # "kernel", "depthwise_kernel", "bias", "gamma", ...
    value: object
    axis: int
    groups: np.ndarray


def segment_sum_of_squares(term: WeightTerm, num_groups: int):
    """Sum of squared entries of ``term.value`` per group ([num_groups] tensor).

        tf.add_n([segment_sum_of_squares(t, graph.num_groups) for t in terms])
    """
    value = tf.convert_to_tensor(term.value)
    rank = len(value.shape)
    perm = [term.axis] + [i for i in range(rank) if i != term.axis]
    per_entry = tf.reduce_sum(tf.reshape(tf.square(tf.transpose(value, perm)),
                                         [value.shape[term.axis], -1]), axis=1)
    return tf.math.unsorted_segment_sum(per_entry, term.groups, num_groups)


class GroupImportance:
    """Scores every channel group (larger = keep). Subclass and implement ``__call__``.

    ``__call__(terms, num_groups)`` gets the `WeightTerm` list of the model's
    channel-dependent weights and returns a float32 tensor of ``num_groups`` scores. It runs
    inside the training graph, so use TensorFlow ops::

        class OutputFiltersOnly(GroupImportance):
            def __call__(self, terms, num_groups):
                return tf.add_n([segment_sum_of_squares(t, num_groups) for t in terms
                                 if t.weight == "kernel" and t.axis == len(t.value.shape) - 1])
    """

    name = "custom"

    def __call__(self, terms: Sequence[WeightTerm], num_groups: int):
        raise NotImplementedError

    def get_config(self) -> dict:
        return {"name": self.name}


class GroupL2(GroupImportance):
    """L2 norm of all weights coupled in a group: the conv/dense output filters, the
    depthwise filters and the consumers' input slices (``weights`` picks the attributes;
    add "bias", "gamma", "beta" to include them).

        scores = GroupL2()(terms, graph.num_groups)
    """

    name = "l2"

    def __init__(self, weights: Iterable[str] = KERNEL_WEIGHTS):
        self.weights = tuple(weights)

    def __call__(self, terms, num_groups):
        parts = [segment_sum_of_squares(t, num_groups) for t in terms if t.weight in self.weights]
        if not parts:
            return tf.zeros([num_groups])
        return tf.sqrt(tf.add_n(parts))

    def get_config(self):
        return {"name": self.name, "weights": list(self.weights)}


def masked_weight_norm(terms: Sequence[WeightTerm], num_groups: int):
    """L2 norm of every weight a mask covers, per group: exactly 0 for a masked group.

        masked = masked_weight_norm(weight_terms(graph), graph.num_groups).numpy() == 0
    """
    return GroupL2(_MASKED)(terms, num_groups)


class BatchNormScale(GroupImportance):
    """Sum of ``|gamma|`` of the BatchNorm channels in a group (network slimming). Groups
    without a BatchNorm fall back to their `GroupL2` score scaled far below any gamma.

        BatchNormScale()(terms, graph.num_groups)
    """

    name = "bn_scale"

    def __call__(self, terms, num_groups):
        gammas = [tf.math.unsorted_segment_sum(tf.abs(tf.convert_to_tensor(t.value)),
                                               t.groups, num_groups)
                  for t in terms if t.weight == "gamma"]
        fallback = GroupL2()(terms, num_groups) * 1e-6
        if not gammas:
            return fallback
        total = tf.add_n(gammas)
        return tf.where(total > 0, total, fallback)


class RandomGroupImportance(GroupImportance):
    """Seeded random scores (a baseline). Already masked groups score 0, so the choice
    stays nested as the sparsity grows. (Not `dgst_tf.training.channel_importance`'s
    ``RandomImportance``, which picks channels to update.)

        RandomGroupImportance(seed=0)
    """

    name = "random"

    def __init__(self, seed: int = 0):
        self.seed = int(seed)

    def __call__(self, terms, num_groups):
        scores = tf.random.stateless_uniform([num_groups], seed=[self.seed, 1],
                                             minval=0.5, maxval=1.0)
        alive = GroupL2()(terms, num_groups) > 0
        return tf.where(alive, scores, tf.zeros_like(scores))

    def get_config(self):
        return {"name": self.name, "seed": self.seed}


GROUP_IMPORTANCES = {cls.name: cls for cls in (GroupL2, BatchNormScale, RandomGroupImportance)}


def get_group_importance(spec) -> GroupImportance:
    """``"l2"`` (default), ``"bn_scale"``, ``"random"``, a `GroupImportance`, or any
    callable ``(terms, num_groups) -> scores``.

        get_group_importance("l2")
    """
    if spec is None:
        return GroupL2()
    if isinstance(spec, str):
        try:
            return GROUP_IMPORTANCES[spec]()
        except KeyError:
            raise ValueError(f"unknown group importance {spec!r}; choose from "
                             f"{sorted(GROUP_IMPORTANCES)} or pass a callable") from None
    if callable(spec):
        return spec
    raise TypeError(f"importance must be a name or a callable, got {type(spec).__name__}")
