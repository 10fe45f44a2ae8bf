"""TFLM arena of the exported training step, and 100 training steps in TFLM on CIFAR-10.

    python benchmarks/tflm_training_memory.py --learning-rates 0.001 0.002   # ~4 min
    python benchmarks/tflm_training_memory.py --skip-cifar     # memory only, ~6 min

1. Memory: MobileNetV2 width 0.35 at 128x128 with tiny-training's published 49 KB scheme
   (Lin et al.), exported by `dgst_tf.export.export_training` and run for one step in the
   pip TFLM interpreter: TFLM's arena report (activations/scratch "head", persistent
   "tail" with its categories) against the analytic memory model (`dgst_tf.planning.memory`,
   compared with `memory_report.compare_with_tflm`), TinyEngine's 141 KB and the 256 KB
   budget; with and without folding explicit PADs into exact SAME convolutions, fusing
   the frozen blocks in front of the first updated layer (`DGST_FUSED_BLOCK`) and the
   convolutions' requantization constants in flash (`DGST_CONV2D`), all defaults of
   `export_training`, with static and with on-device DGSU selection (`policy="traversal"`),
   and the inference-only model for reference; also at 96x96 (--sizes). Weights do not
   change memory: random init. Issue 21's rows: TFLM's offline memory plan with the ops
   that compute in place (`dgst_tf.export.training.offline_plan`) and weight gradients in
   chunks (`offline_plan=`, `weight_grad_chunk_bytes=`, defaults of `export_training`)
   against the same graph planned online by TFLM with whole gradients; the memory model's
   arena for the 64-bit host (against TFLM's report) and for a 32-bit Cortex-M TFLM
   (analytic: the same tensors, 32-bit structs). The device pipeline's graph too (a pruned
   MobileNetV2 with its DGSU scheme, the firmware graph ``dgst device`` writes;
   --device-run reads a finished run's pruned.keras and scheme.json): analytic vs TFLM.
2. CIFAR-10: ImageNet MobileNetV2 (width 1.0, the pretrained width offline) with the same
   scheme, N steps in TFLM (batch 1, int8, QAS) on real CIFAR-10 training images: loss of
   the first and last tenth of the steps, held-out accuracy before and after (updated
   weights written back into an inference model and run in TFLM).

Writes benchmarks/results/tflm_training_memory.{json,md} and tflm_training_cifar10.*.
"""
import argparse
import json
import pathlib
import tempfile
import time

import _report
import numpy as np

from dgst_tf.core import runtime
from dgst_tf.core.bn_folding import fold_batchnorm
from dgst_tf.core.keras_compat import keras
from dgst_tf.cli.export import load_arrays
from dgst_tf.export.inference import export_int8
from dgst_tf.export.tflm.runner import run_tflm
from dgst_tf.export.training import (export_training, initial_params, run_inference_tflm,
                                     train_tflm, write_inference_model)
from dgst_tf.planning.arena_plan import DEFAULT_WEIGHT_GRAD_CHUNK_BYTES
from dgst_tf.planning.memory import KB, MemoryModel
from dgst_tf.planning.memory_report import compare_with_tflm
from dgst_tf.models import mobilenet_v2
from dgst_tf.training.scheme import UpdateScheme

# mit-han-lab/tiny-training, compilation/mcu_ir_gen.py, sparse_update_config["mbv2"] (49 KB)
LIN_49KB = (16, [36, 39, 40, 41, 42, 45, 48, 49], [1, 1, 0, 0.25, 0.125, 0.125, 0.125, 0.125])
TINYENGINE_KB = 141
BUDGET_KB = 256


def _kb(n):
    return round(n / KB, 1)


