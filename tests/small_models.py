"""Tiny tf-keras CNNs for fast tests (conv, BN, depthwise, residual add, dense)."""
import numpy as np

from dgst_tf.core.keras_compat import keras


def residual_cnn(seed: int = 0, input_shape=(8, 8, 3), classes: int = 4) -> keras.Model:
    """conv-BN-ReLU6 -> [depthwise-ReLU6-pointwise] + skip -> strided conv -> pool -> dense.

    BatchNorm statistics are randomised so that folding them is not a no-op.
    """
    keras.utils.set_random_seed(seed)
    inp = keras.Input(input_shape, name="image")
    x = keras.layers.Conv2D(8, 3, padding="same", use_bias=False, name="stem")(inp)
    x = keras.layers.BatchNormalization(name="stem_bn")(x)
    x = keras.layers.ReLU(6.0, name="stem_relu")(x)
    y = keras.layers.Conv2D(12, 1, use_bias=False, name="expand")(x)
    y = keras.layers.BatchNormalization(name="expand_bn")(y)
    y = keras.layers.ReLU(6.0, name="expand_relu")(y)
    y = keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False, name="depthwise")(y)
    y = keras.layers.BatchNormalization(name="depthwise_bn")(y)
    y = keras.layers.ReLU(6.0, name="depthwise_relu")(y)
    y = keras.layers.Conv2D(8, 1, use_bias=False, name="project")(y)
    y = keras.layers.BatchNormalization(name="project_bn")(y)
    x = keras.layers.Add(name="add")([x, y])
    x = keras.layers.ZeroPadding2D(1, name="pad")(x)
    x = keras.layers.Conv2D(16, 3, strides=2, padding="valid", name="head")(x)
    x = keras.layers.ReLU(name="head_relu")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    out = keras.layers.Dense(classes, name="classifier")(x)
    model = keras.Model(inp, out, name="residual_cnn")
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape), rng.normal(0, 0.1, beta.shape),
                               rng.normal(0, 0.1, mean.shape), rng.uniform(0.5, 1.5, var.shape)])
    return model


def batch(n: int, seed: int = 1, input_shape=(8, 8, 3), classes: int = 4):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, *input_shape)).astype(np.float32),
            rng.integers(0, classes, size=n).astype(np.int32))


def tflite_kernel(kernel, depthwise: bool):
    """A Keras kernel in TFLite's layout (OHWI; depthwise 1HWC; dense [out, in])."""
    if depthwise:
        return kernel[..., 0][None]
    return kernel.transpose(3, 0, 1, 2) if kernel.ndim == 4 else kernel.T


def assert_layers_equal_tflm_step(graph, sparse, run, layers, step: int) -> None:
    """After ``step``, the Keras int8 simulation ``graph`` (trained through ``sparse``) holds
    the int8 weights, int32 biases and kept channels that the TFLM run ``run`` output, for
    every layer named in ``layers``."""
    from dgst_tf.core.layer_kinds import kernel_of

    names = run.manifest["outputs"]
    for name in layers:
        layer = graph.model.get_layer(name)
        if f"{name}/weights" in names:
            depthwise = isinstance(layer, keras.layers.DepthwiseConv2D)
            np.testing.assert_array_equal(
                tflite_kernel(kernel_of(layer).numpy(), depthwise),
                run.result.outputs[names.index(f"{name}/weights")][step],
                f"{name} step {step}")
        np.testing.assert_array_equal(
            layer.bias.numpy(), run.result.outputs[names.index(f"{name}/bias")][step],
            f"{name} bias step {step}")
        if f"{name}/kept" in run.kept:
            np.testing.assert_array_equal(
                np.sort(sparse.selection.numpy(name)["indices"]),
                np.sort(run.kept[f"{name}/kept"][step]), f"{name} kept step {step}")


def dgsu_on_int8_graph(graph, scheme, learning_rate: float):
    """The Keras side of a TFLM step comparison: ``graph`` (`int8_training_graph`) trained by
    QAS SGD with stochastic rounding and DGSU's traversal selection, as `export_training(...,
    policy="traversal", rounding="stochastic")` runs on device; returns the compiled model."""
    from dgst_tf.training.qas import QuantizationAwareScalingSGD
    from dgst_tf.training.selection import DynamicChannelSelection
    from dgst_tf.training.sparse_model import SparseUpdateModel

    sparse = SparseUpdateModel(graph.model, scheme, fold_bn=False)
    sparse.compile(optimizer=QuantizationAwareScalingSGD(learning_rate, graph.qas_scales,
                                                         rounding="stochastic"),
                   loss=graph.loss)
    callback = DynamicChannelSelection("weight_l2", traversal=True)
    callback.set_model(sparse)
    callback.on_train_begin()
    return sparse


def int8_steps_equal_tflm(graph, scheme, learning_rate: float, run, x, y, classifier: str,
                          layers) -> None:
    """Train the Keras int8 simulation ``graph`` (`dgsu_on_int8_graph`) on ``x``, ``y`` one
    image at a time and check every step against the TFLM run ``run`` of the exported graph:
    the logits codes before the step, the loss, then the int8 weights, int32 biases and kept
    channels of ``layers`` (`assert_layers_equal_tflm_step`)."""
    import pytest

    from dgst_tf.core.int8_conversion import ConvertedModel

    sparse = dgsu_on_int8_graph(graph, scheme, learning_rate)
    codes = keras.Model(graph.model.inputs,
                        graph.model.get_layer(f"{classifier}_rescale").output)
    converted = ConvertedModel(graph.tflite_model)
    zero_point = converted.tensor(converted.outputs[0]).zero_point
    for step in range(len(x)):
        np.testing.assert_array_equal(codes(x[step:step + 1]).numpy()[0] + zero_point,
                                      run.logits[step], f"logits step {step}")
        logs = sparse.train_on_batch(x[step:step + 1], y[step:step + 1], return_dict=True)
        assert logs["loss"] == pytest.approx(run.losses[step], rel=1e-5), step
        assert_layers_equal_tflm_step(graph, sparse, run, layers, step)
