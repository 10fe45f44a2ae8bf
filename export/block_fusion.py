"""Fusing frozen conv -> depthwise -> 1x1 blocks into one ``DGST_FUSED_BLOCK`` op.

In an int8 MobileNetV2 the largest activations are the expanded ones of the first blocks
(64x64x48 int8 = 192 KB for width 0.35 at 128x128): TFLM's builtin ops must hold the whole
expansion and the whole depthwise output at once. ``DGST_FUSED_BLOCK``
(`tflm_ops/tflm/dgst_fused_block.cc`) computes the three ops row by row and keeps only a few
rows; its output equals the builtin ops' output bit for bit. The requantization multipliers
and shifts that TFLM would compute into arena per-op data become constant tensors (flash),
as TinyEngine does.

`fuse_blocks` rewrites a `ModelEditor` graph (the training export calls it for the ops in
front of the first updated layer); `fuse_blocks_file` rewrites an int8 inference `.tflite`::

    from dgst_tf.export.block_fusion import fuse_blocks_file
    fuse_blocks_file("model_int8.tflite", "model_int8_fused.tflite")   # -> number fused

Weights must be per-channel symmetric int8 (what `export_int8` writes), dilation 1, depth
multiplier 1; chains that do not match are left as they are. Which chains match is decided by
`dgst_tf.core.block_fusion_rule`, the same rule the memory model applies to the Keras graph.
"""
from __future__ import annotations

import os
import pathlib

import numpy as np

from dgst_tf.core.block_fusion_rule import ChainOp, fusable_chains
from dgst_tf.core.files import write_atomically
from dgst_tf.core.geometry import same_pad_before
# TFLite's requantization constants, shared with the Keras int8 simulation (re-exported)
from dgst_tf.core.tflite_requantization import activation_range, quantize_multiplier
from dgst_tf.core.tflite_builder import int32_options
from dgst_tf.export.tflite_editor import ModelEditor
from dgst_tf.export.tflite_file import read_tflite, schema

__all__ = ["quantize_multiplier", "activation_range", "fusable_chains_in", "fuse_blocks",
           "fuse_blocks_file"]

_ACTIVATION_NAMES = {0: "none", 1: "relu", 3: "relu6"}
_KINDS = {"CONV_2D": "conv", "DEPTHWISE_CONV_2D": "depthwise"}


def _padding(op, in_size, out_size, kernel, stride):
    if op.builtinOptions.padding == schema.Padding.VALID:
        return 0
    return same_pad_before(in_size, out_size, kernel, stride)


class _Stage:
    """One conv of a fusable chain: its tensors, geometry and requantization constants."""

    def __init__(self, ed: ModelEditor, op):
        self.op = op
        o = op.builtinOptions
        self.x, self.w, self.y = int(op.inputs[0]), int(op.inputs[1]), int(op.outputs[0])
        self.bias = int(op.inputs[2]) if len(op.inputs) > 2 else -1
        self.stride = (int(o.strideH), int(o.strideW))
        self.dilation = (int(o.dilationHFactor), int(o.dilationWFactor))
        self.activation = int(o.fusedActivationFunction)
        self.w_shape = ed.shape(self.w)

    def int8_ok(self, ed) -> bool:
        """int8 tensors with constant weights and bias."""
        types = [ed.tensor(t).type for t in (self.x, self.w, self.y)]
        return all(t == schema.TensorType.INT8 for t in types) and \
            ed.data(self.w) is not None and \
            (self.bias < 0 or ed.data(self.bias) is not None)

    def describe(self, ed, kind: str) -> ChainOp:
        """The op in the fusion rule's terms (`dgst_tf.core.block_fusion_rule`)."""
        multiplier = 1
        if kind == "depthwise":  # TFLite depthwise weights are [1, kh, kw, C_in * multiplier]
            in_channels = ed.shape(self.x)[3]
            whole = self.w_shape[0] == 1 and self.w_shape[3] % in_channels == 0
            multiplier = self.w_shape[3] // in_channels if whole else 0
        return ChainOp(kind, (self.x, self.w) + ((self.bias,) if self.bias >= 0 else ()),
                       self.y, kernel=tuple(self.w_shape[1:3]), strides=self.stride,
                       dilation=self.dilation, depth_multiplier=multiplier,
                       activation=_ACTIVATION_NAMES.get(self.activation,
                                                        f"fused_{self.activation}"),
                       int8=self.int8_ok(ed))

    def constants(self, ed: ModelEditor, channels: int, label: str) -> list:
        """[weights, requant]: the weight tensor and a new int32 [3, channels] constant whose
        rows are the bias, the multiplier and the shift."""
        x_scale = float(ed.quantization(self.x)[0][0])
        y_scale = float(ed.quantization(self.y)[0][0])
        w_scales = np.broadcast_to(ed.quantization(self.w)[0], (channels,))
        pairs = [quantize_multiplier(x_scale * float(s) / y_scale) for s in w_scales]
        bias = np.zeros(channels, np.int32) if self.bias < 0 else ed.data(self.bias)
        requant = np.stack([bias.reshape(channels), [m for m, _ in pairs],
                            [s for _, s in pairs]]).astype(np.int32)
        return [self.w, ed.add_tensor(f"{label}/requant", (3, channels), np.int32,
                                      data=requant)]

    def act_range(self, ed) -> tuple[int, int]:
        scale, zp = ed.quantization(self.y)
        return activation_range(self.activation, float(scale[0]), int(zp[0]))


