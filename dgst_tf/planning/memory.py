"""Analytic int8 memory of one training step (batch 1) for a Keras CNN and an `UpdateScheme`.

Answers, before any training: does a scheme fit the MCU, and what takes the memory::

    from dgst_tf.planning.memory import training_memory

    report = training_memory(model, scheme, input_shape=(128, 128, 3))
    report.extra_memory_bytes      # Lin et al.'s "extra memory" label (`extra_memory`)
    report.training_peak_bytes     # what the MCU must have for a whole training step
    report.dense_training_bytes    # the same for full (dense) training
    print(report.table())          # per-layer breakdown
    report.largest(3)              # the layers that hold the most memory

Two accountings:

- **Lin et al.'s "extra memory" label** (Lin et al. 2022), exactly as tiny-training computes
  it (``nelem_saved_for_backward``), in bits: for every bias-updated conv, its 1-bit output
  mask ``C_out*H_out*W_out`` plus the int32 bias ``32*C_out``; for a weight-updated conv
  with k kept input channels also the saved input ``H_in*W_in*k*8`` and the updated weights
  ``C_out*k*K*K*8`` (depthwise ``k*K*K*8``); plus the classifier input at 8 bits per
  element; nothing for momentum or the classifier weights. ``H_in, W_in`` is the unpadded
  input (PyTorch pads inside the conv). A non-classifier Dense is a 1x1 conv on a 1x1 map.
  (`dgst_tf.planning.extra_memory`.)
- **The whole training-step peak**: the larger of the forward and the backward peak, each
  at batch 1 and the worst layer. Forward at a layer: the live activation buffers, plus the
  saved tensors and masks already written by the layers before it, plus the parameters
  that live in SRAM. Backward at a layer: the live activation-gradient buffers, that
  layer's weight-gradient buffer, the saved tensors and masks not yet consumed, plus the
  parameters in SRAM.

Assumptions of the MCU runtime (state them when quoting a number):

- int8 activations (1 byte per element); frozen weights and biases stay in flash; updated
  weights (only the kept-channel slice ``W[:, :, kept, :]``) are int8 in SRAM, updated
  biases int32 in SRAM; the classifier is always trained, its int8 weights and int32 bias
  in SRAM.
- BatchNormalization is folded into the conv before it; ReLU/activations and
  ``ZeroPadding2D`` are fused into the op that produces their input (padding is done by
  the conv kernel), Dropout/Flatten/Reshape are free. Only when the tensor they read has
  another reader do they become an op with its own buffer.
- Tensor lifetimes: a buffer lives from the op that writes it until its last reader, in
  the model's execution order; an op's inputs and output are live at once, so a conv is
  never in place. Elementwise ops (Add, Multiply...) write into an input that dies there
  (of the same size). ``inplace_depthwise=True`` lets a depthwise conv (multiplier 1)
  overwrite its input when it dies there, channel by channel with one input channel of
  scratch (tinyengine's in-place depthwise; TFLM does not).
- The buffers are packed perfectly (no fragmentation): a planner gets within a few % of
  this lower bound on chain-like CNNs.
- Saved for the backward pass: the kept input channels of each weight-updated layer (a
  copy, written when the layer runs), 1 bit per element for each ReLU (clamp) the
  gradient passes through, 8 bits per element for other nonlinear activations, the
  argmax (1 byte per output element) of a max-pool, the inputs of a Multiply; the
  classifier's full input.
- ``full_weights_in_sram=True`` (dynamic channel selection, DGSU): the chosen channels
  change every step, so the whole kernel of a weight-updated layer is in SRAM (and has
  optimizer state); a layer that keeps k < C input channels also holds its selection state
  for the whole step, counted with the optimizer state: the ``ceil(C/8)``-byte visited
  bitmask (persistent) and the k int32 indices of this step's channels (chosen before the
  forward pass, read by the backward pass; the on-device ranking's C int64 scores are
  scratch used before the forward pass, not at the peak). As `export_training` with a
  ``policy`` builds it: TFLM's variables are exactly the SRAM parameters and bitmasks plus
  the step counter. The saved input and the weight gradient stay the kept channels.
- ``activation_patterns`` (a pattern name for every weight-updated conv, or a dict by
  layer; `dgst_tf.training.activation_patterns`): the saved input is only the pixels the
  pattern's output positions read (`layer_stored_bytes`), as `SparseUpdateModel` with the
  same argument stores it. Lin et al.'s label is unchanged (it has no patterns).
- Backward: activation gradients of ``gradient_bytes`` per element (4: float32, as
  tiny-training's compiler emits by default; 1 for int8 gradients); the gradient of a
  tensor is written by the backward of its last reader and freed after the backward of
  its producer; backpropagation stops at the first updated layer. A weight-updated
  layer's weight and bias gradient buffer exists only during its own backward step (SGD
  applies it at once). Optimizer state: ``optimizer_slots`` float32 values per updated
  parameter for the whole step (0 for SGD without momentum, 1 momentum, 2 Adam), plus
  the 4-byte step counter of ``rounding="stochastic"`` int8 updates (`export_training`'s
  default: pass ``rounding="stochastic"`` to count it; the default ``"nearest"`` keeps the
  figures of round-to-nearest updates, 0 bytes). A layer schedule (``layers_per_step``
  below the number of weight-updated layers, `dgst_tf.tflm_ops.reference.layer_active`)
  reads the same counter: 4 bytes with ``"nearest"`` too, nothing else (the weight
  gradient buffers of the layers it leaves out are still planned).
- ``fused_blocks=True``: frozen conv -> depthwise -> 1x1 chains in front of the first
  updated layer run as one fused op (``DGST_FUSED_BLOCK``) holding its input, its output and
  a few rows; which chains fuse is `dgst_tf.core.block_fusion_rule`, as in the export.
- KB means 1024 bytes, as in tiny-training's labels.

The graph analysis (tensor lifetimes, buffers) is `dgst_tf.planning.memory_graph`, the
report types and charts `dgst_tf.planning.memory_report`; this module does the accounting.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Iterable, Mapping

from dgst_tf.core.graph import check_functional
from dgst_tf.core.keras_compat import keras
from dgst_tf.core.layer_kinds import input_channels, is_dense, kernel_of, weights_per_channel
from dgst_tf.planning.extra_memory import extra_memory_label
from dgst_tf.planning.memory_graph import (ACTIVATION_BYTES, MemoryModelError, analyse_graph,
                                           bias_count, has_weights, saved_for_backward)
from dgst_tf.planning.memory_report import KB, LayerMemory, MemoryReport, kb
from dgst_tf.training.scheme import (LayerUpdate, UpdateScheme, classifier_layer, conv_layers,
                                     kept_channels)

WEIGHT_BYTES = 1      # int8 weights
BIAS_BYTES = 4        # int32 biases
OPTIMIZER_SLOTS = {"sgd": 0, "momentum": 1, "sgd_momentum": 1, "adam": 2}
# the int32 step counter of stochastic rounding (its random numbers are hashes: no state)
ROUNDING_STATE_BYTES = {"stochastic": 4, "nearest": 0}
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

        mm = MemoryModel(model, (128, 128, 3))
        mm.report(scheme).training_peak_bytes
        mm.extra_memory_bits(bias_layers=names[-16:], weights={"block_16_expand": 0.25})
    """

    def __init__(self, model: keras.Model, input_shape=None, gradient_bytes: int = 4,
                 optimizer: str | int = "sgd", inplace_depthwise: bool = False,
                 full_weights_in_sram: bool = False, activation_patterns=None,
                 fused_blocks: bool = False, rounding: str = "nearest",
                 layers_per_step: int | None = None):
        check_functional(model, "MemoryModel")
        if rounding not in ROUNDING_STATE_BYTES:
            raise MemoryModelError(f"rounding must be one of {tuple(ROUNDING_STATE_BYTES)}, "
                                   f"got {rounding!r}")
        if layers_per_step is not None and not int(layers_per_step) >= 1:
            raise MemoryModelError(f"layers_per_step must be None or >= 1, got "
                                   f"{layers_per_step!r}")
        self.rounding = rounding
        self.layers_per_step = layers_per_step
        if gradient_bytes not in (1, 2, 4):
            raise MemoryModelError(f"gradient_bytes must be 1, 2 or 4, got {gradient_bytes!r}")
        self.model = model
        self.gradient_bytes = int(gradient_bytes)
        self.optimizer_slots = optimizer_slots(optimizer)
        self.inplace_depthwise = bool(inplace_depthwise)
        self.full_weights_in_sram = bool(full_weights_in_sram)
        self.activation_patterns = activation_patterns
        self.fused_blocks = bool(fused_blocks)
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
                "inplace_depthwise": self.inplace_depthwise,
                "full_weights_in_sram": self.full_weights_in_sram,
                "activation_patterns": self.activation_patterns,
                "fused_blocks": self.fused_blocks, "rounding": self.rounding,
                "layers_per_step": self.layers_per_step,
                "activation_bytes": ACTIVATION_BYTES,
                "weight_bytes": WEIGHT_BYTES, "bias_bytes": BIAS_BYTES}

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
        """Just the training-step peak of ``scheme`` (no dense comparison)."""
        return self._report(scheme).training_peak_bytes

    def _report(self, scheme: UpdateScheme) -> MemoryReport:
        updated = self._updated_steps(scheme)
        grad = self._needs_gradient(updated)
        notes = set()
        rows = [self._layer_row(step, updated.get(step.index), grad[step.output], notes)
                for step in self.steps]
        # what the layers up to each step have saved for the backward pass
        saved = list(itertools.accumulate(r.saved_input_bytes + r.mask_bytes for r in rows))
        forward_live = self.graph.forward_activation_live
        if self.fused_blocks and updated:
            forward_live = self.graph.fused_liveness(min(updated))
        forward = self._forward_peak(rows, forward_live, saved)
        backward = self._backward_peak(rows, grad, saved)
        peak = backward if backward.bytes > forward.bytes else forward
        extra_bits = self.label.classifier_bits + sum(r.extra_memory_bits for r in rows)
        rows[self._by_layer[self.classifier.name].index].extra_memory_bits += \
            self.label.classifier_bits
        return MemoryReport(
            model_name=self.model.name, scheme_name=scheme.name,
            input_shape=self.input_shape, layers=rows, extra_memory_bits=extra_bits,
            forward_peak_bytes=max(forward_live),
            training_peak_bytes=peak.bytes, peak_phase=peak.phase, peak_layer=peak.layer,
            peak_breakdown=peak.breakdown, settings=self.settings, notes=sorted(notes))

    def _updated_steps(self, scheme: UpdateScheme) -> dict:
        """Step index -> (mode, LayerUpdate) of every updated layer, the classifier included."""
        updated = {}
        for step in self.steps:
            layer = step.layer
            if layer is self.classifier:
                updated[step.index] = (_CLASSIFIER, LayerUpdate("weights", 1.0))
            elif has_weights(layer):
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

    def _layer_row(self, step, update, in_grad: bool, notes: set) -> LayerMemory:
        """One step's row: its output buffer, its parameters, what it saves for backward."""
        layer = step.layer
        out = self.values[step.output]
        row = LayerMemory(layer.name, type(layer).__name__, "-", out.shape)
        buf = self.graph.buffers[out.buffer]
        if buf.first_step == step.index and out.producer == step.index and \
                not any(self.values[v].buffer == out.buffer for v in step.inputs):
            row.activation_bytes = buf.size_bytes
        if has_weights(layer):
            row.update = "frozen"
        if update is not None:
            self._parameters(row, step, *update)
        if in_grad:
            bits, saved_elements, note = saved_for_backward(step, self.values)
            row.saved_input_bytes += saved_elements
            row.mask_bytes = -(-out.elements * bits // 8)
            if note:
                notes.add(note)
        return row

    def _sram_parts(self, rows) -> tuple:
        """(parameters in SRAM, optimizer state), bytes held for the whole step."""
        optimizer = sum(r.optimizer_bytes for r in rows)
        if any(r.update == _CLASSIFIER or r.update.startswith("weights") for r in rows):
            optimizer += self._step_counter_bytes(rows)
        return sum(r.weight_bytes + r.bias_bytes for r in rows), optimizer

    def _step_counter_bytes(self, rows) -> int:
        """The int32 step counter of stochastic rounding, which a layer schedule shares."""
        weight_layers = sum(r.update.startswith("weights") for r in rows)
        if self.layers_per_step is not None and self.layers_per_step < weight_layers:
            return ROUNDING_STATE_BYTES["stochastic"]
        return ROUNDING_STATE_BYTES[self.rounding]

    def _forward_peak(self, rows, forward_live, saved) -> _Peak:
        """Forward: live activations + what earlier layers saved + SRAM parameters."""
        params, optimizer = self._sram_parts(rows)
        peak = _Peak()
        for step, row in zip(self.steps, rows):
            act = forward_live[step.index]
            row.forward_live_bytes = act + saved[step.index] + params + optimizer
            if row.forward_live_bytes > peak.bytes:
                peak = _Peak(row.forward_live_bytes, "forward", row.name, {
                    "activations": act, "saved tensors and masks": saved[step.index],
                    "parameters in SRAM": params, "optimizer state": optimizer})
        return peak

    def _gradient_liveness(self, grad) -> list:
        """Activation-gradient bytes live at each step's backward."""
        live = [0] * len(self.steps)
        for value in self.values:
            if grad[value.index] and value.producer >= 0:
                for s in range(value.producer, value.last_use + 1):
                    live[s] += value.elements * self.gradient_bytes
        return live

    def _backward_peak(self, rows, grad, saved) -> _Peak:
        """Backward: live activation gradients + this layer's weight gradient + the saved
        tensors and masks not yet consumed + SRAM parameters."""
        params, optimizer = self._sram_parts(rows)
        grad_live = self._gradient_liveness(grad)
        peak = _Peak()
        for step, row in zip(self.steps, rows):
            if not grad[step.output]:
                continue
            live = grad_live[step.index] + row.weight_gradient_bytes
            row.backward_live_bytes = live + saved[step.index] + params + optimizer
            if row.backward_live_bytes > peak.bytes:
                peak = _Peak(row.backward_live_bytes, "backward", row.name, {
                    "activation gradients": grad_live[step.index],
                    "weight gradients": row.weight_gradient_bytes,
                    "saved tensors and masks": saved[step.index],
                    "parameters in SRAM": params, "optimizer state": optimizer})
        return peak

    def _parameters(self, row, step, mode: str, update: LayerUpdate) -> None:
        """SRAM parameters, saved input, gradient buffer and Lin bits of an updated layer."""
        layer = step.layer
        biases = bias_count(layer) if (layer.use_bias or layer is not self.classifier) else 0
        inp = self.values[step.inputs[0]]
        weights = sram_weights = 0
        if mode == _CLASSIFIER:
            row.update = _CLASSIFIER
            weights = int(kernel_of(layer).shape.num_elements())
            row.kept_channels = int(kernel_of(layer).shape[0])
            row.saved_input_bytes = inp.elements * ACTIVATION_BYTES
        elif mode == "weights":
            k = kept_channels(layer, update)
            row.update = f"weights {_fraction_label(update.ratio)}"
            row.kept_channels = k
            weights = k * weights_per_channel(layer)
            if self.full_weights_in_sram:
                sram_weights = int(kernel_of(layer).shape.num_elements())
            row.saved_input_bytes = self._saved_input_bytes(step, k)
            row.extra_memory_bits = self.label.layer_bits(layer.name, k)
        else:
            row.update = "bias"
            row.extra_memory_bits = self.label.layer_bits(layer.name)
        sram_weights = max(sram_weights, weights)
        row.weight_bytes = sram_weights * WEIGHT_BYTES
        row.bias_bytes = biases * BIAS_BYTES
        row.optimizer_bytes = self.optimizer_slots * 4 * (sram_weights + biases)
        if mode == "weights" and self.full_weights_in_sram:
            row.optimizer_bytes += selection_state_bytes(input_channels(layer), k)
        row.weight_gradient_bytes = self.gradient_bytes * (weights + biases)

    def _saved_input_bytes(self, step, kept: int) -> int:
        """The kept input channels a weight-updated layer saves (only the pixels its
        activation pattern reads, if it has one)."""
        inp = self.values[step.inputs[0]]
        pattern = self._pattern_for(step.layer)
        if pattern is None:
            return inp.elements // inp.shape[-1] * kept * ACTIVATION_BYTES
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


def selection_state_bytes(channels: int, kept: int) -> int:
    """SRAM of on-device channel selection (DGSU traversal) for a layer keeping ``kept`` of
    ``channels`` input channels: the visited bitmask and the kept indices (int32); 0 when
    all are kept (nothing to choose).

        selection_state_bytes(336, 42)   # 42 + 168
    """
    if kept >= channels:
        return 0
    return -(-channels // 8) + 4 * kept


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
           "training_memory", "optimizer_slots", "selection_state_bytes", "kb"]
