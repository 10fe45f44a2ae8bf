"""Channel pruning: dependency groups, TF-MOT-driven masks, physical removal, patterns."""
import numpy as np
import pytest
import tensorflow_model_optimization as tfmot

from tensorflow_model_optimization.python.core.sparsity.keras.pruning_wrapper import (
    PruneLowMagnitude)

from dgst_tf import models
from dgst_tf.core.keras_compat import keras, tf
from dgst_tf.pruning import (ActivationPattern, BatchNormScale, DependencyGraph,
                             UnsupportedLayerError, channel_pruner, flash_bytes, footprint,
                             get_pattern, groups_to_prune, mask_groups, pattern_conv2d,
                             pattern_depthwise_conv2d, prune_channel_groups,
                             prune_while_training, remove_channels, select_groups,
                             sparsity_for_budget, stored_bytes, with_activation_patterns,
                             zeroed_groups)
from dgst_tf.jobs.flash_budget import FIRMWARE_ALLOWANCE_BYTES
from dgst_tf.pruning.group_selection import _kept_count
from dgst_tf.pruning.model_size import deployable_size

from small_models import batch, residual_cnn

L = keras.layers


def _randomise_bn(model, seed=0):
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape),
                               rng.normal(0, 0.1, beta.shape),
                               rng.normal(0, 0.1, mean.shape),
                               rng.uniform(0.5, 1.5, var.shape)])
    return model


@pytest.fixture(scope="module")
def mobilenet():
    model = models.mobilenet_v2(0.35, (32, 32, 3), classes=10, weights=None, seed=0)
    return _randomise_bn(model), DependencyGraph(model)


def zoo_model():
    """Every supported layer kind once: concat offsets, depth multiplier, flatten -> dense."""
    keras.utils.set_random_seed(3)
    inp = keras.Input((8, 8, 3), name="image")
    x = L.Rescaling(1 / 2.0, offset=-0.5, name="rescale")(inp)
    a = L.Conv2D(4, 3, padding="same", name="a")(x)
    a = L.Normalization(axis=-1, mean=[0.1, -0.2, 0.3, 0.0], variance=[1.0, 2.0, 0.5, 1.5],
                        name="norm")(a)
    b = L.Conv2D(3, 1, use_bias=False, name="b")(x)
    c = L.Concatenate(name="concat")([a, b])                     # 7 channels: a 0-3, b 4-6
    c = L.BatchNormalization(name="bn")(c)
    c = L.Activation("swish", name="act")(c)
    c = L.ZeroPadding2D(1, name="pad")(c)
    c = L.MaxPooling2D(2, name="maxpool")(c)                      # 5x5
    d = L.DepthwiseConv2D(3, depth_multiplier=2, name="dw")(c)    # 3x3x14
    d = L.ReLU(name="relu")(d)
    e = L.Conv2D(14, 1, name="e")(d)
    f = L.Add(name="add")([d, e])
    f = L.AveragePooling2D(1, name="avgpool")(f)
    f = L.Dropout(0.3, name="drop")(f)
    flat = L.Dense(5, name="dense_flat")(L.Flatten(name="flatten")(f))   # 3*3*14 = 126 rows
    pooled = L.Dense(5, name="dense_pool")(L.GlobalMaxPooling2D(name="gmp")(f))
    out = L.Dense(2, name="classifier")(L.Add(name="merge")([flat, pooled]))
    return _randomise_bn(keras.Model(inp, out, name="zoo"), seed=3)


def _members(group):
    return {(m.layer, m.role): m.indices for m in group}


DIVISORS = np.linspace(0.5, 2.0, 8).astype(np.float32)


def tf_function_model():
    """TensorFlow functions on Keras tensors (TFOpLambda layers): a scalar on either side, a
    per-channel divisor, and a squeeze-and-excitation gate written with tf.reduce_mean,
    tf.math.sigmoid and tf.math.multiply."""
    keras.utils.set_random_seed(7)
    inp = keras.Input((6, 6, 3), name="image")
    x = L.BatchNormalization(name="a_bn")(L.Conv2D(8, 3, padding="same", name="a")(inp))
    x = tf.nn.relu6(3.0 - x) / DIVISORS                   # subtract(3.0, x), truediv(x, [8])
    se = tf.reduce_mean(x, axis=[1, 2], keepdims=True)     # spatial: keeps the channels
    se = L.Conv2D(4, 1, activation="relu", name="se_reduce")(se)
    se = tf.math.sigmoid(L.Conv2D(8, 1, name="se_expand")(se))
    x = L.Conv2D(8, 1, name="b")(tf.math.multiply(x, se) * 0.5)
    out = L.Dense(3, name="classifier")(L.GlobalAveragePooling2D(name="pool")(x))
    return _randomise_bn(keras.Model(inp, out, name="tf_functions"), seed=7)


