"""Which teacher recovers a pruned MobileNetV2: a linear probe of the pruned features.

    python benchmarks/pruning_recovery_probe.py          # ~35 min on 2 shared cores

The device pipeline (`dgst device`, issue 18) prunes ImageNet MobileNetV2-1.0 to the flash
budget and recovers it by knowledge distillation on the target images (no ImageNet images
exist here). This measures what the recovery gives the features the device then fine-tunes,
at one uniform channel sparsity (``--sparsity``, 0.578 = what a 1 MB deployable file needs at
128 px), with the same images, steps and seed for every row:

- ``unpruned``: the ImageNet backbone as it is (the ceiling);
- ``one-shot``: the lowest-L2 channel groups removed, no recovery;
- ``kd-new-head``: pruned while distilled from the unpruned model with a newly initialised
  10-class head (teacher and student share that random head: its logits are a random
  projection of the features);
- ``kd-imagenet-head``: pruned while distilled from the unpruned model with its ImageNet
  classifier (1,000 outputs), the head then dropped (what `prune_to_flash` does).

Score: a linear classifier (Adam, 30 epochs) on the global-pooled features of
``--probe-train`` CIFAR-10 training images, top-1 on ``--probe-held-out`` other training images
(the test set is not read). Recovery images are the probe's training images (labels unused).
Writes benchmarks/results/pruning_recovery_probe.{json,md}.
"""
import argparse
import time

import _report
import numpy as np

from dgst_tf import data, models
from dgst_tf.core import runtime
from dgst_tf.core.classifier import with_new_classifier
from dgst_tf.core.graph import copy_model
from dgst_tf.core.keras_compat import keras, tf
from dgst_tf.pruning import prune_while_training, select_groups
from dgst_tf.pruning.channel_removal import remove_channels

ROWS = ("unpruned", "one-shot", "kd-new-head", "kd-imagenet-head")


def _arguments(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--sparsity", type=float, default=0.578)
    p.add_argument("--probe-train", type=int, default=5000)
    p.add_argument("--probe-held-out", type=int, default=1000)
    p.add_argument("--recovery-epochs", type=int, default=1)
    p.add_argument("--learning-rates", type=float, nargs="+", default=[0.003],
                   help="recovery SGD rates (cosine decay, momentum 0.9, batch 32)")
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="pruning_recovery_probe")
    return p.parse_args(argv)


def _features(model, x) -> np.ndarray:
    pool = [l for l in model.layers if isinstance(l, keras.layers.GlobalAveragePooling2D)][-1]
    return keras.Model(model.input, pool.output).predict(x, batch_size=64, verbose=0)


def _probe(features, y, n_train, seed) -> float:
    """Held-out top-1 of a linear classifier on standardised features."""
    tf.random.set_seed(seed)
    mean, std = features[:n_train].mean(0), features[:n_train].std(0) + 1e-6
    f = (features - mean) / std
    probe = keras.Sequential([keras.layers.Dense(10)])
    probe.compile(keras.optimizers.Adam(1e-3),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True), ["accuracy"])
    probe.fit(f[:n_train], y[:n_train], epochs=30, batch_size=64, verbose=0)
    return float(probe.evaluate(f[n_train:], y[n_train:], verbose=0)[1])


def _recovered(teacher, x, args, lr):
    """``teacher``'s copy pruned to ``args.sparsity`` while distilled from ``teacher``."""
    dataset = tf.data.Dataset.from_tensor_slices(x).shuffle(len(x), seed=args.seed).batch(32)
    steps = -(-len(x) // 32)
    schedule = keras.optimizers.schedules.CosineDecay(lr, steps * args.recovery_epochs)
    result = prune_while_training(copy_model(teacher), dataset, args.sparsity,
                                  epochs=args.recovery_epochs, steps_per_epoch=steps,
                                  teacher=teacher, temperature=args.temperature,
                                  optimizer=keras.optimizers.SGD(schedule, momentum=0.9))
    return result.model, float(result.history["agreement"][-1])


def main(argv=None) -> None:
    args = _arguments(argv)
    runtime.seed_everything(args.seed)
    size, n = args.image_size, args.probe_train
    x, y = data.load_arrays("cifar10", "train", image_size=(size, size),
                            limit=n + args.probe_held_out, seed=args.seed + 1)
    imagenet = models.mobilenet_v2(1.0, (size, size, 3), weights="imagenet", seed=args.seed)
    rows = []
    for row in args.rows:
        for lr in (args.learning_rates if row.startswith("kd") else [None]):
            start, agreement = time.time(), None
            if row == "unpruned":
                model = imagenet
            elif row == "one-shot":
                model = remove_channels(imagenet, select_groups(imagenet, args.sparsity))
            else:
                teacher = (imagenet if row == "kd-imagenet-head"
                           else with_new_classifier(imagenet, 10, seed=args.seed))
                model, agreement = _recovered(teacher, x[:n], args, lr)
            rows.append({"row": row, "recovery_lr": lr, "teacher_agreement": agreement,
                         "probe_top1": round(_probe(_features(model, x), y, n, args.seed), 4),
                         "pooled_features": int(model.get_layer("global_pool")
                                                .output_shape[-1]),
                         "seconds": round(time.time() - start)})
            print(rows[-1], flush=True)
    settings = {k: v for k, v in vars(args).items() if k != "name"} | {
        "model": "MobileNetV2-1.0 ImageNet (torchvision)", "recovery": "SGD momentum 0.9, "
        "batch 32, cosine decay, TF-MOT PolynomialDecay over 75% of the steps",
        "probe": "Dense(10) on standardised pooled features, Adam 1e-3, 30 epochs, batch 64",
        "data": "CIFAR-10 train split only (test set not read)"}
    print(_report.write(args.name, settings, rows, ["row", "recovery_lr", "teacher_agreement",
                                                    "probe_top1", "pooled_features",
                                                    "seconds"]))


if __name__ == "__main__":
    main()
