"""Which layers each named training method (`dgst_tf.training.methods.build_method`) trains:
on an inverted-residual MobileNetV2 the blocks start at its expansion convs; on a plain CNN
(no 1x1 conv that widens the channels) every Conv2D is a block. The oracle is the model's
own layer list, read here independently of the method's helpers."""
import pytest

from dgst_tf.core.keras_compat import keras
from dgst_tf.models import mobilenet_v2
from dgst_tf.training.methods import build_method
from dgst_tf.training.selection import DynamicChannelSelection, StaticChannelSelection


def _weight_layers(scheme) -> list:
    return sorted(n for n, update in scheme.layers.items() if update.updates_weights)


def _plain_cnn():
    inp = keras.Input((16, 16, 3))
    x = inp
    for i, (filters, kernel) in enumerate([(8, 3), (8, 5), (12, 3), (6, 1)]):  # 1x1 narrows
        x = keras.layers.Conv2D(filters, kernel, strides=2 if i else 1, padding="same",
                                activation="relu", name=f"c{i}")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inp, keras.layers.Dense(4, name="fc")(x), name="plain")


def test_mobilenet_v2_blocks_start_at_the_expansion_convs():
    model = mobilenet_v2(width=0.35, input_shape=(32, 32, 3), classes=4, weights=None)
    names = [l.name for l in model.layers]
    expands = [n for n in names if n.endswith("_expand") or n == "head_conv"]  # 1x1, widening
    scheme, callbacks = build_method("sparse_update", model, 0.05, blocks=2)
    assert _weight_layers(scheme) == sorted(expands[-2:])
    assert isinstance(callbacks[0], StaticChannelSelection)
    scheme, callbacks = build_method("dgsu", model, 0.05, blocks=2)
    first = names.index(expands[-2])
    pointwise = [n for n in names[first:] if n.endswith(("_expand", "_project", "head_conv"))]
    assert _weight_layers(scheme) == sorted(pointwise)
    assert isinstance(callbacks[0], DynamicChannelSelection)


@pytest.mark.parametrize("blocks, trained", [(2, ["c2", "c3"]), (3, ["c1", "c2", "c3"])])
def test_a_plain_cnn_has_one_block_per_conv2d(blocks, trained):
    model = _plain_cnn()
    for method in ("sparse_update", "dgsu"):
        scheme, _ = build_method(method, model, 0.05, blocks=blocks)
        assert _weight_layers(scheme) == trained, method  # c0 and the classifier never


def test_a_model_without_conv2d_is_refused_naming_it():
    inp = keras.Input((8,))
    model = keras.Model(inp, keras.layers.Dense(4)(keras.layers.Dense(6)(inp)), name="mlp")
    with pytest.raises(ValueError, match=r"model 'mlp' has no Conv2D layer"):
        build_method("dgsu", model, 0.05)