def _tf_layer(model, symbol):
    """The name of the one TFOpLambda of ``model`` calling ``tf.<symbol>``."""
    names = [l.name for l in model.layers if getattr(l, "symbol", None) == symbol]
    assert len(names) == 1, (symbol, names)
    return names[0]


# ------------------------------------------------------------------ dependency graph
def test_residual_add_couples_both_branches_and_all_readers():
    graph = DependencyGraph(residual_cnn())
    group = graph.group("stem", 5)
    assert _members(group) == {
        ("stem", "out"): (5,), ("stem_bn", "channel"): (5,), ("stem_relu", "pass"): (5,),
        ("expand", "in"): (5,), ("project", "out"): (5,), ("project_bn", "channel"): (5,),
        ("add", "pass"): (5,), ("pad", "pass"): (5,), ("head", "in"): (5,)}
    assert graph.group("project", 5) is group and graph.group("head", 5, role="in") is group
    expand = _members(graph.group("expand", 7))
    assert expand[("depthwise", "depthwise")] == (7,) and expand[("project", "in")] == (7,)
    assert ("stem", "out") not in expand


def test_mobilenet_groups_follow_residual_stages_and_depthwise(mobilenet):
    _, graph = mobilenet
    stage = graph.group("block_1_project", 2)   # the 24-channel stream of blocks 1-2
    assert set(stage.layers("out")) == {"block_1_project", "block_2_project"}
    assert set(stage.layers("in")) == {"block_2_expand", "block_3_expand"}
    assert stage.member("block_2_add").indices == (2,)
    expand = graph.group("block_3_expand", 5)
    assert expand.member("block_3_depthwise", "depthwise").indices == (5,)
    assert expand.member("block_3_depthwise_pad").indices == (5,)
    assert expand.member("block_3_project", "in").indices == (5,)
    assert "block_3_project" not in expand.layers("out")
    # stem -> block 0 depthwise (no expansion in block 0)
    assert graph.group("stem_conv", 0).member("block_0_depthwise").role == "depthwise"
    assert len(graph.families()) == 25
    assert sum(f.size for f in graph.families()) == len(graph.groups())


def test_inputs_and_classifier_outputs_are_not_prunable(mobilenet):
    _, graph = mobilenet
    logits = graph.group("classifier", 3)
    assert not logits.prunable and logits.reason == "model output"
    image = graph.group("stem_conv", 1, role="in")
    assert not image.prunable and "input" in image.reason
    assert all(g.prunable for g in graph.groups())
    assert graph.group("classifier", 0, role="in").prunable   # head channels are


def test_concat_offsets_depth_multiplier_and_flatten_rows():
    graph = DependencyGraph(zoo_model())
    g = _members(graph.group("b", 1))
    assert g[("concat", "pass")] == (5,) and g[("bn", "channel")] == (5,)
    assert g[("dw", "depthwise")] == (5,) and g[("relu", "pass")] == (10, 11)
    assert g[("e", "in")] == (10, 11) and g[("add", "pass")] == (10, 11)
    # flatten of 3x3x14: channel c is row c + 14 * k
    assert g[("dense_flat", "in")] == tuple(sorted(c + 14 * k for k in range(9)
                                                   for c in (10, 11)))
    assert g[("dense_pool", "in")] == (10, 11)
    assert graph.group("a", 2).member("norm").indices == (2,)
    # the add couples e's outputs with the depthwise outputs of the same index
    assert graph.group("e", 10) is graph.group("b", 1)
    assert graph.group("dense_flat", 0).member("dense_pool", "out").indices == (0,)
    assert not graph.group("classifier", 1).prunable


