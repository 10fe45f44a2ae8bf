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

``exclude`` names layers whose own channels (outputs, depthwise or BatchNorm channels)
are never pruned: every family they belong to is left whole (their input channels may
still shrink). Sparsity ``s`` means: in every other `Family` (e.g. the 96 expansion
channels of one block, or the channels of one residual stream) the ``floor(s * n)`` least
important groups are masked (rounded so the kept count is a multiple of ``round_to``, at
least ``min_channels`` kept). Masked groups score below all others, so they stay masked
as the sparsity grows. Group importance is pluggable (`GroupL2`, the default: L2 norm of
all coupled conv/dense/depthwise weights; `BatchNormScale`; `RandomImportance`; or any
callable). Example::

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

import dataclasses
from typing import Iterable, Sequence

import numpy as np
from tensorflow_model_optimization.python.core.sparsity.keras import pruning_impl
from tensorflow_model_optimization.python.core.sparsity.keras import (
    pruning_schedule as tfmot_schedule)
from tensorflow_model_optimization.python.core.sparsity.keras import pruning_wrapper

from dgst_tf.core.graph import check_functional, rebuild
from dgst_tf.core.keras_compat import keras, require_keras2, tf
from dgst_tf.pruning.dependency_graph import DependencyGraph

__all__ = ["PruneChannelGroups", "ChannelGroupPruner", "prune_channel_groups",
           "channel_pruner", "select_groups", "group_scores", "groups_to_prune",
           "masked_weights", "prune_while_training", "PruningResult",
           "segment_sum_of_squares",
           "WeightTerm", "GroupImportance", "GroupL2", "BatchNormScale", "RandomImportance",
           "get_group_importance"]

_EPS = np.float32(1e-4)  # s * n a hair below an integer still counts as that integer
_KERNELS = ("kernel", "depthwise_kernel")


# ---------------------------------------------------------------------------- importance
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
    """Sum of squared entries of ``term.value`` per group ([num_groups] tensor)."""
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

    def __init__(self, weights: Iterable[str] = _KERNELS):
        self.weights = tuple(weights)

    def __call__(self, terms, num_groups):
        parts = [segment_sum_of_squares(t, num_groups) for t in terms if t.weight in self.weights]
        if not parts:
            return tf.zeros([num_groups])
        return tf.sqrt(tf.add_n(parts))

    def get_config(self):
        return {"name": self.name, "weights": list(self.weights)}


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


class RandomImportance(GroupImportance):
    """Seeded random scores (a baseline). Already masked groups score 0, so the choice
    stays nested as the sparsity grows.

        RandomImportance(seed=0)
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


_IMPORTANCES = {"l2": GroupL2, "bn_scale": BatchNormScale, "random": RandomImportance}


def get_group_importance(spec) -> GroupImportance:
    """``"l2"`` (default), ``"bn_scale"``, ``"random"``, a `GroupImportance`, or any
    callable ``(terms, num_groups) -> scores``.

        get_group_importance("l2")
    """
    if spec is None:
        return GroupL2()
    if isinstance(spec, str):
        try:
            return _IMPORTANCES[spec]()
        except KeyError:
            raise ValueError(f"unknown group importance {spec!r}; choose from "
                             f"{sorted(_IMPORTANCES)} or pass a callable") from None
    if callable(spec):
        return spec
    raise TypeError(f"importance must be a name or a callable, got {type(spec).__name__}")


# ----------------------------------------------------------------------- pruning counts
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


# ----------------------------------------------------------------------- the controller
class ChannelGroupPruner:
    """What every `PruneChannelGroups` wrapper of one model shares: the dependency graph,
    the families to prune, the importance, and the keep vector (1 = kept, one per group).

    Get it from a wrapped model with `channel_pruner`::

        pruner = channel_pruner(pruning_model)
        pruner.removed_groups()            # masked group indices (NumPy)
        pruner.family_sparsity()           # {family: fraction masked}
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
        self.keep_variable = None
        self._wrappers: dict[str, "PruneChannelGroups"] = {}

    # -- weights -------------------------------------------------------------------------
    def weight_terms(self, layers: dict | None = None) -> list[WeightTerm]:
        """`WeightTerm` for every channel-dependent weight (``layers``: name -> layer to
        read the weights from; default the graph's model)."""
        terms = []
        for layer in self.graph.layers():
            source = (layers or {}).get(layer.name, layer)
            for attr, axis, groups in self.graph.weight_axes(layer.name):
                if attr in ("moving_mean", "moving_variance"):
                    continue
                terms.append(WeightTerm(layer.name, attr, getattr(source, attr), axis, groups))
        return terms

    def keep_from_scores(self, scores, sparsity):
        """Keep vector (float32, one per group) masking each family's lowest scores."""
        keep = tf.ones([self.graph.num_groups], tf.float32)
        for family in self.families:
            idx = np.asarray(family.groups, np.int32)
            n = len(idx)
            n_pruned = n - _kept_count(sparsity, n, self.round_to, self.min_channels)
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
        scores = tf.convert_to_tensor(self.importance(terms, self.graph.num_groups),
                                      tf.float32)
        if keep is None:
            alive = GroupL2(_KERNELS + ("bias", "gamma", "beta"))(terms,
                                                                self.graph.num_groups) > 0
        else:
            alive = keep > 0.5
        return tf.where(alive, scores, tf.fill(tf.shape(scores), -1.0))

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
        keep = self.keep()
        return {f.name: float(1 - keep[list(f.groups)].mean()) for f in self.families}


