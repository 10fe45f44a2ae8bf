"""Synthetic firmware vectors: one backward pass through MobileNetV2-0.35 @ 128x128 layers,
computed with the NumPy reference (`dgst_tf.tflm_ops.reference`).

    from dgst_tf.tflm_ops.mcu import synthetic_vectors
    from dgst_tf.tflm_ops.mcu.c_emitter import render

    emitter = synthetic_vectors.build(synthetic_vectors.Tensors(seed=0))
    text = render(emitter, "random, seed 0")

* ``b3``: an inverted-residual block at 16x16 (16 -> 96 pointwise expand + ReLU6, 3x3
  depthwise + ReLU6, 96 -> 16 project). The project conv's dy (int8) is backpropagated:
  project weight/bias/input gradients, ReLU6 mask, gradient quantization, depthwise
  gradients, mask and quantization again, then the expand conv's weight gradient at kept
  input-channel ratios ~2% (k = max(1, round(0.02 * C_in)) = 1), 1/8, 1/4 and 1 (with the
  straightforward reference loop too), and the QAS SGD updates.
* ``b4_dw``: the stride-2 3x3 depthwise (16x16x96 -> 8x8, TFLite SAME padding).
* ``b15``: a late block at 4x4 (56 -> 336 expand at ratios ~2%, 1/8, 1/4, 1; 3x3 depthwise
  at 1/4 with its updates).
* ``fc``: the classifier (1280 -> 10 as a 1x1 conv on a 1x1 image) with the softmax
  cross-entropy gradient.
* ``odd*``: odd geometries (stride 2, dilation 2, VALID, 5x5 kernel, channel counts that
  are not multiples of 4) for the tail loops; fused frozen blocks, masks and quantization of
  odd lengths, a channel scatter.
* ``small_dw*``: depthwise weight gradients on 3x3, 4x5 and (vertical stride 2) 6x4 maps at
  k = 1, 2, 3, 4 and all channels.
* ``strip_dw*``: the same on maps larger than the DSP sliding path's planes, which it takes
  strip by strip (13x11; 15x9 at vertical stride 2; a 5x3 kernel on 12x10; 5x32, one output
  row a strip).

Random tensors (``seed``); a dict of real ones replaces any of them: keys ``<layer>/<field>``
with layer in (b3_expand, b3_dw, b3_project, b4_dw, b15_expand, b15_dw, fc) and field in (x,
w, weight_scale, bias, y, dy, x_zero_point, x_scale, y_zero_point, y_hi, dy_scale, logits,
logits_scale, logits_zero_point, label); arrays must have the layer's shapes (`shapes`).
``dy`` is only read for the layers that start a backward chain (b3_project, b4_dw, b15_dw,
b15_expand) and ``logits`` for fc; the other dy are computed by the chain.
``<layer>/kept<k>`` fixes the kept channels of the k-channel case (default: top-k by L2 norm
of the weights, as in Lin et al. 2022, "On-Device Training Under 256KB Memory").
"""
from __future__ import annotations

import dataclasses

import numpy as np

from dgst_tf.core.geometry import channels_for_ratio
from dgst_tf.tflm_ops import reference as R
from dgst_tf.tflm_ops.mcu import cases
from dgst_tf.tflm_ops.mcu.c_emitter import Emitter, c_float

G = R.Geometry.conv
RELU6_SCALE, RELU6_ZP = 6.0 / 255.0, -128  # ReLU6 output: real 0 -> -128, real 6 -> 127

# name: (kind, geometry, c_in, c_out)
LAYERS = {
    "b3_expand": ("conv", G(16, 16, 1), 16, 96),
    "b3_dw": ("depthwise", G(16, 16, 3), 96, 96),
    "b3_project": ("conv", G(16, 16, 1), 96, 16),
    "b4_dw": ("depthwise", G(16, 16, 3, stride=2), 96, 96),
    "b15_expand": ("conv", G(4, 4, 1), 56, 336),
    "b15_dw": ("depthwise", G(4, 4, 3), 336, 336),
    "fc": ("conv", G(1, 1, 1), 1280, 10),
    "odd_conv": ("conv", G(9, 7, 3, stride=2), 10, 6),
    "odd_dilated": ("conv", G(10, 10, 3, dilation=2, padding="valid"), 5, 7),
    "odd_dw": ("depthwise", G(9, 9, 5, stride=2), 7, 7),
    "small_dw3": ("depthwise", G(3, 3, 3), 6, 6),
    "small_dw5": ("depthwise", G(4, 5, 3), 7, 7),
    "small_dw_s2": ("depthwise", G(6, 4, 3, stride=(2, 1)), 5, 5),
    "strip_dw": ("depthwise", G(13, 11, 3), 6, 6),
    "strip_dw_s2": ("depthwise", G(15, 9, 3, stride=(2, 1)), 5, 5),
    "strip_dw_k5x3": ("depthwise", G(12, 10, 5, 3), 7, 7),
    "strip_dw_w32": ("depthwise", G(5, 32, 3), 5, 5),
}
# Kept input-channel ratios of the weight gradients (k = channels_for_ratio(ratio, C_in)).
SWEEP = (1 / 50, 1 / 8, 1 / 4, 1.0)


