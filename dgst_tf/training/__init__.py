"""The simulated on-device training step, inside `model.fit`.

`scheme` (which layers and channels a step updates), `sparse_ops` and `sparse_model` (a train
step that computes only those gradients), `selection` and `channel_importance` (the callbacks
that choose channels: Lin's static and DGSU's dynamic selection), `activation_patterns`
(storing only a pattern of a layer's input), `int8_graph` (the simulated int8 model), `qas`
(Quantization-Aware Scaling and the device's int8 weight update) and `methods` (named
recipes: a scheme plus its callbacks).

    from dgst_tf.training import SparseUpdateModel, UpdateScheme, DynamicChannelSelection
"""
import importlib

_PUBLIC = {
    "SparseUpdateModel": "sparse_model",
    "UpdateScheme": "scheme",
    "SchemeError": "scheme",
    "StaticChannelSelection": "selection",
    "DynamicChannelSelection": "selection",
    "build_method": "methods",
    "METHODS": "methods",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name):
    if name in _PUBLIC:
        return getattr(importlib.import_module(f"{__name__}.{_PUBLIC[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