@pytest.mark.parametrize("bad", ["layernorm", "lambda"])
def test_unsupported_layer_error_names_layer_and_class(bad):
    inp = keras.Input((4, 4, 2))
    x = L.Conv2D(3, 1, name="c1")(inp)
    if bad == "layernorm":
        x = L.LayerNormalization(name="my_norm")(x)
        expected = ("'my_norm'", "LayerNormalization")
    else:
        x = L.Lambda(lambda t: t * 2, name="my_lambda")(x)
        expected = ("'my_lambda'", "Lambda")
    out = L.Dense(2)(L.Flatten()(x))
    with pytest.raises(UnsupportedLayerError) as err:
        DependencyGraph(keras.Model(inp, out))
    assert all(e in str(err.value) for e in expected)


def test_transposed_conv_is_unsupported_not_misgrouped():
    # Conv2DTranspose subclasses Conv2D but its kernel is (kh, kw, out, in)
    inp = keras.Input((4, 4, 2))
    x = L.Conv2DTranspose(3, 1, name="my_up")(inp)
    out = L.Dense(2)(L.Flatten()(x))
    with pytest.raises(UnsupportedLayerError) as err:
        DependencyGraph(keras.Model(inp, out))
    assert "'my_up'" in str(err.value) and "Conv2DTranspose" in str(err.value)


def test_random_group_importance_is_distinct_from_channel_selection():
    from dgst_tf.pruning import RandomGroupImportance, RandomImportance, get_group_importance
    from dgst_tf.training import channel_importance

    assert RandomImportance is RandomGroupImportance          # the old public name
    assert isinstance(get_group_importance("random"), RandomGroupImportance)
    assert RandomGroupImportance is not channel_importance.RandomImportance


# -------------------------------------------------------------------- removal
@pytest.mark.parametrize("which", ["residual", "zoo", "mobilenet"])
def test_removed_model_equals_masked_model(which, mobilenet):
    if which == "mobilenet":
        model, graph = mobilenet
        shape = (32, 32, 3)
    else:
        model = residual_cnn() if which == "residual" else zoo_model()
        graph = DependencyGraph(model)
        shape = (8, 8, 3)
    removed = select_groups(model, 0.4, graph=graph)
    assert len(removed) > 0.3 * len(graph.groups())
    masked = mask_groups(model, removed, graph)
    small = remove_channels(masked)               # groups found from the zeros
    assert sorted(zeroed_groups(masked)) == sorted(removed)
    x = np.random.default_rng(1).normal(size=(3, *shape)).astype(np.float32)
    expected = masked(x, training=False).numpy()
    assert not np.allclose(expected, model(x, training=False).numpy(), atol=1e-3)
    np.testing.assert_allclose(small(x, training=False).numpy(), expected, atol=1e-5)
    before, after = footprint(model, shape), footprint(small, shape)
    assert after.parameters < before.parameters
    assert after.flash_bytes == flash_bytes(model, removed, graph) < before.flash_bytes
    assert after.macs < before.macs
    if before.activation_peak_bytes is not None:
        assert after.activation_peak_bytes < before.activation_peak_bytes


def test_removal_rejects_unprunable_groups(mobilenet):
    model, graph = mobilenet
    logit = graph.group("classifier", 0).index
    with pytest.raises(ValueError, match="cannot be removed"):
        remove_channels(model, [logit], graph)


def test_sparsity_for_budget_is_the_smallest_that_fits(mobilenet):
    model, graph = mobilenet
    full = flash_bytes(model)
    budget = full // 2
    sparsity, size = sparsity_for_budget(model, budget, graph, size="weights")
    assert size <= budget
    assert flash_bytes(model, groups_to_prune(graph, sparsity - 0.01), graph) > budget
    small = remove_channels(model, select_groups(model, sparsity, graph=graph), graph)
    assert footprint(small).flash_bytes == size


def test_sparsity_for_budget_counts_the_deployable_file_by_default(mobilenet):
    from dgst_tf.pruning.prune_to_budget import DEPLOYABLE_MARGIN, pruned_name

    model, graph = mobilenet
    budget = flash_bytes(model) // 2
    sparsity, size = sparsity_for_budget(model, budget, graph)
    weights_only, _ = sparsity_for_budget(model, budget, graph, size="weights")
    assert sparsity > weights_only + 0.05  # the file holds more than the weights

    def deployable(s):  # once fine-tuned: no bias is zero any more
        return deployable_size(model, groups_to_prune(graph, s), graph,
                               name=pruned_name(model), fine_tuned=True).total

    assert size == deployable(sparsity)
    assert size * (1 + DEPLOYABLE_MARGIN) <= budget < deployable(sparsity - 0.01)
    small = remove_channels(model, select_groups(model, sparsity, graph=graph), graph,
                            name=pruned_name(model))
    assert deployable_size(small, fine_tuned=True).total == size
    with pytest.raises(ValueError, match="size must be one of"):
        sparsity_for_budget(model, budget, graph, size="file")


