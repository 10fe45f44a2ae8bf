"""`SparseUpdateModel`: train any supported Keras CNN the way the microcontroller will.

Wraps a functional tf-keras model and an `UpdateScheme`; ``fit`` then computes gradients
only for the scheme's layers and channels. BatchNorm is folded first (the MCU graph has
none). The channel selection of every weight-updated layer lives in tf.Variables
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

Per-step logs: ``updated_fraction`` (conv weights updated this step / all conv weights)
and ``coverage`` (weights of the weight-updated layers visited at least once so far).
"""
import numpy as np

from dgst_tf.core.bn_folding import fold_batchnorm, foldable_pairs
from dgst_tf.core.graph import check_functional, check_single_use, producers, rebuild
from dgst_tf.core.keras_compat import keras, tf
from dgst_tf.core.layer_kinds import (CONV2D, DENSE, DEPTHWISE, input_channels, is_conv,
                                      kernel_of, kind_of, weights_per_channel)
from dgst_tf.training import sparse_ops
from dgst_tf.training.channel_importance import channel_axis
from dgst_tf.training.scheme import (SchemeError, UpdateScheme, classifier_layer,
                                     total_conv_weights, updatable_layers)


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

    def record_step(self, kernel_grads: dict) -> None:
        """Mark the selected channels visited and store their gradient norms (graph code)."""
        for name, grad in kernel_grads.items():
            v = self.vars[name]
            sel = v["indices"]
            channels = self.specs[name][0]
            hit = tf.logical_and(
                tf.reduce_any(tf.one_hot(sel, channels, on_value=True, off_value=False,
                                         dtype=tf.bool), axis=0), v["active"])
            v["visited"].assign(tf.logical_or(v["visited"], hit))
            v["sweep"].assign(tf.logical_or(v["sweep"], hit))
            axis = channel_axis(grad)
            kept = tf.gather(grad, sel, axis=axis)
            norms = tf.sqrt(tf.reduce_sum(tf.square(kept), axis=[
                a for a in range(len(grad.shape)) if a != axis]))
            updated = tf.tensor_scatter_nd_update(v["grad_norm"], sel[:, None], norms)
            v["grad_norm"].assign(tf.where(hit, updated, v["grad_norm"]))
        self.step.assign_add(1)


# The sparse op of each layer kind (`dgst_tf.core.layer_kinds`).
SPARSE_OPS = {CONV2D: sparse_ops.sparse_conv2d, DEPTHWISE: sparse_ops.sparse_depthwise_conv2d,
              DENSE: sparse_ops.sparse_dense}


class _SparseLayerCall(keras.layers.Layer):
    """Calls a Conv2D / DepthwiseConv2D / Dense with the sparse backward of `sparse_ops`."""

    def __init__(self, layer, selection=None, active=None, input_grad=True, bias_grad=False,
                 full_weight_grad=False, pattern=None, **kwargs):
        super().__init__(name=f"{layer.name}_sparse", **kwargs)
        self.layer, self.selection, self.active = layer, selection, active
        self.flags = dict(input_grad=input_grad, bias_grad=bias_grad)
        self.full_weight_grad = full_weight_grad
        self.pattern = pattern

    def call(self, x):
        layer = self.layer
        bias = layer.bias if layer.use_bias else None
        selection = None if self.selection is None else self.selection.value()
        active = None if self.active is None else self.active.value()
        kind = kind_of(layer)
        if kind is DENSE:
            options = dict(full_weight_grad=self.full_weight_grad)
        else:
            options = dict(strides=layer.strides, padding=layer.padding.upper(),
                           dilations=layer.dilation_rate, pattern=self.pattern)
        y = SPARSE_OPS[kind](x, kind.kernel(layer), bias, selection=selection, active=active,
                             **options, **self.flags)
        return layer.activation(y)


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
        scheme.validate(model)
        self.base = model
        self.scheme = scheme
        self._layers_in_order = updatable_layers(model)
        self._classifier = classifier_layer(model)
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
                pattern=self.activation_patterns.get(layer.name))
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
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(self._trained)
            y_pred = self.sparse_graph(x, training=True)
            loss = self.compute_loss(x, y, y_pred, sample_weight)
        grads = tape.gradient(loss, self._trained)
        finite = tf.debugging.assert_all_finite(
            loss, "SparseUpdateModel: the training loss is NaN or infinite (check the "
                  "learning rate and the input data)")
        kernels = {l.name: kernel_of(l) for l in self._weight_layers}
        exact = _is_plain_sgd(self.optimizer)
        before = {} if exact else {n: tf.identity(k) for n, k in kernels.items()}
        with tf.control_dependencies([finite]):  # never apply a NaN step
            self.optimizer.apply_gradients(zip(grads, self._trained))
        for name, old in before.items():  # stateful optimizers: keep unselected channels
            self._restore_unselected(name, kernels[name], old)
        by_var = {id(v): g for v, g in zip(self._trained, grads)}
        self.selection.record_step({n: by_var[id(k)] for n, k in kernels.items()})
        logs = self.compute_metrics(x, y, y_pred, sample_weight)
        logs.update(self.selection_metrics())
        return logs

    def _restore_unselected(self, name, kernel, old):
        v = self.selection.vars[name]
        channels = self.selection.specs[name][0]
        chosen = tf.logical_and(tf.reduce_any(tf.one_hot(
            v["indices"], channels, on_value=True, off_value=False, dtype=tf.bool), axis=0),
            v["active"])
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
