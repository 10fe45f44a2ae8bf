"""Scheme search under a memory budget (Lin et al. 2022, section 3.2), seeded and reproducible.

Maximise ``dAcc_b[k] + sum_i dAcc_w[i, r_i]`` over the bias count k and one ratio per
candidate layer (``r_i`` in {0, 1/8, 1/4, 1/2, 1}, as far as the contribution table has
them) subject to ``memory(k, {i: r_i}) <= budget``; every weight-updated layer must be
among the last k convs. Evolutionary search ((mu + lambda), tournament selection, uniform
crossover, mutation, repair into the budget) and random search with the same repair at the
same number of evaluations, the baseline it must beat::

    from dgst_tf.planning.contribution import analytic_contributions
    from dgst_tf.planning.search import search_scheme

    table = analytic_contributions(model)
    result = search_scheme(model, table, "99KB", input_shape=(128, 128, 3))
    result.scheme.save("scheme.json"); result.gain, result.memory_bytes
    baseline = search_scheme(model, table, "99KB", (128, 128, 3), method="random")
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from dgst_tf.planning.budget import ACCOUNTINGS, MemoryBudgetError, budget_message, parse_budget
from dgst_tf.planning.contribution import ContributionTable
from dgst_tf.planning.memory import MemoryModel, kb
from dgst_tf.training.scheme import UpdateScheme

RATIO_LEVELS = (0.0, 0.125, 0.25, 0.5, 1.0)
METHODS = ("evolutionary", "random")
MemoryFn = Callable[[int, dict], int]


class NoSchemeFitsError(MemoryBudgetError):
    """Even the smallest scheme (classifier only) exceeds the budget."""


@dataclasses.dataclass(frozen=True)
class Candidate:
    """Biases of the last ``n_bias`` convs; ``levels[i]`` indexes the ratios of layer i."""

    n_bias: int
    levels: tuple


@dataclasses.dataclass
class SearchResult:
    """The best scheme a search found, its predicted gain and its memory."""

    method: str
    scheme: UpdateScheme
    n_bias_update: int
    weights: dict
    gain: float
    memory_bytes: int
    budget_bytes: int
    accounting: str
    evaluations: int
    seed: int
    conv_names: list
    history: list = dataclasses.field(default_factory=list, repr=False)

    def backward_config(self) -> dict:
        """tiny-training's fields: n_bias_update, manual_weight_idx, weight_update_ratio."""
        chosen = sorted((self.conv_names.index(n), r) for n, r in self.weights.items())
        return {"n_bias_update": self.n_bias_update,
                "manual_weight_idx": "-".join(str(i) for i, _ in chosen),
                "weight_update_ratio": "-".join(f"{r:g}" for _, r in chosen)}

    def describe(self) -> str:
        config = self.backward_config()
        return (f"{self.method} search ({self.evaluations} evaluations, seed {self.seed}): "
                f"biases of the last {self.n_bias_update} convs, weights "
                + (", ".join(f"{n}@{r:g}" for n, r in self.weights.items()) or "none")
                + f" [manual_weight_idx {config['manual_weight_idx'] or '-'}, ratios "
                f"{config['weight_update_ratio'] or '-'}]; predicted gain "
                f"{100 * self.gain:+.2f} points; {self.accounting} {kb(self.memory_bytes)} of "
                f"{kb(self.budget_bytes)}")

    def to_dict(self) -> dict:
        return {"method": self.method, "scheme": self.scheme.get_config(),
                "backward_config": self.backward_config(), "gain": self.gain,
                "memory_bytes": self.memory_bytes, "budget_bytes": self.budget_bytes,
                "accounting": self.accounting, "evaluations": self.evaluations,
                "seed": self.seed}


def scheme_for(conv_names, n_bias: int, weights: dict, name: str = "searched") -> UpdateScheme:
    """The UpdateScheme: biases of the last ``n_bias`` of ``conv_names`` plus ``weights``.

        scheme_for(table.conv_names, 16, {"block_16_expand": 0.25})
    """
    spec = {n: "bias" for n in conv_names[len(conv_names) - n_bias:]} if n_bias else {}
    spec.update({n: float(r) for n, r in weights.items() if r})
    return UpdateScheme(spec, name=name)


