"""Training memory of sparse-update schemes, and scheme search under memory budgets.

    python benchmarks/memory_schemes.py                 # memory + predicted gains, ~1 min
    python benchmarks/memory_schemes.py --measure       # + CIFAR-10 accuracy, ~12 min

1. tiny-training's published MobileNetV2-w0.35 128x128 schemes (49/73/99/123/138 KB):
   Lin et al.'s label on tiny-training's architecture (no 1x1 head conv, "nomix") and on
   ours (torchvision: with the 1280-channel head conv), our training-step peak and dense
   training memory.
2. Evolutionary vs random search at equal evaluations for budgets 49/74/99/124/148 KB
   (extra-memory label) on our MobileNetV2-w0.35 128x128 with the analytic contribution
   proxy: predicted gain, memory of the chosen scheme.
3. ``--measure``: contributions measured on CIFAR-10 (small limits) with short
   fine-tuning runs, both searches on that table, and each chosen scheme fine-tuned and
   evaluated on the CIFAR-10 test split. MobileNetV2 width 1.0 with ImageNet weights
   (the only pretrained width offline) at ``--measure-image-size``.

Writes benchmarks/results/memory_schemes.{json,md} (and memory_schemes_measured.*, and
a chart memory_schemes_99kb.png).
"""
import argparse
import os
import time

import _report
import numpy as np

from dgst_tf.core import runtime
from dgst_tf.core.keras_compat import keras
from dgst_tf.planning.memory import KB, MemoryModel
from dgst_tf.planning.memory_report import plot_memory
from dgst_tf.models import mobilenet_v2
from dgst_tf.training.scheme import UpdateScheme

# mit-han-lab/tiny-training, compilation/mcu_ir_gen.py, sparse_update_config["mbv2"]
PUBLISHED = {
    49: (16, [36, 39, 40, 41, 42, 45, 48, 49], [1, 1, 0, 0.25, 0.125, 0.125, 0.125, 0.125]),
    73: (20, [32, 33, 36, 39, 41, 42, 45, 48], [0.125, 0.5, 0.5, 1, 0.25, 0.125, 0.125, 1]),
    99: (25, [27, 30, 33, 36, 39, 42, 45, 48], [1, 1, 1, 1, 1, 0.125, 0.5, 1]),
    123: (31, [27, 30, 33, 36, 39, 42, 45, 48], [1, 1, 1, 1, 1, 0.5, 1, 1]),
    138: (34, [27, 30, 33, 36, 39, 42, 45, 48], [1] * 8),
}
RESULTS = os.path.join(os.path.dirname(__file__), "results")


def nomix(model):
    """tiny-training's "mbv2-w0.35-nomix": the same network without the 1x1 head conv."""
    x = keras.layers.GlobalAveragePooling2D(name="pool")(
        model.get_layer("block_16_project_bn").output)
    return keras.Model(model.input, keras.layers.Dense(10, name="fc")(x), name="mbv2_nomix")


def published_rows(ours, theirs):
    rows = []
    ours_mm, theirs_mm = MemoryModel(ours), MemoryModel(theirs)
    for label, (n_bias, idx, ratios) in PUBLISHED.items():
        lin_theirs = theirs_mm.report(UpdateScheme.from_backward_config(
            theirs, n_bias, idx, ratios), dense=False).extra_memory_kb
        report = ours_mm.report(UpdateScheme.from_backward_config(ours, n_bias, idx, ratios))
        rows.append({
            "part": "published", "scheme": f"tiny-training {label}KB",
            "backward_config": f"{n_bias} / {'-'.join(map(str, idx))} / "
                               f"{'-'.join(f'{r:g}' for r in ratios)}",
            "published_kb": label, "lin_kb_nomix": round(lin_theirs, 2),
            "lin_kb": round(report.extra_memory_kb, 2),
            "training_peak_kb": round(report.training_peak_bytes / KB, 1),
            "peak_at": f"{report.peak_phase} {report.peak_layer}",
            "dense_kb": round(report.dense_training_bytes / KB, 1),
            "saving_pct": round(100 * report.saving_bytes / report.dense_training_bytes, 1)})
    return rows


