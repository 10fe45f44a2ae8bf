"""The faster host train step computes what the plain formulations compute.

Each shortcut of the step (`SparseUpdateModel`, `DynamicChannelSelection`, `sparse_ops`)
against the formulation it replaces: the one-top-k channel ranking against the two stable
argsorts of `top_k_channels` (the same indices), TF's ReluGrad/Relu6Grad against
``dy * mask`` (bit for bit), the pointwise input gradient as a matmul against
Conv2DBackpropInput (float tolerance), the selection bookkeeping against a NumPy model of it
(bit for bit), and the in-place kernel update that leaves no kernel in copy-on-read mode.
No timing is asserted here (benchmarks/host_step_speed.py measures it).
"""
import numpy as np
import pytest
from small_models import batch, residual_cnn

from dgst_tf.core.keras_compat import keras, tf
from dgst_tf.training import sparse_ops
from dgst_tf.training.channel_importance import top_k_channels
from dgst_tf.training.scheme import UpdateScheme, kernel_of
from dgst_tf.training.selection import DynamicChannelSelection, ranked_top_k
from dgst_tf.training.sparse_model import SparseUpdateModel

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
SCHEME = {"expand": 0.5, "depthwise": 0.25, "project": "bias", "head": 0.5}


def _scores(rng, kind: int, channels: int) -> np.ndarray:
    if kind == 0:
        return rng.normal(size=channels)
    if kind == 1:  # many ties, tiny and huge magnitudes
        return rng.integers(-3, 4, channels) * rng.choice([0.5, 1e-30, 1e30])
    # signed zeros, infinities, denormals
    return rng.choice([0.0, -0.0, np.inf, -np.inf, 1e-45, -1e-45, 1e-39, 3.0, -3.0], channels)


@pytest.mark.parametrize("graph", [False, True])
def test_ranked_top_k_equals_the_two_argsorts(graph):
    rng = np.random.default_rng(0)
    rank = tf.function(ranked_top_k, reduce_retracing=True) if graph else ranked_top_k
    reference = tf.function(top_k_channels, reduce_retracing=True) if graph else top_k_channels
    for trial in range(120 if graph else 600):
        channels = int(rng.integers(1, 60))
        scores = tf.constant(_scores(rng, trial % 3, channels).astype(np.float32))
        k = int(rng.integers(1, channels + 1))
        for preferred in (None, tf.constant(rng.random(channels) < 0.5)):
            np.testing.assert_array_equal(rank(scores, k, preferred).numpy(),
                                          reference(scores, k, preferred).numpy(),
                                          err_msg=f"{scores.numpy()} k={k} {preferred}")


def test_ranked_top_k_keeps_integer_scores_exact():
    """int64 scores (the int8 graph's) above 2**53 apart by 1: ranked as integers."""
    scores = tf.constant([2**60 + 1, 2**60, 2**60 + 1, 7], tf.int64)
    assert ranked_top_k(scores, 2).numpy().tolist() == [0, 2]
    preferred = tf.constant([False, True, False, True])
    assert ranked_top_k(scores, 2, preferred).numpy().tolist() == [1, 3]


@pytest.mark.parametrize("max_value", [None, 6.0, 4.0])
def test_relu_gradient_is_dy_times_the_mask_bit_for_bit(max_value):
    rng = np.random.default_rng(1)
    x = rng.normal(0, 4, size=(2, 5, 5, 7)).astype(np.float32)
    x.flat[:6] = [0.0, -0.0, 6.0, 4.0, 1e-45, 5.9999995]
    x = tf.constant(x)
    dy = tf.constant(rng.normal(size=x.shape).astype(np.float32))
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = sparse_ops.relu_with_mask(x, max_value)
    dx = tape.gradient(y, x, output_gradients=dy)
    # the formulation it replaces (TF flushes the denormal input to zero in both)
    top = np.inf if max_value is None else max_value
    want_y = tf.nn.relu(x) if max_value is None else tf.clip_by_value(x, 0.0, max_value)
    mask = tf.logical_and(x > 0, x < top)
    want_dx = dy * tf.cast(mask, dy.dtype)
    np.testing.assert_array_equal(y.numpy(), want_y.numpy())
    # bit for bit, signed zeros included
    np.testing.assert_array_equal(dx.numpy().view(np.int32), want_dx.numpy().view(np.int32))
    assert np.signbit(dx.numpy()[~mask.numpy()]).any(), "no -0.0 case was checked"


