"""The exported training step as the memory model counts it: the ops `export_training` emits,
in its order, every tensor TFLM plans in the arena (from the op that writes it to the op
that reads it last), the persistent variables, and how many tensors, ops, graph inputs and
outputs and scratch buffers TFLM keeps structs for (`dgst_tf.planning.tflm_runtime`).

Built from the Keras graph (`dgst_tf.planning.memory_graph`) and what `memory` decides per
updated layer (`LayerPlan`), it follows `dgst_tf.export.training` op for op:

- variable initialisation (one op per trainable tensor); on-device channel selection (its
  kept indices, a graph output, and C int64 scores of scratch);
- forward: frozen conv -> depthwise -> 1x1 chains in front of the first updated layer as
  one fused op (a few rows of scratch); explicit paddings folded into exact SAME convs
  except in front of weight-updated layers (there a PAD op writes the padded copy, which
  the kept channels are taken from); a weight-updated layer's kept input channels (a copy,
  or the input itself when every channel is kept) and, with kept weights in RAM, its full
  kernel assembled just before the conv (a temporary); 1-bit ReLU masks of the convs on the
  gradient path; a depthwise convolution's int32 row of accumulators (requantization in
  flash); MEAN's int32 accumulators; a table activation's ops after the op writing its int8
  input (swish: ``LOGISTIC`` and ``MUL``, with the sigmoid between them; ``HARD_SWISH``;
  sigmoid: ``LOGISTIC``), that input kept for the backward pass when the gradient passes;
- backward from the loss: through a Flatten / Reshape a ``RESHAPE`` of the float gradient
  to the input's shape (in place where the reshaped gradient dies there); through a table
  activation ``DGST_ACTIVATION_GRAD`` (the float gradient of its input from its output's
  and the kept int8 input, written over the output's gradient where that dies there; a
  global average pooling in front then spreads its gradient with its ``MUL``); per
  conv/dense the int8 error signal and its scale (read by all of the layer's gradient ops;
  after a global average pooling it is quantized straight from the pooled gradient, so the
  pool input's float gradient never exists), the int32 bias gradient and its SGD update,
  then the float input gradient (before the weights' update; a masked gradient that
  another op still reads is copied first; gradients meeting at a fork are summed), the
  int32 kept-slice weight gradient and its update, chunk by chunk for a large one
  (`arena_plan.weight_grad_chunks`);
- the ops the export's offline plan runs in place (`StepTimeline.in_place`): a fused block
  over its input, an error signal inside the float gradient it quantizes, a bias-only
  depthwise layer's float input gradient around its error signal, a table activation's or
  a reshape's input gradient over its output's.

    timeline = build_timeline(graph, plans, grad, TimelineOptions())
    timeline.live()["activation gradients"]     # float gradient bytes live at each op
"""
from __future__ import annotations

import dataclasses

import numpy as np

from dgst_tf.core.geometry import same_pad_before
from dgst_tf.planning.arena_plan import (DEFAULT_WEIGHT_GRAD_CHUNK_BYTES,
                                         depthwise_input_grad_inplace_delta,
                                         fused_block_inplace_delta,
                                         quantize_grad_inplace_delta, weight_grad_chunks)
from dgst_tf.planning.memory_graph import ACTIVATION_BYTES, MemoryGraph, Step

__all__ = ["PARTS", "PERSISTENT_PARTS", "SCRATCH", "LayerPlan", "TimelineOptions", "Tensor",
           "Op", "StepTimeline", "build_timeline", "fused_block_scratch_bytes"]

ACTIVATIONS, SAVED, GRADIENTS = "activations", "saved tensors and masks", "activation gradients"
ERRORS, WEIGHT_GRADIENTS = "error signals", "weight gradients"
KERNELS, SCRATCH, LOSS = "temporary kernels", "scratch", "label and loss"
PARAMETERS, OPTIMIZER = "parameters in SRAM", "optimizer state"
# what each planned tensor is, in the order reports list them
PARTS = (ACTIVATIONS, SAVED, GRADIENTS, ERRORS, WEIGHT_GRADIENTS, KERNELS, SCRATCH, LOSS,
         OPTIMIZER)
