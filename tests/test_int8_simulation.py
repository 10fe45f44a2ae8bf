"""The Keras int8 simulation (`int8_training_graph`) is the exported TFLM training step: the
converter's parameters, every int8 tensor of the forward pass bit for bit, the device's
int8 error signal, and 40 training steps with DGSU selection and stochastic rounding that
leave the same channels, int8 weights, int32 biases and losses on both sides."""
import numpy as np
import pytest

from small_models import assert_layers_equal_tflm_step, batch, dgsu_on_int8_graph, residual_cnn

from dgst_tf.core.bn_folding import fold_batchnorm
from dgst_tf.core.graph import UnsupportedModelError
from dgst_tf.core.int8_conversion import ConvertedModel
from dgst_tf.core.keras_compat import keras, tf
from dgst_tf.core.layer_kinds import kernel_of
from dgst_tf.core.tflite_requantization import RELU6, activation_range
from dgst_tf.export.inference import export_int8
from dgst_tf.export.tflite_editor import ModelEditor
from dgst_tf.export.tflite_file import read_tflite
from dgst_tf.export.tflm.runner import run_tflm
from dgst_tf.export.training import export_training, initial_params, train_tflm
from dgst_tf.tflm_ops import reference as R
from dgst_tf.training.int8_graph import int8_training_graph, max_accumulator
from dgst_tf.training.int8_ops import (Requantize, device_input_gradient,
                                       multiply_by_quantized_multiplier)
from dgst_tf.training.qas import QuantizationAwareScalingSGD
from dgst_tf.training.scheme import UpdateScheme
from dgst_tf.training.selection import DynamicChannelSelection
from dgst_tf.training.sparse_model import SparseUpdateModel

# a weight-updated conv (project, head), depthwise and dense (classifier, in full)
SCHEME = {"depthwise": 0.25, "project": 0.25, "head": 0.25, "expand": "bias"}
WEIGHT_LAYERS = ["depthwise", "project", "head", "classifier"]
LR, STEPS = 0.05, 40


@pytest.fixture(scope="module")
def setup():
    model = fold_batchnorm(residual_cnn())
    x, y = batch(STEPS + 32, seed=3)
    calibration = x[STEPS:]
    return model, x[:STEPS], y[:STEPS], calibration, int8_training_graph(model, calibration)


def test_multiply_by_quantized_multiplier_is_tflites():
    """The TF requantization equals the NumPy twin of TFLite's double-rounding
    MultiplyByQuantizedMultiplier, ties and negative values included (a single-rounding or
    round-half-even version fails)."""
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.integers(-2**24, 2**24, 4000), rng.integers(-3000, 3000, 4000),
                        np.arange(-64, 65)]).astype(np.int64)
    for shift in (-31, -20, -9, -3, -1, 0, 2, 5):
        multiplier = rng.integers(2**30, 2**31, x.size)
        multiplier[-129:] = 1 << 30  # exact halves at the rounding shifts
        scaled = x if shift <= 0 else x % (1 << (31 - shift)) - (1 << (30 - shift))
        want = R.multiply_by_quantized_multiplier(scaled, multiplier, shift)
        got = multiply_by_quantized_multiplier(tf.constant(scaled), multiplier,
                                               np.full(x.size, shift)).numpy()
        np.testing.assert_array_equal(got, want, err_msg=f"shift {shift}")


def test_parameters_are_the_exporters(setup, tmp_path):
    """Same model and calibration images: the graph holds the converter's file byte for byte
    (`export_int8`), and the training export's initial weights, biases, weight scales and
    input quantization (a graph calibrating on its own differs in all of them)."""
    model, _, _, calibration, graph = setup
    info = export_int8(model, calibration, tmp_path / "model.tflite")
    assert graph.tflite_model == info.path.read_bytes()
    exported = export_training(model, UpdateScheme(SCHEME), calibration,
                               tmp_path / "train.tflite", learning_rate=LR, policy="traversal")
    start = initial_params(exported.path)
    editor = ModelEditor(read_tflite(exported.path)[1])
    for entry in exported.manifest["params"]:
        name = entry["layer"]
        layer = graph.model.get_layer(name)
        if entry["param"] == "bias":
            np.testing.assert_array_equal(layer.bias.numpy(), start[f"{name}/bias"], name)
            continue
        kernel = kernel_of(layer).numpy()
        tflite = (kernel[..., 0][None] if name == "depthwise"
                  else kernel.transpose(3, 0, 1, 2) if kernel.ndim == 4 else kernel.T)
        np.testing.assert_array_equal(tflite, start[f"{name}/weights"], name)
        op = next(op for op in editor.subgraph.operators
                  if len(op.inputs) > 1 and op.inputs[1] == entry["tensor"])
        np.testing.assert_array_equal(graph.weight_scales[name],
                                      editor.quantization(op.inputs[1])[0], name)
        scale, zero_point = editor.quantization(op.inputs[0])
        assert graph.input_qparams[name] == (float(scale[0]), int(zero_point[0])), name


