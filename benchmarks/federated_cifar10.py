"""Federated fine-tuning on CIFAR-10: dense FedAvg vs last layer vs Lin static vs DGSU.

    python benchmarks/federated_cifar10.py --clients 10 --rounds 10 --partition dirichlet \
        --alpha 0.1 --train-examples 2000 --image-size 32 --weights imagenet --width 1.0

Every method runs the same federation (`dgst_tf.federated.simulation.run_federated`: Flower
on Ray, the same seeded partition, the same rounds) and differs only in what a device's
batch-1 step updates (`dgst_tf.training.methods`): ``full`` (dense fine-tuning, sent dense:
FedAvg), ``last_layer``, ``sparse_update`` (Lin et al.'s static channels) and ``dgsu``.
``--compare-plain`` adds DGSU aggregated by plain FedAvg (zeros for the channels a device did
not send) beside the per-channel average. The dense baseline is not checked against the SRAM
budget (``--sram-budget`` applies to the sparse methods only): it is the reference a
microcontroller could not run. Writes benchmarks/results/<name>.{json,md} (one row per method
and round: test accuracy, mean / max uplink bytes per device) and <name>.png (accuracy per
round, and accuracy against the cumulative uplink bytes of one device).

``--variants`` measures what the uplink defences cost: every method runs once per variant,
``ENCODING[:clip=C[:noise=Z]]`` (for example ``fp16 int8 fp16:clip=0.5
fp16:clip=0.5:noise=0.6``), each the same federation and seeds with its payload encoding and
device-level clipping / Gaussian noise (`FederatedConfig.clip_norm`, ``noise_multiplier``);
the rows are labelled ``method encoding [clip C] [noise Z]`` and the settings give each noised
variant's epsilon over all its rounds (one release per device and round, analytic Gaussian
mechanism composed exactly as Gaussian DP, delta 1e-5; `leakage.privacy.composed_epsilon`):

    python benchmarks/federated_cifar10.py --methods dgsu --clients 10 --rounds 5 \
        --train-examples 1000 --test-examples 500 --learning-rate 0.005 \
        --variants fp16 int8 fp16:clip=0.5 fp16:clip=0.5:noise=0.001 \
        --name federated_cifar10_defence
"""
import argparse
import dataclasses
import os
import time

import _report

from dgst_tf.core import runtime
from dgst_tf.core.files import write_atomically
from dgst_tf.federated.config import FederatedConfig
from dgst_tf.federated.leakage.privacy import composed_epsilon
from dgst_tf.federated.simulation import run_federated

METHODS = ("full", "last_layer", "sparse_update", "dgsu")


def _arguments():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--compare-plain", action="store_true",
                   help="also run DGSU with plain FedAvg instead of the per-channel average")
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--data", dest="data_path", default=None)
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--partition", choices=("iid", "dirichlet"), default="dirichlet")
    p.add_argument("--alpha", type=float, default=0.1)
    p.add_argument("--train-examples", type=int, default=2000)
    p.add_argument("--test-examples", type=int, default=1000)
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--weights", default="imagenet", help="imagenet or none")
    p.add_argument("--learning-rate", type=float, default=0.01)
    p.add_argument("--target-fraction", type=float, default=0.02)
    p.add_argument("--encoding", default="int8", choices=("int8", "fp16", "fp32"))
    p.add_argument("--sram-budget", default="none",
                   help="SRAM budget of the sparse methods' step (none: unchecked)")
    p.add_argument("--clip-norm", type=float, default=0.0,
                   help="device-level DP: clip each round's update to this L2 norm (0: off)")
    p.add_argument("--noise-multiplier", type=float, default=0.0,
                   help="Gaussian noise std / clip norm on every sent value")
    p.add_argument("--variants", nargs="+", default=None, type=_variant,
                   help="ENCODING[:clip=C[:noise=Z]] each (module doc); default: one run with "
                        "--encoding, --clip-norm, --noise-multiplier")
    p.add_argument("--num-cpus", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="federated_cifar10")
    return p.parse_args()


@dataclasses.dataclass(frozen=True)
class Variant:
    """What a device's uplink is: payload ``encoding``, ``clip_norm`` and
    ``noise_multiplier`` (0: off)."""
    encoding: str
    clip_norm: float = 0.0
    noise_multiplier: float = 0.0

    def label(self) -> str:
        parts = [self.encoding]
        if self.clip_norm:
            parts.append(f"clip {self.clip_norm:g}")
        if self.noise_multiplier:
            parts.append(f"noise {self.noise_multiplier:g}")
        return " ".join(parts)


def _variant(text: str) -> Variant:
    """``fp16``, ``int8:clip=0.5``, ``fp16:clip=0.5:noise=0.6`` -> `Variant`."""
    encoding, *options = text.split(":")
    names = {"clip": "clip_norm", "noise": "noise_multiplier"}
    values = {}
    for option in options:
        key, _, value = option.partition("=")
        if key not in names or not value:
            raise argparse.ArgumentTypeError(
                f"variant {text!r}: options are clip=C and noise=Z, got {option!r}")
        values[names[key]] = float(value)
    if encoding not in ("int8", "fp16", "fp32"):
        raise argparse.ArgumentTypeError(f"variant {text!r}: encoding must be int8, fp16 or "
                                         f"fp32, got {encoding!r}")
    return Variant(encoding, **values)


