"""`SparseUpdateModel`: train any supported Keras CNN the way the microcontroller will.

Wraps a functional tf-keras model and an `UpdateScheme`; ``fit`` then computes gradients
only for the scheme's layers and channels. BatchNorm is folded first (the MCU graph has
none), and the head is put in `dgst_tf.core.classifier.training_form` (a 1x1-conv classifier
of the pooled map becomes the Dense layer it is); a model ending in a softmax trains on its
logits (the loss sees the softmax, which Keras' cross-entropy undoes exactly) and keeps the
softmax for inference. The channel selection of every weight-updated layer lives in tf.Variables
(`SelectionState`), which the selection callbacks move; changing it never retraces.

    from dgst_tf import SparseUpdateModel, UpdateScheme
    from dgst_tf.training.selection import DynamicChannelSelection

    sparse = SparseUpdateModel(model, UpdateScheme({"block_16_expand": 0.25}))
    sparse.compile(optimizer=keras.optimizers.SGD(0.01),
                   loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                   metrics=["accuracy"])
    sparse.fit(train_ds, callbacks=[DynamicChannelSelection(importance="weight_l2", seed=0)])
    trained = sparse.base   # the BN-folded model with the updated weights

``activation_patterns`` ("stride2", or ``{"block_16_expand": "checker"}``) stores only a
spatial pattern of each weight-updated conv's selected input and estimates its weight
gradient from it (`dgst_tf.training.activation_patterns`); pass the same value to
`dgst_tf.planning.memory.training_memory` to count the saving.

Only the selected channels' kernel gradient is ever computed: the tape differentiates the
loss with respect to a zero stand-in of each weight-updated kernel's selected slice. Plain
SGD (tf-keras' ``SGD`` with only a learning rate) then adds ``-lr * g`` to those channels
alone; any other optimizer gets the zero-padded whole-kernel gradient. Both give the same
weights bit for bit as updating every kernel in full.

Per-step logs: ``updated_fraction`` (conv weights updated this step / all conv weights)
and ``coverage`` (weights of the weight-updated layers visited at least once so far).
"""
import numpy as np

from dgst_tf.core.bn_folding import fold_batchnorm, foldable_pairs
from dgst_tf.core.classifier import find_classifier, training_form
from dgst_tf.core.graph import check_functional, check_single_use, producers, rebuild
from dgst_tf.core.keras_compat import keras, tf
from dgst_tf.core.layer_kinds import (CONV2D, DENSE, DEPTHWISE, input_channels, is_conv,
                                      kernel_of, kind_of, weights_per_channel)
from dgst_tf.training import sparse_ops
from dgst_tf.training.channel_importance import channel_axis
from dgst_tf.training.scheme import (SchemeError, UpdateScheme, total_conv_weights,
                                     updatable_layers)


def channel_mask(indices, channels: int):
    """bool [channels]: True at ``indices``.

        channel_mask(tf.constant([0, 3]), 5)    # [True, False, False, True, False]
    """
    return tf.tensor_scatter_nd_update(tf.zeros([channels], tf.bool), indices[:, None],
                                       tf.ones(tf.shape(indices), tf.bool))


