"""Training export: one on-device training step of a sparse update scheme as a `.tflite`.

`export_training` converts the model to full int8 (`export_int8`), then edits that graph into
a training step whose ONE Invoke takes one int8 image and an int32 label and does:

- the forward pass with the builtin int8 ops; the trainable weights and biases are variable
  tensors in the arena, copied once from read-only constants by ``DGST_VARIABLE_INIT``;
  the forward pass also keeps what the backward pass needs: 1-bit ReLU masks
  (``DGST_RELU_MASK``) and only the kept input channels of weight-updated layers
  (``DGST_GATHER_CHANNELS``);
- the loss gradient (``DGST_SOFTMAX_XENT_GRAD``), then backward only as far as the first
  updated layer: per layer ``DGST_QUANTIZE_GRAD`` (int8 error signal, mask applied),
  ``DGST_BIAS_GRAD``, ``DGST_CONV2D_WEIGHT_GRAD`` / ``DGST_DEPTHWISE_WEIGHT_GRAD`` for the
  kept channels, ``DGST_*_INPUT_GRAD`` (before the update), builtin MUL for global average
  pooling and ADD where residual gradients meet;
- in-place SGD with Quantization-Aware Scaling (``DGST_SGD_QAS_UPDATE``).

Outputs: the loss (float32 [1]), the int8 logits (before the update) and every trainable
tensor (after it). A JSON manifest beside the file describes inputs, outputs, layers and
the kept channels; `train_tflm` checks it against the file and runs N steps in TFLM in a
child process; `write_inference_model` writes the updated weights back into an inference
`.tflite`::

    from dgst_tf.export.training import export_training, train_tflm, write_inference_model

    info = export_training(model, UpdateScheme({"block_16_project": 0.25}), images,
                           "train.tflite", learning_rate=0.05)   # + train.json
    run = train_tflm("train.tflite", images[:100], labels[:100])
    run.losses, run.arena_bytes
    write_inference_model("train.tflite", run.params, "updated.tflite")
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import pathlib
import tempfile

import numpy as np

from dgst_tf.export import block_fusion
from dgst_tf.export.tflite_builder import int32_options
from dgst_tf.export.tflite_editor import ModelEditor
from dgst_tf.export.tflite_file import (TfliteFileError, read_tflite, schema, tensor_details,
                                        write_atomically)

__all__ = ["export_training", "TrainingExport", "TrainingExportError", "TrainingManifestError",
           "train_tflm", "TrainingRun", "load_manifest", "write_inference_model",
           "initial_params", "run_inference_tflm",
           "manifest_path_for", "MANIFEST_FORMAT"]

MANIFEST_FORMAT = "dgst-tf-training-step"
MANIFEST_VERSION = 1
_OPS = schema.BuiltinOperator
_WEIGHT_KINDS = {"CONV_2D": "conv", "DEPTHWISE_CONV_2D": "depthwise",
                 "FULLY_CONNECTED": "dense"}
_PASS_THROUGH = {"QUANTIZE"}  # int8 -> int8 requantization: straight-through gradient
_RELU, _RELU6 = 1, 3


class TrainingExportError(ValueError):
    """The model or scheme cannot be exported as a TFLM training step (names the layer)."""


class TrainingManifestError(ValueError):
    """A training manifest is missing, malformed or does not match its `.tflite`."""


def manifest_path_for(path) -> pathlib.Path:
    """``train.tflite`` -> ``train.json`` (where `export_training` writes the manifest)."""
    return pathlib.Path(path).with_suffix(".json")


@dataclasses.dataclass(frozen=True)
class TrainingExport:
    """What `export_training` wrote: the model, its manifest, and the manifest's content."""

    path: pathlib.Path
    manifest_path: pathlib.Path
    manifest: dict

    @property
    def ops(self) -> dict:
        return self.manifest["ops"]


@dataclasses.dataclass
class _Layer:
    name: str
    op_index: int
    kind: str  # conv, depthwise, dense
    update: object  # LayerUpdate
    kept: np.ndarray | None = None  # input channels whose weights are updated
    kept_tensor: int = -1  # the int32 tensor holding them (constant, or chosen on device)
    policy: str | None = None  # dynamic selection policy evaluated on device, or None
    compact: int = -1  # RAM variable with the kept input channels' weights only (static)
    flash: int = -1  # then: the read-only full kernel the other channels are read from
    weights_entry: dict | None = None  # then: its manifest "params" entry


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _find_layers(ed: ModelEditor, model, where) -> dict:
    """{op index: keras layer name} for conv/depthwise/dense ops, from the weight names."""
    from dgst_tf.training.scheme import updatable_layers

    names = [layer.name for layer in updatable_layers(model)]
    found = {}
    for i, op in enumerate(ed.subgraph.operators):
        kind = ed.builtin(op)
        if kind not in _WEIGHT_KINDS:
            continue
        weight_name = ed.name(op.inputs[1])
        matches = [n for n in names if f"/{n}/" in f"/{weight_name}"]
        if len(matches) != 1:
            raise TrainingExportError(f"{where}: cannot tell which Keras layer op {i} ({kind}, "
                                      f"weights {weight_name!r}) belongs to: {matches or 'none'}")
        found[i] = matches[0]
    return found


