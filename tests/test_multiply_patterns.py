"""Finding MobileNetV3's hard-swish and squeeze-and-excitation gates in Keras graphs
(`dgst_tf.core.multiply_patterns`): both input orders, ``/ 6`` as well as ``* (1 / 6)``,
look-alikes that are not hard-swish, and keras.applications' MobileNetV3Small and
EfficientNetB0 (counted from their layer names)."""
import pytest

from dgst_tf.core.bn_folding import fold_batchnorm
from dgst_tf.core.keras_compat import keras
from dgst_tf.core.multiply_patterns import (hard_swish_helpers, hard_swish_patterns,
                                            squeeze_excite_gates)


def _model(gate_fn, x_first=True):
    inp = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", name="conv")(inp)
    gate = gate_fn(x)
    out = keras.layers.Multiply(name="mul")([x, gate] if x_first else [gate, x])
    return keras.Model(inp, out)


@pytest.mark.parametrize("x_first", [True, False])
@pytest.mark.parametrize("divide", [True, False])
def test_hard_swish_is_found_in_either_order_and_form(x_first, divide):
    def gate(x):
        relu = keras.layers.ReLU(6.0, name="relu6")(x + 3.0)
        return relu / 6.0 if divide else relu * (1.0 / 6.0)

    model = _model(gate, x_first)
    found = hard_swish_patterns(model)
    assert list(found) == ["mul"]
    assert found["mul"].source == "conv" and found["mul"].x_position == (0 if x_first else 1)
    assert "relu6" in found["mul"].helpers and len(hard_swish_helpers(model)) == 3
    # after BatchNorm folding (a rebuilt graph: the layers are called a second time)
    assert list(hard_swish_patterns(fold_batchnorm(model))) == ["mul"]


@pytest.mark.parametrize("gate", [
    lambda x: keras.layers.ReLU(6.0)(x + 2.0) * (1.0 / 6.0),  # x + 2
    lambda x: keras.layers.ReLU()(x + 3.0) * (1.0 / 6.0),  # ReLU, not ReLU6
    lambda x: keras.layers.ReLU(6.0)(x + 3.0) * 0.2,  # * 0.2
])
def test_look_alikes_are_not_hard_swish(gate):
    assert hard_swish_patterns(_model(gate)) == {}


def test_a_hard_swish_whose_gate_is_read_elsewhere_is_not_one():
    inp = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", name="conv")(inp)
    relu = keras.layers.ReLU(6.0, name="relu6")(x + 3.0)
    y = keras.layers.Multiply(name="mul")([x, relu * (1.0 / 6.0)])
    out = keras.layers.Add(name="add")([y, relu])  # the ReLU6 output has a second reader
    assert hard_swish_patterns(keras.Model(inp, out)) == {}


def test_keras_applications_gates():
    v3 = keras.applications.MobileNetV3Small((32, 32, 3), alpha=0.75, weights=None,
                                             classes=5)
    multiplies = [l.name for l in v3.layers if isinstance(l, keras.layers.Multiply)]
    gates = squeeze_excite_gates(v3)
    assert sorted(gates) == sorted(n for n in multiplies if "squeeze_excite" in n)
    assert sorted(hard_swish_patterns(v3)) == sorted(set(multiplies) - set(gates))
    assert len(gates) == 9 and len(hard_swish_patterns(v3)) == 19
    assert "expanded_conv_10/squeeze_excite/AvgPool" in gates[
        "expanded_conv_10/squeeze_excite/Mul"]
    b0 = keras.applications.EfficientNetB0(input_shape=(32, 32, 3), weights=None, classes=5)
    se = [l.name for l in b0.layers if l.name.endswith("se_excite")]
    assert sorted(squeeze_excite_gates(b0)) == sorted(se) and len(se) == 16
    assert hard_swish_patterns(b0) == {}
