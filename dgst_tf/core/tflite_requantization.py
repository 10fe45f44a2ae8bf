"""TFLite's int8 requantization constants, computed from the scales as TFLite Micro's kernels
compute them at Prepare time (double precision from the float32 scales):

- `quantize_multiplier`: ``QuantizeMultiplier`` (``real ~= multiplier * 2**(shift - 31)``);
- `activation_range`: ``CalculateActivationRangeQuantized`` (the codes a fused NONE / RELU /
  RELU6 output is clamped to);
- `conv_multipliers`: conv / depthwise / fully-connected per-channel ``input_scale *
  filter_scale / output_scale`` (``PopulateConvolutionQuantizationParams``);
- `add_multipliers`: the int8 ADD's (left shift 20, ``CalculateOpDataAdd``);
- `mean_multiplier`: the int8 MEAN's, with the ``1 / count`` folded in as
  ``QuantizedMeanOrSum`` does.

Pure Python (no TensorFlow): the block fusion of the exporter and the Keras int8 simulation
(`dgst_tf.training.int8_ops`) share it::

    multiplier, shift = quantize_multiplier(0.75)            # (1610612736, 0)
    low, high = activation_range(RELU6, 6.0 / 255, -128)      # (-128, 127)
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["NONE", "RELU", "RELU6", "ADD_LEFT_SHIFT", "round_half_away", "quantize_multiplier",
           "activation_range", "conv_multipliers", "add_multipliers", "mean_multiplier"]

NONE, RELU, RELU6 = 0, 1, 3  # TFLite fused activation codes
ADD_LEFT_SHIFT = 20  # int8 ADD: inputs are shifted left by 20 bits before rescaling


def round_half_away(x: float) -> int:
    """C ``round``: half away from zero."""
    return int(math.floor(abs(x) + 0.5)) * (1 if x >= 0 else -1)


def quantize_multiplier(real: float) -> tuple[int, int]:
    """TFLite's ``QuantizeMultiplier``: ``real ~= multiplier * 2**(shift - 31)`` with an int32
    ``multiplier`` in [2**30, 2**31) (0 for 0). ``quantize_multiplier(0.75) == (1610612736, 0)``."""
    if real == 0.0:
        return 0, 0
    fraction, shift = math.frexp(real)
    fixed = round_half_away(fraction * (1 << 31))
    if fixed == 1 << 31:
        fixed //= 2
        shift += 1
    if shift < -31:
        return 0, 0
    return int(fixed), int(shift)


def activation_range(activation: int, scale: float, zero_point: int) -> tuple[int, int]:
    """TFLite's ``CalculateActivationRangeQuantized`` for an int8 output (float32 division,
    round half away from zero): the codes a fused NONE / RELU / RELU6 output is clamped to."""
    def code(value):
        return int(zero_point) + round_half_away(float(np.float32(value) / np.float32(scale)))
    if activation == NONE:
        return -128, 127
    if activation == RELU:
        return max(-128, code(0.0)), 127
    if activation == RELU6:
        return max(-128, code(0.0)), min(127, code(6.0))
    raise ValueError(f"activation_range: fused activation {activation} is not NONE, RELU or "
                     f"RELU6")


def conv_multipliers(input_scale, weight_scales, output_scale) -> tuple[np.ndarray, np.ndarray]:
    """int64 (multipliers, shifts), one per output channel, of a conv / depthwise conv /
    fully-connected layer: ``QuantizeMultiplier(s_x * s_w[o] / s_y)``."""
    pairs = [quantize_multiplier(float(np.float32(input_scale)) * float(np.float32(s))
                                 / float(np.float32(output_scale)))
             for s in np.ravel(weight_scales)]
    return (np.array([m for m, _ in pairs], np.int64), np.array([s for _, s in pairs], np.int64))


def add_multipliers(scale_1, scale_2, output_scale) -> dict:
    """The int8 ADD's multipliers and shifts (``CalculateOpDataAdd``): inputs are shifted
    left by `ADD_LEFT_SHIFT`, rescaled by ``s_i / (2 max(s_1, s_2))``, summed, and the sum by
    ``2 max(s_1, s_2) / (2**20 s_out)``. Keys: ``input_1``, ``input_2``, ``output``, each a
    (multiplier, shift) pair."""
    s1, s2, so = (float(np.float32(s)) for s in (scale_1, scale_2, output_scale))
    twice_max = 2.0 * max(s1, s2)
    pairs = {"input_1": quantize_multiplier(s1 / twice_max),
             "input_2": quantize_multiplier(s2 / twice_max),
             "output": quantize_multiplier(twice_max / ((1 << ADD_LEFT_SHIFT) * so))}
    if any(shift > 0 for _, shift in pairs.values()):
        raise ValueError(f"add_multipliers: scales {s1}, {s2} -> {so} need a multiplier >= 1, "
                         f"which TFLite's int8 ADD refuses")
    return pairs


def mean_multiplier(input_scale, output_scale, count: int) -> tuple[int, int]:
    """(multiplier, shift) of the int8 MEAN over ``count`` elements (``QuantizedMeanOrSum``):
    ``QuantizeMultiplier(s_in / s_out)`` with ``1 / count`` folded into the multiplier by an
    integer division after a left shift of floor(log2(count)) (at most 32, and at most
    31 + shift)."""
    multiplier, shift = quantize_multiplier(float(np.float32(input_scale))
                                            / float(np.float32(output_scale)))
    extra = min(int(count).bit_length() - 1, 32, 31 + shift)
    return (multiplier << extra) // int(count), shift - extra
