"""`dgst device`: the whole flow on the device's terms into one folder, resumable.

    dgst device                                   # Fashion-MNIST, MobileNetV2-1.0 pruned to fit, 64 px
    dgst device --dataset cifar10 --width 1.0 --image-size 128 --output-dir runs/c10
    dgst device --dataset cifar10 --stream --augment --lr-schedule cosine --evaluate-on validation
    dgst device --model my_cnn.keras --image-size 96 --flash-budget 512KB --sram-budget 128KB

prune (deployable training .tflite + firmware allowance <= --flash-budget) -> plan (DGSU
scheme whose TFLM arena <= --sram-budget) -> batch-1 int8 QAS DGSU training -> TFLM check
(identical to the Keras int8 simulation) -> test accuracy of the adapted int8 model in TFLM,
report.json + report.png (`dgst_tf.jobs.device_pipeline`). Rerunning the same command skips
the finished stages; a budget that cannot be met stops the run naming the stage. A model
file (``--model``) is checked before anything is written (input size, layers, classes, the
DGSU scheme on it); a refusal names the file and the layer or value.
"""
from __future__ import annotations

import argparse
import dataclasses

_HELP = {
    "output_dir": "the run's folder (stages resume from it)",
    "weights": "imagenet (offline torchvision checkpoint) or none (random init)",
    "flash_budget": "the deployable training .tflite + firmware allowance must fit this",
    "sram_budget": "TFLM's arena of one training step must fit this",
    "firmware_allowance": "bytes of flash kept for TFLM and the firmware (default: "
                          "dgst_tf.jobs.flash_budget.FIRMWARE_ALLOWANCE_BYTES)",
    "blocks": "DGSU updates the last N blocks at most (fewer if SRAM is short)",
    "min_blocks": "DGSU updates at least the last N blocks: pruning goes as far as SRAM "
                  "needs for them",
    "target_fraction": "fraction of conv weights updated per step",
    "layers_per_step": "DGSU's layer schedule: update N layers' weights per step",
    "check_steps": "TFLM steps compared with the Keras int8 simulation",
    "lr_schedule": "cosine: decay the learning rate to 0 over the training stage (Keras; "
                   "the exported step keeps a constant rate)",
    "stream": "stream the training images from a 10%% hold-out split of the train set "
              "(large datasets) instead of holding them in memory",
    "augment": "pad-crop + flip of the streamed training images (needs --stream)",
    "evaluate_on": "validation: score the adapted model on the validation images and never "
                   "read the test set (choosing settings)",
}
# fields whose default is None: their type
_OPTIONAL_TYPES = {"data_path": str, "firmware_allowance": int,
                   "layers_per_step": int}


def add_device_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``device`` sub-command to ``dgst``'s sub-parsers; returns its parser.

        sub = parser.add_subparsers(dest="command")
        add_device_parser(sub)
    """
    from dgst_tf.cli.common_args import add_config_arguments
    from dgst_tf.cli.model_args import MODEL_FIELDS, add_model_arguments
    from dgst_tf.jobs.device_pipeline import LR_SCHEDULES, SPLITS, DeviceConfig

    device = subparsers.add_parser(
        "device", help="prune, plan, int8 DGSU training, TFLM check and evaluation",
        description=__doc__.splitlines()[0])
    defaults = DeviceConfig()
    add_model_arguments(device, width=defaults.width, image_size=defaults.image_size,
                        weights=defaults.weights, weights_help=_HELP["weights"], classes=False)
    add_config_arguments(device, DeviceConfig, _HELP, optional_types=_OPTIONAL_TYPES,
                         choices={"lr_schedule": LR_SCHEDULES, "evaluate_on": SPLITS},
                         skip=MODEL_FIELDS)
    device.add_argument("--verbose", type=int, default=1,
                        help="0 quiet, 1 stages and the train stage's progress (a bar with "
                             "its ETA in a terminal, a line per epoch in a log)")
    device.set_defaults(func=run_device)
    return device


def _figures(report: dict) -> list[str]:
    """The device figures: flash, SRAM, accuracy, against the budgets."""
    prune, plan = report["prune"], report["plan"]
    train, evaluate = report["train"], report["evaluate"]
    flash = plan["file_bytes"] + plan["allowance_bytes"]
    kb = 1024
    how = ("pruned" if prune["pruned"] else "no pruning needed") + (
        f" (unpruned file {prune['unpruned_deployable_bytes'] / kb:.1f} KB)")
    return [
        f"flash          deployable training .tflite {plan['file_bytes']:,} B + allowance "
        f"{plan['allowance_bytes']:,} B = {flash / kb:.1f} KB <= budget "
        f"{plan['flash_budget_bytes'] / kb:.0f} KB; {how}",
        f"SRAM           TFLM arena {plan['arena_bytes'] / kb:.1f} KB <= budget "
        f"{plan['sram_budget_bytes'] / kb:.0f} KB (analytic {plan['analytic_bytes'] / kb:.1f}"
        f" KB; DGSU over the last {plan['blocks']} blocks, dynamic on-device selection)",
        f"training       batch 1, int8 QAS, {100 * train['max_updated_fraction']:.2f}% of conv "
        f"weights per step at most, {train['train_examples']} images x "
        f"{len(train['loss_per_epoch'])} epochs",
        f"TFLM check     {report['check']['steps']} steps from the trained state identical to "
        f"the Keras int8 simulation (channels, int8 weights, int32 biases)",
        f"int8 accuracy  {100 * evaluate['accuracy']:.2f}% on "
        f"{evaluate[evaluate['evaluated_on'] + '_examples']} {evaluate['evaluated_on']} images "
        f"(adapted int8 model in TFLM; logits equal the Keras simulation's)",
    ]


def run_device(args) -> int:
    """Run ``dgst device`` from parsed arguments (0 on success)."""
    from dgst_tf.cli.model_args import model_settings
    from dgst_tf.core import runtime
    from dgst_tf.jobs.device_pipeline import DeviceConfig, run_device_pipeline

    runtime.limit_threads()
    fields = {f.name for f in dataclasses.fields(DeviceConfig)}
    options = {k: v for k, v in vars(args).items() if k in fields} | model_settings(args)
    report = run_device_pipeline(DeviceConfig(**options), verbose=args.verbose)
    print("\n".join(_figures(report)))
    print(f"wrote          {args.output_dir}/report.json, report.png, adapted.tflite, "
          "deploy_train.tflite")
    return 0
