"""Folding BatchNormalization into the convolution before it (the MCU graph has no BN).

    from dgst_tf.core.bn_folding import fold_batchnorm
    folded = fold_batchnorm(model)        # conv -> BN becomes one conv with a bias
    # folded(x) equals model(x, training=False) to float rounding

A BN is folded when its only input is a Conv2D, DepthwiseConv2D or Dense layer whose output
nothing else reads; the conv keeps its name, so update schemes that name it still apply.
Other BNs stay in the graph.
"""
import numpy as np

from dgst_tf.core.graph import check_functional, consumers, producers, rebuild
from dgst_tf.core.keras_compat import keras
from dgst_tf.core.layer_kinds import WEIGHT_TYPES, is_depthwise, kind_of

FOLDABLE = WEIGHT_TYPES  # the layer kinds a BN folds into (`dgst_tf.core.layer_kinds`)


def _bn_scale_shift(bn: keras.layers.BatchNormalization):
    weights = dict(zip([w.name.split("/")[-1].split(":")[0] for w in bn.weights],
                       bn.get_weights()))
    channels = weights["moving_mean"].shape[0]
    gamma = weights.get("gamma", np.ones(channels, np.float32))
    beta = weights.get("beta", np.zeros(channels, np.float32))
    scale = gamma / np.sqrt(weights["moving_variance"] + bn.epsilon)
    return scale.astype(np.float64), (beta - weights["moving_mean"] * scale).astype(np.float64)


def folded_weights(layer, bn) -> tuple[np.ndarray, np.ndarray]:
    """(kernel, bias) of ``layer`` with ``bn`` folded in, in float64 then cast to float32."""
    kernel = layer.get_weights()[0].astype(np.float64)
    bias = (layer.get_weights()[1].astype(np.float64) if layer.use_bias
            else np.zeros(bn.moving_mean.shape[0]))
    scale, shift = _bn_scale_shift(bn)
    if is_depthwise(layer):
        k, _, channels, multiplier = kernel.shape
        kernel = kernel * scale.reshape(channels, multiplier)
    else:
        kernel = kernel * scale  # output channels are the last axis of Conv2D and Dense
    return kernel.astype(np.float32), (bias * scale + shift).astype(np.float32)


def foldable_pairs(model: keras.Model) -> dict[str, str]:
    """{bn layer name: conv layer name} for every BN that `fold_batchnorm` folds."""
    readers, inputs = consumers(model), producers(model)
    pairs = {}
    for layer in model.layers:
        if not isinstance(layer, keras.layers.BatchNormalization):
            continue
        if len(inputs[layer.name]) != 1:
            continue
        conv = model.get_layer(inputs[layer.name][0])
        axis = layer.axis[0] if isinstance(layer.axis, (list, tuple)) else layer.axis
        if (kind_of(conv) is not None and readers[conv.name] == [layer.name]
                and axis in (-1, len(layer.input_shape) - 1)):
            pairs[layer.name] = conv.name
    return pairs


def fold_batchnorm(model: keras.Model, name: str | None = None) -> keras.Model:
    """A new model with every foldable BatchNormalization merged into its conv.

    The input model is not changed; the new model has its own variables.
    """
    check_functional(model, "fold_batchnorm")
    pairs = foldable_pairs(model)
    folded_convs = {conv: model.get_layer(bn) for bn, conv in pairs.items()}
    new_layers = {}

    def call_layer(layer, args, kwargs):
        if layer.name in pairs:  # the BN itself: already inside the conv
            return args[0]
        if layer.name in folded_convs:
            config = dict(layer.get_config(), use_bias=True)
            config.pop("bias_initializer", None)
            new = type(layer).from_config(config)
            out = new(*args, **kwargs)
            new.set_weights(folded_weights(layer, folded_convs[layer.name]))
            new_layers[layer.name] = new
            return out
        clone = type(layer).from_config(layer.get_config())
        out = clone(*args, **kwargs)
        clone.set_weights(layer.get_weights())
        return out

    return rebuild(model, call_layer, name=name or f"{model.name}_folded")
