"""`export_training`: a Keras model + update scheme -> the training-step `.tflite` and its
manifest, in phases: convert to int8, fold PADs and fuse frozen blocks, plan, make variables,
add the forward records, the backward pass and the updates, then order, pack and write.

    info = export_training(model, scheme, x_train[:64], "train.tflite")
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import tempfile

import numpy as np

from dgst_tf.core.files import write_atomically
from dgst_tf.core.int8_conversion import DEFAULT_HEAD_LOGIT_RANGE, DEFAULT_HEAD_WEIGHT_HEADROOM
from dgst_tf.export import block_fusion
from dgst_tf.export.tflite_editor import ModelEditor
from dgst_tf.export.tflite_file import TfliteFileError, read_tflite
from dgst_tf.export.training.backward import (DEFAULT_WEIGHT_GRAD_CHUNK_BYTES,
                                              add_backward_pass)
from dgst_tf.export.training.flash_requant import FLASH_REQUANT_OP, flash_requant_op
from dgst_tf.export.training.forward import add_forward_records, add_variables, fold_pads
from dgst_tf.export.training.manifest import build_manifest, manifest_path_for
from dgst_tf.export.training.offline_plan import add_offline_plan
from dgst_tf.export.training.plan import TrainingExportError, find_layer_ops, plan_training
from dgst_tf.export.training.schedule import assign_layer_schedule
from dgst_tf.export.training.state import ExportSettings, TrainingGraph
from dgst_tf.export.training.update import ROUNDING_CODES, advance_step

__all__ = ["export_training", "TrainingExport"]

_POLICIES = (None, "traversal", "magnitude", "window")
# custom ops of the forward pass that belong to the inference graph (`write_inference_model`)
_INFERENCE_CUSTOM_OPS = ("CUSTOM:DGST_FUSED_BLOCK", f"CUSTOM:{FLASH_REQUANT_OP}")


@dataclasses.dataclass(frozen=True)
class TrainingExport:
    """What `export_training` wrote: the model, its manifest, and the manifest's content."""

    path: pathlib.Path
    manifest_path: pathlib.Path
    manifest: dict

    @property
    def ops(self) -> dict:
        return self.manifest["ops"]