def memory_function(memory_model: MemoryModel, conv_names, accounting: str = "extra_memory"
                    ) -> MemoryFn:
    """``fn(n_bias, {layer: ratio}) -> bytes`` for a search, from a `MemoryModel`.

        fn = memory_function(MemoryModel(model, (128, 128, 3)), table.conv_names)
    """
    conv_names = list(conv_names)
    if accounting == "extra_memory":
        def extra(n_bias, weights):
            bits = memory_model.extra_memory_bits(
                conv_names[len(conv_names) - n_bias:] if n_bias else [], weights)
            return -(-bits // 8)
        return extra
    if accounting in ("training_peak", "arena"):
        measure = getattr(memory_model, f"{accounting}_bytes")

        def step_memory(n_bias, weights):
            return measure(scheme_for(conv_names, n_bias, weights))
        return step_memory
    raise ValueError(f"accounting must be one of {ACCOUNTINGS}, got {accounting!r}")


class _Problem:
    """The search space of one table, with a memoised objective and memory."""

    def __init__(self, table: ContributionTable, memory_fn: MemoryFn, budget: int):
        self.table, self.memory_fn, self.budget = table, memory_fn, budget
        self.layers = table.layers
        self.levels = [[0.0] + sorted(r for r in table.weight_gain[n] if r in RATIO_LEVELS[1:])
                       for n in self.layers]
        self.ks = sorted(table.bias_gain)
        self.need_k = [table.bias_count_for(n) for n in self.layers]
        self._memory = {}

    def weights(self, c: Candidate) -> dict:
        return {n: self.levels[i][lv] for i, (n, lv) in enumerate(zip(self.layers, c.levels))
                if lv}

    def memory(self, c: Candidate) -> int:
        if c not in self._memory:
            self._memory[c] = int(self.memory_fn(c.n_bias, self.weights(c)))
        return self._memory[c]

    def gain(self, c: Candidate) -> float:
        return self.table.gain(c.n_bias, self.weights(c))

    def random(self, rng) -> Candidate:
        density = rng.random()
        levels = tuple(int(rng.integers(1, len(lv))) if len(lv) > 1 and rng.random() < density
                       else 0 for lv in self.levels)
        return Candidate(int(rng.choice(self.ks)), levels)

    def covered(self, c: Candidate, rng) -> Candidate:
        """Every weight layer among the last n_bias convs: raise k, or drop the layers."""
        need = max((k for k, lv in zip(self.need_k, c.levels) if lv), default=0)
        if need <= c.n_bias:
            return c
        higher = [k for k in self.ks if k >= need]
        if higher and rng.random() < 0.5:
            return Candidate(higher[0], c.levels)
        return self.drop_uncovered(c)

    def drop_uncovered(self, c: Candidate) -> Candidate:
        return Candidate(c.n_bias, tuple(lv if k <= c.n_bias else 0
                                         for k, lv in zip(self.need_k, c.levels)))

    def repair(self, c: Candidate, rng) -> Candidate:
        """Shrink ``c`` (lower ratios or fewer biases, at random) until it fits the budget."""
        c = self.covered(c, rng)
        while self.memory(c) > self.budget:
            active = [i for i, lv in enumerate(c.levels) if lv]
            lower_ks = [k for k in self.ks if k < c.n_bias]
            if active and (not lower_ks or rng.random() < 0.7):
                i = int(rng.choice(active))
                levels = list(c.levels)
                levels[i] -= 1
                c = Candidate(c.n_bias, tuple(levels))
            elif lower_ks:
                c = self.drop_uncovered(Candidate(lower_ks[-1], c.levels))
            else:
                raise AssertionError("unreachable: the empty candidate fits (checked first)")
        return c

    def mutate(self, c: Candidate, rng) -> Candidate:
        levels = list(c.levels)
        rate = 1.0 / max(1, len(levels))
        for i in range(len(levels)):
            if rng.random() < rate:
                step = int(rng.choice((-1, 1))) if rng.random() < 0.7 else None
                top = len(self.levels[i]) - 1
                levels[i] = (int(rng.integers(0, top + 1)) if step is None
                             else min(top, max(0, levels[i] + step)))
        n_bias = c.n_bias
        if rng.random() < 0.3:
            at = self.ks.index(n_bias) + int(rng.choice((-1, 1)))
            n_bias = self.ks[min(len(self.ks) - 1, max(0, at))]
        return Candidate(n_bias, tuple(levels))

    @staticmethod
    def crossover(a: Candidate, b: Candidate, rng) -> Candidate:
        mask = rng.random(len(a.levels)) < 0.5
        levels = tuple(x if m else y for x, y, m in zip(a.levels, b.levels, mask))
        return Candidate(a.n_bias if rng.random() < 0.5 else b.n_bias, levels)


def _check_fits(problem: _Problem, accounting: str) -> None:
    empty = Candidate(0, (0,) * len(problem.layers))
    if problem.memory(empty) > problem.budget:
        raise NoSchemeFitsError(
            f"no scheme fits the memory budget of {kb(problem.budget)} ({problem.budget} "
            f"bytes): the smallest scheme (classifier only) already needs "
            f"{kb(problem.memory(empty))} ({accounting})", None, problem.budget)


class _Tracker:
    """Counts evaluations and keeps the best candidate (ties: the earliest)."""

    def __init__(self, problem: _Problem, limit: int):
        self.problem, self.limit = problem, limit
        self.count, self.best, self.best_gain, self.history = 0, None, -np.inf, []

    def score(self, c: Candidate) -> float:
        self.count += 1
        gain = self.problem.gain(c)
        if gain > self.best_gain:
            self.best, self.best_gain = c, gain
        self.history.append(self.best_gain)
        return gain

    @property
    def done(self) -> bool:
        return self.count >= self.limit


def evolutionary_search(table: ContributionTable, memory_fn: MemoryFn, budget_bytes,
                        evaluations: int = 2000, population: int = 32, seed: int = 0,
                        accounting: str = "extra_memory") -> SearchResult:
    """Evolutionary search at ``evaluations`` scored candidates (see the module doc).

        result = evolutionary_search(table, memory_function(mm, table.conv_names), "99KB")
    """
    problem, tracker, rng = _setup(table, memory_fn, budget_bytes, evaluations, seed,
                                   accounting)
    pop = []
    while len(pop) < population and not tracker.done:
        c = problem.repair(problem.random(rng), rng)
        pop.append((tracker.score(c), c))
    while not tracker.done:
        children = []
        for _ in range(population):
            if tracker.done:
                break
            a, b = _tournament(pop, rng), _tournament(pop, rng)
            child = problem.mutate(problem.crossover(a, b, rng), rng)
            child = problem.repair(child, rng)
            children.append((tracker.score(child), child))
        merged = {}
        for gain, c in sorted(pop + children, key=lambda gc: -gc[0]):
            merged.setdefault(c, gain)
        pop = [(g, c) for c, g in list(merged.items())[:population]]
    return _result("evolutionary", problem, tracker, seed, accounting)


def random_search(table: ContributionTable, memory_fn: MemoryFn, budget_bytes,
                  evaluations: int = 2000, seed: int = 0,
                  accounting: str = "extra_memory") -> SearchResult:
    """The baseline: ``evaluations`` random candidates, each repaired into the budget.

        baseline = random_search(table, memory_function(mm, table.conv_names), "99KB")
    """
    problem, tracker, rng = _setup(table, memory_fn, budget_bytes, evaluations, seed,
                                   accounting)
    while not tracker.done:
        tracker.score(problem.repair(problem.random(rng), rng))
    return _result("random", problem, tracker, seed, accounting)


def _setup(table, memory_fn, budget_bytes, evaluations, seed, accounting):
    if int(evaluations) < 1:
        raise ValueError(f"evaluations must be >= 1, got {evaluations}")
    problem = _Problem(table, memory_fn, parse_budget(budget_bytes))
    _check_fits(problem, accounting)
    return problem, _Tracker(problem, int(evaluations)), np.random.default_rng(seed)


def _tournament(pop, rng, size: int = 3) -> Candidate:
    picks = rng.integers(0, len(pop), size=min(size, len(pop)))
    return max((pop[int(i)] for i in picks), key=lambda gc: gc[0])[1]


def _result(method, problem, tracker, seed, accounting) -> SearchResult:
    best = tracker.best
    weights = problem.weights(best)
    return SearchResult(
        method=method,
        scheme=scheme_for(problem.table.conv_names, best.n_bias, weights,
                          name=f"{method}_{problem.budget // 1024}KB"),
        n_bias_update=best.n_bias, weights=weights, gain=float(tracker.best_gain),
        memory_bytes=problem.memory(best), budget_bytes=problem.budget,
        accounting=accounting, evaluations=tracker.count, seed=seed,
        conv_names=list(problem.table.conv_names), history=tracker.history)


def search_scheme(model, table: ContributionTable, budget_bytes, input_shape=None,
                  accounting: str = "extra_memory", method: str = "evolutionary",
                  evaluations: int = 2000, seed: int = 0, memory_model: MemoryModel | None = None,
                  **memory_options) -> SearchResult:
    """Search the best scheme for ``model`` within ``budget_bytes`` (see the module doc).

    ``accounting``: "extra_memory" (Lin et al.'s label, as in the paper), "training_peak"
    (the whole step's tensors; slower) or "arena" (TFLM's arena of the step). The memory
    of a step is that of the graph `export_training` emits; ``memory_options`` go to
    `MemoryModel` (e.g. ``policy="traversal"`` for on-device DGSU selection).

        result = search_scheme(model, table, "256KB", (128, 128, 3), "arena",
                               policy="traversal", output_params=False)
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    memory_model = memory_model or MemoryModel(model, input_shape, **memory_options)
    model_convs = [c.name for c in memory_model.convs]
    if model_convs != list(table.conv_names):
        raise ValueError("the contribution table was made for another model: its convs "
                         f"{table.conv_names[:3]}... differ from {model_convs[:3]}...")
    fn = memory_function(memory_model, table.conv_names, accounting)
    run = evolutionary_search if method == "evolutionary" else random_search
    try:
        return run(table, fn, budget_bytes, evaluations=evaluations, seed=seed,
                   accounting=accounting)
    except NoSchemeFitsError as err:  # say what takes the memory of the smallest scheme
        smallest = memory_model.report(scheme_for(table.conv_names, 0, {}, "classifier_only"),
                                       dense=False)
        raise NoSchemeFitsError(f"{err}\n" + budget_message(smallest, err.budget_bytes,
                                                             accounting),
                                smallest, err.budget_bytes) from None


__all__ = ["Candidate", "METHODS", "NoSchemeFitsError", "RATIO_LEVELS", "SearchResult",
           "evolutionary_search", "memory_function", "random_search", "scheme_for",
           "search_scheme"]
