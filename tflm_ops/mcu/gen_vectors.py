"""Generate build/mcu/vectors.h: test vectors of the training kernels for the MCU harness.

The vectors are one backward pass through MobileNetV2-0.35 @ 128x128 layers, computed with
the NumPy reference (tflm_ops/reference.py):

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
  are not multiples of 4) for the tail loops.

Random tensors by default (``--seed``). ``--npz FILE`` replaces any of them with real ones:
keys ``<layer>/<field>`` with layer in (b3_expand, b3_dw, b3_project, b4_dw, b15_expand,
b15_dw, fc) and field in (x, w, weight_scale, bias, y, dy, x_zero_point, x_scale, y_zero_point,
y_hi, dy_scale, logits, logits_scale, logits_zero_point, label); arrays must have the
layer's shapes (printed by ``--list``). ``dy`` is only read for the layers that start a
backward chain (b3_project, b4_dw, b15_dw, b15_expand) and ``logits`` for fc; the other
dy are computed by the chain. ``<layer>/kept<k>`` fixes the kept channels of the k-channel
case (default: top-k by L2 norm of the weights, as in the SU paper).

An .npz with ``meta/format`` = "dgst-real-step-1" (tflm_ops/real_vectors.py: a real model's
last layers, weights, saved activations and logits) replaces all of the above by the cases
of that model's training step, on its own layer shapes (see ``build_real``).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import re
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def _load_reference():
    spec = importlib.util.spec_from_file_location("dgst_kernels_reference",
                                                  os.path.join(HERE, "..", "reference.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


R = _load_reference()
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
}
# Kept input-channel ratios of the weight gradients (k = max(1, round(ratio * C_in))).
SWEEP = (1 / 50, 1 / 8, 1 / 4, 1.0)


def k_of(ratio: float, c_in: int) -> int:
    return int(min(c_in, max(1, round(ratio * c_in))))


def shapes(name: str) -> dict:
    kind, g, c_in, c_out = LAYERS[name]
    w = (1, g.kernel_h, g.kernel_w, c_in) if kind == "depthwise" else (c_out, g.kernel_h,
                                                                       g.kernel_w, c_in)
    return {"x": (g.in_h, g.in_w, c_in), "w": w, "weight_scale": (c_out,), "bias": (c_out,),
            "y": (g.out_h, g.out_w, c_out), "dy": (g.out_h, g.out_w, c_out)}


# ----------------------------------------------------------------------------- tensors
class Tensors:
    """Random realistic tensors per layer, overridable from an .npz of real ones."""

    def __init__(self, seed: int, npz: str | None = None):
        self.rng = np.random.default_rng(seed)
        self.real = dict(np.load(npz)) if npz else {}
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

    # generators
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


# ----------------------------------------------------------------------------- cases
class Emitter:
    """Collects C arrays and the calls of dgst_run_cases()."""

    # Expected outputs above this size are checked by hash + samples (saves flash).
    FULL_BYTES = 16384
    SAMPLES = 256

    def __init__(self):
        self.arrays, self.calls, self.names = [], [], set()
        self.by_content = {}
        self.summary = []

    def _name(self, name: str) -> str:
        name = re.sub(r"\W", "_", name.replace("-", "m"))  # a C identifier
        base, i = name, 1
        while name in self.names:
            i += 1
            name = f"{base}_{i}"
        self.names.add(name)
        return name

    def array(self, name: str, a: np.ndarray) -> str:
        """Emit a const array (once per content); returns its C expression."""
        a = np.ascontiguousarray(a)
        key = (a.dtype.str, a.tobytes())
        if key in self.by_content:
            return self.by_content[key]
        name = self._name(name)
        flat = a.reshape(-1)
        n = max(flat.size, 1)
        if a.dtype == np.float32:
            body = _wrap([f"0x{int(b):08x}u" for b in flat.view(np.uint32)])
            self.arrays.append(f"static const union {{ uint32_t u[{n}]; float f[{n}]; }} "
                               f"{name} = {{{{\n{body}}}}};\n")
            expr = f"{name}.f"
        else:
            ctype = {np.dtype(np.int8): "int8_t", np.dtype(np.uint8): "uint8_t",
                     np.dtype(np.int32): "int32_t"}[a.dtype]
            body = _wrap([str(int(v)) for v in flat])
            self.arrays.append(f"static const {ctype} {name}[{n}] = {{\n{body}}};\n")
            expr = name
        self.by_content[key] = expr
        return expr

    def expect(self, name: str, a: np.ndarray) -> str:
        """A dgst_expect for an expected output: the full array when small (or already
        emitted), else FNV-1a hash of all bytes + every step-th element."""
        a = np.ascontiguousarray(a)
        flat = a.reshape(-1)
        key = (a.dtype.str, a.tobytes())
        if a.nbytes <= self.FULL_BYTES or key in self.by_content:
            init = f"{{{self.array(name, a)}, 0u, NULL, 0u}}"
        else:
            step = -(-flat.size // self.SAMPLES)
            samples = self.array(name + "_samples", flat[::step])
            init = f"{{NULL, 0x{fnv1a(a.tobytes()):08x}u, {samples}, {step}u}}"
        ename = self._name(name + "_expect")
        self.arrays.append(f"static const dgst_expect {ename} = {init};\n")
        return "&" + ename

    def geometry(self, name: str, g) -> str:
        name = "geom_" + name
        if name not in self.names:
            self.names.add(name)
            self.arrays.append(f"static const dgst_conv_geometry {name} = {{"
                               + ", ".join(str(v) for v in g.astuple()) + "};\n")
        return "&" + name

    def call(self, text: str):
        self.calls.append(text)


def fnv1a(data: bytes) -> int:
    h = 2166136261
    for b in data:
        h = ((h ^ b) * 16777619) & 0xFFFFFFFF
    return h


def _wrap(items, per_line=16):
    lines = [", ".join(items[i:i + per_line]) for i in range(0, len(items), per_line)]
    return "  " + ",\n  ".join(lines) + "\n"


def _f(v) -> str:
    """A float32 constant, exactly (C99 hex float)."""
    v = float(np.float32(v))
    assert np.isfinite(v)
    return float.hex(v) + "f"


class Builder:
    def __init__(self, tensors: Tensors, emit: Emitter):
        self.t, self.e = tensors, emit

    # layer tensors
    def layer(self, name, x_kind="relu6"):
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

    def kept(self, L, k):
        if f"{L['name']}/kept{k}" in self.t.real:
            return np.asarray(self.t.real[f"{L['name']}/kept{k}"], np.int32)
        return R.top_k_channels(L["w"], k, depthwise=L["kind"] == "depthwise")

    # kernels
    def weight_grad(self, L, dy, k, ref_loop=False, tag=None):
        """Weight gradient at k kept channels; returns (kept, grad)."""
        e, g, n = self.e, L["g"], L["name"]
        tag = tag or f"{n}_k{k}"
        kept = self.kept(L, k)
        x_kept = np.ascontiguousarray(L["x"][:, :, kept])
        dyn = e.array(n + "_dy", dy)
        if L["kind"] == "conv":
            grad = R.conv2d_weight_grad(g, x_kept, L["x_zero_point"], dy)
            macs = R.macs_weight_grad(g, k, L["c_out"])
            e.call(f'check_conv_wgrad("{tag}", {e.geometry(n, g)}, {e.array(tag + "_x", x_kept)}, '
                   f'{k}, {L["x_zero_point"]}, {dyn}, {L["c_out"]}, '
                   f'{e.expect(tag + "_gw", grad)}, {macs}u, {int(ref_loop)});')
        else:
            grad = R.depthwise_weight_grad(g, x_kept, kept, L["x_zero_point"], dy)
            macs = R.macs_weight_grad(g, k, L["c_out"], depthwise=True)
            e.call(f'check_dw_wgrad("{tag}", {e.geometry(n, g)}, {e.array(tag + "_x", x_kept)}, '
                   f'{e.array(tag + "_kept", kept)}, {k}, {L["x_zero_point"]}, {dyn}, '
                   f'{L["c_out"]}, {e.expect(tag + "_gw", grad)}, {macs}u);')
        e.summary.append((tag, L["kind"], k, L["c_in"], macs))
        return kept, grad

    def bias_grad(self, L, dy):
        e, n = self.e, L["name"]
        grad = R.bias_grad(dy)
        e.call(f'check_bias_grad("{n}", {e.array(n + "_dy", dy)}, {dy.shape[0] * dy.shape[1]}, '
               f'{dy.shape[2]}, {e.expect(n + "_gb", grad)});')
        return grad

    def input_grad(self, L, dy, dy_scale):
        e, g, n = self.e, L["g"], L["name"]
        common = (f'"{n}", {e.geometry(n, g)}, {e.array(n + "_dy", dy)}, {_f(dy_scale)}, '
                  f'{e.array(n + "_w", L["w"])}, {e.array(n + "_ws", L["ws"])}, {L["c_in"]}')
        if L["kind"] == "conv":
            dx = R.conv2d_input_grad(g, dy, dy_scale, L["w"], L["ws"])
            macs = R.macs_weight_grad(g, L["c_in"], L["c_out"])
            e.call(f'check_conv_igrad({common}, {L["c_out"]}, {e.expect(n + "_dx", dx)}, '
                   f'{macs}u);')
        else:
            dx = R.depthwise_input_grad(g, dy, dy_scale, L["w"], L["ws"])
            macs = R.macs_weight_grad(g, L["c_in"], L["c_out"], depthwise=True)
            e.call(f'check_dw_igrad({common}, {e.expect(n + "_dx", dx)}, {macs}u);')
        return dx

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
                   f'{e.expect(n + "_gq", q)}, {_f(scale)});')
        return q.reshape(L["y"].shape), scale

    def updates(self, L, kept, grad_w, grad_b, dy_scale, lr=0.05):
        e, n, g = self.e, L["name"], L["g"]
        k = len(kept)
        head = f'"{n}", {e.array(n + "_w", L["w"])}'
        tail = (f'{e.array(n + "_upd_kept", kept)}, {k}, {e.array(n + "_gw_in", grad_w)}, '
                f'{_f(lr)}, {_f(L["x_scale"])}, {_f(dy_scale)}, {e.array(n + "_ws", L["ws"])}')
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
        b_new = R.sgd_qas_update_bias(L["bias"], grad_b, lr, L["x_scale"], dy_scale, L["ws"])
        e.call(f'check_sgd_bias("{n}", {e.array(n + "_b", L["bias"])}, {L["c_out"]}, '
               f'{e.array(n + "_gb_in", grad_b)}, {_f(lr)}, {_f(L["x_scale"])}, '
               f'{_f(dy_scale)}, {e.array(n + "_ws", L["ws"])}, '
               f'{e.expect(n + "_b_new", b_new)});')


def build(tensors: Tensors) -> Emitter:
    e = Emitter()
    b = Builder(tensors, e)
    t = tensors
    igrad = b.input_grad

    # --- b3: project -> depthwise -> expand
    expand = b.layer("b3_expand", x_kind="linear")
    dw = b.layer("b3_dw")
    dw["x"] = expand["y"] if "b3_dw/x" not in t.real else dw["x"]
    project = b.layer("b3_project")
    project["x"] = dw["y"] if "b3_project/x" not in t.real else project["x"]
    dy = t.get("b3_project", "dy", lambda: t.error(shapes("b3_project")["dy"])).astype(np.int8)
    s = float(t.get("b3_project", "dy_scale", lambda: np.float32(0.004)))
    kept, gw = b.weight_grad(project, dy, k_of(0.25, 96))
    gb = b.bias_grad(project, dy)
    b.updates(project, kept, gw, gb, s)
    dx = igrad(project, dy, s)
    dy, s = b.mask_and_quantize(dw, dx)
    kept, gw = b.weight_grad(dw, dy, k_of(0.25, 96))
    gb = b.bias_grad(dw, dy)
    b.updates(dw, kept, gw, gb, s)
    dx = igrad(dw, dy, s)
    dy, s = b.mask_and_quantize(expand, dx, check=False)  # checked once, on the dw
    for ratio in SWEEP:
        kept, gw = b.weight_grad(expand, dy, k_of(ratio, 16), ref_loop=True)
        if ratio == 0.25:
            upd = (kept, gw)
    gb = b.bias_grad(expand, dy)
    b.updates(expand, upd[0], upd[1], gb, s)
    igrad(expand, dy, s)

    # --- b4: stride-2 depthwise
    L = b.layer("b4_dw")
    dy = t.get("b4_dw", "dy", lambda: t.error(shapes("b4_dw")["dy"])).astype(np.int8)
    s = float(t.get("b4_dw", "dy_scale", lambda: np.float32(0.01)))
    b.weight_grad(L, dy, k_of(0.25, 96))
    igrad(L, dy, s)

    # --- b15: late block at 4x4 (the layers DGSU updates)
    L = b.layer("b15_dw")
    dy = t.get("b15_dw", "dy", lambda: t.error(shapes("b15_dw")["dy"])).astype(np.int8)
    s = float(t.get("b15_dw", "dy_scale", lambda: np.float32(0.01)))
    kept, gw = b.weight_grad(L, dy, k_of(0.25, 336))
    gb = b.bias_grad(L, dy)
    b.updates(L, kept, gw, gb, s)
    igrad(L, dy, s)
    L = b.layer("b15_expand", x_kind="linear")
    dy = t.get("b15_expand", "dy", lambda: t.error(shapes("b15_expand")["dy"])).astype(np.int8)
    for ratio in SWEEP:
        b.weight_grad(L, dy, k_of(ratio, 56), ref_loop=True)

    # --- classifier with the softmax cross-entropy gradient
    L = b.layer("fc")
    logits = t.get("fc", "logits", lambda: t.rng.integers(-60, 60, 10).astype(np.int8))
    lscale = float(t.get("fc", "logits_scale", lambda: np.float32(0.08)))
    lzp = int(t.get("fc", "logits_zero_point", lambda: -3))
    label = int(t.get("fc", "label", lambda: 3))
    loss, grad = R.softmax_xent_grad(logits, lscale, lzp, label)
    lg = e.array("fc_logits", logits.astype(np.int8))
    e.call(f'check_softmax("fc", {lg}, {logits.size}, {_f(lscale)}, {lzp}, {label}, '
           f'{e.array("fc_softmax_grad", grad.astype(np.float32))}, {_f(loss)});')
    q, s = R.quantize_grad(grad.astype(np.float32))
    dy = q.reshape(1, 1, 10)
    kept, gw = b.weight_grad(L, dy, 1280)
    gb = b.bias_grad(L, dy)
    b.updates(L, kept, gw, gb, float(s))
    igrad(L, dy, float(s))

    # --- odd geometries (always random)
    rng = t.rng
    for name in ("odd_conv", "odd_dilated", "odd_dw"):
        L = b.layer(name, x_kind="linear")
        dy = t.error(shapes(name)["dy"], zero_fraction=0.1)
        for k in sorted({1, max(1, L["c_in"] // 3), L["c_in"]}):
            b.weight_grad(L, dy, k, ref_loop=L["kind"] == "conv")
        b.bias_grad(L, dy)
        igrad(L, dy, float(rng.uniform(0.001, 0.01)))
    # forward: fused frozen blocks (MobileNetV2-0.35 block_1 at 128x128, odd sizes)
    for name, spec in (("fused_b1", ((64, 64, 8), (48, 1, 1), (3, 2), 8)),
                       ("fused_odd", ((9, 7, 3), (10, 3, 2), (5, 1), 5))):
        fused_block(e, rng, name, *spec)
    # the head conv's dy straight from the pooled gradient (MobileNetV2 head at 4x4x1280)
    g_pool = (rng.standard_normal(1280) * 1e-3).astype(np.float32)
    y_head = rng.integers(-128, 128, (4, 4, 1280)).astype(np.int8)
    mask = R.build_mask(y_head, -128, 127)
    factor = np.float32(1.0 / 16)
    dense = (np.broadcast_to(g_pool, (16, 1280)) * factor).astype(np.float32)
    q, scale = R.quantize_grad(R.apply_mask(dense, mask))
    e.call(f'check_quantize_broadcast("head_pool", {e.array("head_pool_g", g_pool)}, 16, 1280, '
           f'{_f(factor)}, {e.array("head_pool_mask", mask)}, {e.expect("head_pool_dy", q)}, '
           f'{_f(scale)});')
    base = rng.integers(-127, 128, (56, 1, 1, 336)).astype(np.int8)
    kept = R.top_k_channels(base, 42)
    src = rng.integers(-127, 128, (56, 1, 1, 42)).astype(np.int8)
    e.call(f'check_scatter("b15_expand_scatter", {e.array("scatter_base", base)}, '
           f'{e.array("scatter_src", src)}, 56, 336, {e.array("scatter_kept", kept)}, 42, '
           f'{e.expect("scatter_out", R.scatter_channels(base, src, kept))});')
    # masks with other bounds and a length that is not a multiple of 8, quantization of it
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
           f'{e.expect("odd_gq", q)}, {_f(scale)});')
    return e


def fused_block(e: Emitter, rng, name, x_shape, conv_spec, dw_spec, c_out):
    """A check_fused_block case: random tensors (R.fused_block_case) and the reference."""
    x, stages, g = R.fused_block_case(rng, x_shape, conv_spec, dw_spec, c_out)
    y = R.fused_block(x, *stages, **g)
    params = []
    for label, s in zip(("conv", "dw", "project"), stages):
        pname = e._name(f"{name}_{label}")
        e.arrays.append(
            f"static const dgst_requant_params {pname} = {{"
            f"{e.array(pname + '_w', s.weights)}, {e.array(pname + '_b', s.bias)}, "
            f"{e.array(pname + '_m', s.multiplier)}, {e.array(pname + '_s', s.shift)}, "
            f"{s.input_offset}, {s.output_offset}, {s.act_min}, {s.act_max}}};\n")
        params.append("&" + pname)
    w1, w2 = stages[0].weights.shape, stages[1].weights.shape
    geometry = (*x_shape, *g["mid_hw"], w1[0], *y.shape, w1[1], w1[2], *g["conv_stride"],
                *g["conv_pad"], w2[1], w2[2], *g["dw_stride"], *g["dw_pad"])
    gname = e._name(f"{name}_geometry")
    e.arrays.append(f"static const dgst_fused_block_geometry {gname} = {{"
                    + ", ".join(str(int(v)) for v in geometry) + "};\n")
    mid = g["mid_hw"][0] * g["mid_hw"][1] * w1[0]
    macs = mid * w1[1] * w1[2] * w1[3] + y.shape[0] * y.shape[1] * w1[0] * (
        w2[1] * w2[2] + y.shape[2])
    e.call(f'check_fused_block("{name}", &{gname}, {", ".join(params)}, '
           f'{e.array(name + "_x", x)}, {e.expect(name + "_y", y)}, {macs}u);')


# ----------------------------------------------------------------------------- real step
# An .npz with ``meta/format`` = REAL_FORMAT (written by tflm_ops/real_vectors.py from a real
# model) describes its own layers instead of overriding the ones of LAYERS:
#
#   meta/layers            layer names in backward order (the classifier first); the input
#                          of each is the output of the next one (or its global average)
#   meta/logits, meta/logits_scale, meta/logits_zero_point, meta/label: the int8 logits
#   meta/ratio (0.02), meta/lr (0.05): kept input-channel ratio of the sparse update, SGD lr
#   <layer>/kind           "conv" (Conv2D and Dense as a 1x1 conv) or "depthwise"
#   <layer>/geometry       the 12 ints of dgst_conv_geometry
#   <layer>/x, x_zero_point, x_scale   saved int8 input (all channels)
#   <layer>/w, weight_scale, bias      int8 OHWI (depthwise [1, kh, kw, C]), float32, int32
#   <layer>/y, y_zero_point, y_hi, relu6   int8 output; relu6 = 1 if a ReLU6 follows
#   <layer>/kept<k>        optional: the kept channels (default top-k by weight L2 norm)
#
# The backward chain is computed here with reference.py (real_backward): softmax
# cross-entropy gradient of the logits, then per layer mask (ReLU6) -> quantize -> weight
# gradient at k = ratio * C_in and at C_in (dense), bias gradient, QAS updates, input
# gradient; the gradient of a global average pool is dx / (H * W) on every pixel (float32).
# What does not fit the harness runs on the host only: a weight gradient larger than the
# output buffer is computed in chunks of kept channels (the dense one of a big layer, as an
# MCU would have to), a conv filter larger than the buffer is updated on the compact slice
# w[..., kept] (what an MCU keeps in RAM for a sparse update) and its dense update is
# skipped, an input gradient whose filter exceeds IGRAD_MAX_W_BYTES of flash is computed on
# the host (its mask / quantization still run on the MCU).
REAL_FORMAT = "dgst-real-step-1"
SCRATCH_BYTES = 100 * 1024  # DGST_SCRATCH_BYTES of harness.c
IGRAD_MAX_W_BYTES = 320 * 1024
_REAL_FIELDS = ("kind", "geometry", "x", "x_zero_point", "x_scale", "w", "weight_scale", "bias",
                "y", "y_zero_point", "y_hi", "relu6")


def _scalar(v):
    return np.asarray(v).reshape(()).item()


def is_real(tensors: "Tensors") -> bool:
    return "meta/format" in tensors.real


def real_layers(tensors: "Tensors") -> list[dict]:
    """The layers of a REAL_FORMAT .npz as Builder-style dicts (shapes checked)."""
    real = tensors.real
    fmt = str(_scalar(real["meta/format"]))
    if fmt != REAL_FORMAT:
        raise ValueError(f"meta/format is {fmt!r}, this generator reads {REAL_FORMAT!r}")
    layers = []
    for name in (str(s) for s in np.asarray(real["meta/layers"]).reshape(-1)):
        missing = [f for f in _REAL_FIELDS if f"{name}/{f}" not in real]
        if missing:
            raise ValueError(f"{name}: missing keys {missing}")
        tensors.used.update(f"{name}/{f}" for f in _REAL_FIELDS)
        get = lambda f: real[f"{name}/{f}"]  # noqa: E731
        kind = str(_scalar(get("kind")))
        if kind not in ("conv", "depthwise"):
            raise ValueError(f"{name}/kind must be conv or depthwise, got {kind!r}")
        g = R.Geometry(*(int(v) for v in np.asarray(get("geometry")).reshape(-1)))
        w = np.asarray(get("w")).astype(np.int8)
        c_in = int(w.shape[-1])
        c_out = c_in if kind == "depthwise" else int(w.shape[0])
        L = {"name": name, "kind": kind, "g": g, "c_in": c_in, "c_out": c_out, "w": w,
             "ws": np.asarray(get("weight_scale"), np.float32),
             "bias": np.asarray(get("bias")).astype(np.int32),
             "x": np.asarray(get("x")).astype(np.int8),
             "x_zero_point": int(_scalar(get("x_zero_point"))),
             "x_scale": float(np.float32(_scalar(get("x_scale")))),
             "y": np.asarray(get("y")).astype(np.int8),
             "y_zero_point": int(_scalar(get("y_zero_point"))),
             "y_hi": int(_scalar(get("y_hi"))), "relu6": bool(_scalar(get("relu6")))}
        want_w = ((1, g.kernel_h, g.kernel_w, c_in) if kind == "depthwise"
                  else (c_out, g.kernel_h, g.kernel_w, c_in))
        for field, want in (("w", want_w), ("x", (g.in_h, g.in_w, c_in)),
                            ("y", (g.out_h, g.out_w, c_out)), ("ws", (c_out,)),
                            ("bias", (c_out,))):
            if tuple(L[field].shape) != want:
                raise ValueError(f"{name}/{field}: shape {L[field].shape}, the layer needs {want}")
        layers.append(L)
    return layers


def real_backward(layers: list[dict], logits, logits_scale: float, logits_zero_point: int,
                  label: int) -> tuple[float, np.ndarray, list[dict]]:
    """The int8 backward chain on the host: (loss, softmax gradient, one dict per layer with
    g (float32 gradient at the layer's output), mask (or None), gm (masked g), dy, dy_scale,
    dx (float32 input gradient; None for the last layer))."""
    loss, grad = R.softmax_xent_grad(np.asarray(logits).astype(np.int8), logits_scale,
                                     logits_zero_point, label)
    g = grad.astype(np.float32)
    steps = []
    for i, L in enumerate(layers):
        y_shape = (L["g"].out_h, L["g"].out_w, L["c_out"])
        if g.size != int(np.prod(y_shape)):
            if g.size != L["c_out"]:
                raise ValueError(f"{L['name']}: gradient of {g.shape} does not reach its output "
                                 f"{y_shape} (only a global average pool is supported)")
            pixels = np.float32(y_shape[0] * y_shape[1])  # global average pool backward
            g = np.broadcast_to((g.reshape(-1) / pixels).astype(np.float32), y_shape)
        g = np.ascontiguousarray(g, np.float32).reshape(y_shape)
        mask = R.build_mask(L["y"], L["y_zero_point"], L["y_hi"]) if L["relu6"] else None
        gm = R.apply_mask(g, mask).reshape(y_shape) if mask is not None else g
        dy, s = R.quantize_grad(gm)
        dy = dy.reshape(y_shape)
        dx = None
        if i + 1 < len(layers):
            dx = (R.conv2d_input_grad if L["kind"] == "conv" else R.depthwise_input_grad)(
                L["g"], dy, s, L["w"], L["ws"])
        steps.append({"g": g, "mask": mask, "gm": gm, "dy": dy, "dy_scale": float(s),
                      "dx": dx})
        g = dx
    return loss, grad, steps


def _real_kept(tensors: "Tensors", L: dict, k: int) -> np.ndarray:
    key = f"{L['name']}/kept{k}"
    if key in tensors.real:
        kept = np.asarray(tensors.real[key], np.int32).reshape(-1)
        if kept.size != k or len(set(kept.tolist())) != k or kept.min() < 0 or \
                kept.max() >= L["c_in"]:
            raise ValueError(f"{key}: need {k} distinct channels in [0, {L['c_in']})")
        return kept
    return R.top_k_channels(L["w"], k, depthwise=L["kind"] == "depthwise")


def build_real(tensors: "Tensors") -> Emitter:
    """The cases of one real training step (REAL_FORMAT .npz), see the comment above."""
    e = Emitter()
    e.FULL_BYTES = 1024  # the real layers are big: hash + samples for all but tiny outputs
    real = tensors.real
    layers = real_layers(tensors)
    meta = {k: real[f"meta/{k}"] for k in ("logits", "logits_scale", "logits_zero_point",
                                           "label")}
    tensors.used.update(f"meta/{k}" for k in ("logits", "logits_scale", "logits_zero_point",
                                             "label", "ratio", "lr", "format", "layers"))
    ratio = float(_scalar(real.get("meta/ratio", 0.02)))
    lr = float(_scalar(real.get("meta/lr", 0.05)))
    logits = np.asarray(meta["logits"]).astype(np.int8).reshape(-1)
    lscale = float(np.float32(_scalar(meta["logits_scale"])))
    lzp, label = int(_scalar(meta["logits_zero_point"])), int(_scalar(meta["label"]))
    if logits.size != layers[0]["c_out"] or not 0 <= label < logits.size:
        raise ValueError(f"meta/logits ({logits.size}) / meta/label ({label}) do not fit "
                         f"{layers[0]['name']} ({layers[0]['c_out']} outputs)")
    loss, grad, steps = real_backward(layers, logits, lscale, lzp, label)
    softmax_grad = e.array("loss_softmax_grad", grad.astype(np.float32))
    e.call(f'check_softmax("loss", {e.array("loss_logits", logits)}, {logits.size}, '
           f'{_f(lscale)}, {lzp}, {label}, {softmax_grad}, {_f(loss)});')
    e.host_only = []

    def wgrad(L, dy, kept, tag):
        g, n, k = L["g"], L["name"], len(kept)
        x_kept = np.ascontiguousarray(L["x"][:, :, kept])
        dyn = e.array(n + "_dy", dy)
        if L["kind"] == "conv":
            gw = R.conv2d_weight_grad(g, x_kept, L["x_zero_point"], dy)
            macs = R.macs_weight_grad(g, k, L["c_out"])
            e.call(f'check_conv_wgrad("{tag}", {e.geometry(n, g)}, {e.array(tag + "_x", x_kept)}, '
                   f'{k}, {L["x_zero_point"]}, {dyn}, {L["c_out"]}, '
                   f'{e.expect(tag + "_gw", gw)}, {macs}u, 0);')
        else:
            gw = R.depthwise_weight_grad(g, x_kept, kept, L["x_zero_point"], dy)
            macs = R.macs_weight_grad(g, k, L["c_out"], depthwise=True)
            e.call(f'check_dw_wgrad("{tag}", {e.geometry(n, g)}, {e.array(tag + "_x", x_kept)}, '
                   f'{e.array(tag + "_kept", kept)}, {k}, {L["x_zero_point"]}, {dyn}, '
                   f'{L["c_out"]}, {e.expect(tag + "_gw", gw)}, {macs}u);')
        e.summary.append((tag, L["kind"], k, L["c_in"], macs))
        return gw

    def update_w(L, kept, gw, dy_scale, tag):
        g, n = L["g"], L["name"]
        k = len(kept)
        common = f'{_f(lr)}, {_f(L["x_scale"])}, {_f(dy_scale)}, {e.array(n + "_ws", L["ws"])}'
        if L["kind"] == "depthwise":
            w_new = R.sgd_qas_update_depthwise(L["w"], kept, gw, lr, L["x_scale"], dy_scale,
                                               L["ws"])
            e.call(f'check_sgd_dw("{tag}", {e.array(n + "_w", L["w"])}, {g.kernel_h}, '
                   f'{g.kernel_w}, {L["c_in"]}, {e.array(tag + "_upd_kept", kept)}, {k}, '
                   f'{e.array(tag + "_gw_in", gw)}, {common}, {e.expect(tag + "_w_new", w_new)});')
            return
        if L["w"].nbytes <= SCRATCH_BYTES:  # the whole filter in RAM
            w, c_in, upd_kept = L["w"], L["c_in"], kept
        else:  # the compact slice w[..., kept] in RAM
            w, c_in = np.ascontiguousarray(L["w"][..., kept]), k
            upd_kept = np.arange(k, dtype=np.int32)
        w_new = R.sgd_qas_update_conv(w, upd_kept, gw, lr, L["x_scale"], dy_scale, L["ws"])
        if w is not L["w"]:  # the slice update is the full one restricted to the slice
            full = R.sgd_qas_update_conv(L["w"], kept, gw, lr, L["x_scale"], dy_scale, L["ws"])
            assert np.array_equal(full[..., kept], w_new)
        e.call(f'check_sgd_conv("{tag}", {e.array(tag + "_w_in", w)}, {L["c_out"]}, '
               f'{g.kernel_h}, {g.kernel_w}, {c_in}, {e.array(tag + "_upd_kept", upd_kept)}, '
               f'{k}, {e.array(tag + "_gw_in", gw)}, {common}, '
               f'{e.expect(tag + "_w_new", w_new)});')

    for i, (L, st) in enumerate(zip(layers, steps)):
        n, g, dy, s = L["name"], L["g"], st["dy"], st["dy_scale"]
        # the gradient that reached the layer's output: ReLU6 mask, int8 quantization
        if st["mask"] is not None:
            e.call(f'check_build_mask("{n}", {e.array(n + "_y", L["y"])}, {L["y"].size}, '
                   f'{L["y_zero_point"]}, {L["y_hi"]}, {e.expect(n + "_mask", st["mask"])});')
            e.call(f'check_apply_mask("{n}", {e.array(n + "_g", st["g"])}, '
                   f'{e.array(n + "_mask_in", st["mask"])}, {st["g"].size}, '
                   f'{e.expect(n + "_gmasked", st["gm"])});')
        e.call(f'check_quantize("{n}", {e.array(n + "_gq_in", st["gm"])}, {st["gm"].size}, '
               f'{e.expect(n + "_gq", dy.reshape(-1))}, {_f(s)});')
        # weight gradients: sparse (k = ratio * C_in) and dense (all C_in channels)
        c_in = L["c_in"]
        k = k_of(ratio, c_in)
        kept = _real_kept(tensors, L, k)
        gw_sparse = wgrad(L, dy, kept, f"{n}_k{k}")
        per_channel = 4 * g.kernel_h * g.kernel_w * (1 if L["kind"] == "depthwise"
                                                     else L["c_out"])
        chunk = max(1, SCRATCH_BYTES // per_channel)
        everything = np.arange(c_in, dtype=np.int32)
        if c_in <= chunk:
            gw_dense = wgrad(L, dy, everything, f"{n}_k{c_in}")
        else:  # the dense gradient does not fit RAM: in chunks of channels
            gw_dense = None
            for j, c0 in enumerate(range(0, c_in, chunk)):
                wgrad(L, dy, everything[c0:c0 + chunk], f"{n}_k{c_in}_part{j}")
        gb = R.bias_grad(dy)
        e.call(f'check_bias_grad("{n}", {e.array(n + "_dy", dy)}, {dy.shape[0] * dy.shape[1]}, '
               f'{dy.shape[2]}, {e.expect(n + "_gb", gb)});')
        # QAS updates: sparse, and dense when the filter fits RAM
        update_w(L, kept, gw_sparse, s, f"{n}_k{k}")
        if gw_dense is not None and L["w"].nbytes <= SCRATCH_BYTES:
            update_w(L, everything, gw_dense, s, f"{n}_k{c_in}")
        b_new = R.sgd_qas_update_bias(L["bias"], gb, lr, L["x_scale"], s, L["ws"])
        e.call(f'check_sgd_bias("{n}", {e.array(n + "_b", L["bias"])}, {L["c_out"]}, '
               f'{e.array(n + "_gb_in", gb)}, {_f(lr)}, {_f(L["x_scale"])}, {_f(s)}, '
               f'{e.array(n + "_ws", L["ws"])}, {e.expect(n + "_b_new", b_new)});')
        # input gradient (to the next layer of the chain)
        if st["dx"] is None:
            continue
        dx_bytes = 4 * g.in_h * g.in_w * c_in
        if L["w"].nbytes > IGRAD_MAX_W_BYTES or dx_bytes > SCRATCH_BYTES:
            e.host_only.append(f"{n} input gradient (filter {L['w'].nbytes} bytes, "
                               f"dx {dx_bytes} bytes)")
            continue
        common = (f'"{n}", {e.geometry(n, g)}, {e.array(n + "_dy", dy)}, {_f(s)}, '
                  f'{e.array(n + "_w", L["w"])}, {e.array(n + "_ws", L["ws"])}, {c_in}')
        if L["kind"] == "conv":
            macs = R.macs_weight_grad(g, c_in, L["c_out"])
            e.call(f'check_conv_igrad({common}, {L["c_out"]}, {e.expect(n + "_dx", st["dx"])}, '
                   f'{macs}u);')
        else:
            macs = R.macs_weight_grad(g, c_in, L["c_out"], depthwise=True)
            e.call(f'check_dw_igrad({common}, {e.expect(n + "_dx", st["dx"])}, {macs}u);')
    return e


def render(e: Emitter, source: str) -> str:
    head = ("/* Generated by tflm_ops/mcu/gen_vectors.py (" + source + "). Do not edit. */\n"
            "#ifndef DGST_VECTORS_H_\n#define DGST_VECTORS_H_\n\n")
    body = "".join(e.arrays)
    run = "static void dgst_run_cases(void) {\n" + "".join(
        f"  {c}\n" for c in e.calls) + "}\n"
    return head + body + "\n" + run + "\n#endif /* DGST_VECTORS_H_ */\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join(HERE, "..", "build", "mcu", "vectors.h"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--npz", help="real tensors (<layer>/<field> keys) replacing random ones")
    p.add_argument("--list", action="store_true", help="print the layers and their shapes")
    args = p.parse_args(argv)
    tensors = Tensors(args.seed, args.npz)
    real = is_real(tensors)
    if args.list and real:
        for L in real_layers(tensors):
            print(L["name"], L["kind"], L["g"], {"x": L["x"].shape, "w": L["w"].shape,
                                                 "y": L["y"].shape, "relu6": L["relu6"]})
        return 0
    if args.list:
        for name, (kind, g, c_in, c_out) in LAYERS.items():
            print(name, kind, g, {k: v for k, v in shapes(name).items()})
        return 0
    emitter = build_real(tensors) if real else build(tensors)
    for item in getattr(emitter, "host_only", []):
        print(f"gen_vectors: host only: {item}")
    unused = sorted(set(tensors.real) - tensors.used - {k for k in tensors.real
                                                        if "/kept" in k or k.startswith("info/")})
    if unused:
        print(f"gen_vectors: warning: unused keys in {args.npz}: {unused}", file=sys.stderr)
    text = render(emitter, f"npz={args.npz}" if args.npz else f"random, seed {args.seed}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, args.out)
    print(f"gen_vectors: {len(emitter.calls)} cases, {len(text) / 1e6:.1f} MB -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
