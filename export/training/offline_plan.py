"""The training step's offline memory plan: every tensor TFLM plans in the arena's head gets
a fixed offset in the model's ``OfflineMemoryAllocation`` metadata (tflite-micro's
``docs/memory_management.md``), and where a kernel computes in place the output shares the
memory of the input it overwrites -- which TFLM's online planner never does:

- ``DGST_FUSED_BLOCK`` writes its output over its input where no output row overwrites an
  input row still to be read (`dgst_tf.planning.arena_plan.fused_block_inplace_delta`):
  MobileNetV2's first block at 128x128 then holds 48 KB (the image) instead of 80 KB;
- ``DGST_QUANTIZE_GRAD`` writes the int8 error signal into the end of the float gradient
  it reads;
- ``DGST_DEPTHWISE_INPUT_GRAD`` writes the float gradient around the int8 error signal it
  reads, where that signal dies (a bias-only depthwise layer);
- ``DGST_ACTIVATION_GRAD`` writes the input gradient over the output gradient it reads;
- a float32 ``RESHAPE`` (the backward of a Flatten / Reshape) shares the memory of the
  gradient it reshapes (TFLM's RESHAPE copies nothing when both share it).

Only the offsets change, not a value: the kernels' arithmetic is the same. The plan is
`dgst_tf.planning.arena_plan.offline_offsets` (TFLM's greedy planner over the aliased
groups); TFLM plans the kernels' scratch buffers around it::

    planned = add_offline_plan(editor)   # after the ops are final; before pack()
    planned["head_bytes"], planned["in_place"]
"""
from __future__ import annotations

import numpy as np

from dgst_tf.export.tflite_editor import ModelEditor
from dgst_tf.export.tflite_file import numpy_dtype, schema
from dgst_tf.planning.arena_plan import (Alias, Buffer, depthwise_input_grad_inplace_delta,
                                         fused_block_inplace_delta, head_bytes,
                                         offline_offsets, quantize_grad_inplace_delta)

__all__ = ["OFFLINE_PLAN_METADATA", "tensor_lifetimes", "in_place_aliases",
           "add_offline_plan", "drop_offline_plan"]

OFFLINE_PLAN_METADATA = b"OfflineMemoryAllocation"
_FORMAT_VERSION = 0
_FUSED_DW_WEIGHTS = 3  # DGST_FUSED_BLOCK inputs: x, conv w, conv requant, dw w, ...


def _bytes(editor: ModelEditor, index: int) -> int:
    shape = editor.shape(index)
    itemsize = np.dtype(numpy_dtype(editor.tensor(index).type)).itemsize
    return int(np.prod(shape, dtype=np.int64)) * itemsize


def tensor_lifetimes(editor: ModelEditor) -> dict:
    """``{tensor: Buffer}`` of every tensor TFLM plans (no data, not a variable, not empty),
    with TFLM's lifetimes: graph inputs from scope 0, op i at scope i + 1, graph outputs
    to the last scope."""
    sg = editor.subgraph
    first, last = {}, {}
    for t in sg.inputs:
        first.setdefault(int(t), 0)
        last[int(t)] = 0
    for scope, op in enumerate(sg.operators, start=1):
        for t in op.outputs:
            first.setdefault(int(t), scope)
        for t in list(op.inputs) + list(op.outputs):
            if t >= 0:
                last[int(t)] = scope
    end = len(sg.operators)
    for t in sg.outputs:
        first.setdefault(int(t), end)
        last[int(t)] = end
    return {t: Buffer(_bytes(editor, t), first[t], last[t]) for t in sorted(first)
            if editor.data(t) is None and not editor.tensor(t).isVariable
            and _bytes(editor, t) > 0}


