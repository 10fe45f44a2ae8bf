"""Host time per training step of each method vs full fine-tuning, same model and batch.

    python benchmarks/host_step_speed.py --image-size 128 --batch-size 8 --steps 30

Writes benchmarks/results/host_step_speed.{json,md}; the ratio column is step time / full.
"""
import argparse
import time

import _report
import numpy as np

from dgst_tf import models
from dgst_tf.core import runtime
from dgst_tf.core.keras_compat import keras, tf
from dgst_tf.training.methods import METHODS, build_method
from dgst_tf.training.sparse_model import SparseUpdateModel


def step_seconds(method, args):
    keras.backend.clear_session()  # each method starts from a clean graph (no slowdown by order)
    runtime.seed_everything(0)
    model = models.mobilenet_v2(args.width, (args.image_size, args.image_size, 3), classes=10,
                                weights="imagenet" if args.width == 1.0 else None)
    scheme, callbacks = build_method(method, model, args.target_fraction)
    sparse = SparseUpdateModel(model, scheme)
    sparse.compile(optimizer=keras.optimizers.SGD(0.01),
                   loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.batch_size, args.image_size, args.image_size, 3)).astype("float32")
    y = rng.integers(0, 10, args.batch_size)
    ds = tf.data.Dataset.from_tensors((x, y)).repeat()
    sparse.fit(ds, steps_per_epoch=3, verbose=0, callbacks=callbacks)  # trace + warm up
    start = time.perf_counter()
    sparse.fit(ds, steps_per_epoch=args.steps, verbose=0, callbacks=callbacks)
    return (time.perf_counter() - start) / args.steps, scheme.updated_weight_fraction(
        sparse.base)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--target-fraction", type=float, default=0.02)
    p.add_argument("--name", default="host_step_speed")
    args = p.parse_args()
    runtime.limit_threads()
    times = {m: step_seconds(m, args) for m in args.methods}
    full = times.get("full", (None,))[0]
    rows = [{"method": m, "ms_per_step": 1000 * t, "updated_fraction": f,
             "ratio_vs_full": (t / full) if full else ""} for m, (t, f) in times.items()]
    print(_report.write(args.name, vars(args), rows,
                        ["method", "ms_per_step", "ratio_vs_full", "updated_fraction"]))


if __name__ == "__main__":
    main()
