"""Analytic int8 memory of one training step (batch 1) for a Keras CNN and an `UpdateScheme`,
as the step `export_training` emits runs it in TFLM.

Answers, before any training or export: does a scheme fit the MCU, and what takes the memory::

    from dgst_tf.planning.memory import training_memory

    report = training_memory(model, scheme, input_shape=(128, 128, 3))
    report.extra_memory_bytes      # Lin et al.'s "extra memory" label (`extra_memory`)
    report.training_peak_bytes     # the step's tensors at their peak (variables included)
    report.arena_bytes             # TFLM's whole arena for the step (its structs included)
    report.dense_training_bytes    # the training peak of full (dense) training
    print(report.table())          # per-layer breakdown
    report.largest(3)              # the layers that hold the most memory

Three figures:

- **Lin et al.'s "extra memory" label** (Lin et al. 2022), exactly as tiny-training computes
  it (``nelem_saved_for_backward``), in bits: for every bias-updated conv, its 1-bit output
  mask ``C_out*H_out*W_out`` plus the int32 bias ``32*C_out``; for a weight-updated conv
  with k kept input channels also the saved input ``H_in*W_in*k*8`` and the updated weights
  ``C_out*k*K*K*8`` (depthwise ``k*K*K*8``); plus the classifier input at 8 bits per
  element; nothing for momentum or the classifier weights. ``H_in, W_in`` is the unpadded
  input (PyTorch pads inside the conv). A non-classifier Dense is a 1x1 conv on a 1x1 map.
  (`dgst_tf.planning.extra_memory`.)
- **The training-step peak**: at every op of the exported step
  (`dgst_tf.planning.step_timeline`: the ops in the exporter's order and each tensor from
  the op that writes it to the op that last reads it), the tensors live plus the variables
  held for the whole step; the largest over the forward and the backward ops. Packed
  perfectly: on the exported graphs TFLM's planner reaches this bound.
- **TFLM's arena** (`dgst_tf.planning.tflm_runtime`): the step's tensors at the offsets of
  the export's offline memory plan (`dgst_tf.planning.arena_plan`: the same planner the
  exporter runs, with the ops that compute in place), TFLM's 16-byte alignment, plus the
  interpreter's own structs and op data: the 64-bit host TFLM (``tflm_target="host"``,
  what `train_tflm` reports) or a 32-bit Cortex-M TFLM (``"cortex-m"``, an estimate).

The step, with `export_training`'s defaults (each an option of `MemoryModel`, named as
there):

- int8 activations; frozen weights and biases in flash; every updated layer's int32 bias
  is a variable in the arena; a weight-updated conv keeps only the kept input channels'
  weights in RAM (``kept_weights_in_ram``), the full kernel it reads is assembled in a
  temporary just before the forward conv and before its input gradient; the classifier is
  always trained, int8 weights and int32 bias in RAM.
- ``fuse_blocks``: frozen conv -> depthwise -> 1x1 chains in front of the first updated
  layer run as one fused op holding its input, its output and a few rows
  (`dgst_tf.core.block_fusion_rule`). ``fold_pads``: an explicit ``ZeroPadding2D`` before
  a conv becomes an exact SAME conv (no padded copy), except before weight-updated layers.
  ``requant_in_flash``: convolutions read their requantization constants from flash
  (False: 8 bytes per output channel of TFLM op data).
- The ops run in the order the TFLite converter emits them (`memory_graph.converter_order`:
  a ResNet block's conv path before a projection shortcut named after it).
- BatchNormalization is folded; ReLU / ReLU6 are fused into the op before them; swish,
  sigmoid and hard-swish are table activations, ops of their own after the op writing
  their int8 input (``LOGISTIC`` + ``MUL``, ``LOGISTIC``, ``HARD_SWISH``; `memory_graph`);
  Dropout is free, and so is a Flatten/Reshape of a 1x1 map (of a larger map it is a
  ``RESHAPE`` writing a tensor of its own). Every op's inputs and output are live at once; TFLM
  computes nothing in place (``inplace_depthwise=True``: a runtime such as tinyengine's
  where elementwise ops and depthwise convs overwrite an input that dies there, the latter
  with one input channel of scratch).
- Saved for the backward pass, from the first updated layer on: 1-bit masks of the ReLU /
  ReLU6 outputs of the convs the gradient passes; each weight-updated layer's kept input
  channels (the input itself when all are kept; the padded input when a padding stays);
  the classifier's input; the int8 input of each table activation, for its backward
  ``DGST_ACTIVATION_GRAD`` (whose float gradient is written over its output's gradient).
  (Ops the exporter does not train through: 8 bits per element
  for other nonlinear activations, the argmax of a max-pool, the inputs of a Multiply.)
- Backward, as the exporter builds it: the float32 gradient of the logits; per conv/dense
  the int8 error signal (``dy``, 1 byte per output element, and its scale), which the
  layer's input-gradient, bias-gradient and weight-gradient ops read -- after a global
  average pooling it is quantized straight from the pooled gradient, so no float gradient
  of the pool's input exists; the float input gradient (``gradient_bytes`` per element,
  4) written before the update and read by the layer before; gradients meeting at a fork
  are summed into a new tensor, a masked gradient another op still reads is copied
  first; the int32 bias gradient and the int32 gradient of the kept weight slice, each
  freed by its SGD update right after. Backpropagation stops at the first updated layer.
- Optimizer state, held for the whole step: ``optimizer_slots`` float32 values per
  updated parameter (0 for the exporter's SGD; 1 momentum, 2 Adam, for Keras training);
  the int32 step counter of ``rounding="stochastic"`` (the default) or of a layer schedule
  (``layers_per_step`` below the number of weight-updated layers; the layers it leaves out
  keep their buffers).
- ``policy`` ("traversal", "magnitude", "window"; None: static selection at export): the
  kept channels are chosen on device each step, so every weight-updated layer holds its
  whole kernel in RAM and, if it keeps k < C channels, its selection state (traversal: the
  ``ceil(C/8)``-byte visited bitmask; window: an int32 position) and this step's k int32
  indices (a graph output), with C int64 scores of scratch while choosing
  (``full_weights_in_sram=True`` is the older spelling of ``policy="traversal"``).
- ``activation_patterns`` (a pattern name for every weight-updated conv, or a dict by
  layer; `dgst_tf.training.activation_patterns`, Keras training only): the saved input is
  only the pixels the pattern's output positions read (`layer_stored_bytes`). Lin et al.'s
  label is unchanged.
- ``output_params`` (True, as `export_training`'s default: the host graph; False: the
  firmware graph) only changes TFLM's structs: the trainable tensors as graph outputs.
- ``offline_plan`` (True, as `export_training`): the fused blocks, the error signals' int8
  quantization and a bias-only depthwise layer's input gradient write over the input they
  consume (`arena_plan`); False: TFLM's online planner, nothing in place.
  ``weight_grad_chunk_bytes``: weight gradients larger than this are computed and applied
  in chunks of kept input channels (`arena_plan.weight_grad_chunks`; 0: whole).
- KB means 1024 bytes, as in tiny-training's labels.

The graph analysis (tensor values, buffers) is `dgst_tf.planning.memory_graph`, the step's
ops and tensors `dgst_tf.planning.step_timeline`, TFLM's own bytes
`dgst_tf.planning.tflm_runtime`, the report types and charts
`dgst_tf.planning.memory_report`; this module decides what each layer holds and does the
accounting.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Mapping

from dgst_tf.core.classifier import logits_model
from dgst_tf.core.graph import check_functional
from dgst_tf.core.keras_compat import keras
from dgst_tf.core.layer_kinds import input_channels, is_dense, kernel_of, weights_per_channel
from dgst_tf.planning import tflm_runtime
from dgst_tf.planning.arena_plan import DEFAULT_WEIGHT_GRAD_CHUNK_BYTES
from dgst_tf.planning.extra_memory import extra_memory_label
from dgst_tf.planning.memory_graph import (ACTIVATION_BYTES, MemoryModelError, analyse_graph,
                                           bias_count)
from dgst_tf.planning.memory_report import KB, LayerMemory, MemoryReport, kb
from dgst_tf.planning.step_timeline import (PARTS, PERSISTENT_PARTS, LayerPlan,
                                            TimelineOptions, build_timeline)
from dgst_tf.training.scheme import (LayerUpdate, UpdateScheme, classifier_layer, conv_layers,
                                     kept_channels)

WEIGHT_BYTES = 1      # int8 weights
BIAS_BYTES = 4        # int32 biases
GRADIENT_ACCUMULATOR_BYTES = 4  # int32 bias and weight gradients
OPTIMIZER_SLOTS = {"sgd": 0, "momentum": 1, "sgd_momentum": 1, "adam": 2}
# the int32 step counter of stochastic rounding (its random numbers are hashes: no state)
ROUNDING_STATE_BYTES = {"stochastic": 4, "nearest": 0}
# on-device channel selection (`export_training`'s ``policy``); None / "static": at export
POLICIES = (None, "static", "traversal", "magnitude", "window")
_CLASSIFIER = "classifier"  # update mode of the classifier (always trained in full)


@dataclasses.dataclass
class _Peak:
    """The largest SRAM use of a step and where it happens."""

    bytes: int = -1
    phase: str = "forward"
    layer: str = ""
    breakdown: dict = dataclasses.field(default_factory=dict)


class MemoryModel:
    """The graph of ``model`` analysed once at ``input_shape``; ``report(scheme)`` is fast.
    The defaults describe the graph `export_training` emits by default (module doc).

        mm = MemoryModel(model, (128, 128, 3))
        mm.report(scheme).training_peak_bytes, mm.report(scheme).arena_bytes
        MemoryModel(model, (128, 128, 3), policy="traversal", output_params=False)  # firmware
        MemoryModel(model, (128, 128, 3), tflm_target="cortex-m").arena_bytes(scheme)  # 32-bit
        mm.extra_memory_bits(bias_layers=names[-16:], weights={"block_16_expand": 0.25})
    """

    def __init__(self, model: keras.Model, input_shape=None, gradient_bytes: int = 4,
                 optimizer: str | int = "sgd", inplace_depthwise: bool = False,
                 full_weights_in_sram: bool = False, activation_patterns=None,
                 fused_blocks: bool | None = None, rounding: str = "stochastic",
                 layers_per_step: int | None = None, *, policy: str | None = None,
                 fuse_blocks: bool = True, fold_pads: bool = True,
                 kept_weights_in_ram: bool = True, requant_in_flash: bool = True,
                 output_params: bool = True, offline_plan: bool = True,
                 weight_grad_chunk_bytes: int = DEFAULT_WEIGHT_GRAD_CHUNK_BYTES,
                 tflm_target: str = "host"):
        check_functional(model, "MemoryModel")
        model = logits_model(model)  # the head as the exporter trains it (core.classifier)
        if rounding not in ROUNDING_STATE_BYTES:
            raise MemoryModelError(f"rounding must be one of {tuple(ROUNDING_STATE_BYTES)}, "
                                   f"got {rounding!r}")
        if layers_per_step is not None and not int(layers_per_step) >= 1:
            raise MemoryModelError(f"layers_per_step must be None or >= 1, got "
                                   f"{layers_per_step!r}")
        if policy not in POLICIES:
            raise MemoryModelError(f"policy must be one of {POLICIES}, got {policy!r}")
        if tflm_target not in tflm_runtime.TARGETS:
            raise MemoryModelError(f"tflm_target must be one of {sorted(tflm_runtime.TARGETS)}"
                                   f", got {tflm_target!r}")
        if gradient_bytes not in (1, 2, 4):
            raise MemoryModelError(f"gradient_bytes must be 1, 2 or 4, got {gradient_bytes!r}")
        self.rounding = rounding
        self.layers_per_step = layers_per_step
        self.policy = _device_policy(policy, full_weights_in_sram)
        self.full_weights_in_sram = self.policy is not None
        self.model = model
        self.gradient_bytes = int(gradient_bytes)
        self.optimizer_slots = optimizer_slots(optimizer)
        self.inplace_depthwise = bool(inplace_depthwise)
        self.activation_patterns = activation_patterns
        self.fuse_blocks = bool(fuse_blocks if fused_blocks is None else fused_blocks)
        self.fused_blocks = self.fuse_blocks
        self.fold_pads = bool(fold_pads)
        self.kept_weights_in_ram = bool(kept_weights_in_ram)
        self.requant_in_flash = bool(requant_in_flash)
        self.output_params = bool(output_params)
        self.offline_plan = bool(offline_plan)
        self.weight_grad_chunk_bytes = int(weight_grad_chunk_bytes)
        self.tflm_target = tflm_target
        self.input_shape = self._input_shape(input_shape)
        self.classifier = classifier_layer(model)
        self.convs = conv_layers(model)
        self.notes = []
        self.graph = analyse_graph(model, self.input_shape, self.inplace_depthwise)
        self.steps, self.values = self.graph.steps, self.graph.values
        self._by_layer = self.graph.by_layer
        self.label = extra_memory_label(self.graph, self.convs, self.classifier)
        self._dense_peak = None

    @property
    def settings(self) -> dict:
        return {"gradient_bytes": self.gradient_bytes, "optimizer_slots": self.optimizer_slots,
                "inplace_depthwise": self.inplace_depthwise, "policy": self.policy,
                "full_weights_in_sram": self.full_weights_in_sram,
                "activation_patterns": self.activation_patterns,
                "fuse_blocks": self.fuse_blocks, "fold_pads": self.fold_pads,
                "kept_weights_in_ram": self.kept_weights_in_ram,
                "requant_in_flash": self.requant_in_flash,
                "output_params": self.output_params, "rounding": self.rounding,
                "layers_per_step": self.layers_per_step,
                "offline_plan": self.offline_plan,
                "weight_grad_chunk_bytes": self.weight_grad_chunk_bytes,
                "activation_bytes": ACTIVATION_BYTES,
                "weight_bytes": WEIGHT_BYTES, "bias_bytes": BIAS_BYTES,
                "arena": ("TFLM (64-bit host structs)" if self.tflm_target == "host"
                          else "TFLM (32-bit Cortex-M structs, estimated)")}

    def _input_shape(self, input_shape) -> tuple:
        if len(self.model.inputs) != 1:
            raise MemoryModelError(f"model {self.model.name!r} has {len(self.model.inputs)} "
                                   "inputs; the memory model handles one image input")
        model_shape = tuple(self.model.inputs[0].shape[1:])
        if input_shape is None:
            if any(d is None for d in model_shape):
                raise MemoryModelError(
                    f"model {self.model.name!r} has input shape {model_shape}; pass "
                    "input_shape=(H, W, C)")
            return tuple(int(d) for d in model_shape)
        shape = tuple(int(d) for d in input_shape)
        if len(shape) != len(model_shape) or shape[-1] != model_shape[-1] or min(shape) < 1:
            raise MemoryModelError(f"input_shape {shape} does not fit model "
                                   f"{self.model.name!r} (input {model_shape}): give "
                                   "(H, W, channels) with the model's channel count")
        return shape

    # -- fast Lin label for the search -----------------------------------------------------
    def extra_memory_bits(self, bias_layers: Iterable[str],
                          weights: Mapping[str, float] | None = None) -> int:
        """Lin et al.'s label in bits for bias-updated ``bias_layers`` and ``weights``
        ({layer: ratio}; weight-updated layers also update their bias).

            mm.extra_memory_bits(["conv_a", "conv_b"], {"conv_b": 0.25}) / 8 / 1024  # KB
        """
        try:
            kept = {name: kept_channels(self._by_layer[name].layer, ratio)
                    for name, ratio in (weights or {}).items() if ratio}
            return self.label.bits(bias_layers, kept)
        except KeyError as err:
            raise MemoryModelError(f"layer {err.args[0]!r} is not a conv/dense layer of "
                                   f"model {self.model.name!r}") from None

    # -- scheme-dependent ----------------------------------------------------------------
    def report(self, scheme: UpdateScheme, dense: bool = True) -> MemoryReport:
        """The memory report of ``scheme`` (with dense training memory if ``dense``)."""
        scheme.validate(self.model)
        report = self._report(scheme)
        if dense:
            if self._dense_peak is None:
                self._dense_peak = self._report(UpdateScheme.full(self.model)).training_peak_bytes
            report.dense_training_bytes = self._dense_peak
        return report

    def training_peak_bytes(self, scheme: UpdateScheme) -> int:
        """Just the training-step peak of ``scheme`` (no report; fast, for searches)."""
        timeline = self.timeline(scheme)
        return int(sum(timeline.live().values()).max()) + sum(timeline.persistent().values())

    def arena_bytes(self, scheme: UpdateScheme) -> int:
        """Just TFLM's arena for the step of ``scheme`` (no report; fast, for searches)."""
        return tflm_runtime.arena_bytes(self.timeline(scheme), self.tflm_target)

    def timeline(self, scheme: UpdateScheme):
        """The exported step's ops and tensors for ``scheme`` (`step_timeline.StepTimeline`).

            [op.kind for op in mm.timeline(scheme).ops][:3]
        """
        updated = self._updated_steps(scheme)
        return self._timeline(updated, self._needs_gradient(updated))[1]

    def _timeline(self, updated: dict, grad: list) -> tuple:
        """({step index: LayerPlan}, StepTimeline) of the updated steps."""
        plans = {index: self._plan(self.steps[index], *update)
                 for index, update in updated.items()}
        options = TimelineOptions(
            fold_pads=self.fold_pads, fuse_blocks=self.fuse_blocks,
            requant_in_flash=self.requant_in_flash, gradient_bytes=self.gradient_bytes,
            inplace=self.inplace_depthwise, output_params=self.output_params,
            counter_bytes=self._step_counter_bytes(plans),
            stochastic=self.rounding == "stochastic", offline_plan=self.offline_plan,
            weight_grad_chunk_bytes=self.weight_grad_chunk_bytes)
        return plans, build_timeline(self.graph, plans, grad, options)

    def _report(self, scheme: UpdateScheme) -> MemoryReport:
        updated = self._updated_steps(scheme)
        grad = self._needs_gradient(updated)
        plans, timeline = self._timeline(updated, grad)
        notes = set()
        rows = [self._layer_row(step, plans.get(step.index), grad[step.output], notes)
                for step in self.steps]
        live = timeline.live()
        held = timeline.persistent()
        total = sum(live.values()) + sum(held.values())
        forward, backward = self._peaks(timeline, rows, live, held, total)
        peak = backward if backward.bytes > forward.bytes else forward
        extra_bits = self.label.classifier_bits + sum(r.extra_memory_bits for r in rows)
        rows[self._by_layer[self.classifier.name].index].extra_memory_bits += \
            self.label.classifier_bits
        working = live["activations"] + live["scratch"]
        inference = [i for i, op in enumerate(timeline.ops) if op.phase != "backward"]
        return MemoryReport(
            model_name=self.model.name, scheme_name=scheme.name,
            input_shape=self.input_shape, layers=rows, extra_memory_bits=extra_bits,
            forward_peak_bytes=int(working[inference].max()),
            training_peak_bytes=peak.bytes, peak_phase=peak.phase, peak_layer=peak.layer,
            peak_breakdown=peak.breakdown, settings=self.settings, notes=sorted(notes),
            arena_bytes=tflm_runtime.arena_bytes(timeline, self.tflm_target))

    def _peaks(self, timeline, rows, live, held, total) -> tuple:
        """The forward and backward peaks; sets each row's live bytes (its ops' largest)."""
        peaks = {"forward": _Peak(), "backward": _Peak()}
        for i, op in enumerate(timeline.ops):
            phase = "backward" if op.phase == "backward" else "forward"
            here = int(total[i])
            for index in op.steps:
                row = rows[index]
                if phase == "forward":
                    row.forward_live_bytes = max(row.forward_live_bytes, here)
                else:
                    row.backward_live_bytes = max(row.backward_live_bytes, here)
            if here > peaks[phase].bytes:
                breakdown = {part: int(live[part][i]) for part in PARTS}
                for part in PERSISTENT_PARTS:
                    breakdown[part] = breakdown.get(part, 0) + held[part]
                layer = rows[op.steps[0]].name if op.steps else ""
                peaks[phase] = _Peak(here, phase, layer, breakdown)
        return peaks["forward"], peaks["backward"]

    def _updated_steps(self, scheme: UpdateScheme) -> dict:
        """Step index -> (mode, LayerUpdate) of every updated layer, the classifier included."""
        updated = {}
        for step, facts in zip(self.steps, self.graph.facts):
            layer = step.layer
            if layer is self.classifier:
                updated[step.index] = (_CLASSIFIER, LayerUpdate("weights", 1.0))
            elif facts.weighted:
                update = scheme.update_for(layer.name)
                if update.mode != "frozen":
                    updated[step.index] = (update.mode, update)
        return updated

    def _needs_gradient(self, updated: dict) -> list:
        """Per value: does a gradient reach it (outputs of updated ops and all downstream)."""
        grad = [False] * len(self.values)
        for step in self.steps:
            grad[step.output] = step.index in updated or any(grad[v] for v in step.inputs)
        return grad

    def _layer_row(self, step, plan: LayerPlan | None, in_grad: bool,
                   notes: set) -> LayerMemory:
        """One step's row: its output buffer, what it holds, what it saves for backward."""
        layer = step.layer
        out = self.values[step.output]
        row = LayerMemory(layer.name, type(layer).__name__, "-", out.shape)
        buf = self.graph.buffers[out.buffer]
        if buf.first_step == step.index and out.producer == step.index and \
                not any(self.values[v].buffer == out.buffer for v in step.inputs):
            row.activation_bytes = buf.size_bytes
        facts = self.graph.facts[step.index]
        if facts.weighted:
            row.update = "frozen"
        if plan is not None:
            self._fill_row(row, step, plan)
        if in_grad:
            row.saved_input_bytes += facts.saved_elements * ACTIVATION_BYTES
            row.mask_bytes = -(-out.elements * facts.mask_bits // 8)
            if facts.activation:  # a table activation keeps its int8 input
                row.mask_bytes += out.elements * ACTIVATION_BYTES
            if facts.note:
                notes.add(facts.note)
        return row

    def _fill_row(self, row: LayerMemory, step, plan: LayerPlan) -> None:
        layer = step.layer
        row.update = plan.mode if plan.mode in ("bias", _CLASSIFIER) else \
            f"weights {_fraction_label(plan.kept / plan.channels)}"
        row.kept_channels = plan.kept
        row.saved_input_bytes = plan.saved_bytes
        row.weight_bytes, row.bias_bytes = plan.weight_bytes, plan.bias_bytes
        row.optimizer_bytes = plan.state_bytes + plan.kept_index_bytes
        row.weight_gradient_bytes = plan.weight_gradient_bytes + plan.bias_gradient_bytes
        if plan.mode != _CLASSIFIER:
            row.extra_memory_bits = self.label.layer_bits(layer.name, plan.kept)

    def _plan(self, step, mode: str, update: LayerUpdate) -> LayerPlan:
        """What an updated layer holds and keeps in the exported step (module doc)."""
        layer = step.layer
        biases = bias_count(layer)  # the exporter trains a zero bias where there is none
        bias = dict(bias_bytes=BIAS_BYTES * biases,
                    bias_gradient_bytes=GRADIENT_ACCUMULATOR_BYTES * biases)
        if mode == "bias":
            return LayerPlan("bias", state_bytes=self.optimizer_slots * 4 * biases, **bias)
        channels = input_channels(layer)
        kept = channels if mode == _CLASSIFIER else kept_channels(layer, update)
        kernel = int(kernel_of(layer).shape.num_elements())
        partial = kept < channels
        dynamic = self.policy is not None and partial
        compact = (not dynamic and partial and self.kept_weights_in_ram
                   and not is_dense(layer))
        weights = kept * weights_per_channel(layer) if compact else kernel
        state = self.optimizer_slots * 4 * (weights + biases)
        if dynamic:
            state += selection_state_bytes(channels, kept, self.policy) - 4 * kept
        return LayerPlan(
            _CLASSIFIER if mode == _CLASSIFIER else "weights", kept=kept, channels=channels,
            saved_bytes=self._saved_input_bytes(step, kept), weight_bytes=weights * WEIGHT_BYTES,
            state_bytes=state, kept_index_bytes=4 * kept if dynamic else 0,
            weight_gradient_bytes=GRADIENT_ACCUMULATOR_BYTES * kept * weights_per_channel(layer),
            kernel_bytes=kernel * WEIGHT_BYTES if compact else 0, dynamic=dynamic,
            compact=compact, policy=self.policy if dynamic else None,
            selection_variable=dynamic and self.policy in ("traversal", "window"), **bias)

    def _step_counter_bytes(self, plans: dict) -> int:
        """The int32 step counter of stochastic rounding, which a layer schedule shares."""
        weight_layers = sum(plan.mode == "weights" for plan in plans.values())
        if self.layers_per_step is not None and self.layers_per_step < weight_layers:
            return ROUNDING_STATE_BYTES["stochastic"]
        return ROUNDING_STATE_BYTES[self.rounding]

    def _saved_input_bytes(self, step, kept: int) -> int:
        """The kept input channels a weight-updated layer saves: of the padded input when a
        padding stays in front of it (weight-updated layers keep theirs), only the pixels
        its activation pattern reads if it has one."""
        inp = self.values[step.inputs[0]]
        pattern = self._pattern_for(step.layer)
        if pattern is None:
            (top, bottom), (left, right) = step.explicit_padding
            pixels = inp.elements // inp.shape[-1]
            if len(inp.shape) == 3:
                pixels = (inp.shape[0] + top + bottom) * (inp.shape[1] + left + right)
            return pixels * kept * ACTIVATION_BYTES
        from dgst_tf.training.activation_patterns import layer_stored_bytes

        return ACTIVATION_BYTES * layer_stored_bytes(
            step.layer, inp.shape, pattern, kept_channels=kept,
            explicit_padding=step.explicit_padding)

    def _pattern_for(self, layer):
        """The activation pattern stored for ``layer``'s weight gradient, or None (Dense
        layers: spatial patterns change nothing)."""
        patterns = self.activation_patterns
        if patterns is None or is_dense(layer):
            return None
        if isinstance(patterns, str):
            return patterns
        return patterns.get(layer.name)


def _device_policy(policy, full_weights_in_sram: bool) -> str | None:
    """The on-device selection policy (None: static); ``full_weights_in_sram=True`` with
    no policy is traversal (DGSU)."""
    if policy == "static":
        return None
    if policy is None and full_weights_in_sram:
        return "traversal"
    return policy


def selection_state_bytes(channels: int, kept: int, policy: str = "traversal") -> int:
    """SRAM of on-device channel selection for a layer keeping ``kept`` of ``channels`` input
    channels: its state (traversal: the visited bitmask; window: an int32 position;
    magnitude: none) and this step's kept indices (int32); 0 when all are kept.

        selection_state_bytes(336, 42)   # 42 + 168
    """
    if kept >= channels:
        return 0
    state = {"traversal": -(-channels // 8), "window": 4, "magnitude": 0}[policy]
    return state + 4 * kept


def _fraction_label(ratio: float) -> str:
    """A weight-update ratio for display: ``0.25`` -> ``"1/4"``, ``1.0`` -> ``"1"``."""
    for denominator in (1, 2, 4, 8, 16, 32):
        if abs(ratio * denominator - round(ratio * denominator)) < 1e-9:
            n = round(ratio * denominator)
            return "1" if n == denominator else f"{n}/{denominator}"
    return f"{ratio:g}"


def optimizer_slots(optimizer) -> int:
    """Float32 state values per updated parameter: "sgd" 0, "momentum" 1, "adam" 2, an int,
    or a Keras optimizer (SGD without momentum 0, SGD with momentum 1, Adam-like 2).

        optimizer_slots("adam")   # 2
    """
    if isinstance(optimizer, bool):
        raise MemoryModelError(f"optimizer must be a name, an int or a Keras optimizer, "
                               f"got {optimizer!r}")
    if isinstance(optimizer, int):
        if optimizer < 0:
            raise MemoryModelError(f"optimizer slots must be >= 0, got {optimizer}")
        return optimizer
    if isinstance(optimizer, str):
        try:
            return OPTIMIZER_SLOTS[optimizer.lower()]
        except KeyError:
            raise MemoryModelError(f"unknown optimizer {optimizer!r}; choose from "
                                   f"{sorted(OPTIMIZER_SLOTS)} or give a slot count") from None
    name = type(optimizer).__name__.lower()
    if name == "sgd":
        return 1 if float(getattr(optimizer, "momentum", 0.0) or 0.0) else 0
    if name in ("adam", "adamw", "nadam", "adamax", "lamb"):
        return 2
    return 1


def training_memory(model: keras.Model, scheme: UpdateScheme, input_shape=None,
                    dense: bool = True, **options) -> MemoryReport:
    """The `MemoryReport` of ``scheme`` on ``model`` (options: see `MemoryModel`).

        report = training_memory(model, UpdateScheme({"block_16_expand": 0.25}), (128, 128, 3))
        print(report.table())
    """
    return MemoryModel(model, input_shape, **options).report(scheme, dense=dense)


__all__ = ["KB", "LayerMemory", "MemoryReport", "MemoryModel", "MemoryModelError",
           "POLICIES", "training_memory", "optimizer_slots", "selection_state_bytes", "kb"]
