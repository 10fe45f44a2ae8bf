"""DGSU reproduction: ImageNet MobileNetV2 -> CIFAR-10 (JPEG copy) with every method.

    python benchmarks/sparse_update_cifar10.py --image-size 96 --train-examples 5000 \
        --epochs 1 --methods full last_layer bias_only sparse_update dgsu

Learning rate and epochs are chosen on a validation split carved from the training set
(--validation-split); the test set is only evaluated at the end. Writes
benchmarks/results/sparse_update_cifar10.{json,md}.

Long runs: ``--backup-dir DIR`` saves model, optimizer (and so the learning-rate schedule's
step) and selection state after every epoch with Keras' ``BackupAndRestore``; rerunning the
same command continues from the last finished epoch (the resumed epochs see a fresh
shuffle of the data). Per-epoch metrics go to ``DIR/<method>_lr<lr>.csv``.
"""
import argparse
import csv
import os
import time

import _report

from dgst_tf import data, models
from dgst_tf.core import runtime
from dgst_tf.core.keras_compat import keras
from dgst_tf.training.methods import DEFAULT_BLOCKS, METHODS, build_method
from dgst_tf.training.sparse_model import SparseUpdateModel


class Progress(keras.callbacks.Callback):
    """Print images/s and the running loss every ``every`` steps (batch size 1)."""

    def __init__(self, every: int):
        super().__init__()
        self.every = every

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch, self.start = epoch, time.time()

    def on_train_batch_end(self, batch, logs=None):
        if (batch + 1) % self.every == 0:
            rate = (batch + 1) / (time.time() - self.start)
            print(f"epoch {self.epoch + 1} step {batch + 1}: {rate:.1f} img/s, "
                  f"loss {logs['loss']:.3f}, accuracy {logs['accuracy']:.3f}", flush=True)


def _read_csv(path: str) -> dict:
    """CSVLogger's file as {column: [value per epoch]}."""
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return {k: [float(r[k]) for r in rows] for k in rows[0]}


def _arguments():
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
    p.add_argument("--blocks", type=int, default=DEFAULT_BLOCKS,
                   help="sparse_update and dgsu: how many of the last blocks they may update")
    p.add_argument("--no-test", dest="test", action="store_false",
                   help="validation only (ablations of a frozen protocol): the test set is "
                        "not scored")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="sparse_update_cifar10")
    p.add_argument("--backup-dir", help="resume an interrupted run from its last finished epoch")
    p.add_argument("--progress-every", type=int, default=0,
                   help="print images/s every N training steps (0: never)")
    return p.parse_args()


def _datasets(args):
    """(train, validation, test) CIFAR-10 splits at the benchmark's image size."""
    size = (args.image_size, args.image_size)
    common = dict(image_size=size, preprocessing="torch", seed=args.seed)
    train = data.cifar10("train", batch_size=1, augment=True, limit=args.train_examples,
                         validation_split=args.validation_split, subset="training", **common)
    val = data.cifar10("train", batch_size=50, limit=args.validation_examples,
                       validation_split=args.validation_split, subset="validation", **common)
    test = data.cifar10("test", batch_size=50, limit=args.test_examples, **common)
    return train, val, test


def _backup_callbacks(args, method: str, lr: float) -> tuple[str, list]:
    """(run folder, BackupAndRestore + CSVLogger callbacks) of one --backup-dir run."""
    run_dir = os.path.join(args.backup_dir, f"{method}_lr{lr:g}")
    fresh = not (os.path.isdir(run_dir) and os.listdir(run_dir))
    if fresh and os.path.exists(run_dir + ".csv"):
        os.remove(run_dir + ".csv")  # a finished run's log: this run starts anew
    return run_dir, [keras.callbacks.BackupAndRestore(run_dir),
                     keras.callbacks.CSVLogger(run_dir + ".csv", append=True)]


def _train(args, method: str, lr: float, train, val) -> dict:
    """Train ``method`` at ``lr``; its result row (with the trained model under "sparse")."""
    runtime.seed_everything(args.seed)
    size = (args.image_size, args.image_size)
    model = models.mobilenet_v2(1.0, (*size, 3), classes=10, weights="imagenet", seed=args.seed)
    scheme, callbacks = build_method(method, model, args.target_fraction, blocks=args.blocks,
                                     seed=args.seed)
    sparse = SparseUpdateModel(model, scheme)
    learning_rate = lr
    if args.lr_schedule == "cosine":
        learning_rate = keras.optimizers.schedules.CosineDecay(
            lr, decay_steps=train.num_examples * args.epochs)
    sparse.compile(optimizer=keras.optimizers.SGD(learning_rate),
                   loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                   metrics=["accuracy"])
    run_callbacks = list(callbacks)
    if args.progress_every:
        run_callbacks.append(Progress(args.progress_every))
    if args.backup_dir:
        run_dir, backup = _backup_callbacks(args, method, lr)
        run_callbacks += backup
    start = time.time()
    history = sparse.fit(train.dataset, epochs=args.epochs, callbacks=run_callbacks,
                         validation_data=val.dataset, verbose=0)
    seconds = time.time() - start
    epochs = history.history
    if args.backup_dir:  # a resumed run's history lacks the epochs done before
        epochs = _read_csv(run_dir + ".csv")
    return {"method": method, "learning_rate": lr,
            "val_top1": float(epochs["val_accuracy"][-1]),
            "updated_fraction": float(epochs["updated_fraction"][-1]),
            "coverage": float(epochs["coverage"][-1]),
            "val_top1_per_epoch": [round(float(a), 4) for a in epochs["val_accuracy"]],
            "images_per_s": train.num_examples * len(history.epoch) / seconds,
            "sparse": sparse}


def main():
    args = _arguments()
    runtime.limit_threads()
    train, val, test = _datasets(args)
    rows = []
    for method in args.methods:
        best = None
        for lr in args.learning_rates:
            row = _train(args, method, lr, train, val)
            if best is None or row["val_top1"] > best["val_top1"]:
                best = row
            print({k: v for k, v in row.items() if k != "sparse"}, flush=True)
        sparse = best.pop("sparse")
        best["test_top1"] = (float(sparse.evaluate(test.dataset, verbose=0)[1])
                             if args.test else None)
        rows.append(best)
        print(best, flush=True)
        settings = {k: v for k, v in vars(args).items()} | {
            "train": train.num_examples, "validation": val.num_examples,
            "test": test.num_examples if args.test else "not read",
            "model": "MobileNetV2-1.0 ImageNet (torchvision)",
            "optimizer": "SGD, batch 1", "augment": "pad-crop + flip"}
        print(_report.write(args.name, settings, rows, [
            "method", "learning_rate", "val_top1", "test_top1", "updated_fraction",
            "coverage", "images_per_s"]))


if __name__ == "__main__":
    main()