def test_every_int8_tensor_of_the_forward_pass_is_tflms(setup, tmp_path):
    """Every op output of the converted model (conv, depthwise, ADD, PAD, MEAN, dense logits)
    computed by TFLM equals the Keras graph's codes bit for bit, image by image."""
    _, x, _, _, graph = setup
    assert max_accumulator(graph, x) < 2 ** 24  # float32 holds the accumulators exactly
    editor = ModelEditor(read_tflite(graph.tflite_model)[1])
    ops = list(editor.subgraph.operators)
    outputs = [int(op.outputs[0]) for op in ops]
    editor.subgraph.outputs = outputs  # every intermediate tensor becomes a graph output
    path = tmp_path / "all_tensors.tflite"
    path.write_bytes(editor.pack())
    image = editor.quantization(editor.subgraph.inputs[0])
    codes_in = np.clip(np.round(x / image[0][0]) + image[1][0], -128, 127).astype(np.int8)
    result = run_tflm(path, [codes_in[:, None]])
    names = [graph.op_layers[index] for index in range(len(ops))]
    assert {"add", "pool", "pad", "depthwise_rescale", "classifier_rescale"} <= set(names)
    probe = keras.Model(graph.model.inputs, [graph.model.get_layer(n).output for n in names])
    for name, tensor, keras_codes, tflm in zip(names, outputs, probe(x), result.outputs):
        zero_point = int(editor.quantization(tensor)[1][0])
        got = keras_codes.numpy() + zero_point
        np.testing.assert_array_equal(got, tflm.reshape(got.shape), err_msg=name)
        assert len(np.unique(tflm)) > 5, name  # real activations, not a saturated tensor


def test_requantize_backward_is_the_devices_error_signal():
    """The gradient a `Requantize` passes to the accumulator: the real output gradient,
    masked where the int8 output is not strictly inside the ReLU6 range, quantized per
    example by the NumPy reference of DGST_QUANTIZE_GRAD, times the accumulator's scale;
    the error signal's scale is kept for the exact update step (batch of one only)."""
    rng = np.random.default_rng(1)
    channels, s_out, zero_point, s_x = 6, 6.0 / 255, -128, 0.02
    s_w = rng.uniform(0.001, 0.01, channels).astype(np.float32)
    multipliers, shifts = zip(*[(int(rng.integers(2**30, 2**31)), -9) for _ in range(channels)])
    low, high = activation_range(RELU6, s_out, zero_point)
    layer = Requantize(multipliers, shifts, s_out, zero_point, (low, high), True, s_x, s_w)
    acc = tf.constant(rng.integers(-60000, 200000, (2, 5, 5, channels)), tf.float32)
    upstream = rng.normal(0, 1, (2, 5, 5, channels)).astype(np.float32)
    upstream[1] *= 300  # the second example's error is far larger: scales are per example
    def backward(acc, upstream):
        with tf.GradientTape() as tape:
            tape.watch(acc)
            codes = layer(acc)
        return codes, tape.gradient(codes, acc, output_gradients=upstream)

    for batch in (2, 1):
        codes, got = backward(acc[:batch], tf.constant(upstream[:batch]))
        graph_codes, graph_got = tf.function(backward)(acc[:batch],
                                                       tf.constant(upstream[:batch]))
        np.testing.assert_array_equal(graph_got.numpy(), got.numpy())
        q = codes.numpy() + zero_point
        assert (q == low).any() and (q == high).any()  # clamped outputs get no gradient
        for example in range(batch):
            g = R.apply_mask(upstream[example], R.build_mask(q[example], low, high))
            dy, scale = R.quantize_grad(g)
            want = dy.astype(np.float32).reshape(q[example].shape) * (
                scale * (s_w * np.float32(s_x)))
            np.testing.assert_array_equal(got[example], want)
        error_scale = float(layer.error_scale.numpy())
        assert np.isnan(error_scale) if batch == 2 else error_scale == scale


@pytest.fixture(scope="module")
def cores():
    from dgst_tf.tflm_ops import host as H

    return H.Kernels(H.build())


@pytest.mark.parametrize("spec", [
    ("conv", dict(filters=6, kernel_size=3, strides=2, padding="same"), (7, 6, 5)),
    ("conv", dict(filters=9, kernel_size=1), (3, 4, 7)),
    ("conv", dict(filters=4, kernel_size=3, padding="valid"), (5, 5, 6)),
    ("depthwise", dict(kernel_size=3, padding="same"), (5, 6, 8)),
    ("dense", dict(units=5), (11,))], ids=["conv3x3s2", "conv1x1", "conv_valid", "dw", "fc"])