def shapes(name: str) -> dict:
    """The shapes of a layer of LAYERS: x, w, weight_scale, bias, y, dy."""
    kind, g, c_in, c_out = LAYERS[name]
    w = (1, g.kernel_h, g.kernel_w, c_in) if kind == "depthwise" else (c_out, g.kernel_h,
                                                                       g.kernel_w, c_in)
    return {"x": (g.in_h, g.in_w, c_in), "w": w, "weight_scale": (c_out,), "bias": (c_out,),
            "y": (g.out_h, g.out_w, c_out), "dy": (g.out_h, g.out_w, c_out)}


class Tensors:
    """Random realistic tensors per layer, overridable by real ones (``real``: an .npz as a
    dict); the keys of ``real`` that were read are collected in ``used``."""

    def __init__(self, seed: int, real: dict | None = None):
        self.rng = np.random.default_rng(seed)
        self.real = dict(real or {})
        self.used = set()
        self.cache = {}

    def get(self, layer: str, field: str, make):
        key = f"{layer}/{field}"
        if key in self.cache:
            return self.cache[key]
        if key in self.real:
            value = np.asarray(self.real[key])
            self.used.add(key)
            want = shapes(layer).get(field) if layer in LAYERS else None
            if want is not None and tuple(value.shape) != tuple(want):
                raise ValueError(f"{key}: shape {value.shape}, the layer needs {want}")
        else:
            value = make()
        self.cache[key] = value
        return value

    def relu6_act(self, shape):
        """int8 ReLU6 output codes: ~45% exactly 0 (-128), some saturated at 6 (127)."""
        v = self.rng.gamma(1.2, 40.0, size=shape) - 128
        v[self.rng.random(shape) < 0.45] = -128
        return np.clip(np.round(v), -128, 127).astype(np.int8)

    def linear_act(self, shape, zero_point):
        v = self.rng.normal(zero_point, 35.0, size=shape)
        return np.clip(np.round(v), -128, 127).astype(np.int8)

    def weights(self, shape, depthwise):
        """Symmetric per-output-channel int8 weights (max |w| = 127 per channel) + scales."""
        w = self.rng.normal(0.0, 1.0, size=shape) * self.rng.uniform(0.3, 1.5, shape[-1]
                                                                     if depthwise else 1)
        axes = (0, 1, 2) if depthwise else (1, 2, 3)
        m = np.abs(w).max(axis=axes, keepdims=True)
        q = np.clip(np.round(w / m * 127), -127, 127).astype(np.int8)
        scale = (self.rng.uniform(0.002, 0.03, m.size)).astype(np.float32)
        return q, scale

    def error(self, shape, zero_fraction=0.3):
        """int8 error signal: max |dy| = 127, some zeros."""
        v = self.rng.laplace(0.0, 1.0, size=shape)
        v[self.rng.random(shape) < zero_fraction] = 0
        return np.clip(np.round(v / np.abs(v).max() * 127), -127, 127).astype(np.int8)


