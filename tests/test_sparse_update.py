"""The sparse train step against tf.GradientTape on the dense model (the oracle)."""
import numpy as np
import pytest
from small_models import batch, residual_cnn

from dgst_tf.core.bn_folding import fold_batchnorm
from dgst_tf.core.keras_compat import keras, tf
from dgst_tf.training.scheme import UpdateScheme, kernel_of
from dgst_tf.training.selection import DynamicChannelSelection, StaticChannelSelection
from dgst_tf.training.sparse_model import SparseUpdateModel

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
SCHEME = {"expand": 0.5, "depthwise": 0.25, "project": "bias", "head": 0.5}


def make(scheme=SCHEME, optimizer=None, seed=0):
    sparse = SparseUpdateModel(residual_cnn(seed), UpdateScheme(scheme))
    sparse.compile(optimizer=optimizer or keras.optimizers.SGD(0.1), loss=LOSS)
    return sparse


def dense_gradients(model, x, y):
    with tf.GradientTape() as tape:
        loss = LOSS(y, model(x, training=False))
    return {v.name: g.numpy() for v, g in zip(model.trainable_weights,
                                               tape.gradient(loss, model.trainable_weights))}


def test_bn_folding_is_exact():
    model = residual_cnn()
    folded = fold_batchnorm(model)
    x, _ = batch(4)
    np.testing.assert_allclose(folded(x), model(x, training=False), atol=1e-5)
    assert not any(isinstance(l, keras.layers.BatchNormalization) for l in folded.layers)
    assert [l.name for l in folded.layers if isinstance(l, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D))] == [
        "stem", "expand", "depthwise", "project", "head"]


@pytest.mark.parametrize("batch_size", [1, 3])
def test_applied_update_equals_dense_gradient_restricted_to_selection(batch_size):
    sparse, lr = make(), 0.1
    sparse.selection.assign("expand", [1, 5, 6, 7])
    sparse.selection.assign("depthwise", [2, 3, 9])
    sparse.selection.assign("head", [0, 2, 4, 7])
    x, y = batch(batch_size)
    grads = dense_gradients(sparse.base, x, y)
    before = {v.name: v.numpy() for v in sparse.base.weights}
    sparse.fit(x, y, batch_size=batch_size, epochs=1, verbose=0, shuffle=False)
    kept = {"expand": [1, 5, 6, 7], "depthwise": [2, 3, 9], "head": [0, 2, 4, 7]}
    for var in sparse.base.weights:
        layer = var.name.split("/")[0]
        step = before[var.name] - var.numpy()
        update = SCHEME.get(layer, "classifier" if layer == "classifier" else "frozen")
        if update == "frozen" or (update == "bias" and "bias" not in var.name):
            assert np.array_equal(step, np.zeros_like(step)), var.name  # bit-identical
        elif layer in kept and "bias" not in var.name:
            expected = np.zeros_like(step)
            expected[:, :, kept[layer], :] = lr * grads[var.name][:, :, kept[layer], :]
            np.testing.assert_allclose(step, expected, atol=1e-5, err_msg=var.name)
            unselected = np.delete(before[var.name], kept[layer], axis=2)
            assert np.array_equal(np.delete(var.numpy(), kept[layer], axis=2), unselected)
        else:  # biases of updated layers and the whole classifier
            np.testing.assert_allclose(step, lr * grads[var.name], atol=1e-5, err_msg=var.name)


def test_stateful_optimizer_leaves_unselected_channels_bit_identical():
    sparse = make(optimizer=keras.optimizers.Adam(0.01))
    x, y = batch(6)
    before = kernel_of(sparse.base.get_layer("expand")).numpy()
    selections = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_begin(self, b, logs=None):
            selections.append(sparse.selection.numpy("expand")["indices"].copy())

    sparse.fit(x, y, batch_size=1, epochs=1, verbose=0, shuffle=False,
               callbacks=[DynamicChannelSelection(seed=3), Record()])
    touched = np.unique(np.concatenate(selections))
    after = kernel_of(sparse.base.get_layer("expand")).numpy()
    untouched = np.setdiff1d(np.arange(8), touched)
    assert np.array_equal(after[:, :, untouched], before[:, :, untouched])
    assert not np.array_equal(after[:, :, touched], before[:, :, touched])