def export_training(model, scheme, representative_images, path, *, learning_rate: float = 0.05,
                    selection="magnitude", policy: str | None = None,
                    num_samples: int = 100, fold_pads: bool = True,
                    fuse_blocks: bool = True, kept_weights_in_ram: bool = True,
                    output_params: bool = True, rounding: str = "stochastic",
                    seed: int = 0, layers_per_step: int | None = None,
                    requant_in_flash: bool = True, offline_plan: bool = True,
                    weight_grad_chunk_bytes: int = DEFAULT_WEIGHT_GRAD_CHUNK_BYTES,
                    head_logit_range: float = DEFAULT_HEAD_LOGIT_RANGE,
                    head_weight_headroom: float = DEFAULT_HEAD_WEIGHT_HEADROOM
                    ) -> TrainingExport:
    """Write the training-step `.tflite` for ``model`` + ``scheme`` and its JSON manifest.

    ``model``: a tf-keras CNN (BatchNorm is folded first) whose classifier is a Dense layer
    or a 1x1 Conv2D of the pooled map, with or without a final softmax
    (`dgst_tf.core.classifier`: the step trains on the logits; the inference model
    `write_inference_model` writes outputs logits); every layer between the first updated one
    and the loss must be one the int8 step trains through (`dgst_tf.core.training_support`,
    checked before anything is converted); ``scheme``: an `UpdateScheme` (the classifier is
    always trained in full); ``representative_images``: float images for int8 calibration (as `export_int8`);
    ``selection``: how the kept input channels of weight-updated layers are chosen once at
    export: ``"magnitude"`` (top-k L2 norm, like Lin et al.), ``"first"``, or a dict
    ``{layer: channel indices}``. ``policy``: a dynamic selection evaluated on device at the
    start of every step instead (``DGST_SELECT_CHANNELS``): ``"traversal"`` (DGSU, Li & Chang
    2024: channels not visited in the current sweep first, then by integer importance; the
    visited bitmask lives in the arena), ``"magnitude"`` (top-k integer importance of the
    current weights), ``"window"`` (k channels moving by k each step), or a
    `DynamicChannelSelection` / `WindowChannelSelection` callback (its ``device_policy``,
    and its ``layers_per_step``); the kept channels of each step are then extra outputs
    (``"<layer>/kept"``). The definition is `dgst_tf.tflm_ops.reference.select_channels`.
    ``layers_per_step``: only this many of the weight-updated layers (classifier excluded)
    update their weights per step, in turn (`dgst_tf.tflm_ops.reference.layer_active`, as
    `DynamicChannelSelection(layers_per_step=n)` in Keras); the others' weight gradients are
    not computed, their biases still train; the position is the step counter ``sgd/step``
    in the arena (`dgst_tf.export.training.schedule`). None (default): all of them.
    ``fold_pads``: replace explicit PAD + VALID convs by
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
    lacks the per-channel quantization copies TFLM makes for graph outputs). ``rounding``:
    how the int8 weight updates round, ``"stochastic"`` (the default: unbiased, so updates
    below one LSB are not lost; u from a hash of ``seed``, the layer, the step counter
    ``sgd/step`` (one int32 variable) and the element, the numbers
    `QuantizationAwareScalingSGD` with the same ``rounding`` and ``seed`` draws) or
    ``"nearest"`` (round half away from zero, the previous behaviour). ``requant_in_flash``:
    every int8 convolution of the step is a ``DGST_CONV2D``, bit-identical to the builtin op
    but reading its per-channel requantization multipliers and shifts from a constant (flash)
    instead of computing them into the arena (8 bytes per output channel; see
    `dgst_tf.export.training.flash_requant`). ``offline_plan``: write TFLM's offline memory
    plan into the model, in which the ops that can compute in place do (the first fused
    blocks over their input, the int8 error signals over their float gradients; see
    `dgst_tf.export.training.offline_plan`); False lets TFLM plan online.
    ``weight_grad_chunk_bytes``: compute a weight gradient larger than this (int32 bytes)
    in chunks of kept input channels, each updating its channels before the next is
    computed, so only one chunk exists at a time (0: whole; see
    `dgst_tf.export.training.backward`). ``head_logit_range``,
    ``head_weight_headroom``: room for the classifier to train, as in `convert_int8` (the
    Keras simulation `int8_training_graph` takes the same two). Both files are written atomically; the
    manifest goes to ``path`` with suffix ``.json``. Raises `TrainingExportError` naming the
    layer for an unsupported layer or scheme. Example::

        info = export_training(model, scheme, x_train[:64], "train.tflite")
        info.manifest["params"], info.ops
    """
    from dgst_tf.training.scheme import classifier_layer

    path = pathlib.Path(path)
    where = f"export_training({os.fspath(path)})"
    model = _checked_model(model, scheme, learning_rate, where)
    classifier = classifier_layer(model).name
    layers_per_step = _layers_per_step(policy, layers_per_step, where)
    policy = _device_policy(policy, where)
    if rounding not in ROUNDING_CODES:
        raise TrainingExportError(f"{where}: rounding must be one of {tuple(ROUNDING_CODES)}, "
                                  f"got {rounding!r}")
    settings = ExportSettings(float(learning_rate), selection, policy, num_samples, fold_pads,
                              fuse_blocks, kept_weights_in_ram, output_params,
                              rounding=rounding, seed=int(seed),
                              layers_per_step=layers_per_step,
                              requant_in_flash=bool(requant_in_flash),
                              offline_plan=bool(offline_plan),
                              weight_grad_chunk_bytes=_chunk_bytes(weight_grad_chunk_bytes,
                                                                   where))
    editor = _int8_editor(model, representative_images, num_samples,
                          head_logit_range=head_logit_range,
                          head_weight_headroom=head_weight_headroom)
    folded_pads, fused_blocks = _simplify_forward(editor, model, scheme, classifier, settings,
                                                  where)
    plan = plan_training(editor, model, scheme, classifier, where)
    if policy not in _POLICIES:
        raise TrainingExportError(f"{where}: policy must be None, 'traversal', 'magnitude' or "
                                  f"'window', got {policy!r}")
    graph = TrainingGraph(editor, plan, settings, where)
    add_variables(graph, model)
    assign_layer_schedule(graph, model)
    add_forward_records(graph)
    add_backward_pass(graph)
    advance_step(graph)
    forward_ops = _order_ops(graph)
    _drop_unused_tensors(graph)  # TFLM would plan them (an 80 KB float gradient, say)
    planned = add_offline_plan(editor) if settings.offline_plan else None
    data = editor.pack()
    try:
        data, parsed = read_tflite(data, what=f"training graph for {os.fspath(path)}")
    except TfliteFileError as error:
        raise TrainingExportError(str(error)) from None
    manifest = build_manifest(graph, path, data, parsed, scheme=scheme,
                              forward_ops=forward_ops, folded_pads=folded_pads,
                              fused_blocks=fused_blocks, offline_plan=planned)
    manifest_path = manifest_path_for(path)
    written = write_atomically(path, data)
    write_atomically(manifest_path, json.dumps(manifest, indent=1) + "\n")
    return TrainingExport(written, manifest_path, manifest)


def _chunk_bytes(value, where) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise TrainingExportError(f"{where}: weight_grad_chunk_bytes must be an int >= 0, "
                                  f"got {value!r}")
    return int(value)


def _device_policy(policy, where):
    """A policy name, or the on-device equivalent of a selection callback
    (``DynamicChannelSelection.device_policy``; refuses options the device lacks)."""
    if policy is None or isinstance(policy, str):
        return policy
    try:
        return policy.device_policy
    except (AttributeError, ValueError) as error:
        raise TrainingExportError(f"{where}: policy {policy!r}: {error}") from None


