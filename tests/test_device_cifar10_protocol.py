"""The frozen-protocol bookkeeping of `benchmarks/device_cifar10.py` (issue 18): which rows of
an earlier select call count, and that a protocol, once frozen, cannot be silently replaced.
No training: rows and protocols are written by hand, in the shapes the benchmark writes."""
import inspect
import json
import pathlib
import re
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import device_cifar10 as bench  # noqa: E402


def _args(tmp_path, phase="select", **grid):
    argv = [phase, "--work-dir", str(tmp_path / "work"), "--results-dir",
            str(tmp_path / "results")]
    for option, values in grid.items():
        argv += [f"--{option.replace('_', '-')}", *map(str, values)]
    return bench._arguments(argv)


def test_rows_of_an_earlier_grid_are_dropped_and_this_grids_kept(tmp_path):
    old = bench._candidates(_args(tmp_path, epochs=[1]))
    new = bench._candidates(_args(tmp_path, epochs=[1, 2]))
    (old_name,) = old
    assert old_name in new  # the same grid point keeps its name
    renamed = old_name.replace("epochs1", "epochs3")
    rows = [{"variant": bench.DGSU, "setting": old_name},
            {"variant": "full", "setting": "lr 0.01", "at": old_name},
            {"variant": bench.DGSU, "setting": renamed},
            {"variant": "full", "setting": "lr 0.01", "at": renamed}]
    kept = bench._current_rows(rows, new)
    assert kept == rows[:2]


def test_a_frozen_protocol_is_not_replaced(tmp_path):
    args = _args(tmp_path)
    pathlib.Path(args.results_dir).mkdir(parents=True)
    settings = {"phase": "select", "fixed": {}, "test set": "not read"}
    first = bench._freeze(args, {"chosen": 1}, settings, [])
    assert first == {"chosen": 1}
    assert bench._freeze(args, {"chosen": 1}, settings, []) == first  # same: accepted
    with pytest.raises(SystemExit, match="already freezes another protocol"):
        bench._freeze(args, {"chosen": 2}, settings, [])
    stored = json.loads(bench._paths(args)["protocol"].read_text())
    assert stored["protocol"] == {"chosen": 1}


def _row(variant, seed, top1):
    return {"variant": variant, "seed": seed, "test_top1": top1, "val_top1": top1,
            "meets_device_constraints": variant == bench.DGSU, "why": variant}


def test_merge_joins_seeds_run_apart_and_refuses_two_readings_of_one(tmp_path, monkeypatch):
    args = _args(tmp_path, "merge")
    results = pathlib.Path(args.results_dir)
    results.mkdir(parents=True)
    bench._freeze(args, {"chosen": 1}, {"phase": "select"}, [])
    sha = json.loads(bench._paths(args)["protocol"].read_text())["sha256"]
    other = tmp_path / "results_b"
    other.mkdir()
    for name in ("device_cifar10_protocol.json", "device_cifar10_select.json"):
        (other / name).write_bytes((results / name).read_bytes())
    settings = {"phase": "test", "protocol_sha256": sha}
    mine = [_row(bench.DGSU, 0, 0.6), _row("full", 0, 0.7)]
    bench._write(args, "test", settings, mine, bench.summary_rows(mine))
    theirs = [_row("full", 1, 0.8), _row(bench.DGSU, 1, 0.5), _row(bench.DGSU, 0, 0.6)]
    monkeypatch.setattr(sys, "argv", ["device_cifar10.py", "test", "--seeds", "1"])
    bench._write(bench._arguments(["test", "--work-dir", "w", "--results-dir", str(other)]),
                 "test", settings, theirs, bench.summary_rows(theirs))

    bench.merge(bench._arguments(["merge", "--work-dir", "w", "--results-dir", str(results),
                                  "--rows-from", str(other)]))
    merged = json.loads(bench._paths(args)["test"].read_text())["results"]
    per_run = [(r["variant"], r["seed"]) for r in merged if isinstance(r["seed"], int)]
    assert per_run == [(bench.DGSU, 0), ("full", 0), (bench.DGSU, 1), ("full", 1)]
    summary = {r["variant"]: r for r in merged if not isinstance(r["seed"], int)}
    assert summary[bench.DGSU]["test_top1"] == pytest.approx(0.55)
    assert summary["full"]["test_top1_std"] == pytest.approx(0.0707, abs=1e-4)
    runs = json.loads(bench._paths(args)["test"].read_text())["settings"]["runs"]
    assert [run["command"].endswith("--seeds 1") for run in runs] == [False, True]

    theirs[2] = _row(bench.DGSU, 0, 0.61)  # seed 0 read a second time, another result
    bench._write(bench._arguments(["test", "--work-dir", "w", "--results-dir", str(other)]),
                 "test", settings, theirs)
    with pytest.raises(SystemExit, match="dgsu_device seed 0 differs"):
        bench.merge(bench._arguments(["merge", "--work-dir", "w", "--results-dir",
                                      str(results), "--rows-from", str(other)]))
    bench._write(bench._arguments(["test", "--work-dir", "w", "--results-dir", str(other)]),
                 "test", settings | {"protocol_sha256": "another"}, theirs[:2])
    with pytest.raises(SystemExit, match="rows of other settings"):
        bench.merge(bench._arguments(["merge", "--work-dir", "w", "--results-dir",
                                      str(results), "--rows-from", str(other)]))


def test_the_baselines_namespace_has_every_option_the_training_code_reads(tmp_path):
    """The baselines call `sparse_update_cifar10`'s functions with a hand-built namespace: an
    option added to that script must be added there too (an AttributeError would otherwise
    surface only after hours of a test phase)."""
    fixed = {"train_examples": 8, "validation_examples": 4, "test_examples": 4,
             "target_fraction": 0.02}
    ns = bench._baseline_args(fixed, 32, 1, "constant", 0, tmp_path)
    source = "".join(inspect.getsource(f) for f in (
        bench.lin._datasets, bench.lin._train, bench.lin._backup_callbacks))
    read = set(re.findall(r"\bargs\.(\w+)", source))
    assert "blocks" in read and read <= set(vars(ns))