def _describe(ed: ModelEditor, op) -> ChainOp:
    kind = _KINDS.get(ed.builtin(op))
    if kind is not None:
        return _Stage(ed, op).describe(ed, kind)
    return ChainOp("other", tuple(int(t) for t in op.inputs if t >= 0),
                   int(op.outputs[0]) if len(op.outputs) else None)


def fusable_chains_in(ed: ModelEditor, stop: int | None = None) -> list:
    """``[(conv, depthwise, project), ...]``: operator indices of the chains among the first
    ``stop`` ops that `fuse_blocks` would fuse (`dgst_tf.core.block_fusion_rule`).

        fusable_chains_in(ModelEditor(read_tflite(path)[1]))   # [(0, 1, 2), ...]
    """
    sg = ed.subgraph
    graph_io = {int(t) for t in list(sg.inputs) + list(sg.outputs)}
    return fusable_chains([_describe(ed, op) for op in sg.operators], stop, graph_io)


def _fused_op(ed: ModelEditor, conv: _Stage, dw: _Stage, proj: _Stage):
    """The ``DGST_FUSED_BLOCK`` op that computes ``conv -> dw -> proj``."""
    in_shape, mid_shape = ed.shape(conv.x), ed.shape(conv.y)
    out_shape = ed.shape(dw.y)
    label = ed.name(proj.y)
    pads = [_padding(conv.op, in_shape[1 + k], mid_shape[1 + k], conv.w_shape[1 + k],
                     conv.stride[k]) for k in range(2)]
    dw_pads = [_padding(dw.op, mid_shape[1 + k], out_shape[1 + k], dw.w_shape[1 + k],
                        dw.stride[k]) for k in range(2)]
    zps = [int(ed.quantization(t)[1][0]) for t in (conv.x, conv.y, dw.y, proj.y)]
    ranges = [v for s in (conv, dw, proj) for v in s.act_range(ed)]
    inputs = [conv.x]
    for stage, channels, name in ((conv, mid_shape[3], "conv"), (dw, mid_shape[3], "dw"),
                                  (proj, ed.shape(proj.y)[3], "project")):
        inputs += stage.constants(ed, channels, f"{label}/fused_{name}")
    options = int32_options(mid_shape[1], mid_shape[2], *conv.stride, *pads, *dw.stride,
                            *dw_pads, *zps, *ranges)
    return ed.custom_op("DGST_FUSED_BLOCK", inputs, [proj.y], options)


def fuse_blocks(ed: ModelEditor, stop: int | None = None) -> int:
    """Replace every CONV_2D -> DEPTHWISE_CONV_2D -> 1x1 CONV_2D chain among the first
    ``stop`` ops (all by default) whose intermediate tensors feed nothing else by one
    ``DGST_FUSED_BLOCK`` (`fusable_chains_in`). Returns how many chains were fused. The
    caller must not hold op indices across the call (the operator list shrinks)."""
    sg = ed.subgraph
    ops = list(sg.operators)
    chains = fusable_chains_in(ed, stop)
    if not chains:
        return 0
    replaced = {a: _fused_op(ed, *(_Stage(ed, ops[i]) for i in (a, b, c)))
                for a, b, c in chains}
    dropped = {i for _, b, c in chains for i in (b, c)}
    sg.operators = [replaced.get(i, op) for i, op in enumerate(ops) if i not in dropped]
    ed.prune()
    return len(chains)


def fuse_blocks_file(path, out_path) -> int:
    """`fuse_blocks` on the int8 `.tflite` at ``path``, written atomically to ``out_path``
    (run it with the dgst custom ops registered, e.g. `dgst_tf.export.tflm.runner`).
    Returns the number of fused chains."""
    _, model = read_tflite(pathlib.Path(path))
    ed = ModelEditor(model)
    count = fuse_blocks(ed)
    write_atomically(pathlib.Path(os.fspath(out_path)), ed.pack())
    return count
