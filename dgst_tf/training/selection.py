"""Callbacks that choose which channels (and layers) a `SparseUpdateModel` step updates.

They only move the model's `SelectionState`; the training loop stays Keras' own.

    from dgst_tf.training.selection import StaticChannelSelection, DynamicChannelSelection

    # Lin et al. 2022: top-k input channels by weight magnitude, fixed before training
    sparse.fit(ds, callbacks=[StaticChannelSelection("magnitude+")])

    # DGSU: new channels every iteration; channels not yet visited in the current sweep
    # come first, ranked by importance, so coverage grows to ~100%
    sparse.fit(ds, callbacks=[DynamicChannelSelection(importance="weight_l2", seed=0)])

    # the device's sliding window (export policy "window")
    sparse.fit(ds, callbacks=[WindowChannelSelection()])

Both are deterministic given the seed and the model's step counter, which is saved with
the model's weights, so a run resumed from a checkpoint continues with the same choices.
The dynamic choice for all layers runs inside the compiled train step (the callback installs
it with `SparseUpdateModel.set_selection_hook`), so no Python runs between steps.
"""
import numpy as np

from dgst_tf.core.keras_compat import keras, tf
from dgst_tf.core.layer_kinds import input_channels, is_depthwise, kernel_of
from dgst_tf.training.channel_importance import (WeightL2, channel_axis, get_importance,
                                                 int8_channel_scores, top_k_channels)

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
    norm of ``W[:, :, c, :]``), ``magnitude-`` (smallest) or ``random``. On the int8 training
    graph ``magnitude+`` ranks the real weights (int8 codes x weight scale) with the NumPy
    reference, the exporter's static ``"magnitude"`` choice. A resumed run (step counter > 0)
    keeps the restored selection.
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
            scales = (int8_weight_scales(model, layer) if self.criterion == "magnitude+"
                      else None)
            if scales is not None:  # the int8 graph: the exporter's choice, bit for bit
                model.selection.assign(layer.name, _int8_static_channels(
                    kernel_of(layer).numpy(), scales, kept, is_depthwise(layer)))
                continue
            if self.criterion == "random":
                scores = tf.random.stateless_uniform(state["visited"].shape, seed=[self.seed, i])
            else:
                scores = WeightL2().scores(kernel_of(layer), state, 0, i)
                if self.criterion == "magnitude-":
                    scores = -scores
            model.selection.assign(layer.name, top_k_channels(scores, kept).numpy())


def dgsu_select(scores, kept: int, sweep, traversal: bool = True):
    """One step of DGSU's channel choice (Li & Chang 2024) for one layer: (indices, sweep).

    ``sweep``: bool [C], the channels visited in the current sweep. If all are visited the
    sweep restarts (all False); then not-yet-visited channels rank first, then visited ones,
    each group by ``scores`` descending, ties to the lower index; the first ``kept`` are
    returned in increasing order and marked in the returned sweep. ``traversal=False``: top-k
    by score (policy "magnitude"). With `int8_channel_scores` this is, bit for bit, the
    device's ``DGST_SELECT_CHANNELS`` (`dgst_tf.tflm_ops.reference.select_ranked`).

        indices, sweep = dgsu_select(scores, 4, tf.zeros([16], tf.bool))
    """
    sweep = _new_sweep_if_done(tf.convert_to_tensor(sweep))
    indices = ranked_top_k(scores, kept, tf.logical_not(sweep) if traversal else None)
    marked = tf.reduce_any(tf.one_hot(indices, sweep.shape[0], on_value=True, off_value=False,
                                      dtype=tf.bool), axis=0)
    return indices, tf.logical_or(sweep, marked)


def _new_sweep_if_done(sweep):
    """``sweep``, or all False if every channel was visited (a new sweep starts)."""
    return tf.where(tf.reduce_all(sweep), tf.zeros_like(sweep), sweep)