def search_rows(model, table, budgets, evaluations, seeds, memory_model, part="search"):
    from dgst_tf.planning.search import search_scheme

    rows, best = [], {}
    for budget in budgets:
        for method in ("evolutionary", "random"):
            results = [search_scheme(model, table, budget * KB, method=method,
                                     evaluations=evaluations, seed=seed,
                                     memory_model=memory_model) for seed in seeds]
            gains = [100 * r.gain for r in results]
            top = max(results, key=lambda r: r.gain)
            best[(budget, method)] = top
            report = memory_model.report(top.scheme)
            config = top.backward_config()
            rows.append({
                "part": part, "scheme": f"{method} @ {budget}KB",
                "budget_kb": budget, "method": method, "evaluations": evaluations,
                "gain_mean": round(float(np.mean(gains)), 3),
                "gain_min": round(float(np.min(gains)), 3),
                "gain_max": round(float(np.max(gains)), 3),
                "backward_config": f"{config['n_bias_update']} / "
                                   f"{config['manual_weight_idx'] or '-'} / "
                                   f"{config['weight_update_ratio'] or '-'}",
                "lin_kb": round(report.extra_memory_kb, 2),
                "training_peak_kb": round(report.training_peak_bytes / KB, 1),
                "dense_kb": round(report.dense_training_bytes / KB, 1),
                "saving_pct": round(100 * report.saving_bytes / report.dense_training_bytes, 1)})
            print(rows[-1], flush=True)
    return rows, best


