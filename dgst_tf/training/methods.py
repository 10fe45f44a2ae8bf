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

A model without 1x1 convs that widen the channels (plain 3x3 CNNs, VGG-style nets) has one
block per Conv2D (any kernel size): the sparse update trains its last ``blocks`` Conv2D
layers, DGSU every Conv2D from the first of them on.
"""
from dgst_tf.core.keras_compat import keras
from dgst_tf.core.layer_kinds import CONV2D, input_channels, is_pointwise, kind_of
from dgst_tf.training.scheme import UpdateScheme, conv_layers
from dgst_tf.training.selection import DynamicChannelSelection, StaticChannelSelection

METHODS = ("full", "last_layer", "bias_only", "sparse_update", "dgsu")
DEFAULT_BLOCKS = 8  # the last 8 blocks of MobileNetV2: block_10 to head_conv


def pointwise_convs(model: keras.Model) -> list:
    """1x1 Conv2D layers in execution order (MobileNetV2: expand and project convs)."""
    return [l for l in conv_layers(model) if is_pointwise(l)]


def expansion_convs(model: keras.Model) -> list:
    """Pointwise convs with more output than input channels (inverted-residual expands)."""
    return [l for l in pointwise_convs(model) if l.filters > input_channels(l)]


def block_convs(model: keras.Model) -> tuple[list, list]:
    """(block starts, trainable convs) in execution order: the expansion convs (1x1 convs
    that widen the channels: MobileNet v1/v2/v3, MCUNet, EfficientNet, ResNet bottlenecks)
    and the pointwise convs; a model without them (plain 3x3 CNNs, VGG-style nets) starts a
    block at every Conv2D and trains all of them. Raises ValueError if it has no Conv2D.

        starts, convs = block_convs(model)  # the last 2 blocks begin at starts[-2]
    """
    expands = expansion_convs(model)
    if expands:
        return expands, pointwise_convs(model)
    convs = [l for l in conv_layers(model) if kind_of(l) is CONV2D]
    if not convs:
        raise ValueError(f"model {model.name!r} has no Conv2D layer (besides a classifier) "
                         "for a sparse update to train")
    return convs, convs


def build_method(name: str, model: keras.Model, target_fraction: float = 0.02,
                 blocks: int = DEFAULT_BLOCKS, importance: str = "weight_l2", seed: int = 0,
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
        layers = [l.name for l in block_convs(model)[0][-blocks:]]
        scheme = UpdateScheme.for_target_fraction(model, layers, target_fraction,
                                                  name="sparse_update")
        return scheme, [StaticChannelSelection("magnitude+", seed=seed)]
    if name == "dgsu":
        starts, convs = block_convs(model)
        order = {l.name: i for i, l in enumerate(conv_layers(model))}
        first = order[starts[-blocks:][0].name]
        layers = [l.name for l in convs if order[l.name] >= first]
        scheme = UpdateScheme.for_target_fraction(model, layers, target_fraction, name="dgsu")
        return scheme, [DynamicChannelSelection(importance=importance, traversal=True,
                                                layers_per_step=layers_per_step, seed=seed)]
    raise ValueError(f"unknown method {name!r}; choose from {METHODS}")
