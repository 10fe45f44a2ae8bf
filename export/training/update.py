"""The update ops of the training step: in-place SGD with Quantization-Aware Scaling
(``DGST_SGD_QAS_UPDATE``, Lin et al. 2022) of a layer's bias and of its kept weights.

    ops = [bias_update(graph, op, bias_grad, weight_scale, dy_scale),
           weight_update(graph, layer, op, weight_grad, weight_scale, dy_scale)]
"""
from __future__ import annotations

import numpy as np

from dgst_tf.export.tflite_builder import int32_options
from dgst_tf.export.training.plan import TrainedLayer
from dgst_tf.export.training.state import TrainingGraph

__all__ = ["SGD_WEIGHTS", "SGD_DEPTHWISE_WEIGHTS", "SGD_BIAS", "bias_update", "weight_update"]

# the first option of DGST_SGD_QAS_UPDATE: what the updated tensor is
SGD_WEIGHTS, SGD_DEPTHWISE_WEIGHTS, SGD_BIAS = 0, 1, 2


def _options(graph: TrainingGraph, op, target_kind: int) -> bytes:
    input_scale, _ = graph.editor.quantization(int(op.inputs[0]))
    return int32_options(target_kind, float(graph.settings.learning_rate),
                         float(input_scale[0]))


def bias_update(graph: TrainingGraph, op, bias_grad: int, weight_scale: int, dy_scale: int):
    """The SGD op updating the bias variable of weight op ``op`` from its int32 gradient."""
    return graph.editor.custom_op("DGST_SGD_QAS_UPDATE",
                                  [int(op.inputs[2]), bias_grad, -1, weight_scale, dy_scale],
                                  [], _options(graph, op, SGD_BIAS))


def weight_update(graph: TrainingGraph, layer: TrainedLayer, op, weight_grad: int,
                  weight_scale: int, dy_scale: int):
    """The SGD op updating the kept input channels of ``layer``'s weights: in the full
    kernel variable, or in the RAM copy of the kept channels (kept-weights-in-RAM)."""
    editor = graph.editor
    depthwise = layer.kind == "depthwise"
    target, kept_tensor, scales_tensor = int(op.inputs[1]), layer.kept_tensor, weight_scale
    if layer.compact >= 0:  # update the RAM copy of the kept channels only
        target = layer.compact
        count = len(layer.kept)
        kept_tensor = editor.add_tensor(f"{layer.name}/compact_channels", (count,), np.int32,
                                        data=np.arange(count, dtype=np.int32))
        if depthwise:  # its scales are per (kept) channel
            weight_scales, _ = editor.quantization(layer.flash)
            scales_tensor = editor.add_tensor(
                f"{layer.name}/kept_weight_scale", (count,), np.float32,
                data=weight_scales[layer.kept].astype(np.float32))
    return editor.custom_op("DGST_SGD_QAS_UPDATE",
                            [target, weight_grad, kept_tensor, scales_tensor, dy_scale], [],
                            _options(graph, op, SGD_DEPTHWISE_WEIGHTS if depthwise
                                     else SGD_WEIGHTS))