class SelectionState(keras.layers.Layer):
    """Per weight-updated layer: selected channels, whether it updates this step, which
    channels were ever visited / visited in the current sweep, and an estimate of each
    channel's gradient norm (recorded when the channel is updated)."""

    def __init__(self, layers: dict | None = None, **kwargs):
        super().__init__(trainable=False, **kwargs)
        self.specs = dict(layers or {})  # name -> (channels, kept)
        self.vars = {}
        for name, (channels, kept) in self.specs.items():
            def weight(suffix, shape, dtype, init):
                return self.add_weight(f"{name}_{suffix}", shape=shape, dtype=dtype,
                                       initializer=init, trainable=False)
            self.vars[name] = {
                "indices": weight("indices", (kept,), tf.int32,
                                  keras.initializers.Constant(np.arange(kept))),
                "active": weight("active", (), tf.bool, "ones"),
                "visited": weight("visited", (channels,), tf.bool, "zeros"),
                "sweep": weight("sweep", (channels,), tf.bool, "zeros"),
                "grad_norm": weight("grad_norm", (channels,), tf.float32, "zeros"),
            }
        self.step = self.add_weight("step", shape=(), dtype=tf.int64, initializer="zeros",
                                    trainable=False)

    def get_config(self):
        return {**super().get_config(), "layers": {k: list(v) for k, v in self.specs.items()}}

    def assign(self, layer: str, indices, active: bool = True) -> None:
        """Select ``indices`` (exactly as many as the layer keeps) of ``layer``."""
        channels, kept = self.specs[layer]
        indices = np.asarray(indices, np.int32)
        if indices.shape != (kept,) or indices.min() < 0 or indices.max() >= channels:
            raise ValueError(f"layer {layer!r}: need {kept} distinct channel indices in "
                             f"[0, {channels}), got {indices.tolist()}")
        if len(set(indices.tolist())) != kept:
            raise ValueError(f"layer {layer!r}: duplicate channel indices {indices.tolist()}")
        self.vars[layer]["indices"].assign(indices)
        self.vars[layer]["active"].assign(bool(active))

    def numpy(self, layer: str) -> dict:
        """The layer's selection state as NumPy arrays."""
        return {k: v.numpy() for k, v in self.vars[layer].items()}

    def record_step(self, kept_grads: dict) -> None:
        """Mark the selected channels visited and store their gradient norms (graph code);
        ``kept_grads``: layer name -> the kernel gradient of its selected channels only
        (`sparse_ops.kept_kernel_shape`)."""
        for name, kept in kept_grads.items():
            v = self.vars[name]
            sel = v["indices"].read_value()
            rows, active = sel[:, None], v["active"].read_value()
            # only the selected entries change, and only if the layer is active
            for flag in ("visited", "sweep"):
                v[flag].scatter_nd_update(rows, tf.logical_or(tf.gather(v[flag], sel), active))
            axis = channel_axis(kept)
            norms = tf.sqrt(tf.reduce_sum(tf.square(kept), axis=[
                a for a in range(len(kept.shape)) if a != axis]))
            v["grad_norm"].scatter_nd_update(
                rows, tf.where(active, norms, tf.gather(v["grad_norm"], sel)))
        self.step.assign_add(1)


# The sparse op of each layer kind (`dgst_tf.core.layer_kinds`).
SPARSE_OPS = {CONV2D: sparse_ops.sparse_conv2d, DEPTHWISE: sparse_ops.sparse_depthwise_conv2d,
              DENSE: sparse_ops.sparse_dense}


class _SparseLayerCall(keras.layers.Layer):
    """Calls a Conv2D / DepthwiseConv2D / Dense with the sparse backward of `sparse_ops`."""

    def __init__(self, layer, selection=None, active=None, input_grad=True, bias_grad=False,
                 full_weight_grad=False, pattern=None, kept_slot=None, **kwargs):
        super().__init__(name=f"{layer.name}_sparse", **kwargs)
        self.layer, self.selection, self.active = layer, selection, active
        self.kept_slot = _Untracked(kept_slot)
        self.flags = dict(input_grad=input_grad, bias_grad=bias_grad)
        self.full_weight_grad = full_weight_grad
        self.pattern = pattern

    def call(self, x):
        layer = self.layer
        bias = layer.bias if layer.use_bias else None
        selection = None if self.selection is None else self.selection.value()
        active = None if self.active is None else self.active.value()
        slot = self.kept_slot.value
        kind = kind_of(layer)
        if kind is DENSE:
            options = dict(full_weight_grad=self.full_weight_grad)
        else:
            options = dict(strides=layer.strides, padding=layer.padding.upper(),
                           dilations=layer.dilation_rate, pattern=self.pattern)
        y = SPARSE_OPS[kind](x, kind.kernel(layer), bias, selection=selection, active=active,
                             kept_slot=None if slot is None else slot.value(),
                             **options, **self.flags)
        return layer.activation(y)


class _Untracked:
    """Holds a value out of Keras' attribute tracking (so it is no model weight)."""

    def __init__(self, value):
        self.value = value


def _kept_gradient_slots(weight_layers, selection) -> dict:
    """Layer name -> a zero variable of the shape of its selected channels' kernel slice.
    The train step differentiates the loss with respect to these instead of the whole
    kernels, so only the kept channels' gradient is ever built (`sparse_ops` ``kept_slot``).
    They are not model weights: never saved, never changed."""
    return {layer.name: tf.Variable(
        tf.zeros(sparse_ops.kept_kernel_shape(kernel_of(layer).shape.as_list(),
                                              selection.specs[layer.name][1]),
                 kernel_of(layer).dtype), trainable=False, name=f"{layer.name}_kept_grad")
        for layer in weight_layers}


