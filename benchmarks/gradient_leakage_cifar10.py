"""Gradient leakage on CIFAR-10: what one batch-1 update gives back, per uplink scenario.

    nice -n 10 python benchmarks/gradient_leakage_cifar10.py --images 50 --width 0.35 \
        --weights none --ig-iterations 300 --ig-learning-rate 0.01 --dlg-iterations 100
    nice -n 10 python benchmarks/gradient_leakage_cifar10.py --model lenet --images 50 \
        --scenarios dense last_layer dense_int8 dense_dp dense_noise --ig-iterations 300 \
        --ig-learning-rate 0.1 --ig-signed --dlg-iterations 1000 --idlg-scenarios dense \
        last_layer dense_int8 dense_dp dense_noise --grid-attack idlg \
        --name gradient_leakage_cifar10_lenet

For each CIFAR-10 training image (class-balanced, seeded) and each scenario of
`dgst_tf.federated.leakage.what_is_sent.SCENARIOS` (dense float update, last layer, Lin et
al.'s static sparse update, DGSU, int8 payloads, clipped + noised), a float device
(`SimulatedDevice`: MobileNetV2, BatchNorm folded, the federated benchmark's model and
learning rate by default) takes one SGD step at batch 1 from the initial global model, and
the attacker inverts exactly the payload it would send (`observe`). Attacks: iDLG's label
rule on every image, Inverting Gradients (cosine + TV, signed Adam) with that label, and
optionally iDLG's and DLG's L-BFGS reconstructions. Writes benchmarks/results/<name>.{json,md}
(per scenario and attack: label recovery rate, mean / median PSNR and SSIM, payload bytes,
epsilon, seconds per attack), <name>_images.json (every image's numbers) and <name>.png
(originals above each scenario's reconstructions).

``--model lenet`` runs the same harness on Zhu et al.'s LeNet instead (sigmoid, no pooling,
weights uniform in [-0.5, 0.5], seeded): the model DLG was shown on, a control that the
attacks recover CIFAR-10 images when the architecture allows it (scenarios without
pointwise expansion convs only: no ``sparse_update`` / ``dgsu``).
"""
import argparse
import dataclasses
import os
import tempfile
import time

import _report
import numpy as np