# -------------------------------------------------------------- TF-MOT integration
def test_tfmot_schedule_drives_group_sparsity_step_by_step():
    model = residual_cnn()
    schedule = tfmot.sparsity.keras.PolynomialDecay(0.0, 0.5, begin_step=0, end_step=4,
                                                    power=1, frequency=1)
    pruning = prune_channel_groups(model, schedule)
    wrappers = [l for l in pruning.layers if isinstance(l, PruneLowMagnitude)]
    assert len(wrappers) == 10                 # convs, BNs and the classifier
    pruner = channel_pruner(pruning)
    seen = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch_index, logs=None):
            step = int(pruning.get_layer("prune_channel_groups_stem").pruning_step.numpy())
            seen.append((step, pruner.family_sparsity()))

    pruning.compile(keras.optimizers.SGD(0.05, momentum=0.9),
                    keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = batch(12)
    pruning.fit(x, y, batch_size=2, verbose=0,
                callbacks=[tfmot.sparsity.keras.UpdatePruningStep(), Record()])
    assert [s for s, _ in seen] == list(range(1, 7))
    for step, fractions in seen:
        target = float(schedule(step)[1])
        for family in pruner.families:
            n = family.size
            assert fractions[family.name] == pytest.approx(
                (n - _kept_count(target, n, 1, 1)) / n), (step, family.name)
    assert seen[-1][1] == {"stem": 0.5, "expand": 0.5, "head": 0.5}
    # strip_pruning leaves zeros exactly where the pruner masked; removal keeps outputs
    masked = tfmot.sparsity.keras.strip_pruning(pruning)
    assert sorted(zeroed_groups(masked)) == sorted(pruner.removed_groups())
    small = remove_channels(masked)
    np.testing.assert_allclose(small(x, training=False).numpy(),
                               pruning(x, training=False).numpy(), atol=1e-5)
    assert small.get_layer("expand").filters == 6 and small.get_layer("stem").filters == 4


def test_constant_sparsity_waits_for_begin_step_and_needs_the_callback():
    schedule = tfmot.sparsity.keras.ConstantSparsity(0.5, begin_step=3, frequency=1)
    pruning = prune_channel_groups(residual_cnn(), schedule, exclude=["head"])
    pruning.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = batch(4)
    with pytest.raises(tf.errors.InvalidArgumentError, match="UpdatePruningStep"):
        pruning.fit(x, y, batch_size=2, verbose=0)
    pruner = channel_pruner(pruning)
    pruning.fit(x, y, batch_size=2, verbose=0,
                callbacks=[tfmot.sparsity.keras.UpdatePruningStep()])   # steps 1, 2
    assert not pruner.removed_groups().size
    pruning.fit(x, y, batch_size=2, verbose=0,
                callbacks=[tfmot.sparsity.keras.UpdatePruningStep()])   # steps 3, 4
    assert pruner.family_sparsity() == {"stem": 0.5, "expand": 0.5}     # head excluded


def test_importance_is_pluggable():
    model = residual_cnn()
    graph = DependencyGraph(model)
    stem_family = graph.family("stem")
    gamma = np.linspace(0.1, 1.6, 8)[::-1]          # channel 7 has the smallest |gamma|
    weights = model.get_layer("stem_bn").get_weights()
    model.get_layer("stem_bn").set_weights([gamma, *weights[1:]])
    project = model.get_layer("project_bn").get_weights()
    model.get_layer("project_bn").set_weights([np.full(8, 0.01), *project[1:]])
    removed = set(select_groups(model, 0.25, importance=BatchNormScale(), graph=graph))
    assert {graph.group("stem", c).index for c in (6, 7)} <= removed
    assert len(removed & set(stem_family.groups)) == 2

    def largest_first(terms, num_groups):            # any callable works
        from dgst_tf.pruning import GroupL2
        return -GroupL2()(terms, num_groups)

    default = set(select_groups(model, 0.25, graph=graph))
    inverted = set(select_groups(model, 0.25, importance=largest_first, graph=graph))
    assert default.isdisjoint(inverted)


def test_prune_while_training_reaches_the_final_sparsity():
    model = residual_cnn()
    x, y = batch(16)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
    result = prune_while_training(model, ds, 0.5, epochs=1, updates=2)
    assert set(result.family_sparsity.values()) == {0.5}
    np.testing.assert_allclose(result.model(x, training=False).numpy(),
                               result.masked_model(x, training=False).numpy(), atol=1e-5)
    assert footprint(result.model).flash_bytes < footprint(model).flash_bytes


# ------------------------------------------------------------- reshapes, softmax heads
def reshape_model(softmax_in_classifier=False):
    """A 1x1-conv classifier after keepdims pooling with Reshape and softmax (MobileNet v1's
    head; ``softmax_in_classifier``: the conv's own activation, before the Reshape), after a
    channel-keeping Reshape of the map and back."""
    keras.utils.set_random_seed(5)
    inp = keras.Input((6, 6, 3), name="image")
    x = L.Conv2D(6, 3, strides=2, padding="same", name="stem")(inp)       # 3x3x6
    x = L.BatchNormalization(name="stem_bn")(x)
    x = L.ReLU(6.0, name="stem_relu")(x)
    x = L.Reshape((9, 6), name="rows")(x)                                  # keeps channels
    x = L.Reshape((3, 3, 6), name="map")(x)
    x = L.Conv2D(8, 1, name="expand")(x)
    x = L.GlobalAveragePooling2D(keepdims=True, name="pool")(x)
    x = L.Conv2D(5, 1, activation="softmax" if softmax_in_classifier else None,
                 name="conv_preds")(x)
    out = L.Reshape((5,), name="reshape")(x)
    if not softmax_in_classifier:
        out = L.Activation("softmax", name="predictions")(out)
    return _randomise_bn(keras.Model(inp, out, name="reshape_net"), seed=5)


def _logits_and_outputs(models_by_name, x):
    from dgst_tf.core.classifier import logits_model

    return {name: logits_model(m)(x).numpy() for name, m in models_by_name.items()}


def test_reshape_keeps_channels_and_removal_of_a_conv_head_model_equals_masking():
    model = reshape_model()
    graph = DependencyGraph(model)
    g = _members(graph.group("stem", 2))
    assert g[("rows", "pass")] == (2,) and g[("map", "pass")] == (2,)
    assert g[("expand", "in")] == (2,)
    g = _members(graph.group("expand", 3))  # through the pooled [1, 1, 8] to the classifier
    assert g[("pool", "pass")] == (3,) and g[("conv_preds", "in")] == (3,)
    assert not graph.group("conv_preds", 0).prunable  # the logits
    removed = [graph.group("stem", 2).index, graph.group("expand", 3).index,
               graph.group("expand", 6).index]
    small = remove_channels(model, removed, graph)
    masked = mask_groups(model, removed, graph)
    assert small.get_layer("stem").filters == 5 and small.get_layer("expand").filters == 6
    assert small.get_layer("expand").kernel.shape == (1, 1, 5, 6)
    assert small.get_layer("conv_preds").kernel.shape == (1, 1, 6, 5)
    assert small.get_layer("rows").output_shape == (None, 9, 5)
    x = np.random.default_rng(0).normal(size=(3, 6, 6, 3)).astype(np.float32)
    logits = _logits_and_outputs({"small": small, "masked": masked, "model": model}, x)
    np.testing.assert_allclose(logits["small"], logits["masked"], atol=1e-5)
    assert np.abs(logits["masked"] - logits["model"]).max() > 1e-3  # removal did something
    np.testing.assert_allclose(small(x).numpy().sum(-1), 1, atol=1e-5)  # softmax kept


def test_tf_functions_pass_channels_on_and_per_channel_constants_are_sliced():
    """Scalar TensorFlow functions pass a channel on, the per-channel divisor is a parameter
    of it, the gate's multiply ties the gate's channel to the map's; removal cuts the
    divisor to the kept channels and computes what masking computes."""
    model = tf_function_model()
    graph = DependencyGraph(model)
    names = {s: _tf_layer(model, s) for s in ("math.subtract", "nn.relu6", "math.truediv",
                                              "math.reduce_mean", "math.sigmoid")}
    multiplies = [l.name for l in model.layers if getattr(l, "symbol", "") == "math.multiply"]
    g = _members(graph.group("a", 2))
    assert g[(names["math.truediv"], "channel")] == (2,)   # not "pass": it has parameters
    for symbol in ("math.subtract", "nn.relu6", "math.reduce_mean", "math.sigmoid"):
        assert g[(names[symbol], "pass")] == (2,), symbol
    assert all(g[(name, "pass")] == (2,) for name in multiplies)
    assert g[("se_reduce", "in")] == (2,) and g[("b", "in")] == (2,)
    assert graph.group("a", 2) is graph.group("se_expand", 2)  # the gate's multiply ties them
    assert graph.group("se_reduce", 1).layers() == ["se_reduce", "se_expand"]
    removed = [graph.group("a", 2).index, graph.group("a", 5).index,
               graph.group("se_reduce", 1).index]
    small = remove_channels(model, removed, graph)
    divisor = small.get_layer(names["math.truediv"])._inbound_nodes[0].call_args[1]
    np.testing.assert_array_equal(divisor, DIVISORS[[0, 1, 3, 4, 6, 7]])
    assert small.get_layer("se_expand").kernel.shape == (1, 1, 3, 6)
    x = np.random.default_rng(0).normal(size=(3, 6, 6, 3)).astype(np.float32)
    expected = mask_groups(model, removed, graph)(x).numpy()
    assert np.abs(expected - model(x).numpy()).max() > 1e-3
    np.testing.assert_allclose(small(x).numpy(), expected, atol=1e-5)
    # the one-shot path: select by L2, mask, remove what the zeros show
    removed = select_groups(model, 0.4, graph=graph)
    masked = mask_groups(model, removed, graph)
    assert len(removed) >= 4 and sorted(zeroed_groups(masked)) == sorted(removed)
    np.testing.assert_allclose(remove_channels(masked)(x).numpy(), masked(x).numpy(),
                               atol=1e-5)


def test_a_flattening_reshape_takes_the_rows_of_its_channels():
    keras.utils.set_random_seed(6)
    inp = keras.Input((3, 3, 2))
    x = L.Conv2D(4, 1, name="c1")(inp)
    out = L.Dense(3, name="fc")(L.Reshape((-1,), name="flat")(x))        # 36 rows
    model = keras.Model(inp, out)
    graph = DependencyGraph(model)
    assert graph.group("c1", 1).member("fc", "in").indices == tuple(1 + 4 * k
                                                                     for k in range(9))
    small = remove_channels(model, [graph.group("c1", 1).index], graph)
    assert small.get_layer("fc").kernel.shape == (27, 3)
    x = np.random.default_rng(0).normal(size=(2, 3, 3, 2)).astype(np.float32)
    np.testing.assert_allclose(small(x), mask_groups(model, [graph.group("c1", 1).index],
                                                     graph)(x), atol=1e-5)


def test_a_reshape_that_mixes_channels_is_refused_naming_it():
    inp = keras.Input((4, 4, 3))
    x = L.Conv2D(6, 1, name="c1")(inp)
    x = L.Reshape((4, 24), name="mixing")(x)   # channels of 4 pixels in one axis
    out = L.Dense(2, name="fc")(L.Flatten()(x))
    with pytest.raises(UnsupportedLayerError, match=r"layer 'mixing' \(Reshape\).*\(4, 4, 6\) "
                                                    r"to \(4, 24\)"):
        DependencyGraph(keras.Model(inp, out))


def test_prune_while_training_a_softmax_model_uses_the_probabilities():
    """At learning rate 0 and sparsity 0, the logged loss is the cross-entropy of the model's
    probabilities, also where Keras cannot see the softmax (the classifier's own activation
    before a Reshape: read as logits, they would be softmaxed twice); a conv-head model
    prunes into the same form; distillation, which matches logits, refuses a softmax model
    naming its softmax."""
    x = np.random.default_rng(1).normal(size=(8, 6, 6, 3)).astype(np.float32)
    y = np.arange(8) % 5
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    model = reshape_model(softmax_in_classifier=True)
    twin = keras.models.clone_model(model)  # fit runs BatchNorm on the batch statistics
    twin.set_weights(model.get_weights())
    probabilities = twin(x, training=True)
    expected = float(keras.losses.SparseCategoricalCrossentropy()(y, probabilities))
    twice = float(keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y,
                                                                                probabilities))
    assert abs(expected - twice) > 0.05  # the check tells the two apart
    result = prune_while_training(model, ds, 0.0, epochs=1,
                                  optimizer=keras.optimizers.SGD(0.0))
    assert result.history["loss"][0] == pytest.approx(expected, rel=1e-5)
    model = reshape_model()
    result = prune_while_training(model, ds, 0.3, epochs=1)
    assert result.model.get_layer("expand").filters < 8
    assert isinstance(result.model.get_layer("conv_preds"), L.Conv2D)  # the head's form
    assert result.model.layers[-1].name == "predictions"
    with pytest.raises(ValueError, match=r"ends in softmax 'predictions'.*logits_model"):
        prune_while_training(model, ds, 0.3, teacher=model)