def _config(args, method: str, per_channel: bool, variant: Variant) -> FederatedConfig:
    budget = None if method == "full" or args.sram_budget == "none" else args.sram_budget
    return FederatedConfig(
        dataset=args.dataset, data_path=args.data_path, train_examples=args.train_examples,
        test_examples=args.test_examples, clients=args.clients, rounds=args.rounds,
        partition=args.partition, alpha=args.alpha, per_channel=per_channel,
        width=args.width, image_size=args.image_size,
        weights=None if args.weights == "none" else args.weights, method=method,
        target_fraction=args.target_fraction, learning_rate=args.learning_rate,
        sram_budget=budget, encoding=variant.encoding, clip_norm=variant.clip_norm,
        noise_multiplier=variant.noise_multiplier, seed=args.seed, num_cpus=args.num_cpus)


def _rows(label: str, results: dict) -> list[dict]:
    rows, sent = [], 0
    for r in results["rounds"]:
        uplink = r.get("uplink_bytes", [0])
        sent += sum(uplink) / len(uplink)
        rows.append({"method": label, "round": r["round"], "accuracy": r["accuracy"],
                     "uplink_mean_bytes": round(sum(uplink) / len(uplink)),
                     "uplink_max_bytes": max(uplink), "cumulative_uplink_bytes": round(sent),
                     "updated_channel_fraction": r.get("updated_channel_fraction", 0.0)})
    return rows


def _plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_round, by_bytes) = plt.subplots(1, 2, figsize=(11, 4))
    for label in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == label]
        accuracy = [100 * r["accuracy"] for r in mine]
        by_round.plot([r["round"] for r in mine], accuracy, marker="o", label=label)
        by_bytes.plot([r["cumulative_uplink_bytes"] / 1024 for r in mine], accuracy,
                      marker="o", label=label)
    by_round.set(xlabel="round", ylabel="test accuracy (%)", title="accuracy per round")
    by_bytes.set(xlabel="uplink KB sent by one device (cumulative)", xscale="symlog",
                 ylabel="test accuracy (%)", title="accuracy per uplink byte")
    by_round.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    args = _arguments()
    runtime.limit_threads(1)
    variants = args.variants or [Variant(args.encoding, args.clip_norm, args.noise_multiplier)]
    runs = [(m, m, True) for m in args.methods]
    if args.compare_plain:
        runs.append(("dgsu (plain FedAvg)", "dgsu", False))
    rows = []
    for variant in variants:
        for label, method, per_channel in runs:
            if args.variants:
                label = f"{label} {variant.label()}"
            start = time.time()
            results = run_federated(_config(args, method, per_channel, variant))
            rows += _rows(label, results)
            print(f"{label}: accuracy per round "
                  f"{[round(r['accuracy'], 4) for r in results['rounds']]}, "
                  f"{time.time() - start:.0f} s", flush=True)
            _write(args, variants, rows)  # after every run: a killed run keeps what finished


_DEFENCE_NOTES = """
How to read it: every row is the same federation (partition, seeds, rounds, learning rate),
only the uplink differs. `int8` / `fp16`: the payload encoding of the changed channels
(`payload.encode`). `clip C`: each device scales its whole round update (the weight deltas
it sends, all arrays as one vector) to L2 norm at most C; `noise Z`: then adds Gaussian noise
of standard deviation Z * C to every value it sends, before encoding (DP-FedAvg style, on the
device). The epsilon in the settings is per device over all rounds at delta 1e-5: one
Gaussian-mechanism release per round with L2 sensitivity C (the device's whole local data is
the unit of privacy), composed exactly as Gaussian DP (mu = sqrt(rounds) / Z; Dong, Roth &
Su 2022) and converted to (epsilon, delta) by the analytic Gaussian mechanism (Balle & Wang
2018); no subsampling amplification is claimed. Channels a round did not change are not
sent and not noised (see `dgst_tf.federated.leakage.privacy`).
"""


def _write(args, variants, rows) -> None:
    settings = {k: v for k, v in vars(args).items() if k not in ("methods", "name", "variants")}
    if args.variants:
        for key in ("encoding", "clip_norm", "noise_multiplier"):
            settings.pop(key)
        settings["variants"] = [dataclasses.asdict(v) for v in variants]
    for variant in variants:  # one release per device and round, composed over the rounds
        if variant.noise_multiplier:
            settings[f"epsilon_all_rounds_delta_1e-5 ({variant.label()})"] = composed_epsilon(
                variant.noise_multiplier, args.rounds, 1e-5)
    table = _report.write(args.name, settings, rows,
                          ["method", "round", "accuracy", "uplink_mean_bytes",
                           "uplink_max_bytes", "cumulative_uplink_bytes",
                           "updated_channel_fraction"])
    if args.variants:
        table += _DEFENCE_NOTES
        write_atomically(os.path.join(os.path.dirname(__file__), "results", f"{args.name}.md"),
                         table)
    print(table, flush=True)
    _plot(rows, os.path.join(os.path.dirname(__file__), "results", f"{args.name}.png"))


if __name__ == "__main__":
    main()
