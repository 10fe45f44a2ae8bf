"""`dgst export` and `dgst tflm-train`: the model as TFLite Micro files, and training in TFLM.

    dgst export --width 0.35 --image-size 128 --backward-config 16/36-39-40/1-1-0.25 \\
        --output train.tflite                        # training step + train.json
    dgst export --inference --output model.tflite    # full-int8 inference model
    dgst tflm-train train.tflite --dataset cifar10 --steps 100 --test-examples 200

`tflm-train` runs the steps in the real TFLM interpreter (child process) and prints the loss
(first and last tenth of the steps), the training accuracy of the steps' forward passes, the
held-out accuracy before and after (updated weights written back into an inference model)
and TFLM's arena bytes.
"""
from __future__ import annotations

import argparse
import json
import pathlib

from dgst_tf.cli.model_args import add_model_arguments, model_from_args


def add_export_parsers(subparsers) -> None:
    """Add ``export`` and ``tflm-train`` to ``dgst``'s sub-parsers.

        sub = parser.add_subparsers(dest="command")
        add_export_parsers(sub)
    """
    export = subparsers.add_parser(
        "export", help="write the model as a TFLite Micro training step (or inference model)",
        description=__doc__.splitlines()[0])
    model = add_model_arguments(export, width=0.35, image_size=128)
    model.add_argument("--seed", type=int, default=0)
    what = export.add_argument_group("training step")
    what.add_argument("--inference", action="store_true",
                      help="write only the full-int8 inference model")
    what.add_argument("--scheme", dest="scheme_path", default=None,
                      help="UpdateScheme JSON (from `dgst plan`)")
    what.add_argument("--backward-config", default=None,
                      help="tiny-training's n_bias/weight_idx/ratios, e.g. "
                           "16/36-39-40/1-1-0.25 (default: classifier only)")
    what.add_argument("--learning-rate", type=float, default=0.05)
    what.add_argument("--selection", default="magnitude", choices=("magnitude", "first"),
                      help="kept input channels of weight-updated layers (static)")
    what.add_argument("--policy", default=None, choices=("traversal", "magnitude"),
                      help="dynamic selection evaluated on device each step (DGSU-style) "
                           "instead of the static --selection")
    what.add_argument("--no-fold-pads", dest="fold_pads", action="store_false",
                      help="keep explicit PAD ops (default: exact SAME convs instead)")
    what.add_argument("--no-fuse-blocks", dest="fuse_blocks", action="store_false",
                      help="keep the frozen front as builtin ops (default: DGST_FUSED_BLOCK, "
                           "a few rows of each expanded activation instead of all of it)")
    what.add_argument("--whole-kernels-in-ram", dest="kept_weights_in_ram",
                      action="store_false",
                      help="whole kernels of weight-updated layers as RAM variables "
                           "(default: only the kept channels' weights)")
    data = export.add_argument_group("calibration data")
    data.add_argument("--dataset", default="cifar10", choices=("cifar10", "fashion_mnist"))
    data.add_argument("--data", dest="data_path", default=None)
    data.add_argument("--calibration-examples", type=int, default=64)
    export.add_argument("--output", default=None,
                        help="the .tflite to write (default train.tflite / model.tflite)")
    export.set_defaults(func=run_export)

    train = subparsers.add_parser(
        "tflm-train", help="run N training steps of an exported model in TFLM",
        description="Run N training steps of a `dgst export` model in TFLite Micro.")
    train.add_argument("model", help="training .tflite written by `dgst export`")
    train.add_argument("--dataset", default="cifar10", choices=("cifar10", "fashion_mnist"))
    train.add_argument("--data", dest="data_path", default=None)
    train.add_argument("--steps", type=int, default=100)
    train.add_argument("--test-examples", type=int, default=200,
                       help="held-out images for accuracy before/after (0: skip)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--arena-size", type=int, default=None)
    train.add_argument("--output-dir", default=None,
                       help="write result.json and updated.tflite here")
    train.set_defaults(func=run_tflm_train)


def load_arrays(dataset: str, data_path, split: str, image_size, limit: int, seed: int = 0,
                subset: str | None = None):
    """``limit`` class-balanced images and labels of a dataset split as NumPy arrays
    (torch preprocessing, as the pretrained MobileNetV2 expects). Example::

        x, y = load_arrays("cifar10", None, "test", (128, 128), 200)
    """
    import numpy as np

    from dgst_tf import data

    load = data.cifar10 if dataset == "cifar10" else data.fashion_mnist
    kwargs = dict(path=data_path, image_size=tuple(image_size), batch_size=limit,
                  preprocessing="torch", seed=seed, limit=limit, shuffle=True)
    if subset:
        kwargs.update(validation_split=0.1, subset=subset)
    split_data = load(split, **kwargs)
    xs, ys = [], []
    for x, y in split_data.dataset:
        xs.append(np.asarray(x))
        ys.append(np.asarray(y))
    return np.concatenate(xs)[:limit].astype(np.float32), np.concatenate(ys)[:limit]


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
    import numpy as np

    from dgst_tf.core import runtime
    from dgst_tf.export.inference import export_int8
    from dgst_tf.export.training import export_training

    runtime.limit_threads()
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
                           selection=args.selection, policy=args.policy,
                           fold_pads=args.fold_pads, fuse_blocks=args.fuse_blocks,
                           kept_weights_in_ram=args.kept_weights_in_ram)
    m = info.manifest
    print(f"wrote {info.path} ({m['size_bytes']} bytes) and {info.manifest_path}")
    print(f"one Invoke = one training step: image {m['inputs'][0]['shape']} int8 + label; "
          f"learning rate {m['learning_rate']}")
    for layer in m["layers"]:
        kept = "" if layer["kept"] is None else f", {len(layer['kept'])} input channels"
        kept = f", channels chosen on device ({layer['policy']})" if layer["policy"] else kept
        print(f"  {layer['name']:<24} {layer['kind']:<9} {layer['update']}{kept}")
    ram = sum(int(np.prod(p["shape"])) * np.dtype(p["dtype"]).itemsize for p in m["params"])
    print(f"trainable tensors in RAM: {ram} bytes; {m['fused_blocks']} frozen blocks fused")
    print(f"ops: {m['ops']}")
    return 0


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
    import numpy as np

    from dgst_tf.core import runtime
    from dgst_tf.export.training import (initial_params, load_manifest, run_inference_tflm,
                                         train_tflm, write_inference_model)

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
        import tempfile

        xt, yt = load_arrays(args.dataset, args.data_path, "test", size, args.test_examples,
                             args.seed)
        spec = manifest["inputs"][0]
        q = np.clip(np.round(xt / spec["scale"]) + spec["zero_point"], -128, 127)
        q = q.astype(np.int8)[:, None]
        with tempfile.TemporaryDirectory() as tmp:
            folder = out_dir or pathlib.Path(tmp)
            for key, params in (("before", initial_params(args.model)), ("after", run.params)):
                path = write_inference_model(args.model, params, folder / f"{key}.tflite")
                logits = run_inference_tflm(path, q).outputs[0].reshape(len(q), -1)
                result[f"test_accuracy_{key}"] = float((logits.argmax(-1) == yt).mean())
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
    if out_dir:
        (out_dir / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0


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
