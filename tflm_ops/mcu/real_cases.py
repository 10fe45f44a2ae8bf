"""Firmware vectors of one real training step (an .npz in the `real_step` format, written by
`dgst_tf.tflm_ops.real_vectors` from a real model), on that model's own layer shapes.

    from dgst_tf.tflm_ops.mcu import real_cases
    from dgst_tf.tflm_ops.mcu.c_emitter import render

    emitter = real_cases.build(dict(np.load("real_step.npz")))
    text = render(emitter, "npz=real_step.npz")

The backward chain is computed with the NumPy reference (`real_step.backward`): softmax
cross-entropy gradient of the logits, then per layer mask (ReLU6) -> quantize -> weight
gradient at k = ratio * C_in and at C_in (dense), bias gradient, QAS updates, input
gradient; the gradient of a global average pool is dx / (H * W) on every pixel (float32).
What does not fit the harness runs on the host only: a weight gradient larger than the
output buffer is computed in chunks of kept channels (the dense one of a big layer, as an
MCU would have to), a conv filter larger than the buffer is updated on the compact slice
w[..., kept] (what an MCU keeps in RAM for a sparse update) and its dense update is
skipped, an input gradient whose filter exceeds IGRAD_MAX_W_BYTES of flash is computed on
the host (its mask / quantization still run on the MCU).
"""
from __future__ import annotations

import numpy as np

from dgst_tf.core.geometry import channels_for_ratio
from dgst_tf.tflm_ops import real_step
from dgst_tf.tflm_ops import reference as R
from dgst_tf.tflm_ops.mcu import cases
from dgst_tf.tflm_ops.mcu.c_emitter import Emitter, c_float

SCRATCH_BYTES = 100 * 1024  # DGST_SCRATCH_BYTES of harness.c
IGRAD_MAX_W_BYTES = 320 * 1024
FULL_BYTES = 1024  # the real layers are big: hash + samples for all but tiny outputs


def build(arrays: dict, used: set | None = None) -> Emitter:
    """The cases of the training step in ``arrays``; the keys read are added to ``used``."""
    used = set() if used is None else used
    e = Emitter(full_bytes=FULL_BYTES)
    layers = real_step.read_layers(arrays, used)
    used.update(f"meta/{k}" for k in real_step.META_FIELDS)
    scalar = real_step.scalar
    ratio = float(scalar(arrays.get("meta/ratio", 0.02)))
    lr = float(scalar(arrays.get("meta/lr", 0.05)))
    logits = np.asarray(arrays["meta/logits"]).astype(np.int8).reshape(-1)
    lscale = float(np.float32(scalar(arrays["meta/logits_scale"])))
    lzp, label = int(scalar(arrays["meta/logits_zero_point"])), int(scalar(arrays["meta/label"]))
    if logits.size != layers[0]["c_out"] or not 0 <= label < logits.size:
        raise ValueError(f"meta/logits ({logits.size}) / meta/label ({label}) do not fit "
                         f"{layers[0]['name']} ({layers[0]['c_out']} outputs)")
    loss, grad, steps = real_step.backward(layers, logits, lscale, lzp, label)
    softmax_grad = e.array("loss_softmax_grad", grad.astype(np.float32))
    e.call(f'check_softmax("loss", {e.array("loss_logits", logits)}, {logits.size}, '
           f'{c_float(lscale)}, {lzp}, {label}, {softmax_grad}, {c_float(loss)});')
    for L, st in zip(layers, steps):
        _layer_step(e, arrays, L, st, ratio, lr)
    return e


def _layer_step(e: Emitter, arrays, L: dict, st: dict, ratio: float, lr: float):
    """The checks of one layer: its output gradient, weight and bias gradients and updates,
    and its input gradient (to the next layer of the chain)."""
    dy, s, c_in = st["dy"], st["dy_scale"], L["c_in"]
    _output_gradient(e, L, st)
    k = channels_for_ratio(ratio, c_in)
    kept = real_step.kept_channels(arrays, L, k)
    gw_sparse = cases.weight_grad(e, L, dy, kept, f"{L['name']}_k{k}")
    everything = np.arange(c_in, dtype=np.int32)
    gw_dense = _dense_weight_grad(e, L, dy, everything)
    gb = cases.bias_grad(e, L, dy)
    _weight_update(e, L, kept, gw_sparse, s, lr, f"{L['name']}_k{k}")
    if gw_dense is not None and L["w"].nbytes <= SCRATCH_BYTES:
        _weight_update(e, L, everything, gw_dense, s, lr, f"{L['name']}_k{c_in}")
    cases.bias_update(e, L, gb, lr, s)
    if st["dx"] is not None:
        _input_grad(e, L, st)