def ranked_top_k(scores, k: int, preferred=None):
    """`top_k_channels` (same indices, same ties) with one partial top-k instead of two full
    argsorts, for the per-step choice of every layer.

    A float32 score maps to an int32 key of the same order (the bits of a non-negative float;
    the negatives' magnitude bits flipped; -0 counted as +0, which the argsorts tie), the
    ``preferred`` flag goes above it in an int64 key, and TopK keeps equal keys in index
    order, as the stable argsorts do. Scores must not be NaN. Other dtypes (the int8 graph's
    integer scores) take `top_k_channels`.

        ranked_top_k(tf.constant([0.1, 0.9, 0.5, 0.9]), 2)        # [1, 3]
    """
    scores = tf.convert_to_tensor(scores)
    if scores.dtype != tf.float32:
        return top_k_channels(scores, k, preferred)
    if preferred is None:
        return tf.sort(tf.math.top_k(scores, k).indices)
    bits = tf.bitcast(tf.where(tf.equal(scores, 0.0), tf.zeros_like(scores), scores), tf.int32)
    ordered = tf.where(bits < 0, tf.bitwise.bitwise_xor(bits, 0x7FFFFFFF), bits)
    key = tf.cast(ordered, tf.int64) + tf.cast(preferred, tf.int64) * (1 << 32)
    return tf.sort(tf.math.top_k(key, k).indices)


def int8_multipliers(model, layer, weight_scales=None):
    """The int32 importance multipliers of ``layer`` if ``model`` trains the int8 graph
    (`dgst_tf.training.int8_graph.int8_training_graph`), else None. The weight scales come from
    ``weight_scales`` (``Int8TrainingGraph.weight_scales``), else from the QAS optimizer's
    ``qas_scales`` (the same numbers), else from the layer's ``<name>_rescale``
    (`dgst_tf.training.int8_ops.Requantize`: the same numbers)."""
    from dgst_tf.tflm_ops.reference import score_multipliers

    scales = int8_weight_scales(model, layer, weight_scales)
    return None if scales is None else score_multipliers(np.ravel(scales))


def int8_weight_scales(model, layer, weight_scales=None):
    """The per-output-channel weight scales of ``layer`` when ``model`` trains the int8
    graph, else None (where they come from: `int8_multipliers`)."""
    from dgst_tf.training.int8_ops import Requantize

    scales = (weight_scales or {}).get(layer.name)
    if scales is None:
        qas = getattr(getattr(model, "optimizer", None), "qas_scales", None) or {}
        scale = qas.get(kernel_of(layer).ref())
        scales = None if scale is None else scale.numpy()
    if scales is None:
        base = getattr(model, "base", model)
        rescale = next((l for l in base.layers if l.name == f"{layer.name}_rescale"), None)
        scales = rescale.weight_scales if isinstance(rescale, Requantize) else None
    return None if scales is None else np.ravel(np.asarray(scales, np.float64))


def _int8_static_channels(kernel, scales, kept: int, depthwise: bool) -> np.ndarray:
    """Lin's static choice on the int8 graph, exactly as the exporter makes it: top-k L2 of
    the real weights (int8 codes x scale) by the NumPy reference (`top_k_channels`)."""
    from dgst_tf.tflm_ops.reference import top_k_channels as reference_top_k

    codes = np.clip(np.round(np.asarray(kernel, np.float64)), -127, 127)
    if depthwise:  # [kh, kw, C, 1] -> [kh, kw, C], one scale per channel
        return reference_top_k(codes[..., 0] * scales, kept, depthwise=True)
    if codes.ndim == 2:  # dense [in, out] as a 1x1 conv [out, 1, 1, in]
        codes = codes[None, None]
    real = np.transpose(codes, (3, 0, 1, 2)) * scales.reshape(-1, 1, 1, 1)  # OHWI
    return reference_top_k(real, kept)