# ----------------------------------------------------------------- activation patterns
def _oracle_gradient(x, kernel, dy, pattern, strides, padding, dilations, depthwise):
    """d/dW of scale * sum over the pattern's positions of <dy, conv(x, W)>, by GradientTape."""
    w = tf.Variable(kernel)
    with tf.GradientTape() as tape:
        if depthwise:
            y = tf.nn.depthwise_conv2d(x, w, [1, *strides, 1], padding, dilations=dilations)
        else:
            y = tf.nn.conv2d(x, w, [1, *strides, 1], padding, dilations=[1, *dilations, 1])
        h, wd = y.shape[1], y.shape[2]
        mask = np.zeros((h, wd), np.float32)
        for rows, cols in pattern.output_grids(h, wd):
            mask[np.ix_(rows, cols)] = 1.0
        loss = tf.reduce_sum(y * dy * mask[None, :, :, None]) * pattern.scale(h, wd)
    grad = tape.gradient(loss, w).numpy()
    kept = np.zeros(x.shape[3], np.float32)
    kept[pattern.kept_channels(x.shape[3])] = 1.0
    return grad * kept[None, None, :, None]


@pytest.mark.parametrize("depthwise", [False, True])
@pytest.mark.parametrize("pattern", ["full", "stride2", "rows2", "cols2", "checker",
                                     "cblock2/2", ActivationPattern.stride(3, offset=1)])
