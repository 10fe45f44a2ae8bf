"""Bring your own model: the CNN families users bring, tiny (random weights, 32x32), through the
whole flow. The classifier may be a Dense layer or a 1x1 Conv2D of the pooled map, with or
without a softmax (`dgst_tf.core.classifier`); layers the int8 training step cannot train
through are refused up front, by name (`dgst_tf.core.training_support`).

Per family: the sparse DGSU step against tf.GradientTape on the logits (the oracle), the memory
report, and, where the int8 step exports, TFLM's steps of the exported graph against the Keras
int8 simulation bit for bit (logits codes, kept channels, int8 weights, int32 biases) and the
memory model's arena against TFLM's."""
import re

import numpy as np
import pytest

from small_models import int8_steps_equal_tflm

from dgst_tf.core.bn_folding import fold_batchnorm
from dgst_tf.core.classifier import (ClassifierError, find_classifier, logits_model,
                                     training_form)
from dgst_tf.core.keras_compat import keras, tf
from dgst_tf.core.layer_kinds import input_channels, kernel_of
from dgst_tf.core.training_support import SUPPORT, unsupported_reason
from dgst_tf.export.training import TrainingExportError, export_training, train_tflm
from dgst_tf.planning.memory import MemoryModel
from dgst_tf.training.int8_graph import int8_training_graph
from dgst_tf.training.scheme import SchemeError, UpdateScheme, conv_layers, updatable_layers
from dgst_tf.training.selection import DynamicChannelSelection
from dgst_tf.training.sparse_model import SparseUpdateModel

SHAPE, CLASSES = (32, 32, 3), 5
LOGITS_LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


# ------------------------------------------------------------------------------ the models
def _conv_bn(x, filters, kernel, name, strides=1, activation="relu6", depthwise=False):
    if depthwise:
        x = keras.layers.DepthwiseConv2D(kernel, strides, padding="same", use_bias=False,
                                         name=name)(x)
    else:
        x = keras.layers.Conv2D(filters, kernel, strides, padding="same", use_bias=False,
                                name=name)(x)
    x = keras.layers.BatchNormalization(name=f"{name}_bn")(x)
    if activation == "relu6":
        return keras.layers.ReLU(6.0, name=f"{name}_relu")(x)
    if activation is not None:
        return keras.layers.Activation(activation, name=f"{name}_act")(x)
    return x


def _randomise_bn(model, seed):
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape),
                               rng.normal(0, 0.1, beta.shape), rng.normal(0, 0.1, mean.shape),
                               rng.uniform(0.5, 1.5, var.shape)])
    return model


def conv_head_net(seed=0):
    """MobileNet-v1 style: separable blocks (3x3 and 5x5 depthwise), pooled with keepdims,
    a 1x1 Conv2D classifier, Reshape, and a softmax Activation (keras.applications.MobileNet's
    head)."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input(SHAPE, name="image")
    x = _conv_bn(inp, 8, 3, "conv1", strides=2)
    x = _conv_bn(x, None, 3, "dw1", depthwise=True)
    x = _conv_bn(x, 16, 1, "pw1")
    x = _conv_bn(x, None, 5, "dw2", strides=2, depthwise=True)
    x = _conv_bn(x, 24, 1, "pw2")
    x = keras.layers.GlobalAveragePooling2D(keepdims=True, name="pool")(x)
    x = keras.layers.Dropout(0.1, name="dropout")(x)
    x = keras.layers.Conv2D(CLASSES, 1, padding="same", name="conv_preds")(x)
    x = keras.layers.Reshape((CLASSES,), name="reshape")(x)
    out = keras.layers.Activation("softmax", name="predictions")(x)
    return _randomise_bn(keras.Model(inp, out, name="conv_head_net"), seed)


def residual_softmax_net(seed=0, relu_after_add=False):
    """ResNet style: 3x3 conv pairs with identity and 1x1-projection shortcuts, a 7x7
    depthwise conv, GlobalAveragePooling2D and a Dense classifier with a softmax activation.
    ``relu_after_add``: ResNet-v1's ReLU after each Add (not supported by the int8 step)."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input(SHAPE, name="image")
    x = _conv_bn(inp, 8, 3, "stem", strides=2, activation="relu")
    y = _conv_bn(x, 8, 3, "block1_a", activation="relu")
    y = _conv_bn(y, 8, 3, "block1_b", activation=None)
    x = keras.layers.Add(name="block1_add")([x, y])
    if relu_after_add:
        x = keras.layers.ReLU(name="block1_out")(x)
    y = _conv_bn(x, 16, 3, "block2_a", strides=2, activation="relu")
    y = _conv_bn(y, None, 7, "block2_dw", depthwise=True, activation="relu")
    y = _conv_bn(y, 16, 1, "block2_b", activation=None)
    shortcut = _conv_bn(x, 16, 1, "block2_short", strides=2, activation=None)
    x = keras.layers.Add(name="block2_add")([shortcut, y])
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    out = keras.layers.Dense(CLASSES, activation="softmax", name="fc")(x)
    return _randomise_bn(keras.Model(inp, out, name="residual_net"), seed)


