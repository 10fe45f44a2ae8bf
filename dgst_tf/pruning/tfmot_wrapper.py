"""Structured (channel-group) pruning driven by TensorFlow Model Optimization.

TF-MOT's ``prune_low_magnitude`` zeroes single weights of Conv2D/Dense kernels. Here the
unit is a channel group of the `DependencyGraph` (a conv's output channel together with
its BatchNorm channel, the depthwise filter, the consumers' input slices and, across
residual adds, the coupled channels of the other branches). Everything else is TF-MOT's:

- `PruneChannelGroups` is a subclass of TF-MOT's ``PruneLowMagnitude`` wrapper. Its
  pruning object (a subclass of TF-MOT's ``Pruning``) computes masks from group scores
  instead of weight magnitudes; masks are applied with TF-MOT's own ``weight_mask_op``.
- The target sparsity comes from a TF-MOT ``PruningSchedule`` (``PolynomialDecay``,
  ``ConstantSparsity``...) evaluated at the wrapper's ``pruning_step``; masks change only
  at the steps where the schedule says so.
- Training needs TF-MOT's ``UpdatePruningStep`` callback (it starts ``pruning_step`` and
  re-applies masks at the end of each epoch; without it ``fit`` fails with TF-MOT's error),
  and ``tfmot.sparsity.keras.strip_pruning`` removes the wrappers afterwards.

Which groups are masked at a sparsity is `dgst_tf.pruning.group_selection`'s rule (per
family, least important first, ``exclude`` / ``round_to`` / ``min_channels``); group
importance is pluggable (`dgst_tf.pruning.group_importance`). Example::

    import tensorflow_model_optimization as tfmot
    from dgst_tf.pruning import prune_channel_groups, remove_channels

    schedule = tfmot.sparsity.keras.PolynomialDecay(0.0, 0.4, begin_step=0, end_step=300,
                                                    frequency=50)
    pruning = prune_channel_groups(model, schedule)          # shares model's variables
    pruning.compile(optimizer="sgd", loss=loss, metrics=["accuracy"])
    pruning.fit(train_ds, epochs=2, callbacks=[tfmot.sparsity.keras.UpdatePruningStep()])
    masked = tfmot.sparsity.keras.strip_pruning(pruning)     # zeros, same shapes
    small = remove_channels(masked)                          # physically smaller model
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
from tensorflow_model_optimization.python.core.sparsity.keras import pruning_impl
from tensorflow_model_optimization.python.core.sparsity.keras import (
    pruning_schedule as tfmot_schedule)
from tensorflow_model_optimization.python.core.sparsity.keras import pruning_wrapper

from dgst_tf.core.graph import check_functional, rebuild
from dgst_tf.core.keras_compat import keras, require_keras2, tf
from dgst_tf.pruning.channel_weights import masked_weights
from dgst_tf.pruning.dependency_graph import DependencyGraph
from dgst_tf.pruning.group_selection import GroupSelector

__all__ = ["ChannelGroupPruner", "PruneChannelGroups", "prune_channel_groups",
           "channel_pruner"]


class ChannelGroupPruner(GroupSelector):
    """What every `PruneChannelGroups` wrapper of one model shares: the selection rule
    (`GroupSelector`: graph, families, importance) and the keep vector (1 = kept, one per
    group) that the wrappers' masks are made from.

    Get it from a wrapped model with `channel_pruner`::

        pruner = channel_pruner(pruning_model)
        pruner.removed_groups()            # masked group indices (NumPy)
        pruner.family_sparsity()           # {family: fraction masked}
    """

    def __init__(self, graph: DependencyGraph, importance=None, exclude: Iterable[str] = (),
                 round_to: int = 1, min_channels: int = 1):
        super().__init__(graph, importance, exclude, round_to, min_channels)
        self.keep_variable = None
        self._wrappers: dict[str, "PruneChannelGroups"] = {}

    # -- inside the training graph -------------------------------------------------------
    def _ready(self) -> bool:
        names = {l.name for l in self.graph.layers() if self.graph.weight_axes(l.name)}
        return (self.keep_variable is not None and set(self._wrappers) >= names
                and all(w.layer.built for w in self._wrappers.values()))

    def update_keep(self, sparsity):
        """Op: recompute the keep vector at ``sparsity`` from the current weights."""
        if not self._ready():  # functional construction: layers not built yet
            return tf.no_op()
        layers = {name: w.layer for name, w in self._wrappers.items()}
        scores = self.scores(layers, keep=self.keep_variable)
        return self.keep_variable.assign(self.keep_from_scores(scores, sparsity))

    def mask_for(self, layer_name: str, weight: str, shape):
        """Mask tensor of one weight from the keep vector (product over its channel axes)."""
        keep = tf.concat([self.keep_variable, [1.0]], axis=0)
        mask = tf.ones(shape, tf.float32)
        for attr, axis, groups in self.graph.weight_axes(layer_name):
            if attr != weight:
                continue
            pinned = ~self.graph.prunable[groups] | self._excluded(groups)
            index = np.where(pinned, self.graph.num_groups, groups).astype(np.int32)
            along = tf.gather(keep, index)
            broadcast = [1] * len(shape)
            broadcast[axis] = -1
            mask = mask * tf.reshape(along, broadcast)
        return mask

    def _excluded(self, groups: np.ndarray) -> np.ndarray:
        allowed = np.zeros(self.graph.num_groups, bool)
        for family in self.families:
            allowed[list(family.groups)] = True
        return ~allowed[groups]

    # -- after / outside training ----------------------------------------------------------
    def keep(self) -> np.ndarray:
        """The keep vector as a NumPy bool array (all True before the first pruning step)."""
        if self.keep_variable is None:
            return np.ones(self.graph.num_groups, bool)
        return self.keep_variable.numpy() > 0.5

    def removed_groups(self) -> np.ndarray:
        """Indices of the masked groups (sorted)."""
        return np.flatnonzero(~self.keep())

    def family_sparsity(self) -> dict[str, float]:
        """Fraction of each family's groups that is masked now."""
        return self.family_sparsity_of(self.keep())


