"""The update ops of the training step: in-place SGD with Quantization-Aware Scaling
(``DGST_SGD_QAS_UPDATE``, Lin et al. 2022) of a layer's bias and of its kept weights.

    ops = [bias_update(graph, op, bias_grad, weight_scale, dy_scale),
           weight_update(graph, layer, op, weight_grad, weight_scale, dy_scale)]
    advance_step(graph)  # once all updates are in: the last one counts the step

With ``rounding="stochastic"`` (`ExportSettings`) the weight updates round stochastically
(unbiased, so steps below one LSB are not lost; the C core's header says why) with u from a
counter-based hash of (seed, `layer_stream` of the layer, the step, the element's index in
the full kernel): one shared int32 variable ``sgd/step`` counts the steps (4 bytes of arena,
counted by the memory model), the same numbers `QuantizationAwareScalingSGD` draws. Biases
round to nearest: their LSB is s_x times finer than the weights', nothing is lost. Under a
layer schedule (`schedule`) the weight update of a layer reads ``sgd/step`` too and leaves
the weights alone at the steps the layer is inactive.
"""
from __future__ import annotations

import numpy as np

from dgst_tf.core.tflite_builder import int32_options
from dgst_tf.export.training.plan import TrainedLayer
from dgst_tf.export.training.schedule import schedule_words, step_counter
from dgst_tf.export.training.state import TrainingGraph
from dgst_tf.training.qas import layer_stream

__all__ = ["SGD_WEIGHTS", "SGD_DEPTHWISE_WEIGHTS", "SGD_BIAS", "ROUNDING_CODES",
           "bias_update", "weight_update", "advance_step"]

# the first option of DGST_SGD_QAS_UPDATE: what the updated tensor is
SGD_WEIGHTS, SGD_DEPTHWISE_WEIGHTS, SGD_BIAS = 0, 1, 2
# option word 4 of DGST_SGD_QAS_UPDATE
ROUNDING_CODES = {"nearest": 0, "stochastic": 1}
_STEP_INPUT = 5  # the step counter input of a stochastic or scheduled update
_ADVANCE_WORD = 8  # option word: 1 on the op that counts the step


def _int32(value: int) -> int:
    """A uint32 as the int32 with the same bits."""
    value &= 0xFFFFFFFF
    return value - 2**32 if value >= 2**31 else value


def _options(graph: TrainingGraph, op, target_kind: int, stream: int | None = None,
             schedule: tuple = ()) -> bytes:
    """The options; with ``stream`` (stochastic rounding) or a ``schedule`` the 5 rounding
    words too (advance_step 0: `advance_step` sets it), then the schedule words."""
    input_scale, _ = graph.editor.quantization(int(op.inputs[0]))
    words = [target_kind, float(graph.settings.learning_rate), float(input_scale[0])]
    if stream is not None:
        index_c_in = graph.editor.shape(int(op.inputs[1]))[-1]  # of the full kernel
        words += [ROUNDING_CODES["stochastic"], _int32(graph.settings.seed), _int32(stream),
                  int(index_c_in), 0]
    elif schedule:
        words += [ROUNDING_CODES["nearest"], 0, 0, 0, 0]
    return int32_options(*words, *schedule)


def bias_update(graph: TrainingGraph, op, bias_grad: int, weight_scale: int, dy_scale: int):
    """The SGD op updating the bias variable of weight op ``op`` from its int32 gradient."""
    return graph.editor.custom_op("DGST_SGD_QAS_UPDATE",
                                  [int(op.inputs[2]), bias_grad, -1, weight_scale, dy_scale],
                                  [], _options(graph, op, SGD_BIAS))


def weight_update(graph: TrainingGraph, layer: TrainedLayer, op, weight_grad: int,
                  weight_scale: int, dy_scale: int, chunk: slice | None = None):
    """The SGD op updating the kept input channels ``chunk`` (positions in ``layer.kept``;
    None: all) of ``layer``'s weights: in the full kernel variable, or in the RAM copy of
    the kept channels (kept-weights-in-RAM)."""
    editor = graph.editor
    depthwise = layer.kind == "depthwise"
    chunk = chunk or slice(0, len(layer.kept))
    whole = chunk.stop - chunk.start == len(layer.kept)
    suffix = "" if whole else f"_{chunk.start}"
    target, kept_tensor, scales_tensor = int(op.inputs[1]), layer.kept_tensor, weight_scale
    if not whole and layer.compact < 0:
        kept_tensor = editor.add_tensor(f"{layer.name}/update_kept{suffix}",
                                        (chunk.stop - chunk.start,), np.int32,
                                        data=layer.kept[chunk])
    if layer.compact >= 0:  # update the RAM copy of the kept channels only
        target = layer.compact
        count = chunk.stop - chunk.start
        kept_tensor = editor.add_tensor(f"{layer.name}/compact_channels{suffix}", (count,),
                                        np.int32,
                                        data=np.arange(chunk.start, chunk.stop, dtype=np.int32))
        if depthwise:  # its scales are per (kept) channel, indexed by the compact channel
            weight_scales, _ = editor.quantization(layer.flash)
            scales_tensor = editor.add_tensor(
                f"{layer.name}/kept_weight_scale{suffix}", (len(layer.kept),), np.float32,
                data=weight_scales[layer.kept].astype(np.float32))
    inputs = [target, weight_grad, kept_tensor, scales_tensor, dy_scale]
    kind = SGD_DEPTHWISE_WEIGHTS if depthwise else SGD_WEIGHTS
    schedule = schedule_words(layer)
    if graph.settings.rounding == "nearest":
        return editor.custom_op("DGST_SGD_QAS_UPDATE", inputs + (
            [step_counter(graph), -1] if schedule else []), [],
            _options(graph, op, kind, schedule=schedule))
    index_channels = -1  # the kept channels are the full kernel's
    if layer.compact >= 0:
        index_channels = editor.add_tensor(f"{layer.name}/kept_in_kernel{suffix}", (count,),
                                           np.int32,
                                           data=np.asarray(layer.kept[chunk], np.int32))
    return editor.custom_op("DGST_SGD_QAS_UPDATE",
                            inputs + [step_counter(graph), index_channels], [],
                            _options(graph, op, kind, stream=layer_stream(layer.name),
                                     schedule=schedule))


def advance_step(graph: TrainingGraph) -> None:
    """Let the last weight update reading the step counter increment it (every reader --
    selections, weight gradients, updates -- runs before it and reads the same step), also
    at a step its layer is inactive; nothing to do without a counter."""
    ops = [op for op in graph.backward_ops
           if len(op.inputs) > _STEP_INPUT and op.inputs[_STEP_INPUT] == graph.sgd_step >= 0]
    if ops:
        words = np.frombuffer(bytes(ops[-1].customOptions), "<i4").copy()
        words[_ADVANCE_WORD] = 1
        ops[-1].customOptions = list(words.astype("<i4").tobytes())