PERSISTENT_PARTS = (PARAMETERS, OPTIMIZER)
_SELECTION_SCORE_BYTES = 8  # int64 score per input channel (traversal, magnitude)
_MEAN_INDEX_SCRATCH = (16, 8)  # MEAN's input iterator and resolved axes (int32)


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """What one updated layer keeps and holds during the step, in bytes.

    ``mode``: "bias", "weights" or "classifier"; ``kept`` of ``channels`` input channels
    train their weights; ``saved_bytes``: the input kept for the weight gradient;
    ``state_bytes``: persistent optimizer slots and selection state; ``kept_index_bytes``:
    the int32 indices on-device selection writes each step (``dynamic``); ``kernel_bytes``:
    the full int8 kernel assembled in RAM from flash and the RAM copy of the kept channels
    (``compact``: kept weights in RAM).
    """

    mode: str
    kept: int = 0
    channels: int = 0
    saved_bytes: int = 0
    weight_bytes: int = 0
    bias_bytes: int = 0
    state_bytes: int = 0
    kept_index_bytes: int = 0
    weight_gradient_bytes: int = 0
    bias_gradient_bytes: int = 0
    kernel_bytes: int = 0
    dynamic: bool = False
    compact: bool = False
    policy: str | None = None
    selection_variable: bool = False  # the selection state is a variable (traversal, window)


@dataclasses.dataclass(frozen=True)
class TimelineOptions:
    """The export options the tensors depend on (`dgst_tf.planning.memory.MemoryModel`)."""

    fold_pads: bool = True
    fuse_blocks: bool = True
    requant_in_flash: bool = True
    gradient_bytes: int = 4
    inplace: bool = False
    output_params: bool = True
    counter_bytes: int = 4  # the int32 step counter (stochastic rounding, layer schedule)
    stochastic: bool = True  # stochastic rounding: more constants per kept-weights layer
    offline_plan: bool = True  # the export's offline memory plan: ops computing in place
    weight_grad_chunk_bytes: int = DEFAULT_WEIGHT_GRAD_CHUNK_BYTES


@dataclasses.dataclass
class Tensor:
    """A planned (non-persistent) arena tensor; ``saved_from``: from this op on it is an
    input kept for a weight gradient (counted as saved)."""

    name: str
    size: int
    first: int
    last: int
    part: str
    saved_from: int | None = None


@dataclasses.dataclass(frozen=True)
class Op:
    """One op of the step: its kind, the memory-graph steps it computes, its phase."""

    kind: str
    steps: tuple
    phase: str  # "init", "select", "forward" or "backward"