def memory_rows(args, tmp):
    rows, settings = [], {}
    for n, size in enumerate(args.sizes):
        settings[size], more = _memory_rows(args, tmp, size, full=n == 0)
        rows += more
    return {"model": "mobilenet_v2 w0.35, 10 classes, random init (memory does not depend "
                     "on the weights)",
            "scheme": "tiny-training 49KB: n_bias 16, idx 36-39-40-41-42-45-48-49, ratios "
                      "1-1-0-0.25-0.125-0.125-0.125-0.125",
            "analytic": settings,
            "note": "head = activations + scratch (TFLM's planner); tail = persistent: the "
                    "trainable tensors (variables_kb: kept-channel weights and biases, or "
                    "under DGSU the whole kernels of weight-updated layers and the visited "
                    "bitmasks) + TFLM's per-op data (op_data_kb: with builtin convolutions "
                    "their per-channel multipliers/shifts, 8 bytes per output channel; with "
                    "DGST_CONV2D those are flash constants, counted in file_kb), per-channel "
                    "quantization arrays, node and tensor structs. analytic_held_kb: the "
                    "memory model's SRAM parameters + optimizer/selection state (TFLM's "
                    "variables + the int32 kept indices of on-device selection)"}, rows


def _memory_rows(args, tmp, size, full):
    model = fold_batchnorm(mobilenet_v2(0.35, (size, size, 3), classes=10, weights=None,
                                        seed=args.seed))
    scheme = UpdateScheme.from_backward_config(model, *LIN_49KB)
    report = MemoryModel(model).report(scheme)
    images, labels = load_arrays("cifar10", args.data, "train", (size, size), 32, args.seed)
    rows = []
    inference = export_int8(model, images, tmp / "inference.tflite")
    result = run_tflm(inference.path, [np.clip(np.round(images[:1] / inference.input.scale)
                                               + inference.input.zero_point, -128, 127)
                                       .astype(np.int8)])
    rows.append({"model": f"{size}x{size} inference (export_int8, explicit PAD)", "arena_kb":
                 _kb(result.arena_bytes), "head_kb": _kb(result.arena_head_bytes),
                 "tail_kb": _kb(result.arena_tail_bytes),
                 "analytic_kb": _kb(report.forward_peak_bytes), "analytic_what": "inference peak"})
    bias_only = UpdateScheme.from_backward_config(model, LIN_49KB[0], "", "")
    # (fold PADs, trainable tensors as outputs, scheme, fuse frozen blocks, device policy,
    #  requantization constants in flash, offline memory plan + chunked weight gradients)
    variants = ([(False, True, scheme, False, None, False, False),
                 (True, True, scheme, False, None, False, False),
                 (True, False, scheme, False, None, False, False),
                 (True, False, scheme, True, None, False, False),
                 (True, False, scheme, True, "traversal", False, False),
                 (True, False, scheme, True, None, True, False),
                 (True, False, scheme, True, "traversal", True, False)] if full else []) + [
        (True, False, scheme, True, None, True, True),
        (True, False, scheme, True, "traversal", True, True),
        (True, False, bias_only, True, None, True, True)]
    for fold, outputs, chosen, fuse, policy, flash, planned in variants:
        options = dict(fold_pads=fold, output_params=outputs, fuse_blocks=fuse,
                       requant_in_flash=flash, offline_plan=planned)
        memory = MemoryModel(model, policy=policy, **options,
                             weight_grad_chunk_bytes=DEFAULT_WEIGHT_GRAD_CHUNK_BYTES
                             if planned else 0)
        report = memory.report(chosen)
        info = export_training(model, chosen, images, tmp / f"train_{fold}.tflite",
                               learning_rate=0.001, policy=policy, **options,
                               weight_grad_chunk_bytes=DEFAULT_WEIGHT_GRAD_CHUNK_BYTES
                               if planned else 0)
        run = train_tflm(info.path, images[:2], labels[:2])
        rows.append(_training_row(size, run, info, report, memory, chosen, policy,
                                  (fold, outputs, fuse, flash, planned, chosen is bias_only)))
    settings = {}
    for label, fuse, dgsu in (("", False, False), ("fused_", True, False),
                              ("fused_dgsu_", True, True)):
        lin = MemoryModel(model, fused_blocks=fuse, rounding="stochastic",
                          full_weights_in_sram=dgsu).report(scheme)
        settings |= {f"{label}inference_peak_kb": _kb(lin.forward_peak_bytes),
                     f"{label}training_peak_kb": _kb(lin.training_peak_bytes),
                     f"{label}peak_at": f"{lin.peak_phase} {lin.peak_layer}"}
    return settings, rows


