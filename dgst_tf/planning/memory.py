"""Analytic int8 memory of one training step (batch 1) for a Keras CNN and an `UpdateScheme`.

Answers, before any training: does a scheme fit the MCU, and what takes the memory::

    from dgst_tf.planning.memory import training_memory

    report = training_memory(model, scheme, input_shape=(128, 128, 3))
    report.extra_memory_bytes      # Lin et al.'s "extra memory" label (REFERENCE section 2)
    report.training_peak_bytes     # what the MCU must have for a whole training step
    report.dense_training_bytes    # the same for full (dense) training
    print(report.table())          # per-layer breakdown
    report.largest(3)              # the layers that hold the most memory

Two accountings:

- **Lin et al.'s "extra memory" label**, exactly as tiny-training computes it
  (``nelem_saved_for_backward``), in bits: for every bias-updated conv, its 1-bit output
  mask ``C_out*H_out*W_out`` plus the int32 bias ``32*C_out``; for a weight-updated conv
  with k kept input channels also the saved input ``H_in*W_in*k*8`` and the updated weights
  ``C_out*k*K*K*8`` (depthwise ``k*K*K*8``); plus the classifier input at 8 bits per
  element; nothing for momentum or the classifier weights. ``H_in, W_in`` is the unpadded
  input (PyTorch pads inside the conv). A non-classifier Dense is a 1x1 conv on a 1x1 map.
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
  optimizer state); the saved input and the weight gradient stay the kept channels.
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
  parameter for the whole step (0 for SGD without momentum, 1 momentum, 2 Adam).
- KB means 1024 bytes, as in tiny-training's labels.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Mapping

from dgst_tf.core.graph import UnsupportedModelError, check_functional, nodes_in_order
from dgst_tf.core.keras_compat import keras, tf
from dgst_tf.training.scheme import (CONV_TYPES, UpdateScheme, classifier_layer, conv_layers,
                            kept_channels, kernel_of, weights_per_channel)

KB = 1024
ACTIVATION_BYTES = 1  # int8 activations
WEIGHT_BYTES = 1      # int8 weights
BIAS_BYTES = 4        # int32 biases
OPTIMIZER_SLOTS = {"sgd": 0, "momentum": 1, "sgd_momentum": 1, "adam": 2}

# Layers whose output is their input, computed in place or fused into the producer.
_FUSED = (keras.layers.BatchNormalization, keras.layers.ReLU, keras.layers.Activation,
          keras.layers.LeakyReLU, keras.layers.ELU, keras.layers.Softmax,
          keras.layers.ZeroPadding2D, keras.layers.Dropout, keras.layers.SpatialDropout2D,
          keras.layers.GaussianNoise, keras.layers.GaussianDropout, keras.layers.Flatten,
          keras.layers.Reshape, keras.layers.Rescaling, keras.layers.Identity)
# Ops that may write into an input that dies at them.
_ELEMENTWISE = (keras.layers.Add, keras.layers.Subtract, keras.layers.Multiply,
                keras.layers.Average, keras.layers.Maximum, keras.layers.Minimum)
# Ops whose backward needs nothing saved from the forward pass (linear in their inputs).
_LINEAR = (keras.layers.Add, keras.layers.Subtract, keras.layers.Average,
           keras.layers.Concatenate, keras.layers.GlobalAveragePooling2D,
           keras.layers.GlobalAveragePooling1D, keras.layers.AveragePooling2D,
           keras.layers.ZeroPadding2D, keras.layers.Cropping2D, keras.layers.UpSampling2D,
           keras.layers.Flatten, keras.layers.Reshape, keras.layers.Permute,
           keras.layers.Dropout, keras.layers.SpatialDropout2D, keras.layers.GaussianNoise,
           keras.layers.GaussianDropout, keras.layers.BatchNormalization,
           keras.layers.Rescaling, keras.layers.Identity)
_MAX_POOLS = (keras.layers.MaxPooling2D, keras.layers.GlobalMaxPooling2D)
_PARAM_TYPES = CONV_TYPES + (keras.layers.Dense,)


class MemoryModelError(ValueError):
    """The memory model cannot analyse this model or input shape (says why)."""


# ------------------------------------------------------------------------------ reports
@dataclasses.dataclass
class LayerMemory:
    """Memory of one op of the training step, in bytes (``extra_memory_bits`` in bits).

    ``held_bytes`` is what the layer keeps for the whole step (saved input, masks, SRAM
    weights and biases, optimizer state); ``forward_live_bytes`` / ``backward_live_bytes``
    is all SRAM in use while this op runs forward / backward (0: not in the backward pass).
    """

    name: str
    kind: str
    update: str
    output_shape: tuple
    kept_channels: int = 0
    activation_bytes: int = 0
    saved_input_bytes: int = 0
    mask_bytes: int = 0
    weight_bytes: int = 0
    bias_bytes: int = 0
    optimizer_bytes: int = 0
    weight_gradient_bytes: int = 0
    forward_live_bytes: int = 0
    backward_live_bytes: int = 0
    extra_memory_bits: int = 0

    @property
    def held_bytes(self) -> int:
        return (self.saved_input_bytes + self.mask_bytes + self.weight_bytes
                + self.bias_bytes + self.optimizer_bytes)

    def parts(self) -> dict:
        """Non-zero held parts, e.g. ``{"saved input": 4096, "weights": 768}``."""
        parts = {"saved input": self.saved_input_bytes, "masks": self.mask_bytes,
                 "weights": self.weight_bytes, "biases": self.bias_bytes,
                 "optimizer state": self.optimizer_bytes}
        return {k: v for k, v in parts.items() if v}

    def describe(self) -> str:
        """``"block_16_expand (weights 1/4): 12.0 KB = saved input 3.0 KB + ..."``."""
        parts = " + ".join(f"{k} {kb(v)}" for k, v in self.parts().items())
        return f"{self.name} ({self.update}): {kb(self.held_bytes)}" + (
            f" = {parts}" if parts else "")


@dataclasses.dataclass
class MemoryReport:
    """The memory of one scheme on one model (see the module doc for the assumptions).

        report = training_memory(model, scheme, (128, 128, 3))
        report.training_peak_bytes, report.extra_memory_bytes, report.largest(3)
    """

    model_name: str
    scheme_name: str
    input_shape: tuple
    layers: list
    extra_memory_bits: int
    forward_peak_bytes: int
    training_peak_bytes: int
    peak_phase: str
    peak_layer: str
    peak_breakdown: dict
    dense_training_bytes: int | None = None
    settings: dict = dataclasses.field(default_factory=dict)
    notes: list = dataclasses.field(default_factory=list)

    @property
    def extra_memory_bytes(self) -> int:
        """Lin et al.'s label in bytes (bits / 8, rounded up)."""
        return -(-self.extra_memory_bits // 8)

    @property
    def extra_memory_kb(self) -> float:
        """Lin et al.'s label in KB (bits / 8 / 1024, as tiny-training prints it)."""
        return self.extra_memory_bits / 8 / KB

    @property
    def saving_bytes(self) -> int | None:
        """Dense training peak minus this scheme's training peak."""
        if self.dense_training_bytes is None:
            return None
        return self.dense_training_bytes - self.training_peak_bytes

    @property
    def held_bytes(self) -> int:
        return sum(row.held_bytes for row in self.layers)

    def layer(self, name: str) -> LayerMemory:
        for row in self.layers:
            if row.name == name:
                return row
        raise KeyError(f"no layer {name!r} in the memory report of {self.model_name!r}")

    def largest(self, n: int = 5) -> list:
        """The ``n`` layers holding the most memory through the step (``held_bytes``).

            [row.name for row in report.largest(3)]
        """
        rows = [r for r in self.layers if r.held_bytes > 0]
        return sorted(rows, key=lambda r: (-r.held_bytes, r.name))[:n]

    def summary(self) -> str:
        """A few lines: the labels, the peak and where it is, dense vs sparse."""
        lines = [
            f"model {self.model_name}, scheme {self.scheme_name!r}, input "
            f"{'x'.join(str(d) for d in self.input_shape)}, batch 1, int8",
            f"extra memory (Lin et al. label): {self.extra_memory_kb:.1f} KB",
            f"inference peak (forward only):   {kb(self.forward_peak_bytes)}",
            f"training step peak:              {kb(self.training_peak_bytes)} "
            f"({self.peak_phase} pass at {self.peak_layer}: "
            + ", ".join(f"{k} {kb(v)}" for k, v in self.peak_breakdown.items() if v) + ")",
        ]
        if self.dense_training_bytes is not None:
            saving = self.saving_bytes
            lines.append(f"dense (full) training peak:      {kb(self.dense_training_bytes)} "
                         f"(this scheme saves {kb(saving)}, "
                         f"{100 * saving / self.dense_training_bytes:.1f}%)")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)

    def table(self, all_layers: bool = False) -> str:
        """Per-layer breakdown in KB (updated layers and the peak layer unless ``all_layers``).

            print(report.table())
        """
        columns = ("layer", "update", "output", "act", "saved", "mask", "weights", "bias",
                   "opt", "fwd live", "bwd live", "Lin")
        rows = []
        for r in self.layers:
            if not (all_layers or r.held_bytes or r.extra_memory_bits
                    or r.name == self.peak_layer):
                continue
            rows.append((r.name, r.update, "x".join(str(d) for d in r.output_shape),
                         _k(r.activation_bytes), _k(r.saved_input_bytes), _k(r.mask_bytes),
                         _k(r.weight_bytes), _k(r.bias_bytes), _k(r.optimizer_bytes),
                         _k(r.forward_live_bytes), _k(r.backward_live_bytes),
                         _k(r.extra_memory_bits / 8)))
        widths = [max(len(c), *(len(row[i]) for row in rows)) if rows else len(c)
                  for i, c in enumerate(columns)]
        def fmt(row):
            return "  ".join(v.ljust(w) if i < 3 else v.rjust(w)
                             for i, (v, w) in enumerate(zip(row, widths)))
        lines = ["KB per layer (act: output buffer; saved/mask/weights/bias/opt: held for "
                 "the step; fwd/bwd live: all SRAM while it runs)",
                 fmt(columns), fmt(["-" * w for w in widths])]
        lines += [fmt(row) for row in rows]
        return "\n".join(lines) + "\n" + self.summary()

    def to_dict(self) -> dict:
        payload = dataclasses.asdict(self)
        payload.update(extra_memory_bytes=self.extra_memory_bytes,
                       extra_memory_kb=self.extra_memory_kb, saving_bytes=self.saving_bytes)
        return payload