# ------------------------------------------------------------------------- TF-MOT parts
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


def masked_weights(graph: DependencyGraph, layer_name: str) -> list[str]:
    """Attributes of the weights a wrapper masks (moving BatchNorm statistics are not)."""
    names = []
    for attr, _, _ in graph.weight_axes(layer_name):
        if attr not in names and attr not in ("moving_mean", "moving_variance"):
            names.append(attr)
    return names


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


# ------------------------------------------------------------------------ public entry
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
    """The `ChannelGroupPruner` of a model made by `prune_channel_groups`."""
    for layer in pruning_model.layers:
        if isinstance(layer, PruneChannelGroups):
            return layer.pruner
    raise ValueError(f"model {pruning_model.name!r} has no PruneChannelGroups wrapper; "
                     "build it with prune_channel_groups")


def group_scores(model: keras.Model, importance="l2", graph: DependencyGraph | None = None
                 ) -> np.ndarray:
    """Importance of every group of ``model`` now (NumPy; masked groups score -1).

        scores = group_scores(model)            # GroupL2
    """
    graph = graph or DependencyGraph(model)
    return ChannelGroupPruner(graph, importance).scores().numpy()


def select_groups(model: keras.Model, sparsity: float, importance="l2",
                  graph: DependencyGraph | None = None, exclude: Iterable[str] = (),
                  round_to: int = 1, min_channels: int = 1) -> np.ndarray:
    """One-shot: the groups that pruning at ``sparsity`` would mask now (sorted indices).

    The same rule the TF-MOT wrappers apply in training, on the current weights::

        removed = select_groups(model, 0.3)
        small = remove_channels(model, removed)
    """
    graph = graph or DependencyGraph(model)
    pruner = ChannelGroupPruner(graph, importance, exclude, round_to, min_channels)
    keep = pruner.keep_from_scores(pruner.scores(), tf.constant(sparsity, tf.float32))
    return np.flatnonzero(keep.numpy() < 0.5)


def groups_to_prune(graph: DependencyGraph, sparsity: float, exclude: Iterable[str] = (),
                    round_to: int = 1, min_channels: int = 1) -> np.ndarray:
    """Some group set of the size pruning at ``sparsity`` masks (the first groups of each
    family): enough to count parameters and bytes before any weights are looked at."""
    pruner = ChannelGroupPruner(graph, None, exclude, round_to, min_channels)
    removed = []
    for family in pruner.families:
        n = len(family.groups)
        removed += list(family.groups[:n - _kept_count(sparsity, n, pruner.round_to,
                                                        pruner.min_channels)])
    return np.array(sorted(removed), dtype=np.int64)