def _graph_op_types(concrete) -> list:
    graph_def = concrete.graph.as_graph_def()
    types = [n.op for n in graph_def.node]
    for function in graph_def.library.function:
        types += [n.op for n in function.node_def]
    return types


def _graph_ops(graph) -> list:
    """Every op of a traced ``graph`` and of the function graphs it calls (the cond branches
    that hold the weight gradients), with their static shapes."""
    ops, seen = [], set()

    def walk(g):
        for op in g.get_operations():
            ops.append(op)
            for attr in op.node_def.attr.values():
                names = [attr.func.name] if attr.HasField("func") else [
                    f.name for f in attr.list.func]
                for name in set(names) - seen:
                    seen.add(name)
                    walk((g._get_function(name) or graph._get_function(name)).graph)

    walk(graph)
    return ops


FILTER_GRADIENTS = {"Conv2DBackpropFilter", "DepthwiseConv2dNativeBackpropFilter"}


def _pointwise_kernel_gradient(op):
    """For an x^T dy MatMul reshaped into a [1, 1, k, C_out] kernel gradient (how the sparse
    step computes a pointwise conv's), that reshape; else None."""
    if op.type != "MatMul" or not op.get_attr("transpose_a"):
        return None
    reshapes = [c for c in op.outputs[0].consumers()
                if c.type == "Reshape" and c.outputs[0].shape.rank == 4]
    return reshapes[0] if reshapes else None


def _filter_gradients(concrete) -> list:
    """(op type, input activation shape, dy shape, kernel gradient shape) of every conv
    filter gradient of the traced step: the filter-gradient ops, and for pointwise convs
    the x^T dy matmul over the pixels (op type "Conv2DBackpropFilter", shapes as NHWC)."""
    found = []
    for op in _graph_ops(concrete.graph):
        if op.type in FILTER_GRADIENTS:
            found.append((op.type, op.inputs[0].shape.as_list(), op.inputs[2].shape.as_list(),
                          op.outputs[0].shape.as_list()))
        elif _pointwise_kernel_gradient(op) is not None:
            (_, k), (_, c_out) = op.inputs[0].shape.as_list(), op.inputs[1].shape.as_list()
            found.append(("Conv2DBackpropFilter", [None, None, None, k],
                          [None, None, None, c_out],
                          _pointwise_kernel_gradient(op).outputs[0].shape.as_list()))
    return found


def _pointwise_input_gradients(concrete) -> list:
    """Kernel shapes of the pointwise convs whose input gradient the traced step computes as
    the matmul dy W^T over the pixels."""
    return [op.inputs[1].op.inputs[0].shape.as_list() for op in _graph_ops(concrete.graph)
            if op.type == "MatMul" and op.get_attr("transpose_b")
            and op.inputs[1].op.type == "Reshape" and op.inputs[1].op.inputs[0].shape.rank == 4]


def _dense_weight_gradients(concrete) -> list:
    """(activation shape, dy shape, kernel gradient shape) of every dense weight-gradient
    matmul (x^T dy: a MatMul with transpose_a, not a pointwise conv's) of the traced step."""
    return [[op.inputs[0].shape.as_list(), op.inputs[1].shape.as_list(),
             op.outputs[0].shape.as_list()]
            for op in _graph_ops(concrete.graph)
            if op.type == "MatMul" and op.get_attr("transpose_a")
            and _pointwise_kernel_gradient(op) is None]