def kb(n_bytes) -> str:
    """``"12.3 KB"``."""
    return f"{n_bytes / KB:.1f} KB"


def _k(n_bytes) -> str:
    return f"{n_bytes / KB:.1f}" if n_bytes else "-"


# ------------------------------------------------------------------------------ graph
@dataclasses.dataclass
class _Value:
    """A tensor value computed by one op (fused ops do not create values)."""

    index: int
    shape: tuple
    producer: int              # step, -1 for a model input
    readers: list              # steps that read it
    buffer: int = -1

    @property
    def elements(self) -> int:
        return int(math.prod(self.shape))

    @property
    def last_use(self) -> int:
        return max(self.readers, default=self.producer)


@dataclasses.dataclass
class _Step:
    """One op that runs (fused layers are folded into the op that feeds them)."""

    index: int
    layer: object
    inputs: list               # value indices
    output: int                # value index
    fused: list = dataclasses.field(default_factory=list)  # activations applied on output
    # zero padding of fused ZeroPadding2D layers between the input value and this op
    explicit_padding: tuple = ((0, 0), (0, 0))


def _conv_kind(layer) -> str | None:
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        return "depthwise"
    if type(layer) is keras.layers.Conv2D:
        return "conv"
    return None


def _shape_without_batch(shape) -> tuple:
    dims = tuple(tf.TensorShape(shape).as_list()[1:])
    if any(d is None for d in dims):
        raise MemoryModelError(f"tensor shape {dims} is not fully defined")
    return tuple(int(d) for d in dims)