def test_input_gradient_is_the_device_cores(cores, spec):
    """`device_input_gradient` equals the C cores of DGST_CONV2D_INPUT_GRAD and
    DGST_DEPTHWISE_INPUT_GRAD bit for bit, per example, eagerly and in a `tf.function`
    (whose graph optimizer must not regroup the sums; TF's own transposed convolution sums
    in another order and differs in the last bits)."""
    kind, options, shape = spec
    rng = np.random.default_rng(len(shape) + sum(shape))
    layer = {"conv": keras.layers.Conv2D, "depthwise": keras.layers.DepthwiseConv2D,
             "dense": keras.layers.Dense}[kind](**options)
    y = layer(tf.zeros((2, *shape)))
    kernel = rng.integers(-127, 128, kernel_of(layer).shape).astype(np.float32)
    kernel_of(layer).assign(kernel)
    channels = int(np.prod(kernel.shape[2:])) if kind == "depthwise" else kernel.shape[-1]
    s_w = rng.uniform(0.001, 0.02, channels).astype(np.float32)
    dy = rng.integers(-127, 128, y.shape).astype(np.float32)
    scale = np.array([3e-4, 7e-2], np.float32).reshape((2,) + (1,) * (len(y.shape) - 1))
    args = (tf.constant(dy), tf.constant(scale))
    eager = device_input_gradient(layer, *args, s_w, tf.constant((2, *shape))).numpy()
    got = tf.function(lambda dy, scale: device_input_gradient(
        layer, dy, scale, s_w, tf.shape(tf.zeros((2, *shape)))))(*args).numpy()
    np.testing.assert_array_equal(eager, got)
    for b in range(2):
        if kind == "dense":
            g = R.Geometry(1, 1, 1, 1, 1, 1)
            want = cores.conv2d_input_grad(g, dy[b].reshape(1, 1, -1), scale.ravel()[b],
                                           kernel.T.reshape(-1, 1, 1, shape[0]), s_w)
        elif kind == "depthwise":
            g = R.Geometry.conv(*shape[:2], 3, stride=1, padding="same")
            want = cores.depthwise_input_grad(g, dy[b], scale.ravel()[b],
                                              kernel[..., 0][None], s_w)
        else:
            k = kernel.shape[0]
            g = R.Geometry.conv(*shape[:2], k, stride=options.get("strides", 1),
                                padding=options.get("padding", "valid"))
            want = cores.conv2d_input_grad(g, dy[b], scale.ravel()[b],
                                           kernel.transpose(3, 0, 1, 2), s_w)
        np.testing.assert_array_equal(got[b], want.reshape(got[b].shape))


def test_device_loss_gradient_is_the_c_cores(cores):
    """The softmax cross-entropy gradient of `DeviceSoftmaxCrossEntropy` equals the C core
    DGST_SOFTMAX_XENT_GRAD bit for bit wherever glibc's ``expf`` is correctly rounded (the
    mismatch rate is that of expf, ~0.1% of its calls)."""
    from dgst_tf.training.int8_ops import DeviceSoftmaxCrossEntropy

    rng = np.random.default_rng(3)
    scale, zero_point, count = 0.11, 7, 400
    codes = rng.integers(-128, 128, (count, 10)).astype(np.int8)
    labels = rng.integers(0, 10, count)
    logits = tf.constant((codes.astype(np.float32) - zero_point) * np.float32(scale))
    loss = DeviceSoftmaxCrossEntropy(scale, reduction="none")

    def loss_and_gradient(logits):
        with tf.GradientTape() as tape:
            tape.watch(logits)
            values = loss(labels, logits)
        return values, tape.gradient(values, logits)

    values, grads = loss_and_gradient(logits)
    graph_values, graph_grads = tf.function(loss_and_gradient)(logits)
    np.testing.assert_array_equal(graph_grads.numpy(), grads.numpy())
    np.testing.assert_array_equal(graph_values.numpy(), values.numpy())
    grads = grads.numpy()
    same = 0
    for row in range(count):
        want_loss, want = cores.softmax_xent_grad(codes[row], scale, zero_point, labels[row])
        same += np.array_equal(grads[row], want)
        np.testing.assert_allclose(grads[row], want, atol=2e-7)
        assert values[row].numpy() == pytest.approx(want_loss, rel=1e-6)
    assert same >= 0.97 * count


