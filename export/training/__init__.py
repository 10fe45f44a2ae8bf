"""Training export: one on-device training step of a sparse update scheme as a `.tflite`.

`export_training` converts the model to full int8 (`export_int8`), then edits that graph into
a training step whose ONE Invoke takes one int8 image and an int32 label and does:

- the forward pass with the builtin int8 ops, its convolutions as ``DGST_CONV2D`` (the same
  arithmetic, requantization constants in flash); the trainable weights and biases are variable
  tensors in the arena, copied once from read-only constants by ``DGST_VARIABLE_INIT``;
  the forward pass also keeps what the backward pass needs: 1-bit ReLU masks
  (``DGST_RELU_MASK``) and only the kept input channels of weight-updated layers
  (``DGST_GATHER_CHANNELS``);
- the loss gradient (``DGST_SOFTMAX_XENT_GRAD``), then backward only as far as the first
  updated layer: per layer ``DGST_QUANTIZE_GRAD`` (int8 error signal, mask applied),
  ``DGST_BIAS_GRAD``, ``DGST_CONV2D_WEIGHT_GRAD`` / ``DGST_DEPTHWISE_WEIGHT_GRAD`` for the
  kept channels, ``DGST_*_INPUT_GRAD`` (before the update), builtin MUL for global average
  pooling and ADD where residual gradients meet, ``DGST_ACTIVATION_GRAD`` through each swish,
  hard-swish or sigmoid (its int8 input kept by the forward pass, its derivative a 256-entry
  table);
- in-place SGD with Quantization-Aware Scaling (``DGST_SGD_QAS_UPDATE``).

Outputs: the loss (float32 [1]), the int8 logits (before the update) and every trainable
tensor (after it). A JSON manifest beside the file describes inputs, outputs, layers and
the kept channels; `train_tflm` checks it against the file and runs N steps in TFLM in a
child process; `write_inference_model` writes the updated weights back into an inference
`.tflite`::

    from dgst_tf.export.training import export_training, train_tflm, write_inference_model

    info = export_training(model, UpdateScheme({"block_16_project": 0.25}), images,
                           "train.tflite", learning_rate=0.05)   # + train.json
    run = train_tflm("train.tflite", images[:100], labels[:100])
    run.losses, run.arena_bytes
    write_inference_model("train.tflite", run.params, "updated.tflite")

Modules, in the order the export runs them: `plan` (which op is which layer, what the step
updates, the supported-graph check), `state` (the graph being built), `schedule` (the step
counter and the ``layers_per_step`` layer schedule), `forward` (PAD folding, variables, what
the forward pass keeps), `backward` (gradient ops), `update` (SGD ops), `flash_requant` (the
convolutions as ``DGST_CONV2D``, requantization constants in flash), `offline_plan` (TFLM's
offline memory plan with the in-place ops), `manifest` (writing and checking the JSON),
`builder` (`export_training`), `running` (TFLM runs and writing updated weights back).
"""
from dgst_tf.export.training.builder import TrainingExport, export_training
from dgst_tf.export.training.manifest import (MANIFEST_FORMAT, MANIFEST_VERSION,
                                              TrainingManifestError, load_manifest,
                                              manifest_path_for)
from dgst_tf.export.training.plan import TrainingExportError
from dgst_tf.export.training.running import (TrainingRun, initial_params, run_inference_tflm,
                                             train_tflm, write_inference_model)

__all__ = ["export_training", "TrainingExport", "TrainingExportError", "TrainingManifestError",
           "train_tflm", "TrainingRun", "load_manifest", "write_inference_model",
           "initial_params", "run_inference_tflm",
           "manifest_path_for", "MANIFEST_FORMAT", "MANIFEST_VERSION"]