class WindowChannelSelection(keras.callbacks.Callback):
    """Step s updates the k channels from (s * k) mod C, wrapping (export policy "window",
    the device's earlier "traversal"): every channel is visited every ceil(C / k) steps."""

    @property
    def device_policy(self) -> str:
        return "window"

    def on_train_begin(self, logs=None):
        model = _sparse_model(self)

        def select():
            step = model.selection.step.read_value()
            for layer in model.weight_layers:
                channels, kept = model.selection.specs[layer.name]
                start = (step * kept) % channels
                window = (start + tf.range(kept, dtype=tf.int64)) % channels
                model.selection.vars[layer.name]["indices"].assign(
                    tf.sort(tf.cast(window, tf.int32)))
                model.selection.vars[layer.name]["active"].assign(True)

        model.set_selection_hook(select)


class _KeptWeightL2:
    """One layer's float ``weight_l2`` scores, kept between steps. A train step changes only
    the selected channels' weights, so the next step recomputes only theirs, with the same
    ops on their slice of the kernel (the same numbers, channel by channel, as recomputing the
    whole kernel, which a step would otherwise do for every layer); ``refresh`` recomputes
    all of them."""

    def __init__(self, layer):
        self.layer = layer
        self.scores = tf.Variable(tf.zeros([input_channels(layer)], kernel_of(layer).dtype),
                                  trainable=False, name=f"{layer.name}_weight_l2")

    def refresh(self):
        self.scores.assign(WeightL2().scores(kernel_of(self.layer), None, None, None))

    def update(self, changed):
        kernel = kernel_of(self.layer)
        # a whole read, then the gather: a gather from the variable itself (a dense kernel's
        # rows) would switch it to copy-on-read (`SparseUpdateModel._apply_sgd_to_selected`)
        slice_ = tf.gather(kernel.read_value(), changed, axis=channel_axis(kernel))
        self.scores.scatter_nd_update(changed[:, None],
                                      WeightL2().scores(slice_, None, None, None))


