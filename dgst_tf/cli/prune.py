"""`dgst prune`: channel-prune a model so its training step fits a device's flash.

    dgst prune --width 1.0 --image-size 96 --flash-budget 1MB --output pruned.h5
    dgst prune --sparsity 0.3 --dataset none --epochs 0 --output oneshot.h5
    dgst prune --model my_cnn.keras --image-size 32 --dataset fashion_mnist --output small.keras

Finds the family sparsity whose pruned model's deployable training ``.tflite`` (what
`dgst export` writes for on-device training, sized without exporting:
`dgst_tf.pruning.model_size.deployable_size`) plus the firmware allowance
(`dgst_tf.jobs.flash_budget.FIRMWARE_ALLOWANCE_BYTES`, ``--firmware-allowance``) fits
``--flash-budget``, fine-tunes on ``--dataset`` while TF-MOT's PolynomialDecay schedule masks
channel groups (`dgst_tf.pruning`), strips the wrappers, removes the channels physically,
evaluates, and writes the smaller tf-keras model (atomically). ``--epochs 0`` prunes once
without data (accuracy collapses without fine-tuning; use it for sizes only).
"""
from __future__ import annotations

import argparse
import pathlib
import time

from dgst_tf.cli.common_args import add_dataset_arguments
from dgst_tf.cli.model_args import add_model_arguments, model_from_args, resolve_image_size