def _assert_filter_gradients_see_only_selected_channels(sparse, concrete):
    """Each weight-updated conv has exactly one filter-gradient op, and it is computed from
    the k selected input channels only: activation [.., k], dy [.., C_out] (depthwise: the k
    kept channels' dy), kernel gradient [kh, kw, k, C_out]. A full-width filter gradient that
    is gathered or masked afterwards has C_in there and fails."""
    found = _filter_gradients(concrete)
    convs = [l for l in sparse.weight_layers if not isinstance(l, keras.layers.Dense)]
    assert len(found) == len(convs), found
    for layer in convs:
        kh, kw, c_in, c_out = kernel_of(layer).shape.as_list()
        channels, k = sparse.selection.specs[layer.name]
        assert channels == c_in and k < c_in, (layer.name, channels, k)
        depthwise = isinstance(layer, keras.layers.DepthwiseConv2D)
        op_type = "DepthwiseConv2dNativeBackpropFilter" if depthwise else "Conv2DBackpropFilter"
        mine = [f for f in found if f[0] == op_type and f[3][:2] == [kh, kw]
                and f[3][3] == c_out]
        assert len(mine) == 1, (layer.name, found)
        _, activation, dy, kernel_grad = mine[0]
        assert activation[3] == k, (f"{layer.name}: the filter gradient reads {activation[3]} "
                                    f"input channels, not the {k} selected of {c_in}")
        assert dy[3] == (k * c_out if depthwise else c_out), (layer.name, dy)
        assert kernel_grad == [kh, kw, k, c_out], (
            f"{layer.name}: kernel gradient {kernel_grad}, not [{kh}, {kw}, {k}, {c_out}]")


def test_traced_graph_has_weight_gradients_only_for_selected_layers():
    sparse = make()
    x, y = batch(1)
    step = tf.function(sparse.train_step)
    concrete = step.get_concrete_function((tf.constant(x), tf.constant(y)))
    types = _graph_op_types(concrete)
    # expand and head are weight-updated Conv2Ds, depthwise a weight-updated depthwise conv;
    # project is bias-only and stem (before the first updated layer) gets nothing at all.
    kinds = [f[0] for f in _filter_gradients(concrete)]
    assert kinds.count("Conv2DBackpropFilter") == 2  # expand (pointwise: a matmul), head
    assert kinds.count("DepthwiseConv2dNativeBackpropFilter") == 1
    # Input gradients: head, project, depthwise need them (project's, a pointwise conv's, is
    # the matmul dy W^T); expand is the first updated layer and the stem lies before it, so
    # backprop stops there.
    assert types.count("Conv2DBackpropInput") == 1  # head
    assert _pointwise_input_gradients(concrete) == [[1, 1, 12, 8]]  # project
    assert types.count("DepthwiseConv2dNativeBackpropInput") == 1
    # Channel skipping, from the static shapes (k of C_in): expand 4 of 8, depthwise 3 of
    # 12, head 4 of 8.
    assert [(l.name, sparse.selection.specs[l.name][1]) for l in sparse.weight_layers] == [
        ("expand", 4), ("depthwise", 3), ("head", 4)]
    _assert_filter_gradients_see_only_selected_channels(sparse, concrete)
    # The classifier is trained in full: its one weight-gradient matmul is full width.
    assert _dense_weight_gradients(concrete) == [[[1, 16], [1, 4], [16, 4]]]


