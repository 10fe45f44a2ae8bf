"""`dgst export` and `dgst tflm-train`: the model as TFLite Micro files, and training in TFLM.

    dgst export --width 0.35 --image-size 128 --backward-config 16/36-39-40/1-1-0.25 \\
        --output train.tflite                        # training step + train.json
    dgst export --inference --output model.tflite    # full-int8 inference model
    dgst tflm-train train.tflite --dataset cifar10 --steps 100 --test-examples 200

    dgst train --output-dir OUT ...                  # adapt on the host, then
    dgst export --from-train OUT --output OUT/train.tflite   # its model, scheme, selection
    # static training: = --model OUT/model.keras --scheme OUT/scheme.json
    #                    --selection-state OUT/selection.json
    # dynamic (DGSU): the same rule on device, --policy and --layers-per-step as trained

Channel selection of weight-updated layers: see `CHANNEL_SELECTION` (and `dgst export --help`).

`tflm-train` runs the steps in the real TFLM interpreter (child process) and prints the loss
(first and last tenth of the steps), the training accuracy of the steps' forward passes, the
held-out accuracy before and after (updated weights written back into an inference model)
and TFLM's arena bytes.
"""
from __future__ import annotations

import argparse
import json
import pathlib

from dgst_tf.cli.common_args import SELECTION_HELP, SELECTIONS, add_dataset_arguments
from dgst_tf.cli.model_args import add_model_arguments, model_from_args

CHANNEL_SELECTION = """\
channel selection of weight-updated layers:
  --selection static (default) fixes the kept input channels at export: the ones
      `dgst train` saved (--selection-state, or --from-train), else --static-channels
      magnitude|first;
  --selection dynamic chooses them on device at every step by --policy
      traversal|magnitude|window (--policy alone implies dynamic).
  --layers-per-step N updates the weights of N weight-updated layers per step, in turn
      (with either selection); the others train only their biases.

from a training run (a dynamic one exports its on-device rule and layer schedule;
--selection static exports its last kept channels instead):
  dgst train ... --output-dir OUT
  dgst export --from-train OUT --dataset D --output OUT/train.tflite
  dgst tflm-train OUT/train.tflite --dataset D
"""