@pytest.mark.parametrize("geometry", [(1, 1, "SAME", 1), (3, 1, "SAME", 1),
                                      (3, 2, "SAME", 1), (3, 2, "VALID", 1),
                                      (3, 1, "SAME", 2)])
def test_pattern_weight_gradient_matches_gradient_tape(depthwise, pattern, geometry):
    k, s, padding, d = geometry
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(2, 9, 8, 4)).astype(np.float32))
    kernel = rng.normal(size=(k, k, 4, 2 if depthwise else 5)).astype(np.float32)
    w = tf.Variable(kernel)
    op = pattern_depthwise_conv2d if depthwise else pattern_conv2d
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        y = op(x, w, None, strides=(s, s), padding=padding, dilations=(d, d),
               pattern=pattern)
    dy = tf.constant(rng.normal(size=y.shape).astype(np.float32))
    got_w, got_x = tape.gradient(y, [w, x], output_gradients=dy)
    pattern = get_pattern(pattern)
    expected = _oracle_gradient(x, kernel, dy, pattern, (s, s), padding, (d, d), depthwise)
    np.testing.assert_allclose(got_w.numpy(), expected, rtol=1e-5, atol=1e-4)
    with tf.GradientTape() as tape:   # the input gradient stays exact
        tape.watch(x)
        y_ref = (tf.nn.depthwise_conv2d(x, kernel, [1, s, s, 1], padding, dilations=(d, d))
                 if depthwise else tf.nn.conv2d(x, kernel, [1, s, s, 1], padding,
                                                dilations=[1, d, d, 1]))
    np.testing.assert_allclose(y.numpy(), y_ref.numpy(), atol=1e-5)
    np.testing.assert_allclose(got_x.numpy(), tape.gradient(y_ref, x, dy).numpy(), atol=1e-4)
    if pattern.is_full:
        with tf.GradientTape() as tape:
            y_full = (tf.nn.depthwise_conv2d(x, w, [1, s, s, 1], padding, dilations=(d, d))
                      if depthwise else tf.nn.conv2d(x, w, [1, s, s, 1], padding,
                                                     dilations=[1, d, d, 1]))
        np.testing.assert_allclose(got_w.numpy(), tape.gradient(y_full, w, dy).numpy(),
                                   rtol=1e-5, atol=1e-4)


