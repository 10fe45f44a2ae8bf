"""The int8 training graph and Quantization-Aware Scaling (Lin et al. 2022, "On-Device Training
Under 256KB Memory")."""
import numpy as np
import pytest
from small_models import residual_cnn

from dgst_tf.core.bn_folding import fold_batchnorm
from dgst_tf.core.keras_compat import keras, tf
from dgst_tf.tflm_ops import reference as R
from dgst_tf.training.int8_graph import int8_training_graph
from dgst_tf.training.qas import QuantizationAwareScalingSGD
from dgst_tf.training.scheme import UpdateScheme, kernel_of
from dgst_tf.training.sparse_model import SparseUpdateModel

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def separable_task(n=96, seed=0):
    """4 classes whose images differ in mean colour and a spatial pattern."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n).astype(np.int32)
    x = rng.normal(0, 0.6, (n, 8, 8, 3)).astype(np.float32)
    x[..., 0] += (y[:, None, None] % 2) * 0.8
    x[:, :4, :, 1] += (y[:, None, None] // 2) * 0.8
    return x, y


@pytest.fixture(scope="module")
def folded():
    return fold_batchnorm(residual_cnn(seed=2))


def test_quantized_values_follow_the_formulas(folded):
    """The converter's parameters the graph holds: ``s_w = max|W_oc| / 127`` per output
    channel, ``W_bar = round(W / s_w)``, ``b_bar = round(b / (s_w s_x))``, in the Keras
    layouts (a transposed or mis-scaled kernel fails); the classifier with the head's
    weight headroom (its scales times h, its values requantized to them)."""
    x, _ = separable_task(32)
    graph = int8_training_graph(folded, x, head_weight_headroom=4)
    for name in ("stem", "depthwise", "head", "classifier"):
        headroom = 4.0 if name == "classifier" else 1.0
        float_layer, int_layer = folded.get_layer(name), graph.model.get_layer(name)
        kernel = kernel_of(float_layer).numpy()
        flat = kernel.reshape(-1, int(np.prod(kernel.shape[-2:]))) if name == "depthwise" \
            else kernel.reshape(-1, kernel.shape[-1])
        s_w = headroom * np.abs(flat).max(axis=0) / 127
        np.testing.assert_allclose(graph.weight_scales[name], s_w, rtol=1e-6)
        w_bar = kernel_of(int_layer).numpy()
        assert np.array_equal(w_bar, np.round(w_bar))
        assert np.abs(w_bar).max() == np.floor(127 / headroom + 0.5), name
        shape = kernel.shape[-2:] if name == "depthwise" else kernel.shape[-1]
        rounding = 0.5 + 0.5 / headroom  # twice rounded: by the converter, then to s_w
        assert np.abs(w_bar - kernel / s_w.reshape(shape)).max() <= rounding + 1e-3, name
        s_x, _ = graph.input_qparams[name]
        np.testing.assert_allclose(int_layer.bias.numpy(),
                                   float_layer.bias.numpy() / (s_w * s_x),
                                   atol=rounding + 1e-3)
    # the int8 graph approximates the float model (at the converter's own logit resolution:
    # the widened head's LSB, 32 / 255, is as large as these untrained logits)
    narrow = int8_training_graph(folded, x, head_logit_range=0, head_weight_headroom=1)
    float_out, int8_out = folded(x).numpy(), narrow.model(x).numpy()
    assert np.abs(float_out - int8_out).max() < 0.1 * np.abs(float_out).max()
    assert (float_out.argmax(1) == int8_out.argmax(1)).mean() > 0.8


def _first_gradients(folded):
    """(int8 graph, its model, trainable variables, their gradients on a small task, their
    values before any update)."""
    x, y = separable_task(8)
    graph = int8_training_graph(folded, x)
    model = graph.model
    variables = model.trainable_weights
    with tf.GradientTape() as tape:
        loss = LOSS(y, model(x))
    return graph, model, variables, tape.gradient(loss, variables), [
        v.numpy() for v in variables]


def test_qas_scales_gradients_by_the_formula(folded):
    graph, model, variables, grads, start = _first_gradients(folded)
    # round-to-nearest (the int8 simulation's default is stochastic,
    # test_stochastic_rounding_of_the_int8_kernels below)
    QuantizationAwareScalingSGD(0.5, graph.qas_scales, rounding="nearest").apply_gradients(
        zip(grads, variables))
    for var, before, grad in zip(variables, start, grads):
        layer = model.get_layer(var.name.split("/")[0])
        s_w = graph.weight_scales[layer.name]
        s_x, _ = graph.input_qparams[layer.name]
        if "bias" in var.name:  # int32: the QAS step rounded to nearest, as on the device
            scale = (s_w * np.float32(s_x)).astype(np.float32)
            step = np.float32(0.5) * (grad.numpy() / (scale * scale))
            np.testing.assert_array_equal(var.numpy(), before - R.round_half_away(step),
                                          err_msg=var.name)
            continue
        w_shape = var.shape[-2:] if isinstance(layer, keras.layers.DepthwiseConv2D) else -1
        scale = s_w.reshape(w_shape).astype(np.float32)
        step = np.float32(0.5) * (grad.numpy() / (scale * scale))  # the optimizer's order
        expected = np.clip(before - R.round_half_away(step), -127, 127)
        np.testing.assert_array_equal(var.numpy(), expected, err_msg=var.name)
        assert np.array_equal(var.numpy(), np.round(var.numpy()))  # still int8 values


def _train(model, optimizer, scheme, x, y, epochs=3):
    """(loss, accuracy) on ``x`` after training."""
    keras.utils.set_random_seed(0)
    sparse = SparseUpdateModel(model, scheme, fold_bn=False)
    sparse.compile(optimizer=optimizer, loss=LOSS)
    sparse.fit(x, y, batch_size=1, epochs=epochs, verbose=0, shuffle=False)
    logits = sparse.base(x).numpy()
    return float(LOSS(y, logits)), float((logits.argmax(1) == y).mean())


def test_int8_training_with_qas_tracks_float_training(folded):
    """Without QAS the int8 weights barely move (their steps shrink by s_w^2); with it the
    int8 graph learns like the float one. Compared by accuracy: the device's int8 logits keep
    the scale calibrated on the untrained head (here +-0.3), so their loss saturates where
    the float model's keeps falling."""
    x, y = separable_task()
    lr = 0.05
    spec = {"head": 1.0, "project": "bias", "depthwise": 0.5}
    start = float(LOSS(y, folded(x)))
    start_accuracy = float((folded(x).numpy().argmax(1) == y).mean())

    float_model = keras.models.clone_model(folded)
    float_model.set_weights(folded.get_weights())
    float_loss, float_accuracy = _train(float_model, keras.optimizers.SGD(lr),
                                        UpdateScheme(spec), x, y)
    plain = int8_training_graph(folded, x)
    plain_loss, plain_accuracy = _train(plain.model, keras.optimizers.SGD(lr),
                                        UpdateScheme(spec), x, y)
    qas = int8_training_graph(folded, x)
    qas_loss, qas_accuracy = _train(qas.model, QuantizationAwareScalingSGD(lr, qas.qas_scales),
                                    UpdateScheme(spec), x, y)

    print(f"start {start:.3f} / {start_accuracy:.2f}, float {float_loss:.3f} / "
          f"{float_accuracy:.2f}, int8 {plain_loss:.3f} / {plain_accuracy:.2f}, int8+QAS "
          f"{qas_loss:.3f} / {qas_accuracy:.2f}")
    assert float_loss < 0.8 * start and float_accuracy > start_accuracy + 0.15  # learnable
    assert abs(plain_loss - start) < 0.05 * (start - float_loss)
    assert plain_accuracy < start_accuracy + 0.05
    assert qas_loss < start - 0.05
    assert qas_accuracy > float_accuracy - 0.1


