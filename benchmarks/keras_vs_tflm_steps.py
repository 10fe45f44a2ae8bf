"""Keras int8 QAS simulation vs the exported TFLM training graph, step by step.

ImageNet MobileNetV2-1.0 (BatchNorm folded), new 10-class head, tiny-training's 49 KB
backward_config (Lin et al. 2022; `LIN_49KB` of tflm_training_memory.py), lr 0.001, batch 1,
stochastic rounding (seed 0), the same CIFAR-10 training images in the same order on both
sides (64 other training images calibrate the int8 graph):

    DGST_CIFAR10=../shared/datasets/cifar10-jpeg.tar.gz \
        python benchmarks/keras_vs_tflm_steps.py --steps 100 --image-size 96   # ~6 min
    python benchmarks/keras_vs_tflm_steps.py --steps 5 --image-size 32 --name smoke

(a) TFLM: `export_training(..., policy=None (static) or "traversal", rounding="stochastic",
output_params=True)` and `train_tflm`, which returns every step's trainable tensors and, for
"traversal", every step's kept channels. (b) Keras: `int8_training_graph` (the device's
algorithm: the TFLite converter's int8 parameters, TFLM's integer forward pass with its
fixed-point requantization, int8 ADD and MEAN and int8 logits; the device's backward with
1-bit ReLU masks from the int8 outputs and per-tensor int8 error signals) +
`SparseUpdateModel` + `QuantizationAwareScalingSGD(rounding="stochastic")` (the device's
update, int32 biases rounded to nearest) with `StaticChannelSelection` (then forced to the
export's channels if they differ: reported) or `DynamicChannelSelection(traversal=True)`
(DGSU, Li & Chang 2024). Per step and weight-updated layer: do the chosen channels agree,
fraction of int8 weights identical, max |difference| in LSB; per step both losses; at the
end, per layer, the fraction of trainable weights that moved from their initial values on
each side and how many int32 biases are identical (all bias-updated layers). Also the
Keras step speed (images/s after the first, traced, step) and the largest int32 accumulator
of the Keras forward pass on the training images (float32 is exact below 2**24). Writes
benchmarks/results/<name>.{json,md} (per-step curves in the JSON rows' ``per_step``).
"""
import argparse
import pathlib
import tempfile
import time

import numpy as np

import _report
from tflm_training_memory import LIN_49KB

from dgst_tf import data, models
from dgst_tf.core import runtime
from dgst_tf.core.bn_folding import fold_batchnorm
from dgst_tf.core.layer_kinds import kernel_of, tflite_kernel_layout
from dgst_tf.export.training import export_training, initial_params, train_tflm
from dgst_tf.training.int8_graph import int8_training_graph, max_accumulator
from dgst_tf.training.qas import QuantizationAwareScalingSGD
from dgst_tf.training.scheme import UpdateScheme
from dgst_tf.training.selection import DynamicChannelSelection, StaticChannelSelection
from dgst_tf.training.sparse_model import SparseUpdateModel


