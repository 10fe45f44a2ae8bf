"""The JSON manifest beside a training-step `.tflite`: its inputs, outputs, layers, kept
channels and trainable tensors ("params" entries), checked against the file when read.

    manifest = load_manifest("train.tflite")        # reads train.json beside it
    manifest["params"], manifest["outputs"]
"""
from __future__ import annotations

import collections
import hashlib
import json
import pathlib

import numpy as np

from dgst_tf.export.tflite_editor import ModelEditor
from dgst_tf.export.tflite_file import read_tflite, tensor_details
from dgst_tf.export.training.state import TrainingGraph

__all__ = ["MANIFEST_FORMAT", "MANIFEST_VERSION", "TrainingManifestError", "manifest_path_for",
           "file_sha256", "build_manifest", "load_manifest"]

MANIFEST_FORMAT = "dgst-tf-training-step"
MANIFEST_VERSION = 1

# the fields every manifest has, and their JSON types
_REQUIRED = {"format": str, "version": int, "sha256": str, "inputs": list, "outputs": list,
             "params": list, "forward_ops": list, "logits": dict}


class TrainingManifestError(ValueError):
    """A training manifest is missing, malformed or does not match its `.tflite`."""


def manifest_path_for(path) -> pathlib.Path:
    """``train.tflite`` -> ``train.json`` (where `export_training` writes the manifest)."""
    return pathlib.Path(path).with_suffix(".json")


def file_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------- writing
def build_manifest(graph: TrainingGraph, path: pathlib.Path, data: bytes, parsed, *,
                   scheme, forward_ops: list, folded_pads: int, fused_blocks: int,
                   offline_plan: dict | None = None) -> dict:
    """The manifest of the packed training graph ``data`` (parsed: ``parsed``), written to
    ``path``; ``forward_ops``: the op indices of the inference graph inside it;
    ``offline_plan``: what `add_offline_plan` planned (None: TFLM plans online)."""
    editor, settings = graph.editor, graph.settings
    op_counts = collections.Counter(ModelEditor(parsed).builtin(op)
                                    for op in parsed.subgraphs[0].operators)
    logits_scale, logits_zero_point = editor.quantization(graph.plan.logits)
    output_params = graph.params if settings.output_params else []
    return {
        "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION,
        "tflite": path.name, "sha256": file_sha256(data), "size_bytes": len(data),
        "inputs": _inputs(graph, parsed),
        "outputs": (["loss", "logits"]
                    + [f"{p['layer']}/{p['param']}" for p in output_params]
                    + [f"{layer.name}/kept" for layer in graph.dynamic_layers()]),
        "logits": {"scale": float(logits_scale[0]), "zero_point": int(logits_zero_point[0])},
        "learning_rate": float(settings.learning_rate),
        "rounding": settings.rounding, "seed": int(settings.seed),
        "selection": settings.selection if isinstance(settings.selection, str) else "given",
        "policy": settings.policy,
        "layers_per_step": settings.layers_per_step,
        "scheme": scheme.get_config(),
        "classifier": graph.plan.classifier,
        "layers": [_layer_entry(layer) for layer in graph.layers_in_order()],
        "params": [_param_entry(graph, parsed, position, entry)
                   for position, entry in enumerate(graph.params)],
        "forward_ops": forward_ops,
        "folded_pads": folded_pads,
        "fused_blocks": fused_blocks,
        "offline_plan": offline_plan,
        "ops": dict(sorted(op_counts.items())),
        "custom_ops": sorted(k[len("CUSTOM:"):] for k in op_counts if k.startswith("CUSTOM:")),
    }


def _inputs(graph: TrainingGraph, parsed) -> list:
    image = tensor_details(parsed, int(graph.editor.subgraph.inputs[0]))
    classes = int(graph.editor.shape(graph.plan.logits)[-1])
    return [{"name": "image", "shape": list(image.shape), "dtype": "int8",
             "scale": image.scale, "zero_point": image.zero_point},
            {"name": "label", "shape": [1], "dtype": "int32", "classes": classes}]


