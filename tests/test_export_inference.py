"""Full-int8 inference export: TFLM must match TFLite's reference kernels bit for bit."""
import os

import numpy as np
import pytest
from small_models import residual_cnn

from dgst_tf.core.bn_folding import fold_batchnorm
from dgst_tf.export import (Int8ExportError, dequantize, export_int8, quantize,
                            reference_outputs, run_tflm)
from dgst_tf.export.tflite_file import read_tflite, schema
from dgst_tf.core.keras_compat import Keras3ModelError, keras, tf
from dgst_tf.models import mobilenet_v2


def images(n, shape=(8, 8, 3), seed=0):
    return np.random.default_rng(seed).normal(size=(n, *shape)).astype(np.float32)


def assert_tflm_matches_reference(path, x_q):
    """Runs all samples in one TFLM child; returns the TflmResult."""
    result = run_tflm(path, [x_q[:, None]])  # stack of (1, H, W, C) inputs
    for i in range(len(x_q)):
        expected = reference_outputs(path, [x_q[i:i + 1]])[0]
        np.testing.assert_array_equal(result.outputs[0][i], expected,
                                      err_msg=f"sample {i} of {path}")
    return result


def weight_scale_count(path, builtin):
    _, model = read_tflite(path)
    graph = model.subgraphs[0]
    counts = []
    for op in graph.operators:
        if max(model.operatorCodes[op.opcodeIndex].builtinCode,
               model.operatorCodes[op.opcodeIndex].deprecatedBuiltinCode) == builtin:
            weights = graph.tensors[op.inputs[1]]
            counts.append((len(weights.quantization.scale), weights.type))
    return counts


@pytest.mark.parametrize("fold", [True, False], ids=["bn-folded", "bn-unfolded"])
def test_tiny_cnn_int8_runs_in_tflm_bit_exact(tmp_path, fold):
    model = residual_cnn(seed=3)
    model = fold_batchnorm(model) if fold else model
    calibration = images(16)
    path = tmp_path / "tiny.tflite"
    info = export_int8(model, calibration, path)

    assert info.path == path and path.stat().st_size == info.size_bytes
    assert info.input.dtype == np.int8 and info.output.dtype == np.int8
    assert info.input.shape == (1, 8, 8, 3) and info.output.shape == (1, 4)
    for op in ("CONV_2D", "DEPTHWISE_CONV_2D", "ADD", "FULLY_CONNECTED"):
        assert info.ops.get(op), info.ops
    # per-channel int8 weights: one scale per output channel
    assert weight_scale_count(path, schema.BuiltinOperator.CONV_2D) == [
        (8, schema.TensorType.INT8), (12, schema.TensorType.INT8), (8, schema.TensorType.INT8),
        (16, schema.TensorType.INT8)]
    assert weight_scale_count(path, schema.BuiltinOperator.DEPTHWISE_CONV_2D) == [
        (12, schema.TensorType.INT8)]

    x_q = quantize(images(6, seed=9), info.input)
    result = assert_tflm_matches_reference(path, x_q)
    assert result.arena_bytes == result.arena_head_bytes + result.arena_tail_bytes > 0
    # and the int8 model approximates the float one
    logits = dequantize(result.outputs[0][:, 0], info.output)
    expected = model(images(6, seed=9), training=False).numpy()
    error = np.abs(logits - expected).max()
    assert error < 0.1 * np.abs(expected).max() + 4 * info.output.scale, error


def test_pruned_model_with_zero_channels_and_tfmot_wrappers(tmp_path):
    import tensorflow_model_optimization as tfmot

    model = fold_batchnorm(residual_cnn(seed=4))
    for name, axis_index in (("expand", 3), ("classifier", 1)):
        weights = model.get_layer(name).get_weights()
        weights[0][..., 2] = 0.0  # a whole pruned output channel / unit
        if name == "classifier":
            weights[0][:, 2] = 0.0
        model.get_layer(name).set_weights(weights)
    calibration = images(8)
    plain = export_int8(model, calibration, tmp_path / "pruned.tflite")
    x_q = quantize(images(4, seed=5), plain.input)
    assert_tflm_matches_reference(plain.path, x_q)

    wrapped = tfmot.sparsity.keras.prune_low_magnitude(
        model, pruning_schedule=tfmot.sparsity.keras.ConstantSparsity(0.5, 0))
    stripped = export_int8(wrapped, calibration, tmp_path / "wrapped.tflite")
    assert stripped.ops == plain.ops  # no pruning ops left in the graph
    np.testing.assert_array_equal(run_tflm(stripped.path, [x_q[:, None]]).outputs[0],
                                  run_tflm(plain.path, [x_q[:, None]]).outputs[0])


