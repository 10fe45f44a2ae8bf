"""ctypes binding of the host build of the training-kernel cores (tests and tools).

``build()`` runs ``make host`` (gcc; raises if the compiler or the build fails) and
``Kernels(path)`` wraps build/host/libdgst_train_kernels.so with NumPy-in, NumPy-out
functions named like reference.py's. Imports only NumPy and the standard library.

    from dgst_tf.tflm_ops import host

    kernels = host.Kernels(host.build())
"""
from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import shutil
import subprocess

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
LIBRARY = os.path.join(HERE, "build", "host", "libdgst_train_kernels.so")

_i8p = ctypes.POINTER(ctypes.c_int8)
_u8p = ctypes.POINTER(ctypes.c_uint8)
_i32p = ctypes.POINTER(ctypes.c_int32)
_f32p = ctypes.POINTER(ctypes.c_float)
_i32 = ctypes.c_int32
_f32 = ctypes.c_float


class ConvGeometry(ctypes.Structure):
    """dgst_conv_geometry."""

    _fields_ = [(name, ctypes.c_int32) for name in (
        "in_h", "in_w", "out_h", "out_w", "kernel_h", "kernel_w", "stride_h", "stride_w",
        "dilation_h", "dilation_w", "pad_top", "pad_left")]


class StochasticRounding(ctypes.Structure):
    """dgst_stochastic_rounding."""

    _fields_ = [("seed", ctypes.c_uint32), ("stream", ctypes.c_uint32),
                ("step", ctypes.c_uint32), ("index_channels", ctypes.POINTER(ctypes.c_int32)),
                ("index_c_in", ctypes.c_int32)]


