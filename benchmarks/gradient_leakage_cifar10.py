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

Resumable: every finished (scenario, image) is kept in ``--backup-dir`` (its numbers and
reconstructions, one ``.npz`` each, beside the settings that made them); a killed run started
again with the same command skips what is there, and a backup made with other settings is
an error, never mixed in. Several processes may share one backup (each claims the image it
computes and skips images a live process claimed); ``--report-only`` then writes the results
of everything in the backup. The results files list the scenarios and images of the run that
wrote them.

``--model lenet`` runs the same harness on Zhu et al.'s LeNet instead (sigmoid, no pooling,
weights uniform in [-0.5, 0.5], seeded): the model DLG was shown on (scenarios without
pointwise expansion convs only: no ``sparse_update`` / ``dgsu``). ``--model small_cnn`` is
the control for every scenario: notebook 06's small flatten-head CNN at the images' size
(3x3 conv, a pointwise expansion and projection, which Lin's sparse update and DGSU train,
sigmoid activations, no pooling: the classifier sees every spatial position, as in Zhu et
al.'s setting), seeded Glorot weights. The attacks recover CIFAR-10 images from its dense
update, so a failed attack elsewhere means something:

    nice -n 10 python benchmarks/gradient_leakage_cifar10.py --model small_cnn --images 50 \
        --ig-iterations 300 --ig-learning-rate 0.1 --ig-signed --dlg-iterations 150 \
        --idlg-scenarios dense dgsu last_layer --dlg-scenarios dense --grid-attack idlg \
        --scenarios dense last_layer sparse_update dgsu dense_int8 dgsu_int8 dense_dp \
        dense_noise --name gradient_leakage_cifar10_control

``--model small_cnn_pool`` is the same CNN with global average pooling instead of the
flatten (MobileNetV2's head): whether the pooling, not the update's sparsity, is what stops
the attacks.
"""
import argparse
import dataclasses
import json
import os
import tempfile
import time

import _report
import numpy as np

from dgst_tf import data
from dgst_tf.core import runtime
from dgst_tf.core.files import write_atomically, write_json_atomically
from dgst_tf.core.keras_compat import keras
from dgst_tf.federated.config import FederatedConfig
from dgst_tf.federated.device import SimulatedDevice
from dgst_tf.federated.leakage import metrics
from dgst_tf.federated.leakage.attacks import DLG, IDLG, InvertingGradients
from dgst_tf.federated.leakage.labels import recover_label
from dgst_tf.federated.leakage.matching import GradientMatching
from dgst_tf.federated.leakage.what_is_sent import SCENARIOS, Scenario, observe

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def _arguments():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    p.add_argument("--images", type=int, default=50)
    p.add_argument("--split", default="train")
    p.add_argument("--data", dest="data_path", default=None)
    p.add_argument("--model", default="mobilenet_v2",
                   choices=("mobilenet_v2", "lenet", "small_cnn", "small_cnn_pool"))
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
    p.add_argument("--report-only", action="store_true",
                   help="compute nothing: write the results of the images in the backup")
    p.add_argument("--backup-dir", default=None,
                   help="where finished images are kept for a resumed run "
                        "(default: <tmp>/dgst_<name>_backup)")
    args = p.parse_args()
    if args.backup_dir is None:
        args.backup_dir = os.path.join(tempfile.gettempdir(), f"dgst_{args.name}_backup")
    return args


# what the numbers depend on: a backup made with other values of these is not reused
_NUMERIC_SETTINGS = ("images", "split", "data_path", "model", "width", "weights",
                     "image_size", "learning_rate", "target_fraction", "ig_iterations",
                     "ig_learning_rate", "tv", "ig_signed", "restarts", "dlg_iterations",
                     "seed")


class _Backup:
    """Finished (scenario, image) results on disk, so a killed run continues (module doc)."""

    def __init__(self, args):
        self.folder = args.backup_dir
        os.makedirs(self.folder, exist_ok=True)
        settings = {k: getattr(args, k) for k in _NUMERIC_SETTINGS}
        path = os.path.join(self.folder, "settings.json")
        if os.path.exists(path):
            with open(path) as f:
                saved = json.load(f)
            if saved != settings:
                changed = {k: (saved.get(k), v) for k, v in settings.items()
                           if saved.get(k) != v}
                raise SystemExit(f"backup {self.folder} was made with other settings "
                                 f"(saved, now): {changed}; give another --backup-dir")
        else:
            write_json_atomically(path, settings)

    def _path(self, scenario: str, index: int, attacks) -> str:
        return os.path.join(self.folder, scenario, "+".join(sorted(attacks)),
                            f"{index:04d}.npz")

    def load(self, scenario: Scenario, index: int, attacks) -> tuple[dict, dict] | None:
        """(row, {attack: reconstruction}) if this image was finished before."""
        path = self._path(scenario.name, index, attacks)
        if not os.path.exists(path):
            return None
        with np.load(path) as saved:
            row = json.loads(str(saved["row"]))
            if row["scenario_definition"] != dataclasses.asdict(scenario):
                raise SystemExit(f"{path}: scenario {scenario.name!r} was defined otherwise "
                                 f"then: {row['scenario_definition']}")
            return row, {a: saved[f"image_{a}"] for a in attacks}

    def claim(self, scenario: Scenario, index: int, attacks) -> bool:
        """Whether this process may compute the image: False while another live process
        that shares the backup computes it (several processes may split the work)."""
        path = self._path(scenario.name, index, attacks) + ".claim"
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            with open(path) as f:
                owner = int(f.read() or 0)
            if owner and owner != os.getpid():
                os.kill(owner, 0)  # raises if that process is gone: a stale claim
                return False
        except (FileNotFoundError, ProcessLookupError, ValueError):
            pass
        write_atomically(path, str(os.getpid()))
        return True

    def save(self, scenario: Scenario, index: int, row: dict, found: dict) -> None:
        path = self._path(scenario.name, index, found)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        part = path + ".part.npz"
        np.savez(part, row=json.dumps({**row, "scenario_definition":
                                       dataclasses.asdict(scenario)}),
                 **{f"image_{a}": r.image for a, r in found.items()})
        os.replace(part, path)
        try:
            os.remove(path + ".claim")
        except FileNotFoundError:
            pass


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


def _small_cnn(path: str, image_size: int, seed: int, head: str = "flatten") -> str:
    """Notebook 06's flatten-head CNN (module doc), saved to ``path``; ``head="pool"``:
    global average pooling instead of the flatten, as MobileNetV2 has."""
    image = keras.Input((image_size, image_size, 3))
    x = image
    for index, (name, filters, size) in enumerate((("conv", 32, 3), ("expand", 64, 1),
                                                   ("project", 32, 1))):
        x = keras.layers.Conv2D(filters, size, padding="same", activation="sigmoid",
                                kernel_initializer=keras.initializers.GlorotUniform(
                                    seed=seed * 10 + index), name=name)(x)
    x = (keras.layers.Flatten(name="flatten") if head == "flatten" else
         keras.layers.GlobalAveragePooling2D(name="pool"))(x)
    out = keras.layers.Dense(10, kernel_initializer=keras.initializers.GlorotUniform(
        seed=seed * 10 + 3), name="classifier")(x)
    keras.Model(image, out, name=f"small_cnn_{head}").save(path)
    return path


_SMALL_MODELS = {"lenet": _lenet, "small_cnn": _small_cnn,
                 "small_cnn_pool": lambda *a: _small_cnn(*a, head="pool")}
_MODEL_NAMES = {"lenet": "Zhu et al.'s LeNet (sigmoid)",
                "small_cnn": "notebook 06's small CNN (3x3 conv 32, 1x1 expand 64, 1x1 "
                             "project 32, sigmoid, flatten, dense 10)",
                "small_cnn_pool": "notebook 06's small CNN with a pooled head (3x3 conv 32, "
                                  "1x1 expand 64, 1x1 project 32, sigmoid, global average "
                                  "pooling, dense 10)"}


def _devices(args, methods) -> dict:
    model = "mobilenet_v2"
    if args.model in _SMALL_MODELS:
        model = _SMALL_MODELS[args.model](
            os.path.join(tempfile.mkdtemp(), f"{args.model}.keras"), args.image_size,
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


def _attack_names(args, name: str) -> list[str]:
    """The reconstructions run on scenario ``name`` (besides iDLG's label rule)."""
    names = ["inverting_gradients"]
    if args.dlg_iterations and name in args.idlg_scenarios:
        names.append("idlg")
    if args.dlg_iterations and name in args.dlg_scenarios:
        names.append("dlg")
    return names


class _Attacker:
    """One scenario's attacks on a copy of the model (traced once, reused per image)."""

    def __init__(self, args, model, seen, name: str):
        self.model = model
        self.matching = GradientMatching(model, seen, data.TORCH_MEAN, data.TORCH_STD)
        self.ig = InvertingGradients(self.matching, args.ig_iterations, args.ig_learning_rate,
                                     tv=args.tv, signed=args.ig_signed,
                                     restarts=args.restarts)
        attacks = {"idlg": IDLG, "dlg": DLG}
        self.dlg = {a: attacks[a](self.matching, args.dlg_iterations)
                    for a in _attack_names(args, name)[1:]}

    def attack(self, seen, seed: int) -> dict:
        self.matching.load(seen)
        label = recover_label(self.model, seen)
        found = {"inverting_gradients": self.ig.run(label, seed=seed)}
        for name, attack in self.dlg.items():
            found[name] = attack.run(label=label, seed=seed)
        return label, found


def _scenario(args, name, device, weights, pixels, labels, backup) -> tuple[list, list]:
    scenario = SCENARIOS[name]
    attacks = _attack_names(args, name)
    attackers, rows, images = {}, [], {}
    for index, (image, label) in enumerate(zip(pixels, labels)):
        kept = backup.load(scenario, index, attacks)
        if kept is None and (args.report_only or not backup.claim(scenario, index, attacks)):
            continue
        if kept is None:
            cpu = time.process_time()
            model_input = (image - np.float32(data.TORCH_MEAN)) / np.float32(data.TORCH_STD)
            seen = observe(device, weights, model_input, int(label), scenario,
                           seed=args.seed * 100_003 + index)
            # one traced attack per set of sent arrays: a sparse update leaves out an array
            # whose chosen channels all had a zero gradient, and that changes the objective
            sent = tuple(i for i, m in enumerate(seen.sent) if np.any(m))
            if sent not in attackers:
                attackers[sent] = _Attacker(
                    args, keras.models.clone_model(device.sparse.base), seen, name)
            rule_label, found = attackers[sent].attack(seen, seed=args.seed + index)
            row = {"scenario": name, "image": index, "label": int(label),
                   "rule_label": rule_label, "payload_bytes": seen.payload_bytes,
                   "cpu_seconds": time.process_time() - cpu,
                   **{f"{attack}_{key}": value for attack, r in found.items()
                      for key, value in _scores(image, r).items()}}
            backup.save(scenario, index, row, found)
            found = {a: r.image for a, r in found.items()}
        else:
            row, found = kept
            row.pop("scenario_definition")
        rows.append(row)
        images[index] = found.get(args.grid_attack, found["inverting_gradients"])
        print(f"{name} image {index}{' (from backup)' if kept else ''}: " + ", ".join(
            f"{a} {row[f'{a}_psnr']:.1f} dB" for a in attacks), flush=True)
    return rows, images


def _scores(original, found) -> dict:
    return {"label": found.label, "psnr": metrics.psnr(original, found.image),
            "ssim": metrics.ssim(original, found.image), "seconds": round(found.seconds, 2)}


def _summary(name, rows, epsilon) -> list[dict]:
    attacks = sorted({k[:-len("_psnr")] for k in rows[0] if k.endswith("_psnr")})
    truth = [r["label"] for r in rows]
    cpu = float(np.mean([r["cpu_seconds"] for r in rows]))
    summary = [{"scenario": name, "attack": "idlg_label_rule", "images": len(rows),
                "label_recovery": metrics.label_recovery_rate(truth,
                                                              [r["rule_label"] for r in rows]),
                "payload_bytes": int(np.mean([r["payload_bytes"] for r in rows])),
                "epsilon": epsilon, "cpu_seconds_per_image": cpu}]
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
            "epsilon": epsilon, "cpu_seconds_per_image": cpu})
    return summary


def _grid(pixels, reconstructions: dict, count: int, attack: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [("original", dict(enumerate(pixels[:count])))] + list(reconstructions.items())
    fig, axes = plt.subplots(len(rows), count, figsize=(1.1 * count, 1.15 * len(rows)),
                             squeeze=False)
    for row, (name, images) in zip(axes, rows):
        for index, axis in enumerate(row):
            if index in images:  # a report-only run may lack some images
                axis.imshow(np.clip(images[index], 0, 1), interpolation="nearest")
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
    backup = _Backup(args)
    print(f"backup of finished images: {backup.folder}", flush=True)
    pixels, labels = _images(args)
    methods = {SCENARIOS[s].method for s in args.scenarios}
    if args.report_only:  # nothing is computed: no device, no model
        devices, weights = dict.fromkeys(methods), None
    else:
        devices = _devices(args, methods)
        weights = next(iter(devices.values())).weights()  # the global model devices share
    rows, summary, reconstructions = [], [], {}
    for name in args.scenarios:
        start = time.time()
        mine, reconstructions[name] = _scenario(args, name, devices[SCENARIOS[name].method],
                                                weights, pixels, labels, backup)
        if not mine:  # --report-only and nothing of this scenario in the backup
            del reconstructions[name]
            continue
        rows += mine
        summary += [{**row, "noise_multiplier": SCENARIOS[name].noise()}
                    for row in _summary(name, mine, SCENARIOS[name].privacy_epsilon())]
        print(f"{name}: {time.time() - start:.0f} s; {summary[-1]}", flush=True)
        _write(args, rows, summary, pixels, reconstructions)  # after every scenario


def _write(args, rows, summary, pixels, reconstructions) -> None:
    write_json_atomically(os.path.join(RESULTS, f"{args.name}_images.json"),
                          {"settings": vars(args), "images": rows})
    settings = {**vars(args), "model": _MODEL_NAMES.get(args.model,
                                                        f"MobileNetV2-{args.width} BN-folded"),
                "scenarios": {n: dataclasses.asdict(SCENARIOS[n]) for n in args.scenarios},
                "normalisation": {"mean": data.TORCH_MEAN, "std": data.TORCH_STD}}
    table = _report.write(args.name, settings, summary,
                          ["scenario", "attack", "images", "label_recovery", "psnr_mean",
                           "psnr_median", "psnr_over_20db", "ssim_mean", "ssim_median",
                           "payload_bytes", "noise_multiplier", "epsilon",
                           "seconds_per_attack", "cpu_seconds_per_image"])
    table += _notes(args, sorted({r["scenario"] for r in rows}))
    write_atomically(os.path.join(RESULTS, f"{args.name}.md"), table)
    print(table, flush=True)
    _grid(pixels, reconstructions, min(args.grid_images, len(pixels)), args.grid_attack,
          os.path.join(RESULTS, f"{args.name}.png"))


def _classifier_share(image_size: int) -> float:
    """The share of the classifier (weights and biases) in `_small_cnn`'s trainable values."""
    classifier = 10 * image_size * image_size * 32 + 10
    convs = (3 * 3 * 3 + 1) * 32 + (32 + 1) * 64 + (64 + 1) * 32
    return classifier / (classifier + convs)


def _notes(args, scenarios) -> str:
    """What the table's columns mean and how the epsilon was computed."""
    attacks = {n: ["idlg_label_rule"] + _attack_names(args, n) for n in scenarios}
    return "\n".join([
        "", "How to read it:", "",
        f"- One batch-1 SGD step (learning rate {args.learning_rate}) from the same global "
        f"model on each of {args.images} class-balanced CIFAR-10 {args.split} images "
        f"(seed {args.seed}); the attacker inverts exactly the decoded uplink "
        "(`what_is_sent.observe`), knowing the global weights and the learning rate.",
        f"- Attacks per scenario: {attacks}. Inverting Gradients: {args.ig_iterations} "
        f"iterations, Adam lr {args.ig_learning_rate} ({'signed' if args.ig_signed else 'plain'}"
        f" gradient), TV {args.tv}, {args.restarts} restart(s); iDLG / DLG: L-BFGS-B, at most "
        f"{args.dlg_iterations} iterations. These are the budgets tests/test_leakage.py shows "
        "recovering an 8x8 image from a dense update (PSNR > 30 dB).",
        "- label_recovery: share of images whose label the attack got right (the iDLG rule "
        "reads it off the classifier's gradient; IG and iDLG use that label, DLG optimises "
        "its own). PSNR in dB and SSIM (scikit-image) of the reconstruction against the "
        "original in [0, 1]; psnr_over_20db: share of images above 20 dB.",
        "- epsilon: of one release (one batch-1 update) at delta 1e-5 with L2 sensitivity = "
        "the clip norm (add/remove the device's one example), by the analytic Gaussian "
        "mechanism (Balle & Wang 2018, Theorem 8; exact for one release, "
        "`dgst_tf.federated.leakage.privacy.gaussian_epsilon`). No subsampling "
        "amplification is claimed. None: not clipped or noised.",
        *[f"- {n}: the gradient of the batch-1 step (all sent arrays as one vector) clipped "
          f"to L2 norm {SCENARIOS[n].clip_norm:g}, then Gaussian noise of standard deviation "
          f"{SCENARIOS[n].noise():.4g} x {SCENARIOS[n].clip_norm:g} on every value of the "
          f"updated arrays, before encoding: epsilon {SCENARIOS[n].privacy_epsilon():.4g}."
          for n in scenarios if SCENARIOS[n].clip_norm is not None],
        *([f"- Control model ({_MODEL_NAMES['small_cnn']}, {args.image_size} px): its "
           f"classifier holds {100 * _classifier_share(args.image_size):.1f}% of the "
           f"trainable values (10 x {args.image_size} x {args.image_size} x 32 weights) and "
           "every scenario sends it (last layer, Lin's sparse update and DGSU train "
           "the classifier besides their channels, as on MobileNetV2): its gradient is the "
           "softmax error times the flattened features, so the features of every pixel "
           "position reach the attacker whatever the convs send. MobileNetV2's classifier "
           "sees globally pooled features only."] if args.model == "small_cnn" else []),
        *([f"- Control model ({_MODEL_NAMES['small_cnn_pool']}): small_cnn's convs "
           "and activations (the same seeded conv weights) with the classifier on globally "
           "averaged features, as MobileNetV2's: its gradient gives the attacker 32 pooled "
           "features, not every pixel position's."] if args.model == "small_cnn_pool" else []),
        "- int8 scenarios: the payload's values in int8 with one scale per array "
        "(`payload.encode`); the attacker inverts the dequantized update.",
        "- cpu_seconds_per_image: CPU time of the device step and every attack on one image "
        "(TensorFlow limited to one thread); seconds_per_attack: wall time of one attack.",
        f"- Figure: {args.name}.png, the first {args.grid_images} originals above each "
        f"scenario's {args.grid_attack} reconstructions"
        + ("." if args.grid_attack == "inverting_gradients" else
           f" (Inverting Gradients' where {args.grid_attack} did not run)."),
        *(["- Written with --report-only from the per-image backup: the images were computed "
           "by this command without --report-only (possibly in several processes, each with "
           "some of the --scenarios); a scenario with fewer images than asked is one the "
           "run did not finish."] if args.report_only else []), ""])


if __name__ == "__main__":
    main()
