"""The sparse train step's shortcuts change no result, bit for bit.

- Plain SGD updates only the selected channels' weights (`SparseUpdateModel`): the same
  weights, selection state and logs as applying the zero-padded whole-kernel gradient
  through ``apply_gradients`` (the path every other optimizer takes).
- DGSU's float weight_l2 scores are kept between steps and recomputed only for the channels
  a step changed (`DynamicChannelSelection`): the same choices as recomputing every kernel.
"""
import numpy as np
import pytest
from small_models import batch

from dgst_tf.core.keras_compat import keras, tf
from dgst_tf.training.channel_importance import ChannelImportance, WeightL2
from dgst_tf.training.scheme import UpdateScheme, kernel_of
from dgst_tf.training.selection import DynamicChannelSelection, _KeptWeightL2
from dgst_tf.training.sparse_model import SparseUpdateModel, _updates_only_selected

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
# every layer kind: 1x1 conv, depthwise, 3x3 conv, hidden dense
SCHEME = {"expand": 0.5, "depthwise": 0.25, "project": "bias", "head": 0.5, "fc": 0.5}


def mixed_cnn(seed=0):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="stem")(inp)
    y = keras.layers.Conv2D(12, 1, activation="relu", name="expand")(x)
    y = keras.layers.DepthwiseConv2D(3, padding="same", activation="relu", name="depthwise")(y)
    y = keras.layers.Conv2D(8, 1, name="project")(y)
    x = keras.layers.Add()([x, y])
    x = keras.layers.Conv2D(16, 3, strides=2, activation="relu", name="head")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(10, activation="relu", name="fc")(x)
    return keras.Model(inp, keras.layers.Dense(4, name="classifier")(x))


class WholeKernelSGD(keras.optimizers.SGD):
    """The same SGD; being a subclass, it takes the zero-padded whole-kernel path."""


class RecomputedWeightL2(ChannelImportance):
    """weight_l2 recomputed from the whole kernel every step (no kept scores)."""

    name = "recomputed_weight_l2"

    def scores(self, kernel, state, step, layer_index):
        return WeightL2().scores(kernel, state, step, layer_index)


def train(optimizer, importance="weight_l2", steps=10, layers_per_step=2, traversal=True):
    sparse = SparseUpdateModel(mixed_cnn(), UpdateScheme(SCHEME))
    sparse.compile(optimizer=optimizer, loss=LOSS, metrics=["accuracy"])
    x, y = batch(steps)
    chosen, logs = [], []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, b, batch_logs=None):
            chosen.append({l.name: sparse.selection.numpy(l.name)["indices"].copy()
                           for l in sparse.weight_layers})
            logs.append(dict(batch_logs))

    callback = DynamicChannelSelection(importance, traversal=traversal,
                                       layers_per_step=layers_per_step)
    sparse.fit(x, y, batch_size=1, epochs=1, shuffle=False, verbose=0,
               callbacks=[callback, Record()])
    return sparse, chosen, logs


def assert_same_run(a, b):
    (model_a, chosen_a, logs_a), (model_b, chosen_b, logs_b) = a, b
    for va, vb in zip(model_a.weights, model_b.weights):
        assert va.name == vb.name
        np.testing.assert_array_equal(va.numpy(), vb.numpy(), err_msg=va.name)
    for step_a, step_b in zip(chosen_a, chosen_b):
        for name in step_a:
            np.testing.assert_array_equal(step_a[name], step_b[name], err_msg=name)
    assert logs_a == logs_b


@pytest.mark.parametrize("schedule", [False, True])
def test_sgd_on_selected_channels_equals_the_whole_kernel_update_bit_for_bit(schedule):
    def lr():
        return (keras.optimizers.schedules.ExponentialDecay(0.2, 3, 0.5) if schedule
                else 0.2)

    fast, whole = keras.optimizers.SGD(lr()), WholeKernelSGD(lr())
    kernels = []
    assert _updates_only_selected(fast, kernels)
    assert not _updates_only_selected(whole, kernels)
    assert not _updates_only_selected(keras.optimizers.SGD(0.1, momentum=0.9), kernels)
    assert not _updates_only_selected(keras.optimizers.SGD(0.1, clipnorm=1.0), kernels)
    run_fast, run_whole = train(fast), train(whole)
    assert_same_run(run_fast, run_whole)
    # the runs trained something: the selected channels moved, the others did not
    before = SparseUpdateModel(mixed_cnn(), UpdateScheme(SCHEME)).base
    moved = kernel_of(run_fast[0].base.get_layer("expand")).numpy() != kernel_of(
        before.get_layer("expand")).numpy()
    visited = np.unique(np.concatenate([c["expand"] for c in run_fast[1]]))
    assert moved.any() and not moved[:, :, np.setdiff1d(np.arange(8), visited)].any()