def _variant_label(size, info, policy, fold, outputs, fuse, flash, planned, bias_only):
    return (f"{size}x{size} training step"
            + (", bias-only last 16 + classifier" if bias_only else "")
            + (", PADs folded into SAME convs" if fold else ", explicit PAD")
            + (f", {info.manifest['fused_blocks']} frozen blocks fused" if fuse else "")
            + (f", DGSU {policy} selection on device" if policy else "")
            + (", requantization in flash (DGST_CONV2D)" if flash
               else ", builtin convs (requantization in arena)")
            + (", offline memory plan (in-place ops) + chunked weight gradients" if planned
               else ", TFLM's online plan")
            + (", trainable tensors as outputs (host read-back)" if outputs
               else " (firmware graph: loss + logits out)"))


def _training_row(size, run, info, report, memory, chosen, policy, flags) -> dict:
    """One training-step row: TFLM's arena and its categories, the memory model's."""
    fold, outputs, fuse, flash, planned, bias_only = flags
    cats = run.result.allocations
    compare_with_tflm(report, run.arena_bytes, what="arena")  # prints the comparison
    cortex_m = MemoryModel(memory.model, policy=policy, fold_pads=fold,
                           output_params=outputs, fuse_blocks=fuse, requant_in_flash=flash,
                           offline_plan=planned, tflm_target="cortex-m",
                           weight_grad_chunk_bytes=memory.weight_grad_chunk_bytes)
    return {
        "model": _variant_label(size, info, policy, fold, outputs, fuse, flash, planned,
                                bias_only),
        "arena_kb": _kb(run.arena_bytes), "head_kb": _kb(run.result.arena_head_bytes),
        "tail_kb": _kb(run.result.arena_tail_bytes),
        "variables_kb": _kb(cats.get("TfLiteTensor variable buffer data", 0)),
        "op_data_kb": _kb(cats.get("Persistent buffer data", 0)),
        "structs_kb": _kb(cats.get("TfLiteEvalTensor data", 0)
                          + cats.get("NodeAndRegistration struct", 0)),
        "quant_params_kb": _kb(cats.get("Persistent TfLiteTensor quantization data", 0)),
        "analytic_arena_kb": _kb(report.arena_bytes),
        "analytic_vs_tflm_pct": round(100 * (report.arena_bytes / run.arena_bytes - 1), 2),
        "analytic_32bit_kb": _kb(cortex_m.arena_bytes(chosen)),
        "analytic_training_peak_kb": _kb(report.training_peak_bytes),
        "lin_label_kb": round(report.extra_memory_kb, 1), "tinyengine_kb": TINYENGINE_KB,
        "fits_141kb": run.arena_bytes <= TINYENGINE_KB * KB,
        "trainable_params_kb": _kb(sum(
            int(np.prod(p["shape"])) * np.dtype(p["dtype"]).itemsize
            for p in info.manifest["params"])),
        "file_kb": _kb(info.manifest["size_bytes"])}