def sequential_cnn(seed=0):
    """A plain Sequential CNN: strided convs, Flatten, two Dense layers, a Softmax layer."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input(SHAPE),
        keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="c1"),
        keras.layers.Conv2D(12, 3, strides=2, padding="same", activation="relu", name="c2"),
        keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu", name="c3"),
        keras.layers.Flatten(name="flatten"),
        keras.layers.Dense(24, activation="relu", name="fc1"),
        keras.layers.Dense(CLASSES, name="fc2"),
        keras.layers.Softmax(name="softmax")], name="sequential_cnn")


def swish_se_net(seed=0):
    """EfficientNet / MobileNetV3 style: swish, a squeeze-and-excitation gate (Multiply) and
    a hard-swish built from TensorFlow ops, then a plain ReLU6 tail."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input(SHAPE, name="image")
    x = _conv_bn(inp, 8, 3, "stem", strides=2, activation="swish")
    x = _conv_bn(x, None, 3, "dw", depthwise=True, activation="swish")
    se = keras.layers.GlobalAveragePooling2D(keepdims=True, name="se_pool")(x)
    se = keras.layers.Conv2D(4, 1, activation="relu", name="se_reduce")(se)
    se = keras.layers.Conv2D(8, 1, activation="sigmoid", name="se_expand")(se)
    x = keras.layers.Multiply(name="se_gate")([x, se])
    x = _conv_bn(x, 16, 1, "project", activation=None)
    gate = keras.layers.ReLU(6.0, name="hs_relu6")(x + 3.0) * (1.0 / 6.0)
    x = keras.layers.Multiply(name="hard_swish")([x, gate])
    x = _conv_bn(x, 16, 3, "last", strides=2)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    out = keras.layers.Dense(CLASSES, activation="softmax", name="fc")(x)
    return _randomise_bn(keras.Model(inp, out, name="swish_se_net"), seed)


def _hard_swish(x, name):
    """keras.applications.MobileNetV3's hard-swish: Multiply([x, ReLU6(x + 3) * (1 / 6)])."""
    gate = keras.layers.ReLU(6.0, name=f"{name}_relu6")(x + 3.0) * (1.0 / 6.0)
    return keras.layers.Multiply(name=name)([x, gate])


