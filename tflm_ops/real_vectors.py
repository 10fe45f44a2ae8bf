"""The tensors of one real training step, for the MCU firmware (``gen_vectors --npz``).

    python -m dgst_tf.tflm_ops.real_vectors --out build/real_step.npz [--image-size 96] \
        [--ratio 0.02]
    make -C tflm_ops vectors mcu run-qemu NPZ=$PWD/tflm_ops/build/real_step.npz

Takes the ImageNet-pretrained MobileNetV2-1.0 of ``dgst_tf.models.mobilenet_v2`` (torchvision
weights, offline; 10 classes: the classifier is newly initialised, seeded), folds its
BatchNorms (``dgst_tf.core.bn_folding.fold_batchnorm``), runs one real image through it
(``skimage.data.chelsea()``, a cat, label 3 = CIFAR-10 "cat"; or the first cat of the
CIFAR-10 test split with ``--image cifar10``, the default when ``DGST_CIFAR10`` is set) and
quantizes the tail of the network per the kernels' int8 scheme (``core/dgst_train_kernels.h``):

* weights: int8 OHWI (depthwise ``[1, kh, kw, C]``), symmetric per output channel,
  ``weight_scale[o] = max |W[o]| / 127``; biases int32 ``round(b / (weight_scale * x_scale))``;
* ReLU6 outputs: scale 6/255, zero point -128 (real 0 -> -128, real 6 -> 127);
* other activations (block outputs, logits): per-tensor asymmetric min/max over 255 codes.

Layers (backward order, the ``meta/layers`` of the .npz): ``classifier`` (Dense 1280 -> 10 as
a 1x1 conv on the globally pooled 1x1x1280 features), ``head_conv`` (1x1, 320 -> 1280,
ReLU6), and the last inverted-residual block ``block_16_project`` (960 -> 320, linear),
``block_16_depthwise`` (3x3, 960, ReLU6), ``block_16_expand`` (160 -> 960, ReLU6). The
backward chain itself (softmax cross-entropy gradient of the int8 logits, masks,
quantization, input gradients) is `real_step.backward` on the NumPy reference, bit-exact with
the C (the firmware checks of ``mcu/real_cases.py``); this module also compares that int8
chain with TensorFlow's float gradient of the same loss (cosine per layer, stored as
``info/cosine/<layer>``). The .npz keys are those of `real_step`.

Imports TensorFlow and dgst_tf (host only, inside the functions; the firmware never sees them).
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import time

import numpy as np

from dgst_tf.core.files import write_atomically
from dgst_tf.core.geometry import channels_for_ratio
from dgst_tf.tflm_ops import real_step
from dgst_tf.tflm_ops import reference as R

HERE = os.path.dirname(os.path.abspath(__file__))
FORMAT = real_step.FORMAT
RELU6_SCALE, RELU6_ZP = np.float32(6.0 / 255.0), -128
CAT = 3  # CIFAR-10 "cat"
# (layer, input tensor, output tensor (after the activation), ReLU6 follows)
TAIL = (("classifier", "global_pool", "classifier", False),
        ("head_conv", "block_16_project", "head_relu", True),
        ("block_16_project", "block_16_depthwise_relu", "block_16_project", False),
        ("block_16_depthwise", "block_16_expand_relu", "block_16_depthwise_relu", True),
        ("block_16_expand", "block_15_add", "block_16_expand_relu", True))


# ----------------------------------------------------------------------------- quantization
def _round(x):
    return R.round_half_away(np.asarray(x, np.float64))


def quantize_relu6(x: np.ndarray) -> np.ndarray:
    q = _round(np.asarray(x, np.float32) / RELU6_SCALE) + RELU6_ZP
    return np.clip(q, -128, 127).astype(np.int8)


def quantize_linear(x: np.ndarray) -> tuple[np.ndarray, np.float32, int]:
    """Per-tensor asymmetric int8 (the range always contains 0)."""
    x = np.asarray(x, np.float64)
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = np.float32((hi - lo) / 255.0 if hi > lo else 1.0)
    zp = int(np.clip(_round(-128.0 - lo / float(scale)), -128, 127))
    q = np.clip(_round(x / float(scale)) + zp, -128, 127).astype(np.int8)
    return q, scale, zp


def quantize_weights(kernel: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Keras kernel -> (int8 OHWI or [1, kh, kw, C], float32 per-output-channel scales)."""
    k = np.asarray(kernel, np.float64)
    if kind == "dense":  # [C_in, C_out] -> [C_out, 1, 1, C_in]
        w = k.T[:, None, None, :]
    elif kind == "depthwise":  # [kh, kw, C, 1] -> [1, kh, kw, C]
        w = np.transpose(k, (3, 0, 1, 2))
    else:  # HWIO -> OHWI
        w = np.transpose(k, (3, 0, 1, 2))
    axes = (0, 1, 2) if kind == "depthwise" else (1, 2, 3)
    m = np.abs(w).max(axis=axes, keepdims=True)
    scale = np.where(m > 0, m / 127.0, 1.0).astype(np.float32)
    q = np.clip(_round(w / scale.astype(np.float64)), -127, 127).astype(np.int8)
    return q, scale.reshape(-1)


