"""Scheme search, contribution analysis (and its cache) and `dgst plan`."""
import argparse
import re

import numpy as np
import pytest
from small_models import batch, residual_cnn

from dgst_tf.planning import contribution
from dgst_tf.planning.budget import MemoryBudgetError, check_budget
from dgst_tf.cli.plan import add_plan_parser
from dgst_tf.planning.contribution import (ContributionTable, FineTuneSettings, analytic_contributions,
                                  measure_contributions)
from dgst_tf.planning.memory import MemoryModel, training_memory
from dgst_tf.training.scheme import UpdateScheme
from dgst_tf.planning.search import (NoSchemeFitsError, evolutionary_search, random_search,
                            search_scheme)


def synthetic_problem(seed, n_convs=30, n_candidates=20):
    """A table with diminishing returns per ratio and an additive memory whose costs are
    multiples of 100 bytes, so that `exact_optimum` can solve it by dynamic programming."""
    rng = np.random.default_rng(seed)
    names = [f"conv{i}" for i in range(n_convs)]
    layers = names[-n_candidates:]
    amplitude = rng.lognormal(-4.5, 0.8, n_candidates) * np.linspace(0.3, 1.0, n_candidates)
    weight_gain = {n: {r: float(a * r ** 0.5) for r in (0.125, 0.25, 0.5, 1.0)}
                   for n, a in zip(layers, amplitude)}
    bias_gain = {k: 0.03 * (1 - np.exp(-k / 8)) for k in range(n_convs + 1)}
    table = ContributionTable(names, bias_gain, weight_gain, source="synthetic")
    bias_cost = rng.integers(2, 20, n_convs) * 100
    weight_cost = dict(zip(layers, rng.integers(2, 20, n_candidates) * 800))

    def memory(n_bias, weights):
        return (500 + int(bias_cost[n_convs - n_bias:].sum() if n_bias else 0)
                + int(sum(weight_cost[n] * r for n, r in weights.items())))
    return table, memory


def exact_optimum(table, memory, budget, unit=100):
    """Best gain by a multiple-choice knapsack per bias count (costs are multiples of unit)."""
    best = -np.inf
    for k, bias_gain in table.bias_gain.items():
        base = memory(k, {})
        if base > budget:
            continue
        cap = (budget - base) // unit
        dp = np.zeros(cap + 1)
        for name in table.layers:
            if table.bias_count_for(name) > k:
                continue
            new = dp.copy()
            for ratio, gain in table.weight_gain[name].items():
                cost = (memory(k, {name: ratio}) - base) // unit
                if cost <= cap:
                    new[cost:] = np.maximum(new[cost:], dp[:cap + 1 - cost] + gain)
            dp = new
        best = max(best, bias_gain + dp[cap])
    return best


def test_evolutionary_search_beats_random_search_at_equal_evaluations():
    budget = 40000
    for seed in range(4):
        table, memory = synthetic_problem(seed)
        optimum = exact_optimum(table, memory, budget)
        evolved = evolutionary_search(table, memory, budget, evaluations=1000, seed=seed)
        baseline = random_search(table, memory, budget, evaluations=1000, seed=seed)
        assert evolved.evaluations == baseline.evaluations == 1000
        assert evolved.gain > baseline.gain, seed
        assert evolved.gain >= 0.94 * optimum, (seed, evolved.gain, optimum)
        for result in (evolved, baseline):
            assert result.memory_bytes == memory(result.n_bias_update, result.weights) <= budget
            assert result.gain == pytest.approx(table.gain(result.n_bias_update, result.weights))
            # every weight-updated layer is among the bias-updated last convs
            assert all(table.bias_count_for(n) <= result.n_bias_update for n in result.weights)


def test_search_is_reproducible_and_the_scheme_matches():
    table, memory = synthetic_problem(7)
    a = evolutionary_search(table, memory, "30KB", evaluations=300, seed=3)
    b = evolutionary_search(table, memory, 30 * 1024, evaluations=300, seed=3)
    assert (a.n_bias_update, a.weights, a.history) == (b.n_bias_update, b.weights, b.history)
    scheme = a.scheme
    assert {n for n, u in scheme.layers.items() if u.updates_weights} == set(a.weights)
    assert sum(1 for u in scheme.layers.values() if u.updates_bias) == a.n_bias_update
    config = a.backward_config()
    assert config["n_bias_update"] == a.n_bias_update
    assert len(config["manual_weight_idx"].split("-")) == len(a.weights)


