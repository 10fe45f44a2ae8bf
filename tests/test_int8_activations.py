"""The int8 table activations of the training step (swish, hard-swish, sigmoid;
`dgst_tf.training.int8_activations`): the derivative tables against tf.GradientTape of the
float activations (as tf-keras computes them) at the dequantized int8 points, tables that a
plausible wrong implementation gives failing that check, and the Keras layer's forward and
backward against the TFLite reference kernels and the NumPy reference of
``DGST_ACTIVATION_GRAD``. The C core and the TFLM kernel: tests/test_kernels_host.py,
tests/test_tflm_train_ops.py; whole models: tests/test_own_models.py."""
import numpy as np
import pytest

from dgst_tf.core.keras_compat import keras, tf
from dgst_tf.tflm_ops import reference as R
from dgst_tf.training.int8_activations import (Int8Activation, activation_derivative,
                                               derivative_table, find_activations,
                                               forward_table)

CODES = np.arange(-128, 128)
# (scale, zero point): typical conv outputs, one whose grid hits x = -3 and x = 3 exactly
# (the kinks of hard-swish), one with all inputs below -3 / above 3 at the ends
QUANTIZATIONS = [(0.05, -10), (0.125, 0), (0.0371, 37), (0.2, -100)]


def _keras_activation(kind):
    """The float activation as tf-keras models compute it."""
    if kind == "hard_swish":  # keras.applications.MobileNetV3's hard_swish
        return lambda x: x * (tf.nn.relu6(x + 3.0) * (1.0 / 6.0))
    return keras.activations.get(kind)


def _tape_derivative(kind, scale, zero_point):
    x = tf.Variable(np.float32(scale) * (CODES - zero_point).astype(np.float32))
    with tf.GradientTape() as tape:
        y = tf.reduce_sum(_keras_activation(kind)(x))
    return tape.gradient(y, x).numpy()


@pytest.mark.parametrize("kind", ["swish", "hard_swish", "sigmoid"])
@pytest.mark.parametrize("scale, zero_point", QUANTIZATIONS)
def test_derivative_table_is_gradient_tape_at_the_dequantized_codes(kind, scale, zero_point):
    table = derivative_table(kind, scale, zero_point)
    assert table.dtype == np.float32 and table.shape == (256,)
    np.testing.assert_allclose(table, _tape_derivative(kind, scale, zero_point), rtol=2e-6,
                               atol=1e-7)


def test_kinks_of_hard_swish_follow_tensorflow():
    """x = -3 exactly: 0 (ReLU6's gradient at 0), x = 3: 1 (at 6); the table is not the
    derivative of ReLU6 (0 or 1), and not (2x + 3) / 6 at the kinks."""
    table = derivative_table("hard_swish", 0.125, 0)
    assert table[-24 + 128] == 0.0 and table[24 + 128] == 1.0
    assert table[0 + 128] == pytest.approx(0.5)  # f'(0) = 1 / 2
    assert table[-12 + 128] == 0.0  # f'(-1.5) = 0
    assert table[-20 + 128] == pytest.approx((2 * -2.5 + 3) / 6)  # negative slope


@pytest.mark.parametrize("wrong", ["relu6_derivative", "zero_point_off_by_one",
                                   "swish_for_hard_swish", "sigmoid_for_swish"])
def test_plausible_wrong_tables_fail_the_gradient_tape_check(wrong):
    """The check above catches the mistakes one would plausibly make."""
    scale, zero_point = 0.05, -10
    kind = "swish" if wrong == "sigmoid_for_swish" else "hard_swish"
    x = np.float32(scale) * (CODES - zero_point).astype(np.float32)
    table = {
        "relu6_derivative": ((x + 3 > 0) & (x + 3 < 6)).astype(np.float32),
        "zero_point_off_by_one": derivative_table("hard_swish", scale, zero_point + 1),
        "swish_for_hard_swish": derivative_table("swish", scale, zero_point),
        "sigmoid_for_swish": derivative_table("sigmoid", scale, zero_point),
    }[wrong]
    with pytest.raises(AssertionError):
        np.testing.assert_allclose(table, _tape_derivative(kind, scale, zero_point),
                                   rtol=2e-6, atol=1e-7)


