"""The device pipeline on CIFAR-10 under a frozen protocol (issue 18): settings chosen on the
validation split only, frozen in a file, then 3 seeds read the test set once each.

Phase ``select`` runs every candidate setting of the constrained DGSU pipeline
(`dgst_tf.jobs.device_pipeline`: prune to the flash budget -> plan under the SRAM budget ->
batch-1 int8 QAS DGSU training -> TFLM check -> TFLM accuracy of the adapted int8 model) with
``evaluate_on="validation"``, keeps the best one that meets the device constraints, then
chooses each baseline's learning rate at that resolution and number of epochs (baselines from
`sparse_update_cifar10`: the unpruned float DGSU simulation, dense full fine-tuning, Lin's
static sparse update, last layer, bias only), and writes ``<name>_protocol.json`` (the
settings + their SHA-256). No test image is read in this phase.

Phase ``test`` refuses to run unless the protocol file exists, its SHA-256 matches its
content and the one the select phase recorded; it takes every setting from it (its command
line has none), runs every variant for each seed, reads the test set once per (variant, seed)
and writes ``<name>.{json,md}``: per-seed rows, mean +- std per variant, whether each meets
the device constraints (TFLM arena <= SRAM budget for the firmware graph with on-device
selection, deployable training ``.tflite`` + firmware allowance <= flash budget, int8,
<= target fraction of conv weights per step, batch 1) and the feature memory of its training
step. Feature memory (our figure for DGSU's "98% less feature memory than dense training"):
the bytes of forward activations kept for the backward pass at batch 1 by the analytic model
(`dgst_tf.planning.memory`: int8 saved inputs of the kept channels of weight-updated layers,
1-bit ReLU masks, the classifier input), on the unpruned model at the chosen resolution,
against dense training of every layer (``UpdateScheme.full``).

Resuming: every run has its own folder ``<work-dir>/<phase>/<variant>/<candidate or seed>``.
The DGSU pipeline resumes stage by stage and, inside its train stage, from the last finished
epoch; baselines resume from their last epoch (``BackupAndRestore`` in ``--backup-dir``);
finished rows are kept in the results files and not rerun. Rerun the same command after a
kill. (A baseline killed between its last epoch and writing its row trains again.)

Phase ``merge`` joins the test rows of seeds run in parallel processes (one core each, each
with its own ``--results-dir`` holding copies of the protocol and select files)::

    python benchmarks/device_cifar10.py merge --work-dir $W --rows-from $W/results_b

Smoke (tiny, not a result; ``--weights none`` is for smoke runs only)::

    W=runs/device_c10_smoke; R=$W/results
    python benchmarks/device_cifar10.py select --work-dir $W --results-dir $R --weights none \
        --width 0.25 --image-sizes 32 --train-examples 16 --validation-examples 16 \
        --calibration-examples 8 --prune-examples 16 --check-steps 2 --test-examples 16 \
        --epochs 1 --learning-rates 0.001 0.002 --baseline-learning-rates 0.01
    python benchmarks/device_cifar10.py test --work-dir $W --results-dir $R --seeds 0

Smoke timings (2 shared cores, other jobs running): select 8.5 min (2 DGSU candidates, 5
baselines), test 4.7 min per seed, a second call with every row done: seconds (no run).
Nearly all of it is fixed cost (int8 graph, exports, TFLM runs, model builds).

The real run (each line resumes when rerun after a kill; CIFAR-10 from ``$DGST_CIFAR10`` or the
offline default; started in a separate git worktree so that edits to the tree cannot change
a run in progress)::

    W=runs/device_c10 && mkdir -p $W
    nohup nice -n 5 python benchmarks/device_cifar10.py select --work-dir $W \
        --image-sizes 128 --learning-rates 0.001 --epochs 1 --train-examples 20000 \
        --prune-examples 10000 --prune-epochs 2 --prune-learning-rate 0.003 \
        --variants dgsu_device dgsu_float_unpruned full sparse_update last_layer bias_only \
        --baseline-learning-rates 0.001 0.01 > $W/select.log 2>&1 &
    # after select has written benchmarks/results/device_cifar10_protocol.json:
    nohup nice -n 5 python benchmarks/device_cifar10.py test --work-dir $W --seeds 0 1 2 \
        > $W/test.log 2>&1 &

Measured (128 px, 2 shared cores, load 8-14): prune 1,596 s (10k images x 2 epochs of
distillation), plan 63 s, int8 DGSU training 1,661 s for 20k images, TFLM evaluation of
5,000 validation images ~10 min: ~1 h per DGSU run.

Baselines (float Keras, unpruned) at the chosen 1 epoch of 20k images: float DGSU ~41 img/s
at 128 px (~10 min), dense full fine-tuning ~3x that; the select line's 5 baselines x 2 rates
~2-3 h. The test line per seed: ~1 h DGSU + the baselines at their chosen rates (~1.5 h), so
3 seeds ~7-8 h, i.e. three sessions. ``test --variants dgsu_device`` runs the headline's
seeds first (a later ``test`` call adds the baselines' rows; the select phase must include
every variant the protocol is to cover).

Feature memory at 128 px (MobileNetV2-1.0, this definition): DGSU 48.9 KB, dense 2,479.6 KB,
98.0% less (``python -c`` on `feature_memory`, 2 s).
"""
import argparse
import hashlib
import itertools
import json
import pathlib
import sys
import time