def _arguments():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--calibration-examples", type=int, default=64)
    p.add_argument("--learning-rate", type=float, default=0.001)
    p.add_argument("--policies", nargs="+", default=["static", "traversal"],
                   choices=["static", "traversal"])
    p.add_argument("--data", default=None, help="CIFAR-10 folder or archive (default: "
                   "$DGST_CIFAR10, then the shared copy)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="keras_vs_tflm_steps")
    return p.parse_args()


def _images(args):
    """(train x, train y, calibration x): disjoint class-balanced CIFAR-10 training images."""
    size = (args.image_size, args.image_size)
    x, y = data.load_arrays("cifar10", "train", path=args.data, image_size=size,
                            limit=args.steps + args.calibration_examples, seed=args.seed)
    return x[:args.steps], y[:args.steps], x[args.steps:]


def _model(args):
    size = (args.image_size, args.image_size, 3)
    return fold_batchnorm(models.mobilenet_v2(1.0, size, classes=10, weights="imagenet",
                                              seed=args.seed))


def run_tflm(args, model, scheme, calibration, x, y, policy, folder) -> dict:
    """Per weight-updated layer: initial weights, per-step weights (TFLite layout, the kept
    slice for a static selection in RAM), per-step kept channels; per-step losses."""
    info = export_training(model, scheme, calibration, folder / f"{policy}.tflite",
                           learning_rate=args.learning_rate,
                           policy=None if policy == "static" else policy,
                           rounding="stochastic", seed=args.seed, output_params=True)
    start = time.time()
    run = train_tflm(info.path, x, y)
    seconds = time.time() - start
    names, first = run.manifest["outputs"], initial_params(info.path)
    layers = {}
    biases = {entry["layer"]: run.params[f"{entry['layer']}/bias"]
              for entry in run.manifest["params"] if entry["param"] == "bias"}
    for entry in run.manifest["params"]:
        if entry["param"] != "weights":
            continue
        name = entry["layer"]
        static = next(l["kept"] for l in run.manifest["layers"] if l["name"] == name)
        kept = (run.kept[f"{name}/kept"] if f"{name}/kept" in run.kept else
                None if static is None else np.tile(static, (len(x), 1)))
        layers[name] = {"initial": first[f"{name}/weights"], "kept": kept,
                        "slice": entry.get("kept"),
                        "per_step": run.result.outputs[names.index(f"{name}/weights")]}
    return {"layers": layers, "biases": biases, "losses": run.losses.astype(float),
            "seconds": seconds, "arena_kb": round(run.arena_bytes / 1024, 1)}


def keras_model(args, model, scheme, calibration, policy, tflm) -> tuple:
    """(sparse Keras model on the int8 graph, its graph, {layer: static channels forced to
    the export's} or {})."""
    graph = int8_training_graph(model, calibration)
    sparse = SparseUpdateModel(graph.model, scheme, fold_bn=False)
    sparse.compile(optimizer=QuantizationAwareScalingSGD(
        args.learning_rate, graph.qas_scales, rounding="stochastic", seed=args.seed),
        loss=graph.loss)  # the device's softmax cross-entropy gradient
    callback = (StaticChannelSelection("magnitude+") if policy == "static"
                else DynamicChannelSelection("weight_l2", traversal=True, seed=args.seed))
    callback.set_model(sparse)
    callback.on_train_begin()  # installs the per-step hook (traversal) or picks once
    forced = {}
    if policy == "static":
        for name in sparse.selection.specs:
            want = np.sort(tflm["layers"][name]["kept"][0])
            have = np.sort(sparse.selection.numpy(name)["indices"])
            if not np.array_equal(want, have):
                forced[name] = int(len(np.setdiff1d(want, have)))
                sparse.selection.assign(name, want)
    return sparse, graph, forced


def compare_step(name: str, tflm_layer: dict, keras_w: np.ndarray, keras_kept, step: int):
    """One step, one layer: (channels agree or None, identical fraction, identical fraction
    among the weights either side moved, max |difference| in LSB) over its trainable
    weights (the kept slice for a static selection, else the whole kernel)."""
    tflm_w = tflm_layer["per_step"][step].astype(np.int32)
    first = tflm_layer["initial"].astype(np.int32)
    keras_w = np.round(keras_w).astype(np.int32)
    if tflm_layer["slice"] is not None:  # static: the RAM copy of the kept channels
        keras_w, first = keras_w[..., tflm_layer["slice"]], first[..., tflm_layer["slice"]]
    if tflm_w.shape != keras_w.shape:
        raise ValueError(f"{name}: TFLM {tflm_w.shape} vs Keras {keras_w.shape}")
    kept = tflm_layer["kept"]
    agree = None if kept is None or keras_kept is None else bool(
        np.array_equal(np.sort(kept[step]), np.sort(keras_kept)))
    moved = (tflm_w != first) | (keras_w != first)
    same = tflm_w == keras_w
    return (agree, float(same.mean()),
            float(same[moved].mean()) if moved.any() else 1.0,
            int(np.abs(tflm_w - keras_w).max()))


def run_keras(args, model, scheme, calibration, x, y, policy, tflm) -> dict:
    """Train the Keras int8 simulation on the same images; compare with ``tflm`` after
    every step. Returns per-step curves per layer, the losses and the final kernels."""
    sparse, graph, forced = keras_model(args, model, scheme, calibration, policy, tflm)
    curves = {name: {"channels_agree": [], "identical": [], "identical_moved": [],
                     "max_lsb": []} for name in tflm["layers"]}
    accumulator = max_accumulator(graph, x)
    losses, step_seconds = [], []
    for s in range(len(x)):
        start = time.perf_counter()
        logs = sparse.train_on_batch(x[s:s + 1], y[s:s + 1], return_dict=True)
        step_seconds.append(time.perf_counter() - start)
        losses.append(float(logs["loss"]))
        for name, layer in tflm["layers"].items():
            kernel = tflite_kernel_layout(kernel_of(graph.model.get_layer(name)).numpy())
            kept = (sparse.selection.numpy(name)["indices"]
                    if name in sparse.selection.specs else None)
            values = compare_step(name, layer, kernel, kept, s)
            for key, value in zip(curves[name], values):
                curves[name][key].append(value)
    final = {name: np.round(tflite_kernel_layout(kernel_of(graph.model.get_layer(name)).numpy()))
             for name in tflm["layers"]}
    biases = {name: np.round(graph.model.get_layer(name).bias.numpy()).astype(np.int64)
              for name in tflm["biases"]}
    return {"curves": curves, "losses": np.array(losses), "final": final, "forced": forced,
            "biases": biases, "seconds": float(sum(step_seconds)),
            "images_per_s": (len(x) - 1) / sum(step_seconds[1:]) if len(x) > 1 else None,
            "max_accumulator": accumulator}


def moved_fraction(initial, final, kept_slice) -> float:
    """Fraction of the trainable weights (the kept slice if static) that left their
    initial value."""
    initial, final = np.asarray(initial, np.int32), np.asarray(final, np.int32)
    if kept_slice is not None:
        final = final[..., kept_slice] if final.shape == initial.shape else final
        initial = initial[..., kept_slice]
    return float((initial != final).mean())


def _pct(value):
    return None if value is None else round(100 * value, 2)


def layer_rows(policy: str, tflm: dict, keras_run: dict) -> list:
    """One summary row per weight-updated layer, with its per-step curves."""
    rows = []
    for name, layer in tflm["layers"].items():
        curve = keras_run["curves"][name]
        agree = [a for a in curve["channels_agree"] if a is not None]
        diverged = [s for s, a in enumerate(curve["channels_agree"]) if a is False]
        kept = layer["kept"]
        rows.append({
            "policy": policy, "layer": name,
            "kept": "all" if kept is None else f"{kept.shape[1]}/{layer['initial'].shape[-1]}",
            "channels_agree_pct": _pct(np.mean(agree)) if agree else None,
            "first_channel_divergence": diverged[0] if diverged else None,
            "identical_final_pct": _pct(curve["identical"][-1]),
            "identical_mean_pct": _pct(np.mean(curve["identical"])),
            "identical_of_moved_final_pct": _pct(curve["identical_moved"][-1]),
            "max_lsb_final": curve["max_lsb"][-1], "max_lsb_any_step": max(curve["max_lsb"]),
            "moved_tflm_pct": _pct(moved_fraction(layer["initial"], layer["per_step"][-1],
                                                  layer["slice"])),
            "moved_keras_pct": _pct(moved_fraction(layer["initial"], keras_run["final"][name],
                                                   layer["slice"])),
            "static_channels_forced": keras_run["forced"].get(name),
            **bias_agreement(tflm["biases"][name], keras_run["biases"][name]),
            "per_step": curve})
    return rows


def bias_agreement(tflm_bias, keras_bias) -> dict:
    """Identical int32 biases at the end, and the largest difference."""
    tflm_bias, keras_bias = np.asarray(tflm_bias, np.int64), np.asarray(keras_bias, np.int64)
    return {"bias_identical_final_pct": _pct(float((tflm_bias == keras_bias).mean())),
            "bias_max_diff_final": int(np.abs(tflm_bias - keras_bias).max())}


def bias_only_row(policy: str, tflm: dict, keras_run: dict) -> dict:
    """The bias-only layers together: identical int32 biases at the end."""
    names = [n for n in tflm["biases"] if n not in tflm["layers"]]
    both = [np.concatenate([np.ravel(side[n]) for n in names]).astype(np.int64)
            for side in (tflm["biases"], keras_run["biases"])]
    return {"policy": policy, "layer": f"(biases of {len(names)} bias-only layers)",
            **bias_agreement(*both)}


def loss_row(policy: str, tflm: dict, keras_run: dict) -> dict:
    """The two loss curves and how close they are."""
    a, b = tflm["losses"], keras_run["losses"]
    tenth = max(1, len(a) // 10)
    return {"policy": policy, "layer": "(loss)",
            "loss_tflm_first_last_tenth": f"{a[:tenth].mean():.3f} -> {a[-tenth:].mean():.3f}",
            "loss_keras_first_last_tenth": f"{b[:tenth].mean():.3f} -> {b[-tenth:].mean():.3f}",
            "loss_max_abs_diff": float(f"{np.abs(a - b).max():.2g}"),
            "loss_mean_abs_diff": float(f"{np.abs(a - b).mean():.2g}"),
            "loss_corr": round(float(np.corrcoef(a, b)[0, 1]), 4) if len(a) > 2 else None,
            "tflm_s": round(tflm["seconds"], 1), "keras_s": round(keras_run["seconds"], 1),
            "keras_images_per_s": (None if keras_run["images_per_s"] is None
                                   else round(keras_run["images_per_s"], 2)),
            "keras_max_accumulator": int(keras_run["max_accumulator"]),
            "arena_kb": tflm["arena_kb"],
            "per_step": {"loss_tflm": [round(float(v), 5) for v in a],
                         "loss_keras": [round(float(v), 5) for v in b]}}


COLUMNS = ["policy", "layer", "kept", "channels_agree_pct", "first_channel_divergence",
           "identical_final_pct", "identical_of_moved_final_pct", "max_lsb_final",
           "max_lsb_any_step", "moved_tflm_pct", "moved_keras_pct", "static_channels_forced",
           "bias_identical_final_pct", "bias_max_diff_final",
           "loss_tflm_first_last_tenth", "loss_keras_first_last_tenth", "loss_max_abs_diff",
           "loss_mean_abs_diff", "loss_corr", "tflm_s", "keras_s", "keras_images_per_s",
           "keras_max_accumulator"]


def main():
    args = _arguments()
    runtime.limit_threads(1)
    runtime.seed_everything(args.seed)
    x, y, calibration = _images(args)
    model = _model(args)
    scheme = UpdateScheme.from_backward_config(model, *LIN_49KB)
    settings = dict(vars(args)) | {
        "model": "MobileNetV2-1.0 ImageNet (torchvision), BatchNorm folded, new 10-class head"
                 " (its Dropout is not part of either training step)",
        "scheme": "tiny-training 49KB backward_config: n_bias 16, idx 36-39-40-41-42-45-48-49, "
                  "ratios 1-1-0-0.25-0.125-0.125-0.125-0.125 (+ classifier in full)",
        "data": "CIFAR-10 training images (class-balanced, torch preprocessing); calibration "
                "= other training images", "rounding": "stochastic, seed 0, both sides",
        "identical": "over the trainable weights: the kept slice (static) or whole kernel"}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for policy in args.policies:
            tflm = run_tflm(args, model, scheme, calibration, x, y, policy, pathlib.Path(tmp))
            print(f"{policy}: TFLM {tflm['seconds']:.0f} s", flush=True)
            keras_run = run_keras(args, model, scheme, calibration, x, y, policy, tflm)
            rows += layer_rows(policy, tflm, keras_run) + [
                bias_only_row(policy, tflm, keras_run), loss_row(policy, tflm, keras_run)]
            print(_report.write(args.name, settings, rows, COLUMNS), flush=True)


if __name__ == "__main__":
    main()