@contextlib.contextmanager
def build_lock():
    """Exclusive lock on tflm_ops/build: parallel test workers (pytest -n) build in turn."""
    os.makedirs(os.path.join(HERE, "build"), exist_ok=True)
    with open(os.path.join(HERE, "build", ".lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def make(*targets: str) -> subprocess.CompletedProcess:
    """``make -C tflm_ops TARGETS`` under the build lock (output captured)."""
    if shutil.which("make") is None:
        raise RuntimeError("make not found: install make (apt-get install make)")
    with build_lock():
        return subprocess.run(["make", "-C", HERE, *targets], capture_output=True, text=True)


def build(cc: str = "gcc") -> str:
    """``make -C tflm_ops host``; returns the library path. Fails loudly."""
    if shutil.which(cc) is None:
        raise RuntimeError(f"C compiler {cc!r} not found: install gcc (apt-get install gcc)")
    proc = make("host", f"HOST_CC={cc}")
    if proc.returncode != 0:
        raise RuntimeError(f"make host failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return LIBRARY


def _ptr(a: np.ndarray, ctype):
    return a.ctypes.data_as(ctype)


def _c(a, dtype) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=dtype)


class Kernels:
    """The C cores with NumPy arguments (outputs are freshly allocated arrays)."""

    def __init__(self, path: str = LIBRARY):
        self.lib = lib = ctypes.CDLL(path)
        sig = {
            "dgst_softmax_xent_grad": (_f32, [_i8p, _i32, _f32, _i32, _i32, _f32p]),
            "dgst_quantize_grad_s8": (None, [_f32p, _i32, _i8p, _f32p]),
            "dgst_conv2d_weight_grad_s8": (None, [ctypes.POINTER(ConvGeometry), _i8p, _i32,
                                                  _i32, _i8p, _i32, _i32p]),
            "dgst_conv2d_weight_grad_s8_ref": (None, [ctypes.POINTER(ConvGeometry), _i8p,
                                                      _i32, _i32, _i8p, _i32, _i32p]),
            "dgst_depthwise_weight_grad_s8": (None, [ctypes.POINTER(ConvGeometry), _i8p,
                                                     _i32p, _i32, _i32, _i8p, _i32, _i32p]),
            "dgst_bias_grad_s8": (None, [_i8p, _i32, _i32, _i32p]),
            "dgst_conv2d_input_grad_s8": (None, [ctypes.POINTER(ConvGeometry), _i8p, _f32,
                                                 _i8p, _f32p, _i32, _i32, _f32p]),
            "dgst_depthwise_input_grad_s8": (None, [ctypes.POINTER(ConvGeometry), _i8p,
                                                    _f32, _i8p, _f32p, _i32, _f32p]),
            "dgst_apply_mask_f32": (None, [_f32p, _u8p, _i32]),
            "dgst_activation_grad_f32": (None, [_f32p, _i8p, _f32p, _i32, _f32p]),
            "dgst_build_mask_s8": (None, [_i8p, _i32, ctypes.c_int8, ctypes.c_int8, _u8p]),
            "dgst_sgd_qas_update_conv_s8": (None, [_i8p, _i32, _i32, _i32, _i32, _i32p, _i32,
                                                   _i32p, _f32, _f32, _f32, _f32p]),
            "dgst_sgd_qas_update_depthwise_s8": (None, [_i8p, _i32, _i32, _i32, _i32p, _i32,
                                                        _i32p, _f32, _f32, _f32, _f32p]),
            "dgst_sgd_qas_update_bias_s32": (None, [_i32p, _i32, _i32p, _f32, _f32, _f32,
                                                    _f32p]),
            "dgst_sgd_qas_update_conv_sr_s8": (None, [_i8p, _i32, _i32, _i32, _i32, _i32p,
                                                      _i32, _i32p, _f32, _f32, _f32, _f32p,
                                                      ctypes.POINTER(StochasticRounding)]),
            "dgst_sgd_qas_update_depthwise_sr_s8": (None, [_i8p, _i32, _i32, _i32, _i32p,
                                                           _i32, _i32p, _f32, _f32, _f32,
                                                           _f32p,
                                                           ctypes.POINTER(StochasticRounding)]),
            "dgst_stochastic_rounding_bits": (ctypes.c_uint32, [ctypes.c_uint32] * 4),
        }
        for name, (res, args) in sig.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = res, args

    @staticmethod
    def geometry(g) -> ConvGeometry:
        return ConvGeometry(*g.astuple())

    # Sentinel-filled outputs: an element the kernel forgets to write shows up.
    @staticmethod
    def _out(shape, dtype):
        out = np.empty(shape, dtype)
        out.view(np.uint8)[...] = 0xA5
        return out

    def conv2d_weight_grad(self, g, x_kept, x_zero_point, dy, ref=False):
        x, d = _c(x_kept, np.int8), _c(dy, np.int8)
        k, c_out = x.shape[-1], d.shape[-1]
        grad = self._out((c_out, g.kernel_h, g.kernel_w, k), np.int32)
        fn = self.lib.dgst_conv2d_weight_grad_s8_ref if ref else self.lib.dgst_conv2d_weight_grad_s8
        fn(ctypes.byref(self.geometry(g)), _ptr(x, _i8p), k, int(x_zero_point),
           _ptr(d, _i8p), c_out, _ptr(grad, _i32p))
        return grad

    def depthwise_weight_grad(self, g, x_kept, kept, x_zero_point, dy):
        x, d, kp = _c(x_kept, np.int8), _c(dy, np.int8), _c(kept, np.int32)
        grad = self._out((g.kernel_h, g.kernel_w, kp.size), np.int32)
        self.lib.dgst_depthwise_weight_grad_s8(
            ctypes.byref(self.geometry(g)), _ptr(x, _i8p), _ptr(kp, _i32p), kp.size,
            int(x_zero_point), _ptr(d, _i8p), d.shape[-1], _ptr(grad, _i32p))
        return grad

    def bias_grad(self, dy):
        d = _c(dy, np.int8)
        channels = d.shape[-1]
        grad = self._out((channels,), np.int32)
        self.lib.dgst_bias_grad_s8(_ptr(d, _i8p), d.size // channels, channels,
                                   _ptr(grad, _i32p))
        return grad

    def conv2d_input_grad(self, g, dy, dy_scale, w, weight_scale):
        d, wq, ws = _c(dy, np.int8), _c(w, np.int8), _c(weight_scale, np.float32)
        c_out, c_in = wq.shape[0], wq.shape[-1]
        dx = self._out((g.in_h, g.in_w, c_in), np.float32)
        self.lib.dgst_conv2d_input_grad_s8(ctypes.byref(self.geometry(g)), _ptr(d, _i8p),
                                           float(dy_scale), _ptr(wq, _i8p), _ptr(ws, _f32p),
                                           c_in, c_out, _ptr(dx, _f32p))
        return dx

    def depthwise_input_grad(self, g, dy, dy_scale, w, weight_scale):
        d, wq, ws = _c(dy, np.int8), _c(w, np.int8), _c(weight_scale, np.float32)
        channels = d.shape[-1]
        dx = self._out((g.in_h, g.in_w, channels), np.float32)
        self.lib.dgst_depthwise_input_grad_s8(ctypes.byref(self.geometry(g)), _ptr(d, _i8p),
                                              float(dy_scale), _ptr(wq, _i8p),
                                              _ptr(ws, _f32p), channels, _ptr(dx, _f32p))
        return dx

    def build_mask(self, y, lo, hi):
        yy = _c(y, np.int8).reshape(-1)
        mask = self._out(((yy.size + 7) // 8,), np.uint8)
        self.lib.dgst_build_mask_s8(_ptr(yy, _i8p), yy.size, int(lo), int(hi),
                                    _ptr(mask, _u8p))
        return mask

    def apply_mask(self, g, mask):
        out = np.array(g, np.float32).reshape(-1)
        m = _c(mask, np.uint8)
        self.lib.dgst_apply_mask_f32(_ptr(out, _f32p), _ptr(m, _u8p), out.size)
        return out

    def activation_grad(self, g, x, table):
        gg = _c(g, np.float32).reshape(-1)
        xx = _c(x, np.int8).reshape(-1)
        tt = _c(table, np.float32)
        if xx.size != gg.size or tt.shape != (256,):
            raise ValueError("activation_grad: x must have g's size and table 256 entries")
        dx = self._out(gg.shape, np.float32)
        self.lib.dgst_activation_grad_f32(_ptr(gg, _f32p), _ptr(xx, _i8p), _ptr(tt, _f32p),
                                          gg.size, _ptr(dx, _f32p))
        return dx

    def quantize_grad(self, g):
        gg = _c(g, np.float32).reshape(-1)
        out = self._out(gg.shape, np.int8)
        scale = np.zeros(1, np.float32)
        self.lib.dgst_quantize_grad_s8(_ptr(gg, _f32p), gg.size, _ptr(out, _i8p),
                                       _ptr(scale, _f32p))
        return out, scale[0]

    def softmax_xent_grad(self, logits, scale, zero_point, label):
        lg = _c(logits, np.int8)
        grad = self._out(lg.shape, np.float32)
        loss = self.lib.dgst_softmax_xent_grad(_ptr(lg, _i8p), lg.size, float(scale),
                                               int(zero_point), int(label), _ptr(grad, _f32p))
        return loss, grad

    def sgd_qas_update_conv(self, w, kept, grad, lr, x_scale, dy_scale, weight_scale):
        wq = np.array(w, np.int8)  # a copy, updated in place
        kp, gr, ws = _c(kept, np.int32), _c(grad, np.int32), _c(weight_scale, np.float32)
        c_out, kh, kw, c_in = wq.shape
        self.lib.dgst_sgd_qas_update_conv_s8(_ptr(wq, _i8p), c_out, kh, kw, c_in,
                                             _ptr(kp, _i32p), kp.size, _ptr(gr, _i32p),
                                             float(lr), float(x_scale), float(dy_scale),
                                             _ptr(ws, _f32p))
        return wq

    def sgd_qas_update_depthwise(self, w, kept, grad, lr, x_scale, dy_scale, weight_scale):
        wq = np.array(w, np.int8)
        kp, gr, ws = _c(kept, np.int32), _c(grad, np.int32), _c(weight_scale, np.float32)
        kh, kw, channels = wq.shape[-3:]
        self.lib.dgst_sgd_qas_update_depthwise_s8(_ptr(wq, _i8p), kh, kw, channels,
                                                  _ptr(kp, _i32p), kp.size, _ptr(gr, _i32p),
                                                  float(lr), float(x_scale), float(dy_scale),
                                                  _ptr(ws, _f32p))
        return wq

    def _sr(self, kept, seed, stream, step, index_channels, index_c_in):
        chans = None if index_channels is None else _c(index_channels, np.int32)
        sr = StochasticRounding(seed & 0xFFFFFFFF, stream & 0xFFFFFFFF, step & 0xFFFFFFFF,
                                None if chans is None else _ptr(chans, _i32p), index_c_in)
        return sr, chans  # keep chans alive during the call

    def sgd_qas_update_conv_sr(self, w, kept, grad, lr, x_scale, dy_scale, weight_scale,
                               seed, stream, step, index_channels=None, index_c_in=0):
        wq = np.array(w, np.int8, order="C")  # a C-ordered copy, updated in place
        kp, gr, ws = _c(kept, np.int32), _c(grad, np.int32), _c(weight_scale, np.float32)
        c_out, kh, kw, c_in = wq.shape
        sr, _chans = self._sr(kept, seed, stream, step, index_channels, index_c_in)
        self.lib.dgst_sgd_qas_update_conv_sr_s8(
            _ptr(wq, _i8p), c_out, kh, kw, c_in, _ptr(kp, _i32p), kp.size, _ptr(gr, _i32p),
            float(lr), float(x_scale), float(dy_scale), _ptr(ws, _f32p), ctypes.byref(sr))
        return wq

    def sgd_qas_update_depthwise_sr(self, w, kept, grad, lr, x_scale, dy_scale, weight_scale,
                                    seed, stream, step, index_channels=None, index_c_in=0):
        wq = np.array(w, np.int8, order="C")
        kp, gr, ws = _c(kept, np.int32), _c(grad, np.int32), _c(weight_scale, np.float32)
        kh, kw, channels = wq.shape[-3:]
        sr, _chans = self._sr(kept, seed, stream, step, index_channels, index_c_in)
        self.lib.dgst_sgd_qas_update_depthwise_sr_s8(
            _ptr(wq, _i8p), kh, kw, channels, _ptr(kp, _i32p), kp.size, _ptr(gr, _i32p),
            float(lr), float(x_scale), float(dy_scale), _ptr(ws, _f32p), ctypes.byref(sr))
        return wq

    def stochastic_rounding_bits(self, seed, stream, step, index) -> int:
        return int(self.lib.dgst_stochastic_rounding_bits(seed & 0xFFFFFFFF,
                                                          stream & 0xFFFFFFFF,
                                                          step & 0xFFFFFFFF,
                                                          index & 0xFFFFFFFF))

    def sgd_qas_update_bias(self, b, grad, lr, x_scale, dy_scale, weight_scale):
        bb = np.array(b, np.int32)
        gr, ws = _c(grad, np.int32), _c(weight_scale, np.float32)
        self.lib.dgst_sgd_qas_update_bias_s32(_ptr(bb, _i32p), bb.size, _ptr(gr, _i32p),
                                              float(lr), float(x_scale), float(dy_scale),
                                              _ptr(ws, _f32p))
        return bb