def test_mobilenet_v2_035_int8_in_tflm_matches_reference(tmp_path):
    model = fold_batchnorm(mobilenet_v2(width=0.35, input_shape=(64, 64, 3), classes=10,
                                        weights=None, seed=0))
    calibration = images(4, (64, 64, 3), seed=1)
    info = export_int8(model, calibration, tmp_path / "mbv2.tflite")
    assert info.ops["CONV_2D"] == 35 and info.ops["DEPTHWISE_CONV_2D"] == 17
    assert info.ops["ADD"] == 10 and info.ops["FULLY_CONNECTED"] == 1
    x_q = quantize(images(2, (64, 64, 3), seed=2), info.input)
    result = assert_tflm_matches_reference(info.path, x_q)
    # The arena holds at least the two largest live activations (32x32x16 stem output and
    # the 32x32x16 expansion at int8) and stays far below the 256 KB training budget.
    assert 2 * 32 * 32 * 16 < result.arena_bytes < 256 * 1024, result.arena_bytes
    assert set(result.allocations) >= {"TfLiteEvalTensor data", "Persistent buffer data"}


def test_representative_data_forms_give_the_same_model(tmp_path):
    model = fold_batchnorm(residual_cnn(seed=1))
    x = images(6)
    a = export_int8(model, x, tmp_path / "a.tflite")
    dataset = tf.data.Dataset.from_tensor_slices((x, np.zeros(6, np.int32))).batch(4)
    b = export_int8(model, dataset, tmp_path / "b.tflite")
    c = export_int8(model, lambda: ([s[None]] for s in x), tmp_path / "c.tflite")
    assert a.path.read_bytes() == b.path.read_bytes() == c.path.read_bytes()
    d_same = export_int8(model, np.concatenate([x, images(14, seed=7)]), tmp_path / "d.tflite",
                         num_samples=6)
    assert d_same.path.read_bytes() == a.path.read_bytes()  # only the first 6 are used


def test_keras3_model_gets_the_clear_error_and_nothing_is_written(tmp_path):
    import keras as keras3

    model = keras3.Sequential([keras3.Input((4, 4, 3)), keras3.layers.Conv2D(2, 3)])
    with pytest.raises(Keras3ModelError, match="TF_USE_LEGACY_KERAS=1"):
        export_int8(model, images(2, (4, 4, 3)), tmp_path / "k3.tflite")
    assert os.listdir(tmp_path) == []


def test_failures_leave_no_file_and_keep_an_existing_one(tmp_path):
    path = tmp_path / "model.tflite"
    path.write_bytes(b"previous model")

    inp = keras.Input((None, None, 3))
    dynamic = keras.Model(inp, keras.layers.Conv2D(2, 3)(inp))
    with pytest.raises(ValueError, match="fixed size"):
        export_int8(dynamic, images(2), path)

    inp = keras.Input((4, 4, 3))
    not_int8 = keras.Model(inp, keras.layers.Lambda(lambda t: tf.math.sin(t))(
        keras.layers.Conv2D(2, 3)(inp)))
    with pytest.raises(Int8ExportError, match="model.tflite"):
        export_int8(not_int8, images(2, (4, 4, 3)), path)

    with pytest.raises(ValueError, match="does not fit"):
        export_int8(fold_batchnorm(residual_cnn()), images(2, (4, 4, 3)), path)
    with pytest.raises(ValueError, match="no samples"):
        export_int8(fold_batchnorm(residual_cnn()), images(0), path)

    assert path.read_bytes() == b"previous model"
    assert sorted(os.listdir(tmp_path)) == ["model.tflite"]  # no temp files left