def quantize_bias(b: np.ndarray, weight_scale: np.ndarray, x_scale) -> np.ndarray:
    den = weight_scale.astype(np.float64) * float(x_scale)
    return np.clip(_round(np.asarray(b, np.float64) / den), -2**31, 2**31 - 1).astype(np.int32)


# ----------------------------------------------------------------------------- model
def _tf():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf
    try:
        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:  # already initialised
        pass
    return tf


def load_image(size: int, cifar10: bool = False) -> tuple[np.ndarray, int, str]:
    """(uint8-valued float32 [size, size, 3], label, description)."""
    tf = _tf()
    if cifar10:
        from dgst_tf import data
        split = data.cifar10("test", image_size=(size, size), batch_size=None,
                             preprocessing=None, shuffle=False)
        for image, label in split.dataset:
            if int(label) == CAT:
                return image.numpy().astype(np.float32), CAT, "CIFAR-10 test, first cat"
        raise RuntimeError("no cat in the CIFAR-10 test split")
    from skimage import data as skdata
    img = skdata.chelsea()  # 300 x 451 RGB, a cat
    h, w = img.shape[:2]
    s = min(h, w)
    crop = img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    out = tf.image.resize(crop[None].astype(np.float32), (size, size), antialias=True)[0]
    return np.clip(out.numpy(), 0, 255).astype(np.float32), CAT, "skimage.data.chelsea()"


def build_model(size: int, seed: int = 0):
    from dgst_tf.core.bn_folding import fold_batchnorm
    from dgst_tf.models import mobilenet_v2
    model = mobilenet_v2(width=1.0, input_shape=(size, size, 3), classes=10,
                         weights="imagenet", seed=seed)
    return fold_batchnorm(model)


def _geometry(layer, in_shape):
    if type(layer).__name__ == "Dense":
        return R.Geometry.conv(1, 1, 1)
    kh, kw = layer.kernel_size
    return R.Geometry.conv(int(in_shape[0]), int(in_shape[1]), kh, kw, stride=layer.strides,
                           dilation=layer.dilation_rate, padding=layer.padding)


def export(size: int = 96, ratio: float = 0.02, lr: float = 0.05, cifar10: bool = False,
           seed: int = 0) -> dict:
    """The `real_step` arrays (a dict for np.savez)."""
    _tf()  # one thread each, before the model is built
    folded = build_model(size, seed)
    image, label, source = load_image(size, cifar10)
    acts = _activations(folded, image)
    out = {"meta/format": np.array(FORMAT), "meta/label": np.int32(label),
           "meta/ratio": np.float32(ratio), "meta/lr": np.float32(lr),
           "info/model": np.array(f"MobileNetV2-1.0 ImageNet (torchvision), BN folded, "
                                  f"{size}x{size} input, 10 classes"),
           "info/image": np.array(source)}
    out.update(_quantized_tail(folded, acts))
    out.update(_compare_with_float(out, folded, acts, label, ratio))
    return out


def _activations(folded, image) -> dict:
    """The float activations of the TAIL tensors (and the block 16 pre-activations)."""
    from dgst_tf.core.keras_compat import keras
    from dgst_tf.models.mobilenet_v2 import preprocess_input
    x_in = preprocess_input(image[None])
    names = sorted({t for _, i, o, _ in TAIL for t in (i, o)} | {"block_16_expand",
                                                                  "block_16_depthwise"})
    probe = keras.Model(folded.input, [folded.get_layer(n).output for n in names])
    return dict(zip(names, (np.asarray(a)[0] for a in probe(x_in, training=False))))


