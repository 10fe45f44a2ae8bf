"""NumPy reference of the dgst-tf training kernels (tflm_ops/core/dgst_train_kernels.h).

    from dgst_tf.tflm_ops import reference as R

    g = R.Geometry.conv(16, 16, 3, stride=2)            # TFLite SAME geometry
    kept = R.top_k_channels(w, k=4)                     # channels by weight L2 norm
    grad = R.conv2d_weight_grad(g, x[..., kept], -128, dy)

Each function computes exactly what the C core computes, in the same float32 order where
floats are involved, so that the C results can be compared bit for bit (the one exception
is the softmax, whose ``expf``/``logf`` differ between C libraries: compare it within a
tolerance). Layouts follow TFLite: activations ``[H, W, C]`` (batch 1), Conv2D filters
OHWI ``[C_out, K_h, K_w, C_in]``, depthwise filters ``[1, K_h, K_w, C]`` (or
``[K_h, K_w, C]``).

The chain is intentional: the Keras training step (dgst_tf.training, float, TensorFlow
autodiff) is the model of the algorithm; this module restates it in the int8 arithmetic of
the device and is the single oracle of the C kernels (tests/test_kernels_host.py,
tests/test_tflm_train_ops.py and the firmware vectors of mcu/gen_vectors.py compare the C
with it bit for bit; the tests also compare it with TensorFlow's float gradients). The C is
never compared with Keras directly, so a kernel change is checked against one definition.

Imports only NumPy and the TensorFlow-free `dgst_tf.core.geometry`: the MCU vector
generator and the tests use it without TensorFlow.
"""
import dataclasses

import numpy as np

from dgst_tf.core.geometry import conv_axis

F32 = np.float32

# The order of the fields of dgst_conv_geometry.
GEOMETRY_FIELDS = ("in_h", "in_w", "out_h", "out_w", "kernel_h", "kernel_w", "stride_h",
                   "stride_w", "dilation_h", "dilation_w", "pad_top", "pad_left")


@dataclasses.dataclass(frozen=True)
class Geometry:
    """``dgst_conv_geometry``: batch-1 2-D convolution with explicit top/left padding."""

    in_h: int
    in_w: int
    out_h: int
    out_w: int
    kernel_h: int
    kernel_w: int
    stride_h: int = 1
    stride_w: int = 1
    dilation_h: int = 1
    dilation_w: int = 1
    pad_top: int = 0
    pad_left: int = 0

    @classmethod
    def conv(cls, in_h: int, in_w: int, kernel_h: int, kernel_w: int | None = None,
             stride: int | tuple = 1, dilation: int | tuple = 1,
             padding: str = "same") -> "Geometry":
        """TFLite ``SAME`` / ``VALID`` geometry (SAME puts the odd padding pixel last)."""
        kernel_w = kernel_h if kernel_w is None else kernel_w
        sh, sw = (stride, stride) if np.isscalar(stride) else stride
        dh, dw = (dilation, dilation) if np.isscalar(dilation) else dilation
        rows = conv_axis(in_h, kernel_h, sh, dh, padding)
        cols = conv_axis(in_w, kernel_w, sw, dw, padding)
        return cls(in_h, in_w, rows.out, cols.out, kernel_h, kernel_w, sh, sw, dh, dw,
                   rows.before, cols.before)

    def astuple(self) -> tuple:
        return tuple(int(getattr(self, f)) for f in GEOMETRY_FIELDS)

    def tap_rect(self, i: int, j: int):
        """Output rows/cols whose tap (i, j) reads inside the image, and the input slices.

        Returns ``(oy_slice, ox_slice, iy_slice, ix_slice)`` or None when empty.
        """
        oy = _out_range(i * self.dilation_h - self.pad_top, self.stride_h, self.in_h, self.out_h)
        ox = _out_range(j * self.dilation_w - self.pad_left, self.stride_w, self.in_w,
                        self.out_w)
        if oy[0] >= oy[1] or ox[0] >= ox[1]:
            return None
        iy0 = oy[0] * self.stride_h - self.pad_top + i * self.dilation_h
        ix0 = ox[0] * self.stride_w - self.pad_left + j * self.dilation_w
        iy = slice(iy0, iy0 + (oy[1] - oy[0] - 1) * self.stride_h + 1, self.stride_h)
        ix = slice(ix0, ix0 + (ox[1] - ox[0] - 1) * self.stride_w + 1, self.stride_w)
        return slice(*oy), slice(*ox), iy, ix

    def taps_inside(self):
        """``(i, j, (oy, ox, iy, ix))`` of every tap that reads inside the image, in (i, j)
        order (the kernels' summation order); taps that only read padding are left out.

        >>> g = Geometry(in_h=1, in_w=1, out_h=1, out_w=1, kernel_h=3, kernel_w=1, pad_top=1)
        >>> [(i, j) for i, j, _ in g.taps_inside()]
        [(1, 0)]
        """
        for i in range(self.kernel_h):
            for j in range(self.kernel_w):
                rect = self.tap_rect(i, j)
                if rect is not None:
                    yield i, j, rect