@dataclasses.dataclass
class PruningResult:
    """What `prune_while_training` returns: the smaller model and how it got there."""

    model: keras.Model            # channels physically removed
    masked_model: keras.Model     # stripped TF-MOT model (zeros, original shapes)
    removed_groups: np.ndarray
    family_sparsity: dict
    history: dict
    schedule: object


def prune_while_training(model: keras.Model, dataset, final_sparsity: float, *,
                         epochs: int = 1, steps_per_epoch: int | None = None,
                         optimizer=None, loss=None, metrics=("accuracy",),
                         ramp_fraction: float = 0.75, updates: int = 10, power: int = 3,
                         importance="l2", exclude: Iterable[str] = (), round_to: int = 1,
                         min_channels: int = 1, callbacks=(), verbose: int = 0,
                         validation_data=None) -> PruningResult:
    """Fine-tune ``model`` on ``dataset`` while TF-MOT's ``PolynomialDecay`` raises the
    channel-group sparsity from 0 to ``final_sparsity`` over the first ``ramp_fraction`` of
    the steps (``updates`` mask updates), then strip and physically remove the channels.

    Default optimizer: SGD, learning rate 0.003, momentum 0.9. Trains ``model``'s own
    variables (as ``prune_low_magnitude`` does). If the data ran out
    before the last scheduled update, the final sparsity is applied once at the end, so
    the result always has it.

        result = prune_while_training(model, train.dataset, 0.35, epochs=2,
                                      steps_per_epoch=train.steps_per_epoch)
        result.model.save("pruned.h5")
    """
    from tensorflow_model_optimization.python.core.sparsity.keras import (
        prune as tfmot_prune, pruning_callbacks)

    from dgst_tf.pruning.channel_removal import remove_channels, zeroed_groups

    if not 0.0 <= final_sparsity < 1.0:
        raise ValueError(f"final_sparsity must be in [0, 1), got {final_sparsity}")
    if steps_per_epoch is None:
        cardinality = int(tf.data.experimental.cardinality(dataset))
        if cardinality < 1:
            raise ValueError("dataset has unknown length: pass steps_per_epoch")
        steps_per_epoch = cardinality
    total = max(1, int(epochs) * int(steps_per_epoch))
    frequency = max(1, int(total * ramp_fraction) // max(1, int(updates)))
    end_step = max(frequency, int(total * ramp_fraction) // frequency * frequency)
    schedule = tfmot_schedule.PolynomialDecay(
        initial_sparsity=0.0, final_sparsity=float(final_sparsity), begin_step=0,
        end_step=end_step, power=power, frequency=frequency)
    graph = DependencyGraph(model)
    pruning = prune_channel_groups(model, schedule, importance=importance, graph=graph,
                                   exclude=exclude, round_to=round_to,
                                   min_channels=min_channels)
    pruning.compile(
        optimizer=optimizer or keras.optimizers.SGD(0.003, momentum=0.9),
        loss=loss or keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=list(metrics))
    history = pruning.fit(dataset, epochs=epochs, steps_per_epoch=steps_per_epoch,
                          callbacks=[pruning_callbacks.UpdatePruningStep(), *callbacks],
                          verbose=verbose, validation_data=validation_data)
    masked = tfmot_prune.strip_pruning(pruning)
    masked_graph = DependencyGraph(masked)
    removed = zeroed_groups(masked, masked_graph)
    target = select_groups(masked, final_sparsity, importance=importance, graph=masked_graph,
                           exclude=exclude, round_to=round_to, min_channels=min_channels)
    if len(target) > len(removed):  # the schedule's last update was not reached
        from dgst_tf.pruning.channel_removal import mask_groups

        masked = mask_groups(masked, target, masked_graph)
        masked_graph = DependencyGraph(masked)
        removed = zeroed_groups(masked, masked_graph)
    small = remove_channels(masked, removed, masked_graph, name=f"{model.name}_pruned")
    keep = np.ones(masked_graph.num_groups, bool)
    keep[removed] = False
    family = {f.name: float(1 - keep[list(f.groups)].mean())
              for f in ChannelGroupPruner(masked_graph, None, exclude).families}
    return PruningResult(small, masked, removed, family, dict(history.history), schedule)