class DynamicChannelSelection(keras.callbacks.Callback):
    """Reselect every weight-updated layer's channels before every step (DGSU, Li & Chang
    2024), with `dgsu_select`: the algorithm of the exported graph's policy "traversal"
    (``traversal=True``) or "magnitude" (``traversal=False``).

    importance: "weight_l2", "grad_norm", "random" or a `ChannelImportance`. "weight_l2" on
        the int8 training graph (`dgst_tf.training.int8_graph.int8_training_graph`; detected by
        `int8_multipliers`) uses the device's integer score
        ``score[c] = sum_o m[o] * sum_t w[t, c, o]^2``, ``m[o] = round(2^16 s[o]^2 / max s^2)``
        from the weight scales (`int8_channel_scores`), so the ranking is the device's bit
        for bit; on a float model, the float L2 norm of the real weights.
    traversal: channels not yet visited in the current sweep come first; a sweep ends when
        every channel of the layer was visited.
    layers_per_step: update the weights of only this many of the weight-updated layers per
        step, taken in turn (DGSU's stage-aware layer choice; the rule, one definition for
        Keras, NumPy and the device: `dgst_tf.tflm_ops.reference.layer_active`), the others
        train only their biases and their channels are chosen but not marked visited; None
        updates all of them. `export_training(..., policy=cb)` runs the same schedule.
    weight_scales: {layer: s_w} (``Int8TrainingGraph.weight_scales``) for the integer score
        when the optimizer is not the QAS one.

    The float "weight_l2" scores are kept between steps and recomputed only for the channels
    the previous step updated (the only weights a train step changes), in full at the start
    of every fit and epoch: the same choices as recomputing every kernel every step. A
    callback that changes these kernels between the steps of an epoch must call
    `refresh_scores` (the stock pruning callbacks prune the base model before training).

        cb = DynamicChannelSelection("weight_l2", traversal=True, layers_per_step=2)
        sparse.fit(ds, callbacks=[cb]); export_training(..., policy=cb)  # "traversal", 2
    """

    def __init__(self, importance="weight_l2", traversal: bool = True,
                 layers_per_step: int | None = None, seed: int = 0, weight_scales=None):
        super().__init__()
        if layers_per_step is not None and (isinstance(layers_per_step, bool) or not isinstance(
                layers_per_step, (int, np.integer)) or layers_per_step < 1):
            raise ValueError(f"layers_per_step must be None or an int >= 1, got "
                             f"{layers_per_step!r}")
        self.importance = get_importance(importance, seed)
        self.traversal, self.layers_per_step, self.seed = traversal, layers_per_step, seed
        self.weight_scales = weight_scales
        self._select = self._select_model = None
        self._stale = None  # True: the kept weight_l2 scores are recomputed in full

    def get_config(self):
        return {"importance": self.importance.get_config(), "traversal": self.traversal,
                "layers_per_step": self.layers_per_step, "seed": self.seed}

    @property
    def device_policy(self) -> str:
        """The `export_training` policy running this selection on device (which also takes
        ``layers_per_step`` from the callback)."""
        if not isinstance(self.importance, WeightL2):
            raise ValueError(f"importance {self.importance.name!r} has no on-device "
                             "equivalent; use importance='weight_l2'")
        return "traversal" if self.traversal else "magnitude"

    def _scorer(self, model, layer, index):
        """(scores(state, step), kept) for ``layer``; ``kept`` is its `_KeptWeightL2` when
        the scores are float weight L2 norms, else None."""
        multipliers = (int8_multipliers(model, layer, self.weight_scales)
                       if isinstance(self.importance, WeightL2) else None)
        if multipliers is not None:
            return (lambda state, step: int8_channel_scores(kernel_of(layer), multipliers,
                                                            is_depthwise(layer))), None
        if type(self.importance) is WeightL2:
            kept = _KeptWeightL2(layer)
            return (lambda state, step: kept.scores.read_value()), kept
        return (lambda state, step: self.importance.scores(kernel_of(layer), state, step,
                                                           index)), None

    def _update_kept_scores(self, model, kept_scores):
        """Bring the kept weight_l2 scores up to date: in full when stale (a new fit or
        epoch: callbacks may have changed weights), else for the channels the previous step
        selected (the only weights a step changes)."""
        if not kept_scores:
            return

        def refresh():
            for kept in kept_scores:
                kept.refresh()
            return tf.constant(True)

        def update():
            for kept in kept_scores:
                kept.update(model.selection.vars[kept.layer.name]["indices"].read_value())
            return tf.constant(True)

        tf.cond(self._stale.read_value(), refresh, update)
        self._stale.assign(False)

    def _build(self, model):
        from dgst_tf.tflm_ops.reference import layer_active

        layers = model.weight_layers
        scorers, kept_scores = zip(*[self._scorer(model, layer, i)
                                     for i, layer in enumerate(layers)]) if layers else ((), ())
        kept_scores = [k for k in kept_scores if k is not None]
        if self._stale is None:
            self._stale = tf.Variable(True, trainable=False, name="weight_l2_stale")

        def select():
            self._update_kept_scores(model, kept_scores)
            step = model.selection.step.read_value()
            for i, layer in enumerate(layers):
                state = model.selection.vars[layer.name]
                kept = model.selection.specs[layer.name][1]
                sweep = _new_sweep_if_done(state["sweep"].read_value())
                state["sweep"].assign(sweep)  # a finished sweep starts again
                # `dgsu_select` on the new sweep; record_step marks the choice if active
                state["indices"].assign(ranked_top_k(
                    scorers[i](state, step), kept,
                    tf.logical_not(sweep) if self.traversal else None))
                state["active"].assign(layer_active(step, i, len(layers),
                                                    self.layers_per_step))

        return select

    def on_train_begin(self, logs=None):
        model = _sparse_model(self)
        if self._select is None or self._select_model is not model:
            self._select, self._select_model = self._build(model), model
        self._stale.assign(True)
        # runs inside every compiled train step; stays installed for later fits of this
        # model (same function: no retrace) until another selection callback replaces it
        model.set_selection_hook(self._select)

    def refresh_scores(self) -> None:
        """Recompute the kept weight_l2 scores of every layer before the next step."""
        if self._stale is not None:
            self._stale.assign(True)

    def on_epoch_begin(self, epoch, logs=None):
        self.refresh_scores()  # weights a callback changed between epochs are seen
