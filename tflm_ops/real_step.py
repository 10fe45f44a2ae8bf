"""The .npz format of one real training step ("dgst-real-step-1") and its int8 backward chain.

`real_vectors` writes it from a Keras model; `mcu.real_cases` turns it into firmware checks.

    from dgst_tf.tflm_ops import real_step

    arrays = dict(np.load("real_step.npz"))
    layers = real_step.read_layers(arrays)          # backward order, the classifier first
    loss, grad, steps = real_step.backward(layers, arrays["meta/logits"], 0.1, -3, label=3)

Keys (every layer named in ``meta/layers``):

    meta/format            FORMAT
    meta/layers            layer names in backward order (the classifier first); the input
                           of each is the output of the next one (or its global average)
    meta/logits, meta/logits_scale, meta/logits_zero_point, meta/label: the int8 logits
    meta/ratio (0.02), meta/lr (0.05): kept input-channel ratio of the sparse update, SGD lr
    <layer>/kind           "conv" (Conv2D and Dense as a 1x1 conv) or "depthwise"
    <layer>/geometry       the 12 ints of dgst_conv_geometry
    <layer>/x, x_zero_point, x_scale   saved int8 input (all channels)
    <layer>/w, weight_scale, bias      int8 OHWI (depthwise [1, kh, kw, C]), float32, int32
    <layer>/y, y_zero_point, y_hi, relu6   int8 output; relu6 = 1 if a ReLU6 follows
    <layer>/kept<k>        optional: the kept channels (default top-k by weight L2 norm)
    info/...               free-form notes (not read)

Imports only NumPy and the kernel reference.
"""
from __future__ import annotations

import numpy as np

from dgst_tf.tflm_ops import reference as R

FORMAT = "dgst-real-step-1"
LAYER_FIELDS = ("kind", "geometry", "x", "x_zero_point", "x_scale", "w", "weight_scale", "bias",
                "y", "y_zero_point", "y_hi", "relu6")
META_FIELDS = ("logits", "logits_scale", "logits_zero_point", "label", "ratio", "lr", "format",
               "layers")


def scalar(v):
    """The one value of a 0-d (or 1-element) array, as a Python scalar."""
    return np.asarray(v).reshape(()).item()


def is_real_step(arrays) -> bool:
    """Whether ``arrays`` (an .npz as a dict) is in this format."""
    return "meta/format" in arrays


def read_layers(arrays, used: set | None = None) -> list[dict]:
    """The layers of a FORMAT .npz as dicts (shapes checked), in backward order.

    Each dict holds name, kind, g (`reference.Geometry`), c_in, c_out, w, ws, bias, x,
    x_zero_point, x_scale, y, y_zero_point, y_hi, relu6. The keys read are added to ``used``.
    """
    fmt = str(scalar(arrays["meta/format"]))
    if fmt != FORMAT:
        raise ValueError(f"meta/format is {fmt!r}, this generator reads {FORMAT!r}")
    used = set() if used is None else used
    names = [str(s) for s in np.asarray(arrays["meta/layers"]).reshape(-1)]
    return [_read_layer(arrays, name, used) for name in names]