def add_prune_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``prune`` sub-command to ``dgst``'s sub-parsers; returns its parser.

        sub = parser.add_subparsers(dest="command")
        add_prune_parser(sub)
    """
    prune = subparsers.add_parser(
        "prune", help="channel-prune a model to fit a flash budget",
        description=__doc__.splitlines()[0])
    add_model_arguments(prune, width=1.0, image_size=96)
    target = prune.add_argument_group("target")
    target.add_argument("--flash-budget", default="1MB",
                        help="device flash: the deployable training .tflite + the firmware "
                             "allowance must fit this (bytes, 900KB, 1MB; KB = 1024 bytes)")
    target.add_argument("--firmware-allowance", default=None,
                        help="flash of the firmware (TFLM runtime, kernels, dgst ops, "
                             "application; bytes or 200KB); default: the measured "
                             "dgst_tf.jobs.flash_budget.FIRMWARE_ALLOWANCE_BYTES")
    target.add_argument("--sparsity", type=float, default=None,
                        help="prune this fraction of every channel family instead of "
                             "deriving it from --flash-budget")
    target.add_argument("--importance", default="l2", choices=("l2", "bn_scale", "random"),
                        help="group importance: L2 of all coupled weights (default), "
                             "BatchNorm |gamma|, or random")
    target.add_argument("--round-to", type=int, default=1,
                        help="keep channel counts multiples of this (SIMD-friendly)")
    target.add_argument("--min-channels", type=int, default=1)
    target.add_argument("--exclude", nargs="*", default=[],
                        help="layers whose output channels are never pruned")
    data = prune.add_argument_group("fine-tuning data")
    add_dataset_arguments(data, default="cifar10", extra=("none",),
                          purpose="fine-tuning data (none: prune without data)")
    data.add_argument("--train-examples", type=int, default=4000, help="0 = all")
    data.add_argument("--test-examples", type=int, default=2000, help="0 = all")
    data.add_argument("--epochs", type=int, default=2,
                      help="fine-tuning epochs while pruning (0: one-shot, no data)")
    data.add_argument("--batch-size", type=int, default=32)
    data.add_argument("--learning-rate", type=float, default=0.003,
                      help="SGD with momentum 0.9, cosine decay (0.003 fine-tunes the "
                           "ImageNet MobileNetV2 on CIFAR-10 better than 0.01 or 0.001)")
    data.add_argument("--ramp-fraction", type=float, default=0.75,
                      help="fraction of the steps over which sparsity rises to its target")
    data.add_argument("--distill", action="store_true",
                      help="fine-tune by knowledge distillation from the unpruned model on "
                           "the fine-tuning images (labels unused)")
    data.add_argument("--temperature", type=float, default=4.0,
                      help="distillation temperature (with --distill)")
    data.add_argument("--seed", type=int, default=0)
    out = prune.add_argument_group("output")
    out.add_argument("--output", default="pruned.h5", help="pruned model (.h5 or .keras)")
    out.add_argument("--report", default=None, help="also write sizes and accuracy as JSON")
    out.add_argument("--verbose", type=int, default=0, help="Keras progress: 0, 1 or 2")
    prune.set_defaults(func=run_prune)
    return prune


def _load_data(args):
    from dgst_tf.jobs.adapt import AdaptConfig, load_splits

    config = AdaptConfig(dataset=args.dataset, data_path=args.data_path,
                         image_size=args.image_size, weights="imagenet",  # torch preprocessing
                         train_examples=args.train_examples or None,
                         test_examples=args.test_examples or None,
                         batch_size=args.batch_size, seed=args.seed)
    return load_splits(config)


def _row(name, fp, accuracy=None) -> str:
    act = "-" if fp.activation_peak_bytes is None else f"{fp.activation_peak_bytes / 1024:.1f}"
    acc = "-" if accuracy is None else f"{100 * accuracy:.2f}%"
    return (f"{name:<9}{fp.parameters:>12,}{fp.flash_bytes / 1024:>12.1f}{act:>14}"
            f"{fp.macs / 1e6:>10.1f}{acc:>10}")


def _prune(args, model, graph, sparsity, options, train):
    """(pruned model, how): fine-tuned while TF-MOT masks channel groups, or one-shot."""
    from dgst_tf.core.graph import copy_model
    from dgst_tf.core.keras_compat import keras
    from dgst_tf.pruning import prune_while_training, remove_channels, select_groups
    from dgst_tf.pruning.prune_to_budget import pruned_name

    if args.dataset != "none" and args.epochs > 0:
        steps = train.steps_per_epoch
        teacher = copy_model(model) if args.distill else None
        schedule = keras.optimizers.schedules.CosineDecay(args.learning_rate,
                                                          steps * args.epochs)
        result = prune_while_training(
            model, train.dataset, sparsity, epochs=args.epochs, steps_per_epoch=steps,
            optimizer=keras.optimizers.SGD(schedule, momentum=0.9),
            ramp_fraction=args.ramp_fraction, importance=args.importance,
            verbose=args.verbose, teacher=teacher, temperature=args.temperature, **options)
        how = f"fine-tuned {args.epochs} epochs on {train.num_examples} {args.dataset} images"
        if teacher is not None:
            how += f", distilled from the unpruned model (T = {args.temperature:g})"
        return result.model, how
    removed = select_groups(model, sparsity, importance=args.importance, graph=graph,
                            **options)
    small = remove_channels(model, removed, graph, name=pruned_name(model))
    return small, "one-shot (no fine-tuning)"


def _logits_form(model):
    """``model`` in its logits form when it ends in a softmax (distillation matches logits;
    `dgst_tf.core.classifier.logits_model`), said on the console; else ``model``."""
    from dgst_tf.core.classifier import find_classifier, logits_model

    head = find_classifier(model)
    if head.outputs_logits:
        return model
    softmax = head.name if head.softmax == "activation" else head.softmax
    print(f"logits    distillation matches logits: pruning the model without softmax "
          f"{softmax!r} (the pruned model outputs logits; the argmax is the same)")
    return logits_model(model)


def _accuracy(model, test):
    from dgst_tf.core.keras_compat import keras

    if test is None:
        return None
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])  # the loss is not reported: only the accuracy
    return float(model.evaluate(test.dataset, verbose=0)[1])


def _sparsity(args, model, graph, room, options):
    """(family sparsity, how it was chosen): --sparsity, or the smallest whose deployable
    training file fits ``room`` bytes (the budget less the firmware allowance)."""
    from dgst_tf.pruning import sparsity_for_budget

    if args.sparsity is not None:
        return float(args.sparsity), f"--sparsity {float(args.sparsity):g}"
    sparsity, _ = sparsity_for_budget(model, room, graph, **options)
    return sparsity, (f"smallest whose training .tflite fits {args.flash_budget} less the "
                      f"firmware allowance ({room} bytes)")


def _flash_room(args) -> tuple[int, int, int]:
    """(budget, firmware allowance, bytes left for the training file) from the arguments."""
    from dgst_tf.jobs.flash_budget import FIRMWARE_ALLOWANCE_BYTES
    from dgst_tf.planning.budget import parse_budget

    budget = parse_budget(args.flash_budget)
    allowance = (FIRMWARE_ALLOWANCE_BYTES if args.firmware_allowance is None
                 else parse_budget(args.firmware_allowance))
    if budget <= allowance:
        raise ValueError(f"--flash-budget {args.flash_budget} ({budget} bytes) leaves nothing "
                         f"for the model after the firmware allowance of {allowance} bytes")
    return budget, allowance, budget - allowance


def _print_flash(args, before, after, budget, allowance) -> bool:
    """Print the deployable training files before and after; True if it fits now."""
    needed = after.total + allowance
    fits = needed <= budget
    print(f"deploy    training .tflite {before.total} -> {after.total} bytes (weights "
          f"{after.weights}, quantization {after.quantization}, requantization "
          f"{after.requantization}, training {after.training}, tables {after.structure})")
    print(f"flash     {after.total} bytes .tflite + {allowance} bytes firmware allowance = "
          f"{needed} bytes {'fits' if fits else 'does NOT fit'} {args.flash_budget} "
          f"({budget} bytes)")
    return fits


def run_prune(args) -> int:
    """Run ``dgst prune`` from parsed arguments (0 on success)."""
    from dgst_tf.core import runtime
    from dgst_tf.models.model_file import MODEL_SUFFIXES, save_model_atomically
    from dgst_tf.pruning import DependencyGraph, footprint, reduction
    from dgst_tf.pruning.model_size import deployable_size

    runtime.limit_threads()
    runtime.seed_everything(args.seed)
    if args.epochs < 0:
        raise ValueError(f"--epochs must be >= 0, got {args.epochs}")
    if pathlib.Path(args.output).suffix not in MODEL_SUFFIXES:
        raise ValueError(f"--output {args.output!r}: use a .h5 or .keras file name")
    budget, allowance, room = _flash_room(args)
    resolve_image_size(args)  # the images are loaded at the model's size
    train = test = None
    if args.dataset != "none":
        train, test = _load_data(args)
    # a model file must have the dataset's classes; without data any number will do
    model, description = model_from_args(
        args, classes=train.num_classes if train is not None else None)
    if args.distill and args.dataset != "none" and args.epochs > 0:
        model = _logits_form(model)
    shape = tuple(int(d) for d in model.inputs[0].shape[1:])
    graph = DependencyGraph(model)
    before, deploy_before = footprint(model), deployable_size(model)
    options = dict(exclude=args.exclude, round_to=args.round_to,
                   min_channels=args.min_channels)
    sparsity, how = _sparsity(args, model, graph, room, options)
    print(f"model     {description}: {model.name}, input {'x'.join(map(str, shape))}, "
          f"{len(graph.groups())} prunable channel groups in {len(graph.families())} families")
    print(f"sparsity  {sparsity:.4f} of every family ({how}), importance {args.importance}")
    start = time.time()
    small, how = _prune(args, model, graph, sparsity, options, train)
    after, deploy_after = footprint(small), deployable_size(small)
    accuracy = _accuracy(small, test)
    print(f"pruned    {how} in {time.time() - start:.0f} s")
    print(f"{'':<9}{'parameters':>12}{'weights KB':>12}{'act. peak KB':>14}{'MMACs':>10}"
          f"{'accuracy':>10}")
    print(_row("before", before))
    print(_row("after", after, accuracy))
    saved = reduction(before, after)
    print("saved     " + ", ".join(f"{k.replace('_', ' ')} {100 * v:.1f}%"
                                   for k, v in saved.items()))
    fits = _print_flash(args, deploy_before, deploy_after, budget, allowance)
    path = save_model_atomically(small, args.output)
    print(f"wrote     {path}")
    if args.report:
        from dgst_tf.core.files import write_json_atomically

        write_json_atomically(args.report, {
            "model": description, "sparsity": sparsity, "importance": args.importance,
            "flash_budget_bytes": budget, "firmware_allowance_bytes": allowance,
            "deployable_bytes": deploy_after.total, "fits": fits, "before": before.as_dict(),
            "after": after.as_dict(), "deployable_before": deploy_before.as_dict(),
            "deployable_after": deploy_after.as_dict(), "reduction": saved,
            "test_accuracy": accuracy, "training": how, "output": str(path)})
        print(f"wrote     {args.report}")
    return 0


def save_model_atomically(model, path):
    """`dgst_tf.models.model_file.save_model_atomically` (its old import path)."""
    from dgst_tf.models.model_file import save_model_atomically as save

    return save(model, path)


__all__ = ["add_prune_parser", "run_prune", "save_model_atomically"]