import numpy as np

import _report
import sparse_update_cifar10 as lin

from dgst_tf.core import runtime
from dgst_tf.jobs.device_pipeline import DeviceConfig, StageBudgetError, run_device_pipeline
from dgst_tf.training.methods import DEFAULT_BLOCKS

RESULTS = pathlib.Path(__file__).parent / "results"
DGSU = "dgsu_device"  # the constrained pipeline
BASELINES = {"dgsu_float_unpruned": "dgsu", "full": "full", "sparse_update": "sparse_update",
             "last_layer": "last_layer", "bias_only": "bias_only"}  # variant -> method
# the protocol's fixed settings (not searched): the DeviceConfig fields of every run
FIXED = ("width", "weights", "flash_budget", "sram_budget", "firmware_allowance",
         "train_examples", "validation_examples", "calibration_examples", "prune_examples",
         "prune_epochs", "prune_learning_rate", "check_steps", "test_examples", "target_fraction", "augment")
# the searched settings: DeviceConfig field -> command-line option (a list of candidates)
GRID = {"image_size": "image_sizes", "learning_rate": "learning_rates",
        "lr_schedule": "lr_schedules", "epochs": "epochs", "blocks": "blocks",
        "min_blocks": "min_blocks",
        "temperature": "temperatures"}
COLUMNS = ["variant", "seed", "setting", "val_top1", "tflm_top1", "test_top1", "test_top1_std",
           "meets_device_constraints", "arena_kb", "flash_kb", "int8", "max_updated_fraction",
           "feature_kb", "why"]


def _arguments(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("phase", choices=("select", "test", "merge"))
    p.add_argument("--work-dir", required=True, help="one folder per run, resumed from")
    p.add_argument("--results-dir", default=str(RESULTS))
    p.add_argument("--name", default="device_cifar10")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="test phase")
    p.add_argument("--variants", nargs="+", default=[DGSU, *BASELINES],
                   choices=[DGSU, *BASELINES])
    p.add_argument("--selection-seed", type=int, default=0, help="select phase: its one seed")
    p.add_argument("--rows-from", nargs="+", default=[],
                   help="merge phase: results folders whose test rows join --results-dir's")
    defaults = DeviceConfig()
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--weights", default="imagenet", help="'none' for smoke runs only")
    for name, value in (("flash_budget", "1MB"), ("sram_budget", "256KB"),
                        ("train_examples", 45000), ("validation_examples", 5000),
                        ("calibration_examples", 64), ("prune_examples", 2000),
                        ("prune_epochs", defaults.prune_epochs),
                        ("prune_learning_rate", defaults.prune_learning_rate),
                        ("check_steps", 4),
                        ("test_examples", 10000), ("target_fraction", 0.02)):
        p.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    p.add_argument("--firmware-allowance", type=int, default=None,
                   help="bytes (default: the pipeline's measured allowance)")
    p.add_argument("--no-augment", dest="augment", action="store_false")
    p.add_argument("--image-sizes", type=int, nargs="+", default=[128])
    p.add_argument("--learning-rates", type=float, nargs="+", default=[0.001])
    p.add_argument("--lr-schedules", nargs="+", default=["constant"],
                   choices=("constant", "cosine"),
                   help="cosine is Keras-side: the exported step has a constant rate")
    p.add_argument("--epochs", type=int, nargs="+", default=[6])
    p.add_argument("--blocks", type=int, nargs="+", default=[defaults.blocks])
    p.add_argument("--min-blocks", type=int, nargs="+", default=[defaults.min_blocks])
    p.add_argument("--temperatures", type=float, nargs="+", default=[defaults.temperature],
                   help="distillation temperature of the pruning recovery")
    p.add_argument("--baseline-learning-rates", type=float, nargs="+",
                   default=[0.001, 0.003, 0.01])
    return p.parse_args(argv)