class _MaskedReLU(keras.layers.Layer):
    def __init__(self, layer, **kwargs):
        super().__init__(name=f"{layer.name}_masked", **kwargs)
        self.max_value = None if layer.max_value is None else float(layer.max_value)

    def call(self, x):
        return sparse_ops.relu_with_mask(x, self.max_value)


def _plain_relu(layer) -> bool:
    return (isinstance(layer, keras.layers.ReLU) and not float(layer.negative_slope)
            and not float(layer.threshold))


def _resolve_patterns(patterns, weight_layers) -> dict:
    """Layer name -> activation pattern name for the weight-updated convolutions: ``patterns``
    is None, one pattern name for all of them, or a dict naming some of them."""
    if patterns is None:
        return {}
    convs = {l.name for l in weight_layers if is_conv(l)}
    if isinstance(patterns, str):
        return {name: patterns for name in sorted(convs)}
    unknown = sorted(set(patterns) - convs)
    if unknown:
        raise SchemeError(f"activation patterns name {unknown}, which are not weight-updated "
                          f"Conv2D/DepthwiseConv2D layers of this scheme ({sorted(convs)})")
    return dict(patterns)


def _updates_only_selected(optimizer, kernels) -> bool:
    """tf-keras' own SGD (not a subclass) with nothing but a learning rate, outside any
    distribution strategy, on kernels without constraints: its update ``w += -g * lr``
    leaves a zero-gradient weight bit-identical, so applying it to the selected channels
    alone gives the same weights as applying it to the whole zero-padded gradient."""
    return (type(optimizer) is keras.optimizers.SGD
            and not float(optimizer.momentum or 0.0)
            and optimizer.weight_decay is None and not optimizer.use_ema
            and optimizer.clipnorm is None and optimizer.clipvalue is None
            and optimizer.global_clipnorm is None and not optimizer.jit_compile
            and not tf.distribute.has_strategy()
            and all(k.constraint is None for k in kernels))


def _selected_entries(selection, kernel_shape, kept_values):
    """(indices, updates) that ``scatter_nd_add`` ``kept_values``, the selected channels'
    slice of a kernel (`sparse_ops.kept_kernel_shape`), into the kernel."""
    if len(kernel_shape) == 2:  # dense: rows
        return selection[:, None], kept_values
    kh, kw, _, c_out = kernel_shape
    if kh == kw == 1:  # pointwise: (0, 0, c)
        positions = tf.pad(selection[:, None], [[0, 0], [2, 0]])
        return positions, tf.reshape(kept_values, [-1, c_out])
    k = int(selection.shape[0])
    taps = np.stack(np.meshgrid(np.arange(kh), np.arange(kw), indexing="ij"), axis=-1)
    taps = np.broadcast_to(taps.reshape(kh * kw, 1, 2), (kh * kw, k, 2)).astype(np.int32)
    channels = tf.broadcast_to(selection[None, :, None], [kh * kw, k, 1])
    positions = tf.concat([tf.constant(taps), channels], axis=-1)  # [kh*kw, k, (i, j, c)]
    return tf.reshape(positions, [-1, 3]), tf.reshape(kept_values, [-1, c_out])


def _is_plain_sgd(optimizer) -> bool:
    """SGD without momentum or weight decay: zero gradients leave weights bit-identical."""
    sgd_types = (keras.optimizers.SGD, keras.optimizers.legacy.SGD)
    return (isinstance(optimizer, sgd_types)
            and not float(getattr(optimizer, "momentum", 0.0) or 0.0)
            and not getattr(optimizer, "weight_decay", None))


