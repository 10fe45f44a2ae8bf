"""The frozen-protocol bookkeeping of `benchmarks/device_cifar10.py` (issue 18): which rows of
an earlier select call count, and that a protocol, once frozen, cannot be silently replaced.
No training: rows and protocols are written by hand, in the shapes the benchmark writes."""
import json
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import device_cifar10 as bench  # noqa: E402


def _args(tmp_path, **grid):
    argv = ["select", "--work-dir", str(tmp_path / "work"), "--results-dir",
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
