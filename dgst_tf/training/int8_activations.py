"""Int8 elementwise activations the training step trains through, beyond the ReLU / ReLU6
that fuse into the conv before them: swish / SiLU (EfficientNet; TFLite: ``LOGISTIC`` then
``MUL(x, sigmoid(x))``), hard-swish (MobileNetV3; ``HARD_SWISH``) and sigmoid (``LOGISTIC``).

On the device the forward pass is TFLite's builtin int8 ops, and the backward pass of the
real gradient is ``dx = g * table[q + 128]`` (``DGST_ACTIVATION_GRAD``), ``q`` the saved int8
input code and ``table`` the activation's derivative at the 256 dequantized inputs
``s * (q - z)`` (float32, computed here at export time: `derivative_table`). The Keras int8
simulation (`Int8Activation`) does the same: its forward pass is the 256-entry table of
output codes that TFLite's reference kernels compute for the 256 input codes
(`forward_table`; an int8 elementwise op is a function of its input code alone), its
backward pass the same float32 product.

    table = derivative_table("hard_swish", scale=0.05, zero_point=-10)   # float32 [256]
    codes = forward_table("swish", [(0.05, -10), (1 / 256, -128), (0.03, -118)])
"""
from __future__ import annotations

import dataclasses

import numpy as np

from dgst_tf.core.keras_compat import keras, tf
from dgst_tf.training.int8_ops import ordered_mul

__all__ = ["TABLE_ACTIVATIONS", "ActivationOps", "find_activations", "activation_derivative",
           "derivative_table", "forward_table", "Int8Activation"]

# Keras activation name -> the activation the table ops compute
TABLE_ACTIVATIONS = {"swish": "swish", "silu": "swish", "sigmoid": "sigmoid",
                     "hard_swish": "hard_swish", "hard_silu": "hard_swish"}
_CODES = np.arange(-128, 128, dtype=np.int32)


@dataclasses.dataclass(frozen=True)
class ActivationOps:
    """The converted ops of one activation: its ``kind`` (swish, hard_swish, sigmoid), the
    op indices (``LOGISTIC``, ``MUL`` / ``HARD_SWISH`` / ``LOGISTIC``), and the int8 tensors
    it reads (``input``), computes on the way (``inner``: the sigmoid of a swish) and writes
    (``output``)."""

    kind: str
    ops: tuple
    input: int
    output: int
    inner: tuple = ()


def find_activations(kinds, inputs, outputs, consumers, fused) -> dict:
    """{op index: `ActivationOps`} for every ``HARD_SWISH`` and ``LOGISTIC`` op of a
    converted graph, keyed by each of its ops. ``kinds[i]``: op i's builtin name;
    ``inputs[i]`` / ``outputs[i]``: its tensors; ``consumers[t]``: the ops reading tensor t;
    ``fused[i]``: op i's fused activation code. A ``LOGISTIC`` whose output only a
    ``MUL`` of its own input (no fused activation) reads is a swish."""
    found = {}
    for index, kind in enumerate(kinds):
        if kind == "HARD_SWISH":
            found[index] = ActivationOps("hard_swish", (index,), int(inputs[index][0]),
                                         int(outputs[index][0]))
        elif kind == "LOGISTIC":
            x, s = int(inputs[index][0]), int(outputs[index][0])
            readers = list(consumers.get(s, ()))
            mul = readers[0] if len(readers) == 1 else None
            if (mul is not None and kinds[mul] == "MUL" and not fused[mul]
                    and sorted(int(t) for t in inputs[mul][:2]) == sorted((x, s))):
                pattern = ActivationOps("swish", (index, mul), x, int(outputs[mul][0]), (s,))
                found[index] = found[mul] = pattern
            else:
                found[index] = ActivationOps("sigmoid", (index,), x, s)
    return found


def activation_derivative(kind: str, x) -> np.ndarray:
    """f'(x) in float64 of ``kind`` (swish ``x sigmoid(x)``, hard-swish ``x relu6(x + 3) /
    6``, sigmoid), with TensorFlow's choice at the kinks of hard-swish: 0 at x = -3, 1 at
    x = 3 (ReLU6's gradient is 0 at 0 and at 6)."""
    x = np.asarray(x, np.float64)
    if kind == "swish":
        s = 1.0 / (1.0 + np.exp(-x))
        return s * (1.0 + x * (1.0 - s))
    if kind == "sigmoid":
        s = 1.0 / (1.0 + np.exp(-x))
        return s * (1.0 - s)
    if kind == "hard_swish":
        return np.where(x <= -3.0, 0.0, np.where(x >= 3.0, 1.0, (2.0 * x + 3.0) / 6.0))
    raise ValueError(f"activation_derivative: unknown activation {kind!r} (swish, "
                     f"hard_swish, sigmoid)")


