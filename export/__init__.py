"""dgst_tf.export: from a trained Keras model to TFLite Micro `.tflite` files, and running them.

This folder is installed as the `dgst_tf.export` package (see `package_dir` in setup.cfg).

    from dgst_tf.export import export_int8, quantize, run_tflm, reference_outputs

    info = export_int8(model, calibration_images, "model.tflite")  # full int8, batch 1
    x = quantize(images[:1], info.input)
    result = run_tflm("model.tflite", [x])          # TFLM in a child process
    result.outputs[0], result.arena_bytes           # == reference_outputs(...) bit for bit

Modules: `inference` (int8 export), `tflite_file` (checked reading, atomic writing),
`dgst_tf.core.tflite_builder` (hand-built graphs with custom ops), `tflm/` (running TFLM: `tflm.runner` in a
subprocess, `tflm.ops_loader` the dgst custom-op library for the pip interpreter,
`tflm.abi_check` the wheel ABI the custom-op glue relies on), `training/` (the training-step
export in phases, its manifest, running N steps in TFLM, writing updated weights back),
`tflite_editor` (editing a converted graph), `block_fusion` (frozen conv -> depthwise -> 1x1
chains as one row-by-row ``DGST_FUSED_BLOCK`` op).

    info = export_training(model, scheme, calibration_images, "train.tflite")
    run = train_tflm("train.tflite", images, labels)      # N steps, one interpreter
    write_inference_model("train.tflite", run.params, "updated.tflite")
"""
import importlib

_PUBLIC = {
    "export_int8": "inference",
    "Int8Export": "inference",
    "Int8ExportError": "inference",
    "quantize": "inference",
    "dequantize": "inference",
    "reference_outputs": "inference",
    "run_tflm": "tflm.runner",
    "TflmResult": "tflm.runner",
    "TflmError": "tflm.runner",
    "TflmCrashError": "tflm.runner",
    "read_tflite": "tflite_file",
    "TfliteFileError": "tflite_file",
    "ModelBuilder": "dgst_tf.core.tflite_builder",
    "int32_options": "dgst_tf.core.tflite_builder",
    "host_ops": "tflm.ops_loader",
    "check_abi": "tflm.abi_check",
    "export_training": "training",
    "TrainingExport": "training",
    "TrainingExportError": "training",
    "TrainingManifestError": "training",
    "train_tflm": "training",
    "TrainingRun": "training",
    "load_manifest": "training",
    "initial_params": "training",
    "write_inference_model": "training",
    "run_inference_tflm": "training",
    "fuse_blocks_file": "block_fusion",
    "ModelEditor": "tflite_editor",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name):
    if name in _PUBLIC:
        module = _PUBLIC[name]
        if not module.startswith("dgst_tf."):  # a module of this package
            module = f"{__name__}.{module}"
        return getattr(importlib.import_module(module), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