def _output_gradient(e: Emitter, L: dict, st: dict):
    """The gradient that reached the layer's output: ReLU6 mask, int8 quantization."""
    n, dy = L["name"], st["dy"]
    if st["mask"] is not None:
        e.call(f'check_build_mask("{n}", {e.array(n + "_y", L["y"])}, {L["y"].size}, '
               f'{L["y_zero_point"]}, {L["y_hi"]}, {e.expect(n + "_mask", st["mask"])});')
        e.call(f'check_apply_mask("{n}", {e.array(n + "_g", st["g"])}, '
               f'{e.array(n + "_mask_in", st["mask"])}, {st["g"].size}, '
               f'{e.expect(n + "_gmasked", st["gm"])});')
    e.call(f'check_quantize("{n}", {e.array(n + "_gq_in", st["gm"])}, {st["gm"].size}, '
           f'{e.expect(n + "_gq", dy.reshape(-1))}, {c_float(st["dy_scale"])});')


def _dense_weight_grad(e: Emitter, L: dict, dy, everything):
    """The weight gradient of all C_in channels: whole, or (when it does not fit the output
    buffer) in chunks of channels, and then None."""
    g, n, c_in = L["g"], L["name"], L["c_in"]
    per_channel = 4 * g.kernel_h * g.kernel_w * (1 if L["kind"] == "depthwise" else L["c_out"])
    chunk = max(1, SCRATCH_BYTES // per_channel)
    if c_in <= chunk:
        return cases.weight_grad(e, L, dy, everything, f"{n}_k{c_in}")
    for j, c0 in enumerate(range(0, c_in, chunk)):
        cases.weight_grad(e, L, dy, everything[c0:c0 + chunk], f"{n}_k{c_in}_part{j}")
    return None


def _weight_update(e: Emitter, L: dict, kept, gw, dy_scale: float, lr: float, tag: str):
    """The QAS SGD step of the weights at ``kept``: the whole filter in RAM, or (a conv filter
    larger than the buffer) the compact slice w[..., kept]."""
    g, n = L["g"], L["name"]
    k = len(kept)
    common = (f'{c_float(lr)}, {c_float(L["x_scale"])}, {c_float(dy_scale)}, '
              f'{e.array(n + "_ws", L["ws"])}')
    if L["kind"] == "depthwise":
        w_new = R.sgd_qas_update_depthwise(L["w"], kept, gw, lr, L["x_scale"], dy_scale, L["ws"])
        e.call(f'check_sgd_dw("{tag}", {e.array(n + "_w", L["w"])}, {g.kernel_h}, '
               f'{g.kernel_w}, {L["c_in"]}, {e.array(tag + "_upd_kept", kept)}, {k}, '
               f'{e.array(tag + "_gw_in", gw)}, {common}, {e.expect(tag + "_w_new", w_new)});')
        return
    if L["w"].nbytes <= SCRATCH_BYTES:
        w, c_in, upd_kept = L["w"], L["c_in"], kept
    else:
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


def _input_grad(e: Emitter, L: dict, st: dict):
    """The input gradient on the MCU, or on the host only when the filter or dx is too big."""
    g, n = L["g"], L["name"]
    dx_bytes = 4 * g.in_h * g.in_w * L["c_in"]
    if L["w"].nbytes > IGRAD_MAX_W_BYTES or dx_bytes > SCRATCH_BYTES:
        e.host_only.append(f"{n} input gradient (filter {L['w'].nbytes} bytes, "
                           f"dx {dx_bytes} bytes)")
        return
    cases.input_grad(e, L, st["dy"], st["dy_scale"], dx=st["dx"])