def test_sgd_step_builds_no_whole_kernel_gradient():
    """The traced plain-SGD step scatters the selected channels' update into each kernel;
    no op makes a tensor of a weight-updated kernel's full shape (a zero-padded gradient)."""
    sparse = SparseUpdateModel(mixed_cnn(), UpdateScheme(SCHEME))
    sparse.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS)
    x, y = batch(1)
    graph = tf.function(sparse.train_step).get_concrete_function(
        (tf.constant(x), tf.constant(y))).graph
    full_shapes = {tuple(kernel_of(l).shape.as_list()) for l in sparse.weight_layers}
    ops = graph.get_operations()
    scatters = [op for op in ops if op.type == "ResourceScatterNdAdd"]
    assert len(scatters) == len(sparse.weight_layers)
    padded = [(op.type, op.name) for op in ops if op.type in ("ScatterNd", "Mul", "Neg")
              and tuple(op.outputs[0].shape.as_list()) in full_shapes]
    assert not padded, padded


@pytest.mark.parametrize("traversal", [True, False])
def test_kept_weight_l2_scores_choose_as_recomputing_every_kernel(traversal):
    kept = train(keras.optimizers.Adam(0.5), "weight_l2", steps=12, traversal=traversal)
    recomputed = train(keras.optimizers.Adam(0.5), RecomputedWeightL2(), steps=12,
                       traversal=traversal)
    assert_same_run(kept, recomputed)
    moved = [name for name in kept[1][0] if len({tuple(c[name]) for c in kept[1]}) > 1]
    assert moved, "no layer's choice moved: the comparison would prove nothing"


@pytest.mark.parametrize("shape", [(1, 1, 12, 7), (3, 3, 12, 5), (3, 3, 12, 1), (12, 9)])
def test_scores_of_a_slice_equal_those_of_the_whole_kernel(shape):
    """The premise of the kept scores: a channel's score from its slice of the kernel is the
    whole-kernel score, bit for bit."""
    rng = np.random.default_rng(3)
    layer = keras.layers.Dense(9) if len(shape) == 2 else (
        keras.layers.DepthwiseConv2D(shape[0]) if shape[3] == 1
        else keras.layers.Conv2D(shape[3], shape[0]))
    layer.build((None, shape[0]) if len(shape) == 2 else (None, 8, 8, shape[2]))
    kernel = kernel_of(layer)
    assert kernel.shape.as_list() == list(shape)
    values = rng.normal(size=shape).astype(np.float32) * np.float32(1e3) ** rng.uniform(
        -1, 1, size=shape).astype(np.float32)
    scores = _KeptWeightL2(layer)
    kernel.assign(values)
    scores.update(tf.constant([4, 0, 11, 7]))
    whole = WeightL2().scores(kernel, None, None, None).numpy()
    got = scores.scores.numpy()
    np.testing.assert_array_equal(got[[4, 0, 11, 7]], whole[[4, 0, 11, 7]])
    assert not got[[1, 2, 3]].any()  # the others untouched until refreshed
    scores.refresh()
    np.testing.assert_array_equal(scores.scores.numpy(), whole)


def test_weights_changed_between_fits_are_scored_again():
    """Kept scores are recomputed in full at the start of a fit: a kernel changed between
    fits is ranked by its new weights (policy "magnitude": top-k by score)."""
    sparse = SparseUpdateModel(mixed_cnn(), UpdateScheme(SCHEME))
    sparse.compile(optimizer=keras.optimizers.SGD(0.0), loss=LOSS)
    callback = DynamicChannelSelection("weight_l2", traversal=False)
    x, y = batch(2)
    sparse.fit(x, y, batch_size=1, verbose=0, callbacks=[callback])
    kernel = kernel_of(sparse.base.get_layer("expand"))
    scale = np.ones(8, np.float32)
    scale[[1, 3, 6, 7]] = 100.0  # these four now have by far the largest norms
    kernel.assign(kernel.numpy() * scale[None, None, :, None])
    sparse.fit(x[:1], y[:1], batch_size=1, verbose=0, callbacks=[callback])
    assert sparse.selection.numpy("expand")["indices"].tolist() == [1, 3, 6, 7]
