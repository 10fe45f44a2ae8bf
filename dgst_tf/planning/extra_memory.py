"""Lin et al.'s "extra memory" label (Lin et al. 2022, "On-Device Training Under 256KB
Memory"), exactly as tiny-training computes it (``nelem_saved_for_backward`` in
github.com/mit-han-lab/tiny-training), in bits:

- every bias-updated conv: its 1-bit output mask ``C_out*H_out*W_out`` plus the int32 bias
  ``32*C_out``;
- a weight-updated conv with k kept input channels also: the saved input ``H_in*W_in*k*8``
  and the updated weights ``C_out*k*K*K*8`` (depthwise ``k*K*K*8``);
- the classifier input at 8 bits per element;
- nothing for momentum or the classifier weights.

``H_in, W_in`` is the unpadded input (PyTorch pads inside the conv). A non-classifier Dense
is a 1x1 conv on a 1x1 map::

    from dgst_tf.planning.extra_memory import extra_memory_label

    label = extra_memory_label(graph, convs, classifier)   # graph: `analyse_graph`
    label.bits(["conv_a", "conv_b"], {"conv_b": 24}) / 8 / 1024   # KB, conv_b keeps 24 channels
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Mapping

from dgst_tf.core.layer_kinds import is_dense, weights_per_channel
from dgst_tf.planning.memory_graph import MemoryGraph, bias_count

__all__ = ["ExtraMemoryLabel", "extra_memory_label"]


@dataclasses.dataclass(frozen=True)
class ExtraMemoryLabel:
    """Per layer: ``bias_bits`` (output mask + int32 bias) and ``channel_bits`` (saved input +
    weights per kept input channel); ``classifier_bits`` (its saved input, always counted)."""

    bias_bits: dict
    channel_bits: dict
    classifier_bits: int

    def layer_bits(self, name: str, kept_channels: int = 0) -> int:
        """One layer's bits: bias-updated (``kept_channels`` 0) or weight-updated.
        Raises KeyError for a layer that is not a conv or non-classifier Dense."""
        return self.bias_bits[name] + kept_channels * self.channel_bits[name]

    def bits(self, bias_layers: Iterable[str], weights: Mapping[str, int]) -> int:
        """The label of a scheme: biases of ``bias_layers`` and ``weights`` ({layer: kept
        channels}; weight-updated layers also update their bias), classifier included."""
        names = set(bias_layers) | set(weights)
        return self.classifier_bits + sum(self.layer_bits(n, weights.get(n, 0)) for n in names)


def extra_memory_label(graph: MemoryGraph, convs: list, classifier) -> ExtraMemoryLabel:
    """The label's per-layer tables for the convs and Dense layers of an analysed graph."""
    by_layer = graph.by_layer
    dense = [s.layer for s in graph.steps if is_dense(s.layer)]
    bias_bits, channel_bits = {}, {}
    for layer in convs + dense:
        if layer is classifier:
            continue
        step = by_layer[layer.name]
        out = graph.values[step.output]
        inp = graph.values[step.inputs[0]]
        in_spatial = inp.elements // inp.shape[-1]
        bias_bits[layer.name] = out.elements * 1 + bias_count(layer) * 32
        channel_bits[layer.name] = (in_spatial + weights_per_channel(layer)) * 8
    classifier_input = graph.values[by_layer[classifier.name].inputs[0]]
    return ExtraMemoryLabel(bias_bits, channel_bits, classifier_input.elements * 8)