class Builder:
    """The cases of the layers of LAYERS, on the tensors of a `Tensors`."""

    def __init__(self, tensors: Tensors, emit: Emitter):
        self.t, self.e = tensors, emit

    def layer(self, name, x_kind="relu6") -> dict:
        """A layer dict (see `cases`) with its tensors (random unless given)."""
        kind, g, c_in, c_out = LAYERS[name]
        sh = shapes(name)
        t = self.t
        L = {"name": name, "kind": kind, "g": g, "c_in": c_in, "c_out": c_out}
        L["x_zero_point"] = int(t.get(name, "x_zero_point", lambda: RELU6_ZP if x_kind == "relu6"
                                      else int(t.rng.integers(-20, 21))))
        L["x_scale"] = float(t.get(name, "x_scale", lambda: np.float32(
            RELU6_SCALE if x_kind == "relu6" else t.rng.uniform(0.01, 0.1))))
        L["x"] = t.get(name, "x", lambda: t.relu6_act(sh["x"]) if x_kind == "relu6"
                       else t.linear_act(sh["x"], L["x_zero_point"]))
        wq, ws = None, None
        if f"{name}/w" not in t.real or f"{name}/weight_scale" not in t.real:
            wq, ws = t.weights(sh["w"], kind == "depthwise")
        L["w"] = t.get(name, "w", lambda: wq).astype(np.int8)
        L["ws"] = t.get(name, "weight_scale", lambda: ws).astype(np.float32)
        L["bias"] = t.get(name, "bias", lambda: t.rng.integers(-5000, 5000, c_out)
                          .astype(np.int32)).astype(np.int32)
        L["y_zero_point"] = int(t.get(name, "y_zero_point", lambda: RELU6_ZP))
        L["y_hi"] = int(t.get(name, "y_hi", lambda: 127))
        L["y"] = t.get(name, "y", lambda: t.relu6_act(sh["y"])).astype(np.int8)
        return L

    def dy(self, name, scale=None):
        """The given (or random) int8 dy of a layer that starts a backward chain, and its
        scale when ``scale`` (the default) is given."""
        t = self.t
        dy = t.get(name, "dy", lambda: t.error(shapes(name)["dy"])).astype(np.int8)
        if scale is None:
            return dy
        return dy, float(t.get(name, "dy_scale", lambda: np.float32(scale)))

    def kept(self, L, k):
        if f"{L['name']}/kept{k}" in self.t.real:
            return np.asarray(self.t.real[f"{L['name']}/kept{k}"], np.int32)
        return R.top_k_channels(L["w"], k, depthwise=L["kind"] == "depthwise")

    def weight_grad(self, L, dy, k, ref_loop=False):
        """Weight gradient at k kept channels; returns (kept, grad)."""
        kept = self.kept(L, k)
        return kept, cases.weight_grad(self.e, L, dy, kept, f"{L['name']}_k{k}", ref_loop)

    def mask_and_quantize(self, L, dx, check=True):
        """ReLU6 mask of layer L's output applied to dx, then int8 quantization -> (dy, s)."""
        e, n = self.e, L["name"]
        mask = R.build_mask(L["y"], L["y_zero_point"], L["y_hi"])
        g = R.apply_mask(dx, mask)
        q, scale = R.quantize_grad(g)
        if check:
            m = e.array(n + "_mask", mask)
            e.call(f'check_build_mask("{n}", {e.array(n + "_y", L["y"])}, {L["y"].size}, '
                   f'{L["y_zero_point"]}, {L["y_hi"]}, {e.expect(n + "_mask", mask)});')
            e.call(f'check_apply_mask("{n}", {e.array(n + "_dx_in", dx)}, {m}, {dx.size}, '
                   f'{e.expect(n + "_gmasked", g)});')
            e.call(f'check_quantize("{n}", {e.array(n + "_gmasked_in", g)}, {g.size}, '
                   f'{e.expect(n + "_gq", q)}, {c_float(scale)});')
        return q.reshape(L["y"].shape), scale

    def updates(self, L, kept, grad_w, grad_b, dy_scale, lr=0.05):
        """The QAS SGD steps of the weights (at ``kept``) and of the bias."""
        e, n, g = self.e, L["name"], L["g"]
        head = f'"{n}", {e.array(n + "_w", L["w"])}'
        tail = (f'{e.array(n + "_upd_kept", kept)}, {len(kept)}, '
                f'{e.array(n + "_gw_in", grad_w)}, {c_float(lr)}, {c_float(L["x_scale"])}, '
                f'{c_float(dy_scale)}, {e.array(n + "_ws", L["ws"])}')
        if L["kind"] == "conv":
            w_new = R.sgd_qas_update_conv(L["w"], kept, grad_w, lr, L["x_scale"], dy_scale,
                                          L["ws"])
            e.call(f'check_sgd_conv({head}, {L["c_out"]}, {g.kernel_h}, {g.kernel_w}, '
                   f'{L["c_in"]}, {tail}, {e.expect(n + "_w_new", w_new)});')
        else:
            w_new = R.sgd_qas_update_depthwise(L["w"], kept, grad_w, lr, L["x_scale"], dy_scale,
                                               L["ws"])
            e.call(f'check_sgd_dw({head}, {g.kernel_h}, {g.kernel_w}, {L["c_in"]}, {tail}, '
                   f'{e.expect(n + "_w_new", w_new)});')
        self.stochastic_updates(L, kept, grad_w, dy_scale, lr * 0.05)
        cases.bias_update(e, L, grad_b, lr, dy_scale)

    def stochastic_updates(self, L, kept, grad_w, dy_scale, lr, key=(7, 2**31 + 9, 3)):
        """The same weight step with stochastic rounding at a smaller rate (sub-LSB steps:
        u decides most of them), seed/stream/step ``key``."""
        e, n, g = self.e, L["name"], L["g"]
        args = (f'{e.array(n + "_upd_kept", kept)}, {len(kept)}, '
                f'{e.array(n + "_gw_in", grad_w)}, {c_float(lr)}, {c_float(L["x_scale"])}, '
                f'{c_float(dy_scale)}, {e.array(n + "_ws", L["ws"])}, '
                f'{key[0]}u, {key[1]}u, {key[2]}u')
        head = f'"{n}_sr", {e.array(n + "_w", L["w"])}'
        if L["kind"] == "conv":
            w_new = R.sgd_qas_update_conv_sr(L["w"], kept, grad_w, lr, L["x_scale"], dy_scale,
                                             L["ws"], *key)
            e.call(f'check_sgd_conv_sr({head}, {L["c_out"]}, {g.kernel_h}, {g.kernel_w}, '
                   f'{L["c_in"]}, {args}, {e.expect(n + "_w_sr", w_new)});')
        else:
            w_new = R.sgd_qas_update_depthwise_sr(L["w"], kept, grad_w, lr, L["x_scale"],
                                                  dy_scale, L["ws"], *key)
            e.call(f'check_sgd_dw_sr({head}, {g.kernel_h}, {g.kernel_w}, {L["c_in"]}, {args}, '
                   f'{e.expect(n + "_w_sr", w_new)});')

    def train_step(self, L, dy, dy_scale, k):
        """Weight gradient at k channels, bias gradient, both updates; returns the kept."""
        kept, gw = self.weight_grad(L, dy, k)
        gb = cases.bias_grad(self.e, L, dy)
        self.updates(L, kept, gw, gb, dy_scale)
        return kept