def in_place_aliases(editor: ModelEditor, lifetimes: dict) -> list:
    """``[(input, output, delta)]``: the ops whose output may start ``delta`` bytes after
    (before, if negative) an input that dies there (module doc)."""
    sg = editor.subgraph
    outputs = {int(t) for t in sg.outputs}
    found = []
    for scope, op in enumerate(sg.operators, start=1):
        kind = editor.builtin(op)
        if kind not in ("CUSTOM:DGST_FUSED_BLOCK", "CUSTOM:DGST_QUANTIZE_GRAD",
                        "CUSTOM:DGST_DEPTHWISE_INPUT_GRAD", "CUSTOM:DGST_ACTIVATION_GRAD",
                        "RESHAPE"):
            continue
        if kind == "RESHAPE" and editor.tensor(op.inputs[0]).type != schema.TensorType.FLOAT32:
            continue  # the forward pass's int8 RESHAPE keeps its own output
        x, y = int(op.inputs[0]), int(op.outputs[0])
        if x not in lifetimes or y not in lifetimes or x in outputs or \
                lifetimes[x].last != scope:
            continue
        if kind == "CUSTOM:DGST_QUANTIZE_GRAD":
            if len(op.inputs) < 3 or op.inputs[2] < 0:  # not the broadcast mode
                elements = int(np.prod(editor.shape(y), dtype=np.int64))
                found.append((x, y, quantize_grad_inplace_delta(elements)))
            continue
        if kind in ("CUSTOM:DGST_ACTIVATION_GRAD", "RESHAPE"):  # dx[i] after g[i] is read
            found.append((x, y, 0))
            continue
        if kind == "CUSTOM:DGST_DEPTHWISE_INPUT_GRAD":  # the gradient around its dy
            found.append((x, y, -_depthwise_input_grad_delta(editor, op)))
            continue
        delta = _fused_block_delta(editor, op)
        if delta is not None:  # the output starts delta bytes before the input
            found.append((x, y, -delta))
    return found


def _fused_block_delta(editor: ModelEditor, op) -> int | None:
    """`fused_block_inplace_delta` of a ``DGST_FUSED_BLOCK`` op (its options: mid h, mid w,
    conv stride h, w, pad top, left, dw stride h, w, pad top, left, ...)."""
    words = np.frombuffer(bytes(op.customOptions), "<i4")
    mid_h, conv_stride, conv_pad, dw_stride, dw_pad = (int(words[i]) for i in (1, 3, 5, 7, 9))
    x_shape, y_shape = editor.shape(op.inputs[0]), editor.shape(op.outputs[0])
    dw_h = editor.shape(op.inputs[_FUSED_DW_WEIGHTS])[1]
    return fused_block_inplace_delta(
        _bytes(editor, op.inputs[0]), x_shape[2] * x_shape[3], y_shape[1],
        y_shape[2] * y_shape[3], mid_h, conv_stride, conv_pad, dw_h, dw_stride, dw_pad)


def _depthwise_input_grad_delta(editor: ModelEditor, op) -> int:
    """`depthwise_input_grad_inplace_delta` of a ``DGST_DEPTHWISE_INPUT_GRAD`` op (inputs
    dy, dy_scale, weights [1, kh, kw, C], ...; options stride h, w, dilation h, w, pad top,
    left)."""
    words = np.frombuffer(bytes(op.customOptions), "<i4")
    stride_h, dilation_h, pad_top = int(words[1]), int(words[3]), int(words[5])
    dy_shape, dx_shape = editor.shape(op.inputs[0]), editor.shape(op.outputs[0])
    return depthwise_input_grad_inplace_delta(
        dx_shape[1], dx_shape[2], dy_shape[2], dx_shape[3], editor.shape(op.inputs[2])[1],
        stride_h, pad_top, dilation_h)


def add_offline_plan(editor: ModelEditor) -> dict:
    """Write the offline plan of ``editor``'s (final) graph into its metadata; returns
    ``{"head_bytes": planned tensors' head (scratch aside), "in_place": aliases}``."""
    lifetimes = tensor_lifetimes(editor)
    tensors = list(lifetimes)
    position = {t: i for i, t in enumerate(tensors)}
    aliases = in_place_aliases(editor, lifetimes)
    buffers = [lifetimes[t] for t in tensors]
    offsets = offline_offsets(buffers, [Alias(position[x], position[y], delta)
                                        for x, y, delta in aliases])
    plan = np.full(len(editor.subgraph.tensors), -1, np.int32)
    plan[tensors] = offsets
    words = np.concatenate([[_FORMAT_VERSION, 1, len(plan)], plan]).astype(np.int32)
    metadata = schema.MetadataT()
    metadata.name = OFFLINE_PLAN_METADATA
    metadata.buffer = editor.add_buffer(words)
    drop_offline_plan(editor)
    editor.model.metadata = list(editor.model.metadata or []) + [metadata]
    return {"head_bytes": head_bytes(buffers, offsets), "in_place": len(aliases)}


def drop_offline_plan(editor: ModelEditor) -> None:
    """Remove the offline plan (before the graph's tensors change: TFLM refuses a plan whose
    tensor count is not the model's); its buffer goes with the next ``prune``."""
    editor.model.metadata = [m for m in (editor.model.metadata or [])
                             if m.name != OFFLINE_PLAN_METADATA] or None
