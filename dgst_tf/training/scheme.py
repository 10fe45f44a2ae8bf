"""Update schemes: which parameters of each conv/dense layer a training step updates.

A scheme names, per Conv2D / DepthwiseConv2D / Dense layer, one of
``frozen``, ``bias`` (bias only) or ``weights`` at a ratio ``r`` of the layer's input
channels (depthwise: of its channels; weights always come with the bias). The classifier
(`dgst_tf.core.classifier`: the Dense layer, or 1x1 Conv2D of the pooled map, that produces the
model output) is always trained in full.

    from dgst_tf.training.scheme import UpdateScheme

    scheme = UpdateScheme({"block_16_expand": 0.25, "block_16_project": "bias"})
    scheme.validate(model)
    scheme.save("scheme.json"); UpdateScheme.load("scheme.json")
    scheme.kept_channels(model.get_layer("block_16_expand"))   # 0.25 of its input channels

A weight update may also name its channel count, ``{"mode": "weights", "ratio": 0.25,
"channels": 24}`` (`for_target_fraction` does); the count then wins over the ratio. Every
stage turns an update into a channel count with `kept_channels` and nothing else.

    # tiny-training's backward_config, as published:
    scheme = UpdateScheme.from_backward_config(
        model, n_bias_update=22, manual_weight_idx="36-39-40", weight_update_ratio="1-1-0.25")
"""
import dataclasses
import json
import math
import os
from typing import Mapping

from dgst_tf.core.classifier import ClassifierError, find_classifier, head_dense_layers
from dgst_tf.core.files import write_json_atomically
from dgst_tf.core.graph import check_functional, nodes_in_order
from dgst_tf.core.keras_compat import keras
from dgst_tf.core.layer_kinds import CONV_TYPES  # noqa: F401  (planning imports it from here)
from dgst_tf.core.layer_kinds import (channels_for_ratio, input_channels, is_conv, is_dense,
                                      is_pointwise, is_unsupported_conv, kernel_of,
                                      weights_per_channel)

MODES = ("frozen", "bias", "weights")


class SchemeError(ValueError):
    """An update scheme that does not fit the model (names the layer and value at fault)."""


@dataclasses.dataclass(frozen=True)
class LayerUpdate:
    """What one layer updates: ``mode`` in MODES and, for ``weights``, ``ratio`` in (0, 1]
    and optionally ``channels``, the whole number of input channels kept (it wins over the
    ratio; the ratio then only labels it, e.g. in a backward_config).

        LayerUpdate("weights", 0.25).kept_channels(layer)          # round(0.25 * C_in)
        LayerUpdate("weights", 0.25, channels=7).kept_channels(layer)   # 7
    """

    mode: str = "frozen"
    ratio: float = 0.0
    channels: int | None = None

    @classmethod
    def parse(cls, value, layer: str = "?") -> "LayerUpdate":
        """From a LayerUpdate, "frozen", "bias", a ratio, or {"mode":..., "ratio":...,
        "channels":...} ("channels" optional)."""
        if isinstance(value, LayerUpdate):
            update = value
        elif isinstance(value, str):
            update = cls(value, 1.0 if value == "weights" else 0.0)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            update = cls("weights", float(value))
        elif isinstance(value, Mapping):
            channels = value.get("channels")
            update = cls(value.get("mode", "weights"), float(value.get("ratio", 0.0)),
                         None if channels is None else _whole_channels(channels, layer))
        else:
            raise SchemeError(f"layer {layer!r}: cannot read update {value!r}")
        update.check(layer)
        return update

    def check(self, layer: str) -> None:
        if self.mode not in MODES:
            raise SchemeError(f"layer {layer!r}: mode must be one of {MODES}, got {self.mode!r}")
        if self.mode == "weights" and not 0.0 < self.ratio <= 1.0:
            raise SchemeError(
                f"layer {layer!r}: weight update ratio must be in (0, 1], got {self.ratio}")
        if self.channels is None:
            return
        if self.mode != "weights":
            raise SchemeError(f"layer {layer!r}: channels only apply to a weight update, not to "
                              f"mode {self.mode!r}")
        if isinstance(self.channels, bool) or not isinstance(self.channels, int) \
                or self.channels < 1:
            raise SchemeError(f"layer {layer!r}: channels must be a whole number >= 1, got "
                              f"{self.channels!r}")

    def kept_channels(self, layer) -> int:
        """Input channels of ``layer`` (depthwise: its channels) this update trains: 0 unless
        it updates weights, else ``channels`` if set, else ``channels_for_ratio(ratio, C)``
        (`dgst_tf.core.geometry`)."""
        if not self.updates_weights:
            return 0
        if self.channels is not None:
            return self.channels
        return channels_for_ratio(self.ratio, input_channels(layer))

    @property
    def updates_bias(self) -> bool:
        return self.mode in ("bias", "weights")

    @property
    def updates_weights(self) -> bool:
        return self.mode == "weights"

    def get_config(self) -> dict:
        config = {"mode": self.mode, "ratio": self.ratio}
        if self.channels is not None:
            config["channels"] = self.channels
        return config