def test_stochastic_rounding_of_the_int8_kernels(folded):
    """rounding="stochastic" (the default): the kernels stay int8 integers in [-127, 127],
    each moved by the floor or the ceiling of the QAS float step (-floor(u - step), u in
    [0, 1)); biases round to nearest (test above)."""
    graph, model, variables, grads, start = _first_gradients(folded)
    QuantizationAwareScalingSGD(0.05, graph.qas_scales).apply_gradients(zip(grads, variables))
    for var, before, grad in zip(variables, start, grads):
        layer = model.get_layer(var.name.split("/")[0])
        s_w = graph.weight_scales[layer.name]
        if "bias" in var.name:
            continue
        scale = s_w.reshape(var.shape[-2:]) if isinstance(
            layer, keras.layers.DepthwiseConv2D) else s_w
        float_step = 0.05 * grad.numpy() / scale ** 2
        after = var.numpy()
        np.testing.assert_array_equal(after, np.round(after), err_msg=var.name)
        assert np.abs(after).max() <= 127
        free = np.abs(before - float_step) < 126  # not clipped
        moved = (before - after)[free]
        assert np.abs(moved - float_step[free]).max() < 1 + 1e-3, var.name  # floor or ceil


def test_without_qas_the_int8_kernels_round_the_unscaled_step(folded):
    """qas=False (the "int8 SGD without QAS" ablation): the kernels stay int8 integers, and
    each moves by the floor or the ceiling of lr * g, not of lr * g * s^-2."""
    x, y = separable_task(8)
    graph = int8_training_graph(folded, x)
    model = graph.model
    kernels = [v for v in model.trainable_weights if "kernel" in v.name]
    with tf.GradientTape() as tape:
        loss = LOSS(y, model(x))
    grads = tape.gradient(loss, kernels)
    lr = 2000.0  # the unscaled int8 gradient is tiny: a large rate makes the steps visible
    start = [v.numpy() for v in kernels]
    QuantizationAwareScalingSGD(lr, graph.qas_scales, qas=False).apply_gradients(
        zip(grads, kernels))
    moved_any = False
    for var, before, grad in zip(kernels, start, grads):
        after = var.numpy()
        np.testing.assert_array_equal(after, np.round(after), err_msg=var.name)
        plain_step = lr * grad.numpy()
        free = np.abs(before - plain_step) < 126
        assert np.abs((before - after)[free] - plain_step[free]).max() < 1 + 1e-3, var.name
        moved_any |= bool(np.any(after != before))
    assert moved_any