def _squeeze_excite(x, channels, name):
    """EfficientNet's squeeze-and-excitation gate (swish reduce, sigmoid expand)."""
    se = keras.layers.GlobalAveragePooling2D(keepdims=True, name=f"{name}_pool")(x)
    se = keras.layers.Conv2D(max(channels // 4, 2), 1, activation="swish",
                             name=f"{name}_reduce")(se)
    se = keras.layers.Conv2D(channels, 1, activation="sigmoid", name=f"{name}_expand")(se)
    return keras.layers.Multiply(name=f"{name}_excite")([x, se])


def efficientnet_like(seed=0):
    """EfficientNet style (swish everywhere): a swish stem and an MBConv block with a
    squeeze-and-excitation gate (frozen: in front of the trained layers), then an MBConv
    block with swish after its BN-folded convs, a conv with a fused swish activation, an
    identity shortcut, a swish head conv and a Dense softmax classifier."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input(SHAPE, name="image")
    x = _conv_bn(inp, 8, 3, "stem", strides=2, activation="swish")
    x = _conv_bn(x, None, 3, "block1_dw", depthwise=True, activation="swish")
    x = _squeeze_excite(x, 8, "block1_se")
    x = _conv_bn(x, 8, 1, "block1_project", activation=None)
    y = _conv_bn(x, 24, 1, "block2_expand", activation="swish")
    y = _conv_bn(y, None, 5, "block2_dw", depthwise=True, activation="swish")
    y = keras.layers.Conv2D(8, 1, activation="swish", name="block2_mix")(y)
    y = _conv_bn(y, 8, 1, "block2_project", activation=None)
    x = keras.layers.Add(name="block2_add")([x, y])
    x = _conv_bn(x, 32, 1, "top", activation="swish")
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    x = keras.layers.Dropout(0.2, name="top_dropout")(x)
    out = keras.layers.Dense(CLASSES, activation="softmax", name="predictions")(x)
    return _randomise_bn(keras.Model(inp, out, name="efficientnet_like"), seed)


def mobilenet_v3_like(seed=0):
    """MobileNetV3 style (keras.applications' layers): a hard-swish stem, a ReLU depthwise
    block, a hard-swish block with a 5x5 depthwise conv and an identity shortcut, and
    MobileNetV3's head: pooling with keepdims, a 1x1 conv with hard-swish, Dropout, a
    1x1-conv classifier, Flatten and a softmax. (Its hard-sigmoid squeeze-and-excitation
    gates are left out: their x + 3 folds into the conv bias and their / 6 becomes a MUL by a
    constant, which the Keras int8 simulation does not map.)"""
    keras.utils.set_random_seed(seed)
    inp = keras.Input(SHAPE, name="image")
    x = _hard_swish(_conv_bn(inp, 8, 3, "stem", strides=2, activation=None), "stem_hs")
    x = _conv_bn(x, None, 3, "block1_dw", depthwise=True, activation="relu")
    x = _conv_bn(x, 8, 1, "block1_project", activation=None)
    y = _hard_swish(_conv_bn(x, 24, 1, "block2_expand", activation=None), "block2_expand_hs")
    y = _hard_swish(_conv_bn(y, None, 5, "block2_dw", depthwise=True, activation=None),
                    "block2_dw_hs")
    y = _conv_bn(y, 8, 1, "block2_project", activation=None)
    x = keras.layers.Add(name="block2_add")([x, y])
    x = _hard_swish(_conv_bn(x, 32, 1, "last", activation=None), "last_hs")
    x = keras.layers.GlobalAveragePooling2D(keepdims=True, name="pool")(x)
    x = _hard_swish(keras.layers.Conv2D(24, 1, name="Conv_2")(x), "Conv_2_hs")
    x = keras.layers.Dropout(0.2, name="dropout")(x)
    x = keras.layers.Conv2D(CLASSES, 1, name="Logits")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    out = keras.layers.Activation("softmax", name="predictions")(x)
    return _randomise_bn(keras.Model(inp, out, name="mobilenet_v3_like"), seed)


def images(n, seed=1):
    rng = np.random.default_rng(seed)
    return (rng.uniform(-1, 1, (n, *SHAPE)).astype(np.float32),
            rng.integers(0, CLASSES, n).astype(np.int32))


# --------------------------------------------------------------------------- per family
# model, scheme (weight-updated layers at a ratio, bias-updated ones), classifier, its kind,
# its softmax
FAMILIES = {
    "conv_head": (conv_head_net, {"dw2": 0.5, "pw2": 0.25, "pw1": "bias"}, "conv_preds",
                  "conv1x1", "predictions"),
    "residual": (residual_softmax_net, {"block2_dw": 0.5, "block2_b": 0.5,
                                        "block2_short": "bias", "block2_a": "bias"},
                 "fc", "dense", "fc_softmax"),
    "sequential": (sequential_cnn, {"fc1": 0.5}, "fc2", "dense", "softmax"),
    "swish_se": (swish_se_net, {"last": 0.5, "project": "bias"}, "fc", "dense", "fc_softmax"),
    "efficientnet": (efficientnet_like, {"top": 0.5, "block2_project": 0.5,
                                         "block2_mix": "bias", "block2_dw": 0.5,
                                         "block2_expand": "bias"},
                     "predictions", "dense", "predictions_softmax"),
    "mobilenet_v3": (mobilenet_v3_like, {"Conv_2": 0.5, "last": 0.5, "block2_dw": 0.5,
                                         "block2_expand": "bias"},
                     "Logits", "conv1x1", "predictions"),
}
EXPORTED = ["conv_head", "residual", "sequential"]
# channel pruning follows every family: squeeze-and-excitation gates, and the TFOpLambda
# layers (x + 3.0, * (1 / 6)) of hard-swish included
PRUNED = list(FAMILIES)
# exported and run in TFLM: also swish, sigmoid and hard-swish on the gradient path, and a
# frozen squeeze-and-excitation gate in front of it
TFLM_STEPPED = EXPORTED + ["swish_se", "efficientnet", "mobilenet_v3"]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_classifier_is_found_and_the_training_form_computes_the_same(family):
    build, _, name, kind, softmax = FAMILIES[family]
    model = build()
    head = find_classifier(model)
    assert (head.name, head.kind) == (name, kind)
    trainable = training_form(model)
    assert find_classifier(trainable).softmax == softmax  # its own last layer now
    assert isinstance(trainable.get_layer(name), keras.layers.Dense)
    assert keras.activations.serialize(trainable.get_layer(name).activation) == "linear"
    x, _ = images(3)
    np.testing.assert_allclose(trainable(x), model(x), atol=1e-6)
    logits = logits_model(model)
    assert find_classifier(logits).softmax is None
    np.testing.assert_allclose(tf.nn.softmax(logits(x)), model(x), atol=1e-6)
    # schemes name the same layers in both forms; the 1x1 conv classifier is no conv
    assert [l.name for l in updatable_layers(model)] == \
        [l.name for l in updatable_layers(trainable)]
    assert name not in [l.name for l in conv_layers(model)]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_dgsu_step_equals_gradient_tape_on_the_logits(family):
    """One static-selection step of `SparseUpdateModel` (compiled with the plain
    ``sparse_categorical_crossentropy``, as for a softmax model) is lr x the GradientTape
    gradient of cross-entropy on the logits, restricted to the selection; then two DGSU steps
    move only channels the selection visited."""
    build, spec, classifier, _, _ = FAMILIES[family]
    lr = 0.1
    sparse = SparseUpdateModel(build(), UpdateScheme(spec), dropout=False)
    sparse.compile(optimizer=keras.optimizers.SGD(lr), loss="sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    kept = {l.name: np.sort(rng.choice(input_channels(l), sparse.scheme.kept_channels(l),
                                       replace=False)) for l in sparse.weight_layers}
    for name, channels in kept.items():
        sparse.selection.assign(name, channels)
    x, y = images(2)
    logits = logits_model(sparse.base)
    trained = {classifier} | set(spec)
    weights = [v for v in sparse.base.trainable_weights if v.name.split("/")[0] in trained]
    untouched = {v.name: v.numpy() for v in sparse.base.weights if v.name.split("/")[0]
                 not in trained}
    with tf.GradientTape() as tape:
        loss = LOGITS_LOSS(y, logits(x))
    grads = {v.name: g.numpy() for v, g in zip(weights, tape.gradient(loss, weights))}
    before = {v.name: v.numpy() for v in weights}
    sparse.fit(x, y, batch_size=2, epochs=1, verbose=0, shuffle=False)
    for var in sparse.base.weights:  # frozen layers: bit-identical
        if var.name in untouched:
            assert np.array_equal(var.numpy(), untouched[var.name]), var.name
    for var in weights:
        layer = var.name.split("/")[0]
        step = before[var.name] - var.numpy()
        mode = "full" if layer == classifier else sparse.scheme.update_for(layer).mode
        if mode == "bias" and "bias" not in var.name:
            assert not step.any(), var.name  # bias-only layer: kernel bit-identical
        elif mode == "weights" and "bias" not in var.name:
            axis = 2 if step.ndim == 4 else 0
            expected = np.zeros_like(step)
            index = [slice(None)] * step.ndim
            index[axis] = kept[layer]
            expected[tuple(index)] = lr * grads[var.name][tuple(index)]
            np.testing.assert_allclose(step, expected, atol=1e-5, err_msg=var.name)
            assert np.abs(expected).max() > 1e-4, var.name  # the check is not vacuous
        else:  # biases of updated layers, the whole classifier
            np.testing.assert_allclose(step, lr * grads[var.name], atol=1e-5,
                                       err_msg=var.name)
            assert np.abs(step).max() > 1e-5, var.name
    # the Keras model's prediction is still a softmax; two DGSU steps
    np.testing.assert_allclose(np.sum(sparse.predict(x, verbose=0), axis=-1), 1, atol=1e-5)
    start = {l.name: kernel_of(l).numpy() for l in sparse.weight_layers}
    history = sparse.fit(x, y, batch_size=1, epochs=1, verbose=0, shuffle=False,
                         callbacks=[DynamicChannelSelection("weight_l2", traversal=True)])
    assert np.isfinite(history.history["loss"]).all()
    for layer in sparse.weight_layers:
        axis = 2 if len(kernel_of(layer).shape) == 4 else 0
        changed = np.flatnonzero(np.any(kernel_of(layer).numpy() != start[layer.name],
                                        axis=tuple(a for a in range(kernel_of(layer).shape.rank)
                                                   if a != axis)))
        visited = np.flatnonzero(sparse.selection.numpy(layer.name)["visited"])
        assert changed.size and set(changed) <= set(visited), layer.name


@pytest.mark.parametrize("family", list(FAMILIES))
def test_memory_report_names_the_trained_layers(family):
    build, spec, classifier, _, _ = FAMILIES[family]
    model = build()
    report = MemoryModel(fold_batchnorm(model)).report(UpdateScheme(spec))
    rows = {row.name: row for row in report.layers}
    assert rows[classifier].update == "classifier" and rows[classifier].kind == "Dense"
    for name, update in spec.items():
        assert rows[name].update.startswith("bias" if update == "bias" else "weights"), name
    assert 0 < report.forward_peak_bytes < report.training_peak_bytes < report.arena_bytes
    assert report.dense_training_bytes > report.training_peak_bytes


@pytest.mark.parametrize("family", TFLM_STEPPED)
def test_tflm_steps_of_the_exported_graph_equal_the_keras_int8_simulation(family, tmp_path):
    """6 steps, DGSU traversal on the device and in Keras, stochastic rounding: the same
    logits codes, kept channels, int8 weights and int32 biases at every step, the loss to
    float32; and the memory model's arena is TFLM's."""
    build, spec, classifier, _, _ = FAMILIES[family]
    steps, lr = 6, 0.05
    model = fold_batchnorm(build())
    x, y = images(steps + 16, seed=3)
    calibration, x, y = x[steps:], x[:steps], y[:steps]
    scheme = UpdateScheme(spec)
    info = export_training(model, scheme, calibration, tmp_path / "t.tflite",
                           learning_rate=lr, policy="traversal", rounding="stochastic")
    assert info.manifest["layers"][-1]["name"] == classifier
    run = train_tflm(info.path, x, y)
    graph = int8_training_graph(model, calibration)
    layers = [entry["name"] for entry in info.manifest["layers"]]
    start = {n: kernel_of(graph.model.get_layer(n)).numpy().copy() for n in layers}
    int8_steps_equal_tflm(graph, scheme, lr, run, x, y, classifier, layers)
    moved = sum(int((kernel_of(graph.model.get_layer(n)).numpy() != start[n]).sum())
                for n in layers)
    assert moved >= 10  # the comparison is not vacuous
    # the memory model's arena: within 5% of TFLM's on every family (measured within 1.5%;
    # tests/test_memory_vs_tflm.py holds the swish, hard-swish and residual nets op for op)
    report = MemoryModel(model, policy="traversal").report(scheme, dense=False)
    assert report.arena_bytes == pytest.approx(run.arena_bytes, rel=0.05), family


def _not_quite_hard_swish_net():
    """ReLU6(x + 2) / 6 * x: no hard-swish, so its x + 2 (TFOpLambda) has no backward."""
    inp = keras.Input(SHAPE, name="image")
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", name="conv")(inp)
    gate = keras.layers.ReLU(6.0, name="gate_relu6")(x + 2.0) * (1.0 / 6.0)
    x = keras.layers.Multiply(name="almost_hard_swish")([x, gate])
    x = keras.layers.Conv2D(8, 1, activation="tanh", name="tanh_conv")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inp, keras.layers.Dense(CLASSES, name="fc")(x))


# ------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("build, spec, layer, what", [
    (swish_se_net, {"dw": 0.5}, "se_gate", r"Multiply, MUL.*squeeze-and-excitation gate.*"
                                           r"error x gate.*train only layers after the SE"),
    (swish_se_net, {"se_reduce": "bias"}, "se_gate", r"no int8 backward kernel for MUL"),
    (efficientnet_like, {"block1_dw": "bias"}, "block1_se_excite", r"squeeze-and-excitation"),
    (_not_quite_hard_swish_net, {"conv": "bias"}, "tf.__operators__.add", r"TFOpLambda"),
    (_not_quite_hard_swish_net, {"tanh_conv": "bias"}, "tanh_conv",
     r"activation 'tanh'.*no int8 backward kernel"),
])
def test_layers_without_an_int8_backward_are_refused_up_front(build, spec, layer, what,
                                                              tmp_path):
    model = build()
    x, _ = images(4)
    with pytest.raises(TrainingExportError, match=rf"layer '{layer}.*lies between the first "
                                                   rf"updated layer '{list(spec)[0]}'") as error:
        export_training(model, UpdateScheme(spec), x, tmp_path / "t.tflite")
    assert re.search(what, str(error.value)), str(error.value)
    assert not (tmp_path / "t.tflite").exists()


def test_relu_after_a_residual_add_is_refused_naming_it(tmp_path):
    model = residual_softmax_net(relu_after_add=True)
    x, _ = images(4)
    with pytest.raises(TrainingExportError, match=r"layer 'block1_out' \(ReLU\).*lies between "
                                                  r"the first updated layer 'block1_a'.*Add"):
        export_training(model, UpdateScheme({"block1_a": "bias"}), x, tmp_path / "t.tflite")


def test_unusable_classifiers_are_named():
    inp = keras.Input(SHAPE)
    x = keras.layers.Conv2D(8, 3, name="conv")(inp)
    x = keras.layers.Conv2D(CLASSES, 1, name="spatial_preds")(x)
    out = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    with pytest.raises(ClassifierError, match=r"layer 'pool' \(GlobalAveragePooling2D\) "
                                              r"follows classifier 'spatial_preds'"):
        find_classifier(keras.Model(inp, out))
    x = keras.layers.GlobalAveragePooling2D(name="pool")(keras.layers.Conv2D(8, 3)(inp))
    out = keras.layers.Dense(CLASSES, activation="sigmoid", name="multi_label")(x)
    with pytest.raises(SchemeError, match=r"classifier 'multi_label' has activation "
                                          r"'sigmoid'"):
        UpdateScheme({}).validate(keras.Model(inp, out))


def test_the_support_table_covers_every_layer_of_the_families():
    """Every layer of the families is in the table (no "unknown layer" refusals), and the
    rows that train have no reason against them."""
    for build, *_ in FAMILIES.values():
        for layer in logits_model(fold_batchnorm(build())).layers:
            reason = unsupported_reason(layer)
            assert reason is None or "is not a layer" not in reason, (layer.name, reason)
    assert {row.label for row in SUPPORT if row.trains} >= {"Conv2D", "DepthwiseConv2D",
                                                           "Dense", "Add"}


def test_keras_applications_heads():
    """keras.applications' MobileNet (1x1-conv classifier + Reshape + softmax: one sparse
    step) and MobileNetV3Small (a hard-swish 1x1 conv and the 1x1-conv classifier after
    keepdims pooling: the training form computes the same)."""
    x, y = images(2)
    mobilenet = keras.applications.MobileNet(SHAPE, alpha=0.25, weights=None,
                                             classes=CLASSES)
    head = find_classifier(mobilenet)
    assert (head.name, head.kind, head.softmax) == ("conv_preds", "conv1x1", "predictions")
    sparse = SparseUpdateModel(mobilenet, UpdateScheme({}))
    sparse.compile(optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
    before = sparse.base.get_layer("conv_preds").bias.numpy()  # (random init: ~0 features)
    sparse.fit(x, y, batch_size=2, verbose=0)
    assert (sparse.base.get_layer("conv_preds").bias.numpy() != before).all()
    v3 = keras.applications.MobileNetV3Small(SHAPE, alpha=0.75, weights=None, classes=CLASSES)
    head = find_classifier(v3)
    assert (head.name, head.kind, head.head_convs) == ("Logits", "conv1x1", ("Conv_2", "Logits"))
    np.testing.assert_allclose(training_form(v3)(x), v3(x), atol=1e-5)


def test_keras_applications_mobilenet_v3_trains_after_its_last_se_gate(tmp_path):
    """keras.applications.MobileNetV3Small (random weights, 32x32): a layer in front of its
    last squeeze-and-excitation gate is refused, naming the gate; the layers after it (the
    hard-swish head conv, whose gradient passes HARD_SWISH twice, and the 1x1-conv
    classifier) export and train in TFLM."""
    v3 = _randomise_bn(keras.applications.MobileNetV3Small(SHAPE, alpha=0.75, weights=None,
                                                           classes=CLASSES), 0)
    x, y = images(12, seed=3)
    with pytest.raises(TrainingExportError, match=r"layer 'expanded_conv_10/squeeze_excite/"
                                                  r"Mul' \(Multiply, MUL\), a squeeze-and-"
                                                  r"excitation gate, lies between the first "
                                                  r"updated layer 'expanded_conv_10/depthwise'"):
        export_training(v3, UpdateScheme({"expanded_conv_10/depthwise": "bias"}), x,
                        tmp_path / "refused.tflite")
    info = export_training(v3, UpdateScheme({"Conv_1": 0.25,
                                             "expanded_conv_10/project": "bias"}),
                           x[4:], tmp_path / "t.tflite", policy="traversal")
    assert info.ops["HARD_SWISH"] >= 2 and info.ops["CUSTOM:DGST_ACTIVATION_GRAD"] == 2
    run = train_tflm(info.path, x[:4], y[:4])
    assert np.isfinite(run.losses).all()
    names = run.manifest["outputs"]
    for param in ("Conv_1/weights", "Conv_1/bias", "expanded_conv_10/project/bias"):
        steps = run.result.outputs[names.index(param)]
        assert any(not np.array_equal(steps[i], steps[i + 1]) for i in range(3)), param


@pytest.mark.parametrize("padding", ["SAME", "VALID"])
def test_strided_pointwise_weight_gradient(padding):
    """A strided 1x1 conv (ResNet projection shortcuts, MobileNet v1) on an even-sized map:
    the sparse kernel gradient equals GradientTape's of the same conv written as a stride-1
    conv of the subsampled input (TensorFlow's oneDNN filter gradient of the strided 1x1
    conv itself corrupts the heap, so it cannot be the oracle)."""
    from dgst_tf.training.sparse_ops import sparse_conv2d

    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(2, 16, 16, 6)).astype(np.float32))
    kernel = tf.Variable(rng.normal(size=(1, 1, 6, 5)).astype(np.float32))
    selection = tf.constant([1, 4, 5])
    with tf.GradientTape() as tape:
        y = sparse_conv2d(x, kernel, strides=(2, 2), padding=padding, selection=selection)
        loss = tf.reduce_sum(y * tf.cos(y))
    got = tape.gradient(loss, kernel).numpy()
    with tf.GradientTape() as tape:
        y = tf.nn.conv2d(x[:, ::2, ::2, :], kernel, 1, "VALID")
        loss = tf.reduce_sum(y * tf.cos(y))
    want = tape.gradient(loss, kernel).numpy()
    np.testing.assert_allclose(got[:, :, [1, 4, 5]], want[:, :, [1, 4, 5]], rtol=1e-5,
                               atol=1e-5)
    assert not got[:, :, [0, 2, 3]].any()


@pytest.mark.parametrize("family", PRUNED)
def test_channel_pruning_of_the_training_form(family):
    """The pruning dependency graph reads the training form (the 1x1-conv classifier as
    Dense, its Reshape gone): removing seeded channel groups computes what zeroing them
    computes, and the smaller model still trains with the family's scheme."""
    from dgst_tf.pruning import DependencyGraph, mask_groups, remove_channels

    build, spec, _, _, _ = FAMILIES[family]
    model = training_form(build())
    graph = DependencyGraph(model)
    prunable = np.flatnonzero(graph.prunable)
    removed = np.random.default_rng(0).choice(prunable, 3, replace=False)
    small = remove_channels(model, removed, graph)
    x, y = images(2)
    np.testing.assert_allclose(small(x), mask_groups(model, removed, graph)(x), atol=1e-5)
    assert small.count_params() < model.count_params()
    sparse = SparseUpdateModel(small, UpdateScheme(spec), dropout=False)
    sparse.compile(optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
    assert np.isfinite(sparse.fit(x, y, verbose=0).history["loss"]).all()


def _map_through(tf_function, channels=8):
    """conv -> ``tf_function`` (TensorFlow ops on the Keras tensor) -> conv -> pool -> Dense."""
    inp = keras.Input(SHAPE, name="image")
    x = keras.layers.Conv2D(channels, 3, strides=2, padding="same", name="conv")(inp)
    x = keras.layers.Conv2D(8, 1, name="after")(tf_function(x))
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inp, keras.layers.Dense(CLASSES, name="fc")(x))


@pytest.mark.parametrize("tf_function, channels, what", [
    (lambda x: tf.reduce_sum(x, -1, keepdims=True), 8,
     r"TFOpLambda tf\.math\.reduce_sum\) uses a reduction over axis -1, which combines the "
     r"channels"),
    (lambda x: tf.transpose(x, [0, 1, 3, 2]), 16,
     r"TFOpLambda tf\.[\w.]*transpose\) uses a TensorFlow function without a channel rule"),
    (lambda x: x[..., :4], 8,
     r"SlicingOpLambda tf\.__operators__\.getitem\) uses a TensorFlow function without"),
    (lambda x: tf.nn.softmax(x), 8, r"TFOpLambda tf\.nn\.softmax\) uses a TensorFlow function"),
    (lambda x: x * np.linspace(0.5, 2.0, 8).astype(np.float32), 1,
     r"TFOpLambda tf\.math\.multiply\) uses a constant \(argument 1\) of shape \(8,\): its last "
     r"axis is neither 1 nor the input's 1 channels"),
    (lambda x: tf.math.multiply(x, keras.layers.Conv2D(1, 1, name="one")(x)), 8,
     r"TFOpLambda tf\.math\.multiply\) uses Keras tensors with different channel counts "
     r"\[8, 1\]"),
], ids=["reduce_sum_over_channels", "transpose", "channel_slice", "softmax", "widening_constant",
        "broadcast_channel"])
def test_pruning_names_a_tf_function_it_cannot_follow(tf_function, channels, what):
    """TensorFlow functions that mix, reorder, cut or widen channels are refused, naming
    the layer and the function (elementwise ones with scalars prune: see PRUNED)."""
    from dgst_tf.pruning import DependencyGraph
    from dgst_tf.pruning.dependency_graph import UnsupportedLayerError

    model = _map_through(tf_function, channels)
    functions = [l.name for l in model.layers if type(l).__name__.endswith("OpLambda")]
    assert len(functions) == 1
    with pytest.raises(UnsupportedLayerError, match=rf"layer '{re.escape(functions[0])}' "
                                                    rf"\({what}"):
        DependencyGraph(model)


def test_squeeze_excite_and_hard_swish_couple_channels():
    """swish_se_net: the SE gate's Multiply ties the gate's channel c to the feature map's
    (back to the stem through the depthwise conv); the hard-swish's x + 3 and * (1 / 6)
    pass the projection's channel on to the last conv. Removing one gate channel shrinks
    the stem, the depthwise conv and the SE expansion together."""
    from dgst_tf.pruning import DependencyGraph, mask_groups, remove_channels

    model = swish_se_net()
    graph = DependencyGraph(model)
    gate = graph.group("se_expand", 3)
    assert gate is graph.group("stem", 3)
    members = {(m.layer, m.role): m.indices for m in gate}
    assert members[("dw", "depthwise")] == (3,) and members[("se_gate", "pass")] == (3,)
    assert members[("se_reduce", "in")] == (3,) and members[("project", "in")] == (3,)
    hard_swish = {(m.layer, m.role): m.indices for m in graph.group("project", 5)}
    functions = [l.name for l in model.layers if type(l).__name__ == "TFOpLambda"]
    assert len(functions) == 2 and all(hard_swish[(f, "pass")] == (5,) for f in functions)
    assert hard_swish[("hard_swish", "pass")] == (5,) and hard_swish[("last", "in")] == (5,)
    small = remove_channels(model, [gate.index], graph)
    assert (small.get_layer("stem").filters, small.get_layer("se_expand").filters) == (7, 7)
    assert kernel_of(small.get_layer("dw")).shape[2] == 7
    assert small.get_layer("se_reduce").kernel.shape[2] == 7
    x, _ = images(2)
    np.testing.assert_allclose(logits_model(small)(x),
                               logits_model(mask_groups(model, [gate.index], graph))(x),
                               atol=1e-5)


@pytest.mark.parametrize("family", PRUNED)
def test_channel_pruning_of_the_model_as_saved(family):
    """The pruning dependency graph also reads the families as saved (the 1x1-conv classifier
    after keepdims pooling with its Dropout, Reshape and softmax Activation; Flatten; a Dense
    softmax): removing seeded channel groups shrinks the layers, computes the masked model's
    logits and keeps the head's form."""
    from dgst_tf.pruning import DependencyGraph, mask_groups, remove_channels

    build, _, classifier, kind, _ = FAMILIES[family]
    model = build()
    graph = DependencyGraph(model)
    prunable = np.flatnonzero(graph.prunable)
    removed = np.random.default_rng(0).choice(prunable, 3, replace=False)
    small = remove_channels(model, removed, graph)
    masked = mask_groups(model, removed, graph)
    x, _ = images(2)
    np.testing.assert_allclose(logits_model(small)(x), logits_model(masked)(x), atol=1e-5)
    assert np.abs(logits_model(masked)(x) - logits_model(model)(x)).max() > 1e-4
    np.testing.assert_allclose(small(x), masked(x), atol=1e-6)
    assert small.count_params() < model.count_params()
    assert (find_classifier(small).kind, find_classifier(small).softmax) == \
        (find_classifier(model).kind, find_classifier(model).softmax)
    head_inputs = graph.input_groups(classifier)
    kept_inputs = int(np.isin(head_inputs, removed, invert=True).sum())
    assert input_channels(small.get_layer(classifier)) == kept_inputs


@pytest.mark.parametrize("application, gated, se_expand", [
    ("MobileNetV3Small", "expanded_conv_3/expand", "expanded_conv_3/squeeze_excite/Conv_1"),
    ("EfficientNetB0", "block2a_expand_conv", "block2a_se_expand"),
], ids=["MobileNetV3Small", "EfficientNetB0"])
def test_channel_pruning_of_keras_applications(application, gated, se_expand):
    """keras.applications at random weights, 32x32: MobileNetV3Small (input Rescaling,
    hard-swish and hard-sigmoid squeeze-and-excitation gates from TFOpLambda, ReLU and
    Multiply layers) and EfficientNetB0 (Rescaling + Normalization, SE gates with a Reshape
    to (1, 1, C)). An expansion channel goes with its SE gate channel; removing it and
    seeded groups computes the masked model's logits and shrinks both convs alike."""
    from dgst_tf.pruning import DependencyGraph, mask_groups, remove_channels

    if application == "MobileNetV3Small":
        model = keras.applications.MobileNetV3Small(SHAPE, alpha=0.75, weights=None,
                                                    classes=CLASSES)
    else:
        model = keras.applications.EfficientNetB0(weights=None, input_shape=SHAPE,
                                                  classes=CLASSES)
    model = _randomise_bn(model, 0)
    graph = DependencyGraph(model)
    assert graph.group(gated, 0) is graph.group(se_expand, 0)
    rng = np.random.default_rng(0)
    removed = np.union1d([graph.group(gated, 0).index],
                         rng.choice(np.flatnonzero(graph.prunable), 12, replace=False))
    small = remove_channels(model, removed, graph)
    masked = mask_groups(model, removed, graph)
    kept = int(np.isin(graph.output_groups(gated), removed, invert=True).sum())
    assert kept < model.get_layer(gated).filters
    assert small.get_layer(gated).filters == small.get_layer(se_expand).filters == kept
    x, _ = images(2)
    small_logits, masked_logits = logits_model(small)(x), logits_model(masked)(x)
    assert np.abs(masked_logits - logits_model(model)(x)).max() > 1e-4
    np.testing.assert_allclose(small_logits, masked_logits, atol=1e-4)
    assert small.count_params() < model.count_params()