def _select(ed, op, layer_name, kind, k, selection, where) -> np.ndarray:
    """The k kept input channels of a weight-updated layer (static selection)."""
    w = ed.data(op.inputs[1]).astype(np.float64)
    scales, _ = ed.quantization(op.inputs[1])
    channels = w.shape[-1]
    if isinstance(selection, dict):
        if layer_name not in selection:
            raise TrainingExportError(f"{where}: selection has no channels for layer "
                                      f"{layer_name!r}")
        kept = np.asarray(selection[layer_name], np.int32)
        if (kept.ndim != 1 or len(kept) != k or len(set(kept.tolist())) != k
                or kept.min() < 0 or kept.max() >= channels):
            raise TrainingExportError(f"{where}: layer {layer_name!r} needs {k} distinct channel "
                                      f"indices in [0, {channels}), got {kept.tolist()}")
        return np.sort(kept)
    if selection == "first":
        return np.arange(k, dtype=np.int32)
    if selection != "magnitude":
        raise TrainingExportError(f"{where}: selection must be 'magnitude', 'first' or a dict "
                                  f"{{layer: channels}}, got {selection!r}")
    if kind == "depthwise":
        real = w[0] * scales[None, None, :]
        norms = np.sqrt((real ** 2).sum(axis=(0, 1)))
    else:
        real = w * scales.reshape((-1,) + (1,) * (w.ndim - 1))
        norms = np.sqrt((real ** 2).reshape(-1, channels).sum(axis=0))
    return np.sort(np.argsort(-norms, kind="stable")[:k]).astype(np.int32)


def _conv_options(op):
    o = op.builtinOptions
    stride = (int(o.strideH), int(o.strideW))
    dilation = (int(getattr(o, "dilationHFactor", 1) or 1), int(getattr(o, "dilationWFactor", 1)
                                                               or 1))
    return stride, dilation, int(o.padding), int(o.fusedActivationFunction)


def _same_pad(in_size, out_size, kernel, stride, dilation):
    eff = (kernel - 1) * dilation + 1
    return max((out_size - 1) * stride + eff - in_size, 0) // 2


def _make_variable(ed, index, init_ops, label):
    """Turn constant tensor ``index`` into a variable initialised from a copy of its data."""
    data = ed.data(index)
    if data is None:
        raise TrainingExportError(f"{label}: tensor {ed.name(index)!r} has no constant data")
    tensor = ed.tensor(index)
    q = tensor.quantization
    init = ed.add_tensor(f"{ed.name(index)}/initial", data.shape, data.dtype, data=data)
    ed.tensor(init).quantization = q
    tensor.buffer = 0
    tensor.isVariable = True
    init_ops.append(ed.custom_op("DGST_VARIABLE_INIT", [index, init], []))
    return {"tensor": int(index), "initial": int(init)}


def _compact_weights(ed: ModelEditor, flash: int, layer) -> int:
    """A new int8 constant with the weights of ``layer.kept`` only (last axis) of the kernel
    ``flash``, to become the layer's RAM variable; the full kernel stays read-only."""
    w = ed.data(flash)
    scales, zero_points = ed.quantization(flash)
    dimension = int(ed.tensor(flash).quantization.quantizedDimension)
    if dimension == len(w.shape) - 1:  # depthwise: one scale per (kept) channel
        scales, zero_points = scales[layer.kept], zero_points[layer.kept]
    compact = ed.add_tensor(f"{layer.name}/kept_weights", w.shape[:-1] + (len(layer.kept),),
                            np.int8, data=w[..., layer.kept], scale=scales,
                            zero_point=zero_points, quantized_dimension=dimension)
    return compact


def _merged_weights(ed: ModelEditor, layer, when: str):
    """(tensor, op): a temporary full kernel of ``layer``, the flash tensor with the kept
    channels taken from the RAM variable (``DGST_SCATTER_CHANNELS``)."""
    scales, zero_points = ed.quantization(layer.flash)
    merged = ed.add_tensor(f"{layer.name}/weights_{when}", ed.shape(layer.flash), np.int8,
                           scale=scales, zero_point=zero_points,
                           quantized_dimension=int(
                               ed.tensor(layer.flash).quantization.quantizedDimension))
    return merged, ed.custom_op("DGST_SCATTER_CHANNELS",
                                [layer.flash, layer.compact, layer.kept_tensor], [merged])