def measured_part(args):
    from dgst_tf import data
    from dgst_tf.planning.contribution import FineTuneSettings, candidate_layers, measure_contributions
    from dgst_tf.training.selection import StaticChannelSelection
    from dgst_tf.training.sparse_model import SparseUpdateModel

    size = (args.measure_image_size, args.measure_image_size)
    common = dict(image_size=size, preprocessing="torch", seed=args.seed)
    train = data.cifar10("train", batch_size=64, limit=args.train_examples,
                         validation_split=0.2, subset="training", **common)
    val = data.cifar10("train", batch_size=64, limit=args.validation_examples,
                       validation_split=0.2, subset="validation", **common)
    test = data.cifar10("test", batch_size=64, limit=args.test_examples, **common)
    model = mobilenet_v2(1.0, (*size, 3), classes=10, weights="imagenet", seed=args.seed)
    layers = candidate_layers(model, last=args.measure_last_convs)
    settings = FineTuneSettings(steps=args.contribution_steps, batch_size=args.batch_size,
                                learning_rate=args.learning_rate, seed=args.seed)
    batches = list(train.dataset.as_numpy_iterator())  # decoded once, reused by every run
    x_train = np.concatenate([x for x, _ in batches])
    y_train = np.concatenate([y for _, y in batches])
    start = time.time()
    table = measure_contributions(model, (x_train, y_train), val, layers=layers,
                                  settings=settings)
    contribution_seconds = time.time() - start
    memory_model = MemoryModel(model)
    rows, best = search_rows(model, table, args.budgets, args.measure_evaluations, args.seeds,
                             memory_model, part="measured")
    classifier_only = UpdateScheme.last_layer(model)
    report = memory_model.report(classifier_only)
    rows.insert(0, {"part": "measured", "scheme": "classifier only", "budget_kb": "-",
                    "method": "reference", "gain_mean": 0.0, "backward_config": "0 / - / -",
                    "lin_kb": round(report.extra_memory_kb, 2),
                    "training_peak_kb": round(report.training_peak_bytes / KB, 1)})
    best[("-", "reference")] = classifier_only
    # every scheme trains on the same examples in the same order (paired comparison)
    rng = np.random.default_rng(args.seed)
    needed = args.final_steps * args.batch_size
    order = np.concatenate([rng.permutation(len(x_train))
                            for _ in range(-(-needed // len(x_train)))])[:needed]
    x_final, y_final = x_train[order], y_train[order]
    for row in rows:
        result = best[(row["budget_kb"], row["method"])]
        scheme = getattr(result, "scheme", result)
        runtime.seed_everything(args.seed)
        clone = mobilenet_v2(1.0, (*size, 3), classes=10, weights="imagenet", seed=args.seed)
        sparse = SparseUpdateModel(clone, scheme)
        sparse.compile(optimizer=keras.optimizers.SGD(args.learning_rate),
                       loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                       metrics=["accuracy"])
        start = time.time()
        sparse.fit(x_final, y_final, batch_size=args.batch_size, shuffle=False, epochs=1,
                   verbose=0, callbacks=[StaticChannelSelection("magnitude+", seed=args.seed)])
        row["test_top1"] = round(float(sparse.evaluate(test.dataset, verbose=0)[1]), 4)
        row["train_s"] = round(time.time() - start, 1)
        print(row, flush=True)
    settings = {"model": f"MobileNetV2-1.0 ImageNet, {size[0]}x{size[1]}", "layers": layers,
                "train": train.num_examples, "validation": val.num_examples,
                "test": test.num_examples, "contribution_runs_s": round(contribution_seconds),
                "contribution_steps": args.contribution_steps,
                "final_steps": args.final_steps, "batch_size": args.batch_size,
                "learning_rate": args.learning_rate, "baseline_val_top1":
                table.baseline_accuracy, "bias_gain": table.bias_gain,
                "evaluations": args.measure_evaluations, "seeds": args.seeds}
    print(_report.write(f"{args.name}_measured", settings, rows, [
        "budget_kb", "method", "gain_mean", "backward_config", "lin_kb", "training_peak_kb",
        "test_top1", "train_s"]))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budgets", type=int, nargs="+", default=[49, 74, 99, 124, 148],
                   help="extra-memory budgets in KB")
    p.add_argument("--evaluations", type=int, default=2000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--measure", action="store_true",
                   help="also measure contributions and accuracy on CIFAR-10")
    p.add_argument("--measure-image-size", type=int, default=64)
    p.add_argument("--measure-evaluations", type=int, default=300,
                   help="search evaluations on the measured table")
    p.add_argument("--measure-last-convs", type=int, default=24,
                   help="candidate layers: the 1x1 convs among this many last convs")
    p.add_argument("--train-examples", type=int, default=1000)
    p.add_argument("--validation-examples", type=int, default=500)
    p.add_argument("--test-examples", type=int, default=1000)
    p.add_argument("--contribution-steps", type=int, default=60)
    p.add_argument("--final-steps", type=int, default=250)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--learning-rate", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="memory_schemes")
    args = p.parse_args()
    runtime.limit_threads()
    from dgst_tf.planning.contribution import analytic_contributions

    ours = mobilenet_v2(0.35, (128, 128, 3), classes=10, weights=None)
    rows = published_rows(ours, nomix(ours))
    for row in rows:
        print(row, flush=True)
    memory_model = MemoryModel(ours)
    table = analytic_contributions(ours)
    found, best = search_rows(ours, table, args.budgets, args.evaluations, args.seeds,
                              memory_model)
    rows += found
    chart_budget = 99 if 99 in args.budgets else args.budgets[0]
    chart = plot_memory(memory_model.report(best[(chart_budget, "evolutionary")].scheme),
                        os.path.join(RESULTS, f"{args.name}_{chart_budget}kb.png"))
    full = memory_model.report(UpdateScheme.full(ours))
    settings = {
        "model": "MobileNetV2-0.35 (torchvision graph, random init), 128x128x3, 10 classes",
        "contributions": "analytic proxy (dgst_tf.planning.contribution.analytic_contributions)",
        "candidate_layers": table.layers, "evaluations": args.evaluations,
        "seeds": args.seeds, "memory_settings": memory_model.settings,
        "inference_peak_kb": round(full.forward_peak_bytes / KB, 1),
        "dense_training_kb": round(full.training_peak_bytes / KB, 1),
        "dense_peak_at": f"{full.peak_phase} {full.peak_layer}", "chart": chart}
    print(_report.write(args.name, settings, rows, [
        "scheme", "backward_config", "published_kb", "lin_kb_nomix", "lin_kb", "gain_mean",
        "gain_min", "gain_max", "training_peak_kb", "dense_kb", "saving_pct"]))
    if args.measure:
        measured_part(args)


if __name__ == "__main__":
    main()