def test_traced_graph_sparse_dense_weight_gradient_reads_only_selected_features():
    keras.utils.set_random_seed(0)
    inp = keras.Input((6, 6, 3))
    h = keras.layers.Conv2D(6, 3, name="conv")(inp)
    h = keras.layers.GlobalAveragePooling2D()(h)
    h = keras.layers.Dense(10, activation="relu", name="fc")(h)
    model = keras.Model(inp, keras.layers.Dense(4, name="classifier")(h))
    sparse = SparseUpdateModel(model, UpdateScheme({"conv": 0.5, "fc": 0.5}))
    sparse.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS)
    x, y = batch(2, input_shape=(6, 6, 3))
    step = tf.function(sparse.train_step)
    concrete = step.get_concrete_function((tf.constant(x), tf.constant(y)))
    assert sparse.selection.specs["fc"][1] == 3 and sparse.selection.specs["conv"][1] == 2
    _assert_filter_gradients_see_only_selected_channels(sparse, concrete)
    # fc: x_kept^T dy from the 3 selected of 6 input features; classifier: full [10, 4].
    assert sorted(_dense_weight_gradients(concrete)) == [[[2, 3], [2, 10], [3, 10]],
                                                         [[2, 10], [2, 4], [10, 4]]]
    before = kernel_of(sparse.base.get_layer("fc")).numpy()
    sparse.fit(x, y, batch_size=2, verbose=0, shuffle=False)
    kept = sparse.selection.numpy("fc")["indices"]
    after = kernel_of(sparse.base.get_layer("fc")).numpy()
    assert np.array_equal(np.delete(after, kept, axis=0), np.delete(before, kept, axis=0))
    assert not np.array_equal(after[kept], before[kept])


def test_logs_report_updated_fraction_and_coverage():
    sparse = make()
    x, y = batch(4)
    history = sparse.fit(x, y, batch_size=1, epochs=1, verbose=0,
                         callbacks=[DynamicChannelSelection(seed=0)])
    expected = sparse.scheme.updated_weight_fraction(sparse.base)
    assert history.history["updated_fraction"][-1] == pytest.approx(expected, rel=1e-6)
    assert 0 < history.history["coverage"][-1] <= 1


def test_one_trace_for_100_steps_of_changing_selection_and_full_coverage():
    sparse = make()
    x, y = batch(100)
    seen, traces = [], []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, b, logs=None):
            seen.append(sparse.selection.numpy("expand")["indices"].copy())
            traces.append(sparse.train_function.experimental_get_tracing_count())

    history = sparse.fit(x, y, batch_size=1, epochs=1, verbose=0, shuffle=False,
                         callbacks=[DynamicChannelSelection(importance="grad_norm", seed=0),
                                    Record()])
    # tf.function traces twice on the first call when it creates (optimizer) variables;
    # after that, 99 steps with changing selections must not trace again.
    assert len(traces) == 100 and traces[-1] == traces[0] <= 2
    assert len({tuple(s) for s in seen}) > 1  # the selection really changed
    assert history.history["coverage"][-1] == pytest.approx(1.0)
    # traversal: the first two steps of a sweep cover all 8 expand channels
    assert sorted(np.concatenate(seen[:2]).tolist()) == list(range(8))


def test_static_selection_is_top_k_by_magnitude():
    sparse = make()
    x, y = batch(2)
    kernel = kernel_of(sparse.base.get_layer("expand")).numpy()
    norms = np.sqrt((kernel ** 2).sum(axis=(0, 1, 3)))
    sparse.fit(x, y, batch_size=1, verbose=0, callbacks=[StaticChannelSelection("magnitude+")])
    chosen = sparse.selection.numpy("expand")["indices"]
    assert sorted(chosen.tolist()) == sorted(np.argsort(-norms)[:4].tolist())


def test_resume_from_checkpoint_continues_identically(tmp_path):
    x, y = batch(8)

    def run(model, start, stop):
        model.fit(x[start:stop], y[start:stop], batch_size=1, verbose=0, shuffle=False,
                  callbacks=[DynamicChannelSelection(importance="random", seed=7)])

    straight = make()
    run(straight, 0, 8)
    first = make()
    run(first, 0, 4)
    first.save_weights(str(tmp_path / "ckpt"))
    resumed = make(seed=1)  # different initial weights: everything must come from the file
    resumed.load_weights(str(tmp_path / "ckpt"))
    run(resumed, 4, 8)
    for a, b in zip(straight.weights, resumed.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.name)
    assert int(resumed.selection.step.numpy()) == 8


