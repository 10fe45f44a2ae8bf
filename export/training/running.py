"""Running an exported training step: N steps in TFLM (`train_tflm`), the trainable tensors
before any step (`initial_params`), and an inference `.tflite` holding given weights
(`write_inference_model`, run by `run_inference_tflm`).

    run = train_tflm("train.tflite", images[:100], labels[:100])
    write_inference_model("train.tflite", run.params, "updated.tflite")
    logits = run_inference_tflm("updated.tflite", q[:, None]).outputs[0]
"""
from __future__ import annotations

import dataclasses
import os
import pathlib

import numpy as np

from dgst_tf.core.files import write_atomically
from dgst_tf.export.tflite_editor import ModelEditor
from dgst_tf.export.tflite_file import read_tflite
from dgst_tf.export.training.flash_requant import FLASH_REQUANT_OP, builtin_conv_op
from dgst_tf.export.training.manifest import load_manifest
from dgst_tf.export.training.offline_plan import drop_offline_plan

__all__ = ["TrainingRun", "train_tflm", "initial_params", "run_inference_tflm",
           "write_inference_model"]


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
    images = _int8_images(path, images, content["inputs"][0])
    labels = _checked_labels(path, labels, len(images), content["inputs"][1]["classes"])
    ops = host_ops()
    result = run_tflm(path, [images, labels], libraries=[ops.library],
                      registerers=ops.registerers, arena_size=arena_size, timeout=timeout)
    names = content["outputs"]
    params = {name: result.outputs[j][-1] for j, name in enumerate(names)
              if j >= 2 and not name.endswith("/kept")}
    if any("flash" in entry for entry in content["params"]):
        params = _full_params(ModelEditor(read_tflite(path)[1]), content, params)
    kept = {name: result.outputs[j] for j, name in enumerate(names) if name.endswith("/kept")}
    return TrainingRun(result.outputs[0][:, 0], result.outputs[1].reshape(len(images), -1),
                       params, kept, result.arena_bytes, content, result)


def _int8_images(path, images, spec: dict) -> np.ndarray:
    """``images`` as int8 ``(N, 1, H, W, C)``, quantized with the input's scale if float."""
    images = np.asarray(images)
    shape = tuple(spec["shape"])
    if images.shape[1:] == shape[1:]:
        images = images[:, None]
    if images.ndim != len(shape) + 1 or images.shape[1:] != shape:
        want = ", ".join(map(str, shape[1:]))
        raise ValueError(f"train_tflm({path}): images must have shape (N, {want}), "
                         f"got {images.shape}")
    if images.dtype != np.int8:
        codes = (np.round(images.astype(np.float32) / np.float32(spec["scale"]))
                 + spec["zero_point"])
        images = np.clip(codes, -128, 127).astype(np.int8)
    return images


def _checked_labels(path, labels, count: int, classes: int) -> np.ndarray:
    labels = np.asarray(labels).astype(np.int32).reshape(-1, 1)
    if len(labels) != count:
        raise ValueError(f"train_tflm({path}): {count} images but {len(labels)} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        raise ValueError(f"train_tflm({path}): labels must be in [0, {classes})")
    return labels


def initial_params(path, *, manifest=None) -> dict:
    """The trainable tensors' values before any step ("layer/param" -> array), from the
    read-only initial constants of the training model. Example::

        write_inference_model("train.tflite", initial_params("train.tflite"), "before.tflite")
    """
    content = load_manifest(path, manifest)
    _, model = read_tflite(path)
    editor = ModelEditor(model)
    return _full_params(editor, content, {f"{p['layer']}/{p['param']}": np.array(
        editor.data(p["initial"])) for p in content["params"]})


def _full_params(editor: ModelEditor, content, params: dict) -> dict:
    """Params with the RAM copies of kept channels (``kept_weights_in_ram``) put back into
    their full kernels (the read-only tensor of the training model ``editor`` for the
    others)."""
    split = [p for p in content["params"] if "flash" in p
             and f"{p['layer']}/{p['param']}" in params]
    params = dict(params)
    for entry in split:
        key = f"{entry['layer']}/{entry['param']}"
        full = np.array(editor.data(entry["flash"]))
        full[..., entry["kept"]] = params[key]
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
    ``DGST_FUSED_BLOCK`` if the training model has fused blocks; its ``DGST_CONV2D`` ops
    become builtin convolutions again) whose trainable tensors hold ``params`` (as
    `TrainingRun.params`: "layer/param" -> array). Example::

        write_inference_model("train.tflite", run.params, "updated.tflite")
    """
    content = load_manifest(path, manifest)
    _, model = read_tflite(path)
    editor = ModelEditor(model)
    _set_params(editor, path, content, params)
    subgraph = editor.subgraph
    subgraph.operators = [_inference_op(editor, subgraph.operators[i])
                          for i in content["forward_ops"]]
    to_flash = {m: p["flash"] for p in content["params"] for m in p.get("merged", [])}
    for op in subgraph.operators:  # convs read the (updated) full kernels again
        op.inputs = [to_flash.get(int(t), int(t)) for t in op.inputs]
    logits = int(subgraph.outputs[1])
    subgraph.inputs = [int(subgraph.inputs[0])]
    subgraph.outputs = [logits]
    drop_offline_plan(editor)  # it places the training graph's tensors
    editor.prune()
    editor.model.description = b"dgst-tf inference (updated on device)"
    data = editor.pack()
    read_tflite(data, what=f"updated inference model for {os.fspath(out_path)}")
    return write_atomically(out_path, data)


def _inference_op(editor: ModelEditor, op):
    """A forward op of the training graph as the inference graph has it."""
    if editor.builtin(op) == f"CUSTOM:{FLASH_REQUANT_OP}":
        return builtin_conv_op(editor, op)
    return op


def _set_params(editor: ModelEditor, path, content: dict, params: dict) -> None:
    """Store ``params`` as the constants of the training model's trainable tensors (the full
    read-only kernel for kept-weights-in-RAM layers)."""
    for entry in content["params"]:
        key = f"{entry['layer']}/{entry['param']}"
        if entry["output"] is None and key not in params:
            raise ValueError(f"write_inference_model({path}): the model was exported with "
                             f"output_params=False, so TFLM cannot return {key!r}")
        if key not in params:
            raise ValueError(f"write_inference_model({path}): params lack {key!r}")
        value = np.asarray(params[key])
        shape = entry.get("full_shape", entry["shape"])
        if list(value.shape) != shape:
            raise ValueError(f"write_inference_model({path}): {key!r} has shape "
                             f"{value.shape}, the model {tuple(shape)}")
        editor.set_data(entry.get("flash", entry["tensor"]), value)
