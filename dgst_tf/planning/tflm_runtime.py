"""TFLM's arena for an exported training step: the tensors of the step as TFLM's planner
packs them plus what the interpreter keeps for itself, on the 64-bit host TFLM the project
runs (`dgst_tf.export.tflm`; a 32-bit MCU's structs are about half as large).

- planned tensors (activations, gradients, scratch...) each rounded up to 16 bytes, packed
  perfectly: on the exported chain-like graphs TFLM's greedy planner reaches this bound;
- variables (trainable tensors, selection state, the step counter), each rounded up to 16;
- per tensor of the file a ``TfLiteEvalTensor`` (24 bytes); per op a
  ``NodeAndRegistration`` (64) and its op data (`OP_DATA_BYTES`, the builtin convolutions'
  per-channel multipliers and shifts included); per graph input and output a persistent
  ``TfLiteTensor`` (64) and a pointer to it (8) and, if quantized, its zero points
  (28 + 4 per channel); a handle (8) per scratch buffer; the builtin ops' parameters; the
  allocators themselves.

The struct sizes are those of the pinned tflite-micro wheel (its ``print_allocations``), the
op data sizes those of this project's kernels' ``OpData`` and of TFLM's, rounded to 8::

    from dgst_tf.planning.tflm_runtime import arena_bytes
    arena_bytes(timeline)     # what TFLM reports as "Arena allocation total"
"""
from __future__ import annotations

from dgst_tf.planning.step_timeline import StepTimeline

__all__ = ["ALIGNMENT", "OP_DATA_BYTES", "arena_bytes", "planned_peak_bytes",
           "runtime_bytes"]

ALIGNMENT = 16              # TFLM's buffer alignment (planned tensors and variables)
EVAL_TENSOR_BYTES = 24      # TfLiteEvalTensor
NODE_BYTES = 64             # NodeAndRegistration
IO_TENSOR_BYTES = 64 + 8    # persistent TfLiteTensor of a graph input/output + its pointer
QUANTIZATION_BYTES = 28     # + 4 per channel: a graph input/output's zero points
SCRATCH_HANDLE_BYTES = 8
ALLOCATOR_BYTES = 504       # the allocators, planner and subgraph structs
# op data per op kind (the rest: OP_DATA_BYTES[None]); builtin convolutions add 8 bytes
# (multiplier, shift) per output channel
OP_DATA_BYTES = {"DGST_CONV2D": 88, "DGST_FUSED_BLOCK": 136, "PAD": 100, "CONV_2D": 72,
                 "DEPTHWISE_CONV_2D": 72, None: 40}
BUILTIN_CHANNEL_BYTES = 8
BUILTIN_PARAMS_BYTES = {"CONV_2D": 24, "DEPTHWISE_CONV_2D": 28, "ADD": 8, "MUL": 8,
                        "MEAN": 8, "FULLY_CONNECTED": 16, "RESHAPE": 40, "PAD": 0}


def _aligned(n: int) -> int:
    return -(-int(n) // ALIGNMENT) * ALIGNMENT


def planned_peak_bytes(timeline: StepTimeline) -> int:
    """TFLM's "head": the planned tensors live at the busiest op, each 16-byte aligned."""
    return int(sum(timeline.live(ALIGNMENT).values()).max())


def runtime_bytes(timeline: StepTimeline) -> int:
    """The interpreter's own persistent bytes (structs, op data, quantization copies)."""
    kinds = [op.kind for op in timeline.ops]
    op_data = sum(OP_DATA_BYTES.get(kind, OP_DATA_BYTES[None]) for kind in kinds)
    params = sum(BUILTIN_PARAMS_BYTES.get(kind, 0) for kind in kinds)
    io = timeline.inputs_outputs
    quantization = sum(QUANTIZATION_BYTES + 4 * channels for channels in io if channels)
    return (EVAL_TENSOR_BYTES * timeline.tensor_count + NODE_BYTES * len(kinds) + op_data
            + BUILTIN_CHANNEL_BYTES * timeline.builtin_conv_channels + params
            + IO_TENSOR_BYTES * len(io) + quantization
            + SCRATCH_HANDLE_BYTES * timeline.scratch_count + ALLOCATOR_BYTES)


def arena_bytes(timeline: StepTimeline) -> int:
    """TFLM's "Arena allocation total" for the step: planned peak + variables + runtime.

        arena_bytes(timeline) / 1024    # KB
    """
    variables = sum(_aligned(size) for _, size, _ in timeline.variables if size)
    return planned_peak_bytes(timeline) + variables + runtime_bytes(timeline)