def build(tensors: Tensors) -> Emitter:
    """Every synthetic case, in the order the firmware runs them."""
    e = Emitter()
    b = Builder(tensors, e)
    _block3(b)
    _block4_and_15(b)
    _classifier(b)
    rng = tensors.rng
    _odd_geometries(b, rng)
    for name, spec in (("fused_b1", ((64, 64, 8), (48, 1, 1), (3, 2), 8)),
                       ("fused_odd", ((9, 7, 3), (10, 3, 2), (5, 1), 5))):
        fused_block(e, rng, name, *spec)
    _head_pool(e, rng)
    _scatter(e, rng)
    _odd_masks(e, rng)
    _small_maps(b)
    fused_block(e, rng, "fused_unusual", (6, 5, 8), (16, 1, 1), (3, 1), 8, unusual=True)
    return e


def _small_maps(b: Builder):
    """Depthwise weight gradients on small maps (3x3, 4x5, 6x4 at vertical stride 2) and maps
    taken strip by strip at every group tail (k % 4 = 1, 2, 3, 0): the DSP cores' sliding
    paths. Last, so that the random tensors of the cases before stay what they were."""
    for name in ("small_dw3", "small_dw5", "small_dw_s2", "strip_dw", "strip_dw_s2",
                 "strip_dw_k5x3", "strip_dw_w32"):
        L = b.layer(name, x_kind="linear")
        dy = b.t.error(shapes(name)["dy"], zero_fraction=0.1)
        for k in (1, 2, 3, 4, L["c_in"]):
            b.weight_grad(L, dy, k)