def _read_layer(arrays, name: str, used: set) -> dict:
    missing = [f for f in LAYER_FIELDS if f"{name}/{f}" not in arrays]
    if missing:
        raise ValueError(f"{name}: missing keys {missing}")
    used.update(f"{name}/{f}" for f in LAYER_FIELDS)
    get = lambda f: arrays[f"{name}/{f}"]  # noqa: E731
    kind = str(scalar(get("kind")))
    if kind not in ("conv", "depthwise"):
        raise ValueError(f"{name}/kind must be conv or depthwise, got {kind!r}")
    g = R.Geometry(*(int(v) for v in np.asarray(get("geometry")).reshape(-1)))
    w = np.asarray(get("w")).astype(np.int8)
    c_in = int(w.shape[-1])
    c_out = c_in if kind == "depthwise" else int(w.shape[0])
    layer = {"name": name, "kind": kind, "g": g, "c_in": c_in, "c_out": c_out, "w": w,
             "ws": np.asarray(get("weight_scale"), np.float32),
             "bias": np.asarray(get("bias")).astype(np.int32),
             "x": np.asarray(get("x")).astype(np.int8),
             "x_zero_point": int(scalar(get("x_zero_point"))),
             "x_scale": float(np.float32(scalar(get("x_scale")))),
             "y": np.asarray(get("y")).astype(np.int8),
             "y_zero_point": int(scalar(get("y_zero_point"))),
             "y_hi": int(scalar(get("y_hi"))), "relu6": bool(scalar(get("relu6")))}
    want_w = ((1, g.kernel_h, g.kernel_w, c_in) if kind == "depthwise"
              else (c_out, g.kernel_h, g.kernel_w, c_in))
    for field, want in (("w", want_w), ("x", (g.in_h, g.in_w, c_in)),
                        ("y", (g.out_h, g.out_w, c_out)), ("ws", (c_out,)), ("bias", (c_out,))):
        if tuple(layer[field].shape) != want:
            raise ValueError(f"{name}/{field}: shape {layer[field].shape}, the layer needs {want}")
    return layer


def backward(layers: list[dict], logits, logits_scale: float, logits_zero_point: int,
             label: int) -> tuple[float, np.ndarray, list[dict]]:
    """The int8 backward chain on the host: (loss, softmax gradient, one dict per layer with
    g (float32 gradient at the layer's output), mask (or None), gm (masked g), dy, dy_scale,
    dx (float32 input gradient; None for the last layer))."""
    loss, grad = R.softmax_xent_grad(np.asarray(logits).astype(np.int8), logits_scale,
                                     logits_zero_point, label)
    g = grad.astype(np.float32)
    steps = []
    for i, layer in enumerate(layers):
        g = _at_output(layer, g)
        mask = (R.build_mask(layer["y"], layer["y_zero_point"], layer["y_hi"])
                if layer["relu6"] else None)
        gm = R.apply_mask(g, mask).reshape(g.shape) if mask is not None else g
        dy, s = R.quantize_grad(gm)
        dy = dy.reshape(g.shape)
        dx = None
        if i + 1 < len(layers):
            input_grad = (R.conv2d_input_grad if layer["kind"] == "conv"
                          else R.depthwise_input_grad)
            dx = input_grad(layer["g"], dy, s, layer["w"], layer["ws"])
        steps.append({"g": g, "mask": mask, "gm": gm, "dy": dy, "dy_scale": float(s),
                      "dx": dx})
        g = dx
    return loss, grad, steps


def _at_output(layer: dict, g: np.ndarray) -> np.ndarray:
    """The gradient ``g`` of the next layer's input as the gradient of ``layer``'s output:
    the same tensor, or (through a global average pool) dx / (H * W) on every pixel."""
    y_shape = (layer["g"].out_h, layer["g"].out_w, layer["c_out"])
    if g.size != int(np.prod(y_shape)):
        if g.size != layer["c_out"]:
            raise ValueError(f"{layer['name']}: gradient of {g.shape} does not reach its output "
                             f"{y_shape} (only a global average pool is supported)")
        pixels = np.float32(y_shape[0] * y_shape[1])
        g = np.broadcast_to((g.reshape(-1) / pixels).astype(np.float32), y_shape)
    return np.ascontiguousarray(g, np.float32).reshape(y_shape)


def kept_channels(arrays, layer: dict, k: int) -> np.ndarray:
    """The k kept channels of ``layer``: ``<layer>/kept<k>`` if given (checked), else the
    top-k by weight L2 norm (`reference.top_k_channels`, as in Lin et al. 2022)."""
    key = f"{layer['name']}/kept{k}"
    if key in arrays:
        kept = np.asarray(arrays[key], np.int32).reshape(-1)
        if kept.size != k or len(set(kept.tolist())) != k or kept.min() < 0 or \
                kept.max() >= layer["c_in"]:
            raise ValueError(f"{key}: need {k} distinct channels in [0, {layer['c_in']})")
        return kept
    return R.top_k_channels(layer["w"], k, depthwise=layer["kind"] == "depthwise")