def test_pattern_stored_bytes():
    assert stored_bytes("full", (12, 12, 96)) == 12 * 12 * 96
    assert stored_bytes("stride2", (12, 12, 96)) == 6 * 6 * 96
    assert stored_bytes("rows2", (12, 12, 96), kept_channels=24) == 6 * 12 * 24
    assert stored_bytes("checker", (12, 12, 96)) == 12 * 12 * 96 // 2
    assert stored_bytes("cblock8/2", (12, 12, 96)) == 12 * 12 * 48
    # a 3x3 stride-1 conv reads every input row under stride 2, not under stride 4
    assert stored_bytes("stride2", (12, 12, 8), kernel_size=3) == 12 * 12 * 8
    assert stored_bytes("stride4", (12, 12, 8), kernel_size=3) == 8 * 8 * 8
    with pytest.raises(ValueError, match="unknown activation pattern"):
        get_pattern("diagonal")


def test_with_activation_patterns_keeps_outputs_and_trains_the_same_variables():
    model = residual_cnn()
    x, y = batch(4)
    full = with_activation_patterns(model, {"expand": "full", "project": "full"})
    strided = with_activation_patterns(model, {"expand": "stride2"})
    np.testing.assert_allclose(full(x).numpy(), model(x).numpy(), atol=1e-5)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    kernel = model.get_layer("expand").kernel
    grads = []
    for net in (model, full, strided):
        with tf.GradientTape() as tape:
            value = loss(y, net(x, training=True))
        grads.append(tape.gradient(value, kernel).numpy())
    np.testing.assert_allclose(grads[1], grads[0], rtol=1e-4, atol=1e-6)
    assert not np.allclose(grads[2], grads[0], atol=1e-6)