def _layer_entry(layer) -> dict:
    static_kept = None if layer.kept is None or layer.policy else [int(c) for c in layer.kept]
    return {"name": layer.name, "kind": layer.kind, "update": layer.update.mode,
            "ratio": layer.update.ratio, "policy": layer.policy, "kept": static_kept,
            "selection_state_bytes": layer.selection_state_bytes,
            "schedule": list(layer.schedule) if layer.schedule else None}


def _param_entry(graph: TrainingGraph, parsed, position: int, entry: dict) -> dict:
    editor = graph.editor
    return {**entry, "output": 2 + position if graph.settings.output_params else None,
            "shape": list(editor.shape(entry["tensor"])),
            **({"full_shape": list(editor.shape(entry["flash"]))} if "flash" in entry else {}),
            "dtype": np.dtype(tensor_details(parsed, entry["tensor"]).dtype).name}


# ----------------------------------------------------------------------------- reading
def load_manifest(path, manifest=None) -> dict:
    """The manifest of training model ``path`` (default: beside it, ``.json``), checked
    against the file: format, version, fields, SHA-256 and tensor shapes. Raises
    `TrainingManifestError` naming the manifest file and the field at fault.

        manifest = load_manifest("train.tflite")
    """
    path = pathlib.Path(path)
    manifest_file = pathlib.Path(manifest) if manifest is not None else manifest_path_for(path)
    where = f"training manifest {manifest_file}"
    content = _read_json(manifest_file, path, where)
    for key, kind in _REQUIRED.items():
        if not isinstance(content.get(key), kind):
            raise TrainingManifestError(f"{where}: field {key!r} is missing or not a "
                                        f"{kind.__name__}")
    if content["format"] != MANIFEST_FORMAT or content["version"] != MANIFEST_VERSION:
        raise TrainingManifestError(f"{where}: format {content['format']!r} version "
                                    f"{content['version']} is not {MANIFEST_FORMAT!r} version "
                                    f"{MANIFEST_VERSION}")
    data, model = read_tflite(path)
    if file_sha256(data) != content["sha256"]:
        raise TrainingManifestError(f"{where}: SHA-256 does not match {path} (the manifest "
                                    f"belongs to another export)")
    outputs = [int(t) for t in model.subgraphs[0].outputs]
    for entry in content["params"]:
        if not _param_entry_matches(model, outputs, entry):
            raise TrainingManifestError(f"{where}: parameter entry {entry!r} does not match "
                                        f"the model's outputs")
    return content


def _read_json(manifest_file: pathlib.Path, path: pathlib.Path, where) -> dict:
    if not manifest_file.is_file():
        raise TrainingManifestError(f"{where}: no such file (export_training writes it beside "
                                    f"{path.name})")
    try:
        content = json.loads(manifest_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TrainingManifestError(f"{where}: not valid JSON: {error}") from None
    if not isinstance(content, dict):
        raise TrainingManifestError(f"{where}: expected a JSON object")
    return content


def _param_entry_matches(model, outputs: list, entry) -> bool:
    try:
        matches = ((entry["output"] is None or outputs[entry["output"]] == entry["tensor"])
                   and list(tensor_details(model, entry["tensor"]).shape) == entry["shape"])
    except (KeyError, IndexError, TypeError):
        return False
    if matches and "flash" in entry:  # kept channels' weights in RAM, the rest in this kernel
        return _kept_weights_entry_matches(model, entry)
    return matches


def _kept_weights_entry_matches(model, entry) -> bool:
    """A kept-weights-in-RAM entry: the full kernel's shape, the kept channels inside it and
    the merged full-kernel temporaries are consistent with the model."""
    try:
        full = list(tensor_details(model, entry["flash"]).shape)
        tensors = len(model.subgraphs[0].tensors)
        return (full == entry["full_shape"] and len(entry["kept"]) == entry["shape"][-1]
                and all(isinstance(c, int) and 0 <= c < full[-1] for c in entry["kept"])
                and all(isinstance(m, int) and 0 <= m < tensors for m in entry["merged"]))
    except (KeyError, IndexError, TypeError):
        return False
