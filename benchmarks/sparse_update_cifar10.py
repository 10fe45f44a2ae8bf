"""DGSU reproduction: ImageNet MobileNetV2 -> CIFAR-10 (JPEG copy) with every method.

    python benchmarks/sparse_update_cifar10.py --image-size 96 --train-examples 5000 \
        --epochs 1 --methods full last_layer bias_only sparse_update dgsu

Learning rate and epochs are chosen on a validation split carved from the training set
(--validation-split); the test set is only evaluated at the end. Writes
benchmarks/results/sparse_update_cifar10.{json,md}.
"""
import argparse
import time

import _report

from dgst_tf import data, models, runtime
from dgst_tf.keras_compat import keras
from dgst_tf.methods import METHODS, build_method
from dgst_tf.sparse_model import SparseUpdateModel


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--train-examples", type=int, default=5000)
    p.add_argument("--validation-split", type=float, default=0.1,
                   help="fraction of the training set held out for choosing settings")
    p.add_argument("--validation-examples", type=int, default=1000)
    p.add_argument("--test-examples", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--learning-rates", type=float, nargs="+", default=[0.01],
                   help="tried in turn; the best on the validation split is reported")
    p.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant",
                   help="cosine: decay the learning rate to 0 over all training steps")
    p.add_argument("--target-fraction", type=float, default=0.02)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="sparse_update_cifar10")
    args = p.parse_args()
    runtime.limit_threads()
    size = (args.image_size, args.image_size)
    common = dict(image_size=size, preprocessing="torch", seed=args.seed)
    train = data.cifar10("train", batch_size=1, augment=True, limit=args.train_examples,
                         validation_split=args.validation_split, subset="training", **common)
    val = data.cifar10("train", batch_size=50, limit=args.validation_examples,
                       validation_split=args.validation_split, subset="validation", **common)
    test = data.cifar10("test", batch_size=50, limit=args.test_examples, **common)
    rows = []
    for method in args.methods:
        best = None
        for lr in args.learning_rates:
            runtime.seed_everything(args.seed)
            model = models.mobilenet_v2(1.0, (*size, 3), classes=10, weights="imagenet",
                                        seed=args.seed)
            scheme, callbacks = build_method(method, model, args.target_fraction,
                                             seed=args.seed)
            sparse = SparseUpdateModel(model, scheme)
            learning_rate = lr
            if args.lr_schedule == "cosine":
                learning_rate = keras.optimizers.schedules.CosineDecay(
                    lr, decay_steps=train.num_examples * args.epochs)
            sparse.compile(optimizer=keras.optimizers.SGD(learning_rate),
                           loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                           metrics=["accuracy"])
            start = time.time()
            history = sparse.fit(train.dataset, epochs=args.epochs, callbacks=callbacks,
                                 validation_data=val.dataset, verbose=0)
            seconds = time.time() - start
            val_acc = history.history["val_accuracy"][-1]
            row = {"method": method, "learning_rate": lr, "val_top1": float(val_acc),
                   "updated_fraction": float(history.history["updated_fraction"][-1]),
                   "coverage": float(history.history["coverage"][-1]),
                   "val_top1_per_epoch": [round(float(a), 4)
                                          for a in history.history["val_accuracy"]],
                   "images_per_s": train.num_examples * args.epochs / seconds,
                   "sparse": sparse}
            if best is None or row["val_top1"] > best["val_top1"]:
                best = row
            print({k: v for k, v in row.items() if k != "sparse"}, flush=True)
        sparse = best.pop("sparse")
        best["test_top1"] = float(sparse.evaluate(test.dataset, verbose=0)[1])
        rows.append(best)
        print(best, flush=True)
        settings = {k: v for k, v in vars(args).items()} | {
            "train": train.num_examples, "validation": val.num_examples,
            "test": test.num_examples, "model": "MobileNetV2-1.0 ImageNet (torchvision)",
            "optimizer": "SGD, batch 1", "augment": "pad-crop + flip"}
        print(_report.write(args.name, settings, rows, [
            "method", "learning_rate", "val_top1", "test_top1", "updated_fraction",
            "coverage", "images_per_s"]))


if __name__ == "__main__":
    main()
