"""Accuracy against epsilon of the federated clip + Gaussian-noise defence, from finished runs.

    nice -n 10 python benchmarks/federated_cifar10_epsilon.py \
        --runs federated_cifar10_defence federated_cifar10_defence_epsilon

Reads benchmarks/results/<run>.json of `federated_cifar10.py --variants` runs of one
federation (every setting but the variants must agree: runs of different federations are
an error, never mixed) and writes benchmarks/results/<name>.{json,md,png}: per method and
uplink variant the test accuracy after the last round (and the best round), the noise
multiplier and the epsilon per device over all rounds at delta 1e-5
(`leakage.privacy.composed_epsilon`, as the runs' settings state it; None: no noise). The
figure plots the noised variants' final accuracy against epsilon (log scale) with the
unnoised variants (no defence, clipping only) and chance as horizontal lines.
"""
import argparse
import json
import math
import os

import _report
from federated_cifar10 import METHODS, Variant

from dgst_tf.core.files import write_atomically
from dgst_tf.federated.leakage.privacy import composed_epsilon

RESULTS = os.path.join(os.path.dirname(__file__), "results")
DELTA = 1e-5


def _arguments():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", nargs="+",
                   default=["federated_cifar10_defence", "federated_cifar10_defence_epsilon"],
                   help="results names (benchmarks/results/<run>.json) of --variants runs")
    p.add_argument("--name", default="federated_cifar10_defence_epsilon_curve")
    return p.parse_args()


def _federation(settings: dict) -> dict:
    """The settings that make two runs the same federation (all but the uplink variants)."""
    return {k: v for k, v in settings.items()
            if k != "variants" and not k.startswith("epsilon_all_rounds")}


def _load(runs) -> tuple[dict, list]:
    """(the federation's settings, [(run, Variant, that variant's rows per method)])."""
    federation, found = None, []
    for run in runs:
        with open(os.path.join(RESULTS, f"{run}.json")) as f:
            result = json.load(f)
        settings = result["settings"]
        if "variants" not in settings:
            raise SystemExit(f"{run}: not a --variants run of federated_cifar10.py")
        if federation is None:
            federation = _federation(settings)
        elif _federation(settings) != federation:
            changed = {k: (federation.get(k), v) for k, v in _federation(settings).items()
                       if federation.get(k) != v}
            raise SystemExit(f"{run} is another federation than {runs[0]}: {changed}")
        for variant in (Variant(**v) for v in settings["variants"]):
            for method in METHODS:
                rows = [r for r in result["results"]
                        if r["method"] == f"{method} {variant.label()}"]
                if rows:
                    found.append((run, variant, rows))
    return federation, found


def _row(run: str, variant: Variant, rows: list, rounds: int) -> dict:
    final = max(rows, key=lambda r: r["round"])
    noise = variant.noise_multiplier
    return {"method": final["method"], "run": run, "encoding": variant.encoding,
            "clip_norm": variant.clip_norm, "noise_multiplier": noise,
            "epsilon": composed_epsilon(noise, rounds, DELTA) if noise else None,
            "rounds": final["round"], "final_accuracy": final["accuracy"],
            "best_accuracy": max(r["accuracy"] for r in rows)}


def _standard_error(rows: list, test_examples: int) -> float:
    """Binomial standard error, in points, of the best row's test accuracy."""
    best = max(r["final_accuracy"] for r in rows)
    return 100 * math.sqrt(best * (1 - best) / test_examples)


def _plot(rows: list, path: str, classes: int = 10) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(6.5, 4))
    noised = sorted((r for r in rows if r["noise_multiplier"]), key=lambda r: r["epsilon"])
    for method in dict.fromkeys(r["method"].split()[0] for r in noised):
        mine = [r for r in noised if r["method"].split()[0] == method]
        axis.plot([r["epsilon"] for r in mine], [100 * r["final_accuracy"] for r in mine],
                  marker="o", label=f"{method} clip + noise")
        for r in mine:
            axis.annotate(f"z={r['noise_multiplier']:g}", (r["epsilon"],
                                                           100 * r["final_accuracy"]),
                          textcoords="offset points", xytext=(4, 6), fontsize=7)
    styles = iter(["--", "-.", ":"])
    for r in (r for r in rows if not r["noise_multiplier"]):
        if r["encoding"] != "int8" or r["clip_norm"]:  # the fp16 / clip references
            axis.axhline(100 * r["final_accuracy"], color="grey", linestyle=next(styles, ":"),
                         label=f"{r['method']} (no noise, epsilon inf)")
    axis.axhline(100 / classes, color="black", linewidth=0.8, label="chance")
    axis.set(xscale="log", xlabel=f"epsilon per device over all rounds (delta {DELTA:g})",
             ylabel="test accuracy after the last round (%)",
             title="federated DGSU: accuracy against the noise's epsilon")
    axis.set_ylim(0, None)
    axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    args = _arguments()
    federation, found = _load(args.runs)
    rows = sorted((_row(run, v, r, federation["rounds"]) for run, v, r in found),
                  key=lambda r: (r["method"].split()[0], -(r["epsilon"] or math.inf)))
    settings = {**federation, "runs": args.runs, "delta": DELTA}
    table = _report.write(args.name, settings, rows,
                          ["method", "noise_multiplier", "epsilon", "final_accuracy",
                           "best_accuracy", "rounds", "clip_norm", "encoding", "run"])
    table += "\n".join([
        "", "How to read it: every row is the same federation (the runs' settings above), "
        "only the uplink differs; `clip_norm` C and `noise_multiplier` z as in "
        "federated_cifar10.py (each device's round update clipped to L2 norm C, then "
        "Gaussian noise of standard deviation z * C on every sent value). epsilon: per device "
        f"over all {federation['rounds']} rounds at delta {DELTA:g} (Gaussian DP composition, "
        "analytic Gaussian mechanism; no subsampling amplification); None: not noised "
        "(epsilon infinite). Accuracy on the runs' "
        f"{federation['test_examples']} test images after the last round (one standard "
        f"error {_standard_error(rows, federation['test_examples']):.1f} points at the best "
        "row's accuracy); one seed. "
        f"Figure: {args.name}.png.", ""])
    write_atomically(os.path.join(RESULTS, f"{args.name}.md"), table)
    print(table)
    _plot(rows, os.path.join(RESULTS, f"{args.name}.png"))


if __name__ == "__main__":
    main()