def add_export_parsers(subparsers) -> None:
    """Add ``export`` and ``tflm-train`` to ``dgst``'s sub-parsers.

        sub = parser.add_subparsers(dest="command")
        add_export_parsers(sub)
    """
    export = subparsers.add_parser(
        "export", help="write the model as a TFLite Micro training step (or inference model)",
        description=__doc__.splitlines()[0], epilog=CHANNEL_SELECTION,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    model = add_model_arguments(export, width=0.35, image_size=128)
    model.add_argument("--seed", type=int, default=0)
    _add_training_step_arguments(export)
    data = export.add_argument_group("calibration data")
    add_dataset_arguments(data, default="cifar10", purpose="int8 calibration images")
    data.add_argument("--calibration-examples", type=int, default=64)
    export.add_argument("--output", default=None,
                        help="the .tflite to write (default train.tflite / model.tflite)")
    export.set_defaults(func=run_export)

    train = subparsers.add_parser(
        "tflm-train", help="run N training steps of an exported model in TFLM",
        description="Run N training steps of a `dgst export` model in TFLite Micro.")
    train.add_argument("model", help="training .tflite written by `dgst export`")
    add_dataset_arguments(train, default="cifar10", purpose="training and held-out images")
    train.add_argument("--steps", type=int, default=100)
    train.add_argument("--test-examples", type=int, default=200,
                       help="held-out images for accuracy before/after (0: skip)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--arena-size", type=int, default=None)
    train.add_argument("--output-dir", default=None,
                       help="write result.json and updated.tflite here")
    train.set_defaults(func=run_tflm_train)


def _add_training_step_arguments(export) -> None:
    what = export.add_argument_group("training step")
    what.add_argument("--inference", action="store_true",
                      help="write only the full-int8 inference model")
    what.add_argument("--from-train", default=None, metavar="DIR",
                      help="the --output-dir of `dgst train`: its model.keras, scheme.json "
                           "and selection.json (instead of --model/--scheme/--selection-state;"
                           " a dynamic run's policy and layers per step)")
    what.add_argument("--scheme", dest="scheme_path", default=None,
                      help="UpdateScheme JSON (from `dgst plan` or `dgst train`)")
    what.add_argument("--backward-config", default=None,
                      help="tiny-training's n_bias/weight_idx/ratios, e.g. "
                           "16/36-39-40/1-1-0.25 (default: classifier only)")
    what.add_argument("--learning-rate", type=float, default=0.05)
    what.add_argument("--rounding", default="stochastic", choices=("stochastic", "nearest"),
                      help="int8 weight updates: unbiased stochastic rounding from a seeded "
                           "counter-based hash (default; updates below one LSB are not lost) "
                           "or round to nearest; seeded by --seed")
    what.add_argument("--selection", choices=SELECTIONS, default=None,
                      help=SELECTION_HELP + " (default static; dynamic with --policy)")
    what.add_argument("--selection-state", default=None, metavar="JSON",
                      help="selection.json of `dgst train`: its channels are the static "
                           "selection")
    what.add_argument("--static-channels", default=None, choices=("magnitude", "first"),
                      help="how --selection static picks the kept channels without "
                           "--selection-state: largest weight L2 norm (default) or the first k")
    what.add_argument("--policy", default=None, choices=("traversal", "magnitude", "window"),
                      help="the on-device rule of --selection dynamic: DGSU (unvisited "
                           "channels first, then by weight importance; the default), top-k "
                           "weight importance, or a window moving by k each step")
    what.add_argument("--layers-per-step", type=int, default=None, metavar="N",
                      help="update the weights of only N of the weight-updated layers per "
                           "step, in turn (DGSU's layer schedule, as DynamicChannelSelection("
                           "layers_per_step=N) in Keras); the others train their biases "
                           "(default: all layers every step)")
    what.add_argument("--no-fold-pads", dest="fold_pads", action="store_false",
                      help="keep explicit PAD ops (default: exact SAME convs instead)")
    what.add_argument("--fused-blocks", action=argparse.BooleanOptionalAction, default=True,
                      help="compute the frozen front as DGST_FUSED_BLOCK ops, a few rows of "
                           "each expanded activation at a time (default; --no-fused-blocks: "
                           "builtin ops)")
    what.add_argument("--whole-kernels-in-ram", dest="kept_weights_in_ram",
                      action="store_false",
                      help="whole kernels of weight-updated layers as RAM variables "
                           "(default: only the kept channels' weights)")


def load_arrays(dataset: str, data_path, split: str, image_size, limit: int, seed: int = 0,
                subset: str | None = None):
    """``limit`` class-balanced images and labels of a dataset split as NumPy arrays
    (torch preprocessing, as the pretrained MobileNetV2 expects); `dgst_tf.data.load_arrays`
    with positional arguments. Example::

        x, y = load_arrays("cifar10", None, "test", (128, 128), 200)
    """
    from dgst_tf import data

    return data.load_arrays(dataset, split, path=data_path, image_size=image_size,
                            limit=limit, seed=seed, subset=subset)


def _resolve_from_train(args) -> None:
    """Turn ``--from-train DIR`` into ``--model``, ``--scheme`` and ``--selection-state``."""
    from dgst_tf.jobs.train_outputs import TrainOutputs

    if not args.from_train:
        return
    if args.model != "mobilenet_v2" or args.scheme_path or args.selection_state \
            or args.backward_config:
        raise ValueError("--from-train names the model, scheme and selection state; drop "
                         "--model, --scheme, --backward-config and --selection-state")
    outputs = TrainOutputs(args.from_train).check()
    args.model, args.scheme_path = str(outputs.model), str(outputs.scheme)
    saved = json.loads(outputs.selection.read_text())
    if saved.get("policy") and args.selection != "static":
        # trained with an on-device rule: the device runs it too, with its layer schedule
        args.selection, args.policy = "dynamic", args.policy or saved["policy"]
        if args.layers_per_step is None:
            args.layers_per_step = saved.get("layers_per_step")
    else:
        args.selection_state = str(outputs.selection)


def _scheme(args, model):
    from dgst_tf.training.scheme import UpdateScheme

    if args.scheme_path and args.backward_config:
        raise ValueError("give --scheme or --backward-config, not both")
    if args.scheme_path:
        return UpdateScheme.load(args.scheme_path)
    if args.backward_config:
        parts = args.backward_config.split("/")
        if len(parts) != 3:
            raise ValueError(f"--backward-config {args.backward_config!r}: expected "
                             f"n_bias/weight_idx/ratios, e.g. 16/36-39-40/1-1-0.25")
        return UpdateScheme.from_backward_config(model, int(parts[0]), parts[1], parts[2])
    return UpdateScheme({})


def _channel_selection(args):
    """(selection, policy) for `export_training` from --selection, --selection-state,
    --static-channels and --policy."""
    from dgst_tf.jobs.train_outputs import load_kept_channels

    mode = args.selection or ("dynamic" if args.policy else "static")
    if mode == "dynamic":
        if args.selection_state or args.static_channels:
            raise ValueError("--selection dynamic chooses channels on device: drop "
                             "--selection-state and --static-channels (or use --selection "
                             "static)")
        return "magnitude", args.policy or "traversal"
    if args.policy:
        raise ValueError("--policy is the on-device rule of --selection dynamic")
    if args.selection_state:
        if args.static_channels:
            raise ValueError("give --selection-state or --static-channels, not both")
        return load_kept_channels(args.selection_state), None
    return args.static_channels or "magnitude", None


def run_export(args) -> int:
    """Run ``dgst export`` from parsed arguments (0 on success, 2 if conversion fails)."""
    import sys

    from dgst_tf.export.inference import Int8ExportError

    try:
        return _export(args)
    except Int8ExportError as err:  # a RuntimeError: dgst's main only reports ValueError...
        print(f"dgst export: error: {err}", file=sys.stderr)
        return 2


def _export(args) -> int:
    from dgst_tf.core import runtime
    from dgst_tf.export.inference import export_int8
    from dgst_tf.export.training import export_training

    runtime.limit_threads()
    _resolve_from_train(args)
    if not args.inference:  # argument errors before the slow part
        selection, policy = _channel_selection(args)
    model = model_from_args(args)[0]
    size = tuple(int(d) for d in model.input_shape[1:3])
    images, _ = load_arrays(args.dataset, args.data_path, "train", size,
                            args.calibration_examples, args.seed)
    if args.inference:
        output = args.output or "model.tflite"
        info = export_int8(model, images, output)
        print(f"wrote {info.path} ({info.size_bytes} bytes): full int8, ops {info.ops}")
        return 0
    scheme = _scheme(args, model)
    output = args.output or "train.tflite"
    info = export_training(model, scheme, images, output, learning_rate=args.learning_rate,
                           selection=selection, policy=policy,
                           fold_pads=args.fold_pads, fuse_blocks=args.fused_blocks,
                           kept_weights_in_ram=args.kept_weights_in_ram,
                           rounding=args.rounding, seed=args.seed,
                           layers_per_step=args.layers_per_step)
    _print_training_export(info)
    return 0


def _print_training_export(info) -> None:
    import numpy as np

    m = info.manifest
    print(f"wrote {info.path} ({m['size_bytes']} bytes) and {info.manifest_path}")
    print(f"one Invoke = one training step: image {m['inputs'][0]['shape']} int8 + label; "
          f"learning rate {m['learning_rate']}")
    for layer in m["layers"]:
        kept = "" if layer["kept"] is None else f", {len(layer['kept'])} input channels"
        kept = f", channels chosen on device ({layer['policy']})" if layer["policy"] else kept
        if layer.get("schedule"):
            index, layers, per_step = layer["schedule"]
            kept += f", weights at {per_step} of every {layers} steps (layer {index})"
        print(f"  {layer['name']:<24} {layer['kind']:<9} {layer['update']}{kept}")
    ram = sum(int(np.prod(p["shape"])) * np.dtype(p["dtype"]).itemsize for p in m["params"])
    print(f"trainable tensors in RAM: {ram} bytes; {m['fused_blocks']} frozen blocks fused")
    print(f"ops: {m['ops']}")


def run_tflm_train(args) -> int:
    """Run ``dgst tflm-train`` from parsed arguments (0 on success, 2 if TFLM fails)."""
    import sys

    from dgst_tf.export.tflm.runner import TflmError

    try:
        return _tflm_train(args)
    except TflmError as err:  # a RuntimeError: dgst's main only reports ValueError/OSError
        print(f"dgst tflm-train: error: {err}", file=sys.stderr)
        return 2


def _tflm_train(args) -> int:
    from dgst_tf.core import runtime
    from dgst_tf.core.files import write_json_atomically
    from dgst_tf.export.training import load_manifest, train_tflm

    runtime.limit_threads()
    manifest = load_manifest(args.model)
    size = manifest["inputs"][0]["shape"][1:3]
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    x, y = load_arrays(args.dataset, args.data_path, "train", size, args.steps, args.seed)
    run = train_tflm(args.model, x, y, arena_size=args.arena_size)
    tenth = max(1, len(run.losses) // 10)
    result = {"steps": int(len(run.losses)), "arena_bytes": int(run.arena_bytes),
              "arena_head_bytes": int(run.result.arena_head_bytes),
              "arena_tail_bytes": int(run.result.arena_tail_bytes),
              "loss_first": float(run.losses[:tenth].mean()),
              "loss_last": float(run.losses[-tenth:].mean()),
              "train_accuracy": float((run.predictions == y).mean())}
    out_dir = pathlib.Path(args.output_dir) if args.output_dir else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    if args.test_examples:
        result.update(_tflm_test_accuracy(args, manifest, run, out_dir))
    _print_tflm_result(args, result, tenth)
    if out_dir:
        write_json_atomically(out_dir / "result.json", result)
    return 0


def _tflm_test_accuracy(args, manifest, run, out_dir) -> dict:
    """Held-out accuracy of the exported weights before and after the TFLM steps, each
    written back into an inference model (kept in ``out_dir`` when given)."""
    import tempfile

    import numpy as np

    from dgst_tf.export.training import initial_params, run_inference_tflm, write_inference_model

    size = manifest["inputs"][0]["shape"][1:3]
    xt, yt = load_arrays(args.dataset, args.data_path, "test", size, args.test_examples,
                         args.seed)
    spec = manifest["inputs"][0]
    q = np.clip(np.round(xt / spec["scale"]) + spec["zero_point"], -128, 127)
    q = q.astype(np.int8)[:, None]
    accuracy = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = out_dir or pathlib.Path(tmp)
        for key, params in (("before", initial_params(args.model)), ("after", run.params)):
            path = write_inference_model(args.model, params, folder / f"{key}.tflite")
            logits = run_inference_tflm(path, q).outputs[0].reshape(len(q), -1)
            accuracy[f"test_accuracy_{key}"] = float((logits.argmax(-1) == yt).mean())
    return accuracy


def _print_tflm_result(args, result: dict, tenth: int) -> None:
    print(f"TFLM training: {result['steps']} steps of {args.model} on {args.dataset}")
    print(f"loss            {result['loss_first']:.4f} (first {tenth} steps) -> "
          f"{result['loss_last']:.4f} (last {tenth})")
    print(f"train accuracy  {100 * result['train_accuracy']:.1f}% (forward pass of each step)")
    if args.test_examples:
        print(f"test accuracy   {100 * result['test_accuracy_before']:.1f}% before -> "
              f"{100 * result['test_accuracy_after']:.1f}% after "
              f"({args.test_examples} held-out images)")
    print(f"arena           {result['arena_bytes']} bytes ({result['arena_bytes'] / 1024:.1f} "
          f"KB: {result['arena_head_bytes']} activations/scratch + "
          f"{result['arena_tail_bytes']} persistent)")


__all__ = ["add_export_parsers", "run_export", "run_tflm_train", "load_arrays"]

if __name__ == "__main__":  # python -m dgst_tf.cli.export ... (until dgst.cli wires it in)
    import sys

    parser = argparse.ArgumentParser(prog="dgst")
    add_export_parsers(parser.add_subparsers(dest="command", required=True))
    parsed = parser.parse_args()
    try:
        sys.exit(parsed.func(parsed))
    except (ValueError, OSError, TypeError) as err:
        print(f"dgst {parsed.command}: error: {err}", file=sys.stderr)
        sys.exit(2)