# -- files ------------------------------------------------------------------------------
def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _paths(args) -> dict:
    out = pathlib.Path(args.results_dir)
    return {"protocol": out / f"{args.name}_protocol.json",
            "select": out / f"{args.name}_select.json", "test": out / f"{args.name}.json"}


def _rows(path: pathlib.Path, key: str, value) -> list:
    """The per-run rows of an earlier call (resume), [] if none; a file whose settings
    differ at ``key`` (select: the fixed settings; test: the protocol) is refused, not
    mixed."""
    if not path.exists():
        return []
    stored = json.loads(path.read_text())
    if stored["settings"].get(key) != value:
        sys.exit(f"{path} holds rows of other settings ({key}); move it away first")
    return [r for r in stored["results"] if isinstance(r.get("seed"), int)]


def read_protocol(args) -> dict:
    """The frozen protocol; exits naming the problem if it is missing or was changed."""
    paths = _paths(args)
    if not paths["protocol"].exists():
        sys.exit(f"no protocol at {paths['protocol']}: run the select phase first (the test "
                 "set is read only under a frozen protocol)")
    stored = json.loads(paths["protocol"].read_text())
    recorded = (json.loads(paths["select"].read_text())["settings"].get("protocol_sha256")
                if paths["select"].exists() else None)
    if _digest(stored["protocol"]) != stored.get("sha256") or recorded != stored["sha256"]:
        sys.exit(f"{paths['protocol']} was changed after the select phase froze it "
                 f"(content {_digest(stored['protocol'])[:12]}, file says "
                 f"{str(stored.get('sha256'))[:12]}, select phase recorded "
                 f"{str(recorded)[:12]}): refusing to read the test set")
    return stored["protocol"]


# -- runs -------------------------------------------------------------------------------
def _device_config(fixed: dict, setting: dict, folder, seed: int, split: str) -> DeviceConfig:
    return DeviceConfig(output_dir=str(folder), dataset="cifar10", stream=True, seed=seed,
                        evaluate_on=split, **fixed, **setting)


def _device_row(config: DeviceConfig, setting_name: str) -> dict:
    """Run (or resume) the constrained pipeline; its row with the device constraints."""
    start = time.time()
    try:
        report = run_device_pipeline(config, verbose=1)
    except StageBudgetError as refused:
        return {"variant": DGSU, "seed": config.seed, "setting": setting_name,
                "meets_device_constraints": False, "why": str(refused)}
    plan, train, done = report["plan"], report["train"], report["evaluate"]
    flash = plan["file_bytes"] + plan["allowance_bytes"]
    checks = {"arena": plan["arena_bytes"] <= config.sram_budget_bytes,
              "flash": flash <= config.flash_budget_bytes, "int8": True, "batch 1": True,
              "fraction": train["max_updated_fraction"] <= config.target_fraction + 1e-9}
    return {"variant": DGSU, "seed": config.seed, "setting": setting_name,
            "val_top1": round(train["val_accuracy_per_epoch"][-1], 4),
            "evaluated_on": done["evaluated_on"], "tflm_top1": round(done["accuracy"], 4),
            "test_top1": round(done["accuracy"], 4) if config.evaluate_on == "test" else None,
            "meets_device_constraints": all(checks.values()),
            "arena_kb": round(plan["arena_bytes"] / 1024, 1), "flash_kb": round(flash / 1024, 1),
            "int8": True, "max_updated_fraction": round(train["max_updated_fraction"], 5),
            "why": "; ".join(k for k, ok in checks.items() if not ok) or
                   f"TFLM arena, deployable file + allowance, int8, batch 1; "
                   f"{'pruned' if report['prune']['pruned'] else 'not pruned'}; "
                   f"lr {config.lr_schedule}",
            "seconds": round(time.time() - start)}


def _baseline_args(fixed: dict, image_size, epochs, lr_schedule, seed, folder):
    """The namespace `sparse_update_cifar10`'s `_datasets` and `_train` read."""
    return argparse.Namespace(
        image_size=image_size, train_examples=fixed["train_examples"],
        validation_split=0.1, validation_examples=fixed["validation_examples"],
        test_examples=fixed["test_examples"], epochs=epochs, lr_schedule=lr_schedule,
        target_fraction=fixed["target_fraction"], seed=seed, backup_dir=str(folder),
        progress_every=0, blocks=DEFAULT_BLOCKS)  # the depth the baselines were frozen with


