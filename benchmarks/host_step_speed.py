"""Host time per training step of each method vs full fine-tuning, same model and batch.

    nice -n 10 python benchmarks/host_step_speed.py --image-size 128 --batch-size 1 \
        --steps 20 --rounds 7 --name host_step_speed_batch1

Every method's model is built and warmed up first; then the methods take turns, ``--steps``
steps each, for ``--rounds`` rounds, so load from other processes on a shared machine falls
on all of them alike. Reported: the median over rounds of wall-clock and process CPU time
per step, and their ratios to full fine-tuning (``full``, through `SparseUpdateModel` like
every method). ``full_keras`` is the reference for that baseline: Keras' own ``fit`` of the
same BatchNorm-folded model, every weight trained by its stock train step.

``cpu_speedup_vs_full_keras`` is full_keras' CPU time per step over the method's (3 = three
times faster than Keras' own full fine-tuning).

``--threads`` sets TensorFlow's intra-op threads (default: the usable cores; at batch 1 a
second thread mostly spins, which process CPU time counts); ``--steps-per-execution`` runs
that many steps per call of the compiled train function for every method alike (Keras'
per-step Python loop is a fixed cost that weighs most on the cheapest method);
``--blocks`` is how deep the sparse methods reach (the last N blocks, as
`dgst_tf.training.methods.build_method`; `dgst device` plans the last 2 for the CIFAR-10
headline).

Writes <out-dir>/<name>.{json,md} (default benchmarks/results).
"""
import argparse
import os
import statistics
import time

import _report
import numpy as np

from dgst_tf import models
from dgst_tf.core import runtime
from dgst_tf.core.bn_folding import fold_batchnorm
from dgst_tf.core.keras_compat import keras, tf
from dgst_tf.training.methods import DEFAULT_BLOCKS, METHODS, build_method
from dgst_tf.training.sparse_model import SparseUpdateModel


def build(method, args):
    """(model, callbacks, dataset) for ``method``, traced and warmed up."""
    runtime.seed_everything(0)
    model = models.mobilenet_v2(args.width, (args.image_size, args.image_size, 3), classes=10,
                                weights="imagenet" if args.width == 1.0 else None,
                                name=f"mobilenet_v2_{method}")
    if method == "full_keras":
        sparse, callbacks = fold_batchnorm(model, name=model.name), []
    else:
        scheme, callbacks = build_method(method, model, args.target_fraction,
                                         blocks=args.blocks)
        sparse = SparseUpdateModel(model, scheme)
    sparse.compile(optimizer=keras.optimizers.SGD(0.01),
                   steps_per_execution=args.steps_per_execution,
                   loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.batch_size, args.image_size, args.image_size, 3)).astype("float32")
    y = rng.integers(0, 10, args.batch_size)
    ds = tf.data.Dataset.from_tensors((x, y)).repeat()
    for steps in (3 * args.steps_per_execution, args.steps):  # trace, then warm up
        sparse.fit(ds, steps_per_epoch=steps, verbose=0, callbacks=callbacks)
    return sparse, callbacks, ds


def round_ms(run, steps):
    """(wall ms, process CPU ms) per step over ``steps`` steps."""
    sparse, callbacks, ds = run
    wall, cpu = time.perf_counter(), time.process_time()
    sparse.fit(ds, steps_per_epoch=steps, verbose=0, callbacks=callbacks)
    return (1000 * (time.perf_counter() - wall) / steps,
            1000 * (time.process_time() - cpu) / steps)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=[*METHODS, "full_keras"],
                   choices=[*METHODS, "full_keras"])
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=20, help="steps per method per round")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--target-fraction", type=float, default=0.02)
    p.add_argument("--blocks", type=int, default=DEFAULT_BLOCKS, help="sparse methods: the last N blocks")
    p.add_argument("--threads", type=int, default=None,
                   help="TensorFlow intra-op threads (default: the usable cores)")
    p.add_argument("--steps-per-execution", type=int, default=1)
    p.add_argument("--name", default="host_step_speed")
    p.add_argument("--out-dir", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args()
    args.threads = runtime.limit_threads(args.threads)
    if args.steps % args.steps_per_execution:
        p.error(f"--steps {args.steps} is not a multiple of --steps-per-execution "
                f"{args.steps_per_execution}")
    runs = {m: build(m, args) for m in args.methods}
    times = {m: [] for m in args.methods}
    for _ in range(args.rounds):
        for m, run in runs.items():
            times[m].append(round_ms(run, args.steps))
    wall = {m: statistics.median(t[0] for t in v) for m, v in times.items()}
    cpu = {m: statistics.median(t[1] for t in v) for m, v in times.items()}
    rows = []
    for m in args.methods:
        model = runs[m][0]
        fraction = (model.scheme.updated_weight_fraction(model.base)
                    if isinstance(model, SparseUpdateModel) else 1.0)
        row = {"method": m, "ms_per_step": wall[m], "cpu_ms_per_step": cpu[m],
               "updated_fraction": fraction, "ms_per_round": [round(t[0], 2) for t in times[m]],
               "cpu_ms_per_round": [round(t[1], 2) for t in times[m]]}
        if "full" in runs:
            row.update(ratio_vs_full=wall[m] / wall["full"],
                       cpu_ratio_vs_full=cpu[m] / cpu["full"])
        if "full_keras" in runs:
            row.update(cpu_speedup_vs_full_keras=cpu["full_keras"] / cpu[m])
        rows.append(row)
    settings = {k: v for k, v in vars(args).items() if k != "out_dir"}
    print(_report.write(args.name, settings, rows,
                        ["method", "ms_per_step", "ratio_vs_full", "cpu_ms_per_step",
                         "cpu_ratio_vs_full", "cpu_speedup_vs_full_keras", "updated_fraction"],
                        out_dir=args.out_dir))


if __name__ == "__main__":
    main()