def _block3(b: Builder):
    """b3: project -> depthwise -> expand, the gradient flowing through all three."""
    t, e = b.t, b.e
    expand = b.layer("b3_expand", x_kind="linear")
    dw = b.layer("b3_dw")
    dw["x"] = expand["y"] if "b3_dw/x" not in t.real else dw["x"]
    project = b.layer("b3_project")
    project["x"] = dw["y"] if "b3_project/x" not in t.real else project["x"]
    dy, s = b.dy("b3_project", 0.004)
    b.train_step(project, dy, s, channels_for_ratio(0.25, 96))
    dx = cases.input_grad(e, project, dy, s)
    dy, s = b.mask_and_quantize(dw, dx)
    b.train_step(dw, dy, s, channels_for_ratio(0.25, 96))
    dx = cases.input_grad(e, dw, dy, s)
    dy, s = b.mask_and_quantize(expand, dx, check=False)  # checked once, on the dw
    for ratio in SWEEP:
        kept, gw = b.weight_grad(expand, dy, channels_for_ratio(ratio, 16), ref_loop=True)
        if ratio == 0.25:
            upd = (kept, gw)
    gb = cases.bias_grad(e, expand, dy)
    b.updates(expand, upd[0], upd[1], gb, s)
    cases.input_grad(e, expand, dy, s)


def _block4_and_15(b: Builder):
    """b4: the stride-2 depthwise; b15: the late block at 4x4 (the layers DGSU updates,
    Li & Chang 2024)."""
    L = b.layer("b4_dw")
    dy, s = b.dy("b4_dw", 0.01)
    b.weight_grad(L, dy, channels_for_ratio(0.25, 96))
    cases.input_grad(b.e, L, dy, s)
    L = b.layer("b15_dw")
    dy, s = b.dy("b15_dw", 0.01)
    b.train_step(L, dy, s, channels_for_ratio(0.25, 336))
    cases.input_grad(b.e, L, dy, s)
    L = b.layer("b15_expand", x_kind="linear")
    dy = b.dy("b15_expand")
    for ratio in SWEEP:
        b.weight_grad(L, dy, channels_for_ratio(ratio, 56), ref_loop=True)


def _classifier(b: Builder):
    """fc: the softmax cross-entropy gradient, then the classifier's gradients and updates."""
    t, e = b.t, b.e
    L = b.layer("fc")
    logits = t.get("fc", "logits", lambda: t.rng.integers(-60, 60, 10).astype(np.int8))
    lscale = float(t.get("fc", "logits_scale", lambda: np.float32(0.08)))
    lzp = int(t.get("fc", "logits_zero_point", lambda: -3))
    label = int(t.get("fc", "label", lambda: 3))
    loss, grad = R.softmax_xent_grad(logits, lscale, lzp, label)
    lg = e.array("fc_logits", logits.astype(np.int8))
    e.call(f'check_softmax("fc", {lg}, {logits.size}, {c_float(lscale)}, {lzp}, {label}, '
           f'{e.array("fc_softmax_grad", grad.astype(np.float32))}, {c_float(loss)});')
    q, s = R.quantize_grad(grad.astype(np.float32))
    dy = q.reshape(1, 1, 10)
    b.train_step(L, dy, float(s), 1280)
    cases.input_grad(e, L, dy, float(s))


