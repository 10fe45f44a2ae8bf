"""dgst-tf (dynamic gradient sparse training for TensorFlow): sparse on-device training for
Keras models, exported to TensorFlow Lite Micro.

    import dgst_tf
    model = dgst_tf.models.mobilenet_v2(width=1.0, input_shape=(224, 224, 3))

The subpackages follow the pipeline: `core` (graphs, layer kinds, files) -> `models`, `data`
-> `pruning` (channel pruning to a flash budget) -> `planning` (training memory, budgets,
scheme search) -> `training` (the sparse train step in `model.fit`) -> `export` (the training
step as a `.tflite`, run in TFLM) -> `tflm_ops` (the device kernels' NumPy reference);
`jobs` and `cli` join them.
"""
import os

# Before TensorFlow is first imported: tf.keras then agrees with the tf-keras we use, and
# oneDNN/CUDA banners stay out of user output. TensorFlow itself is imported by the modules
# that need it (dgst_tf.core.keras_compat), so NumPy-only parts such as dgst_tf.tflm_ops
# import without it.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"


# Public names -> the module that defines them; loaded on first use so that
# `import dgst_tf` (and `dgst --help`) stays cheap.
_PUBLIC = {
    "SparseUpdateModel": "dgst_tf.training.sparse_model",
    "UpdateScheme": "dgst_tf.training.scheme",
    "fold_batchnorm": "dgst_tf.core.bn_folding",
    "StaticChannelSelection": "dgst_tf.training.selection",
    "DynamicChannelSelection": "dgst_tf.training.selection",
}
# The stages, in pipeline order (plus the `memory` and `budget` aliases of planning modules).
_SUBMODULES = {"core", "models", "data", "pruning", "planning", "training", "export",
               "tflm_ops", "jobs", "cli", "memory", "budget"}


def __getattr__(name):
    import importlib

    if name in _SUBMODULES:
        return importlib.import_module(f"dgst_tf.{name}")
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'dgst_tf' has no attribute {name!r}")
