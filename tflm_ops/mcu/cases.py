"""Firmware checks of one kernel call each: the expected output from the NumPy reference,
emitted as a check_* call of mcu/harness.c. Shared by the synthetic and the real-step vectors.

    from dgst_tf.tflm_ops.mcu import cases

    grad = cases.weight_grad(e, layer, dy, kept, "b3_expand_k4")
    cases.bias_grad(e, layer, dy)

``layer`` is a dict with name, kind ("conv" or "depthwise"), g (`reference.Geometry`), c_in,
c_out, w, ws, bias, x, x_zero_point, x_scale (see `real_step.read_layers`).
"""
from __future__ import annotations

import numpy as np

from dgst_tf.tflm_ops import reference as R
from dgst_tf.tflm_ops.mcu.c_emitter import Emitter, c_float


def weight_grad(e: Emitter, layer: dict, dy, kept, tag: str, ref_loop: bool = False):
    """The weight gradient at the ``kept`` input channels (also through the reference loop of
    the Conv2D core when ``ref_loop``); returns it."""
    g, n, k = layer["g"], layer["name"], len(kept)
    x_kept = np.ascontiguousarray(layer["x"][:, :, kept])
    dyn = e.array(n + "_dy", dy)
    if layer["kind"] == "conv":
        grad = R.conv2d_weight_grad(g, x_kept, layer["x_zero_point"], dy)
        macs = R.macs_weight_grad(g, k, layer["c_out"])
        e.call(f'check_conv_wgrad("{tag}", {e.geometry(n, g)}, {e.array(tag + "_x", x_kept)}, '
               f'{k}, {layer["x_zero_point"]}, {dyn}, {layer["c_out"]}, '
               f'{e.expect(tag + "_gw", grad)}, {macs}u, {int(ref_loop)});')
    else:
        grad = R.depthwise_weight_grad(g, x_kept, kept, layer["x_zero_point"], dy)
        macs = R.macs_weight_grad(g, k, layer["c_out"], depthwise=True)
        e.call(f'check_dw_wgrad("{tag}", {e.geometry(n, g)}, {e.array(tag + "_x", x_kept)}, '
               f'{e.array(tag + "_kept", kept)}, {k}, {layer["x_zero_point"]}, {dyn}, '
               f'{layer["c_out"]}, {e.expect(tag + "_gw", grad)}, {macs}u);')
    e.summary.append((tag, layer["kind"], k, layer["c_in"], macs))
    return grad


def bias_grad(e: Emitter, layer: dict, dy):
    """The bias gradient (sum of dy over pixels); returns it."""
    n = layer["name"]
    grad = R.bias_grad(dy)
    e.call(f'check_bias_grad("{n}", {e.array(n + "_dy", dy)}, {dy.shape[0] * dy.shape[1]}, '
           f'{dy.shape[2]}, {e.expect(n + "_gb", grad)});')
    return grad


def input_grad(e: Emitter, layer: dict, dy, dy_scale: float, dx=None):
    """The input gradient (computed here unless ``dx`` is given); returns it."""
    g, n = layer["g"], layer["name"]
    common = (f'"{n}", {e.geometry(n, g)}, {e.array(n + "_dy", dy)}, {c_float(dy_scale)}, '
              f'{e.array(n + "_w", layer["w"])}, {e.array(n + "_ws", layer["ws"])}, '
              f'{layer["c_in"]}')
    if layer["kind"] == "conv":
        if dx is None:
            dx = R.conv2d_input_grad(g, dy, dy_scale, layer["w"], layer["ws"])
        macs = R.macs_weight_grad(g, layer["c_in"], layer["c_out"])
        e.call(f'check_conv_igrad({common}, {layer["c_out"]}, {e.expect(n + "_dx", dx)}, '
               f'{macs}u);')
    else:
        if dx is None:
            dx = R.depthwise_input_grad(g, dy, dy_scale, layer["w"], layer["ws"])
        macs = R.macs_weight_grad(g, layer["c_in"], layer["c_out"], depthwise=True)
        e.call(f'check_dw_igrad({common}, {e.expect(n + "_dx", dx)}, {macs}u);')
    return dx


def bias_update(e: Emitter, layer: dict, grad_b, lr: float, dy_scale: float):
    """The QAS SGD step of the int32 bias."""
    n = layer["name"]
    b_new = R.sgd_qas_update_bias(layer["bias"], grad_b, lr, layer["x_scale"], dy_scale,
                                  layer["ws"])
    e.call(f'check_sgd_bias("{n}", {e.array(n + "_b", layer["bias"])}, {layer["c_out"]}, '
           f'{e.array(n + "_gb_in", grad_b)}, {c_float(lr)}, {c_float(layer["x_scale"])}, '
           f'{c_float(dy_scale)}, {e.array(n + "_ws", layer["ws"])}, '
           f'{e.expect(n + "_b_new", b_new)});')