from dgst_tf import data
from dgst_tf.core import runtime
from dgst_tf.core.files import write_json_atomically
from dgst_tf.core.keras_compat import keras
from dgst_tf.federated.config import FederatedConfig
from dgst_tf.federated.device import SimulatedDevice
from dgst_tf.federated.leakage import metrics
from dgst_tf.federated.leakage.attacks import DLG, IDLG, InvertingGradients
from dgst_tf.federated.leakage.labels import recover_label
from dgst_tf.federated.leakage.matching import GradientMatching
from dgst_tf.federated.leakage.what_is_sent import SCENARIOS, observe

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def _arguments():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    p.add_argument("--images", type=int, default=50)
    p.add_argument("--split", default="train")
    p.add_argument("--data", dest="data_path", default=None)
    p.add_argument("--model", default="mobilenet_v2", choices=("mobilenet_v2", "lenet"))
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--weights", default="imagenet", help="imagenet or none")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--learning-rate", type=float, default=0.005)
    p.add_argument("--target-fraction", type=float, default=0.02)
    p.add_argument("--ig-iterations", type=int, default=400)
    p.add_argument("--ig-learning-rate", type=float, default=0.1)
    p.add_argument("--tv", type=float, default=1e-4)
    p.add_argument("--ig-signed", action="store_true",
                   help="Adam on the sign of the image gradient (Geiping et al.'s default)")
    p.add_argument("--restarts", type=int, default=1)
    p.add_argument("--dlg-iterations", type=int, default=0,
                   help="L-BFGS iterations of iDLG and DLG (0: skip them)")
    p.add_argument("--idlg-scenarios", nargs="+", default=["dense"],
                   help="scenarios on which iDLG's L-BFGS reconstruction also runs")
    p.add_argument("--dlg-scenarios", nargs="+", default=["dense"],
                   help="scenarios on which DLG also runs")
    p.add_argument("--grid-images", type=int, default=10)
    p.add_argument("--grid-attack", default="inverting_gradients",
                   choices=("inverting_gradients", "idlg", "dlg"),
                   help="whose reconstructions the figure shows (Inverting Gradients where "
                        "that attack did not run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="gradient_leakage_cifar10")
    return p.parse_args()


def _lenet(path: str, image_size: int, seed: int) -> str:
    """Zhu et al.'s LeNet for CIFAR-10 (their DLG experiments), saved to ``path``."""
    init = keras.initializers.RandomUniform(-0.5, 0.5, seed=seed)
    image = keras.Input((image_size, image_size, 3))
    x = image
    for index, stride in enumerate((2, 2, 1)):
        x = keras.layers.Conv2D(12, 5, strides=stride, padding="same", activation="sigmoid",
                                kernel_initializer=init, bias_initializer=init,
                                name=f"conv{index}")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    out = keras.layers.Dense(10, kernel_initializer=init, bias_initializer=init,
                             name="classifier")(x)
    keras.Model(image, out, name="lenet").save(path)
    return path


def _devices(args, methods) -> dict:
    model = "mobilenet_v2"
    if args.model == "lenet":
        model = _lenet(os.path.join(tempfile.mkdtemp(), "lenet.keras"), args.image_size,
                       args.seed)
    base = FederatedConfig(dataset="cifar10", data_path=args.data_path, classes=10,
                           model=model,
                           width=args.width, image_size=args.image_size,
                           weights=None if args.weights == "none" else args.weights,
                           target_fraction=args.target_fraction,
                           learning_rate=args.learning_rate, sram_budget=None, seed=args.seed)
    return {m: SimulatedDevice(dataclasses.replace(base, method=m)) for m in methods}


def _images(args) -> tuple[np.ndarray, np.ndarray]:
    """(pixels in [0, 1], labels): class-balanced, seeded, no normalisation."""
    x, y = data.load_arrays("cifar10", args.split, path=args.data_path,
                            image_size=(args.image_size,) * 2, limit=args.images,
                            seed=args.seed, preprocessing=None)
    return np.clip(x / 255.0, 0.0, 1.0).astype(np.float32), y.astype(int)


class _Attacker:
    """One scenario's attacks on a copy of the model (traced once, reused per image)."""

    def __init__(self, args, model, seen, name: str):
        self.model = model
        self.matching = GradientMatching(model, seen, data.TORCH_MEAN, data.TORCH_STD)
        self.ig = InvertingGradients(self.matching, args.ig_iterations, args.ig_learning_rate,
                                     tv=args.tv, signed=args.ig_signed,
                                     restarts=args.restarts)
        self.dlg = {}
        if args.dlg_iterations and name in args.idlg_scenarios:
            self.dlg["idlg"] = IDLG(self.matching, args.dlg_iterations)
        if args.dlg_iterations and name in args.dlg_scenarios:
            self.dlg["dlg"] = DLG(self.matching, args.dlg_iterations)

    def attack(self, seen, seed: int) -> dict:
        self.matching.load(seen)
        label = recover_label(self.model, seen)
        found = {"inverting_gradients": self.ig.run(label, seed=seed)}
        for name, attack in self.dlg.items():
            found[name] = attack.run(label=label, seed=seed)
        return label, found


def _scenario(args, name, device, weights, pixels, labels) -> tuple[list, list]:
    scenario = SCENARIOS[name]
    attacker, rows, images = None, [], []
    for index, (image, label) in enumerate(zip(pixels, labels)):
        model_input = (image - np.float32(data.TORCH_MEAN)) / np.float32(data.TORCH_STD)
        seen = observe(device, weights, model_input, int(label), scenario,
                       seed=args.seed * 100_003 + index)
        if attacker is None:
            attacker = _Attacker(args, keras.models.clone_model(device.sparse.base), seen,
                                 name)
        rule_label, found = attacker.attack(seen, seed=args.seed + index)
        rows.append({"scenario": name, "image": index, "label": int(label),
                     "rule_label": rule_label, "payload_bytes": seen.payload_bytes,
                     **{f"{attack}_{key}": value for attack, r in found.items()
                        for key, value in _scores(image, r).items()}})
        images.append(found.get(args.grid_attack, found["inverting_gradients"]).image)
        print(f"{name} image {index}: " + ", ".join(
            f"{a} {rows[-1][f'{a}_psnr']:.1f} dB" for a in found), flush=True)
    return rows, images


def _scores(original, found) -> dict:
    return {"label": found.label, "psnr": metrics.psnr(original, found.image),
            "ssim": metrics.ssim(original, found.image), "seconds": round(found.seconds, 2)}


def _summary(name, rows, epsilon) -> list[dict]:
    attacks = sorted({k[:-len("_psnr")] for k in rows[0] if k.endswith("_psnr")})
    truth = [r["label"] for r in rows]
    summary = [{"scenario": name, "attack": "idlg_label_rule", "images": len(rows),
                "label_recovery": metrics.label_recovery_rate(truth,
                                                              [r["rule_label"] for r in rows]),
                "payload_bytes": int(np.mean([r["payload_bytes"] for r in rows])),
                "epsilon": epsilon}]
    for attack in attacks:
        psnr = np.array([r[f"{attack}_psnr"] for r in rows])
        ssim = np.array([r[f"{attack}_ssim"] for r in rows])
        summary.append({
            "scenario": name, "attack": attack, "images": len(rows),
            "label_recovery": metrics.label_recovery_rate(
                truth, [r[f"{attack}_label"] for r in rows]),
            "psnr_mean": float(psnr.mean()), "psnr_median": float(np.median(psnr)),
            "psnr_over_20db": float(np.mean(psnr > 20)),
            "ssim_mean": float(ssim.mean()), "ssim_median": float(np.median(ssim)),
            "seconds_per_attack": float(np.mean([r[f"{attack}_seconds"] for r in rows])),
            "payload_bytes": int(np.mean([r["payload_bytes"] for r in rows])),
            "epsilon": epsilon})
    return summary


def _grid(pixels, reconstructions: dict, count: int, attack: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [("original", pixels[:count])] + [(n, r[:count]) for n, r in reconstructions.items()]
    fig, axes = plt.subplots(len(rows), count, figsize=(1.1 * count, 1.15 * len(rows)),
                             squeeze=False)
    for row, (name, images) in zip(axes, rows):
        for axis, image in zip(row, images):
            axis.imshow(np.clip(image, 0, 1), interpolation="nearest")
            axis.set_xticks([])
            axis.set_yticks([])
        row[0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(f"originals and {attack} reconstructions per uplink scenario", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    args = _arguments()
    runtime.limit_threads(1)
    runtime.seed_everything(args.seed)
    pixels, labels = _images(args)
    devices = _devices(args, {SCENARIOS[s].method for s in args.scenarios})
    weights = next(iter(devices.values())).weights()  # the global model all devices share
    rows, summary, reconstructions = [], [], {}
    for name in args.scenarios:
        start, cpu = time.time(), time.process_time()
        mine, reconstructions[name] = _scenario(args, name, devices[SCENARIOS[name].method],
                                                weights, pixels, labels)
        rows += mine
        summary += [{**row, "cpu_seconds_per_image": (time.process_time() - cpu) / len(mine)}
                    for row in _summary(name, mine, SCENARIOS[name].privacy_epsilon())]
        print(f"{name}: {time.time() - start:.0f} s, {time.process_time() - cpu:.0f} CPU s; "
              f"{summary[-1]}", flush=True)
        _write(args, rows, summary, pixels, reconstructions)  # after every scenario


def _write(args, rows, summary, pixels, reconstructions) -> None:
    write_json_atomically(os.path.join(RESULTS, f"{args.name}_images.json"),
                          {"settings": vars(args), "images": rows})
    settings = {**vars(args), "model": "Zhu et al.'s LeNet (sigmoid)" if args.model == "lenet"
                else f"MobileNetV2-{args.width} BN-folded",
                "scenarios": {n: dataclasses.asdict(SCENARIOS[n]) for n in args.scenarios},
                "normalisation": {"mean": data.TORCH_MEAN, "std": data.TORCH_STD}}
    print(_report.write(args.name, settings, summary,
                        ["scenario", "attack", "images", "label_recovery", "psnr_mean",
                         "psnr_median", "psnr_over_20db", "ssim_mean", "ssim_median",
                         "payload_bytes", "epsilon", "seconds_per_attack",
                         "cpu_seconds_per_image"]), flush=True)
    _grid(pixels, reconstructions, min(args.grid_images, len(pixels)), args.grid_attack,
          os.path.join(RESULTS, f"{args.name}.png"))


if __name__ == "__main__":
    main()