# ------------------------------------------------------------------------------- CLI
@pytest.mark.parametrize("training", [["--epochs", "0"], ["--epochs", "1", "--distill"]],
                         ids=["one-shot", "distilled"])
def test_cli_prune_writes_a_model_that_fits_the_budget(tmp_path, capsys, training):
    import argparse
    import json

    from dgst_tf.cli.prune import add_prune_parser

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c, name in enumerate(("cat", "dog")):
            folder = tmp_path / "data" / split / name
            folder.mkdir(parents=True)
            for i in range(4):
                image = (rng.integers(0, 60, (16, 16, 3)) + 150 * c).astype(np.uint8)
                tf.io.write_file(str(folder / f"{i}.png"), tf.io.encode_png(image))
    parser = argparse.ArgumentParser()
    add_prune_parser(parser.add_subparsers(dest="command"))
    budget = FIRMWARE_ALLOWANCE_BYTES + 200 * 1024  # 200 KB left for the training file
    args = parser.parse_args([
        "prune", "--width", "0.35", "--image-size", "32", "--weights", "none",
        "--flash-budget", str(budget), "--dataset", "folder", "--data", str(tmp_path / "data"),
        *training, "--batch-size", "4", "--output", str(tmp_path / "out" / "pruned.h5"),
        "--report", str(tmp_path / "report.json")])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["pruned.h5"]  # no temp left
    small = keras.models.load_model(tmp_path / "out" / "pruned.h5", compile=False)
    deployable = deployable_size(small).total
    assert deployable + FIRMWARE_ALLOWANCE_BYTES <= budget
    assert (f"{deployable} bytes .tflite + {FIRMWARE_ALLOWANCE_BYTES} bytes firmware "
            f"allowance = {deployable + FIRMWARE_ALLOWANCE_BYTES} bytes fits {budget}") in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["fits"] and report["deployable_bytes"] == deployable
    assert report["firmware_allowance_bytes"] == FIRMWARE_ALLOWANCE_BYTES
    assert report["after"]["flash_bytes"] == footprint(small).flash_bytes
    assert report["deployable_before"]["total"] > 2 * deployable
    assert ("distilled from the unpruned model" in report["training"]) == (
        "--distill" in training)


def test_cli_prune_refuses_a_budget_the_firmware_fills(tmp_path):
    import argparse

    from dgst_tf.cli.prune import add_prune_parser

    parser = argparse.ArgumentParser()
    add_prune_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["prune", "--flash-budget", "100KB", "--firmware-allowance",
                              "100KB", "--dataset", "none", "--weights", "none",
                              "--output", str(tmp_path / "p.h5")])
    with pytest.raises(ValueError, match=r"100KB \(102400 bytes\) leaves nothing .* "
                                         r"allowance of 102400 bytes"):
        args.func(args)