def _out_range(tap_offset: int, stride: int, in_size: int, out_size: int) -> tuple[int, int]:
    """Output indices [lo, hi) with 0 <= o * stride + tap_offset < in_size."""
    lo = max(_ceil_div(-tap_offset, stride), 0)
    hi = min((in_size - 1 - tap_offset) // stride + 1, out_size)
    return lo, max(hi, lo)


def _ceil_div(a: int, b: int) -> int:
    return -((-a) // b)


def round_half_away(x: np.ndarray) -> np.ndarray:
    """C99 ``roundf``: round half away from zero, exact in float32 (no ``x + 0.5``)."""
    x = np.asarray(x)
    t = np.trunc(x)
    frac = x - t  # exact
    return t + (frac >= 0.5) - (frac <= -0.5)


def _dw_filter(w: np.ndarray) -> np.ndarray:
    w = np.asarray(w)
    return w[0] if w.ndim == 4 else w


# ----------------------------------------------------------------------------- gradients
def conv2d_weight_grad(g: Geometry, x_kept: np.ndarray, x_zero_point: int,
                       dy: np.ndarray) -> np.ndarray:
    """int32 ``[C_out, K_h, K_w, k]``: sum over output pixels of dy * (x_kept - zp)."""
    x = x_kept.astype(np.int64) - int(x_zero_point)
    d = dy.astype(np.int64)
    grad = np.zeros((dy.shape[-1], g.kernel_h, g.kernel_w, x.shape[-1]), np.int64)
    for i, j, (oy, ox, iy, ix) in g.taps_inside():
        grad[:, i, j, :] = np.einsum("hwo,hwc->oc", d[oy, ox], x[iy, ix])
    return _to_int32(grad)


def depthwise_weight_grad(g: Geometry, x_kept: np.ndarray, kept, x_zero_point: int,
                          dy: np.ndarray) -> np.ndarray:
    """int32 ``[K_h, K_w, k]``; channel c of x_kept is channel kept[c] of dy."""
    kept = np.asarray(kept, np.int64)
    x = x_kept.astype(np.int64) - int(x_zero_point)
    d = dy.astype(np.int64)[:, :, kept]
    grad = np.zeros((g.kernel_h, g.kernel_w, len(kept)), np.int64)
    for i, j, (oy, ox, iy, ix) in g.taps_inside():
        grad[i, j] = (d[oy, ox] * x[iy, ix]).sum(axis=(0, 1))
    return _to_int32(grad)


def bias_grad(dy: np.ndarray) -> np.ndarray:
    """int32 ``[C]``: sum of dy over pixels."""
    return _to_int32(dy.reshape(-1, dy.shape[-1]).astype(np.int64).sum(axis=0))


def conv2d_input_grad(g: Geometry, dy: np.ndarray, dy_scale: float, w: np.ndarray,
                      weight_scale: np.ndarray) -> np.ndarray:
    """float32 ``[H_in, W_in, C_in]`` in the kernel's summation order (bit-exact)."""
    c_out, _, _, c_in = w.shape
    ws = np.asarray(weight_scale, F32)
    dx = np.zeros((g.in_h, g.in_w, c_in), F32)
    dyf = dy.astype(F32)
    wf_all = w.astype(F32)
    for i, j, (oy, ox, iy, ix) in g.taps_inside():
        acc = dx[iy, ix]  # a view: updated in place
        for o in range(c_out):
            wf = ws[o] * wf_all[o, i, j]  # float32 [C_in]
            acc += wf[None, None, :] * dyf[oy, ox, o][:, :, None]
    return (F32(dy_scale) * dx).astype(F32)


def depthwise_input_grad(g: Geometry, dy: np.ndarray, dy_scale: float, w: np.ndarray,
                         weight_scale: np.ndarray) -> np.ndarray:
    """float32 ``[H_in, W_in, C]``: exact int32 sum, then dy_scale * (ws[c] * acc)."""
    w = _dw_filter(w).astype(np.int64)
    acc = np.zeros((g.in_h, g.in_w, dy.shape[-1]), np.int64)
    d = dy.astype(np.int64)
    for i, j, (oy, ox, iy, ix) in g.taps_inside():
        acc[iy, ix] += d[oy, ox] * w[i, j]
    acc = _to_int32(acc)
    return (F32(dy_scale) * (np.asarray(weight_scale, F32) * acc.astype(F32))).astype(F32)


# ----------------------------------------------------------------------------- pointwise
def build_mask(y: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """uint8 bit mask (little-endian bit order), set where lo < y < hi."""
    y = np.asarray(y).reshape(-1).astype(np.int32)
    return np.packbits((y > lo) & (y < hi), bitorder="little")


def apply_mask(g: np.ndarray, mask: np.ndarray) -> np.ndarray:
    g = np.asarray(g, F32).reshape(-1)
    bits = np.unpackbits(np.asarray(mask, np.uint8), bitorder="little")[: g.size].astype(bool)
    return np.where(bits, g, F32(0.0)).astype(F32)


def activation_grad(g: np.ndarray, x: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Backward of an int8 elementwise activation: ``g * table[x + 128]`` in float32
    (``table``: the 256 derivatives at the input codes, `dgst_tf.training.int8_activations`)."""
    g = np.asarray(g, F32).reshape(-1)
    index = np.asarray(x, np.int8).reshape(-1).astype(np.int32) + 128
    return (g * np.asarray(table, F32)[index]).astype(F32)


def quantize_grad(g: np.ndarray) -> tuple[np.ndarray, np.float32]:
    """(int8 codes, float32 scale): scale = max|g| / 127 (1 if all 0), round half away."""
    g = np.asarray(g, F32).reshape(-1)
    m = F32(np.abs(g).max()) if g.size else F32(0.0)
    scale = F32(m / F32(127.0)) if m > 0 else F32(1.0)
    q = np.clip(g / scale, F32(-127.0), F32(127.0))
    return round_half_away(q).astype(np.int8), scale


def softmax_xent_grad(logits: np.ndarray, scale: float, zero_point: int,
                      label: int) -> tuple[float, np.ndarray]:
    """(loss, grad) in float64 (compare C within float32 tolerance)."""
    z = float(scale) * (np.asarray(logits, np.float64) - zero_point)
    z -= z.max()
    p = np.exp(z) / np.exp(z).sum()
    grad = p.copy()
    grad[label] -= 1.0
    return float(-np.log(p[label])), grad


def gather_channels(x: np.ndarray, kept) -> np.ndarray:
    """int8 ``x[..., kept]``: the saved input of a sparsely updated layer."""
    return np.ascontiguousarray(np.asarray(x)[..., np.asarray(kept, np.int64)])


def scatter_channels(base: np.ndarray, src: np.ndarray, kept) -> np.ndarray:
    """``base`` with ``out[..., kept[j]] = src[..., j]`` (int8)."""
    out = np.array(base, np.int8)
    out[..., np.asarray(kept, np.int64)] = src
    return out


# --------------------------------------------------------------- forward: fused block
def multiply_by_quantized_multiplier(x: np.ndarray, multiplier, shift) -> np.ndarray:
    """TFLite's reference requantization (double rounding), elementwise over int64 arrays;
    ``multiplier``/``shift`` broadcast (per channel on the last axis)."""
    x = np.asarray(x, np.int64)
    m = np.asarray(multiplier, np.int64)
    shift = np.asarray(shift, np.int64)
    left, right = np.maximum(shift, 0), np.maximum(-shift, 0)
    a = ((x << left) + 2**31) % 2**32 - 2**31  # int32 wrap of x * 2^left
    ab = a * m
    nudge = np.where(ab >= 0, 1 << 30, 1 - (1 << 30))
    total = ab + nudge
    high = np.where(total >= 0, total >> 31, -((-total) >> 31))  # C division: toward zero
    high = np.where((a == -2**31) & (m == -2**31), 2**31 - 1, high)
    mask = (np.int64(1) << right) - 1
    remainder = high & mask
    threshold = (mask >> 1) + (high < 0)
    return (high >> right) + (remainder > threshold)


@dataclasses.dataclass(frozen=True)
class RequantStage:
    """One stage of ``dgst_fused_block_s8`` (``dgst_requant_params``)."""

    weights: np.ndarray  # conv OHWI, depthwise [1, KH, KW, C]
    bias: np.ndarray
    multiplier: np.ndarray
    shift: np.ndarray
    input_offset: int
    output_offset: int
    act_min: int = -128
    act_max: int = 127


def _int8_conv(x, w, stage: RequantStage, stride, pad, out_hw, depthwise: bool):
    """TFLite's int8 per-channel conv / depthwise conv (reference kernels), batch 1."""
    kh, kw = w.shape[1], w.shape[2]
    h, wd = x.shape[0], x.shape[1]
    xs = x.astype(np.int64) + stage.input_offset
    acc = np.zeros((*out_hw, w.shape[3] if depthwise else w.shape[0]), np.int64)
    for i in range(kh):
        for j in range(kw):
            for oy in range(out_hw[0]):
                iy = oy * stride[0] - pad[0] + i
                if not 0 <= iy < h:
                    continue
                ox = np.arange(out_hw[1])
                ix = ox * stride[1] - pad[1] + j
                ok = (ix >= 0) & (ix < wd)
                patch = xs[iy, ix[ok]]  # [n, C_in]
                if depthwise:
                    acc[oy, ox[ok]] += patch * w[0, i, j].astype(np.int64)
                else:
                    acc[oy, ox[ok]] += patch @ w[:, i, j, :].astype(np.int64).T
    out = multiply_by_quantized_multiplier(acc + stage.bias, stage.multiplier, stage.shift)
    return np.clip(out + stage.output_offset, stage.act_min, stage.act_max).astype(np.int8)


def fused_block(x: np.ndarray, conv: RequantStage, dw: RequantStage, project: RequantStage,
                conv_stride, conv_pad, mid_hw, dw_stride, dw_pad, out_hw) -> np.ndarray:
    """What ``dgst_fused_block_s8`` computes: three TFLite int8 convolutions in a row (conv,
    depthwise, 1x1 projection), here materialized whole. ``x``: ``[H, W, C]``; strides and
    (top, left) paddings as pairs; ``mid_hw``/``out_hw``: the conv / depthwise output sizes."""
    mid = _int8_conv(x, conv.weights, conv, conv_stride, conv_pad, mid_hw, False)
    d = _int8_conv(mid, dw.weights, dw, dw_stride, dw_pad, out_hw, True)
    return _int8_conv(d, project.weights, project, (1, 1), (0, 0), out_hw, False)


def fused_block_case(rng, x_shape, conv_spec, dw_spec, c_out):
    """Random tensors for `fused_block` (tests and MCU vectors): ``x_shape`` (H, W, C_in),
    ``conv_spec`` (C_mid, K, stride), ``dw_spec`` (K, stride), SAME padding. Returns
    (x, [conv, dw, project] stages, keyword arguments of `fused_block`)."""
    h, w, c_in = x_shape
    c_mid, k1, s1 = conv_spec
    k2, s2 = dw_spec
    g1 = Geometry.conv(h, w, k1, stride=s1)
    g2 = Geometry.conv(g1.out_h, g1.out_w, k2, stride=s2)
    zps = [int(z) for z in rng.integers(-20, 20, 4)]
    shapes = [(c_mid, k1, k1, c_in), (1, k2, k2, c_mid), (c_out, 1, 1, c_mid)]
    stages = []
    for n, shape in enumerate(shapes):
        channels = shape[3] if n == 1 else shape[0]
        fan_in = shape[1] * shape[2] * (1 if n == 1 else shape[3])
        shift = -(6 + int(np.ceil(np.log2(np.sqrt(fan_in)))))  # a spread of ~50 codes
        stages.append(RequantStage(
            rng.integers(-127, 128, shape).astype(np.int8),
            rng.integers(-3000, 3000, channels).astype(np.int32),
            rng.integers(2**30, 2**31, channels).astype(np.int32),
            np.full(channels, shift, np.int32),
            -zps[n], zps[n + 1], -128 if n == 2 else zps[n + 1], 127 if n == 2 else 110))
    geometry = dict(conv_stride=(s1, s1), conv_pad=(g1.pad_top, g1.pad_left),
                    mid_hw=(g1.out_h, g1.out_w), dw_stride=(s2, s2),
                    dw_pad=(g2.pad_top, g2.pad_left), out_hw=(g2.out_h, g2.out_w))
    return rng.integers(-128, 128, x_shape).astype(np.int8), stages, geometry


def select_window(step: int, c_in: int, k: int) -> np.ndarray:
    """int32 [k]: the window of k channels from (step * k) mod c_in, wrapping, sorted
    (policy "window"; called "traversal" by graphs written before DGSU traversal)."""
    start = (int(step) * int(k)) % int(c_in)
    return np.sort((start + np.arange(k)) % c_in).astype(np.int32)


SCORE_MULTIPLIER_BITS = 16


def score_multipliers(weight_scale) -> np.ndarray:
    """int32 m[o] = round(2^16 * s[o]^2 / max s^2) (half away from zero, float64): the
    per-output-channel weights of the integer channel importance, fixed at export.

        score_multipliers([0.02, 0.01])   # array([65536, 16384], dtype=int32)
    """
    s = np.asarray(weight_scale, np.float32).astype(np.float64)
    top = float(np.max(s * s)) if s.size else 0.0
    if top <= 0.0:
        return np.zeros(s.shape, np.int32)
    return round_half_away((2.0 ** SCORE_MULTIPLIER_BITS) * (s * s) / top).astype(np.int32)


def channel_scores(w: np.ndarray, multiplier, depthwise: bool = False) -> np.ndarray:
    """int64 [c_in]: the integer importance of each input channel (DGSU selection),
    ``score[c] = sum_o m[o] * sum_t w[o, t, c]^2`` (``w`` OHWI or [c_out, c_in]) or, with
    ``depthwise`` (``w`` [1, kh, kw, C] / [kh, kw, C]), ``score[c] = m[c] * sum_t w[t, c]^2``.

        channel_scores(w, score_multipliers(weight_scale))
    """
    m = np.asarray(multiplier, np.int64)
    if depthwise:
        taps = _dw_filter(w).reshape(-1, np.shape(w)[-1]).astype(np.int64)
        return (taps * taps).sum(axis=0) * m
    c_out = np.shape(w)[0]
    q = np.asarray(w, np.int64).reshape(c_out, -1, np.shape(w)[-1])
    return ((q * q).sum(axis=1) * m[:, None]).sum(axis=0)


def select_ranked(scores, k: int, visited=None, active: bool = True):
    """(kept int32 [k] sorted, new visited bitmask or None): DGSU's ranking (Li & Chang
    2024). ``visited``: uint8 bitmask of len(scores) bits (bit c of byte c // 8; policy
    "traversal") or None (policy "magnitude"). If every channel is visited the mask is
    cleared (a new sweep); not-yet-visited channels rank first, then visited ones; within a
    group by score descending; ties to the lower index; the first k are kept and marked.
    ``active=False`` (a layer the layer schedule, `layer_active`, leaves out this step): the
    same choice, but nothing is marked (its weights are not updated).

        kept, mask = select_ranked(channel_scores(w, m), 4, np.zeros(2, np.uint8))
    """
    scores = np.asarray(scores)
    c_in = len(scores)
    fresh = np.zeros(c_in, bool)
    if visited is not None:
        bits = np.unpackbits(np.asarray(visited, np.uint8), bitorder="little")[:c_in].astype(bool)
        if bits.all():
            bits[:] = False
        fresh = ~bits
    order = np.lexsort((np.arange(c_in), -scores.astype(np.float64) if scores.dtype.kind == "f"
                        else -scores.astype(np.int64), ~fresh))
    kept = np.sort(order[:k]).astype(np.int32)
    if visited is None:
        return kept, None
    bits = ~fresh
    if active:
        bits[kept] = True
    mask = np.packbits(np.concatenate([bits, np.zeros(-c_in % 8, bool)]), bitorder="little")
    return kept, mask.astype(np.uint8)


def select_channels(w: np.ndarray, multiplier, k: int, depthwise: bool = False,
                    visited=None, active: bool = True):
    """One step of DGST_SELECT_CHANNELS with integer importance: `select_ranked` of
    `channel_scores` (policy "traversal" with a ``visited`` mask, "magnitude" without)."""
    return select_ranked(channel_scores(w, multiplier, depthwise), k, visited, active)


def layer_active(step, layer: int, layers: int, per_step: int | None):
    """Whether weight-updated layer ``layer`` (0-based, of ``layers``, in the model's
    execution order, classifier excluded) updates its weights at training step ``step``
    (0 for the first) when only ``per_step`` of them do per step (DGSU's stage-aware layer
    choice; Li & Chang 2024 do not publish theirs, this is the project's): the layers take
    turns, ``per_step`` at a time, in order, wrapping:

        active  <=>  (layer - step * per_step) mod layers  <  per_step      (mod >= 0)

    so step s updates layers s*n, s*n+1, ..., s*n+n-1 (mod layers) and every layer
    updates ``per_step`` times every ``layers`` steps. ``per_step`` None or >= ``layers``:
    always active. The others still train their biases. The one definition of the rule:
    ``dgst_layer_active`` in tflm_ops/core (the device's step is the uint32 ``sgd/step``:
    equal for steps < 2^32) and `DynamicChannelSelection` (which calls this function on its
    int64 TensorFlow step) compute exactly this. Works elementwise on NumPy arrays and on
    TensorFlow tensors (only arithmetic operators).

        [layer_active(s, 1, 3, 1) for s in range(4)]   # [False, True, False, False]
    """
    if per_step is None:
        return True
    if not 0 <= int(layer) < int(layers) or int(per_step) < 1:
        raise ValueError(f"layer schedule: need 0 <= layer < layers and per_step >= 1, got "
                         f"layer {layer}, layers {layers}, per_step {per_step}")
    if per_step >= layers:
        return True
    return (layer - step * per_step) % layers < per_step


def select_magnitude(w: np.ndarray, weight_scale, k: int, depthwise: bool = False):
    """int32 [k]: top-k channels by float32 sum of (scale * w)^2 in the core's order."""
    ws = np.asarray(weight_scale, F32)
    if depthwise:
        taps = _dw_filter(w).reshape(-1, np.shape(w)[-1]).astype(F32)
        real = taps * ws[None, :]
    else:
        c_out = np.shape(w)[0]
        real = (np.asarray(w).reshape(c_out, -1, np.shape(w)[-1]).astype(F32)
                * ws[:, None, None]).reshape(-1, np.shape(w)[-1])
    norms = np.zeros(real.shape[-1], F32)
    for row in real:  # the core's accumulation order
        norms = (norms + (row * row).astype(F32)).astype(F32)
    order = np.lexsort((np.arange(len(norms)), -norms))
    return np.sort(order[:k]).astype(np.int32)


# ----------------------------------------------------------------------------- updates
def _qas_step(factor: np.ndarray, grad: np.ndarray, limit: float) -> np.ndarray:
    v = np.clip(F32(factor) * np.asarray(grad).astype(F32), F32(-limit), F32(limit))
    return round_half_away(v.astype(F32)).astype(np.int64)


def sgd_qas_update_conv(w: np.ndarray, kept, grad: np.ndarray, lr: float, x_scale: float,
                        dy_scale: float, weight_scale: np.ndarray) -> np.ndarray:
    """Updated copy of int8 OHWI ``w``; only ``w[:, :, :, kept]`` changes."""
    w = np.array(w, np.int8)
    kept = np.asarray(kept, np.int64)
    base = F32(F32(lr) * F32(x_scale)) * F32(dy_scale)
    factor = (base / np.asarray(weight_scale, F32)).astype(F32)  # [C_out]
    step = _qas_step(factor[:, None, None, None], grad, 1024.0)
    w[:, :, :, kept] = np.clip(w[:, :, :, kept].astype(np.int64) - step, -127, 127)
    return w


def sgd_qas_update_depthwise(w: np.ndarray, kept, grad: np.ndarray, lr: float,
                             x_scale: float, dy_scale: float,
                             weight_scale: np.ndarray) -> np.ndarray:
    """Updated copy of the int8 depthwise filter (same shape as given)."""
    shape = np.shape(w)
    w = np.array(_dw_filter(w), np.int8)
    kept = np.asarray(kept, np.int64)
    base = F32(F32(lr) * F32(x_scale)) * F32(dy_scale)
    factor = (base / np.asarray(weight_scale, F32)[kept]).astype(F32)  # [k]
    step = _qas_step(factor[None, None, :], grad, 1024.0)
    w[:, :, kept] = np.clip(w[:, :, kept].astype(np.int64) - step, -127, 127)
    return w.reshape(shape)


def _mix32(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.uint32).copy()
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x7FEB352D)  # wraps mod 2^32 (uint32 arrays)
    x ^= x >> np.uint32(15)
    x *= np.uint32(0x846CA68B)
    x ^= x >> np.uint32(16)
    return x


def stochastic_uniform_bits(seed: int, stream: int, step: int, index) -> np.ndarray:
    """uint32 hash bits h of the stochastic-rounding PRNG (the C ``dgst_mix32`` chain):
    h = mix32(mix32(mix32(seed ^ stream * 0x9E3779B9) ^ step) ^ index); u = (h >> 8) * 2^-24.

        u = (stochastic_uniform_bits(0, 7, 3, np.arange(10)) >> 8) * 2.0**-24
    """
    with np.errstate(over="ignore"):
        stream_mul = np.array([stream & 0xFFFFFFFF], np.uint32) * np.uint32(0x9E3779B9)
        key = _mix32(_mix32(np.uint32(seed & 0xFFFFFFFF) ^ stream_mul) ^ np.uint32(step))
        return _mix32(key ^ np.asarray(index, np.int64).astype(np.uint32))


def _stochastic_step(w: np.ndarray, factor, grad, key: tuple, index) -> np.ndarray:
    """clip(w + floor(u - s), -127, 127) with s the clamped float32 step, u from ``index``."""
    s = np.clip(F32(factor) * np.asarray(grad).astype(F32), F32(-1024), F32(1024)).astype(F32)
    u = (stochastic_uniform_bits(*key, index) >> np.uint32(8)).astype(F32) * F32(2.0**-24)
    v = (u - s).astype(F32)
    return np.clip(w.astype(np.int64) + np.floor(v).astype(np.int64), -127, 127)


def sgd_qas_update_conv_sr(w: np.ndarray, kept, grad: np.ndarray, lr: float, x_scale: float,
                           dy_scale: float, weight_scale: np.ndarray, seed: int, stream: int,
                           step: int, index_channels=None, index_c_in: int = 0) -> np.ndarray:
    """`sgd_qas_update_conv` with stochastic rounding (C ``dgst_sgd_qas_update_conv_sr_s8``):
    u at the element's OHWI index ((o*kh + i)*kw + j) * index_c_in + index_channels[c] of the
    full kernel (defaults: ``kept``, the channels of ``w``). Dense: ``w`` [c_out, 1, 1, c_in].
    """
    w = np.array(w, np.int8)
    kept = np.asarray(kept, np.int64)
    c_out, kh, kw, c_in = w.shape
    chans = kept if index_channels is None else np.asarray(index_channels, np.int64)
    base = F32(F32(lr) * F32(x_scale)) * F32(dy_scale)
    factor = (base / np.asarray(weight_scale, F32)).astype(F32)
    rows = np.arange(c_out * kh * kw, dtype=np.int64).reshape(c_out, kh, kw, 1)
    index = rows * (index_c_in or c_in) + chans
    w[:, :, :, kept] = _stochastic_step(w[:, :, :, kept], factor[:, None, None, None],
                                        np.reshape(grad, index.shape), (seed, stream, step),
                                        index)
    return w


def sgd_qas_update_depthwise_sr(w: np.ndarray, kept, grad: np.ndarray, lr: float,
                                x_scale: float, dy_scale: float, weight_scale: np.ndarray,
                                seed: int, stream: int, step: int, index_channels=None,
                                index_c_in: int = 0) -> np.ndarray:
    """`sgd_qas_update_depthwise` with stochastic rounding: u at the 1HWC index
    (i*kw + j) * index_c_in + index_channels[c]."""
    shape = np.shape(w)
    w = np.array(_dw_filter(w), np.int8)
    kept = np.asarray(kept, np.int64)
    kh, kw, channels = w.shape
    chans = kept if index_channels is None else np.asarray(index_channels, np.int64)
    base = F32(F32(lr) * F32(x_scale)) * F32(dy_scale)
    factor = (base / np.asarray(weight_scale, F32)[kept]).astype(F32)
    index = np.arange(kh * kw, dtype=np.int64).reshape(kh, kw, 1) * (index_c_in or channels)
    w[:, :, kept] = _stochastic_step(w[:, :, kept], factor[None, None, :], grad,
                                     (seed, stream, step), index + chans)
    return w.reshape(shape)


def sgd_qas_update_bias(b: np.ndarray, grad: np.ndarray, lr: float, x_scale: float,
                        dy_scale: float, weight_scale: np.ndarray) -> np.ndarray:
    b = np.asarray(b, np.int64)
    base = F32(F32(lr) * F32(dy_scale))
    den = (np.asarray(weight_scale, F32) * F32(x_scale)).astype(F32)
    v = ((base * np.asarray(grad).astype(F32)).astype(F32) / den).astype(F32)
    v = np.clip(v, F32(-4294967296.0), F32(4294967296.0))
    step = round_half_away(v).astype(np.int64)
    return np.clip(b - step, -2**31, 2**31 - 1).astype(np.int32)


# ----------------------------------------------------------------------------- helpers
def _to_int32(a: np.ndarray) -> np.ndarray:
    if a.size and (a.max() > 2**31 - 1 or a.min() < -2**31):
        raise OverflowError("int32 accumulator overflow")
    return a.astype(np.int32)


def top_k_channels(w: np.ndarray, k: int, depthwise: bool = False) -> np.ndarray:
    """The k input channels with the largest L2 norm of their weights, sorted (the static
    selection of Lin et al. 2022, "On-Device Training Under 256KB Memory"). ``w``: OHWI (input
    channels last; the norm runs over every other axis) or, with ``depthwise``,
    ``[1, K_h, K_w, C]`` / ``[K_h, K_w, C]``. Ties go to the lower index.

        top_k_channels(w, 4)  # array([ 3,  7, 12, 40], dtype=int32)

    This is the one NumPy implementation (the exporter and the firmware vectors use it).
    """
    w = np.asarray(w, np.float64)
    norms = (np.sqrt((_dw_filter(w) ** 2).sum(axis=(0, 1))) if depthwise
             else np.sqrt((w ** 2).sum(axis=(0, 1, 2))))
    return np.sort(np.argsort(-norms, kind="stable")[:k]).astype(np.int32)


def macs_weight_grad(g: Geometry, k: int, c_out: int, depthwise: bool = False) -> int:
    """Multiply-accumulates of a weight gradient (taps inside the image only)."""
    total = 0
    for _, _, (oy, ox, _, _) in g.taps_inside():
        total += (oy.stop - oy.start) * (ox.stop - ox.start)
    return total * k * (1 if depthwise else c_out)
