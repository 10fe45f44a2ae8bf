"""dgst-tf: sparse on-device training for Keras models, exported to TensorFlow Lite Micro.

    import dgst_tf
    model = dgst_tf.models.mobilenet_v2(width=1.0, input_shape=(224, 224, 3))
"""
from dgst_tf import keras_compat  # noqa: F401  (sets up tf-keras before anything else)

__version__ = "0.1.0"


# Public names -> the module that defines them; loaded on first use so that
# `import dgst_tf` (and `dgst --help`) stays cheap.
_PUBLIC = {
    "SparseUpdateModel": "dgst_tf.sparse_model",
    "UpdateScheme": "dgst_tf.scheme",
    "fold_batchnorm": "dgst_tf.bn_folding",
    "StaticChannelSelection": "dgst_tf.selection_callbacks",
    "DynamicChannelSelection": "dgst_tf.selection_callbacks",
}
_SUBMODULES = {"models", "data", "export", "cli", "runtime", "scheme", "sparse_model",
               "selection_callbacks", "channel_importance", "bn_folding", "graph",
               "pruning", "memory", "memory_report", "budget", "contribution", "search",
               "qas", "methods", "adapt"}


def __getattr__(name):
    import importlib

    if name in _SUBMODULES:
        return importlib.import_module(f"dgst_tf.{name}")
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'dgst_tf' has no attribute {name!r}")