def test_budget_that_no_scheme_fits_names_the_value():
    table, memory = synthetic_problem(0)
    with pytest.raises(NoSchemeFitsError, match=re.escape("0.4 KB (400 bytes)")):
        evolutionary_search(table, memory, 400, evaluations=10)
    with pytest.raises(ValueError, match="cannot read memory budget '12 apples'"):
        random_search(table, memory, "12 apples", evaluations=10)


def test_search_scheme_on_a_model_uses_its_memory_model():
    model = residual_cnn()
    table = analytic_contributions(model, layers=["expand", "depthwise", "project", "head"])
    mm = MemoryModel(model)
    for accounting, budget in (("extra_memory", 1500), ("training_peak", 7000),
                               ("arena", 12000)):
        result = search_scheme(model, table, budget, accounting=accounting, evaluations=200,
                               memory_model=mm)
        report = training_memory(model, result.scheme)
        used = {"extra_memory": report.extra_memory_bytes, "arena": report.arena_bytes,
                "training_peak": report.training_peak_bytes}[accounting]
        assert used == result.memory_bytes <= budget
        assert result.weights  # the budget leaves room for some weights
        check_budget(model, result.scheme, budget_bytes=budget, accounting=accounting)
    with pytest.raises(NoSchemeFitsError) as info:
        search_scheme(model, table, 900, accounting="training_peak", memory_model=mm)
    assert "(900 bytes)" in str(info.value) and "classifier" in str(info.value)
    assert isinstance(info.value, MemoryBudgetError)


def test_analytic_contributions_prefer_later_layers():
    model = residual_cnn()
    table = analytic_contributions(model, layers=["stem", "expand", "head"])
    assert table.weight_gain["head"][1.0] > table.weight_gain["expand"][1.0] > \
        table.weight_gain["stem"][1.0]
    assert table.weight_gain["head"][0.125] < table.weight_gain["head"][1.0]
    assert table.bias_gain[0] == 0 and table.bias_gain[5] > table.bias_gain[1]


def test_measured_contributions_are_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("DGST_CACHE_DIR", str(tmp_path))
    calls = []
    real = contribution._fine_tune

    def counting(*args):
        calls.append(args[2].name)
        return real(*args)

    monkeypatch.setattr(contribution, "_fine_tune", counting)
    model = residual_cnn()
    train, val = batch(32, seed=1), batch(16, seed=2)
    kwargs = dict(layers=["expand", "head"], ratios=(0.5, 1.0), bias_counts=[],
                  settings=FineTuneSettings(steps=3, batch_size=8), progress=False,
                  parallel=False)  # in this process, where the counting patch applies
    first = measure_contributions(model, train, val, **kwargs)
    # runs: classifier only, biases of the last 1 (head) and 4 (from expand) convs,
    # and 2 layers x 2 ratios on top of them
    assert len(calls) == 7
    assert sorted(first.bias_gain) == [0, 1, 4] and first.bias_gain[0] == 0
    assert set(first.weight_gain) == {"expand", "head"}
    assert 0 <= first.baseline_accuracy <= 1
    second = measure_contributions(model, train, val, **kwargs)
    assert len(calls) == 7  # free: everything came from the cache
    assert second.to_dict()["weight_gain"] == first.to_dict()["weight_gain"]
    assert list(tmp_path.glob("contribution/*.json"))
    other = residual_cnn(seed=5)  # other weights: another cache entry
    assert contribution._model_key(other, {}) != contribution._model_key(model, {})
    path = tmp_path / "table.json"
    first.save(path)
    assert ContributionTable.load(path).to_dict() == first.to_dict()


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance for this module's parallel tests (started once: it is slow)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_contribution_runs_on_ray_give_the_sequential_table(tmp_path, monkeypatch, local_ray):
    """Two Ray workers, each run in a worker process: the same table, run by run."""
    monkeypatch.setenv("DGST_CACHE_DIR", str(tmp_path))
    model = residual_cnn()
    train, val = batch(32, seed=1), batch(16, seed=2)
    kwargs = dict(layers=["expand", "head"], ratios=(0.5, 1.0), bias_counts=[],
                  settings=FineTuneSettings(steps=4, batch_size=8, learning_rate=0.1),
                  progress=False, cache=False)
    sequential = measure_contributions(model, train, val, parallel=False, **kwargs)
    on_ray = measure_contributions(model, train, val, parallel=True, workers=2, **kwargs)
    assert on_ray.to_dict() == sequential.to_dict()
    # the runs differ (a table of equal values would not show a mix-up of runs)
    assert len({round(g, 6) for gains in sequential.weight_gain.values()
                for g in gains.values()} | set(sequential.bias_gain.values())) > 2


