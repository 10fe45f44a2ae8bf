"""int8 vs float DGSU training: does the device's int8 rule lose accuracy?

ImageNet MobileNetV2-1.0 -> CIFAR-10, DGSU at 2% of conv weights per step, batch 1, plain
SGD, the same steps and data for every variant; scored on the validation split held out of
the training set (the test set is not read):

    python benchmarks/int8_vs_float_cifar10.py --image-size 96 --train-examples 5000 \
        --validation-examples 2000 --learning-rate 0.001 --seeds 0 1 2

A second call with the same settings resumes: (variant, seed) rows already in the results
file are kept, not rerun (``--fresh`` starts over).

Variants: ``float`` (the float Keras simulation), ``int8_qas_stochastic`` (the simulated
int8 graph with QAS and stochastic rounding: what the exported graph runs by default),
``int8_qas_nearest`` (``QuantizationAwareScalingSGD(rounding="nearest")``: the device's
round-to-nearest, which loses steps below half an LSB) and
``int8_noqas_stochastic`` (no QAS). Lin et al. 2022 report, for MCUNet on CIFAR-10, 86.0%
fp32, 75.4% int8 without QAS and 86.9% int8 with QAS. Writes
benchmarks/results/<name>.{json,md}.
"""
import argparse
import json
import pathlib
import sys
import time

import numpy as np

import _report

from dgst_tf import data, models
from dgst_tf.core import runtime
from dgst_tf.core.bn_folding import fold_batchnorm
from dgst_tf.core.int8_conversion import DEFAULT_HEAD_LOGIT_RANGE, DEFAULT_HEAD_WEIGHT_HEADROOM
from dgst_tf.core.keras_compat import keras
from dgst_tf.training.methods import build_method
from dgst_tf.training.int8_graph import int8_training_graph
from dgst_tf.training.qas import QuantizationAwareScalingSGD
from dgst_tf.training.sparse_model import SparseUpdateModel

# variant -> (int8 graph, QAS, rounding of the int8 kernels)
VARIANTS = {"float": (False, False, None),
            "int8_qas_stochastic": (True, True, "stochastic"),
            "int8_qas_nearest": (True, True, "nearest"),
            "int8_noqas_stochastic": (True, False, "stochastic")}


def _arguments():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--train-examples", type=int, default=5000)
    p.add_argument("--validation-split", type=float, default=0.1)
    p.add_argument("--validation-examples", type=int, default=2000)
    p.add_argument("--calibration-examples", type=int, default=64)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--learning-rate", type=float, default=0.001)
    p.add_argument("--target-fraction", type=float, default=0.02)
    p.add_argument("--head-logit-range", type=float, default=DEFAULT_HEAD_LOGIT_RANGE,
                   help="int8 graph: the new head's logits cover at least +-this")
    p.add_argument("--head-weight-headroom", type=float, default=DEFAULT_HEAD_WEIGHT_HEADROOM,
                   help="int8 graph: the new head's weight scales times this")
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="one run per variant and seed (model head, data order, rounding)")
    p.add_argument("--name", default="int8_vs_float_cifar10")
    p.add_argument("--fresh", action="store_true", help="ignore the rows of an earlier run "
                   "of the same name and settings (default: resume, skipping them)")
    return p.parse_args()


def _datasets(args, seed: int):
    """(train, validation, calibration images) at the benchmark's image size."""
    common = dict(image_size=(args.image_size, args.image_size), preprocessing="torch",
                  seed=seed, validation_split=args.validation_split)
    train = data.cifar10("train", batch_size=1, augment=True, limit=args.train_examples,
                         subset="training", **common)
    val = data.cifar10("train", batch_size=50, limit=args.validation_examples,
                       subset="validation", **common)
    calibration = np.concatenate([x for x, _ in train.dataset.take(args.calibration_examples)])
    return train, val, calibration


def _model_and_optimizer(args, variant: str, calibration, seed: int):
    """(Keras model to train, its optimizer, its loss, a one-line description)."""
    size = (args.image_size, args.image_size, 3)
    model = fold_batchnorm(models.mobilenet_v2(1.0, size, classes=10, weights="imagenet",
                                               seed=seed))
    int8, qas, rounding = VARIANTS[variant]
    if not int8:
        return (model, keras.optimizers.SGD(args.learning_rate),
                keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                "float32 simulation")
    graph = int8_training_graph(model, calibration, head_logit_range=args.head_logit_range,
                                head_weight_headroom=args.head_weight_headroom)
    optimizer = QuantizationAwareScalingSGD(args.learning_rate, graph.qas_scales,
                                            rounding=rounding, seed=seed, qas=qas)
    return (graph.model, optimizer, graph.loss,  # the device's loss on int8 logits
            f"int8 graph (TFLM's arithmetic), QAS {qas}, {rounding} rounding")