@dataclasses.dataclass
class StepTimeline:
    """The ops, planned tensors and variables of one exported training step."""

    ops: list
    tensors: list
    variables: list  # (name, bytes, part) persistent in the arena
    tensor_count: int = 0  # every tensor of the .tflite (constants and variables too)
    inputs_outputs: list = dataclasses.field(default_factory=list)  # channels, 0: none
    scratch_count: int = 0
    builtin_conv_channels: int = 0  # output channels of builtin (not flash) convolutions
    # (input, output, op, delta): the op may write its output ``delta`` bytes after its
    # input if the input dies there (`in_place`)
    in_place_candidates: list = dataclasses.field(default_factory=list)
    outputs: list = dataclasses.field(default_factory=list)  # the graph's output tensors
    offline_plan: bool = True  # the export's offline memory plan (else TFLM plans online)

    def in_place(self) -> list:
        """``[(input, output, delta)]``: the in-place ops of the export's offline plan (those
        whose input no later op reads and which is no graph output)."""
        return [(x, y, delta) for x, y, at, delta in self.in_place_candidates
                if x.last == at and not any(x is t for t in self.outputs)]

    def live(self, alignment: int = 1) -> dict:
        """``{part: array}``: planned bytes of each part live at each op (each tensor
        rounded up to ``alignment`` bytes, as TFLM's planner does with 16)."""
        n = len(self.ops)
        row = {part: i for i, part in enumerate(PARTS)}
        rows = np.zeros((len(PARTS), n + 1), np.int64)
        saved = row[SAVED]
        for t in self.tensors:
            size = -(-t.size // alignment) * alignment
            split = t.last + 1 if t.saved_from is None else max(t.first, t.saved_from)
            rows[row[t.part], t.first] += size
            rows[row[t.part], split] -= size
            if split <= t.last:
                rows[saved, split] += size
                rows[saved, t.last + 1] -= size
        for x, y, delta in self.in_place():  # both live at one op only, sharing memory
            shared = _overlap(x.size, y.size, delta, alignment)
            rows[row[y.part], y.first] -= shared
            rows[row[y.part], y.first + 1] += shared
        return dict(zip(PARTS, np.cumsum(rows, axis=1)[:, :n]))

    def persistent(self) -> dict:
        """``{part: bytes}`` of the variables (held for the whole step)."""
        held = dict.fromkeys(PERSISTENT_PARTS, 0)
        for _, size, part in self.variables:
            held[part] += size
        return held


def _overlap(base: int, member: int, delta: int, alignment: int) -> int:
    """Bytes a ``member`` buffer starting ``delta`` bytes after a ``base`` shares with it."""
    base, member = (-(-size // alignment) * alignment for size in (base, member))
    return max(0, min(delta + member, base) - max(delta, 0))


def fused_block_scratch_bytes(rows: int, mid_w: int, mid_c: int, out_w: int) -> int:
    """The scratch of one fused block (``dgst_fused_block_scratch_bytes``): ``rows`` conv
    output rows and one depthwise output row (int8), a row index per ring slot and the
    depthwise accumulators of one pixel (int32).

        fused_block_scratch_bytes(3, 8, 8, 8)   # 4 * (3 + 8) + 3 * 64 + 64
    """
    return 4 * (rows + mid_c) + (rows * mid_w * mid_c + out_w * mid_c) * ACTIVATION_BYTES


def build_timeline(graph: MemoryGraph, plans: dict, grad: list,
                   options: TimelineOptions) -> StepTimeline:
    """The timeline of the step that updates ``plans`` ({step index: `LayerPlan`}, the
    classifier included); ``grad[v]``: whether a gradient reaches value v."""
    return _Builder(graph, plans, grad, options).build()


class _Builder:
    """Walks the steps as the exporter does: variables, selection, forward, backward."""

    def __init__(self, graph: MemoryGraph, plans: dict, grad: list, options: TimelineOptions):
        self.graph, self.plans, self.grad, self.options = graph, plans, grad, options
        self.values, self.facts = graph.values, graph.facts
        self.first = min(plans)
        self.timeline = StepTimeline([], [], [], offline_plan=options.offline_plan)
        self.buffer_tensor = {}  # activation buffer -> its tensor
        self.saved, self.masks, self.kept = {}, {}, []
        self.activation_inputs = {}  # step index -> the int8 input its table activation keeps
        self.pool_axes = False  # the MEAN axes constant is in the file
        self.pending_kernels = []  # full kernels assembled for the next forward op
        self.gradients, self.readers, self.pooled = {}, {}, set()
        chains = graph.fusable_chains(self.first, options.fold_pads) if options.fuse_blocks \
            else []
        self.chains = {chain[0].index: chain for chain in chains}
        self.in_chain = {step.index for chain in chains for step in chain[1:]}

    # -- bookkeeping -----------------------------------------------------------------------
    def op(self, kind: str, steps, phase: str) -> int:
        self.timeline.ops.append(Op(kind, tuple(steps), phase))
        return len(self.timeline.ops) - 1

    def tensor(self, name: str, size: int, at: int, part: str, constants: int = 0) -> Tensor:
        """A new planned tensor written at op ``at`` (and ``constants`` more file tensors)."""
        t = Tensor(name, int(size), at, at, part)
        self.timeline.tensors.append(t)
        self.timeline.tensor_count += 1 + constants
        return t

    def scratch(self, size: int, at: int, name: str = "scratch") -> None:
        self.timeline.tensors.append(Tensor(name, int(size), at, at, SCRATCH))
        self.timeline.scratch_count += 1

    @staticmethod
    def read(tensor: Tensor | None, at: int) -> None:
        if tensor is not None:
            tensor.last = max(tensor.last, at)

    def value_tensor(self, v: int) -> Tensor:
        return self.buffer_tensor[self.values[v].buffer]

    def write_value(self, v: int, at: int, constants: int = 0) -> Tensor:
        """The tensor of value ``v`` (its buffer's, when an op computes in place)."""
        value = self.values[v]
        existing = self.buffer_tensor.get(value.buffer)
        if existing is not None:
            self.timeline.tensor_count += 1 + constants
            return existing
        t = self.tensor(f"value {v}", value.elements * ACTIVATION_BYTES, at, ACTIVATIONS,
                        constants)
        self.buffer_tensor[value.buffer] = t
        return t

    # -- the step ----------------------------------------------------------------------------
    def build(self) -> StepTimeline:
        self.variables()
        self.selection()
        self.forward()
        forward_end = len(self.timeline.ops) - 1
        for t in [*self.saved.values(), *self.activation_inputs.values()]:
            if t.part == ACTIVATIONS and t.last <= forward_end:
                t.saved_from = t.last + 1
        self.backward()
        self.finish()
        return self.timeline

    def variables(self) -> None:
        """Trainable tensors (one init op each), selection state and the step counter."""
        held = self.timeline.variables
        for index, plan in sorted(self.plans.items()):
            name = self.graph.steps[index].layer.name
            params = [("bias", plan.bias_bytes)]
            if plan.mode != "bias":
                params.append(("weights", plan.weight_bytes))
            for what, size in params:
                held.append((f"{name}/{what}", size, PARAMETERS))
                self.op("DGST_VARIABLE_INIT", (index,), "init")
                # the initial value is a constant; a RAM copy of kept weights is a new tensor
                self.timeline.tensor_count += 1 + (what == "weights" and plan.compact)
            if plan.state_bytes:
                held.append((f"{name}/state", plan.state_bytes, OPTIMIZER))
            self.timeline.tensor_count += plan.selection_variable
        if self.options.counter_bytes:
            held.append(("sgd/step", self.options.counter_bytes, OPTIMIZER))
            self.timeline.tensor_count += 1

    def selection(self) -> None:
        """On-device selection: each dynamic layer's kept indices (a graph output)."""
        for index, plan in sorted(self.plans.items()):
            if not plan.dynamic:
                continue
            at = self.op("DGST_SELECT_CHANNELS", (index,), "select")
            kept = self.tensor(f"{self.graph.steps[index].layer.name}/kept",
                               plan.kept_index_bytes, at, OPTIMIZER, constants=1)
            self.kept.append(kept)
            if plan.policy in ("traversal", "magnitude"):
                self.scratch(plan.channels * _SELECTION_SCORE_BYTES, at)

    # -- forward -----------------------------------------------------------------------------
    def forward(self) -> None:
        self.write_value(0, 0)
        self.timeline.inputs_outputs.append(1)  # the quantized image
        for step in self.graph.steps:
            if step.index in self.chains:
                self.fused_block(self.chains[step.index])
            elif step.index not in self.in_chain:
                self.forward_step(step)

    def fused_block(self, chain) -> None:
        a, b, c = chain
        at = self.op("DGST_FUSED_BLOCK", (a.index, b.index, c.index), "forward")
        x = self.value_tensor(a.inputs[0])
        self.read(x, at)
        y = self.write_value(c.output, at, constants=6)  # 3 kernels, 3 requantization tables
        mid, out = self.values[a.output], self.values[b.output]
        rows = (self.graph.folded_kernel(b) or b.layer.kernel_size)[0]
        self.scratch(fused_block_scratch_bytes(rows, mid.shape[1], mid.shape[2], out.shape[1]),
                     at)
        if self.options.offline_plan:
            self.fused_in_place(chain, x, y, at)

    def fused_in_place(self, chain, x: Tensor, y: Tensor, at: int) -> None:
        """The fused block's output over its input (`fused_block_inplace_delta`)."""
        a, b, c = chain
        inp, mid, out = (self.values[v] for v in (a.inputs[0], a.output, c.output))
        conv_h, conv_stride, conv_pad = self.axis_geometry(a)
        dw_h, dw_stride, dw_pad = self.axis_geometry(b)
        delta = fused_block_inplace_delta(
            x.size, inp.shape[1] * inp.shape[2], out.shape[0], out.shape[1] * out.shape[2],
            mid.shape[0], conv_stride, conv_pad, dw_h, dw_stride, dw_pad)
        if delta is not None:  # the output starts delta bytes before the input
            self.timeline.in_place_candidates.append((x, y, at, -delta))

    def axis_geometry(self, step: Step) -> tuple:
        """(kernel rows, stride, top padding) of a conv as the exported graph computes it:
        an explicit padding folded into a SAME kernel, kept (a PAD op: its top rows), or
        the layer's own SAME / VALID."""
        layer = step.layer
        kernel, stride = int(layer.kernel_size[0]), int(layer.strides[0])
        in_h, out_h = self.values[step.inputs[0]].shape[0], self.values[step.output].shape[0]
        folded = self.graph.folded_kernel(step)
        if step.explicit_padding != ((0, 0), (0, 0)):
            plan = self.plans.get(step.index)
            if self.options.fold_pads and folded is not None and \
                    (plan is None or plan.mode == "bias"):
                return folded[0], stride, same_pad_before(in_h, out_h, folded[0], stride)
            return kernel, stride, step.explicit_padding[0][0]
        if str(layer.padding).lower() == "same":
            return kernel, stride, same_pad_before(in_h, out_h, kernel, stride,
                                                   int(layer.dilation_rate[0]))
        return kernel, stride, 0

    def forward_step(self, step: Step) -> None:
        plan = self.plans.get(step.index)
        source = self.padded_input(step, plan)
        facts = self.facts[step.index]
        if facts.kind == "activation":  # a table activation of its own
            self.table_activation(step, source)
            return
        if plan is not None and plan.mode != "bias":
            self.keep_input(step, plan, source)
        at = self.op(self.forward_kind(step), (step.index,), "forward")
        for v in step.inputs[1:]:
            self.read(self.value_tensor(v), at)
        self.read(source, at)
        for t in self.pending_kernels:
            self.read(t, at)
        self.pending_kernels = []
        if facts.activation:  # the op writes the activation's int8 input
            x = self.tensor(f"{step.layer.name}/pre_activation",
                            self.values[step.output].elements * ACTIVATION_BYTES, at,
                            ACTIVATIONS, constants=self.constants(facts))
        else:
            self.write_value(step.output, at, constants=self.constants(facts))
        self.forward_scratch(step, at)
        self.record_saved(step, at)
        if facts.activation:
            self.table_activation(step, x)

    def table_activation(self, step: Step, x: Tensor) -> None:
        """The ops of ``step``'s table activation on its int8 input ``x`` (module doc); x is
        kept for ``DGST_ACTIVATION_GRAD`` when the gradient passes."""
        kind = self.facts[step.index].activation
        size = self.values[step.output].elements * ACTIVATION_BYTES
        first = "HARD_SWISH" if kind == "hard_swish" else "LOGISTIC"
        at = self.op(first, (step.index,), "forward")
        self.read(x, at)
        if kind == "swish":  # x * sigmoid(x)
            sigmoid = self.tensor(f"{step.layer.name}/sigmoid", size, at, ACTIVATIONS)
            at = self.op("MUL", (step.index,), "forward")
            self.read(x, at)
            self.read(sigmoid, at)
        self.write_value(step.output, at)
        if step.index >= self.first and self.grad[step.output]:
            self.activation_inputs[step.index] = x

    def padded_input(self, step: Step, plan) -> Tensor:
        """The tensor the op reads: its input, or a PAD op's padded copy of it."""
        source = self.value_tensor(step.inputs[0])
        if step.explicit_padding == ((0, 0), (0, 0)):
            return source
        weights = plan is not None and plan.mode != "bias"
        if self.options.fold_pads and not weights and \
                self.graph.folded_kernel(step) is not None:
            return source
        (top, bottom), (left, right) = step.explicit_padding
        h, w, c = self.values[step.inputs[0]].shape
        at = self.op("PAD", (step.index,), "forward")
        self.read(source, at)
        return self.tensor(f"{step.layer.name}/padded", (h + top + bottom) * (w + left + right)
                           * c * ACTIVATION_BYTES, at, ACTIVATIONS, constants=1)

    def keep_input(self, step: Step, plan: LayerPlan, source: Tensor) -> None:
        """The full kernel assembled before the conv (kept weights in RAM) and the input
        channels kept for the weight gradient (a copy unless all of the input is kept)."""
        name = step.layer.name
        if plan.compact:
            at = self.op("DGST_SCATTER_CHANNELS", (step.index,), "forward")
            self.pending_kernels = [self.tensor(f"{name}/weights_forward", plan.kernel_bytes,
                                                at, KERNELS)]
        if not plan.dynamic:
            self.timeline.tensor_count += 1  # the kept indices, a constant
        if plan.saved_bytes == source.size:
            self.saved[step.index] = source
            return
        at = self.op("DGST_GATHER_CHANNELS", (step.index,), "forward")
        self.read(source, at)
        self.saved[step.index] = self.tensor(f"{name}/input_kept", plan.saved_bytes, at, SAVED)

    def forward_kind(self, step: Step) -> str:
        kind = self.facts[step.index].kind
        if kind in ("conv", "depthwise"):
            if self.options.requant_in_flash:
                return "DGST_CONV2D"
            return "DEPTHWISE_CONV_2D" if kind == "depthwise" else "CONV_2D"
        names = {"dense": "FULLY_CONNECTED", "sum": "ADD", "pool": "MEAN", "reshape": "RESHAPE"}
        name = names.get(kind) or type(step.layer).__name__.upper()
        return {"MULTIPLY": "MUL"}.get(name, name)  # TFLite's name

    def constants(self, facts) -> int:
        """Constant tensors of a forward op besides its output (the converter shares one
        axes tensor between all global average poolings)."""
        if facts.weighted:
            return 2 + (facts.kind != "dense" and self.options.requant_in_flash)
        if facts.kind == "pool" and not self.pool_axes:
            self.pool_axes = True
            return 1
        return 1 if facts.kind == "reshape" else 0  # its shape

    def forward_scratch(self, step: Step, at: int) -> None:
        facts, out = self.facts[step.index], self.values[step.output]
        if facts.kind in ("conv", "depthwise") and not self.options.requant_in_flash:
            self.timeline.builtin_conv_channels += facts.channels
        if facts.kind == "depthwise" and self.options.requant_in_flash:
            self.scratch(4 * facts.channels, at)
        if facts.kind == "depthwise" and self.options.inplace and \
                self.values[step.inputs[0]].buffer == out.buffer:
            inp = self.values[step.inputs[0]]
            self.scratch(inp.elements // inp.shape[-1] * ACTIVATION_BYTES, at)
        if facts.kind == "pool":
            self.scratch(4 * out.elements, at)
            for size in _MEAN_INDEX_SCRATCH:
                self.scratch(size, at)

    def record_saved(self, step: Step, at: int) -> None:
        """ReLU masks (their own op after a conv) and what other nonlinear ops keep."""
        if step.index < self.first or not self.grad[step.output]:
            return
        facts = self.facts[step.index]
        size = -(-self.values[step.output].elements * facts.mask_bits // 8) \
            + facts.saved_elements * ACTIVATION_BYTES
        if not size:
            return
        if facts.weighted:
            at = self.op("DGST_RELU_MASK", (step.index,), "forward")
        self.masks[step.index] = self.tensor(f"{step.layer.name}/mask", size, at, SAVED)

    # -- backward ----------------------------------------------------------------------------
    def backward(self) -> None:
        steps = self.graph.steps
        logits = self.values[self.graph.output_values[0]]
        at = self.op("DGST_SOFTMAX_XENT_GRAD", (logits.producer,), "backward")
        self.label = self.tensor("label", 4, 0, LOSS)
        self.read(self.label, at)
        self.logits = self.value_tensor(logits.index)
        self.read(self.logits, at)
        self.loss = self.tensor("loss", 4, at, LOSS)
        self.give(logits.index, self.tensor("logits/grad",
                                            logits.elements * self.options.gradient_bytes,
                                            at, GRADIENTS))
        for step in reversed(steps[self.first:]):
            if not self.grad[step.output] or step.output not in self.gradients:
                continue
            gradient = self.take(step.output)
            kind = self.facts[step.index].kind
            if self.facts[step.index].activation:
                gradient = self.activation_backward(step, gradient)
            if kind == "activation":
                if self.grad[step.inputs[0]]:
                    self.give(step.inputs[0], gradient)
            elif self.facts[step.index].weighted:
                self.weight_backward(step, gradient)
            elif kind == "sum":  # the gradient passes to the inputs unchanged
                for v in step.inputs:
                    if self.grad[v]:
                        self.give(v, gradient)
            elif kind == "reshape":
                self.reshape_backward(step, gradient)
            elif kind == "pool":
                self.pool_backward(step, gradient)
            else:
                self.other_backward(step, gradient)

    def activation_backward(self, step: Step, gradient: Tensor) -> Tensor:
        """``DGST_ACTIVATION_GRAD``: the float gradient of the table activation's input from
        its output's and the kept int8 input, over the output's gradient if that dies here
        (`dgst_tf.export.training.offline_plan`)."""
        at = self.op("DGST_ACTIVATION_GRAD", (step.index,), "backward")
        self.read(gradient, at)
        self.read(self.activation_inputs.get(step.index), at)
        dx = self.tensor(f"{step.layer.name}/activation_grad", self.grad_size(step.output), at,
                         GRADIENTS, constants=1)  # + the derivative table
        if self.options.offline_plan:
            self.timeline.in_place_candidates.append((gradient, dx, at, 0))
        return dx

    def reshape_backward(self, step: Step, gradient: Tensor) -> None:
        """A Flatten / Reshape: a builtin ``RESHAPE`` of the gradient to the input's shape
        (+ its shape constant), over that gradient where it dies there."""
        v = step.inputs[0]
        if not self.grad[v]:
            return
        self.pooled.discard(id(gradient))
        at = self.op("RESHAPE", (step.index,), "backward")
        self.read(gradient, at)
        dx = self.tensor(f"value {v}/grad", self.grad_size(v), at, GRADIENTS, constants=1)
        if self.options.offline_plan:
            self.timeline.in_place_candidates.append((gradient, dx, at, 0))
        self.give(v, dx)

    def give(self, v: int, gradient: Tensor) -> None:
        """``gradient`` is (a part of) the gradient of value ``v``: sum it with the one
        already there (an ADD op), else record it."""
        if v in self.gradients:
            at = self.op("ADD", (self.values[v].producer,), "backward")
            previous = self.gradients[v]
            self.read(previous, at)
            self.read(gradient, at)
            self.readers[id(previous)] -= 1
            gradient = self.tensor(f"value {v}/grad_sum", self.grad_size(v), at, GRADIENTS)
        self.gradients[v] = gradient
        self.readers[id(gradient)] = self.readers.get(id(gradient), 0) + 1

    def take(self, v: int) -> Tensor:
        gradient = self.gradients.pop(v)
        self.readers[id(gradient)] -= 1
        return gradient

    def grad_size(self, v: int) -> int:
        return self.values[v].elements * self.options.gradient_bytes

    def pool_backward(self, step: Step, gradient: Tensor) -> None:
        """A global average pooling: its input's gradient is the pooled one, spread by the
        producer's quantization; a float input-shaped copy only when another op needs it."""
        v = step.inputs[0]
        if not self.grad[v]:
            return
        producer = self.values[v].producer
        if producer >= 0 and self.facts[producer].weighted and \
                not self.facts[producer].activation and len(self.values[v].readers) == 1:
            self.pooled.add(id(gradient))
            self.give(v, gradient)
            return
        at = self.op("MUL", (step.index,), "backward")
        self.read(gradient, at)
        self.give(v, self.tensor(f"{step.layer.name}/input_grad", self.grad_size(v), at,
                                 GRADIENTS, constants=1))

    def other_backward(self, step: Step, gradient: Tensor) -> None:
        """An op the exporter does not differentiate (a Keras-side estimate): float
        gradients of its inputs from its output gradient and what it saved."""
        at = self.op(f"{type(step.layer).__name__.upper()}_GRAD", (step.index,), "backward")
        self.read(gradient, at)
        self.read(self.masks.get(step.index), at)
        for v in step.inputs:
            if self.grad[v]:
                self.give(v, self.tensor(f"value {v}/grad", self.grad_size(v), at, GRADIENTS))

    def weight_backward(self, step: Step, gradient: Tensor) -> None:
        """Error signal, input gradient and (updated layers) bias and weight gradients and
        their SGD updates, in the exporter's order."""
        plan, name, index = self.plans.get(step.index), step.layer.name, step.index
        mask = self.masks.get(index)
        pooled = id(gradient) in self.pooled
        if mask is not None and not pooled and self.readers[id(gradient)] > 0:
            at = self.op("RESHAPE", (index,), "backward")
            self.read(gradient, at)
            gradient = self.tensor(f"{name}/grad_copy", gradient.size, at, GRADIENTS,
                                   constants=1)
        at = self.op("DGST_QUANTIZE_GRAD", (index,), "backward")
        self.read(gradient, at)
        self.read(mask, at)
        out = self.values[step.output]
        dy = self.tensor(f"{name}/dy", out.elements * ACTIVATION_BYTES, at, ERRORS,
                         constants=1 + pooled)  # + the weight scales (+ the pool factor)
        dy_scale = self.tensor(f"{name}/dy_scale", 4, at, ERRORS)
        if self.options.offline_plan and not pooled:  # dy in the end of the float gradient
            self.timeline.in_place_candidates.append(
                (gradient, dy, at, quantize_grad_inplace_delta(out.elements)))
        v = step.inputs[0]
        if plan is not None:
            self.bias_gradient(step, plan, dy, dy_scale)
        if self.grad[v]:
            self.input_gradient(step, plan, dy, dy_scale)
        if plan is not None and plan.mode != "bias":
            self.weight_gradients(step, plan, dy, dy_scale)

    def input_gradient(self, step: Step, plan, dy: Tensor, dy_scale: Tensor) -> None:
        kernel = None
        if plan is not None and plan.compact:
            at = self.op("DGST_SCATTER_CHANNELS", (step.index,), "backward")
            kernel = self.tensor(f"{step.layer.name}/weights_backward", plan.kernel_bytes, at,
                                 KERNELS)
        depthwise = self.facts[step.index].kind == "depthwise"
        kind = "DGST_DEPTHWISE_INPUT_GRAD" if depthwise else "DGST_CONV2D_INPUT_GRAD"
        at = self.op(kind, (step.index,), "backward")
        for t in (dy, dy_scale, kernel):
            self.read(t, at)
        v = step.inputs[0]
        dx = self.tensor(f"value {v}/grad", self.grad_size(v), at, GRADIENTS)
        self.give(v, dx)
        if depthwise and self.options.offline_plan:  # the gradient written around dy
            self.depthwise_in_place(step, dy, dx, at)

    def depthwise_in_place(self, step: Step, dy: Tensor, dx: Tensor, at: int) -> None:
        """`depthwise_input_grad_inplace_delta`: dy inside the float input gradient."""
        kernel, stride, pad = self.axis_geometry(step)
        (in_h, in_w, channels) = self.values[step.inputs[0]].shape
        out_w = self.values[step.output].shape[1]
        delta = depthwise_input_grad_inplace_delta(in_h, in_w, out_w, channels, kernel, stride,
                                                   pad, int(step.layer.dilation_rate[0]))
        self.timeline.in_place_candidates.append((dy, dx, at, -delta))

    def bias_gradient(self, step: Step, plan: LayerPlan, dy: Tensor, dy_scale: Tensor) -> None:
        """The bias gradient and its SGD update (before the input gradient)."""
        at = self.op("DGST_BIAS_GRAD", (step.index,), "backward")
        self.read(dy, at)
        grad = self.tensor(f"{step.layer.name}/bias_grad", plan.bias_gradient_bytes, at,
                           WEIGHT_GRADIENTS)
        self.sgd_update(step, grad, dy_scale)

    def weight_gradients(self, step: Step, plan: LayerPlan, dy: Tensor,
                         dy_scale: Tensor) -> None:
        """The kept-weights gradient and its update, chunk by chunk (`weight_grad_chunks`):
        a chunk's input channels gathered from the saved input, its gradient, its update."""
        name, index = step.layer.name, step.index
        depthwise = self.facts[index].kind == "depthwise"
        kind = "DEPTHWISE" if depthwise else "CONV2D"
        saved = self.saved.get(index)
        per_channel = plan.weight_gradient_bytes // plan.kept
        chunks = weight_grad_chunks(plan.kept, per_channel, self.options.weight_grad_chunk_bytes,
                                    dynamic=plan.dynamic)
        if len(chunks) > 1 and plan.kept == plan.channels:
            self.timeline.tensor_count -= 1  # the kept indices: no op reads them whole
        for chunk in chunks:
            count = chunk.stop - chunk.start
            whole = count == plan.kept
            source = saved
            if not whole:
                at = self.op("DGST_GATHER_CHANNELS", (index,), "backward")
                self.read(saved, at)
                source = self.tensor(f"{name}/input_kept_{chunk.start}",
                                     plan.saved_bytes // plan.kept * count, at, SAVED,
                                     constants=1)  # + the chunk's channel positions
            at = self.op(f"DGST_{kind}_WEIGHT_GRAD", (index,), "backward")
            self.read(dy, at)
            self.read(source, at)
            # the SGD op's constants: the RAM copy's channel indices (and for stochastic
            # rounding their place in the full kernel, for depthwise their weight scales);
            # a chunk of a full kernel: its channels (depthwise: for the gradient too)
            extra = plan.compact * (1 + self.options.stochastic + depthwise) + \
                (not whole) * (depthwise + (not plan.compact))
            grad = self.tensor(f"{name}/weight_grad_{chunk.start}", per_channel * count, at,
                               WEIGHT_GRADIENTS, constants=extra)
            self.sgd_update(step, grad, dy_scale)

    def sgd_update(self, step: Step, grad: Tensor, dy_scale: Tensor) -> None:
        """The SGD update reading a gradient and dy's scale (not dy)."""
        at = self.op("DGST_SGD_QAS_UPDATE", (step.index,), "backward")
        for t in (grad, dy_scale):
            self.read(t, at)

    # -- the end -----------------------------------------------------------------------------
    def finish(self) -> None:
        """Graph outputs live to the end; the inputs and outputs TFLM keeps structs for."""
        end = len(self.timeline.ops) - 1
        outputs = [self.loss, self.logits] + self.kept
        for t in outputs:
            t.last = end
        self.timeline.outputs = outputs
        io = self.timeline.inputs_outputs
        io += [0, 0, 1] + [0] * len(self.kept)  # label, loss, logits (quantized), kept
        if self.options.output_params:
            for index, plan in sorted(self.plans.items()):
                facts = self.facts[index]
                io.append(facts.channels)
                if plan.mode != "bias":
                    io.append(_weight_channels(facts, plan))


def _weight_channels(facts, plan: LayerPlan) -> int:
    """Quantization channels of a weights variable (depthwise: per channel, of the kept
    ones for a RAM copy; conv: per output channel; dense: per tensor)."""
    if facts.kind == "dense":
        return 1
    if facts.kind == "depthwise" and plan.compact:
        return plan.kept
    return facts.channels