class _GroupMaskPruning(pruning_impl.Pruning):
    """TF-MOT's ``Pruning`` with masks from channel-group scores instead of magnitudes."""

    def __init__(self, training_step_fn, pruning_vars, pruning_schedule, pruner, layer_name,
                 coordinator):
        super().__init__(training_step_fn=training_step_fn, pruning_vars=pruning_vars,
                         pruning_schedule=pruning_schedule, block_size=(1, 1),
                         block_pooling_type="AVG")
        self._pruner = pruner
        self._layer_name = layer_name
        self._coordinator = coordinator
        self._weight_names = masked_weights(pruner.graph, layer_name)

    def conditional_mask_update(self):
        should_prune, sparsity = self._pruning_schedule(self._step_fn())

        def update():
            first = [self._pruner.update_keep(sparsity)] if self._coordinator else []
            with tf.control_dependencies(first):
                if self._pruner.keep_variable is None:
                    return tf.no_op()
                assigns = []
                for name, (weight, mask, threshold) in zip(self._weight_names,
                                                           self._pruning_vars):
                    new = tf.cast(self._pruner.mask_for(self._layer_name, name, weight.shape),
                                  mask.dtype)
                    assigns.append(mask.assign(new))
                    assigns.append(threshold.assign(tf.cast(sparsity, threshold.dtype)))
                return tf.group(assigns)

        return tf.cond(should_prune, update, tf.no_op)