class _StopAfterEpoch(keras.callbacks.Callback):
    """Simulate a killed job: raise once ``epoch`` is done (after the backup was written)."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            raise KeyboardInterrupt


def test_backup_and_restore_resumes_an_interrupted_fit_identically(tmp_path):
    """Keras' BackupAndRestore (the benchmarks' --backup-dir) restores weights, selection
    state and the optimizer's step, so a cosine schedule and DGSU continue where they were."""
    x, y = batch(4)

    def run(model, extra):
        schedule = keras.optimizers.schedules.CosineDecay(0.1, decay_steps=12)
        model.compile(optimizer=keras.optimizers.SGD(schedule), loss=LOSS)
        model.fit(x, y, batch_size=1, epochs=3, verbose=0, shuffle=False,
                  callbacks=[DynamicChannelSelection(importance="random", seed=7), *extra])

    straight = make()
    run(straight, [])
    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    interrupted = make()
    with pytest.raises(KeyboardInterrupt):
        run(interrupted, [backup, _StopAfterEpoch(2)])
    resumed = make(seed=1)  # different initial weights: everything must come from the backup
    run(resumed, [keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))])
    for a, b in zip(straight.weights, resumed.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.name)
    assert int(resumed.selection.step.numpy()) == 12
    assert int(resumed.optimizer.iterations.numpy()) == 12


def test_nan_loss_fails_with_a_clear_error():
    sparse = make()
    x, y = batch(1)
    bias = sparse.base.get_layer("classifier").bias
    bias.assign(np.full(bias.shape, np.nan, np.float32))
    with pytest.raises(tf.errors.InvalidArgumentError, match="loss is NaN or infinite"):
        sparse.fit(x, y, batch_size=1, verbose=0)


def test_conv_without_bias_cannot_be_bias_updated():
    from dgst_tf.training.scheme import SchemeError

    with pytest.raises(SchemeError, match="'expand' has no bias"):
        SparseUpdateModel(residual_cnn(), UpdateScheme({"expand": "bias"}), fold_bn=False)


def test_layers_per_step_takes_layers_in_turn():
    sparse = make()
    x, y = batch(3)
    active = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, b, logs=None):
            active.append([bool(sparse.selection.numpy(l.name)["active"])
                           for l in sparse.weight_layers])

    history = sparse.fit(x, y, batch_size=1, verbose=0, shuffle=False,
                         callbacks=[DynamicChannelSelection(layers_per_step=1), Record()])
    assert active == [[True, False, False], [False, True, False], [False, False, True]]
    full = sparse.scheme.updated_weight_fraction(sparse.base)
    assert history.history["updated_fraction"][-1] < full


class _MaskedWeightGradient(keras.layers.Layer):
    """Oracle for activation patterns, by plain autodiff: the layer's output value, full input
    gradient, and a kernel gradient taken only at the pattern's output positions, rescaled."""

    def __init__(self, layer, mask, **kwargs):
        super().__init__(name=f"{layer.name}_oracle", **kwargs)
        self.layer, self.mask = layer, tf.constant(mask, tf.float32)[None, :, :, None]
        self.scale = float(mask.size / mask.sum())

    def call(self, x):
        layer = self.layer
        depthwise = isinstance(layer, keras.layers.DepthwiseConv2D)
        strides = [1, *layer.strides, 1]

        def conv(inputs, kernel):
            if depthwise:
                return tf.nn.depthwise_conv2d(inputs, kernel, strides, layer.padding.upper())
            return tf.nn.conv2d(inputs, kernel, strides, layer.padding.upper())

        kernel = layer.depthwise_kernel if depthwise else layer.kernel
        full = conv(x, tf.stop_gradient(kernel))
        estimate = conv(tf.stop_gradient(x), kernel)
        y = full + self.scale * self.mask * (estimate - tf.stop_gradient(estimate))
        return layer.activation(tf.nn.bias_add(y, layer.bias))