class SparseUpdateModel(keras.Model):
    """A Keras model whose ``fit`` updates only what an `UpdateScheme` names.

    ``dropout=False`` runs the model's Dropout layers as at inference, as the exported
    training step does (it has no dropout); the default keeps Keras' training behaviour."""

    def __init__(self, model: keras.Model, scheme: UpdateScheme, fold_bn: bool = True,
                 activation_patterns=None, dropout: bool = True, name: str | None = None,
                 **kwargs):
        super().__init__(name=name or f"{model.name}_sparse", **kwargs)
        # The exported training step has no dropout: dropout=False trains as the device does.
        self.train_dropout = bool(dropout)
        check_functional(model, "SparseUpdateModel")
        check_single_use(model, "SparseUpdateModel")
        if fold_bn and foldable_pairs(model):
            model = fold_batchnorm(model, name=model.name)
        model = training_form(model)  # Dense classifier, its softmax a last layer
        scheme.validate(model)
        self.base = model
        self.scheme = scheme
        self.head = find_classifier(model)
        self._layers_in_order = updatable_layers(model)
        self._classifier = self.head.layer
        self._weight_layers = [l for l in self._layers_in_order
                               if scheme.update_for(l.name).updates_weights]
        for layer in self._layers_in_order[:-1]:
            if scheme.update_for(layer.name).updates_bias and not layer.use_bias:
                raise SchemeError(f"layer {layer.name!r} has no bias to update (use_bias=False "
                                  "and no BatchNorm folded into it)")
        self.activation_patterns = _resolve_patterns(activation_patterns, self._weight_layers)
        self.selection = SelectionState(
            {l.name: (input_channels(l), scheme.kept_channels(l)) for l in self._weight_layers},
            name="selection_state")
        self._total_conv_weights = total_conv_weights(model)
        self._per_channel = {l.name: weights_per_channel(l) for l in self._weight_layers}
        self._kept_slots = _Untracked(_kept_gradient_slots(self._weight_layers, self.selection))
        self.sparse_graph = rebuild(model, self._call_layer, name=f"{model.name}_train_graph")
        self._trained = self._trained_variables()
        self._selection_hook = None
        self.built = True  # every variable lives in the built base model; nothing is lazy

    # -- graph construction --------------------------------------------------------------
    def _needs_input_grad(self) -> dict:
        """Layer name -> whether anything updated lies upstream of its input."""
        updated = {l.name for l in self._layers_in_order
                   if self.scheme.update_for(l.name).mode != "frozen"} | {self._classifier.name}
        inputs = producers(self.base)
        downstream = {}
        for layer in self.base.layers:
            downstream[layer.name] = any(p in updated or downstream.get(p, False)
                                         for p in inputs[layer.name])
        return downstream

    def _call_layer(self, layer, args, kwargs):
        if not hasattr(self, "_downstream"):
            self._downstream = self._needs_input_grad()
        if layer.name == self.head.softmax:
            return args[0]  # the train graph outputs logits (`_for_loss` applies the softmax)
        needs_grad = self._downstream[layer.name]
        update = self.scheme.update_for(layer.name)
        is_classifier = layer is self._classifier
        if layer in self._layers_in_order and (needs_grad or update.mode != "frozen"
                                               or is_classifier):
            state = self.selection.vars.get(layer.name)
            call = _SparseLayerCall(
                layer, selection=state and state["indices"], active=state and state["active"],
                input_grad=needs_grad, bias_grad=update.updates_bias or is_classifier,
                full_weight_grad=is_classifier,
                pattern=self.activation_patterns.get(layer.name),
                kept_slot=self._kept_slots.value.get(layer.name))
            return call(*args)
        if needs_grad and _plain_relu(layer):
            return _MaskedReLU(layer)(*args)
        if isinstance(layer, keras.layers.BatchNormalization):
            kwargs = {**kwargs, "training": False}  # an unfolded BN stays frozen
        if not self.train_dropout and isinstance(layer, keras.layers.Dropout):
            kwargs = {**kwargs, "training": False}
        return layer(*args, **kwargs)

    def _trained_variables(self) -> list:
        variables = []
        for layer in self._layers_in_order:
            update = self.scheme.update_for(layer.name)
            if layer is self._classifier or update.updates_weights:
                variables.append(kernel_of(layer))
            if (layer is self._classifier or update.updates_bias) and layer.use_bias:
                variables.append(layer.bias)
        return variables

    # -- Keras hooks -------------------------------------------------------------------------
    def call(self, inputs, training=None):
        return self.base(inputs, training=training)

    def get_config(self):
        return {"name": self.name, "scheme": self.scheme.get_config()}

    def set_selection_hook(self, hook) -> None:
        """Run ``hook()`` (TensorFlow ops that move `selection`) at the start of every train
        step, inside the compiled step, so a per-step reselection needs no Python callback
        between steps. `DynamicChannelSelection` installs it in ``on_train_begin`` (it stays
        for later fits until replaced; `StaticChannelSelection` clears it); the train
        function is rebuilt when the hook changes.
        """
        if hook is self._selection_hook:
            return
        self._selection_hook = hook
        if self.train_function is not None:
            self.train_function = self.make_train_function(force=True)

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if self._selection_hook is not None:
            self._selection_hook()  # ordered before the reads below (same variables)
        slots = self._kept_slots.value
        kernels = {l.name: kernel_of(l) for l in self._weight_layers}
        whole = [v for v in self._trained if not any(v is k for k in kernels.values())]
        watched = whole + list(slots.values())
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(watched)
            y_pred = self._for_loss(self.sparse_graph(x, training=True))
            loss = self.compute_loss(x, y, y_pred, sample_weight)
        grads = tape.gradient(loss, watched)
        whole_grads = grads[:len(whole)]
        kept_grads = dict(zip(slots, grads[len(whole):]))  # selected channels only
        finite = tf.debugging.assert_all_finite(
            loss, "SparseUpdateModel: the training loss is NaN or infinite (check the "
                  "learning rate and the input data)")
        # never apply a NaN step; update only after every gradient (`_apply_sgd_to_selected`)
        with tf.control_dependencies([finite, *(g for g in grads if g is not None)]):
            if _updates_only_selected(self.optimizer, kernels.values()):
                self.optimizer.apply_gradients(zip(whole_grads, whole))
                self._apply_sgd_to_selected(kernels, kept_grads)
            else:
                self._apply_whole_kernels(kernels, whole, whole_grads, kept_grads)
        self.selection.record_step(kept_grads)
        logs = self.compute_metrics(x, y, y_pred, sample_weight)
        logs.update(self.selection_metrics())
        return logs

    def _apply_sgd_to_selected(self, kernels, kept_grads):
        """Plain SGD's ``w += -g * lr`` on the selected channels' weights only (run after
        ``apply_gradients``, which set this step's learning rate).

        The update is a scatter into the variable, which switches TensorFlow to
        copy-on-read for it: every later whole read (this layer's forward conv, the next
        step's channel scores) would copy the kernel, which for the 2% of channels a step
        changes costs more than the update. Copy-on-read is switched off again right after:
        the next scatter copies the kernel first (copy-on-write) if a read of it is still
        alive, and the caller runs the updates after every gradient, so none is."""
        for name, grad in kept_grads.items():
            kernel = kernels[name]
            lr = tf.cast(self.optimizer.learning_rate, kernel.dtype)
            kernel.scatter_nd_add(*_selected_entries(
                self.selection.vars[name]["indices"], kernel.shape.as_list(), -grad * lr))
            tf.raw_ops.DisableCopyOnRead(resource=kernel.handle)

    def _apply_whole_kernels(self, kernels, whole, whole_grads, kept_grads):
        """Any other optimizer: the zero-padded full kernel gradients through
        ``apply_gradients``; stateful optimizers then get the unselected channels back."""
        by_var = {id(v): g for v, g in zip(whole, whole_grads)}
        for name, grad in kept_grads.items():
            by_var[id(kernels[name])] = sparse_ops.scatter_kept_grad(
                grad, self.selection.vars[name]["indices"], kernels[name].shape.as_list())
        exact = _is_plain_sgd(self.optimizer)
        before = {} if exact else {n: tf.identity(k) for n, k in kernels.items()}
        self.optimizer.apply_gradients(zip([by_var[id(v)] for v in self._trained],
                                           self._trained))
        for name, old in before.items():  # stateful optimizers: keep unselected channels
            self._restore_unselected(name, kernels[name], old)

    def _for_loss(self, logits):
        """What the loss and metrics see: the logits, or for a model with a softmax the
        softmax of them, from which Keras' cross-entropy takes the logits back exactly
        (``from_logits`` either way), so training is on the logits."""
        if self.head.softmax is None:
            return logits
        return keras.activations.softmax(logits)

    def _restore_unselected(self, name, kernel, old):
        v = self.selection.vars[name]
        channels = self.selection.specs[name][0]
        chosen = tf.logical_and(channel_mask(v["indices"], channels), v["active"])
        shape = [1] * len(kernel.shape)
        shape[channel_axis(kernel)] = channels
        kernel.assign(tf.where(tf.reshape(chosen, shape), kernel, old))

    def selection_metrics(self) -> dict:
        """``updated_fraction`` and ``coverage`` as tensors (see the module doc)."""
        updated = tf.constant(0.0)
        visited = tf.constant(0.0)
        total = 0
        for name, (channels, kept) in self.selection.specs.items():
            v = self.selection.vars[name]
            per = float(self._per_channel[name])
            updated += tf.cast(v["active"], tf.float32) * kept * per
            visited += tf.reduce_sum(tf.cast(v["visited"], tf.float32)) * per
            total += channels * per
        return {"updated_fraction": updated / self._total_conv_weights,
                "coverage": visited / total if total else tf.constant(0.0)}

    @property
    def weight_layers(self) -> list:
        """The weight-updated layers (channel selection applies to them)."""
        return list(self._weight_layers)