def _baseline_row(variant, lr, ns, test: bool) -> dict:
    """Train one baseline (float Keras, unpruned ImageNet MobileNetV2-1.0); its row."""
    train, val, test_split = lin._datasets(ns)  # the test split is only read when ``test``
    start = time.time()
    row = lin._train(ns, BASELINES[variant], lr, train, val)
    sparse = row.pop("sparse")
    test_top1 = float(sparse.evaluate(test_split.dataset, verbose=0)[1]) if test else None
    weights = _flash_of(sparse.base)
    return {"variant": variant, "seed": ns.seed, "setting": f"lr {lr:g}", "learning_rate": lr,
            "val_top1": round(row["val_top1"], 4),
            "test_top1": None if test_top1 is None else round(test_top1, 4),
            "meets_device_constraints": False, "int8": False,
            "max_updated_fraction": round(row["updated_fraction"], 5),
            "why": f"float32 Keras simulation, unpruned (int8 weights + biases alone "
                   f"{weights / 1024:.0f} KB), not exported to TFLM",
            "seconds": round(time.time() - start)}


def _flash_of(model) -> int:
    from dgst_tf.core.bn_folding import fold_batchnorm
    from dgst_tf.pruning import flash_bytes

    return int(flash_bytes(fold_batchnorm(model)))


# -- phases -----------------------------------------------------------------------------
def _candidates(args) -> dict:
    """{name: setting} over the product of the searched settings."""
    axes = {field: getattr(args, option) for field, option in GRID.items()}
    out = {}
    for values in itertools.product(*axes.values()):
        setting = dict(zip(axes, values))
        out["_".join(f"{k}{v}" for k, v in setting.items())] = setting
    return out


def _write(args, phase: str, settings: dict, rows: list, extra=()) -> None:
    name = args.name + ("_select" if phase == "select" else "")
    table = _report.write(name, settings, rows + list(extra), COLUMNS,
                          out_dir=args.results_dir)
    print(table, flush=True)


def select(args) -> dict:
    """Phase select (validation only); returns the protocol it froze."""
    fixed = {k: getattr(args, k) for k in FIXED} | {
        "weights": None if args.weights == "none" else args.weights}
    settings = {"phase": "select", "fixed": fixed, "grid": {k: getattr(args, v) for k, v in
                                                            GRID.items()},
                "baseline_learning_rates": args.baseline_learning_rates,
                "seed": args.selection_seed, "test set": "not read"}
    paths = _paths(args)
    work, seed = pathlib.Path(args.work_dir, "select"), args.selection_seed
    candidates = _candidates(args)
    rows = _current_rows(_rows(paths["select"], "fixed", json.loads(json.dumps(fixed))),
                         candidates)
    for name, setting in candidates.items():
        if not any(r["variant"] == DGSU and r["setting"] == name for r in rows):
            _share_pruning(work / DGSU, name, candidates)
            config = _device_config(fixed, setting, work / DGSU / name, seed, "validation")
            rows.append(_device_row(config, name) | {"candidate": setting})
            _write(args, "select", settings, rows)
    fit = [r for r in rows if r["variant"] == DGSU and r["meets_device_constraints"]]
    if not fit:
        sys.exit("no candidate setting meets the device constraints; see the select table")
    best = max(fit, key=lambda r: r["tflm_top1"])
    chosen = best["candidate"]
    baselines = {}
    for variant in [v for v in args.variants if v != DGSU]:
        for lr in args.baseline_learning_rates:
            if not any(r["variant"] == variant and r.get("learning_rate") == lr
                       and r.get("at") == best["setting"] for r in rows):
                ns = _baseline_args(fixed, chosen["image_size"], chosen["epochs"],
                                    chosen["lr_schedule"], seed,
                                    work / variant / best["setting"])
                rows.append(_baseline_row(variant, lr, ns, test=False)
                            | {"at": best["setting"]})
                _write(args, "select", settings, rows)
        mine = [r for r in rows if r["variant"] == variant and r.get("at") == best["setting"]]
        baselines[variant] = {"learning_rate": max(mine, key=lambda r: r["val_top1"])
                              ["learning_rate"]}
    protocol = {"dataset": "CIFAR-10 (JPEG copy), 10% stratified validation hold-out of the "
                           "train split, seeded by the run's seed",
                "fixed": fixed, "dgsu_device": chosen, "baselines": baselines,
                "chosen_by": f"validation top-1 (TFLM, adapted int8 model) of seed {seed}; "
                             "baselines: validation top-1 at the chosen resolution and epochs",
                "variants": args.variants, "select_rows": len(rows)}
    return _freeze(args, protocol, settings, rows)