def test_activation_patterns_estimate_the_weight_gradient_from_the_pattern_only():
    from dgst_tf.core.graph import rebuild

    scheme, lr = {"expand": 1.0, "depthwise": 1.0, "head": 0.5}, 0.1
    patterns = {"expand": "stride2", "depthwise": "rows2"}
    sparse = SparseUpdateModel(residual_cnn(), UpdateScheme(scheme),
                               activation_patterns=patterns)
    sparse.compile(optimizer=keras.optimizers.SGD(lr), loss=LOSS)
    sparse.selection.assign("head", [0, 2, 4, 7])
    rows, cols = np.meshgrid(np.arange(8), np.arange(8), indexing="ij")
    masks = {"expand": (rows % 2 == 0) & (cols % 2 == 0), "depthwise": rows % 2 == 0}

    def call(layer, args, kwargs):
        if layer.name in masks:
            return _MaskedWeightGradient(layer, masks[layer.name])(*args)
        return layer(*args, **kwargs)

    oracle = rebuild(sparse.base, call)
    x, y = batch(1)
    before = {v.name: v.numpy() for v in sparse.base.weights}
    with tf.GradientTape() as tape:
        loss = LOSS(y, oracle(x))
    kernels = [sparse.base.get_layer(n).weights[0] for n in ("expand", "depthwise", "head")]
    expected = dict(zip(("expand", "depthwise", "head"), tape.gradient(loss, kernels)))
    sparse.fit(x, y, batch_size=1, epochs=1, verbose=0, shuffle=False)
    for name, kernel in zip(expected, kernels):
        step = before[kernel.name] - kernel.numpy()
        want = lr * expected[name].numpy()
        if name == "head":  # no pattern: the selection only
            keep = np.zeros_like(want)
            keep[:, :, [0, 2, 4, 7], :] = want[:, :, [0, 2, 4, 7], :]
            want = keep
        np.testing.assert_allclose(step, want, atol=1e-5, err_msg=name)


def test_activation_patterns_must_name_weight_updated_convs():
    from dgst_tf.training.scheme import SchemeError

    with pytest.raises(SchemeError, match="'project'"):
        SparseUpdateModel(residual_cnn(), UpdateScheme(SCHEME),
                          activation_patterns={"project": "stride2"})
    with pytest.raises(ValueError, match="drops channels"):
        SparseUpdateModel(residual_cnn(), UpdateScheme(SCHEME), activation_patterns="cblock4/2")


@pytest.mark.parametrize("depthwise", [False, True])
def test_dilated_convolutions_get_exact_sparse_gradients(depthwise):
    from dgst_tf.training import sparse_ops

    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(1, 9, 9, 4)), tf.float32)
    shape = (3, 3, 4, 2) if depthwise else (3, 3, 4, 5)
    kernel = tf.constant(rng.normal(size=shape), tf.float32)
    selection = tf.constant([0, 2])
    op = sparse_ops.sparse_depthwise_conv2d if depthwise else sparse_ops.sparse_conv2d

    def dense(inputs, k):
        if depthwise:
            return tf.nn.depthwise_conv2d(inputs, k, [1, 1, 1, 1], "SAME", dilations=(2, 2))
        return tf.nn.conv2d(inputs, k, [1, 1, 1, 1], "SAME", dilations=[1, 2, 2, 1])

    weights = tf.sin(tf.range(shape[2] * shape[3] if depthwise else shape[3], dtype=tf.float32))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([x, kernel])
        sparse_loss = tf.reduce_sum(op(x, kernel, strides=(1, 1), padding="SAME",
                                       dilations=(2, 2), selection=selection) * weights)
        dense_loss = tf.reduce_sum(dense(x, kernel) * weights)
    dx, dk = tape.gradient(sparse_loss, [x, kernel])
    rx, rk = tape.gradient(dense_loss, [x, kernel])
    np.testing.assert_allclose(dx, rx, atol=1e-5)
    np.testing.assert_allclose(tf.gather(dk, selection, axis=2),
                               tf.gather(rk, selection, axis=2), atol=1e-5)
    assert not np.any(np.delete(dk.numpy(), [0, 2], axis=2))