@pytest.mark.parametrize("padding", ["SAME", "VALID"])
def test_pointwise_input_gradient_equals_conv_backprop_input(padding):
    rng = np.random.default_rng(2)
    x = tf.constant(rng.normal(size=(3, 6, 5, 24)).astype(np.float32))
    kernel = tf.constant(rng.normal(size=(1, 1, 24, 40)).astype(np.float32))
    dy = tf.constant(rng.normal(size=(3, 6, 5, 40)).astype(np.float32))
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = sparse_ops.sparse_conv2d(x, kernel, strides=(1, 1), padding=padding)
    got = tape.gradient(y, x, output_gradients=dy).numpy()
    want = tf.raw_ops.Conv2DBackpropInput(
        input_sizes=tf.shape(x), filter=kernel, out_backprop=dy, strides=[1, 1, 1, 1],
        padding=padding).numpy()
    exact = np.einsum("nhwo,co->nhwc", dy.numpy().astype(np.float64),
                      kernel.numpy()[0, 0].astype(np.float64))
    np.testing.assert_allclose(got, exact, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _train(steps: int, layers_per_step=None):
    sparse = SparseUpdateModel(residual_cnn(), UpdateScheme(SCHEME))
    sparse.compile(optimizer=keras.optimizers.SGD(0.3), loss=LOSS)
    x, y = batch(steps)
    states = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, b, logs=None):
            states.append({l.name: sparse.selection.numpy(l.name) for l in sparse.weight_layers})

    sparse.fit(x, y, batch_size=1, shuffle=False, verbose=0, callbacks=[
        DynamicChannelSelection("weight_l2", layers_per_step=layers_per_step), Record()])
    return sparse, states


def test_selection_bookkeeping_equals_its_numpy_model():
    """visited / sweep / grad_norm after every step, as the state before it says: the chosen
    channels are marked and their gradient norm stored only if the layer was active."""
    sparse, states = _train(9, layers_per_step=1)
    specs = sparse.selection.specs
    previous = {name: {"visited": np.zeros(c, bool), "sweep": np.zeros(c, bool),
                       "grad_norm": np.zeros(c, np.float32)} for name, (c, _) in specs.items()}
    inactive = stored = 0
    for step in states:
        for name, state in step.items():
            chosen, before = state["indices"], previous[name]
            sweep = np.zeros_like(before["sweep"]) if before["sweep"].all() else before["sweep"]
            want_visited, want_sweep = before["visited"].copy(), sweep.copy()
            if state["active"]:
                want_visited[chosen] = want_sweep[chosen] = True
                stored += int((state["grad_norm"][chosen] != before["grad_norm"][chosen]).any())
            else:
                inactive += 1
            np.testing.assert_array_equal(state["visited"], want_visited)
            np.testing.assert_array_equal(state["sweep"], want_sweep)
            untouched = np.setdiff1d(np.arange(len(want_visited)),
                                     chosen if state["active"] else [])
            np.testing.assert_array_equal(state["grad_norm"][untouched],
                                          before["grad_norm"][untouched])
            previous[name] = state
    assert inactive, "every layer was active: the inactive case was not checked"
    assert stored, "no gradient norm was ever stored"


def test_kernel_update_leaves_no_kernel_in_copy_on_read_mode():
    """Every in-place scatter into a kernel is followed by DisableCopyOnRead on the same
    variable, after every gradient of the step (so no read of the old kernel is alive)."""
    sparse = SparseUpdateModel(residual_cnn(), UpdateScheme(SCHEME))
    sparse.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS)
    x, y = batch(1)
    graph = tf.function(sparse.train_step).get_concrete_function(
        (tf.constant(x), tf.constant(y))).graph
    ops = graph.get_operations()
    scatters = [op for op in ops if op.type == "ResourceScatterNdAdd"]
    disables = [op for op in ops if op.type == "DisableCopyOnRead"]
    assert len(scatters) == len(disables) == len(sparse.weight_layers)
    for scatter, disable in zip(scatters, disables):
        assert scatter.inputs[0] is disable.inputs[0]  # the same kernel handle
        assert scatter in disable.control_inputs
    # and the step still trains exactly the selected channels
    before = {l.name: kernel_of(l).numpy() for l in sparse.weight_layers}
    sparse.fit(x, y, batch_size=1, verbose=0)
    for layer in sparse.weight_layers:
        kept = sparse.selection.numpy(layer.name)["indices"]
        after = kernel_of(layer).numpy()
        np.testing.assert_array_equal(np.delete(after, kept, axis=2),
                                      np.delete(before[layer.name], kept, axis=2))
        assert not np.array_equal(after[:, :, kept], before[layer.name][:, :, kept])