def test_unknown_activation_is_named():
    with pytest.raises(ValueError, match=r"unknown activation 'tanh'"):
        activation_derivative("tanh", [0.0])


@pytest.mark.parametrize("kind, quantizations", [
    ("swish", [(0.05, -10), (1 / 256, -128), (0.03, -118)]),
    ("hard_swish", [(0.05, -10), (0.04, -117)]),
    ("sigmoid", [(0.08, 5), (1 / 256, -128)]),
])
def test_forward_table_is_close_to_the_float_activation(kind, quantizations):
    """TFLite's reference int8 kernels are within a few output steps of the float function
    (a sanity check of the table's wiring; the table itself is exact by construction and
    is compared with TFLM in tests/test_tflm_train_ops.py)."""
    codes = forward_table(kind, quantizations).astype(np.int32)
    (s_in, z_in), (s_out, z_out) = quantizations[0], quantizations[-1]
    x = s_in * (CODES - z_in)
    want = _keras_activation(kind)(tf.constant(x, tf.float32)).numpy()
    expected_codes = np.clip(np.round(want / s_out) + z_out, -128, 127)
    assert np.abs(codes - expected_codes).max() <= 2
    assert len(np.unique(codes)) > 20  # not a constant table


def test_int8_activation_layer_forward_and_backward():
    """Forward: the table's codes, centered; backward: g * table[q + 128] in float32, bit for
    bit as the NumPy reference of DGST_ACTIVATION_GRAD."""
    rng = np.random.default_rng(0)
    (s_in, z_in), (s_out, z_out) = (0.05, -10), (0.04, -117)
    codes = forward_table("hard_swish", [(s_in, z_in), (s_out, z_out)])
    table = derivative_table("hard_swish", s_in, z_in)
    table[:3] = -0.0  # (a swish table far below 0 underflows to -0.0)
    layer = Int8Activation(codes, table, z_in, z_out)
    q = rng.integers(-128, 128, (2, 3, 4, 5)).astype(np.int8)
    q.flat[:6] = [-128, -127, -126, -128, -127, -126]  # on the -0.0 entries
    c = tf.constant(q.astype(np.float32) - z_in)
    g = rng.normal(size=q.shape).astype(np.float32)
    g.flat[:3] = [-1.0, 2.0, -0.0]
    with tf.GradientTape() as tape:
        tape.watch(c)
        y = layer(c)
    np.testing.assert_array_equal(y.numpy(),
                                  codes.astype(np.int32)[q.astype(np.int32) + 128] - z_out)
    dx = tape.gradient(y, c, output_gradients=tf.constant(g)).numpy()
    want = R.activation_grad(g, q, table).reshape(q.shape)
    np.testing.assert_array_equal(dx.view(np.uint32), want.view(np.uint32))


def test_find_activations_tells_swish_from_sigmoid_and_a_gate():
    """LOGISTIC feeding only MUL(x, sigmoid(x)) is a swish; a LOGISTIC whose output gates
    another tensor (squeeze-and-excitation) is a sigmoid, and that MUL no activation."""
    kinds = ["CONV_2D", "LOGISTIC", "MUL", "LOGISTIC", "MUL", "HARD_SWISH"]
    inputs = [[0], [1], [1, 2], [3], [5, 4], [5]]  # op 4: MUL(tensor 5, sigmoid(3)), a gate
    outputs = [[1], [2], [3], [4], [6], [7]]
    consumers = {}
    for index, tensors in enumerate(inputs):
        for t in tensors:
            consumers.setdefault(t, []).append(index)
    found = find_activations(kinds, inputs, outputs, consumers, [0] * 6)
    assert found[1] == found[2] and found[1].kind == "swish" and found[1].ops == (1, 2)
    assert (found[1].input, found[1].output, found[1].inner) == (1, 3, (2,))
    assert found[3].kind == "sigmoid" and found[3].output == 4 and 4 not in found
    assert found[5].kind == "hard_swish" and (found[5].input, found[5].output) == (5, 7)
    fused = find_activations(kinds, inputs, outputs, consumers, [0, 0, 1, 0, 0, 0])
    assert fused[1].kind == "sigmoid" and 2 not in fused  # MUL with a fused ReLU: not swish