def _current_rows(rows: list, candidates: dict) -> list:
    """The rows of this grid's candidates and of baselines run at one of them: a grid changed
    between calls (a new searched setting renames every candidate) leaves no stale row beside
    the new ones for the protocol to count or a reader to mistake for the chosen run."""
    def candidate_of(row):
        return row["setting"] if row["variant"] == DGSU else row.get("at")

    stale = [r for r in rows if candidate_of(r) not in candidates]
    for r in stale:
        print(f"dropping a row of a setting outside this grid: {r['variant']} {r['setting']} "
              f"at {candidate_of(r)}")
    return [r for r in rows if candidate_of(r) in candidates]


def _share_pruning(work, name: str, candidates: dict) -> None:
    """Candidates that differ only after pruning (learning rate, epochs, ...) share one
    pruned model: copy a finished prune stage of an earlier sibling at the same resolution
    (the pipeline reruns it if its recorded settings differ)."""
    from dgst_tf.jobs.device_pipeline import STAGES
    from dgst_tf.jobs.stages import StageFolder

    size = candidates[name]["image_size"]
    for other, setting in candidates.items():
        if other != name and setting["image_size"] == size and (work / other).is_dir():
            if StageFolder(work / name, STAGES).copy_finished("prune", work / other):
                return


def _freeze(args, protocol: dict, settings: dict, rows: list) -> dict:
    """Write the protocol (once: a different one is refused) and record its digest."""
    path = _paths(args)["protocol"]
    sha = _digest(protocol)
    if path.exists() and json.loads(path.read_text()).get("sha256") != sha:
        sys.exit(f"{path} already freezes another protocol; the test phase may have read the "
                 "test set under it. Move it away deliberately to select again.")
    if not path.exists():
        from dgst_tf.core.files import write_json_atomically

        write_json_atomically(path, {"protocol": protocol, "sha256": sha,
                                     "frozen_at": time.strftime("%Y-%m-%d %H:%M:%S")})
    _write(args, "select", settings | {"protocol_sha256": sha}, rows)
    return protocol


def feature_bytes(model, scheme, image_size: int) -> int:
    """Forward activations kept for the backward pass of one step at batch 1 (module doc)."""
    from dgst_tf.planning.memory import training_memory

    report = training_memory(model, scheme, (image_size, image_size, 3), dense=False)
    return int(sum(r.saved_input_bytes + r.mask_bytes for r in report.layers))


def feature_memory(protocol: dict) -> dict:
    """{baseline variant: feature bytes} on the unpruned MobileNetV2-1.0 at the protocol's
    resolution ("full": dense training of every layer)."""
    from dgst_tf import models
    from dgst_tf.core.bn_folding import fold_batchnorm
    from dgst_tf.training.methods import build_method

    fixed, size = protocol["fixed"], protocol["dgsu_device"]["image_size"]
    # the baselines' model: sparse_update_cifar10 trains MobileNetV2-1.0
    model = fold_batchnorm(models.mobilenet_v2(1.0, (size, size, 3), classes=10,
                                               weights=None, seed=0))
    return {variant: feature_bytes(model, build_method(method, model,
                                                       fixed["target_fraction"])[0], size)
            for variant, method in BASELINES.items()}


def _device_features(folder, image_size: int) -> int:
    """Feature bytes of the pruned model and planned scheme of a finished device run."""
    from dgst_tf.core.bn_folding import fold_batchnorm
    from dgst_tf.core.keras_compat import keras
    from dgst_tf.training.scheme import UpdateScheme

    model = keras.models.load_model(pathlib.Path(folder, "pruned.keras"), compile=False)
    return feature_bytes(fold_batchnorm(model),
                         UpdateScheme.load(pathlib.Path(folder, "scheme.json")), image_size)


def summary_rows(rows: list) -> list:
    """Per variant: mean +- std over seeds of the test top-1."""
    out = []
    for variant in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == variant and r.get("test_top1") is not None]
        scores = [r["test_top1"] for r in mine]
        if not scores:
            continue
        out.append({"variant": variant, "seed": f"mean of {len(scores)}",
                    "test_top1": round(float(np.mean(scores)), 4),
                    "test_top1_std": round(float(np.std(scores, ddof=1)), 4)
                    if len(scores) > 1 else None,
                    "val_top1": round(float(np.mean([r["val_top1"] for r in mine])), 4),
                    "meets_device_constraints": all(r["meets_device_constraints"]
                                                    for r in mine),
                    "feature_kb": mine[0].get("feature_kb"), "why": mine[0]["why"]})
    return out