class PruneChannelGroups(pruning_wrapper.PruneLowMagnitude):
    """TF-MOT pruning wrapper whose masks remove whole channel groups.

    Built by `prune_channel_groups`; masks every channel-dependent weight of the wrapped
    Conv2D / DepthwiseConv2D / Dense / BatchNormalization (kernels, biases, gamma, beta),
    so a masked channel outputs exactly zero and consumers ignore it. Train with
    ``tfmot.sparsity.keras.UpdatePruningStep()``; remove with ``strip_pruning``.
    """

    def __init__(self, layer, pruning_schedule, pruner: ChannelGroupPruner,
                 coordinator: bool = False, **kwargs):
        if not isinstance(pruning_schedule, tfmot_schedule.PruningSchedule):
            raise TypeError("pruning_schedule must be a TF-MOT PruningSchedule (e.g. "
                            "tfmot.sparsity.keras.PolynomialDecay), got "
                            f"{type(pruning_schedule).__name__}")
        super().__init__(layer, pruning_schedule=pruning_schedule, **kwargs)
        self.coordinator = bool(coordinator)
        self._pruner_ref = lambda: pruner  # shared, not tracked twice
        pruner._wrappers[layer.name] = self

    @property
    def pruner(self) -> ChannelGroupPruner:
        return self._pruner_ref()

    def build(self, input_shape):
        pruning_wrapper.Wrapper.build(self, input_shape)
        pruner = self.pruner
        weights, masks, thresholds = [], [], []
        for name in masked_weights(pruner.graph, self.layer.name):
            weight = getattr(self.layer, name)
            weights.append(weight)
            masks.append(self.add_weight(f"{name}_mask", shape=weight.shape,
                                         initializer="ones", dtype=weight.dtype,
                                         trainable=False,
                                         aggregation=tf.VariableAggregation.MEAN))
            thresholds.append(self.add_weight(f"{name}_threshold", shape=[],
                                              initializer="zeros", dtype=weight.dtype,
                                              trainable=False,
                                              aggregation=tf.VariableAggregation.MEAN))
        self.prunable_weights = weights
        self.pruning_vars = list(zip(weights, masks, thresholds))
        self.pruning_step = self.add_weight(
            "pruning_step", shape=[], initializer=keras.initializers.Constant(-1),
            dtype=tf.int64, trainable=False)
        if self.coordinator:
            pruner.keep_variable = self.add_weight(
                "channel_group_keep", shape=[pruner.graph.num_groups], initializer="ones",
                dtype=tf.float32, trainable=False)
        self.pruning_obj = _GroupMaskPruning(
            training_step_fn=lambda: self.pruning_step, pruning_vars=self.pruning_vars,
            pruning_schedule=self.pruning_schedule, pruner=pruner,
            layer_name=self.layer.name, coordinator=self.coordinator)

    def get_config(self):
        raise NotImplementedError(
            "PruneChannelGroups wrappers are not serialisable: call "
            "tfmot.sparsity.keras.strip_pruning(model) before saving")


def prune_channel_groups(model: keras.Model, pruning_schedule, importance="l2",
                         graph: DependencyGraph | None = None, exclude: Iterable[str] = (),
                         round_to: int = 1, min_channels: int = 1) -> keras.Model:
    """Wrap ``model`` for channel-group pruning with TF-MOT (see the module doc).

    Like ``tfmot.sparsity.keras.prune_low_magnitude`` the result shares the variables of
    ``model``. ``exclude`` names layers whose own (output) channels are never pruned.

        pruning = prune_channel_groups(model, tfmot.sparsity.keras.ConstantSparsity(0.5, 0))
        pruning.fit(ds, callbacks=[tfmot.sparsity.keras.UpdatePruningStep()])
        channel_pruner(pruning).removed_groups()
    """
    require_keras2(model, "prune_channel_groups")
    check_functional(model, "prune_channel_groups")
    graph = graph or DependencyGraph(model)
    if graph.model is not model:
        raise ValueError("graph was built for a different model")
    pruner = ChannelGroupPruner(graph, importance, exclude, round_to, min_channels)
    wrapped_names = [l.name for l in graph.layers() if graph.weight_axes(l.name)]
    if not wrapped_names:
        raise ValueError(f"model {model.name!r} has no layer with prunable channels")
    first = wrapped_names[0]

    def call_layer(layer, args, kwargs):
        if layer.name in wrapped_names:
            wrapper = PruneChannelGroups(layer, pruning_schedule, pruner,
                                         coordinator=layer.name == first)
            return wrapper(*args, **kwargs)
        return layer(*args, **kwargs)

    pruning_model = rebuild(model, call_layer, name=f"{model.name}_channel_pruning")
    pruning_model.channel_pruner = pruner
    return pruning_model


def channel_pruner(pruning_model: keras.Model) -> ChannelGroupPruner:
    """The `ChannelGroupPruner` of a model made by `prune_channel_groups`.

        channel_pruner(pruning_model).family_sparsity()
    """
    for layer in pruning_model.layers:
        if isinstance(layer, PruneChannelGroups):
            return layer.pruner
    raise ValueError(f"model {pruning_model.name!r} has no PruneChannelGroups wrapper; "
                     "build it with prune_channel_groups")