def device_rows(args, tmp) -> list:
    """The device pipeline's graph: a pruned MobileNetV2 with its DGSU scheme, exported as
    ``dgst device`` exports deploy_train.tflite (a finished run's pruned.keras and
    scheme.json with --device-run, else a seeded 40% channel-group pruning of MobileNetV2
    1.0 at --device-size with `dgsu_scheme`)."""
    from dgst_tf.jobs.device_plan import device_export_options, dgsu_scheme, export_deployable

    if args.device_run:
        folder = pathlib.Path(args.device_run)
        model = fold_batchnorm(keras.models.load_model(folder / "pruned.keras",
                                                       compile=False))
        scheme = UpdateScheme.from_config(json.loads((folder / "scheme.json").read_text()))
        what = f"pruned model and scheme of a `dgst device` run ({folder.name})"
    else:
        model = fold_batchnorm(_pruned(args.device_size, args.seed))
        scheme = dgsu_scheme(model, 2, 0.02, args.seed)
        what = "MobileNetV2 1.0, seeded 40% of channel groups removed"
    size = model.inputs[0].shape[1]
    images = np.random.default_rng(args.seed).uniform(-1, 1, (8, size, size, 3)).astype(
        np.float32)
    path = export_deployable(model, scheme, images, tmp / "deploy_train.tflite",
                             num_samples=8, **device_export_options(0.001, args.seed))
    run = train_tflm(path, images[:2], np.array([1, 2]))
    rows = []
    for target in ("host", "cortex-m"):
        memory = MemoryModel(model, policy="traversal", output_params=False,
                             tflm_target=target)
        analytic = memory.arena_bytes(scheme)
        rows.append({"model": f"{what}, {size}x{size}, DGSU traversal firmware graph",
                     "target": target, "analytic_arena_kb": _kb(analytic),
                     "tflm_arena_kb": _kb(run.arena_bytes) if target == "host" else None,
                     "analytic_vs_tflm_pct": round(100 * (analytic / run.arena_bytes - 1), 2)
                     if target == "host" else None,
                     "head_kb": _kb(run.result.arena_head_bytes)})
    return rows


def _pruned(size: int, seed: int):
    from dgst_tf.pruning import DependencyGraph, remove_channels

    model = mobilenet_v2(1.0, (size, size, 3), classes=10, weights=None, seed=seed)
    groups = [g.index for g in DependencyGraph(model).groups()]
    dropped = np.random.default_rng(seed).choice(groups, int(0.4 * len(groups)),
                                                 replace=False)
    return remove_channels(model, sorted(int(g) for g in dropped))


def moved_weights(before: dict, after: dict) -> str:
    """Per weight-updated layer, the fraction of its trainable int8 weights that changed."""
    parts = []
    for name, value in before.items():
        if name.endswith("/weights") and name in after:
            moved = float(np.mean(np.asarray(after[name]) != np.asarray(value)))
            parts.append(f"{name[:-len('/weights')]} {100 * moved:.0f}%")
    return ", ".join(parts)