def test(args) -> None:
    """Phase test: the frozen protocol, the test set read once per (variant, seed)."""
    protocol = read_protocol(args)
    sha = _digest(protocol)
    fixed, chosen = protocol["fixed"], protocol["dgsu_device"]
    memory = feature_memory(protocol)
    saving = 1 - memory["dgsu_float_unpruned"] / memory["full"]
    settings = {"phase": "test", "protocol_sha256": sha, "protocol": protocol,
                "feature_memory_bytes": memory,
                "dgsu_feature_memory_saving_vs_dense": round(saving, 4),
                "feature memory": "forward activations kept for the backward pass at batch 1 "
                                  "(int8 saved inputs of the kept channels, 1-bit ReLU masks, "
                                  "classifier input), unpruned MobileNetV2 at the chosen "
                                  "resolution, dgst_tf.planning.memory; dense = 'full'"}
    path = _paths(args)["test"]
    rows = _rows(path, "protocol_sha256", sha)
    settings["runs"] = _runs_of(path) + [{"command": " ".join(sys.argv),
                                          "machine": _report.machine()}]
    work = pathlib.Path(args.work_dir, "test")
    for seed in args.seeds:
        for variant in [v for v in args.variants if v in protocol["variants"]]:
            if any(r["variant"] == variant and r["seed"] == seed for r in rows):
                continue
            folder = work / variant / f"seed{seed}"
            if variant == DGSU:
                row = _device_row(_device_config(fixed, chosen, folder, seed, "test"),
                                  "frozen")
                features = (_device_features(folder, chosen["image_size"])
                            if "arena_kb" in row else None)
            else:
                features = memory[variant]
                ns = _baseline_args(fixed, chosen["image_size"], chosen["epochs"],
                                    chosen["lr_schedule"], seed, folder)
                row = _baseline_row(variant, protocol["baselines"][variant]["learning_rate"],
                                    ns, test=True)
            rows.append(row | {"feature_kb": None if features is None
                               else round(features / 1024, 1)})
            _write(args, "test", settings, rows, summary_rows(rows))


def _runs_of(file: pathlib.Path) -> list:
    """The command and machine of every test run whose rows ``file`` holds, [] if none
    (files written before runs were listed: the last run's)."""
    if not file.exists():
        return []
    written = json.loads(file.read_text())
    return written["settings"].get("runs") or [
        {"command": written["command"], "machine": written["machine"]}]


def merge(args) -> None:
    """Phase merge: add the test rows of ``--rows-from`` folders (seeds run by parallel
    processes, each with its own ``--results-dir`` holding copies of the protocol and select
    files) to ``--results-dir``'s, under the same frozen protocol. A (variant, seed) found in
    two files must be the same row: the test set is read once per (variant, seed)."""
    sha = _digest(read_protocol(args))
    path = _paths(args)["test"]
    files = [path] + [_paths(argparse.Namespace(results_dir=folder, name=args.name))["test"]
                      for folder in args.rows_from]
    rows, settings, runs = [], None, []
    for file in files:
        if file != path and not file.exists():
            sys.exit(f"{file}: no test rows to merge")
        runs += [run for run in _runs_of(file) if run not in runs]
        for row in _rows(file, "protocol_sha256", sha):
            same = [r for r in rows if (r["variant"], r["seed"]) == (row["variant"], row["seed"])]
            if same and same[0] != row:
                sys.exit(f"{file}: {row['variant']} seed {row['seed']} differs from the row "
                         f"already merged; the test set is read once per (variant, seed), "
                         "keep one of the two files' rows")
            rows += [] if same else [row]
        if settings is None and file.exists():
            settings = json.loads(file.read_text())["settings"]
    if settings is None:
        sys.exit(f"{path}: no test rows to merge into (and none in --rows-from)")
    settings = settings | {"runs": runs}
    order = [DGSU, *BASELINES]
    rows.sort(key=lambda r: (r["seed"], order.index(r["variant"])))
    _write(args, "test", settings, rows, summary_rows(rows))


def main(argv=None):
    args = _arguments(argv)
    runtime.limit_threads()
    {"select": select, "test": test, "merge": merge}[args.phase](args)


if __name__ == "__main__":
    main()
