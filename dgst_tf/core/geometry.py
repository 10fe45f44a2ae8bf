"""Convolution geometry along one axis, and how many channels a ratio keeps: pure Python,
no TensorFlow (the NumPy kernel reference and the firmware tools use it too).

    from dgst_tf.core.geometry import conv_axis, channels_for_ratio

    conv_axis(size=7, kernel=3, stride=2, padding="same")   # AxisGeometry(out=4, before=1, after=1)
    channels_for_ratio(0.25, 96)                             # 24

TFLite's (and TensorFlow's) ``SAME`` puts the odd padding pixel after the image.
"""
from __future__ import annotations

from typing import NamedTuple

__all__ = ["AxisGeometry", "conv_axis", "same_pad_before", "channels_for_ratio"]


class AxisGeometry(NamedTuple):
    """Output size and the zero padding before and after the input along one axis."""

    out: int
    before: int
    after: int


def conv_axis(size: int, kernel: int, stride: int = 1, dilation: int = 1,
              padding: str = "same") -> AxisGeometry:
    """Output size and padding of a convolution along one axis (``same`` or ``valid``)."""
    effective = (kernel - 1) * dilation + 1
    mode = str(padding).lower()
    if mode == "valid":
        return AxisGeometry((size - effective) // stride + 1, 0, 0)
    if mode != "same":
        raise ValueError(f"padding must be 'same' or 'valid', got {padding!r}")
    out = -(-size // stride)
    total = max((out - 1) * stride + effective - size, 0)
    return AxisGeometry(out, total // 2, total - total // 2)


def same_pad_before(size: int, out: int, kernel: int, stride: int = 1, dilation: int = 1) -> int:
    """Padding before the input of a ``SAME`` conv whose output size ``out`` is given."""
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2


def channels_for_ratio(ratio: float, channels: int) -> int:
    """How many of ``channels`` a ratio keeps: round(ratio * channels), at least 1, at most all.

        channels_for_ratio(0.25, 96)  # 24
    """
    return max(1, min(channels, int(round(ratio * channels))))


def extra_taps_for_same(size: int, out: int, kernel: int, stride: int, dilation: int,
                        pad_before: int) -> int | None:
    """Zero taps to append to a kernel along one axis so that SAME padding equals an
    explicit ``pad_before`` (a PAD op folded into its convolution), or None. Example::

        extra_taps_for_same(9, 5, 3, 2, 1, pad_before=1)  # 0: SAME already pads 1 before
    """
    if -(-size // stride) != out:
        return None
    for extra in range(0, 3):
        if (same_pad_before(size, out, kernel + extra, stride, dilation) == pad_before
                and (dilation == 1 or extra == 0)):
            return extra
    return None