def test_training_imports_neither_pruning_nor_tf_mot():
    import subprocess
    import sys

    code = ("import sys, dgst_tf.training.sparse_model, dgst_tf.training.methods, "
            "dgst_tf.training.qas, dgst_tf.training.activation_patterns; "
            "bad = [m for m in sys.modules if m.startswith(('dgst_tf.pruning', "
            "'tensorflow_model_optimization'))]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_dgsu_ranking_equals_the_reference_exactly():
    """`dgsu_select` (the callback's rule) == `reference.select_ranked` on float and integer
    scores with ties, including scores a float 'lift' would merge (1e-8 apart at 1e9)."""
    from dgst_tf.tflm_ops import reference as R
    from dgst_tf.training.selection import dgsu_select

    rng = np.random.default_rng(5)
    cases = [np.array([1e9, 1e9 + 64, 1e-8, 2e-8, 0.0], np.float32)]
    cases += [rng.integers(0, 6, int(rng.integers(1, 30))).astype(np.int64) for _ in range(20)]
    for scores in cases:
        channels = len(scores)
        k = int(rng.integers(1, channels + 1))
        mask, sweep = np.zeros((channels + 7) // 8, np.uint8), tf.zeros([channels], tf.bool)
        for step in range(5):
            want, mask = R.select_ranked(scores, k, mask)
            got, sweep = dgsu_select(tf.constant(scores), k, sweep)
            np.testing.assert_array_equal(got.numpy(), want, err_msg=f"step {step}")
        np.testing.assert_array_equal(dgsu_select(tf.constant(scores), k, sweep, False)[0],
                                      R.select_ranked(scores, k)[0])
    assert R.select_ranked(cases[0], 2, np.array([0b00011], np.uint8))[0].tolist() == [2, 3]


def test_window_selection_is_the_device_window():
    from dgst_tf.tflm_ops import reference as R
    from dgst_tf.training.selection import WindowChannelSelection

    sparse = make()
    x, y = batch(4)
    chosen = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, b, logs=None):
            chosen.append(sparse.selection.numpy("depthwise")["indices"].copy())

    sparse.fit(x, y, batch_size=1, verbose=0, shuffle=False,
               callbacks=[WindowChannelSelection(), Record()])
    channels, kept = sparse.selection.specs["depthwise"]
    for step, got in enumerate(chosen):
        np.testing.assert_array_equal(got, R.select_window(step, channels, kept))


def test_device_policy_names():
    assert DynamicChannelSelection().device_policy == "traversal"
    assert DynamicChannelSelection(traversal=False).device_policy == "magnitude"
    assert DynamicChannelSelection(layers_per_step=2).device_policy == "traversal"
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="layers_per_step must be None or an int >= 1"):
            DynamicChannelSelection(layers_per_step=bad)


def test_dropout_false_trains_without_dropout_as_the_exported_step_does():
    """The exported training step has no dropout: with ``dropout=False`` a training step's
    loss is the inference loss, with the default (Keras' behaviour) dropout changes it."""
    inp = keras.Input((6, 6, 3))
    h = keras.layers.Conv2D(8, 3, activation="relu", name="conv")(inp)
    h = keras.layers.GlobalAveragePooling2D()(h)
    h = keras.layers.Dropout(0.5, seed=1)(h)
    model = keras.Model(inp, keras.layers.Dense(4, name="classifier")(h))
    x = np.random.default_rng(0).normal(size=(4, 6, 6, 3)).astype(np.float32)
    y = np.array([0, 1, 2, 3])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    expected = float(loss(y, model(x, training=False)))
    losses = {}
    for dropout in (False, True):
        sparse = SparseUpdateModel(model, UpdateScheme({}), dropout=dropout)
        sparse.compile(optimizer=keras.optimizers.SGD(0.0), loss=loss)
        result = sparse.train_on_batch(x, y)
        losses[dropout] = float(result[0] if isinstance(result, list) else result)
    assert losses[False] == pytest.approx(expected, rel=1e-6)
    assert losses[True] != pytest.approx(expected, rel=1e-3)