def test_the_exact_qas_step_is_the_device_cores(cores):
    """With the layer's error-signal scale (`Int8Scales`), the optimizer's weight and bias
    steps are DGST_SGD_QAS_UPDATE's bit for bit (stochastic rounding, 200k weights; 100k
    biases rounded to nearest); the QAS float formula on the same gradients differs."""
    from dgst_tf.training.qas import ExactStep, Int8Scales, layer_stream

    rng = np.random.default_rng(4)
    c_in, c_out, lr, s_x, error = 2, 100000, 0.01, np.float32(0.03), np.float32(2.5e-3)
    layer = keras.layers.Dense(c_out, name="probe")
    layer(tf.zeros((1, c_in)))
    weights = rng.integers(-100, 100, (c_in, c_out)).astype(np.float32)
    bias = rng.integers(-2**20, 2**20, c_out).astype(np.float32)
    s_w = rng.uniform(0.001, 0.01, c_out).astype(np.float32)
    accumulator = s_w * s_x
    grad = rng.integers(-20000, 20000, (c_in, c_out))
    bias_grad = rng.integers(-300000, 300000, c_out)  # steps of up to ~10^5 LSB

    def step(exact: bool):
        layer.kernel.assign(weights)
        layer.bias.assign(bias)
        error_scale = tf.Variable(error)
        steps = {v.ref(): ExactStep(error_scale, float(s_x), scales, accumulator)
                 for v, scales in ((layer.kernel, s_w), (layer.bias, s_w))}
        scales = Int8Scales({layer.kernel.ref(): tf.constant(s_w),
                             layer.bias.ref(): tf.constant(accumulator)},
                            steps if exact else None)
        optimizer = QuantizationAwareScalingSGD(lr, scales, seed=5)
        c = error * accumulator  # the true gradient as the backward pass gives it
        optimizer.apply_gradients([(tf.constant(grad * c, tf.float32), layer.kernel),
                                   (tf.constant(bias_grad * c, tf.float32), layer.bias)])
        return layer.kernel.numpy().T[:, None, None, :], layer.bias.numpy()

    want_w = cores.sgd_qas_update_conv_sr(weights.T[:, None, None, :], np.arange(c_in),
                                          grad.T[:, None, None, :], lr, s_x, error, s_w, 5,
                                          layer_stream("probe"), 0)
    want_b = cores.sgd_qas_update_bias(bias, bias_grad, lr, s_x, error, s_w)
    got_w, got_b = step(exact=True)
    np.testing.assert_array_equal(got_w, want_w)
    np.testing.assert_array_equal(got_b, want_b)
    float_w, float_b = step(exact=False)
    assert (float_w != want_w).sum() + (float_b != want_b).sum() > 0


def test_steps_with_dgsu_and_stochastic_rounding_equal_the_tflm_graphs(setup, tmp_path):
    """40 steps of `SparseUpdateModel` + `QuantizationAwareScalingSGD(rounding="stochastic")`
    + `DynamicChannelSelection(traversal=True)` vs `train_tflm` of the exported step: at
    every step the same logits codes, the same kept channels, the same int8 weights and int32
    biases, and the same loss up to float32 (the softmax's exp)."""
    model, x, y, calibration, graph = setup
    info = export_training(model, UpdateScheme(SCHEME), calibration, tmp_path / "t.tflite",
                           learning_rate=LR, policy="traversal", rounding="stochastic",
                           output_params=True)
    run = train_tflm(info.path, x, y)
    assert all(f"{n}/weights" in run.manifest["outputs"] for n in WEIGHT_LAYERS)
    graph = int8_training_graph(model, calibration)  # fresh weights: this test trains them
    sparse = dgsu_on_int8_graph(graph, UpdateScheme(SCHEME), LR)
    logits = keras.Model(graph.model.inputs, graph.model.get_layer("classifier_rescale").output)
    converted = ConvertedModel(graph.tflite_model)
    zero_point = converted.tensor(converted.outputs[0]).zero_point
    start = {name: kernel_of(graph.model.get_layer(name)).numpy().copy()
             for name in WEIGHT_LAYERS}
    for step in range(STEPS):  # the forward pass of each step, before its update
        np.testing.assert_array_equal(logits(x[step:step + 1]).numpy()[0] + zero_point,
                                      run.logits[step], f"logits step {step}")
        loss = sparse.train_on_batch(x[step:step + 1], y[step:step + 1], return_dict=True)
        assert loss["loss"] == pytest.approx(run.losses[step], rel=1e-5), step
        assert_layers_equal_tflm_step(graph, sparse, run, WEIGHT_LAYERS, step)
    for name in WEIGHT_LAYERS:  # the comparison is not vacuous: the weights really moved
        moved = (kernel_of(graph.model.get_layer(name)).numpy() != start[name]).sum()
        assert moved >= 10, (name, moved)


def test_a_layer_without_converted_counterpart_is_named():
    inputs = keras.Input((6, 6, 3))
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = keras.layers.Activation("tanh", name="squash")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    model = keras.Model(inputs, keras.layers.Dense(2, name="classifier")(x))
    with pytest.raises(UnsupportedModelError, match="layer 'squash' \\(Activation\\)"):
        int8_training_graph(model, batch(8, input_shape=(6, 6, 3))[0])