def test_parallel_runs_come_back_with_their_index(local_ray):
    from dgst_tf.core.parallel_runs import run_in_parallel

    results = dict(run_in_parallel(np.add, [(1,), (2,), (5,)], shared=(10,), workers=2))
    assert results == {0: 11, 1: 12, 2: 15}
    with pytest.raises(ValueError, match="workers must be >= 1, got 0"):
        next(run_in_parallel(np.add, [(1,)], workers=0))


def run_plan(argv):
    parser = argparse.ArgumentParser(prog="dgst")
    add_plan_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["plan", *argv])
    return args.func(args)


def test_dgst_plan_writes_a_scheme_that_fits(tmp_path, capsys):
    out = tmp_path / "scheme.json"
    common = ["--width", "0.35", "--image-size", "32", "--evaluations", "200",
              "--output", str(out)]
    assert run_plan([*common, "--budget", "20KB", "--memory", "extra_memory",
                     "--chart", str(tmp_path / "chart.png")]) == 0
    text = capsys.readouterr().out
    assert "tiny-training backward_config: n_bias_update=" in text
    assert "extra memory (Lin et al. label)" in text and "dense (full) training peak" in text
    scheme = UpdateScheme.load(out)
    assert any(u.updates_weights for u in scheme.layers.values())
    from dgst_tf.models import mobilenet_v2

    model = mobilenet_v2(0.35, (32, 32, 3), classes=10, weights=None)
    check_budget(model, scheme, budget_bytes="20KB", accounting="extra_memory")
    assert (tmp_path / "chart.png").stat().st_size > 0
    with pytest.raises(NoSchemeFitsError, match=re.escape("(1024 bytes)")):
        run_plan([*common, "--budget", "1KB"])
    with pytest.raises(ValueError, match="cannot read memory budget 'lots'"):
        run_plan([*common, "--budget", "lots"])


def test_dgst_plan_describes_the_exported_dgsu_step_by_default(tmp_path, capsys):
    """Without options `dgst plan` budgets TFLM's arena of the step `export_training` emits
    with on-device traversal selection (DGSU): whole kernels of weight-updated layers in
    SRAM, fused blocks, requantization in flash, the trainable tensors as outputs."""
    from dgst_tf.models import mobilenet_v2

    out = tmp_path / "scheme.json"
    common = ["--width", "0.35", "--image-size", "32", "--evaluations", "100",
              "--output", str(out)]
    assert run_plan([*common, "--budget", "160KB"]) == 0
    text = capsys.readouterr().out
    assert "on the arena; selection traversal" in text and "TFLM arena (structs included)" in text
    scheme = UpdateScheme.load(out)
    assert any(u.updates_weights for u in scheme.layers.values())
    model = mobilenet_v2(0.35, (32, 32, 3), classes=10, weights=None)
    dgsu = MemoryModel(model, policy="traversal")
    assert dgsu.arena_bytes(scheme) <= 160 * 1024
    assert f"arena {dgsu.arena_bytes(scheme) / 1024:.1f} KB of 160.0 KB" in text
    # the static step holds only the kept channels' weights: never more than DGSU's
    assert MemoryModel(model).arena_bytes(scheme) <= dgsu.arena_bytes(scheme)
    assert run_plan([*common, "--budget", "160KB", "--policy", "static",
                     "--memory", "training_peak"]) == 0
    assert "on the training peak; selection static" in capsys.readouterr().out
    check_budget(model, UpdateScheme.load(out), budget_bytes="160KB")
    with pytest.raises(ValueError, match="--selection dynamic needs an on-device --policy"):
        run_plan([*common, "--selection", "dynamic", "--policy", "static"])