def _odd_geometries(b: Builder, rng):
    """Stride 2, dilation 2, VALID, 5x5 and odd channel counts (always random)."""
    for name in ("odd_conv", "odd_dilated", "odd_dw"):
        L = b.layer(name, x_kind="linear")
        dy = b.t.error(shapes(name)["dy"], zero_fraction=0.1)
        for k in sorted({1, max(1, L["c_in"] // 3), L["c_in"]}):
            b.weight_grad(L, dy, k, ref_loop=L["kind"] == "conv")
        cases.bias_grad(b.e, L, dy)
        cases.input_grad(b.e, L, dy, float(rng.uniform(0.001, 0.01)))


def _unusual_requantization(stage, c):
    """The stage with channels c..c+3 outside the 32-bit requantization of the DSP cores
    (shift +1, a bias near 2^30, right shift 22, shift 0): they take the 64-bit one."""
    bias, shift, mult = stage.bias.copy(), stage.shift.copy(), stage.multiplier.copy()
    shift[c], mult[c] = 1, 2**30
    bias[c + 1] = 2**30 - 1000
    shift[c + 2] = -22
    shift[c + 3] = 0
    return dataclasses.replace(stage, bias=bias, shift=shift, multiplier=mult)


def fused_block(e: Emitter, rng, name, x_shape, conv_spec, dw_spec, c_out, unusual=False):
    """A check_fused_block case (forward of a frozen block, MobileNetV2-0.35 block_1 at
    128x128 or odd sizes): random tensors (R.fused_block_case) and the reference.
    ``unusual``: requantization constants the fast paths must refuse (_unusual_requantization;
    not the same channels in consecutive stages, whose saturation would hide the first's)."""
    x, stages, g = R.fused_block_case(rng, x_shape, conv_spec, dw_spec, c_out)
    if unusual:
        stages = [_unusual_requantization(s, c) for s, c in zip(stages, (0, 4, 0))]
    y = R.fused_block(x, *stages, **g)
    params = []
    for label, s in zip(("conv", "dw", "project"), stages):
        pname = e.name(f"{name}_{label}")
        params.append(e.struct("dgst_requant_params", pname, (
            e.array(pname + "_w", s.weights), e.array(pname + "_b", s.bias),
            e.array(pname + "_m", s.multiplier), e.array(pname + "_s", s.shift),
            s.input_offset, s.output_offset, s.act_min, s.act_max)))
    w1, w2 = stages[0].weights.shape, stages[1].weights.shape
    geometry = (*x_shape, *g["mid_hw"], w1[0], *y.shape, w1[1], w1[2], *g["conv_stride"],
                *g["conv_pad"], w2[1], w2[2], *g["dw_stride"], *g["dw_pad"])
    gname = e.struct("dgst_fused_block_geometry", e.name(f"{name}_geometry"),
                     (int(v) for v in geometry))
    mid = g["mid_hw"][0] * g["mid_hw"][1] * w1[0]
    macs = mid * w1[1] * w1[2] * w1[3] + y.shape[0] * y.shape[1] * w1[0] * (
        w2[1] * w2[2] + y.shape[2])
    e.call(f'check_fused_block("{name}", {gname}, {", ".join(params)}, '
           f'{e.array(name + "_x", x)}, {e.expect(name + "_y", y)}, {macs}u);')


def _head_pool(e: Emitter, rng):
    """The head conv's dy straight from the pooled gradient (MobileNetV2 head at 4x4x1280)."""
    g_pool = (rng.standard_normal(1280) * 1e-3).astype(np.float32)
    y_head = rng.integers(-128, 128, (4, 4, 1280)).astype(np.int8)
    mask = R.build_mask(y_head, -128, 127)
    factor = np.float32(1.0 / 16)
    dense = (np.broadcast_to(g_pool, (16, 1280)) * factor).astype(np.float32)
    q, scale = R.quantize_grad(R.apply_mask(dense, mask))
    e.call(f'check_quantize_broadcast("head_pool", {e.array("head_pool_g", g_pool)}, 16, 1280, '
           f'{c_float(factor)}, {e.array("head_pool_mask", mask)}, '
           f'{e.expect("head_pool_dy", q)}, {c_float(scale)});')


def _scatter(e: Emitter, rng):
    """Updated kept channels written back into a whole b15_expand filter."""
    base = rng.integers(-127, 128, (56, 1, 1, 336)).astype(np.int8)
    kept = R.top_k_channels(base, 42)
    src = rng.integers(-127, 128, (56, 1, 1, 42)).astype(np.int8)
    e.call(f'check_scatter("b15_expand_scatter", {e.array("scatter_base", base)}, '
           f'{e.array("scatter_src", src)}, 56, 336, {e.array("scatter_kept", kept)}, 42, '
           f'{e.expect("scatter_out", R.scatter_channels(base, src, kept))});')


def _odd_masks(e: Emitter, rng):
    """Masks with other bounds and a length that is not a multiple of 8, quantization."""
    n = 1001
    y = rng.integers(-128, 128, n).astype(np.int8)
    for lo, hi in ((-5, 100), (120, 127), (-128, -120), (3, 4)):
        mask = R.build_mask(y, lo, hi)
        e.call(f'check_build_mask("odd_mask_{lo}_{hi}", {e.array("odd_y", y)}, {n}, {lo}, '
               f'{hi}, {e.expect(f"odd_mask_{lo}_{hi}", mask)});')
    g = (rng.standard_t(3, n) * 1e-3).astype(np.float32)
    masked = R.apply_mask(g, mask)
    e.call(f'check_apply_mask("odd_mask", {e.array("odd_g", g)}, '
           f'{e.array("odd_mask_in", R.build_mask(y, -5, 100))}, {n}, '
           f'{e.expect("odd_gmasked", R.apply_mask(g, R.build_mask(y, -5, 100)))});')
    q, scale = R.quantize_grad(masked)
    e.call(f'check_quantize("odd_quantize", {e.array("odd_gq_in", masked)}, {n}, '
           f'{e.expect("odd_gq", q)}, {c_float(scale)});')