def _run(args, variant: str, seed: int, train, val, calibration) -> dict:
    runtime.seed_everything(seed)
    model, optimizer, loss, what = _model_and_optimizer(args, variant, calibration, seed)
    scheme, callbacks = build_method("dgsu", model, args.target_fraction, seed=seed)
    sparse = SparseUpdateModel(model, scheme, fold_bn=False)
    sparse.compile(optimizer=optimizer, metrics=["accuracy"],
                   loss=loss)
    start = time.time()
    history = sparse.fit(train.dataset, epochs=args.epochs, callbacks=callbacks,
                         validation_data=val.dataset, verbose=0).history
    seconds = time.time() - start
    return {"variant": variant, "seed": seed, "what": what,
            "val_top1": round(float(history["val_accuracy"][-1]), 4),
            "val_top1_per_epoch": [round(float(a), 4) for a in history["val_accuracy"]],
            "train_top1": round(float(history["accuracy"][-1]), 4),
            "updated_fraction": round(float(history["updated_fraction"][-1]), 5),
            "coverage": round(float(history["coverage"][-1]), 4),
            "images_per_s": round(train.num_examples * args.epochs / seconds, 1)}


def summary_rows(rows: list) -> list:
    """One row per variant: mean +- std of the validation top-1 over its seeds."""
    out = []
    for variant in dict.fromkeys(r["variant"] for r in rows):
        scores = [r["val_top1"] for r in rows if r["variant"] == variant]
        out.append({"variant": variant, "seed": f"mean of {len(scores)}",
                    "what": next(r["what"] for r in rows if r["variant"] == variant),
                    "val_top1": round(float(np.mean(scores)), 4),
                    "val_top1_std": round(float(np.std(scores, ddof=1)), 4)
                    if len(scores) > 1 else None})
    return out


def _earlier_rows(args, settings: dict) -> list:
    """Rows of an earlier run with the same settings (resume), else []."""
    path = pathlib.Path(__file__).parent / "results" / f"{args.name}.json"
    if args.fresh or not path.exists():
        return []
    earlier = json.loads(path.read_text())
    free = ("seeds", "variants", "train", "validation", "commands")  # differ between runs

    def fixed(values):
        return {k: v for k, v in values.items() if k not in free}

    if fixed(earlier["settings"]) != fixed(settings):
        return []
    settings["commands"] = earlier["settings"].get("commands", [earlier["command"]])
    return [r for r in earlier["results"] if isinstance(r.get("seed"), int)]


COLUMNS = ["variant", "seed", "what", "val_top1", "val_top1_std", "train_top1",
           "updated_fraction", "coverage", "images_per_s"]


def main():
    args = _arguments()
    runtime.limit_threads()
    settings = {k: v for k, v in vars(args).items() if k != "fresh"} | {
        "model": "MobileNetV2-1.0 ImageNet (torchvision), BatchNorm folded",
        "method": "DGSU (traversal, integer weight-L2 importance on the int8 graph)",
        "optimizer": "SGD without momentum, batch 1, constant learning rate",
        "augment": "pad-crop + flip", "test set": "not read"}
    rows = _earlier_rows(args, settings)
    command = " ".join([pathlib.Path(sys.argv[0]).name] + sys.argv[1:])
    earlier_commands = settings.get("commands", [])  # the runs whose rows the file holds
    settings["commands"] = earlier_commands + [c for c in [command] if c not in earlier_commands]
    for seed in args.seeds:
        train, val, calibration = _datasets(args, seed)
        settings |= {"train": train.num_examples, "validation": val.num_examples}
        for variant in args.variants:
            if any(r["variant"] == variant and r["seed"] == seed for r in rows):
                continue  # done by an earlier run
            rows.append(_run(args, variant, seed, train, val, calibration))
            print(rows[-1], flush=True)
            print(_report.write(args.name, settings, rows + summary_rows(rows), COLUMNS),
                  flush=True)


if __name__ == "__main__":
    main()