def _layers_per_step(policy, layers_per_step, where):
    """``layers_per_step``, or the selection callback's (they must agree if both are given)."""
    from_policy = getattr(policy, "layers_per_step", None)
    if from_policy is not None and layers_per_step is not None \
            and from_policy != layers_per_step:
        raise TrainingExportError(f"{where}: layers_per_step={layers_per_step} but the policy "
                                  f"callback has layers_per_step={from_policy}")
    return layers_per_step if layers_per_step is not None else from_policy


def _checked_model(model, scheme, learning_rate, where):
    """The model with BatchNorm folded, after checking it, the scheme and the rate."""
    from dgst_tf.core.bn_folding import fold_batchnorm
    from dgst_tf.core.classifier import logits_model
    from dgst_tf.core.graph import UnsupportedModelError
    from dgst_tf.core.keras_compat import keras, require_keras2
    from dgst_tf.core.training_support import check_gradient_path
    from dgst_tf.training.scheme import classifier_layer

    require_keras2(model, where)
    if any(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers):
        model = fold_batchnorm(model)
    try:  # a 1x1-conv classifier as the Dense it is; a softmax dropped (trained on logits)
        model = logits_model(model)
    except UnsupportedModelError as error:
        raise TrainingExportError(f"{where}: {error}") from None
    scheme.validate(model)
    if not float(learning_rate) > 0:
        raise TrainingExportError(f"{where}: learning_rate must be > 0, got {learning_rate}")
    trained = {name for name in scheme.layers if scheme.update_for(name).mode != "frozen"}
    try:  # before the (slow) conversion: every layer the gradient passes can be trained
        check_gradient_path(model, trained | {classifier_layer(model).name}, where)
    except UnsupportedModelError as error:
        raise TrainingExportError(str(error)) from None
    return model


def _int8_editor(model, representative_images, num_samples, **head) -> ModelEditor:
    """A `ModelEditor` on the full-int8 conversion of ``model`` (`export_int8`)."""
    from dgst_tf.export.inference import export_int8

    with tempfile.TemporaryDirectory(prefix="dgst-train-export-") as folder:
        converted = pathlib.Path(folder) / "inference.tflite"
        export_int8(model, representative_images, converted, num_samples=num_samples, **head)
        _, parsed = read_tflite(converted)
    return ModelEditor(parsed)


def _simplify_forward(editor, model, scheme, classifier, settings, where) -> tuple[int, int]:
    """Fold PADs (not into weight-updated layers) and fuse the frozen blocks in front of the
    first trained layer; returns (folded pads, fused blocks)."""
    weight_layers = [layer.name for layer in model.layers
                     if scheme.update_for(layer.name).updates_weights]
    folded_pads = fold_pads(editor, weight_layers) if settings.fold_pads else 0
    fused_blocks = 0
    if settings.fuse_blocks:
        trained = [index for index, name in find_layer_ops(editor, model, where).items()
                   if name == classifier or scheme.update_for(name).mode != "frozen"]
        fused_blocks = block_fusion.fuse_blocks(editor, stop=min(trained))
    return folded_pads, fused_blocks


def _drop_unused_tensors(graph: TrainingGraph) -> None:
    """Remove the tensors no op reads or writes (a gradient whose op the backward pass
    dropped) and the data no tensor uses, renumbering the tensor indices the graph holds."""
    renumber = graph.editor.prune()
    graph.plan.logits = renumber[graph.plan.logits]
    for entry in graph.params:
        for key in ("tensor", "initial", "flash"):
            if key in entry:
                entry[key] = renumber[entry[key]]
        if "merged" in entry:
            entry["merged"] = [renumber[m] for m in entry["merged"]]


def _order_ops(graph: TrainingGraph) -> list:
    """Put the ops in place and set the graph's inputs and outputs; returns the indices of
    the inference graph's ops (builtin forward ops and fused blocks)."""
    editor, subgraph = graph.editor, graph.editor.subgraph
    forward = graph.forward_ops()
    if graph.settings.requant_in_flash:
        forward = [flash_requant_op(editor, op) or op for op in forward]
    image = int(subgraph.inputs[0])
    subgraph.operators = graph.init_ops + graph.selection_ops + forward + graph.backward_ops
    subgraph.inputs = [image, graph.label]
    output_params = graph.params if graph.settings.output_params else []
    subgraph.outputs = ([graph.loss, graph.plan.logits]
                        + [entry["tensor"] for entry in output_params]
                        + [layer.kept_tensor for layer in graph.dynamic_layers()])
    editor.model.signatureDefs = None
    editor.model.description = b"dgst-tf training step"
    forward_ids = {id(op) for op in forward}
    return [position for position, op in enumerate(subgraph.operators)
            if id(op) in forward_ids and (not editor.builtin(op).startswith("CUSTOM:")
                                          or editor.builtin(op) in _INFERENCE_CUSTOM_OPS)]