def derivative_table(kind: str, scale: float, zero_point: int) -> np.ndarray:
    """float32 [256]: entry ``q + 128`` is f'(x) at the dequantized input ``x = s * (q - z)``
    (float32, as TensorFlow dequantizes) of int8 code q. Example::

        derivative_table("swish", 0.05, -10)[-10 + 128]    # f'(0) = 0.5
    """
    x = np.float32(scale) * (_CODES - int(zero_point)).astype(np.float32)
    return activation_derivative(kind, x).astype(np.float32)


def forward_table(kind: str, quantizations) -> np.ndarray:
    """int8 [256]: the output code TFLite's reference kernels (``BUILTIN_REF``; TFLM's are
    the same) compute for each input code -128..127 of activation ``kind``.
    ``quantizations``: (scale, zero point) of the input, [the sigmoid of a swish,] the
    output."""
    from dgst_tf.core.tflite_builder import ModelBuilder, schema
    from dgst_tf.core.tflite_reference import builtin_ref_outputs

    ops = {"swish": ("LOGISTIC", "MUL"), "hard_swish": ("HARD_SWISH",),
           "sigmoid": ("LOGISTIC",)}[kind]
    if len(quantizations) != len(ops) + 1:
        raise ValueError(f"forward_table: {kind} needs {len(ops) + 1} quantizations, got "
                         f"{len(quantizations)}")
    builder = ModelBuilder("dgst-tf activation table")
    tensors = [builder.add_tensor(f"t{i}", (1, 256), np.int8, scale=float(s),
                                  zero_point=int(z)) for i, (s, z) in enumerate(quantizations)]
    for position, op in enumerate(ops):
        if op == "MUL":
            options = schema.MulOptionsT()
            builder.add_builtin_op(schema.BuiltinOperator.MUL, [tensors[0], tensors[1]],
                                   [tensors[2]], schema.BuiltinOptions.MulOptions, options)
        else:
            builder.add_builtin_op(getattr(schema.BuiltinOperator, op), [tensors[position]],
                                   [tensors[position + 1]])
    data = builder.build(inputs=[tensors[0]], outputs=[tensors[-1]])
    return builtin_ref_outputs(data, [_CODES.astype(np.int8)[None]])[0][0]


class Int8Activation(keras.layers.Layer):
    """An int8 activation on centered codes ``c = q - z`` (see the module doc): forward the
    output codes of ``forward_codes`` (int8 [256], `forward_table`) minus the output zero
    point; backward ``g * derivatives[q + 128]`` in float32 (``DGST_ACTIVATION_GRAD``).

        y = Int8Activation(codes, derivative_table("swish", s, z), z, z_out)(x)
    """

    def __init__(self, forward_codes, derivatives, input_zero_point: int,
                 output_zero_point: int, **kwargs):
        super().__init__(trainable=False, **kwargs)
        self.forward_codes = np.asarray(forward_codes, np.int32)
        self.derivatives = np.asarray(derivatives, np.float32)
        self.input_zero_point = int(input_zero_point)
        self.output_zero_point = int(output_zero_point)
        if self.forward_codes.shape != (256,) or self.derivatives.shape != (256,):
            raise ValueError(f"{self.name}: forward_codes and derivatives need 256 entries")

    def call(self, x):
        centered = tf.constant((self.forward_codes - self.output_zero_point).astype(np.float32))
        derivatives = tf.constant(self.derivatives)

        @tf.custom_gradient
        def activation(c):
            index = tf.cast(c, tf.int32) + (self.input_zero_point + 128)
            slope = tf.gather(derivatives, index)

            def grad(g):
                # C's g * (+-0) is a zero with the sign of the product; MulNoNan's is +0
                sign = tf.bitwise.bitwise_xor(tf.bitcast(g, tf.uint32),
                                              tf.bitcast(slope, tf.uint32))
                signed_zero = tf.bitcast(tf.bitwise.bitwise_and(
                    sign, tf.constant(0x80000000, tf.uint32)), tf.float32)
                return tf.where(slope == 0, signed_zero, ordered_mul(g, slope))

            return tf.gather(centered, index), grad

        return activation(x)

    def get_config(self):
        return {**super().get_config(), "forward_codes": self.forward_codes.tolist(),
                "derivatives": self.derivatives.tolist(),
                "input_zero_point": self.input_zero_point,
                "output_zero_point": self.output_zero_point}
