"""Contribution analysis (Lin et al. 2022): what each bias count and layer update is worth.

``dAcc_b[k]``: validation accuracy gained by fine-tuning the biases of the last k convs
(plus the classifier) over fine-tuning the classifier alone. ``dAcc_w[i, r]``: accuracy
gained by also updating ratio r of layer i's weights, on top of the biases of every conv
from layer i to the output (the least a scheme that updates layer i's weights must
update). Each value comes from a short fine-tuning run through `SparseUpdateModel`, from
the same starting weights, with Lin's static top-k-by-magnitude channels::

    from dgst_tf.planning.contribution import measure_contributions, analytic_contributions

    table = measure_contributions(model, train, validation)   # minutes; cached on disk
    table.bias_gain[8], table.weight_gain["block_16_expand"][0.25]
    table = analytic_contributions(model)                     # instant proxy, no data

Results are cached as JSON in ``runtime.cache_dir("contribution")``, keyed by a hash of
the model (architecture and weights), the data and the settings, and written after every
run, so a rerun (or a resumed, interrupted one) only trains what is missing.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import pathlib

import numpy as np

from dgst_tf.core import runtime
from dgst_tf.core.bn_folding import fold_batchnorm, foldable_pairs
from dgst_tf.core.files import write_json_atomically
from dgst_tf.core.keras_compat import keras, tf
from dgst_tf.core.layer_kinds import is_depthwise, is_pointwise, kernel_of
from dgst_tf.training.scheme import UpdateScheme, conv_layers

RATIOS = (0.125, 0.25, 0.5, 1.0)
CACHE_VERSION = 2


@dataclasses.dataclass
class ContributionTable:
    """``bias_gain[k]`` = dAcc_b[k] and ``weight_gain[layer][ratio]`` = dAcc_w[i, r], as
    accuracy fractions (0.01 = one point), for convs named in execution order.

        table.gain(8, {"block_16_expand": 0.25})   # dAcc_b[8] + dAcc_w[block_16_expand, 1/4]
    """

    conv_names: list
    bias_gain: dict
    weight_gain: dict
    baseline_accuracy: float | None = None
    source: str = "measured"
    settings: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        self.bias_gain = {int(k): float(v) for k, v in self.bias_gain.items()}
        self.bias_gain.setdefault(0, 0.0)
        self.weight_gain = {name: {float(r): float(g) for r, g in gains.items()}
                            for name, gains in self.weight_gain.items()}
        unknown = [n for n in self.weight_gain if n not in self.conv_names]
        if unknown:
            raise ValueError(f"contribution table: layers {unknown} are not in conv_names")

    @property
    def layers(self) -> list:
        """The candidate weight-update layers, in execution order."""
        return [n for n in self.conv_names if n in self.weight_gain]

    def bias_count_for(self, layer: str) -> int:
        """How many last convs a scheme must bias-update to reach ``layer``."""
        return len(self.conv_names) - self.conv_names.index(layer)

    def gain(self, n_bias: int, weights: dict | None = None) -> float:
        """Predicted accuracy gain of biases of the last ``n_bias`` convs + ``weights``."""
        if n_bias not in self.bias_gain:
            raise KeyError(f"no dAcc_b for k={n_bias}; measured k: {sorted(self.bias_gain)}")
        total = self.bias_gain[n_bias]
        for name, ratio in (weights or {}).items():
            if ratio:
                total += self.weight_gain[name][float(ratio)]
        return total

    def to_dict(self) -> dict:
        return {"conv_names": list(self.conv_names),
                "bias_gain": {str(k): v for k, v in sorted(self.bias_gain.items())},
                "weight_gain": {n: {repr(r): g for r, g in sorted(gains.items())}
                                for n, gains in self.weight_gain.items()},
                "baseline_accuracy": self.baseline_accuracy, "source": self.source,
                "settings": self.settings}

    @classmethod
    def from_dict(cls, payload: dict) -> "ContributionTable":
        return cls(**{f.name: payload[f.name] for f in dataclasses.fields(cls)
                      if f.name in payload})

    def save(self, path) -> None:
        write_json_atomically(pathlib.Path(path), self.to_dict())

    @classmethod
    def load(cls, path) -> "ContributionTable":
        with open(path) as f:
            return cls.from_dict(json.load(f))


def candidate_layers(model: keras.Model, last: int = 24, pointwise_only: bool = True) -> list:
    """Default weight-update candidates: the 1x1 convs among the ``last`` convs (all of
    those convs if ``pointwise_only`` is False or none is 1x1), in execution order.

        candidate_layers(model)   # MobileNetV2: block_9_project ... head_conv
    """
    convs = conv_layers(model)[-last:]
    pointwise = [c.name for c in convs if is_pointwise(c)]
    return pointwise if (pointwise_only and pointwise) else [c.name for c in convs]


def default_bias_counts(n_convs: int, layer_counts) -> list:
    """k values to measure: those the candidate layers need, plus quarters of the convs.

        default_bias_counts(52, [23, 20])   # [0, 13, 20, 23, 26, 39, 52]
    """
    ks = {0, *layer_counts, *(max(1, round(n_convs * f)) for f in (0.25, 0.5, 0.75, 1.0))}
    return sorted(k for k in ks if 0 <= k <= n_convs)


# ---------------------------------------------------------------------------- analytic
def analytic_contributions(model: keras.Model, layers=None, ratios=RATIOS,
                           bias_counts=None) -> ContributionTable:
    """A proxy table without training: later layers and pointwise expansions gain more.

    ``dAcc_w[i, r] = 0.02 * kind * depth^2 * sqrt(r)`` (depth = position in (0, 1], kind
    1 for a pointwise expansion, 0.6 for other convs and Dense, 0.3 for depthwise) and
    ``dAcc_b[k] = 0.03 * (1 - exp(-4k / n_convs))``: Lin et al.'s qualitative findings, not
    measurements. Use it to plan without data; measure for real decisions.

        table = analytic_contributions(model)
    """
    convs = conv_layers(model)
    names = [c.name for c in convs]
    layers = list(layers) if layers is not None else candidate_layers(model)
    n = len(convs)
    weight_gain = {}
    for name in layers:
        if name not in names:
            raise ValueError(f"layer {name!r} is not a conv of model {model.name!r}")
        layer = convs[names.index(name)]
        depth = (names.index(name) + 1) / n
        weight_gain[name] = {float(r): 0.02 * _kind_factor(layer) * depth ** 2 * math.sqrt(r)
                             for r in ratios}
    if bias_counts is None:
        bias_counts = default_bias_counts(n, [n - names.index(l) for l in layers])
    bias_gain = {int(k): 0.03 * (1 - math.exp(-4 * k / n)) for k in bias_counts}
    return ContributionTable(names, bias_gain, weight_gain, None, "analytic",
                             {"ratios": [float(r) for r in ratios]})


def _kind_factor(layer) -> float:
    if is_depthwise(layer):
        return 0.3
    kernel = kernel_of(layer)
    if is_pointwise(layer) and int(kernel.shape[-1]) > int(kernel.shape[-2]):
        return 1.0
    return 0.6


# ---------------------------------------------------------------------------- measured
@dataclasses.dataclass(frozen=True)
class FineTuneSettings:
    """One short fine-tuning run: ``steps`` SGD steps of ``batch_size`` examples at
    ``learning_rate``, then accuracy on the validation data. Every run trains on the same
    ``steps * batch_size`` examples in the same order (a fixed sample of the training data,
    cycled if needed), so the runs differ only in what they update."""

    steps: int = 60
    batch_size: int = 8
    learning_rate: float = 0.01
    seed: int = 0
    criterion: str = "magnitude+"


def measure_contributions(model: keras.Model, train, validation, layers=None,
                          ratios=RATIOS, bias_counts=None,
                          settings: FineTuneSettings | None = None, cache: bool = True,
                          progress: bool = True, data_key: str | None = None,
                          parallel: bool = True, ray_address: str | None = None,
                          workers: int | None = None) -> ContributionTable:
    """Measure dAcc_b and dAcc_w with short fine-tuning runs (see the module doc).

    ``train`` / ``validation``: ``(x, y)`` arrays, a batched ``tf.data.Dataset`` of
    ``(x, y)`` or a `dgst_tf.data.DatasetSplit`. ``layers``: candidate weight layers
    (default: `candidate_layers`); runs = 1 + len(bias_counts) + len(layers) * len(ratios).
    ``data_key`` names the data in the cache key (default: a hash of the arrays, or of the
    split's files / the first batch of a dataset). The runs are independent: with
    ``parallel`` they run on Ray (`dgst_tf.core.parallel_runs`; a local instance with
    ``workers`` runs at a time, default the usable cores, or the cluster at ``ray_address``),
    and give the same table as ``parallel=False`` (one after another in this process).

        table = measure_contributions(model, (x_train, y_train), (x_val, y_val),
                                      layers=["expand", "head"], ratios=(0.5, 1.0))
    """
    settings = settings or FineTuneSettings()
    folded = fold_batchnorm(model, name=model.name) if foldable_pairs(model) else model
    plan = _RunPlan.of(folded, model.name, layers, ratios, bias_counts)
    key_settings = {"version": CACHE_VERSION, **dataclasses.asdict(settings),
                    "data": data_key or _data_key(train) + "/" + _data_key(validation)}
    cache_path = (runtime.cache_dir("contribution") / f"{_model_key(folded, key_settings)}.json"
                  if cache else None)
    results = _read_cache(cache_path)
    todo = [key for key in plan.runs if key not in results]
    if todo and progress:
        print(f"contribution analysis: {len(todo)} fine-tuning runs of {settings.steps} steps "
              f"({len(plan.runs) - len(todo)} cached)" + (f", cache {cache_path}" if cache else ""))
    if todo:
        runner = dict(parallel=parallel, ray_address=ray_address, workers=workers)
        _run_missing(folded, plan.runs, todo, results, train, validation, settings,
                     progress, cache_path, key_settings, runner)
    baseline = results["bias:0"]
    bias_gain = {k: results[f"bias:{k}"] - baseline for k in plan.bias_counts}
    weight_gain = {name: {r: results[f"weights:{name}:{r!r}"]
                          - results[f"bias:{plan.layer_counts[name]}"] for r in plan.ratios}
                   for name in plan.layers}
    return ContributionTable(plan.names, bias_gain, weight_gain, baseline, "measured",
                             {**key_settings, "cache": str(cache_path) if cache else None})


@dataclasses.dataclass
class _RunPlan:
    """The fine-tuning runs of a measurement: key -> scheme, and what the keys index."""

    names: list          # convs in execution order
    layers: list         # candidate weight layers
    layer_counts: dict   # layer -> bias count that reaches it
    bias_counts: list
    ratios: list
    runs: dict

    @classmethod
    def of(cls, folded, model_name, layers, ratios, bias_counts) -> "_RunPlan":
        names = [c.name for c in conv_layers(folded)]
        layers = list(layers) if layers is not None else candidate_layers(folded)
        missing = [n for n in layers if n not in names]
        if missing:
            raise ValueError(f"layers {missing} are not convs of model {model_name!r}")
        layer_counts = {name: len(names) - names.index(name) for name in layers}
        if bias_counts is None:
            bias_counts = default_bias_counts(len(names), layer_counts.values())
        bias_counts = sorted({0, *(int(k) for k in bias_counts), *layer_counts.values()})
        if bias_counts[-1] > len(names):
            raise ValueError(f"bias count {bias_counts[-1]} > the model's {len(names)} convs")
        ratios = [float(r) for r in ratios]
        if not ratios or any(not 0 < r <= 1 for r in ratios):
            raise ValueError(f"ratios must be in (0, 1], got {ratios}")
        runs = {f"bias:{k}": _bias_scheme(names, k) for k in bias_counts}
        for name in layers:
            for r in ratios:
                runs[f"weights:{name}:{r!r}"] = _bias_scheme(names, layer_counts[name], {name: r})
        return cls(names, layers, layer_counts, bias_counts, ratios, runs)


def _run_missing(folded, runs, todo, results, train, validation, settings, progress,
                 cache_path, key_settings, runner: dict) -> None:
    """Fine-tune the ``todo`` runs into ``results``, caching after every finished run."""
    from tqdm.auto import tqdm

    # every run sees the same batches in the same order: runs differ only in the scheme
    shared = (keras.layers.serialize(folded), folded.get_weights(), _training_sample(train, settings),
              _arrays(validation), settings)
    schemes = [(runs[key],) for key in todo]
    if runner["parallel"]:
        from dgst_tf.core.parallel_runs import run_in_parallel

        finished = run_in_parallel(_fine_tune_copy, schemes, shared=shared,
                                   address=runner["ray_address"], workers=runner["workers"])
    else:
        finished = ((i, _fine_tune_copy(*shared, *scheme)) for i, scheme in enumerate(schemes))
    # tqdm shows the time left, estimated from the runs done so far
    for index, accuracy in tqdm(finished, total=len(todo), desc="contribution runs",
                                unit="run", disable=not progress):
        results[todo[index]] = accuracy
        if cache_path is not None:
            write_json_atomically(cache_path, {"settings": key_settings, "results": results})


def _fine_tune_copy(serialized_model, initial_weights, train, validation, settings, scheme):
    """`_fine_tune` of a model rebuilt from its serialized config (what a Ray worker gets)."""
    model = keras.layers.deserialize(serialized_model)
    return _fine_tune(model, initial_weights, scheme, train, validation, settings)


def _bias_scheme(names, k, weights=None) -> UpdateScheme:
    """Biases of the last ``k`` of ``names`` plus ``weights`` ({layer: ratio})."""
    spec = {n: "bias" for n in names[len(names) - k:]} if k else {}
    spec.update(weights or {})
    return UpdateScheme(spec, name=f"bias_last_{k}" + "".join(
        f"+{n}@{r:g}" for n, r in (weights or {}).items()))


def _fine_tune(folded, initial_weights, scheme, train, validation, settings) -> float:
    """Fine-tune a copy of ``folded`` with ``scheme`` on the ``train`` arrays, in order;
    returns the accuracy on the ``validation`` arrays."""
    from dgst_tf.training.selection import StaticChannelSelection
    from dgst_tf.training.sparse_model import SparseUpdateModel

    runtime.seed_everything(settings.seed)
    clone = keras.models.clone_model(folded)
    clone.set_weights(initial_weights)
    sparse = SparseUpdateModel(clone, scheme, fold_bn=False)
    sparse.compile(optimizer=keras.optimizers.SGD(settings.learning_rate),
                   loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                   metrics=["accuracy"])
    sparse.fit(*train, batch_size=settings.batch_size, epochs=1, shuffle=False, verbose=0,
               callbacks=[StaticChannelSelection(settings.criterion, seed=settings.seed)])
    _, accuracy = sparse.evaluate(*validation, batch_size=64, verbose=0)
    return float(accuracy)


def _arrays(data, limit: int | None = None):
    """``(x, y)`` NumPy arrays from arrays, a batched dataset or a DatasetSplit."""
    if hasattr(data, "dataset"):
        data = data.dataset
    if not isinstance(data, tf.data.Dataset):
        x, y = data
        return np.asarray(x), np.asarray(y)
    xs, ys, count = [], [], 0
    for x, y in data:
        xs.append(np.asarray(x))
        ys.append(np.asarray(y))
        count += len(xs[-1])
        if limit is not None and count >= limit:
            break
    x, y = np.concatenate(xs), np.concatenate(ys)
    return (x, y) if limit is None else (x[:limit], y[:limit])


def _training_sample(train, settings):
    """``steps * batch_size`` training examples in a fixed, seeded order (cycling through
    the data as often as needed)."""
    needed = settings.steps * settings.batch_size
    if isinstance(train, (tuple, list)):
        x, y = _arrays(train)
        rng = np.random.default_rng(settings.seed)
        order = np.concatenate([rng.permutation(len(x))
                                for _ in range(-(-needed // len(x)))])[:needed]
        return x[order], y[order]
    data = train.dataset if hasattr(train, "dataset") else train
    return _arrays(data.repeat(), limit=needed)


def _model_key(model, settings) -> str:
    digest = hashlib.sha256(model.to_json().encode())
    for w in model.get_weights():
        digest.update(np.ascontiguousarray(w).tobytes())
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()[:24]


def _data_key(data) -> str:
    digest = hashlib.sha256()
    if hasattr(data, "file_paths") and data.file_paths is not None:
        digest.update(repr((data.name, data.split, data.subset, data.image_size,
                            data.batch_size, data.file_paths)).encode())
        return digest.hexdigest()[:16]
    if hasattr(data, "dataset"):
        data = data.dataset
    if isinstance(data, tf.data.Dataset):
        digest.update(repr(data.element_spec).encode())
        digest.update(str(int(data.cardinality())).encode())
        for x, y in data.take(1):
            digest.update(np.asarray(x).tobytes())
            digest.update(np.asarray(y).tobytes())
        return digest.hexdigest()[:16]
    for array in data:
        array = np.ascontiguousarray(array)
        digest.update(repr((array.shape, array.dtype.str)).encode())
        digest.update(array.tobytes())
    return digest.hexdigest()[:16]


def _read_cache(path) -> dict:
    if path is None or not path.exists():
        return {}
    try:
        with open(path) as f:
            return dict(json.load(f).get("results", {}))
    except (OSError, ValueError):
        return {}  # a damaged cache is recomputed, never trusted


__all__ = ["ContributionTable", "FineTuneSettings", "RATIOS", "analytic_contributions",
           "candidate_layers", "default_bias_counts", "measure_contributions"]
