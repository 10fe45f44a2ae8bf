"""The converter's int8 model with the new head widened (`convert_int8`, `widen_head`): the
head's logit range and weight scales have room to train, and the file still computes the
same function (checked with TFLite's reference kernels)."""
import numpy as np
import pytest
from small_models import residual_cnn

from dgst_tf.core.int8_conversion import ConvertedModel, convert_int8, widen_head
from dgst_tf.core.bn_folding import fold_batchnorm
from dgst_tf.core.keras_compat import keras
from dgst_tf.export import reference_outputs


@pytest.fixture(scope="module")
def model():
    model = fold_batchnorm(residual_cnn(seed=3))
    head = model.get_layer("classifier")
    kernel, bias = head.get_weights()
    head.set_weights([kernel, np.linspace(-0.05, 0.05, bias.size).astype(np.float32)])
    return model  # a nonzero bias, so the converter keeps it


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).normal(size=(16, 8, 8, 3)).astype(np.float32)


def _head(data):
    converted = ConvertedModel(data)
    head = converted.producer(converted.outputs[0])
    assert head.inputs[2] >= 0  # the bias
    weights, bias = (converted.tensor(i) for i in head.inputs[1:3])
    return head.kind, converted.tensor(head.outputs[0]), weights, bias


def _logits(data, x):
    converted = ConvertedModel(data)
    source, out = converted.tensor(converted.inputs[0]), converted.tensor(converted.outputs[0])
    codes = np.clip(np.round(x / source.scale) + source.zero_point, -128, 127).astype(np.int8)
    result = reference_outputs(data, [codes[None]])[0].astype(np.float64)
    return (result - out.zero_point) * out.scale


def test_the_head_gets_logit_range_and_weight_headroom(model, images):
    plain = convert_int8(model, images, head_logit_range=0, head_weight_headroom=1)
    wide = convert_int8(model, images, head_logit_range=16, head_weight_headroom=4)
    kind, plain_out, plain_w, plain_b = _head(plain)
    _, wide_out, wide_w, wide_b = _head(wide)

    assert kind == "FULLY_CONNECTED"
    plain_half = (127 - plain_out.zero_point) * plain_out.scale
    assert plain_half < 16  # the untrained head's calibration is narrow: the case in point
    assert (-128 - wide_out.zero_point) * wide_out.scale <= -16 + wide_out.scale
    assert (127 - wide_out.zero_point) * wide_out.scale >= 16 - wide_out.scale
    np.testing.assert_allclose(wide_w.scales, 4 * plain_w.scales, rtol=1e-6)
    np.testing.assert_allclose(wide_b.scales, 4 * plain_b.scales, rtol=1e-6)
    expected_w = np.sign(plain_w.data) * np.floor(np.abs(plain_w.data) / 4 + 0.5)
    np.testing.assert_array_equal(wide_w.data, expected_w)
    assert np.abs(wide_w.data).max() <= 32  # the weights may now grow 4x before clamping
    np.testing.assert_array_equal(wide_b.data, np.round(plain_b.data / 4 + 1e-9 * np.sign(
        plain_b.data)).astype(np.int32))

    # the same function, to the resolution of the wider parameters
    for x in images[:4]:
        np.testing.assert_allclose(_logits(wide, x), _logits(plain, x),
                                   atol=2 * wide_out.scale + 0.1 * np.abs(
                                       _logits(plain, x)).max())


def test_a_wide_head_is_not_narrowed(model, images):
    data = convert_int8(model, images, head_logit_range=0, head_weight_headroom=1)
    _, out, _, _ = _head(data)
    again = widen_head(data, logit_range=0.01, weight_headroom=1)
    _, same, _, _ = _head(again)
    assert same.scale == pytest.approx(out.scale, rel=1e-6)
    assert same.zero_point == out.zero_point


def test_a_model_not_ending_in_a_conv_or_dense_is_unchanged(images):
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same")(inputs)
    outputs = keras.layers.GlobalAveragePooling2D()(x)
    data = convert_int8(keras.Model(inputs, outputs), images, head_logit_range=0,
                        head_weight_headroom=1)
    assert widen_head(data, 16.0, 4.0) == data


def test_bad_headroom_is_a_clear_error(model, images):
    data = convert_int8(model, images, head_logit_range=0, head_weight_headroom=1)
    with pytest.raises(ValueError, match="weight_headroom"):
        widen_head(data, 16.0, 0.5)
