"""TFLM's arena for an exported training step: the tensors of the step as TFLM's planner
places them plus what the interpreter keeps for itself, for the 64-bit host TFLM the project
runs (`dgst_tf.export.tflm`) or a 32-bit Cortex-M build (`TARGETS`).

- planned tensors (activations, gradients, scratch...) each rounded up to 16 bytes, at the
  offsets of the export's offline plan (`dgst_tf.planning.arena_plan.offline_offsets`, with
  the ops that compute in place) and the kernels' scratch buffers around them, or where
  TFLM's online greedy planner puts them (`arena_plan.greedy_offsets`) without that plan;
- variables (trainable tensors, selection state, the step counter), each rounded up to 16;
- per tensor of the file a ``TfLiteEvalTensor``; per op a ``NodeAndRegistration`` and its
  op data (`OP_DATA_BYTES`, the builtin convolutions' per-channel multipliers and shifts
  included); per graph input and output a persistent ``TfLiteTensor`` and a pointer to it
  and, if quantized, its zero points; a handle per scratch buffer; the builtin ops'
  parameters; the allocators themselves.

The 64-bit struct sizes are those of the pinned tflite-micro wheel (its
``print_allocations``); the 32-bit ones the same structs with 4-byte pointers and
``size_t`` (an estimate until measured on the Cortex-M build); the op data sizes those of
this project's kernels' ``OpData`` and of TFLM's, rounded to 8 (int32 fields: the same on
both)::

    from dgst_tf.planning.tflm_runtime import arena_bytes
    arena_bytes(timeline)                 # what TFLM reports as "Arena allocation total"
    arena_bytes(timeline, "cortex-m")     # the same step in a 32-bit TFLM
"""
from __future__ import annotations

import dataclasses

from dgst_tf.planning.arena_plan import (ALIGNMENT, Alias, Buffer, greedy_offsets, head_bytes,
                                         planned_head)
from dgst_tf.planning.step_timeline import SCRATCH, StepTimeline

__all__ = ["ALIGNMENT", "OP_DATA_BYTES", "TflmTarget", "TARGETS", "arena_bytes",
           "planned_peak_bytes", "runtime_bytes"]


@dataclasses.dataclass(frozen=True)
class TflmTarget:
    """The sizes of TFLM's own structs on one target, in bytes."""

    eval_tensor: int      # TfLiteEvalTensor, per tensor of the file
    node: int             # NodeAndRegistration, per op
    io_tensor: int        # persistent TfLiteTensor of a graph input/output + its pointer
    quantization: int     # + 4 per channel: a graph input/output's zero points
    scratch_handle: int   # per scratch buffer
    allocator: int        # the allocators, planner and subgraph structs


TARGETS = {"host": TflmTarget(24, 64, 64 + 8, 28, 8, 504),
           "cortex-m": TflmTarget(12, 32, 40 + 4, 16, 4, 252)}
# op data per op kind (the rest: OP_DATA_BYTES[None]); builtin convolutions add 8 bytes
# (multiplier, shift) per output channel
OP_DATA_BYTES = {"DGST_CONV2D": 88, "DGST_FUSED_BLOCK": 136, "PAD": 100, "CONV_2D": 72,
                 "DEPTHWISE_CONV_2D": 72, "LOGISTIC": 16, "MUL": 40, "HARD_SWISH": 24,
                 None: 40}
BUILTIN_CHANNEL_BYTES = 8
BUILTIN_PARAMS_BYTES = {"CONV_2D": 24, "DEPTHWISE_CONV_2D": 28, "ADD": 8, "MUL": 8,
                        "MEAN": 8, "FULLY_CONNECTED": 16, "RESHAPE": 40, "PAD": 0}


def _aligned(n: int) -> int:
    return -(-int(n) // ALIGNMENT) * ALIGNMENT


def planned_peak_bytes(timeline: StepTimeline) -> int:
    """TFLM's "head": the planned tensors at their offsets (module doc)."""
    tensors = [t for t in timeline.tensors if t.part != SCRATCH]
    scratch = [Buffer(t.size, t.first, t.last) for t in timeline.tensors if t.part == SCRATCH]
    buffers = [Buffer(t.size, t.first, t.last) for t in tensors]
    if not timeline.offline_plan:
        everything = buffers + scratch
        return head_bytes(everything, greedy_offsets(everything))
    position = {id(t): i for i, t in enumerate(tensors)}
    aliases = [Alias(position[id(x)], position[id(y)], delta)
               for x, y, delta in timeline.in_place()]
    return planned_head(buffers, aliases, scratch)


def runtime_bytes(timeline: StepTimeline, target: str = "host") -> int:
    """The interpreter's own persistent bytes (structs, op data, quantization copies) on
    ``target`` (a key of `TARGETS`)."""
    sizes = TARGETS[target]
    kinds = [op.kind for op in timeline.ops]
    op_data = sum(OP_DATA_BYTES.get(kind, OP_DATA_BYTES[None]) for kind in kinds)
    params = sum(BUILTIN_PARAMS_BYTES.get(kind, 0) for kind in kinds)
    io = timeline.inputs_outputs
    quantization = sum(sizes.quantization + 4 * channels for channels in io if channels)
    return (sizes.eval_tensor * timeline.tensor_count + sizes.node * len(kinds) + op_data
            + BUILTIN_CHANNEL_BYTES * timeline.builtin_conv_channels + params
            + sizes.io_tensor * len(io) + quantization
            + sizes.scratch_handle * timeline.scratch_count + sizes.allocator)


def arena_bytes(timeline: StepTimeline, target: str = "host") -> int:
    """TFLM's "Arena allocation total" for the step on ``target``: planned head +
    variables + runtime.

        arena_bytes(timeline) / 1024    # KB
    """
    if target not in TARGETS:
        raise ValueError(f"TFLM target must be one of {sorted(TARGETS)}, got {target!r}")
    variables = sum(_aligned(size) for _, size, _ in timeline.variables if size)
    return planned_peak_bytes(timeline) + variables + runtime_bytes(timeline, target)
