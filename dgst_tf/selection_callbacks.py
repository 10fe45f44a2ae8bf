"""Callbacks that choose which channels (and layers) a `SparseUpdateModel` step updates.

They only move the model's `SelectionState`; the training loop stays Keras' own.

    from dgst_tf.selection_callbacks import StaticChannelSelection, DynamicChannelSelection

    # Lin et al. 2022: top-k input channels by weight magnitude, fixed before training
    sparse.fit(ds, callbacks=[StaticChannelSelection("magnitude+")])

    # DGSU: new channels every iteration; channels not yet visited in the current sweep
    # come first, ranked by importance, so coverage grows to ~100%
    sparse.fit(ds, callbacks=[DynamicChannelSelection(importance="weight_l2", seed=0)])

Both are deterministic given the seed and the model's step counter, which is saved with
the model's weights, so a run resumed from a checkpoint continues with the same choices.
"""
import numpy as np

from dgst_tf.channel_importance import WeightL2, get_importance, top_k
from dgst_tf.keras_compat import keras

CRITERIA = ("magnitude+", "magnitude-", "random")


def _sparse_model(callback):
    model = callback.model
    if not hasattr(model, "selection"):
        raise TypeError(f"{type(callback).__name__} needs a dgst_tf.SparseUpdateModel, got "
                        f"{type(model).__name__}")
    return model


class StaticChannelSelection(keras.callbacks.Callback):
    """Pick each weight-updated layer's channels once, before the first step.

    ``criterion``: tiny-training's ``weight_select_criteria``: ``magnitude+`` (largest L2
    norm of ``W[:, :, c, :]``), ``magnitude-`` (smallest) or ``random``. A resumed run
    (step counter > 0) keeps the restored selection.
    """

    def __init__(self, criterion: str = "magnitude+", seed: int = 0):
        super().__init__()
        if criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
        self.criterion, self.seed = criterion, seed

    def get_config(self):
        return {"criterion": self.criterion, "seed": self.seed}

    def on_train_begin(self, logs=None):
        model = _sparse_model(self)
        if int(model.selection.step.numpy()) > 0:
            return
        for i, layer in enumerate(model.weight_layers):
            state = model.selection.numpy(layer.name)
            kept = model.selection.specs[layer.name][1]
            if self.criterion == "random":
                scores = np.random.default_rng([self.seed, i]).random(len(state["visited"]))
            else:
                scores = WeightL2().scores(layer, state, 0)
                if self.criterion == "magnitude-":
                    scores = -scores
            model.selection.assign(layer.name, np.sort(top_k(scores, kept, [self.seed, i])))


class DynamicChannelSelection(keras.callbacks.Callback):
    """Reselect every weight-updated layer's channels before every step (DGSU).

    importance: "weight_l2", "grad_norm", "random" or a `ChannelImportance`.
    traversal: channels not yet visited in the current sweep come first; a sweep ends when
        every channel of the layer was visited.
    layers_per_step: update only this many of the weight-updated layers per step (taken in
        turn), the others train only their biases; None updates all of them.
    """

    def __init__(self, importance="weight_l2", traversal: bool = True,
                 layers_per_step: int | None = None, seed: int = 0):
        super().__init__()
        self.importance = get_importance(importance, seed)
        self.traversal, self.layers_per_step, self.seed = traversal, layers_per_step, seed

    def get_config(self):
        return {"importance": self.importance.get_config(), "traversal": self.traversal,
                "layers_per_step": self.layers_per_step, "seed": self.seed}

    def _active_layers(self, step: int, count: int) -> set:
        if not self.layers_per_step or self.layers_per_step >= count:
            return set(range(count))
        start = (step * self.layers_per_step) % count
        return {(start + j) % count for j in range(self.layers_per_step)}

    def choose(self, layer, state: dict, kept: int, step: int, index: int) -> np.ndarray:
        """The channels ``layer`` updates at ``step`` (``state``: its SelectionState)."""
        scores = self.importance.scores(layer, state, step)
        tie_seed = [self.seed, step, index]
        if not self.traversal:
            return np.sort(top_k(scores, kept, tie_seed))
        fresh = np.flatnonzero(~state["sweep"])
        if len(fresh) >= kept:
            return np.sort(fresh[top_k(scores[fresh], kept, tie_seed)])
        rest = np.flatnonzero(state["sweep"])
        extra = rest[top_k(scores[rest], kept - len(fresh), tie_seed)]
        return np.sort(np.concatenate([fresh, extra]))

    def on_train_batch_begin(self, batch, logs=None):
        model = _sparse_model(self)
        step = int(model.selection.step.numpy())
        layers = model.weight_layers
        active = self._active_layers(step, len(layers))
        for i, layer in enumerate(layers):
            state = model.selection.numpy(layer.name)
            if state["sweep"].all():  # sweep finished: start the next one
                model.selection.vars[layer.name]["sweep"].assign(np.zeros_like(state["sweep"]))
                state["sweep"][:] = False
            kept = model.selection.specs[layer.name][1]
            model.selection.assign(layer.name, self.choose(layer, state, kept, step, i),
                                   active=i in active)
