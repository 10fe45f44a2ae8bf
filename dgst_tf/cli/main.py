"""The `dgst` command line.

    dgst info                 versions, data, weights, TFLM and QEMU availability
    dgst train [options]      adapt the pretrained model to a dataset (the main job)
                              (--output-dir OUT: model, scheme, selection for export;
                              --model my_cnn.keras: your own saved tf-keras model)
    dgst plan [options]       choose an update scheme that fits a memory budget
    dgst prune [options]      structured channel pruning to a flash budget (TF-MOT)
    dgst export [options]     write the model as a TFLM training step (.tflite + .json) or int8 model
                              (--from-train OUT: the model `dgst train` adapted)
    dgst tflm-train MODEL     run N training steps in TFLM: loss, accuracy, arena bytes
    dgst device [options]     the whole flow on the device's budgets, resumable: prune -> plan
                              -> int8 DGSU training -> TFLM check -> int8 test accuracy
    dgst federate [options]   federated sparse fine-tuning of simulated devices (Flower on Ray)
"""
import argparse
import dataclasses
import sys


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    from dgst_tf.cli.common_args import SELECTION_HELP, SELECTIONS, add_dataset_arguments
    from dgst_tf.cli.model_args import add_model_arguments
    from dgst_tf.jobs.adapt import AdaptConfig
    from dgst_tf.training.methods import METHODS

    defaults = AdaptConfig()
    add_dataset_arguments(parser, default=defaults.dataset)
    add_model_arguments(parser, width=defaults.width, image_size=defaults.image_size,
                        weights=defaults.weights, classes=False,
                        weights_help="imagenet (offline torchvision checkpoint), "
                                     "keras-imagenet (downloads), none, or a .pth/.npz path")
    parser.add_argument("--method", choices=METHODS, default=defaults.method,
                        help="training method: what a step updates and how it picks "
                             "channels (see dgst_tf.training.methods)")
    parser.add_argument("--target-fraction", type=float, default=defaults.target_fraction,
                        help="fraction of conv weights updated per step (sparse methods)")
    parser.add_argument("--scheme", dest="scheme_path", default=None,
                        help="an UpdateScheme JSON file (from `dgst plan`); overrides --method")
    parser.add_argument("--selection", choices=SELECTIONS, default=defaults.selection,
                        help=SELECTION_HELP + " (with --scheme; a --method brings its own)")
    parser.add_argument("--layers-per-step", type=int, default=defaults.layers_per_step,
                        metavar="N", help="dynamic selection: update the weights of only N "
                        "weight-updated layers per step, in turn (DGSU's layer schedule; "
                        "`dgst export --from-train` carries it to the device)")
    parser.add_argument("--train-examples", type=int, default=defaults.train_examples,
                        help="use this many training images (0 = all)")
    parser.add_argument("--test-examples", type=int, default=defaults.test_examples,
                        help="evaluate on this many test images (0 = all)")
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--activation-pattern", default=None,
                        help="store only this spatial pattern of each weight-updated conv's "
                             "input (stride2, checker, rows2, ...; dgst_tf.pruning)")
    parser.add_argument("--budget", default=None,
                        help="SRAM budget of one training step, e.g. 256KB: fail before "
                             "training if the scheme needs more")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--output-dir", default=None,
                        help="write result.json and, for `dgst export --from-train`, the "
                             "adapted model.keras, scheme.json and selection.json here")
    parser.add_argument("--backup-dir", default=None,
                        help="save model, optimizer and selection state after every epoch; "
                             "rerunning the same command resumes from the last finished one")


def _cmd_info(args) -> int:
    from dgst_tf.cli.info import collect, format_report

    print(format_report(collect()))
    return 0


def _cmd_train(args) -> int:
    from dgst_tf.cli.model_args import model_settings
    from dgst_tf.core import runtime
    from dgst_tf.jobs.adapt import AdaptConfig, run

    runtime.limit_threads()
    fields = {f.name for f in dataclasses.fields(AdaptConfig)}
    options = {k: v for k, v in vars(args).items() if k in fields} | model_settings(args)
    for key in ("train_examples", "test_examples"):
        options[key] = options[key] or None
    verbose = args.verbose if args.verbose is not None else 1 if sys.stdout.isatty() else 2
    result = run(AdaptConfig(**options), verbose=verbose)
    print(f"dataset        {args.dataset}: {result['train_examples']} train / "
          f"{result['test_examples']} test images at {args.image_size}x{args.image_size}")
    what = f"scheme {args.scheme_path} ({args.selection})" if args.scheme_path else (
        f"method {args.method}")
    print(f"trained        {what}, batch {args.batch_size}, SGD lr "
          f"{args.learning_rate}, {args.epochs} epochs, {result['train_seconds']} s")
    print(f"conv weights   {100 * result['updated_fraction']:.2f}% updated per step, "
          f"{100 * result['coverage']:.1f}% of the updated layers' weights visited")
    print(f"test accuracy  {100 * result['test_accuracy']:.2f}%")
    print(f"SRAM for updated parameters (int8 weights, int32 biases): "
          f"{result['sram_bytes'] / 1024:.1f} KB ({result['trainable_parameters']} parameters)")
    memory = result["memory"]
    print(f"training step  {memory['training_peak_bytes'] / 1024:.1f} KB peak SRAM at batch 1 "
          f"(int8; inference alone {memory['inference_peak_bytes'] / 1024:.1f} KB, dense "
          f"training {memory['dense_training_bytes'] / 1024:.1f} KB, Lin et al.'s extra-memory "
          f"label {memory['extra_memory_bytes'] / 1024:.1f} KB; dgst_tf.planning.memory)")
    if memory["whole_kernels_in_sram"]:
        print("               dynamic selection: the whole kernels of the updated layers sit in "
              "SRAM (the chosen channels change every step); `dgst plan` finds schemes that fit")
    if args.output_dir:
        from dgst_tf.jobs.train_outputs import TrainOutputs

        out = TrainOutputs(args.output_dir)
        print(f"wrote          {out.model}, {out.scheme.name}, {out.selection.name}, "
              f"{out.result.name} (export them: dgst export --from-train {out.folder})")
        _write_train_figures(out.folder)
    return 0


def _write_train_figures(folder) -> None:
    """The channel-selection heat map and accuracy curves beside result.json (a missing
    matplotlib costs only the pictures: the run's files are already written)."""
    from dgst_tf.jobs.figures import write_train_figures

    try:
        paths = write_train_figures(folder)
    except ImportError as err:
        print(f"no figures     {err}", file=sys.stderr)
        return
    print(f"wrote          {', '.join(p.name for p in paths)} (pictures: channel updates per "
          f"layer and coverage, accuracy per epoch)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dgst", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print versions and what this machine has").set_defaults(
        func=_cmd_info)
    train = sub.add_parser("train", help="adapt the pretrained model to a dataset")
    _add_train_arguments(train)
    train.add_argument("--verbose", type=int, default=None,
                       help="Keras progress: 0, 1 (a bar per epoch with its ETA) or 2 (a "
                            "line per epoch); default 1 in a terminal, else 2")
    train.set_defaults(func=_cmd_train)
    from dgst_tf.cli.device import add_device_parser
    from dgst_tf.cli.federate import add_federate_parser
    from dgst_tf.cli.export import add_export_parsers
    from dgst_tf.cli.plan import add_plan_parser
    from dgst_tf.cli.prune import add_prune_parser

    add_plan_parser(sub)
    add_prune_parser(sub)
    add_export_parsers(sub)
    add_device_parser(sub)
    add_federate_parser(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError, TypeError) as err:
        print(f"dgst {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
