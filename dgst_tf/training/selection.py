"""Callbacks that choose which channels (and layers) a `SparseUpdateModel` step updates.

They only move the model's `SelectionState`; the training loop stays Keras' own.

    from dgst_tf.training.selection import StaticChannelSelection, DynamicChannelSelection

    # Lin et al. 2022: top-k input channels by weight magnitude, fixed before training
    sparse.fit(ds, callbacks=[StaticChannelSelection("magnitude+")])

    # DGSU: new channels every iteration; channels not yet visited in the current sweep
    # come first, ranked by importance, so coverage grows to ~100%
    sparse.fit(ds, callbacks=[DynamicChannelSelection(importance="weight_l2", seed=0)])

Both are deterministic given the seed and the model's step counter, which is saved with
the model's weights, so a run resumed from a checkpoint continues with the same choices.
The dynamic choice for all layers runs inside the compiled train step (the callback installs
it with `SparseUpdateModel.set_selection_hook`), so no Python runs between steps.
"""
from dgst_tf.core.keras_compat import keras, tf
from dgst_tf.core.layer_kinds import kernel_of
from dgst_tf.training.channel_importance import WeightL2, get_importance, top_k_channels

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
        model.set_selection_hook(None)  # a static choice: no per-step reselection
        if int(model.selection.step.numpy()) > 0:
            return
        for i, layer in enumerate(model.weight_layers):
            state = model.selection.vars[layer.name]
            kept = model.selection.specs[layer.name][1]
            if self.criterion == "random":
                scores = tf.random.stateless_uniform(state["visited"].shape, seed=[self.seed, i])
            else:
                scores = WeightL2().scores(kernel_of(layer), state, 0, i)
                if self.criterion == "magnitude-":
                    scores = -scores
            model.selection.assign(layer.name, top_k_channels(scores, kept).numpy())


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
        self._select = self._select_model = None

    def get_config(self):
        return {"importance": self.importance.get_config(), "traversal": self.traversal,
                "layers_per_step": self.layers_per_step, "seed": self.seed}

    def _build(self, model):
        layers = model.weight_layers
        count = len(layers)
        per_step = self.layers_per_step if self.layers_per_step else count

        def select():
            step = model.selection.step.read_value()
            start = (step * per_step) % count if count else step
            for i, layer in enumerate(layers):
                state = model.selection.vars[layer.name]
                kept = model.selection.specs[layer.name][1]
                sweep = state["sweep"].read_value()
                sweep = tf.where(tf.reduce_all(sweep), tf.zeros_like(sweep), sweep)
                state["sweep"].assign(sweep)  # a finished sweep starts again
                scores = self.importance.scores(kernel_of(layer), state, step, i)
                preferred = tf.logical_not(sweep) if self.traversal else None
                state["indices"].assign(top_k_channels(scores, kept, preferred))
                offset = (i - start) % count
                state["active"].assign(offset < per_step)

        return select

    def on_train_begin(self, logs=None):
        model = _sparse_model(self)
        if self._select is None or self._select_model is not model:
            self._select, self._select_model = self._build(model), model
        # runs inside every compiled train step; stays installed for later fits of this
        # model (same function: no retrace) until another selection callback replaces it
        model.set_selection_hook(self._select)
