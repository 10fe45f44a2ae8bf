"""Physically removing pruned channel groups: a smaller tf-keras model, same outputs.

Masks (TF-MOT or ours) leave zeros in full-size tensors; the MCU still stores and computes
them. `remove_channels` rebuilds the graph with smaller layers (fewer filters / units /
depthwise channels, sliced BatchNorm statistics, sliced consumer kernels) whose outputs
equal the masked model's::

    from dgst_tf.pruning import mask_groups, remove_channels, footprint, select_groups

    removed = select_groups(model, 0.3)           # or channel_pruner(...).removed_groups()
    masked = mask_groups(model, removed)           # same shapes, zeros (what TF-MOT leaves)
    small = remove_channels(masked)                # groups found from the zeros
    footprint(model).flash_bytes, footprint(small).flash_bytes

A masked group sends exactly zero downstream when its output filters, biases and
BatchNorm gamma/beta are zero, and consumers ignore it when their input slices are zero;
`mask_groups` and the TF-MOT wrappers zero all of them, so removal changes no output.
TensorFlow functions on Keras tensors (``x + 3.0``, ``x / scales``) are called again with
their scalars, and their per-channel constants cut to the kept channels.
What removal saves is counted in `dgst_tf.pruning.model_size`.
"""
from __future__ import annotations

import numpy as np

from dgst_tf.core.graph import check_functional, rebuild
from dgst_tf.core.keras_compat import keras, tf
from dgst_tf.core.layer_kinds import kind_of
from dgst_tf.pruning.channel_weights import masked_weights, weight_terms
from dgst_tf.pruning.dependency_graph import DependencyGraph
from dgst_tf.pruning.group_importance import masked_weight_norm
from tf_keras.src.engine.keras_tensor import KerasTensor
from tf_keras.src.layers.core.tf_op_layer import TFOpLambda

__all__ = ["remove_channels", "mask_groups", "zeroed_groups"]

L = keras.layers


def zeroed_groups(model: keras.Model, graph: DependencyGraph | None = None) -> np.ndarray:
    """Prunable groups whose weights (filters, biases, BN gamma/beta, input slices) are all
    exactly zero, e.g. after ``tfmot.sparsity.keras.strip_pruning``.

        zeroed_groups(tfmot.sparsity.keras.strip_pruning(pruning_model))
    """
    graph = graph or DependencyGraph(model)
    total = masked_weight_norm(weight_terms(graph), graph.num_groups).numpy()
    return np.flatnonzero((total == 0) & graph.prunable)


def mask_groups(model: keras.Model, removed, graph: DependencyGraph | None = None
                ) -> keras.Model:
    """A copy of ``model`` with the weights of the ``removed`` groups set to zero (the
    masked model: same shapes, same outputs as `remove_channels` gives).

        masked = mask_groups(model, [3, 17])
    """
    check_functional(model, "mask_groups")
    graph = graph or DependencyGraph(model)
    keep = graph.keep_vector(removed)
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    for layer in graph.layers():
        axes = graph.weight_axes(layer.name)
        if not axes:
            continue
        target = copy.get_layer(layer.name)
        for attr in masked_weights(graph, layer.name):
            value = getattr(target, attr).numpy()
            for name, axis, groups in axes:
                if name == attr:
                    shape = [1] * value.ndim
                    shape[axis] = -1
                    value = value * keep[groups].reshape(shape)
            getattr(target, attr).assign(value)
    return copy


def remove_channels(model: keras.Model, removed=None, graph: DependencyGraph | None = None,
                    name: str | None = None) -> keras.Model:
    """A smaller model without the ``removed`` channel groups (new layers, same names).

    ``removed``: group indices (`select_groups`, ``channel_pruner(m).removed_groups()``);
    None removes the groups `zeroed_groups` finds. The result computes what the masked
    model computes (to float rounding) with fewer parameters and smaller activations.

        small = remove_channels(tfmot.sparsity.keras.strip_pruning(pruning_model))
    """
    check_functional(model, "remove_channels")
    graph = graph or DependencyGraph(model)
    if removed is None:
        removed = zeroed_groups(model, graph)
    keep = graph.keep_vector(removed)

    def call_layer(layer, args, kwargs):
        ins = np.flatnonzero(keep[graph.input_groups(layer.name)])
        out = np.flatnonzero(keep[graph.output_groups(layer.name)])
        config, weights = _smaller_layer(layer, ins, out)
        new = type(layer).from_config(config)
        if isinstance(layer, TFOpLambda):
            channels = len(graph.input_groups(layer.name))
            args, kwargs = _kept_constants(args, kwargs, ins, channels)
        result = new(*args, **kwargs)
        if weights:
            new.set_weights(weights)
        return result

    return rebuild(model, call_layer, name=name or f"{model.name}_pruned")


def _kept_constants(args: tuple, kwargs: dict, ins: np.ndarray, channels: int
                    ) -> tuple[tuple, dict]:
    """A TensorFlow function's arguments with its per-channel constants (last axis of
    ``channels`` entries; `DependencyGraph` allows no other widths but 1) cut to ``ins``."""
    def cut(value):
        if (isinstance(value, KerasTensor) or channels == 1 or not np.ndim(value)
                or np.shape(value)[-1] != channels):
            return value
        kept = np.take(np.asarray(value), ins, axis=-1)
        if tf.is_tensor(value):
            return tf.constant(kept, dtype=value.dtype)
        return kept.tolist() if isinstance(value, (list, tuple)) else kept

    return tuple(cut(a) for a in args), {key: cut(v) for key, v in kwargs.items()}


def _smaller_layer(layer, ins: np.ndarray, out: np.ndarray) -> tuple[dict, list | None]:
    """(config, weights) of ``layer`` keeping input channels ``ins`` and outputs ``out``."""
    config = layer.get_config()
    kind = kind_of(layer)
    if kind is not None:
        if not len(out):
            raise ValueError(f"removing these groups leaves layer {layer.name!r} "
                             f"({type(layer).__name__}) without output channels")
        kernel = kind.kernel(layer).numpy()
        if kind.depthwise:
            weights = [kernel[:, :, ins, :]]
        elif kind.spatial:
            config["filters"] = len(out)
            weights = [kernel[:, :, ins, :][..., out]]
        else:
            config["units"] = len(out)
            weights = [kernel[ins][:, out]]
        if layer.use_bias:
            weights.append(layer.bias.numpy()[out])
        return config, weights
    weights = layer.get_weights()
    if isinstance(layer, L.BatchNormalization):
        weights = [w[ins] for w in weights]
    elif isinstance(layer, L.Normalization):
        mean = np.reshape(np.asarray(layer.mean), [-1])
        variance = np.reshape(np.asarray(layer.variance), [-1])
        config.update(mean=mean[ins].tolist(), variance=variance[ins].tolist(), axis=-1)
        config.pop("count", None)
        weights = None
    elif isinstance(layer, L.Reshape):  # keeps the channel axis or flattens (DependencyGraph)
        target = list(config["target_shape"])
        if target[-1] != -1:  # -1: Keras infers it from the smaller input
            target[-1] = len(out)
        config["target_shape"] = tuple(target)
    elif isinstance(layer, L.Rescaling):
        for key in ("scale", "offset"):
            if np.size(config[key]) > 1:
                config[key] = np.reshape(config[key], [-1])[ins].tolist()
    return config, weights