def cifar_rows(args, tmp):
    size = (args.cifar_image_size, args.cifar_image_size)
    model = mobilenet_v2(1.0, (*size, 3), classes=10, weights="imagenet", seed=args.seed)
    scheme = UpdateScheme.from_backward_config(fold_batchnorm(model), *LIN_49KB)
    calib, _ = load_arrays("cifar10", args.data, "train", size, 64, args.seed + 1)
    x, y = load_arrays("cifar10", args.data, "train", size, args.steps, args.seed)
    xt, yt = load_arrays("cifar10", args.data, "test", size, args.test_examples, args.seed)
    rows = []
    runs = [(p, lr, r) for p in args.policies for lr in args.learning_rates
            for r in args.roundings]
    for policy, lr, rounding in runs:
        info = export_training(model, scheme, calib, tmp / "cifar.tflite", learning_rate=lr,
                               policy=None if policy == "static" else policy,
                               rounding=rounding, seed=args.seed)
        start = time.time()
        run = train_tflm(info.path, x, y)
        seconds = time.time() - start
        spec = info.manifest["inputs"][0]
        q = np.clip(np.round(xt / spec["scale"]) + spec["zero_point"], -128, 127).astype(
            np.int8)[:, None]
        accuracy = {}
        for key, params in (("before", initial_params(info.path)), ("after", run.params)):
            path = write_inference_model(info.path, params, tmp / f"{key}.tflite")
            logits = run_inference_tflm(path, q).outputs[0].reshape(len(q), -1)
            accuracy[key] = float((logits.argmax(-1) == yt).mean())
        tenth = max(1, args.steps // 10)
        rows.append({"selection": policy, "learning_rate": lr, "rounding": rounding,
                     "steps": args.steps,
                     "loss_first_tenth": round(float(run.losses[:tenth].mean()), 4),
                     "loss_last_tenth": round(float(run.losses[-tenth:].mean()), 4),
                     "train_accuracy": round(float((run.predictions == y).mean()), 4),
                     "test_accuracy_before": accuracy["before"],
                     "test_accuracy_after": accuracy["after"],
                     "test_examples": len(yt), "arena_kb": _kb(run.arena_bytes),
                     "seconds": round(seconds, 1),
                     "moved_weights": moved_weights(initial_params(info.path), run.params)})
    settings = {"model": f"mobilenet_v2 w1.0 ImageNet, {size[0]}x{size[1]}, new 10-class head",
                "scheme": "tiny-training 49KB backward_config (same conv indices)",
                "data": "CIFAR-10 JPEG copy, class-balanced subsets, torch preprocessing",
                "selection": "static: top-k weight magnitude at export; traversal (DGSU: "
                             "unvisited channels first, then by integer weight-L2 score) / "
                             "magnitude: chosen on device every step (DGST_SELECT_CHANNELS)",
                "rounding": "stochastic: floor(u - step) with a counter-based hash u; "
                            "nearest: round to nearest (the previous rule)"}
    return settings, rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None, help="CIFAR-10 folder or archive (default: "
                                               "$DGST_CIFAR10 / ../shared/datasets)")
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 96],
                   help="input sizes of the memory part (the first also without PAD folding)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--test-examples", type=int, default=200)
    p.add_argument("--cifar-image-size", type=int, default=96)
    p.add_argument("--learning-rates", type=float, nargs="+", default=[0.001])
    p.add_argument("--policies", nargs="+", default=["static", "traversal"],
                   choices=("static", "traversal", "magnitude", "window"))
    p.add_argument("--roundings", nargs="+", default=["stochastic", "nearest"],
                   choices=("stochastic", "nearest"),
                   help="int8 weight-update rounding of the exported graph")
    p.add_argument("--skip-cifar", action="store_true")
    p.add_argument("--device-run", default=None,
                   help="a finished `dgst device` folder (pruned.keras, scheme.json) for the "
                        "device pipeline's graph; default: a seeded pruned MobileNetV2")
    p.add_argument("--device-size", type=int, default=64,
                   help="input size of the seeded pruned MobileNetV2 (no --device-run)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    runtime.limit_threads(1)
    with tempfile.TemporaryDirectory(prefix="dgst-bench-") as tmp:
        tmp = pathlib.Path(tmp)
        settings, rows = memory_rows(args, tmp)
        settings["device_graph"] = device_rows(args, tmp)
        print(_report.write("tflm_training_memory", settings, rows, [
            "model", "arena_kb", "head_kb", "tail_kb", "variables_kb", "op_data_kb",
            "structs_kb", "quant_params_kb", "analytic_kb", "analytic_what",
            "analytic_arena_kb", "analytic_vs_tflm_pct",
            "analytic_32bit_kb", "analytic_training_peak_kb", "lin_label_kb", "tinyengine_kb",
            "fits_141kb", "trainable_params_kb", "file_kb"]))
        if not args.skip_cifar:
            settings, rows = cifar_rows(args, tmp)
            print(_report.write("tflm_training_cifar10", settings, rows, [
                "selection", "learning_rate", "rounding", "steps", "loss_first_tenth",
                "loss_last_tenth", "train_accuracy", "test_accuracy_before",
                "test_accuracy_after", "test_examples", "arena_kb", "seconds",
                "moved_weights"]))


if __name__ == "__main__":
    main()
