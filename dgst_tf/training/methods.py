"""Named training methods: an `UpdateScheme` plus the selection callbacks that drive it.

Every method, baselines included, trains through `SparseUpdateModel`, so they differ only
in what they update::

    from dgst_tf.training.methods import build_method
    scheme, callbacks = build_method("dgsu", model, target_fraction=0.02, seed=0)

- ``full``: every conv/dense weight and bias;
- ``last_layer``: the classifier only;
- ``bias_only``: every bias and the classifier;
- ``sparse_update``: Lin et al. 2022: the pointwise expansion convs of the last ``blocks``
  inverted-residual blocks at one ratio so that ``target_fraction`` of all conv weights
  update per step, top-k input channels by weight magnitude fixed before training, biases
  from the first of them on;
- ``dgsu``: Li & Chang 2024 as implemented here: the same weight budget per step spread
  over all pointwise convs (expansion and projection) of the last ``blocks`` blocks, with
  the channels reselected every iteration (traversal first, then weight-L2 importance), so
  coverage of those layers grows towards 100%; front layers frozen.
"""
from dgst_tf.core.keras_compat import keras
from dgst_tf.core.layer_kinds import input_channels, is_pointwise
from dgst_tf.training.scheme import UpdateScheme, conv_layers
from dgst_tf.training.selection import DynamicChannelSelection, StaticChannelSelection

METHODS = ("full", "last_layer", "bias_only", "sparse_update", "dgsu")


def pointwise_convs(model: keras.Model) -> list:
    """1x1 Conv2D layers in execution order (MobileNetV2: expand and project convs)."""
    return [l for l in conv_layers(model) if is_pointwise(l)]


def expansion_convs(model: keras.Model) -> list:
    """Pointwise convs with more output than input channels (inverted-residual expands)."""
    return [l for l in pointwise_convs(model) if l.filters > input_channels(l)]


def build_method(name: str, model: keras.Model, target_fraction: float = 0.02,
                 blocks: int = 8, importance: str = "weight_l2", seed: int = 0,
                 layers_per_step: int | None = None):
    """(scheme, callbacks) for method ``name`` (one of METHODS) on ``model``;
    ``layers_per_step``: DGSU's layer schedule (`DynamicChannelSelection`), dgsu only.

        scheme, callbacks = build_method("dgsu", model, 0.02, layers_per_step=2)
    """
    if layers_per_step is not None and name != "dgsu":
        raise ValueError(f"layers_per_step is DGSU's layer schedule; method {name!r} has none")
    if name == "full":
        return UpdateScheme.full(model), []
    if name == "last_layer":
        return UpdateScheme.last_layer(model), []
    if name == "bias_only":
        return UpdateScheme.bias_only(model), []
    if name == "sparse_update":
        layers = [l.name for l in expansion_convs(model)[-blocks:]]
        if not layers:
            raise ValueError(f"model {model.name!r} has no pointwise expansion convs")
        scheme = UpdateScheme.for_target_fraction(model, layers, target_fraction,
                                                  name="sparse_update")
        return scheme, [StaticChannelSelection("magnitude+", seed=seed)]
    if name == "dgsu":
        expands = expansion_convs(model)[-blocks:]
        if not expands:
            raise ValueError(f"model {model.name!r} has no pointwise expansion convs")
        order = {l.name: i for i, l in enumerate(conv_layers(model))}
        first = order[expands[0].name]
        layers = [l.name for l in pointwise_convs(model) if order[l.name] >= first]
        scheme = UpdateScheme.for_target_fraction(model, layers, target_fraction, name="dgsu")
        return scheme, [DynamicChannelSelection(importance=importance, traversal=True,
                                                layers_per_step=layers_per_step, seed=seed)]
    raise ValueError(f"unknown method {name!r}; choose from {METHODS}")