def _quantized_tail(folded, acts: dict) -> dict:
    """The int8 layers of TAIL (``<layer>/...`` keys, ``meta/layers``, ``meta/logits*``)."""
    out, quantized = {}, {}  # tensor name -> (q, scale, zp), shared by producer and consumer

    def act(name, relu6):
        if name not in quantized:
            a = acts[name]
            quantized[name] = ((quantize_relu6(a), RELU6_SCALE, RELU6_ZP) if relu6
                               else quantize_linear(a))
        return quantized[name]

    for name, x_name, y_name, relu6 in TAIL:
        layer = folded.get_layer(name)
        kind = {"Dense": "dense", "DepthwiseConv2D": "depthwise"}.get(type(layer).__name__,
                                                                       "conv")
        xq, xs, xzp = act(x_name, x_name.endswith("_relu") or x_name == "global_pool")
        yq, ys, yzp = act(y_name, relu6)
        if kind == "dense":
            xq, yq = xq.reshape(1, 1, -1), yq.reshape(1, 1, -1)
        weights = layer.get_weights()
        kernel = weights[0]
        bias = weights[1] if len(weights) > 1 else np.zeros(kernel.shape[-1] if kind != "depthwise"
                                                            else kernel.shape[2])
        w, ws = quantize_weights(kernel, kind)
        p = name + "/"
        out.update({p + "kind": np.array("depthwise" if kind == "depthwise" else "conv"),
                    p + "geometry": np.array(_geometry(layer, xq.shape).astuple(), np.int32),
                    p + "x": xq, p + "x_zero_point": np.int32(xzp), p + "x_scale": np.float32(xs),
                    p + "w": w, p + "weight_scale": ws,
                    p + "bias": quantize_bias(bias, ws, xs), p + "y": yq,
                    p + "y_zero_point": np.int32(yzp), p + "y_hi": np.int32(127),
                    p + "relu6": np.int32(relu6)})
    out["meta/layers"] = np.array([name for name, _, _, _ in TAIL])
    lq, ls, lzp = quantized["classifier"]
    out.update({"meta/logits": lq.reshape(-1), "meta/logits_scale": np.float32(ls),
                "meta/logits_zero_point": np.int32(lzp)})
    return out


def _compare_with_float(out: dict, folded, acts: dict, label: int, ratio: float) -> dict:
    """``info/`` keys: the int8 chain (what the firmware checks) against TensorFlow's float
    gradient (losses, cosine per layer) and each layer's kept channels at ``ratio``."""
    layers = real_step.read_layers(out)
    loss, _, steps = real_step.backward(layers, out["meta/logits"],
                                        float(out["meta/logits_scale"]),
                                        int(out["meta/logits_zero_point"]), label)
    tf_grads = _tf_output_gradients(folded, acts["block_15_add"], label)
    info = {"info/loss_int8": np.float32(loss), "info/loss_float": np.float32(tf_grads["loss"])}
    for L, st in zip(layers, steps):
        ref = tf_grads[L["name"]].reshape(-1).astype(np.float64)
        got = st["dy"].reshape(-1).astype(np.float64) * st["dy_scale"]
        cos = float(ref @ got / max(np.linalg.norm(ref) * np.linalg.norm(got), 1e-30))
        info[f"info/cosine/{L['name']}"] = np.float32(cos)
        info[f"info/kept/{L['name']}"] = R.top_k_channels(
            L["w"], channels_for_ratio(ratio, L["c_in"]), depthwise=L["kind"] == "depthwise")
    return info


def _tf_output_gradients(folded, block_15_out: np.ndarray, label: int) -> dict:
    """dLoss/d(pre-activation output) of the tail layers, float32 TensorFlow autodiff."""
    tf = _tf()
    get = folded.get_layer
    a = tf.constant(block_15_out[None])
    with tf.GradientTape(persistent=True) as tape:
        outs = {}
        e = get("block_16_expand")(a)
        tape.watch(e)
        outs["block_16_expand"] = e
        d = get("block_16_depthwise")(get("block_16_expand_relu")(e))
        tape.watch(d)
        outs["block_16_depthwise"] = d
        p = get("block_16_project")(get("block_16_depthwise_relu")(d))
        tape.watch(p)
        outs["block_16_project"] = p
        h = get("head_conv")(p)
        tape.watch(h)
        outs["head_conv"] = h
        z = get("classifier")(get("global_pool")(get("head_relu")(h)))
        tape.watch(z)
        outs["classifier"] = z
        loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=tf.constant([label]), logits=z))
    grads = {k: np.asarray(tape.gradient(loss, v))[0] for k, v in outs.items()}
    grads["loss"] = float(loss)
    return grads


def write(path: str, arrays: dict) -> str:
    """``arrays`` as an .npz at ``path``, atomically (parent folders made)."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_atomically(path, buffer.getvalue(), make_parents=True)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(HERE, "build", "real_step.npz"))
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--ratio", type=float, default=0.02, help="kept input-channel ratio")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--image", choices=("chelsea", "cifar10"),
                   default="cifar10" if os.environ.get("DGST_CIFAR10") else "chelsea",
                   help="skimage.data.chelsea() or the first cat of the CIFAR-10 test split "
                        "(default: cifar10 when DGST_CIFAR10 is set)")
    args = p.parse_args(argv)
    t0 = time.time()
    arrays = export(args.image_size, args.ratio, args.lr, args.image == "cifar10")
    write(args.out, arrays)
    print(f"real_vectors: {args.out} ({time.time() - t0:.1f} s): {arrays['info/model']}, "
          f"image {arrays['info/image']}, loss {float(arrays['info/loss_int8']):.4f} "
          f"(float {float(arrays['info/loss_float']):.4f})")
    for name in arrays["meta/layers"]:
        print(f"  {name}: x {arrays[f'{name}/x'].shape} w {arrays[f'{name}/w'].shape} "
              f"cosine(int8 dy, TF gradient) {float(arrays[f'info/cosine/{name}']):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