def _whole_channels(value, layer: str) -> int:
    """A channel count read from JSON: an int, or a float with no fractional part."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise SchemeError(f"layer {layer!r}: channels must be a whole number, got {value!r}")


def conv_layers(model: keras.Model) -> list:
    """Conv2D and DepthwiseConv2D layers in execution order (tiny-training's conv index).

    Raises SchemeError naming any convolution type dgst-tf does not support.
    """
    check_functional(model, "conv_layers")
    head = head_dense_layers(model)  # 1x1 convs of the pooled vector count as Dense
    layers = []
    for node in nodes_in_order(model):
        layer = node.layer
        if is_unsupported_conv(layer):
            raise SchemeError(f"layer {layer.name!r} ({type(layer).__name__}) is not supported; "
                              "supported: Conv2D, DepthwiseConv2D, Dense")
        if is_conv(layer) and layer not in layers and layer.name not in head:
            layers.append(layer)
    return layers


def classifier_layer(model: keras.Model) -> keras.layers.Layer:
    """The classifier: a Dense layer or a 1x1 Conv2D of the pooled map, producing the model
    output (logits, or their softmax); `dgst_tf.core.classifier.find_classifier` decides."""
    check_functional(model, "classifier_layer")
    try:
        return find_classifier(model).layer
    except ClassifierError as error:
        raise SchemeError(str(error)) from None


def updatable_layers(model: keras.Model) -> list:
    """Convs and Dense layers (the head's 1x1 convs among them) in execution order,
    classifier last."""
    classifier = classifier_layer(model)
    head = head_dense_layers(model)
    dense = [n.layer for n in nodes_in_order(model)
             if (is_dense(n.layer) or n.layer.name in head) and n.layer is not classifier]
    order = {n.layer.name: i for i, n in enumerate(nodes_in_order(model))}
    return sorted(conv_layers(model) + dense, key=lambda l: order[l.name]) + [classifier]


def kept_channels(layer, update) -> int:
    """How many input channels of ``layer`` an update keeps: the one rule every stage uses.

    ``update``: a `LayerUpdate` (`LayerUpdate.kept_channels`: its ``channels`` if set, else
    its ratio's count; 0 for bias/frozen) or a bare ratio (``channels_for_ratio``: at least
    one channel).

        kept_channels(layer, scheme.update_for(layer.name))
        kept_channels(layer, 0.25)
    """
    if isinstance(update, LayerUpdate):
        return update.kept_channels(layer)
    return channels_for_ratio(float(update), input_channels(layer))


class UpdateScheme:
    """Per-layer update modes; the classifier is always fully trained."""

    def __init__(self, layers: Mapping[str, object] | None = None, name: str = "custom"):
        self.name = name
        self.layers = {k: LayerUpdate.parse(v, k) for k, v in (layers or {}).items()}
        self.layers = {k: v for k, v in self.layers.items() if v.mode != "frozen"}

    # -- serialisation ---------------------------------------------------------------
    def get_config(self) -> dict:
        return {"name": self.name,
                "layers": {k: v.get_config() for k, v in self.layers.items()}}

    @classmethod
    def from_config(cls, config: dict) -> "UpdateScheme":
        unknown = set(config) - {"name", "layers"}
        if unknown:
            raise SchemeError(f"unknown scheme fields {sorted(unknown)}")
        return cls(config.get("layers", {}), name=config.get("name", "custom"))

    def save(self, path) -> None:
        """Write the scheme as JSON, atomically (the folder must exist)."""
        write_json_atomically(path, self.get_config(), make_parents=False)

    @classmethod
    def load(cls, path) -> "UpdateScheme":
        try:
            with open(path) as f:
                config = json.load(f)
        except json.JSONDecodeError as err:
            raise SchemeError(f"scheme file {os.fspath(path)!r} is not valid JSON: {err}") from err
        return cls.from_config(config)

    def __eq__(self, other):
        return isinstance(other, UpdateScheme) and self.layers == other.layers

    def __repr__(self):
        return f"UpdateScheme({self.name!r}, {len(self.layers)} layers)"

    # -- queries -----------------------------------------------------------------------
    def validate(self, model: keras.Model) -> None:
        """Raise SchemeError if a layer is unknown, not conv/dense, or the classifier."""
        candidates = {layer.name: layer for layer in updatable_layers(model)}
        classifier = classifier_layer(model).name
        for name, update in self.layers.items():
            if name == classifier:
                raise SchemeError(f"layer {name!r} is the classifier, which is always trained "
                                  "in full; leave it out of the scheme")
            if name not in candidates:
                kind = (type(model.get_layer(name)).__name__
                        if name in {l.name for l in model.layers} else None)
                raise SchemeError(
                    f"layer {name!r} " + (f"is a {kind}, not a Conv2D/DepthwiseConv2D/Dense "
                                          "layer" if kind else f"is not in model {model.name!r}"))
            available = input_channels(candidates[name])
            if update.channels is not None and update.channels > available:
                raise SchemeError(f"layer {name!r} keeps {update.channels} channels but has "
                                  f"only {available}")

    def kept_channels(self, layer) -> int:
        """Input channels of ``layer`` whose weights a step updates (`kept_channels`)."""
        return self.update_for(layer.name).kept_channels(layer)

    def update_for(self, layer_name: str) -> LayerUpdate:
        return self.layers.get(layer_name, LayerUpdate())

    def first_updated_layer(self, model: keras.Model) -> str:
        """Name of the earliest layer with anything to update (backprop stops there)."""
        for layer in updatable_layers(model):
            if layer.name in self.layers or layer is classifier_layer(model):
                return layer.name
        raise AssertionError("unreachable: the classifier is always updated")

    def updated_weight_count(self, model: keras.Model) -> int:
        """Conv weights updated per step (classifier and biases excluded)."""
        total = 0
        for layer in conv_layers(model):
            update = self.update_for(layer.name)
            if update.updates_weights:
                total += update.kept_channels(layer) * weights_per_channel(layer)
        return total

    def updated_weight_fraction(self, model: keras.Model) -> float:
        """Fraction of all conv weights a step updates."""
        total = sum(int(kernel_of(l).shape.num_elements()) for l in conv_layers(model))
        return self.updated_weight_count(model) / total

    # -- construction ------------------------------------------------------------------
    @classmethod
    def full(cls, model: keras.Model) -> "UpdateScheme":
        """Full fine-tuning: every conv/dense layer, all weights and biases."""
        return cls({l.name: 1.0 for l in updatable_layers(model)[:-1]}, name="full")

    @classmethod
    def last_layer(cls, model: keras.Model) -> "UpdateScheme":
        """Only the classifier."""
        return cls({}, name="last_layer")

    @classmethod
    def bias_only(cls, model: keras.Model) -> "UpdateScheme":
        """Every bias, plus the classifier (TinyTL's bias-only baseline)."""
        return cls({l.name: "bias" for l in updatable_layers(model)[:-1]}, name="bias_only")

    @classmethod
    def from_backward_config(cls, model: keras.Model, n_bias_update: int,
                             manual_weight_idx="", weight_update_ratio="",
                             name: str = "backward_config", **ignored) -> "UpdateScheme":
        """From tiny-training's fields (conv indices count Conv2D/Depthwise from the input).

        ``manual_weight_idx`` / ``weight_update_ratio``: "36-39-40" strings or lists; a
        ratio of 0 means bias only. Every weight layer must be among the last
        ``n_bias_update`` convs. Extra fields (``weight_select_criteria``...) are ignored here;
        the selection callbacks take the criterion.
        """
        convs = conv_layers(model)
        idx = _int_list(manual_weight_idx)
        ratios = _float_list(weight_update_ratio)
        if len(idx) != len(ratios):
            raise SchemeError(f"manual_weight_idx {idx} and weight_update_ratio {ratios} "
                              "differ in length")
        if not 0 <= int(n_bias_update) <= len(convs):
            raise SchemeError(f"n_bias_update={n_bias_update} outside [0, {len(convs)}] "
                              f"(model {model.name!r} has {len(convs)} convs)")
        first_bias = len(convs) - int(n_bias_update)
        layers = {l.name: "bias" for l in convs[first_bias:]}
        for i, r in zip(idx, ratios):
            if not 0 <= i < len(convs):
                raise SchemeError(f"manual_weight_idx {i} outside [0, {len(convs)})")
            if i < first_bias:
                raise SchemeError(
                    f"conv {i} ({convs[i].name!r}) has its weights updated but is not among the "
                    f"last n_bias_update={n_bias_update} convs (first bias-updated conv is "
                    f"{first_bias}): a weight-updated layer must also update its bias")
            if r > 0:
                layers[convs[i].name] = LayerUpdate.parse(r, convs[i].name)
        return cls(layers, name=name)

    def to_backward_config(self, model: keras.Model) -> dict:
        """tiny-training's fields for this scheme (on ``model``'s conv indexing)."""
        self.validate(model)
        convs = conv_layers(model)
        updated = [i for i, l in enumerate(convs) if l.name in self.layers]
        n_bias = len(convs) - min(updated) if updated else 0
        gaps = [convs[i].name for i in range(len(convs) - n_bias, len(convs))
                if not self.update_for(convs[i].name).updates_bias]
        if gaps:
            raise SchemeError(f"not expressible as a backward_config: convs {gaps} are frozen "
                              "between bias-updated convs")
        weights = [(i, self.layers[l.name].ratio) for i, l in enumerate(convs)
                   if self.update_for(l.name).updates_weights]
        return {
            "n_bias_update": n_bias,
            "manual_weight_idx": "-".join(str(i) for i, _ in weights),
            "weight_update_ratio": "-".join(_fmt_ratio(r) for _, r in weights),
        }

    @classmethod
    def for_target_fraction(cls, model: keras.Model, layers, target: float,
                            bias_layers=None, name: str = "target_fraction") -> "UpdateScheme":
        """Weight-update ``layers`` at about one ratio so at most ``target`` of conv weights
        update per step (``target`` itself up to whole channels).

        Each layer keeps ``floor(ratio * C_in)`` channels; channels left over in the budget
        go one at a time to the layers nearest the output. The scheme stores those whole
        counts (``LayerUpdate.channels``, with ``ratio = channels / C_in``). ``bias_layers``
        (default: every conv from the first of ``layers`` on) get biases.

            UpdateScheme.for_target_fraction(model, ["block_15_expand", "block_16_expand"], 0.02)
        """
        convs = conv_layers(model)
        by_name = {l.name: l for l in convs}
        missing = [n for n in layers if n not in by_name]
        if missing:
            raise SchemeError(f"layers {missing} are not convs of model {model.name!r}")
        total = sum(int(kernel_of(l).shape.num_elements()) for l in convs)
        channels = {n: input_channels(by_name[n]) for n in layers}
        per_channel = {n: weights_per_channel(by_name[n]) for n in layers}
        selected = sum(channels[n] * per_channel[n] for n in layers)
        ratio = min(1.0, target * total / selected)
        kept = {n: max(1, math.floor(ratio * channels[n])) for n in layers}
        budget = target * total - sum(kept[n] * per_channel[n] for n in layers)
        for n in reversed(list(layers)):
            if kept[n] < channels[n] and per_channel[n] <= budget:
                kept[n] += 1
                budget -= per_channel[n]
        if bias_layers is None:
            first = min(convs.index(by_name[n]) for n in layers)
            bias_layers = [l.name for l in convs[first:]]
        spec = {n: "bias" for n in bias_layers}
        spec.update({n: LayerUpdate("weights", kept[n] / channels[n], kept[n]) for n in layers})
        return cls(spec, name=name)

    @classmethod
    def stage_aware(cls, model: keras.Model, stage_ratios: Mapping[int, float],
                    pointwise_only: bool = True, name: str = "stage_aware") -> "UpdateScheme":
        """Per-stage weight ratios, front stages frozen (DGSU's stage-aware schedule).

        Stages are runs of convs with the same output resolution (`conv_stages`), indexed
        from the input; negative indices count from the output (-1 = last stage). Convs of
        a stage in ``stage_ratios`` update their weights at its ratio (only 1x1 convs if
        ``pointwise_only``); every conv from the first updated one on updates its bias;
        earlier stages are frozen.

            UpdateScheme.stage_aware(model, {-2: 0.125, -1: 0.25})
        """
        stages = conv_stages(model)
        chosen = {}
        for index, ratio in stage_ratios.items():
            if not -len(stages) <= index < len(stages):
                raise SchemeError(f"stage {index} outside the model's {len(stages)} stages")
            chosen[index % len(stages)] = ratio
        if not chosen:
            raise SchemeError("stage_ratios names no stage")
        spec = {}
        for i, stage in enumerate(stages):
            if i < min(chosen):
                continue
            for layer in stage:
                if i in chosen and (is_pointwise(layer) or not pointwise_only):
                    spec[layer.name] = chosen[i]
                else:
                    spec[layer.name] = "bias"
        return cls(spec, name=name)


def conv_stages(model: keras.Model) -> list[list]:
    """Convs grouped into stages: consecutive convs with the same output resolution."""
    stages, last = [], None
    for layer in conv_layers(model):
        resolution = tuple(layer.output_shape[1:3])
        if resolution != last:
            stages.append([])
            last = resolution
        stages[-1].append(layer)
    return stages


def _int_list(value) -> list[int]:
    if isinstance(value, str):
        return [int(v) for v in value.split("-") if v != ""]
    return [int(v) for v in value]


def _float_list(value) -> list[float]:
    if isinstance(value, str):
        return [float(v) for v in value.split("-") if v != ""]
    return [float(v) for v in value]


def _fmt_ratio(r: float) -> str:
    return str(int(r)) if float(r).is_integer() else repr(float(r))


def total_conv_weights(model: keras.Model) -> int:
    return sum(int(kernel_of(l).shape.num_elements()) for l in conv_layers(model))


__all__ = ["UpdateScheme", "LayerUpdate", "SchemeError", "conv_layers", "classifier_layer",
           "updatable_layers", "kernel_of", "kept_channels", "weights_per_channel", "input_channels",
           "total_conv_weights", "conv_stages"]