def _mask_bits(layer) -> int:
    """Bits per element a nonlinear activation saves for its backward pass (0: linear)."""
    if isinstance(layer, (keras.layers.ReLU, keras.layers.LeakyReLU)):
        return 1
    if isinstance(layer, keras.layers.Activation) or isinstance(layer, _PARAM_TYPES):
        fn = layer.activation
        name = getattr(fn, "__name__", str(fn))
        if name == "linear":
            return 0
        if name in ("relu", "relu6"):
            return 1
        return 8
    if isinstance(layer, (keras.layers.ELU, keras.layers.Softmax)):
        return 8
    return 0


class MemoryModel:
    """The graph of ``model`` analysed once at ``input_shape``; ``report(scheme)`` is fast.

        mm = MemoryModel(model, (128, 128, 3))
        mm.report(scheme).training_peak_bytes
        mm.extra_memory_bits(bias_layers=names[-16:], weights={"block_16_expand": 0.25})
    """

    def __init__(self, model: keras.Model, input_shape=None, gradient_bytes: int = 4,
                 optimizer: str | int = "sgd", inplace_depthwise: bool = False,
                 full_weights_in_sram: bool = False, activation_patterns=None,
                 fused_blocks: bool = False):
        check_functional(model, "MemoryModel")
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
        self._analyse()
        self._dense_peak = None

    @property
    def settings(self) -> dict:
        return {"gradient_bytes": self.gradient_bytes, "optimizer_slots": self.optimizer_slots,
                "inplace_depthwise": self.inplace_depthwise,
                "full_weights_in_sram": self.full_weights_in_sram,
                "activation_patterns": self.activation_patterns,
                "fused_blocks": self.fused_blocks, "activation_bytes": 1,
                "weight_bytes": 1, "bias_bytes": 4}

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

    # -- scheme-independent analysis -----------------------------------------------------
    def _analyse(self) -> None:
        model = self.model
        nodes = list(nodes_in_order(model))
        readers = {}  # tensor id -> node positions that read it
        for pos, node in enumerate(nodes):
            if isinstance(node.layer, keras.Model):
                raise UnsupportedModelError(
                    f"MemoryModel: layer {node.layer.name!r} is a nested model; flatten it")
            for tid in node.flat_input_ids:
                readers.setdefault(tid, []).append(pos)
        tensor_shape = {str(id(model.inputs[0])): (1, *self.input_shape)}
        self.values, self.steps = [], []
        value_of = {}   # tensor id -> value index
        padding_of = {}  # tensor id -> zero padding fused into it, ((top, bottom), (left, right))
        input_value = _Value(0, self.input_shape, -1, [])
        self.values.append(input_value)
        value_of[str(id(model.inputs[0]))] = 0
        for pos, node in enumerate(nodes):
            layer = node.layer
            in_ids = node.flat_input_ids
            in_shapes = [tensor_shape[t] for t in in_ids]
            try:
                out_shape = layer.compute_output_shape(
                    in_shapes[0] if len(in_shapes) == 1 else in_shapes)
            except Exception as err:  # noqa: BLE001 - reported with the layer name
                raise MemoryModelError(f"cannot infer the output shape of layer "
                                       f"{layer.name!r} ({type(layer).__name__}): {err}") from err
            if len(node.flat_output_ids) != 1:
                raise UnsupportedModelError(f"MemoryModel: layer {layer.name!r} has "
                                            f"{len(node.flat_output_ids)} outputs")
            out_id = node.flat_output_ids[0]
            tensor_shape[out_id] = tuple(tf.TensorShape(out_shape).as_list())
            if isinstance(layer, keras.layers.Dense) and \
                    in_shapes[0][-1] != int(layer.kernel.shape[0]):
                raise MemoryModelError(
                    f"input_shape {self.input_shape} gives layer {layer.name!r} "
                    f"{in_shapes[0][-1]} input features, but its kernel takes "
                    f"{int(layer.kernel.shape[0])}")
            if (isinstance(layer, _FUSED) and len(in_ids) == 1
                    and len(readers.get(in_ids[0], [])) == 1):
                source = value_of[in_ids[0]]
                value_of[out_id] = source
                (t, b), (left, r) = padding_of.get(in_ids[0], ((0, 0), (0, 0)))
                if isinstance(layer, keras.layers.ZeroPadding2D):
                    (pt, pb), (pl, pr) = layer.padding
                    t, b, left, r = t + pt, b + pb, left + pl, r + pr
                padding_of[out_id] = ((t, b), (left, r))
                producer = self.values[source].producer
                if producer >= 0:
                    self.steps[producer].fused.append(layer)
                continue
            step = _Step(len(self.steps), layer,
                         [value_of[t] for t in in_ids], len(self.values),
                         explicit_padding=padding_of.get(in_ids[0], ((0, 0), (0, 0))))
            for v in step.inputs:
                self.values[v].readers.append(step.index)
            shape = _shape_without_batch(tensor_shape[out_id])
            self.values.append(_Value(step.output, shape, step.index, []))
            value_of[out_id] = step.output
            self.steps.append(step)
        last = len(self.steps) - 1
        for out in model.outputs:  # outputs live to the end (they are the result)
            self.values[value_of[str(id(out))]].readers.append(last)
        self._by_layer = {s.layer.name: s for s in self.steps}
        self._assign_buffers()
        self._forward_activation_live = self._activation_liveness()
        self._lin_tables()

    def _assign_buffers(self) -> None:
        """Values -> memory buffers (in-place ops share their input's buffer)."""
        self.buffers = []  # [size, start, end]
        for value in self.values:
            if value.producer >= 0:
                step = self.steps[value.producer]
                if self._in_place(step):
                    for v in step.inputs:
                        src = self.values[v]
                        if src.last_use == step.index and src.elements >= value.elements \
                                and src.buffer >= 0:
                            value.buffer = src.buffer
                            buf = self.buffers[src.buffer]
                            buf[2] = max(buf[2], value.last_use)
                            break
            if value.buffer < 0:
                value.buffer = len(self.buffers)
                self.buffers.append([value.elements * ACTIVATION_BYTES,
                                     max(value.producer, 0), value.last_use])

    def _in_place(self, step) -> bool:
        layer = step.layer
        if isinstance(layer, _ELEMENTWISE):
            return True
        if self.inplace_depthwise and isinstance(layer, keras.layers.DepthwiseConv2D):
            return int(layer.depth_multiplier) == 1
        return False

    def _activation_liveness(self) -> list:
        live = [0] * len(self.steps)
        for size, start, end in self.buffers:
            for s in range(start, end + 1):
                live[s] += size
        for step in self.steps:  # an in-place depthwise conv needs one input channel aside
            if isinstance(step.layer, keras.layers.DepthwiseConv2D) and \
                    self.values[step.output].buffer == self.values[step.inputs[0]].buffer:
                inp = self.values[step.inputs[0]]
                live[step.index] += inp.elements // inp.shape[-1] * ACTIVATION_BYTES
        return live

    def _fused_chains(self, stop: int) -> list:
        """(conv, depthwise, 1x1 conv) steps before step ``stop`` whose intermediate values
        have no other reader: what the training export runs as one ``DGST_FUSED_BLOCK``."""
        def only_reader(step, kind):
            readers = self.values[step.output].readers
            if len(readers) != 1 or readers[0] >= stop:
                return None
            nxt = self.steps[readers[0]]
            return nxt if _conv_kind(nxt.layer) == kind and nxt.inputs[0] == step.output \
                else None
        chains, used = [], set()
        for a in self.steps[:stop]:
            if a.index in used or _conv_kind(a.layer) != "conv" or \
                    tuple(a.layer.dilation_rate) != (1, 1):
                continue
            b = only_reader(a, "depthwise")
            c = only_reader(b, "conv") if b is not None else None
            if c is None or int(b.layer.depth_multiplier) != 1 or \
                    tuple(b.layer.dilation_rate) != (1, 1) or \
                    tuple(c.layer.kernel_size) != (1, 1) or tuple(c.layer.strides) != (1, 1):
                continue
            chains.append((a, b, c))
            used |= {a.index, b.index, c.index}
        return chains

    def _fused_liveness(self, stop: int) -> list:
        """Forward activation bytes per step when the chains before ``stop`` are fused: the
        chain holds its input, its output and a few rows, never the expanded tensors."""
        live = list(self._forward_activation_live)
        for a, b, c in self._fused_chains(stop):
            mid, dw = self.values[a.output], self.values[b.output]
            rows = (int(b.layer.kernel_size[0]) * mid.shape[1] * mid.shape[2]
                    + dw.shape[1] * dw.shape[2]) * ACTIVATION_BYTES + 4 * (int(
                        b.layer.kernel_size[0]) + mid.shape[2])
            fused = live[a.index] - self.buffers[mid.buffer][0] \
                + self.values[c.output].elements * ACTIVATION_BYTES + rows
            for s in (a.index, b.index, c.index):
                live[s] = fused
        return live

    def _lin_tables(self) -> None:
        """Per layer: Lin's mask+bias bits and saved-input+weight bits per kept channel."""
        self._lin_bias_bits, self._lin_channel_bits = {}, {}
        for layer in self.convs + [s.layer for s in self.steps
                                   if isinstance(s.layer, keras.layers.Dense)]:
            if layer is self.classifier:
                continue
            step = self._by_layer[layer.name]
            out = self.values[step.output]
            inp = self.values[step.inputs[0]]
            in_spatial = inp.elements // inp.shape[-1]
            self._lin_bias_bits[layer.name] = out.elements * 1 + _bias_count(layer) * 32
            self._lin_channel_bits[layer.name] = (in_spatial + weights_per_channel(layer)) * 8
        step = self._by_layer[self.classifier.name]
        self._lin_fc_bits = self.values[step.inputs[0]].elements * 8

    # -- fast Lin label for the search -----------------------------------------------------
    def extra_memory_bits(self, bias_layers: Iterable[str],
                          weights: Mapping[str, float] | None = None) -> int:
        """Lin et al.'s label in bits for bias-updated ``bias_layers`` and ``weights``
        ({layer: ratio}; weight-updated layers also update their bias).

            mm.extra_memory_bits(["conv_a", "conv_b"], {"conv_b": 0.25}) / 8 / 1024  # KB
        """
        weights = {k: v for k, v in (weights or {}).items() if v}
        names = set(bias_layers) | set(weights)
        try:
            bits = self._lin_fc_bits + sum(self._lin_bias_bits[n] for n in names)
            for name, ratio in weights.items():
                layer = self._by_layer[name].layer
                bits += kept_channels(layer, ratio) * self._lin_channel_bits[name]
        except KeyError as err:
            raise MemoryModelError(f"layer {err.args[0]!r} is not a conv/dense layer of "
                                   f"model {self.model.name!r}") from None
        return bits

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
        steps, values = self.steps, self.values
        slots, gbytes = self.optimizer_slots, self.gradient_bytes
        updated = {}  # step index -> LayerUpdate-like (mode, ratio), classifier included
        for step in steps:
            layer = step.layer
            if layer is self.classifier:
                updated[step.index] = ("classifier", 1.0)
            elif isinstance(layer, _PARAM_TYPES):
                update = scheme.update_for(layer.name)
                if update.mode != "frozen":
                    updated[step.index] = (update.mode, update.ratio)
        # which values need a gradient: outputs of updated ops and everything downstream
        grad = [False] * len(values)
        for step in steps:
            grad[step.output] = step.index in updated or any(grad[v] for v in step.inputs)
        rows, notes = [], []
        for step in steps:
            layer = step.layer
            out = values[step.output]
            row = LayerMemory(layer.name, type(layer).__name__, "-", out.shape)
            buf = self.buffers[out.buffer]
            if buf[1] == step.index and out.producer == step.index and \
                    not any(values[v].buffer == out.buffer for v in step.inputs):
                row.activation_bytes = buf[0]
            if isinstance(layer, _PARAM_TYPES):
                row.update = "frozen"
            in_grad = grad[step.output]
            if step.index in updated:
                mode, ratio = updated[step.index]
                self._parameters(row, step, mode, ratio)
            # saved tensors and masks for the backward pass
            if in_grad:
                mask_bits = _mask_bits(layer) if isinstance(layer, _PARAM_TYPES) else 0
                mask_bits += sum(_mask_bits(f) for f in step.fused)
                if not isinstance(layer, _PARAM_TYPES) and not isinstance(layer, _LINEAR):
                    mask_bits += _mask_bits(layer)
                    if isinstance(layer, _MAX_POOLS):
                        mask_bits += 8
                    elif isinstance(layer, keras.layers.Multiply):
                        row.saved_input_bytes += sum(values[v].elements for v in step.inputs)
                    elif not _mask_bits(layer):
                        row.saved_input_bytes += sum(values[v].elements for v in step.inputs)
                        notes.append(f"{layer.name} ({type(layer).__name__}): backward "
                                     "assumed to need its inputs (saved in full)")
                row.mask_bytes = -(-out.elements * mask_bits // 8)
            rows.append(row)
        constant = sum(r.weight_bytes + r.bias_bytes + r.optimizer_bytes for r in rows)
        held_by_step = [r.saved_input_bytes + r.mask_bytes for r in rows]
        prefix, total = [], 0
        for h in held_by_step:
            total += h
            prefix.append(total)
        # forward: live activations + what earlier layers saved + SRAM parameters
        forward_live = self._forward_activation_live
        if self.fused_blocks and updated:
            forward_live = self._fused_liveness(min(updated))
        best = (-1, "forward", "", {})
        for step, row in zip(steps, rows):
            act = forward_live[step.index]
            row.forward_live_bytes = act + prefix[step.index] + constant
            if row.forward_live_bytes > best[0]:
                best = (row.forward_live_bytes, "forward", row.name, {
                    "activations": act, "saved tensors and masks": prefix[step.index],
                    "parameters in SRAM": constant - self._optimizer_total(rows),
                    "optimizer state": self._optimizer_total(rows)})
        # backward: live activation gradients + this layer's weight gradient + not yet
        # consumed saved tensors and masks + SRAM parameters
        grad_live = [0] * len(steps)
        for value in values:
            if grad[value.index] and value.producer >= 0:
                for s in range(value.producer, value.last_use + 1):
                    grad_live[s] += value.elements * gbytes
        for step, row in zip(steps, rows):
            if not grad[step.output]:
                continue
            live = grad_live[step.index] + row.weight_gradient_bytes
            row.backward_live_bytes = live + prefix[step.index] + constant
            if row.backward_live_bytes > best[0]:
                best = (row.backward_live_bytes, "backward", row.name, {
                    "activation gradients": grad_live[step.index],
                    "weight gradients": row.weight_gradient_bytes,
                    "saved tensors and masks": prefix[step.index],
                    "parameters in SRAM": constant - self._optimizer_total(rows),
                    "optimizer state": self._optimizer_total(rows)})
        extra_bits = self._lin_fc_bits + sum(r.extra_memory_bits for r in rows)
        self._classifier_row(rows).extra_memory_bits += self._lin_fc_bits
        return MemoryReport(
            model_name=self.model.name, scheme_name=scheme.name,
            input_shape=self.input_shape, layers=rows, extra_memory_bits=extra_bits,
            forward_peak_bytes=max(forward_live),
            training_peak_bytes=best[0], peak_phase=best[1], peak_layer=best[2],
            peak_breakdown=best[3], settings=self.settings, notes=sorted(set(notes)))

    def _classifier_row(self, rows):
        return rows[self._by_layer[self.classifier.name].index]

    @staticmethod
    def _optimizer_total(rows) -> int:
        return sum(r.optimizer_bytes for r in rows)

    def _parameters(self, row, step, mode, ratio) -> None:
        """SRAM parameters, saved input, gradient buffer and Lin bits of an updated layer."""
        layer = step.layer
        biases = _bias_count(layer) if (layer.use_bias or layer is not self.classifier) else 0
        inp = self.values[step.inputs[0]]
        weights = sram_weights = 0
        if mode == "classifier":
            row.update = "classifier"
            weights = int(kernel_of(layer).shape.num_elements())
            row.kept_channels = int(kernel_of(layer).shape[0])
            row.saved_input_bytes = inp.elements * ACTIVATION_BYTES
        elif mode == "weights":
            k = kept_channels(layer, ratio)
            row.update = f"weights {_ratio_label(ratio)}"
            row.kept_channels = k
            weights = k * weights_per_channel(layer)
            if self.full_weights_in_sram:
                sram_weights = int(kernel_of(layer).shape.num_elements())
            row.saved_input_bytes = inp.elements // inp.shape[-1] * k * ACTIVATION_BYTES
            pattern = self._pattern_for(layer)
            if pattern is not None:
                from dgst_tf.training.activation_patterns import layer_stored_bytes

                row.saved_input_bytes = ACTIVATION_BYTES * layer_stored_bytes(
                    layer, inp.shape, pattern, kept_channels=k,
                    explicit_padding=step.explicit_padding)
            row.extra_memory_bits = (self._lin_bias_bits[layer.name]
                                     + k * self._lin_channel_bits[layer.name])
        else:
            row.update = "bias"
            row.extra_memory_bits = self._lin_bias_bits[layer.name]
        sram_weights = max(sram_weights, weights)
        row.weight_bytes = sram_weights * WEIGHT_BYTES
        row.bias_bytes = biases * BIAS_BYTES
        row.optimizer_bytes = self.optimizer_slots * 4 * (sram_weights + biases)
        row.weight_gradient_bytes = self.gradient_bytes * (weights + biases)


    def _pattern_for(self, layer):
        """The activation pattern stored for ``layer``'s weight gradient, or None (Dense
        layers: spatial patterns change nothing)."""
        patterns = self.activation_patterns
        if patterns is None or isinstance(layer, keras.layers.Dense):
            return None
        if isinstance(patterns, str):
            return patterns
        return patterns.get(layer.name)


def _bias_count(layer) -> int:
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        shape = layer.depthwise_kernel.shape
        return int(shape[2] * shape[3])
    return int(kernel_of(layer).shape[-1])


def _ratio_label(ratio: float) -> str:
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
           "training_memory", "optimizer_slots", "kb"]