def _fold_pads(ed: ModelEditor, keep_layers=()) -> int:
    """Replace ``PAD`` + VALID conv/depthwise by one SAME conv whose kernel gets trailing zero
    taps where that is exact (stride-2 3x3 after a symmetric 1-pixel pad -> 4x4 SAME): the
    padded copy of the activation (e.g. 66x66x48 int8 in MobileNetV2) then never exists.
    Ops whose weights name a layer in ``keep_layers`` are left alone. Returns the count."""
    sg = ed.subgraph
    ops = sg.operators
    consumers = collections.Counter(int(t) for op in ops for t in op.inputs if t >= 0)
    producer = {int(t): i for i, op in enumerate(ops) for t in op.outputs}
    drop = set()
    for c, op in enumerate(ops):
        kind = ed.builtin(op)
        if kind not in ("CONV_2D", "DEPTHWISE_CONV_2D") or op.builtinOptions.padding != \
                schema.Padding.VALID:
            continue
        if any(f"/{name}/" in f"/{ed.name(op.inputs[1])}" for name in keep_layers):
            continue
        p = producer.get(int(op.inputs[0]))
        if p is None or ed.builtin(ops[p]) != "PAD" or consumers[int(op.inputs[0])] != 1:
            continue
        paddings = ed.data(ops[p].inputs[1])
        x = int(ops[p].inputs[0])
        if paddings is None or np.any(paddings[0]) or np.any(paddings[3]):
            continue
        (sh, sw), (dh, dw), _, _ = _conv_options(op)
        w = ed.data(op.inputs[1])
        in_h, in_w = ed.shape(x)[1:3]
        out_h, out_w = ed.shape(op.outputs[0])[1:3]
        extra = []
        for axis, (n_in, n_out, k, s, d, (top, _)) in enumerate(
                [(in_h, out_h, w.shape[1], sh, dh, paddings[1]),
                 (in_w, out_w, w.shape[2], sw, dw, paddings[2])]):
            found = None
            for e in range(0, 3):
                total = max((n_out - 1) * s + (k + e - 1) * d + 1 - n_in, 0)
                if -(-n_in // s) == n_out and total // 2 == top and (d == 1 or e == 0):
                    found = e
                    break
            extra.append(found)
        if None in extra:
            continue
        grown = np.zeros((w.shape[0], w.shape[1] + extra[0], w.shape[2] + extra[1], w.shape[3]),
                         w.dtype)
        grown[:, :w.shape[1], :w.shape[2], :] = w
        ed.tensor(op.inputs[1]).shape = list(grown.shape)
        ed.tensor(op.inputs[1]).buffer = ed.add_buffer(grown)
        op.builtinOptions.padding = schema.Padding.SAME
        op.inputs = [x] + list(op.inputs[1:])
        drop.add(p)
    sg.operators = [op for i, op in enumerate(ops) if i not in drop]
    if drop:
        ed.prune()
    return len(drop)


def export_training(model, scheme, representative_images, path, *, learning_rate: float = 0.05,
                    selection="magnitude", policy: str | None = None,
                    num_samples: int = 100, fold_pads: bool = True,
                    fuse_blocks: bool = True, kept_weights_in_ram: bool = True,
                    output_params: bool = True) -> TrainingExport:
    """Write the training-step `.tflite` for ``model`` + ``scheme`` and its JSON manifest.

    ``model``: a tf-keras CNN (BatchNorm is folded first) ending in a Dense classifier that
    outputs logits; ``scheme``: an `UpdateScheme` (the classifier is always trained in
    full); ``representative_images``: float images for int8 calibration (as `export_int8`);
    ``selection``: how the kept input channels of weight-updated layers are chosen once at
    export: ``"magnitude"`` (top-k L2 norm, like Lin et al.), ``"first"``, or a dict
    ``{layer: channel indices}``. ``policy``: a dynamic selection evaluated on device at the
    start of every step instead (``DGST_SELECT_CHANNELS``): ``"traversal"`` (a window of k
    channels moving by k each step, so all are visited) or ``"magnitude"`` (top-k L2 norm of
    the current weights); the kept channels of each step are then extra outputs
    (``"<layer>/kept"``). ``fold_pads``: replace explicit PAD + VALID convs by
    exact SAME convs with zero-padded kernels (saves the padded activation copies; not for
    weight-updated layers). ``fuse_blocks``: compute each frozen conv -> depthwise -> 1x1
    chain in front of the first updated layer as one ``DGST_FUSED_BLOCK`` (bit-identical,
    holds a few rows of the expanded activation instead of all of it; see
    `dgst_tf.export.block_fusion`). ``kept_weights_in_ram``: with a static selection, a
    weight-updated conv keeps only its kept input channels' weights as a RAM variable; the
    full kernel it reads is assembled in a temporary from the read-only one just before the
    forward conv and the input gradient (``DGST_SCATTER_CHANNELS``). ``output_params``: make
    the trainable tensors graph outputs
    (needed to read them back on the host; False gives the firmware's graph, whose arena
    lacks the per-channel quantization copies TFLM makes for graph outputs). Both files are
    written atomically; the manifest goes to ``path`` with suffix ``.json``. Raises
    `TrainingExportError` naming the layer for an unsupported layer or scheme. Example::

        info = export_training(model, scheme, x_train[:64], "train.tflite")
        info.manifest["params"], info.ops
    """
    from dgst_tf.core.bn_folding import fold_batchnorm
    from dgst_tf.export.inference import export_int8
    from dgst_tf.core.keras_compat import keras, require_keras2
    from dgst_tf.training.scheme import LayerUpdate, classifier_layer, kept_channels

    path = pathlib.Path(path)
    where = f"export_training({os.fspath(path)})"
    require_keras2(model, where)
    if any(isinstance(l, keras.layers.BatchNormalization) for l in model.layers):
        model = fold_batchnorm(model)
    scheme.validate(model)
    if not float(learning_rate) > 0:
        raise TrainingExportError(f"{where}: learning_rate must be > 0, got {learning_rate}")
    classifier = classifier_layer(model).name
    if classifier_layer(model).activation is not keras.activations.linear:
        raise TrainingExportError(f"{where}: classifier {classifier!r} must output logits "
                                  f"(linear activation), it has an activation")
    with tempfile.TemporaryDirectory(prefix="dgst-train-export-") as tmp:
        export_int8(model, representative_images, pathlib.Path(tmp) / "inference.tflite",
                    num_samples=num_samples)
        data, parsed = read_tflite(pathlib.Path(tmp) / "inference.tflite")
    ed = ModelEditor(parsed)
    sg = ed.subgraph
    weight_layers = [name for name in (l.name for l in model.layers)
                     if scheme.update_for(name).updates_weights]
    folded_pads = _fold_pads(ed, weight_layers) if fold_pads else 0
    fused_blocks = 0
    if fuse_blocks:
        trained = [i for i, name in _find_layers(ed, model, where).items()
                   if name == classifier or scheme.update_for(name).mode != "frozen"]
        fused_blocks = block_fusion.fuse_blocks(ed, stop=min(trained))
    ops = list(sg.operators)
    op_layer = _find_layers(ed, model, where)
    layer_ops = {name: i for i, name in op_layer.items()}
    updates = {name: scheme.update_for(name) for name in layer_ops}
    updates[classifier] = LayerUpdate("weights", 1.0)
    updated = {name: u for name, u in updates.items() if u.mode != "frozen"}
    missing = [name for name in updated if name not in layer_ops]
    if missing:
        raise TrainingExportError(f"{where}: updated layers {missing} have no op in the "
                                  f"converted model")
    if len(sg.outputs) != 1 or len(sg.inputs) != 1:
        raise TrainingExportError(f"{where}: the model must have one input and one output")
    logits = int(sg.outputs[0])

    producer = {}
    consumers = collections.defaultdict(list)
    for i, op in enumerate(ops):
        for t in op.outputs:
            producer[int(t)] = i
        for t in op.inputs:
            if t >= 0:
                consumers[int(t)].append(i)
    if producer.get(logits) is None or op_layer.get(producer[logits]) != classifier:
        raise TrainingExportError(f"{where}: the model output must come straight from the "
                                  f"classifier {classifier!r} (logits, no softmax)")
    first = min(layer_ops[name] for name in updated)

    # tensors that depend on a trained parameter (their gradient is needed)
    depends = set()
    for i, op in enumerate(ops):
        trains = op_layer.get(i) in updated
        if trains or any(int(t) in depends for t in op.inputs if t >= 0):
            depends |= {int(t) for t in op.outputs}
            kind = ed.builtin(op)
            if kind not in _WEIGHT_KINDS and kind not in {"ADD", "MEAN", "PAD"} | _PASS_THROUGH:
                raise TrainingExportError(
                    f"{where}: op {i} ({kind}, output {ed.name(op.outputs[0])!r}) lies between "
                    f"the first updated layer {op_layer[first]!r} and the loss; the training "
                    f"export supports CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED, ADD, MEAN "
                    f"(global average pooling), PAD and QUANTIZE there")

    lr = float(learning_rate)
    if policy not in (None, "traversal", "magnitude"):
        raise TrainingExportError(f"{where}: policy must be None, 'traversal' or 'magnitude', "
                                  f"got {policy!r}")
    init_ops, before, after, backward = [], collections.defaultdict(list), \
        collections.defaultdict(list), []
    layers, params, masks, kept_inputs, selections = {}, [], {}, {}, []
    for name, update in updated.items():
        i = layer_ops[name]
        op = ops[i]
        kind = _WEIGHT_KINDS[ed.builtin(op)]
        label = f"{where}: layer {name!r}"
        layer = _Layer(name, i, kind, update)
        layers[i] = layer
        w_scales, _ = ed.quantization(op.inputs[1])
        x_scale, _ = ed.quantization(op.inputs[0])
        if len(op.inputs) < 3 or op.inputs[2] < 0:  # converter dropped an all-zero bias
            c_out = ed.shape(op.inputs[1])[0 if kind != "depthwise" else 3]
            bias = ed.add_tensor(f"{name}/bias", (c_out,), np.int32,
                                 data=np.zeros(c_out, np.int32),
                                 scale=w_scales * x_scale[0], zero_point=[0] * c_out)
            op.inputs = list(op.inputs[:2]) + [bias]
        params.append({"layer": name, "param": "bias",
                       **_make_variable(ed, op.inputs[2], init_ops, label)})
        if update.updates_weights:
            channels = ed.shape(op.inputs[1])[-1]
            k = channels if name == classifier else kept_channels(model.get_layer(name),
                                                                  update.ratio)
            if k == channels:
                layer.kept = np.arange(channels, dtype=np.int32)
            elif policy is not None:
                layer.kept, layer.policy = np.arange(k, dtype=np.int32), policy
            else:
                layer.kept = _select(ed, op, name, kind, k, selection, where)
            if kept_weights_in_ram and layer.policy is None and k < channels and \
                    kind in ("conv", "depthwise"):
                layer.flash = int(op.inputs[1])
                layer.compact = _compact_weights(ed, layer.flash, layer)
                layer.weights_entry = {"layer": name, "param": "weights", "flash": layer.flash,
                                       "kept": [int(c) for c in layer.kept], "merged": [],
                                       **_make_variable(ed, layer.compact, init_ops, label)}
                params.append(layer.weights_entry)
            else:
                params.append({"layer": name, "param": "weights",
                               **_make_variable(ed, op.inputs[1], init_ops, label)})

    # forward-pass additions: masks after ReLU ops, kept-channel copies before updated ops
    for i in range(first, len(ops)):
        op = ops[i]
        kind = ed.builtin(op)
        if kind not in _WEIGHT_KINDS or int(op.outputs[0]) not in depends:
            continue
        _, _, _, act = _conv_options(op) if kind != "FULLY_CONNECTED" else (
            0, 0, 0, int(op.builtinOptions.fusedActivationFunction))
        if act not in (0, _RELU, _RELU6):
            raise TrainingExportError(f"{where}: layer {op_layer[i]!r} has fused activation "
                                      f"{act}; only none, ReLU and ReLU6 are supported")
        out = int(op.outputs[0])
        if act:
            scale, zp = ed.quantization(out)
            lo, hi = block_fusion.activation_range(act, float(scale[0]), int(zp[0]))
            n = int(np.prod(ed.shape(out)))
            mask = ed.add_tensor(f"{op_layer[i]}/relu_mask", ((n + 7) // 8,), np.uint8)
            after[i].append(ed.custom_op("DGST_RELU_MASK", [out], [mask],
                                         int32_options(lo, hi)))
            masks[i] = mask
        layer = layers.get(i)
        if layer is not None and layer.kept is not None:
            k = len(layer.kept)
            if layer.policy is not None:  # chosen on device at the start of each step
                layer.kept_tensor = ed.add_tensor(f"{layer.name}/kept", (k,), np.int32)
                step = -1
                if layer.policy == "traversal":
                    step = ed.add_tensor(f"{layer.name}/selection_step", (1,), np.int32,
                                         variable=True)
                w_scales, _ = ed.quantization(op.inputs[1])
                select_scale = ed.add_tensor(f"{layer.name}/selection_weight_scale",
                                             w_scales.shape, np.float32, data=w_scales)
                selections.append(ed.custom_op(
                    "DGST_SELECT_CHANNELS", [int(op.inputs[1]), select_scale, step],
                    [layer.kept_tensor], int32_options(
                        0 if layer.policy == "traversal" else 1,
                        1 if layer.kind == "depthwise" else 0)))
            else:
                layer.kept_tensor = ed.add_tensor(f"{layer.name}/kept", (k,), np.int32,
                                                  data=layer.kept)
            if layer.compact >= 0:  # the conv reads a full kernel assembled just before it
                merged, scatter = _merged_weights(ed, layer, "forward")
                before[i].append(scatter)
                op.inputs = [int(op.inputs[0]), merged] + [int(t) for t in op.inputs[2:]]
                layer.weights_entry["merged"].append(merged)
            x = int(op.inputs[0])
            channels = ed.shape(x)[-1]
            if len(layer.kept) == channels:
                kept_inputs[i] = x
            else:
                shape = ed.shape(x)[:-1] + (len(layer.kept),)
                s, z = ed.quantization(x)
                xk = ed.add_tensor(f"{layer.name}/input_kept", shape, np.int8, scale=s,
                                   zero_point=z)
                before[i].append(ed.custom_op("DGST_GATHER_CHANNELS", [x, layer.kept_tensor],
                                              [xk]))
                kept_inputs[i] = xk

    # backward pass
    label_t = ed.add_tensor("label", (1,), np.int32)
    loss_t = ed.add_tensor("loss", (1,), np.float32)
    logits_shape = ed.shape(logits)
    l_scale, l_zp = ed.quantization(logits)
    g_logits = ed.add_tensor("logits/grad", logits_shape, np.float32)
    backward.append(ed.custom_op("DGST_SOFTMAX_XENT_GRAD", [logits, label_t],
                                 [g_logits, loss_t], int32_options(float(l_scale[0]),
                                                                   int(l_zp[0]))))
    grads, readers = {logits: g_logits}, collections.Counter({g_logits: 1})
    pooled = {}  # gradient of a MEAN input -> (pooled gradient, its MUL op, 1 / pixels)

    def give(tensor, g):
        if tensor in grads:  # gradients meeting at a fork: sum them
            total = ed.add_tensor(f"{ed.name(tensor)}/grad_sum", ed.shape(tensor), np.float32)
            options = schema.AddOptionsT()
            backward.append(ed.builtin_op(_OPS.ADD, [grads[tensor], g], [total],
                                          schema.BuiltinOptions.AddOptions, options))
            readers[grads[tensor]] -= 1
            g = total
        grads[tensor] = g
        readers[g] += 1

    for i in range(len(ops) - 1, first - 1, -1):
        op = ops[i]
        out = int(op.outputs[0])
        if out not in grads:
            continue
        g = grads.pop(out)
        readers[g] -= 1
        kind = ed.builtin(op)
        if kind in ("ADD",) + tuple(_PASS_THROUGH):
            if kind == "ADD" and op.builtinOptions.fusedActivationFunction:
                raise TrainingExportError(f"{where}: ADD op {i} ({ed.name(out)!r}) has a fused "
                                          f"activation; not supported")
            for t in op.inputs[:2 if kind == "ADD" else 1]:
                if int(t) in depends:
                    give(int(t), g)
            continue
        if kind == "PAD":
            raise TrainingExportError(f"{where}: PAD op {i} ({ed.name(out)!r}) must feed a "
                                      f"VALID convolution only")
        if kind == "MEAN":
            x = int(op.inputs[0])
            axes = ed.data(op.inputs[1])
            shape = ed.shape(x)
            if (axes is None or sorted(int(a) for a in np.ravel(axes)) != [1, 2]
                    or len(shape) != 4):
                raise TrainingExportError(f"{where}: MEAN op {i} ({ed.name(out)!r}) must be a "
                                          f"global average pooling over height and width")
            if x not in depends:
                continue
            h, w = shape[1], shape[2]
            inv = ed.add_tensor(f"{ed.name(out)}/inverse_area", (1, h, w, 1), np.float32,
                                data=np.full((1, h, w, 1), 1.0 / (h * w), np.float32))
            dx = ed.add_tensor(f"{ed.name(x)}/grad", shape, np.float32)
            mul = ed.builtin_op(_OPS.MUL, [g, inv], [dx], schema.BuiltinOptions.MulOptions,
                                schema.MulOptionsT())
            backward.append(mul)
            pooled[dx] = (g, mul, 1.0 / (h * w))
            give(x, dx)
            continue
        # conv / depthwise / dense
        name = op_layer[i]
        layer = layers.get(i)
        x = int(op.inputs[0])
        w_t = int(op.inputs[1])
        w_scales, _ = ed.quantization(w_t)
        x_scale, x_zp = ed.quantization(x)
        mask = masks.get(i, -1)
        dy = ed.add_tensor(f"{name}/dy", ed.shape(out), np.int8)
        dy_scale = ed.add_tensor(f"{name}/dy_scale", (1,), np.float32)
        if g in pooled and readers[g] == 0:
            # the gradient of a global average pooling's input, quantized straight from the
            # pooled gradient: the float [1, H, W, C] copy (80 KB at MobileNetV2's head
            # conv) is never materialized
            g_pool, mul, factor = pooled[g]
            backward.remove(mul)
            factor_t = ed.add_tensor(f"{name}/pool_factor", (1,), np.float32,
                                     data=np.array([factor], np.float32))
            backward.append(ed.custom_op("DGST_QUANTIZE_GRAD", [g_pool, mask, factor_t],
                                         [dy, dy_scale]))
            g = None
        elif mask >= 0 and readers[g] > 0:  # g is also another tensor's gradient: copy it
            copy = ed.add_tensor(f"{ed.name(out)}/grad_copy", ed.shape(out), np.float32)
            shape_t = ed.add_tensor(f"{ed.name(out)}/grad_shape", (len(ed.shape(out)),),
                                    np.int32, data=np.array(ed.shape(out), np.int32))
            options = schema.ReshapeOptionsT()
            options.newShape = list(ed.shape(out))
            backward.append(ed.builtin_op(_OPS.RESHAPE, [g, shape_t], [copy],
                                          schema.BuiltinOptions.ReshapeOptions, options))
            g = copy
        if g is not None:
            backward.append(ed.custom_op("DGST_QUANTIZE_GRAD", [g, mask], [dy, dy_scale]))
        ws = ed.add_tensor(f"{name}/weight_scale", w_scales.shape, np.float32, data=w_scales)
        geometry = (1, 1, 1, 1, 0, 0)
        grad_in, grad_in_shape = x, ed.shape(x)
        if kind != "FULLY_CONNECTED":
            (sh, sw), (dh, dw), padding, _ = _conv_options(op)
            in_shape, out_shape, w_shape = ed.shape(x), ed.shape(out), ed.shape(w_t)
            kh, kw = w_shape[1], w_shape[2]
            if padding == schema.Padding.SAME:
                pads = (_same_pad(in_shape[1], out_shape[1], kh, sh, dh),
                        _same_pad(in_shape[2], out_shape[2], kw, sw, dw))
            else:
                pads = (0, 0)
            geometry = (sh, sw, dh, dw, *pads)
            input_geometry = geometry
            p = producer.get(x)
            if p is not None and ed.builtin(ops[p]) == "PAD" and padding == schema.Padding.VALID:
                paddings = ed.data(ops[p].inputs[1])
                if len(consumers[x]) != 1 or paddings is None:
                    raise TrainingExportError(f"{where}: PAD before layer {name!r} feeds other "
                                              f"ops too; not supported")
                grad_in = int(ops[p].inputs[0])
                grad_in_shape = ed.shape(grad_in)
                input_geometry = (sh, sw, dh, dw, int(paddings[1][0]), int(paddings[2][0]))
            if kind == "DEPTHWISE_CONV_2D" and w_shape[3] != in_shape[3]:
                raise TrainingExportError(f"{where}: depthwise layer {name!r} has a depth "
                                          f"multiplier other than 1; not supported")
        else:
            input_geometry = geometry
        if grad_in in depends:
            if layer is not None and layer.compact >= 0:  # weights before this step's update
                w_t, scatter = _merged_weights(ed, layer, "backward")
                backward.append(scatter)
            dx = ed.add_tensor(f"{ed.name(grad_in)}/grad", grad_in_shape, np.float32)
            op_name = ("DGST_DEPTHWISE_INPUT_GRAD" if kind == "DEPTHWISE_CONV_2D"
                       else "DGST_CONV2D_INPUT_GRAD")
            backward.append(ed.custom_op(op_name, [dy, dy_scale, w_t, ws], [dx],
                                         int32_options(*input_geometry)))
            give(grad_in, dx)
        if layer is None:
            continue
        c_out = len(w_scales)
        gb = ed.add_tensor(f"{name}/bias_grad", (c_out,), np.int32)
        backward.append(ed.custom_op("DGST_BIAS_GRAD", [dy], [gb]))
        updates_ops = [ed.custom_op("DGST_SGD_QAS_UPDATE",
                                    [int(op.inputs[2]), gb, -1, ws, dy_scale], [],
                                    int32_options(2, lr, float(x_scale[0])))]
        if layer.kept is not None:
            k = len(layer.kept)
            xk = kept_inputs[i]
            if kind == "DEPTHWISE_CONV_2D":
                gw = ed.add_tensor(f"{name}/weight_grad", (kh, kw, k), np.int32)
                backward.append(ed.custom_op("DGST_DEPTHWISE_WEIGHT_GRAD",
                                             [xk, layer.kept_tensor, dy], [gw],
                                             int32_options(*geometry, int(x_zp[0]))))
                sgd_kind = 1
            else:
                shape = (c_out, k) if kind == "FULLY_CONNECTED" else (c_out, kh, kw, k)
                gw = ed.add_tensor(f"{name}/weight_grad", shape, np.int32)
                backward.append(ed.custom_op("DGST_CONV2D_WEIGHT_GRAD", [xk, dy], [gw],
                                             int32_options(*geometry, int(x_zp[0]))))
                sgd_kind = 0
            target, kept_t, scales_t = w_t, layer.kept_tensor, ws
            if layer.compact >= 0:  # update the RAM copy of the kept channels only
                target = layer.compact
                kept_t = ed.add_tensor(f"{name}/compact_channels", (k,), np.int32,
                                       data=np.arange(k, dtype=np.int32))
                if kind == "DEPTHWISE_CONV_2D":  # its scales are per (kept) channel
                    scales_t = ed.add_tensor(f"{name}/kept_weight_scale", (k,), np.float32,
                                             data=w_scales[layer.kept].astype(np.float32))
            updates_ops.append(ed.custom_op("DGST_SGD_QAS_UPDATE",
                                            [target, gw, kept_t, scales_t, dy_scale], [],
                                            int32_options(sgd_kind, lr, float(x_scale[0]))))
        backward.extend(updates_ops)

    forward = []
    for i, op in enumerate(ops):
        forward += before[i] + [op] + after[i]
    image = int(sg.inputs[0])
    sg.operators = init_ops + selections + forward + backward
    dynamic = [l for l in sorted(layers.values(), key=lambda l: l.op_index) if l.policy]
    sg.inputs = [image, label_t]
    outputs_params = params if output_params else []
    sg.outputs = ([loss_t, logits] + [p["tensor"] for p in outputs_params]
                  + [l.kept_tensor for l in dynamic])
    ed.model.signatureDefs = None
    ed.model.description = b"dgst-tf training step"
    data = ed.pack()
    try:
        data, parsed = read_tflite(data, what=f"training graph for {os.fspath(path)}")
    except TfliteFileError as error:
        raise TrainingExportError(str(error)) from None

    op_counts = collections.Counter(ModelEditor(parsed).builtin(o)
                                    for o in parsed.subgraphs[0].operators)
    image_d = tensor_details(parsed, image)
    forward_ops = [n for n, o in enumerate(sg.operators)
                   if o in forward and (not ed.builtin(o).startswith("CUSTOM:")
                                        or ed.builtin(o) == "CUSTOM:DGST_FUSED_BLOCK")]
    manifest = {
        "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION,
        "tflite": path.name, "sha256": _sha256(data), "size_bytes": len(data),
        "inputs": [{"name": "image", "shape": list(image_d.shape), "dtype": "int8",
                    "scale": image_d.scale, "zero_point": image_d.zero_point},
                   {"name": "label", "shape": [1], "dtype": "int32",
                    "classes": int(logits_shape[-1])}],
        "outputs": (["loss", "logits"]
                    + [f"{p['layer']}/{p['param']}" for p in outputs_params]
                    + [f"{l.name}/kept" for l in dynamic]),
        "logits": {"scale": float(l_scale[0]), "zero_point": int(l_zp[0])},
        "learning_rate": lr,
        "selection": selection if isinstance(selection, str) else "given",
        "policy": policy,
        "scheme": scheme.get_config(),
        "classifier": classifier,
        "layers": [{"name": l.name, "kind": l.kind, "update": l.update.mode,
                    "ratio": l.update.ratio,
                    "policy": l.policy,
                    "kept": None if l.kept is None or l.policy else [int(c) for c in l.kept]}
                   for l in sorted(layers.values(), key=lambda l: l.op_index)],
        "params": [{**p, "output": 2 + n if output_params else None,
                    "shape": list(ed.shape(p["tensor"])),
                    **({"full_shape": list(ed.shape(p["flash"]))} if "flash" in p else {}),
                    "dtype": np.dtype(tensor_details(parsed, p["tensor"]).dtype).name}
                   for n, p in enumerate(params)],
        "forward_ops": forward_ops,
        "folded_pads": folded_pads,
        "fused_blocks": fused_blocks,
        "ops": dict(sorted(op_counts.items())),
        "custom_ops": sorted(k[len("CUSTOM:"):] for k in op_counts if k.startswith("CUSTOM:")),
    }
    manifest_path = manifest_path_for(path)
    written = write_atomically(path, data)
    write_atomically(manifest_path, (json.dumps(manifest, indent=1) + "\n").encode())
    return TrainingExport(written, manifest_path, manifest)


# ----------------------------------------------------------------------------- manifest
_REQUIRED = {"format": str, "version": int, "sha256": str, "inputs": list, "outputs": list,
             "params": list, "forward_ops": list, "logits": dict}


def load_manifest(path, manifest=None) -> dict:
    """The manifest of training model ``path`` (default: beside it, ``.json``), checked
    against the file: format, version, fields, SHA-256 and tensor shapes. Raises
    `TrainingManifestError` naming the manifest file and the field at fault.

        manifest = load_manifest("train.tflite")
    """
    path = pathlib.Path(path)
    manifest_file = pathlib.Path(manifest) if manifest is not None else manifest_path_for(path)
    where = f"training manifest {manifest_file}"
    if not manifest_file.is_file():
        raise TrainingManifestError(f"{where}: no such file (export_training writes it beside "
                                    f"{path.name})")
    try:
        content = json.loads(manifest_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TrainingManifestError(f"{where}: not valid JSON: {error}") from None
    if not isinstance(content, dict):
        raise TrainingManifestError(f"{where}: expected a JSON object")
    for key, kind in _REQUIRED.items():
        if not isinstance(content.get(key), kind):
            raise TrainingManifestError(f"{where}: field {key!r} is missing or not a "
                                        f"{kind.__name__}")
    if content["format"] != MANIFEST_FORMAT or content["version"] != MANIFEST_VERSION:
        raise TrainingManifestError(f"{where}: format {content['format']!r} version "
                                    f"{content['version']} is not {MANIFEST_FORMAT!r} version "
                                    f"{MANIFEST_VERSION}")
    data, model = read_tflite(path)
    if _sha256(data) != content["sha256"]:
        raise TrainingManifestError(f"{where}: SHA-256 does not match {path} (the manifest "
                                    f"belongs to another export)")
    sg = model.subgraphs[0]
    outputs = [int(t) for t in sg.outputs]
    for p in content["params"]:
        try:
            ok = ((p["output"] is None or outputs[p["output"]] == p["tensor"])
                  and list(tensor_details(model, p["tensor"]).shape) == p["shape"])
        except (KeyError, IndexError, TypeError):
            ok = False
        if ok and "flash" in p:  # kept channels' weights in RAM, the rest in this kernel
            try:
                full = list(tensor_details(model, p["flash"]).shape)
                ok = (full == p["full_shape"] and len(p["kept"]) == p["shape"][-1]
                      and all(isinstance(c, int) and 0 <= c < full[-1] for c in p["kept"])
                      and all(isinstance(m, int) and 0 <= m < len(sg.tensors)
                              for m in p["merged"]))
            except (KeyError, IndexError, TypeError):
                ok = False
        if not ok:
            raise TrainingManifestError(f"{where}: parameter entry {p!r} does not match the "
                                        f"model's outputs")
    return content


# ----------------------------------------------------------------------------- running
@dataclasses.dataclass
class TrainingRun:
    """Result of `train_tflm`: per-step losses and logits, the final trainable tensors."""

    losses: np.ndarray  # float32 [steps]
    logits: np.ndarray  # int8 [steps, classes] (forward pass of each step, before its update)
    params: dict  # "layer/param" -> final array
    kept: dict  # "layer/kept" -> [steps, k] channels chosen on device (dynamic policies)
    arena_bytes: int
    manifest: dict
    result: object  # the TflmResult

    @property
    def predictions(self) -> np.ndarray:
        return self.logits.argmax(axis=-1)


def train_tflm(path, images, labels, *, manifest=None, arena_size=None,
               timeout: float = 1800.0) -> TrainingRun:
    """Run ``len(images)`` training steps of the exported model in TFLM (child process).

    ``images``: ``(N, H, W, C)`` float images (quantized with the manifest's input scale) or
    int8 codes; ``labels``: ``(N,)`` ints. The interpreter persists across the N steps, so
    weights keep their updates. Example::

        run = train_tflm("train.tflite", x[:100], y[:100])
        run.losses.mean(), (run.predictions == y[:100]).mean(), run.arena_bytes
    """
    from dgst_tf.export.tflm.ops_loader import host_ops
    from dgst_tf.export.tflm.runner import run_tflm

    content = load_manifest(path, manifest)
    spec = content["inputs"][0]
    images = np.asarray(images)
    shape = tuple(spec["shape"])
    if images.shape[1:] == shape[1:]:
        images = images[:, None]
    if images.ndim != len(shape) + 1 or images.shape[1:] != shape:
        want = ", ".join(map(str, shape[1:]))
        raise ValueError(f"train_tflm({path}): images must have shape (N, {want}), "
                         f"got {images.shape}")
    if images.dtype != np.int8:
        q = np.round(images.astype(np.float32) / np.float32(spec["scale"])) + spec["zero_point"]
        images = np.clip(q, -128, 127).astype(np.int8)
    labels = np.asarray(labels).astype(np.int32).reshape(-1, 1)
    if len(labels) != len(images):
        raise ValueError(f"train_tflm({path}): {len(images)} images but {len(labels)} labels")
    classes = content["inputs"][1]["classes"]
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        raise ValueError(f"train_tflm({path}): labels must be in [0, {classes})")
    ops = host_ops()
    result = run_tflm(path, [images, labels], libraries=[ops.library],
                      registerers=ops.registerers, arena_size=arena_size, timeout=timeout)
    names = content["outputs"]
    params = {name: result.outputs[j][-1] for j, name in enumerate(names)
              if j >= 2 and not name.endswith("/kept")}
    if any("flash" in p for p in content["params"]):
        params = _full_params(ModelEditor(read_tflite(path)[1]), content, params)
    kept = {name: result.outputs[j] for j, name in enumerate(names) if name.endswith("/kept")}
    return TrainingRun(result.outputs[0][:, 0], result.outputs[1].reshape(len(images), -1),
                       params, kept, result.arena_bytes, content, result)


def initial_params(path, *, manifest=None) -> dict:
    """The trainable tensors' values before any step ("layer/param" -> array), from the
    read-only initial constants of the training model. Example::

        write_inference_model("train.tflite", initial_params("train.tflite"), "before.tflite")
    """
    content = load_manifest(path, manifest)
    _, model = read_tflite(path)
    ed = ModelEditor(model)
    return _full_params(ed, content, {f"{p['layer']}/{p['param']}": np.array(
        ed.data(p["initial"])) for p in content["params"]})


def _full_params(ed: ModelEditor, content, params: dict) -> dict:
    """Params with the RAM copies of kept channels (``kept_weights_in_ram``) put back into
    their full kernels (the read-only tensor of the training model ``ed`` for the others)."""
    split = [p for p in content["params"] if "flash" in p
             and f"{p['layer']}/{p['param']}" in params]
    params = dict(params)
    for p in split:
        key = f"{p['layer']}/{p['param']}"
        full = np.array(ed.data(p["flash"]))
        full[..., p["kept"]] = params[key]
        params[key] = full
    return params


def run_inference_tflm(path, images_q, **kwargs):
    """Run an inference model from `write_inference_model` in TFLM (child process) with the
    dgst ops registered (it may hold ``DGST_FUSED_BLOCK``); ``images_q``: int8 inputs as for
    `run_tflm`, ``kwargs`` go to it. Returns the `TflmResult`. Example::

        logits = run_inference_tflm("updated.tflite", q[:, None]).outputs[0]
    """
    from dgst_tf.export.tflm.ops_loader import host_ops
    from dgst_tf.export.tflm.runner import run_tflm

    ops = host_ops()
    return run_tflm(path, [images_q], libraries=[ops.library], registerers=ops.registerers,
                    **kwargs)


def write_inference_model(path, params: dict, out_path, *, manifest=None) -> pathlib.Path:
    """Write an inference `.tflite` (image -> int8 logits: builtin ops, plus
    ``DGST_FUSED_BLOCK`` if the training model has fused blocks) whose trainable tensors hold
    ``params`` (as `TrainingRun.params`: "layer/param" -> array). Example::

        write_inference_model("train.tflite", run.params, "updated.tflite")
    """
    content = load_manifest(path, manifest)
    _, model = read_tflite(path)
    ed = ModelEditor(model)
    for p in content["params"]:
        key = f"{p['layer']}/{p['param']}"
        if p["output"] is None and key not in params:
            raise ValueError(f"write_inference_model({path}): the model was exported with "
                             f"output_params=False, so TFLM cannot return {key!r}")
        if key not in params:
            raise ValueError(f"write_inference_model({path}): params lack {key!r}")
        value = np.asarray(params[key])
        shape = p.get("full_shape", p["shape"])
        if list(value.shape) != shape:
            raise ValueError(f"write_inference_model({path}): {key!r} has shape {value.shape}, "
                             f"the model {tuple(shape)}")
        ed.set_data(p.get("flash", p["tensor"]), value)
    sg = ed.subgraph
    sg.operators = [sg.operators[i] for i in content["forward_ops"]]
    to_flash = {m: p["flash"] for p in content["params"] for m in p.get("merged", [])}
    for op in sg.operators:  # convs read the (updated) full kernels again
        op.inputs = [to_flash.get(int(t), int(t)) for t in op.inputs]
    logits = int(sg.outputs[1])
    sg.inputs = [int(sg.inputs[0])]
    sg.outputs = [logits]
    ed.prune()
    ed.model.description = b"dgst-tf inference (updated on device)"
    data = ed.pack()
    read_tflite(data, what=f"updated inference model for {os.fspath(out_path)}")
    return write_atomically(out_path, data)
