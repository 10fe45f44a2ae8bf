"""The device pipeline: prune -> plan -> int8 DGSU training -> TFLM check -> evaluation,
on the device's terms, into one output folder (the job behind ``dgst device``).

0. Before any stage writes anything, a model file (``model="my_cnn.keras"``) is loaded and
   checked (`dgst_tf.models.own_model`: input ``image_size``, every layer supported, a
   classifier with the dataset's classes) and so is the DGSU scheme on it (pointwise convs to
   update, every layer between them and the loss trainable in int8); a refusal names the file
   and the layer or value.
1. ``prune``: the pretrained MobileNetV2 with a new classifier (or the model file in its
   logits form, `dgst_tf.core.classifier.logits_model`: a 1x1-conv classifier written as the
   Dense layer it computes, a softmax dropped, since the device trains on logits), channel-pruned
   (`dgst_tf.jobs.device_prune`, distillation from the unpruned model) until the deployable
   training `.tflite` + the firmware allowance fits ``flash_budget`` (skipped, and recorded
   so, if it fits already). Writes ``pruned.keras``.
2. ``plan``: the deepest DGSU scheme whose step fits ``sram_budget`` analytically and in
   TFLM's arena of the firmware graph (`dgst_tf.jobs.device_plan`); the firmware file must
   still fit flash. Writes ``scheme.json``, ``deploy_train.tflite`` (+ ``.json``) and
   ``memory.png`` (per layer of the step: SRAM in use against the budget, what it holds).
3. ``train``: batch-1 int8 QAS DGSU training of the Keras simulation of that graph
   (`dgst_tf.jobs.device_int8`; <= ``target_fraction`` of conv weights per step). Writes
   ``trained_weights.npz``. Resumes inside the stage: after every epoch the simulation's
   int8 weights, optimizer step and channel-selection state are backed up
   (``train.backup-<digest>/``, Keras' ``BackupAndRestore`` as ``dgst train --backup-dir``),
   so a killed run continues from its last finished epoch. Optional: ``lr_schedule="cosine"``
   (a Keras-side schedule; the exported step has a constant learning rate), ``stream=True``
   (training images streamed from a 10% hold-out split, for CIFAR-10 at full size) with
   ``augment=True`` (pad-crop + flip).
4. ``check``: the training graph (with parameter outputs) starting from the trained
   state runs ``check_steps`` steps in TFLM and in Keras: channels, int8 weights and int32
   biases must be identical; the adapted int8 inference model is written
   (``adapted.tflite``, `write_inference_model`).
5. ``evaluate``: accuracy of ``adapted.tflite`` run by TFLM on the test images, or with
   ``evaluate_on="validation"`` on the validation images (the test set is then never read:
   for choosing settings); its logits must equal the Keras int8 simulation's;
   ``report.json`` and ``report.png`` (memory per stage against the budgets, accuracy per
   epoch, coverage per step and the heat map of the channels DGSU updated).

Each stage records its settings in ``<stage>.stage.json`` (`dgst_tf.jobs.stages`): a second
call with the same config skips finished stages; a stage that cannot meet its budget raises
`StageBudgetError` naming the stage and the numbers. Example::

    from dgst_tf.jobs.device_pipeline import DeviceConfig, run_device_pipeline

    report = run_device_pipeline(DeviceConfig(output_dir="out", image_size=64))
    report["evaluate"]["test_accuracy"], report["plan"]["arena_bytes"]
"""
from __future__ import annotations

import dataclasses
import hashlib
import pathlib
import shutil
import sys
import time

import numpy as np

from dgst_tf import data, models
from dgst_tf.core import runtime
from dgst_tf.core.bn_folding import fold_batchnorm
from dgst_tf.core.classifier import find_classifier, logits_model
from dgst_tf.core.files import write_json_atomically
from dgst_tf.core.graph import UnsupportedModelError
from dgst_tf.core.keras_compat import keras
from dgst_tf.core.training_support import check_gradient_path
from dgst_tf.export.inference import quantize
from dgst_tf.export.tflite_file import read_tflite, tensor_details
from dgst_tf.export.training import (export_training, load_manifest, run_inference_tflm,
                                     write_inference_model)
from dgst_tf.jobs import device_int8, figures
from dgst_tf.jobs.device_plan import (deployable_memory, device_export_options, dgsu_scheme,
                                      export_deployable, plan_dgsu, planned_blocks)
from dgst_tf.jobs.device_prune import prune_to_flash
from dgst_tf.jobs.device_report import plot_report
from dgst_tf.jobs.stages import StageBudgetError, StageFolder, settings_digest
from dgst_tf.models.model_file import save_model_atomically
from dgst_tf.models.own_model import OwnModelError, is_model_file, load_own_model
from dgst_tf.planning.budget import parse_budget
from dgst_tf.training.scheme import UpdateScheme
from dgst_tf.training.update_counts import ChannelUpdateCounter

PRUNE_SRAM_MARGIN = 0.01  # of the SRAM budget, kept free when pruning for min_blocks

__all__ = ["DeviceConfig", "STAGES", "StageBudgetError", "own_model", "run_device_pipeline"]

STAGES = ("prune", "plan", "train", "check", "evaluate")
LR_SCHEDULES = ("constant", "cosine")
SPLITS = ("test", "validation")  # what the evaluate stage scores


@dataclasses.dataclass
class DeviceConfig:
    """Settings of one device pipeline run (offline defaults: Fashion-MNIST, ImageNet
    MobileNetV2-1.0 at 64 px, pruned to 1 MB flash, 256 KB SRAM)."""

    output_dir: str = "device_run"
    dataset: str = "fashion_mnist"
    data_path: str | None = None
    model: str = "mobilenet_v2"  # or a saved tf-keras model file (.keras / .h5)
    width: float = 1.0  # the offline ImageNet weights exist for width 1.0 only
    image_size: int = 64
    weights: str | None = "imagenet"  # None: random initialisation (tests)
    flash_budget: str = "1MB"
    sram_budget: str = "256KB"
    firmware_allowance: int | None = None  # bytes; None: FIRMWARE_ALLOWANCE_BYTES
    # prune
    prune_examples: int = 1000
    prune_epochs: int = 1
    prune_batch_size: int = 32
    prune_learning_rate: float = 0.003
    temperature: float = 4.0
    prune_attempts: int = 3
    # plan
    blocks: int = 8  # the most blocks DGSU trains: the deepest that fits SRAM and flash
    min_blocks: int = 2  # the fewest: pruning goes as far as SRAM needs for these
    target_fraction: float = 0.02
    layers_per_step: int | None = None
    # train
    train_examples: int = 1000
    validation_examples: int = 200
    calibration_examples: int = 64
    epochs: int = 2
    learning_rate: float = 0.001
    lr_schedule: str = "constant"  # "cosine": decay to 0 over the run (Keras only; see doc)
    stream: bool = False  # True: training images streamed from the 10% hold-out split
    augment: bool = False  # pad-crop + flip of the streamed training images
    # check + evaluate
    check_steps: int = 4
    test_examples: int = 500
    evaluate_on: str = "test"  # "validation": choose settings without reading the test set
    seed: int = 0

    def __post_init__(self):
        if self.dataset not in data.DATASETS:
            raise ValueError(f"dataset must be one of {data.DATASETS}, got {self.dataset!r}")
        if not 1 <= int(self.min_blocks) <= int(self.blocks):
            raise ValueError(f"min_blocks must be in 1..blocks ({self.blocks}), got "
                             f"{self.min_blocks!r}")
        for name in ("blocks", "epochs", "check_steps", "train_examples", "test_examples",
                     "calibration_examples", "validation_examples", "image_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if not 0 < self.target_fraction <= 1:
            raise ValueError(f"target_fraction must be in (0, 1], got {self.target_fraction}")
        for name, allowed in (("lr_schedule", LR_SCHEDULES), ("evaluate_on", SPLITS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got "
                                 f"{getattr(self, name)!r}")
        if self.augment and not self.stream:
            raise ValueError("augment needs stream=True (augmentation is part of the "
                             "streamed training pipeline)")
        parse_budget(self.flash_budget), parse_budget(self.sram_budget)

    @property
    def flash_budget_bytes(self) -> int:
        return parse_budget(self.flash_budget)

    @property
    def sram_budget_bytes(self) -> int:
        return parse_budget(self.sram_budget)

    def allowance_bytes(self) -> int:
        if self.firmware_allowance is not None:
            return int(self.firmware_allowance)
        from dgst_tf.jobs.flash_budget import FIRMWARE_ALLOWANCE_BYTES

        return int(FIRMWARE_ALLOWANCE_BYTES)


class _Data:
    """The images of a run, as float arrays preprocessed for the model; the training images
    as a batch-1 stream (`training`); the test images read only when first asked for.

    ``stream=False``: every image in memory, disjoint class-balanced parts of the train
    split (calibration, training, validation, check; pruning uses the training images).
    ``stream=True`` (CIFAR-10 at full size): validation images from a seeded, stratified
    10% hold-out of the train split (as the CIFAR-10 benchmarks), training images streamed
    from the rest (optionally augmented), and calibration, check and pruning images the
    first ones of that rest (so also training images)."""

    def __init__(self, config: DeviceConfig):
        self.config = config
        self.common = dict(path=config.data_path, image_size=(config.image_size,) * 2,
                           seed=config.seed,
                           preprocessing=models.preprocessing_for(config.weights))
        self.classes = data.load(config.dataset, "train", path=config.data_path, limit=1,
                                 image_size=(8, 8)).num_classes
        self._test = None
        (self._load_holdout if config.stream else self._load_carved)()

    def _load_carved(self):
        c = self.config
        sizes = [c.calibration_examples, c.train_examples, c.validation_examples,
                 c.check_steps]
        x, y = data.load_arrays(c.dataset, "train", limit=sum(sizes), **self.common)
        xs, ys = np.split(x, np.cumsum(sizes)[:-1]), np.split(y, np.cumsum(sizes)[:-1])
        self.calibration, (self.x_val, self.y_val) = xs[0], (xs[2], ys[2])
        self.x_train, self.y_train = self.x_prune, self.y_prune = xs[1], ys[1]
        self.x_check, self.y_check = xs[3], ys[3]

    def _load_holdout(self):
        c = self.config
        self.x_val, self.y_val = data.load_arrays(
            c.dataset, "train", limit=c.validation_examples, subset="validation",
            **self.common)
        sizes = [c.calibration_examples, c.check_steps, c.prune_examples]
        x, y = data.load_arrays(c.dataset, "train", limit=sum(sizes), subset="training",
                                **self.common)
        xs, ys = np.split(x, np.cumsum(sizes)[:-1]), np.split(y, np.cumsum(sizes)[:-1])
        self.calibration, (self.x_check, self.y_check) = xs[0], (xs[1], ys[1])
        self.x_prune, self.y_prune = xs[2], ys[2]

    def training(self):
        """(batch-1 training dataset, number of images per epoch)."""
        c = self.config
        if not c.stream:
            return (device_int8.batch1_dataset(self.x_train, self.y_train, c.seed),
                    len(self.x_train))
        split = data.load(c.dataset, "train", batch_size=1, limit=c.train_examples,
                          validation_split=0.1, subset="training", shuffle=True,
                          augment=c.augment, **self.common)
        return split.dataset, split.num_examples

    def evaluation(self):
        """(images, labels) the evaluate stage scores: ``config.evaluate_on``."""
        if self.config.evaluate_on == "validation":
            return self.x_val, self.y_val
        return self.x_test, self.y_test

    def _test_arrays(self):
        if self._test is None:
            self._test = data.load_arrays(self.config.dataset, "test",
                                          limit=self.config.test_examples, **self.common)
        return self._test

    x_test = property(lambda self: self._test_arrays()[0])
    y_test = property(lambda self: self._test_arrays()[1])


def _load_data(config: DeviceConfig) -> _Data:
    return _Data(config)


def _settings(config: DeviceConfig, *fields, after=None) -> dict:
    """The config fields a stage depends on, and the digest of the stage before it."""
    values = {name: getattr(config, name) for name in fields}
    return values | {"after": after}


def _model_file_digest(config: DeviceConfig) -> str | None:
    """SHA-256 of the model file (None for the built-in MobileNetV2): a changed file redoes
    the prune stage and everything after it."""
    if not is_model_file(config.model):
        return None
    return hashlib.sha256(pathlib.Path(config.model).read_bytes()).hexdigest()


def own_model(config: DeviceConfig, classes: int):
    """The model file of ``config`` in its logits form, checked before any output is written:
    `load_own_model` (input ``image_size``, supported layers, ``classes`` outputs), then the
    DGSU scheme of the device (`dgsu_scheme`: pointwise convs to update) and the layers
    between them and the loss (`check_gradient_path`, as `export_training` checks them).
    Raises `OwnModelError` naming the file and the layer or value at fault."""
    where = f"--model {config.model!r}"
    model = logits_model(load_own_model(config.model, config.image_size, classes))
    folded = fold_batchnorm(model)
    try:
        scheme = dgsu_scheme(folded, config.blocks, config.target_fraction, config.seed)
    except ValueError as error:
        raise OwnModelError(f"{where}: no DGSU scheme on it: {error} (DGSU updates the 1x1 "
                            "Conv2D layers of the last blocks, starting at one that widens "
                            "the channels)") from None
    trained = {name for name, update in scheme.layers.items() if update.mode != "frozen"}
    try:
        check_gradient_path(folded, trained | {find_classifier(folded).name}, where)
    except UnsupportedModelError as error:
        raise OwnModelError(str(error)) from None
    return model


_DATA = ("dataset", "data_path", "model", "image_size", "weights", "seed",
         "calibration_examples", "train_examples", "validation_examples", "check_steps",
         "stream")


class _Run:
    """One pipeline run: the config, its folder, data and models built on demand."""

    def __init__(self, config: DeviceConfig, verbose: int):
        self.config, self.verbose = config, verbose
        self.folder = StageFolder(config.output_dir, STAGES)
        self._data = self._folded = self._sim = self._own = None
        self.results = {}
        if is_model_file(config.model):  # checked now: a refusal leaves nothing behind
            self._own = own_model(config, self.data.classes)

    def teacher_model(self):
        """The prune stage's distillation teacher: the pretrained MobileNetV2 with its own
        ImageNet classifier; None (the base model teaches itself) for a model file or random
        weights."""
        c = self.config
        if self._own is not None or c.weights is None:
            return None
        return models.mobilenet_v2(width=c.width, input_shape=(c.image_size, c.image_size, 3),
                                   weights=c.weights, seed=c.seed)

    def base_model(self):
        """The model the prune stage starts from: the checked model file (logits form) or
        the pretrained MobileNetV2 with a new classifier."""
        c = self.config
        if self._own is not None:
            return self._own
        return models.mobilenet_v2(width=c.width, input_shape=(c.image_size, c.image_size, 3),
                                   classes=self.data.classes, weights=c.weights, seed=c.seed)

    @property
    def data(self) -> _Data:
        if self._data is None:
            self._data = _load_data(self.config)
        return self._data

    def say(self, message: str) -> None:
        if self.verbose:
            print(f"[dgst device] {message}", flush=True)

    def stage(self, name: str, settings: dict, body) -> dict:
        """Skip ``name`` if it finished with ``settings``; else run ``body() -> (outputs,
        result)`` and record it."""
        done = self.folder.done(name, settings)
        if done is not None:
            self.say(f"{name}: done before with the same settings, skipped")
            self.results[name] = done
            return done
        self.say(f"{name}: running")
        self.folder.start(name)
        for report in ("report.json", "report.png"):  # describes the stages being redone
            self.folder.path(report).unlink(missing_ok=True)
        start = time.time()
        outputs, result = body()
        result = result | {"seconds": round(time.time() - start, 1)}
        self.results[name] = self.folder.finish(name, settings, outputs, result)
        return self.results[name]

    def after(self, name: str) -> str:
        return settings_digest(self.results[name])

    # -- models -----------------------------------------------------------------------
    def folded(self):
        """The pruned model with BatchNorm folded (what the exporter and the simulation see)."""
        if self._folded is None:
            pruned = keras.models.load_model(self.folder.path("pruned.keras"), compile=False)
            self._folded = fold_batchnorm(pruned)
        return self._folded

    def scheme(self) -> UpdateScheme:
        return UpdateScheme.load(self.folder.path("scheme.json"))

    def new_sim(self, learning_rate=None) -> device_int8.Int8Dgsu:
        """A fresh simulation at ``learning_rate`` (a float or a schedule; None: the
        device's constant ``config.learning_rate``)."""
        c = self.config
        rate = c.learning_rate if learning_rate is None else learning_rate
        return device_int8.Int8Dgsu.build(self.folded(), self.data.calibration, self.scheme(),
                                          learning_rate=rate, seed=c.seed,
                                          layers_per_step=c.layers_per_step)

    def trained_sim(self, fresh: bool = False) -> device_int8.Int8Dgsu:
        """A simulation holding the trained weights from ``trained_weights.npz`` (shared
        between calls unless ``fresh``: a fresh one may train further)."""
        if fresh or self._sim is None:
            sim = self.new_sim()
            device_int8.load_weights(sim.graph.model, self.folder.path("trained_weights.npz"))
            if fresh:
                return sim
            self._sim = sim
        return self._sim

    def export_options(self) -> dict:
        c = self.config
        return device_export_options(c.learning_rate, c.seed, c.layers_per_step)


# -- stages -----------------------------------------------------------------------------
def _prune(run: _Run):
    c = run.config
    model = run.base_model()
    scratch = run.folder.path(".prune_measure.tflite")

    # the memory model is within 0.35% of TFLM's arena; pruning just far enough for the
    # analytic step to fit would leave TFLM's a few hundred bytes over (measured: +240 B)
    sram = int(c.sram_budget_bytes * (1 - PRUNE_SRAM_MARGIN))

    def planned(folded):  # (blocks, scheme) the plan stage will train on it (analytic)
        blocks = planned_blocks(folded, sram_budget=sram, blocks=c.blocks,
                                target_fraction=c.target_fraction, seed=c.seed,
                                layers_per_step=c.layers_per_step)
        return blocks, dgsu_scheme(folded, max(blocks, 1), c.target_fraction, c.seed)

    def deployable_bytes(candidate) -> int:
        folded = fold_batchnorm(candidate)
        try:
            return export_deployable(folded, planned(folded)[1], run.data.calibration, scratch,
                                     **run.export_options()).stat().st_size
        finally:
            scratch.unlink(missing_ok=True)
            scratch.with_suffix(".json").unlink(missing_ok=True)

    n = c.prune_examples
    pruned, record = prune_to_flash(
        model, run.data.x_prune[:n], run.data.y_prune[:n],
        flash_budget=c.flash_budget_bytes, allowance=c.allowance_bytes(),
        deployable_bytes=deployable_bytes, epochs=c.prune_epochs,
        batch_size=c.prune_batch_size, learning_rate=c.prune_learning_rate,
        temperature=c.temperature, attempts=c.prune_attempts, seed=c.seed,
        teacher=run.teacher_model(), min_depth=c.min_blocks,
        deployment=lambda candidate: planned(fold_batchnorm(candidate)),
        size_options=run.export_options())
    save_model_atomically(pruned, run.folder.path("pruned.keras"))
    return ["pruned.keras"], record | {"parameters": int(pruned.count_params())}


def _plan(run: _Run):
    c = run.config
    path = run.folder.path("deploy_train.tflite")
    allowance = c.allowance_bytes()
    plan = plan_dgsu(run.folded(), run.data.calibration, run.data.y_val, path,
                     sram_budget=c.sram_budget_bytes, blocks=c.blocks,
                     target_fraction=c.target_fraction, learning_rate=c.learning_rate,
                     seed=c.seed, layers_per_step=c.layers_per_step,
                     max_file_bytes=c.flash_budget_bytes - allowance,
                     min_blocks=c.min_blocks)
    write_json_atomically(run.folder.path("scheme.json"), plan.scheme.get_config())
    memory = deployable_memory(run.folded(), plan.scheme, c.layers_per_step)
    figures.save_png(figures.memory_bars(memory, c.sram_budget_bytes),
                     run.folder.path("memory.png"))
    return (["scheme.json", "deploy_train.tflite", "deploy_train.json", "memory.png"],
            {"blocks": plan.blocks, "analytic_bytes": plan.analytic_bytes,
             "arena_bytes": plan.arena_bytes, "file_bytes": plan.file_bytes,
             "allowance_bytes": allowance, "flash_budget_bytes": c.flash_budget_bytes,
             "sram_budget_bytes": c.sram_budget_bytes, "tried": plan.tried,
             "layers": sorted(plan.scheme.get_config().get("layers", {}))})


def _train(run: _Run, settings: dict):
    """Train, resuming inside the stage: the simulation's state is backed up after every
    epoch in ``train.backup-<settings digest>`` (removed when the stage finishes)."""
    c, d = run.config, run.data
    dataset, examples = d.training()
    sim = run.new_sim(c.learning_rate if c.lr_schedule == "constant" else
                      keras.optimizers.schedules.CosineDecay(c.learning_rate,
                                                             max(1, examples * c.epochs)))
    backup = run.folder.path(f"train.backup-{settings_digest(settings)}")
    for stale in run.folder.folder.glob("train.backup-*"):  # of other settings
        if stale != backup:
            shutil.rmtree(stale)
    # counts of the channels every step updated (the report's heat map), resumed with the rest
    counter = ChannelUpdateCounter(backup / "channel_updates.json")
    history, steps = sim.fit(dataset, epochs=c.epochs, validation=(d.x_val, d.y_val),
                             verbose=_keras_progress(run.verbose), backup_dir=backup,
                             callbacks=[counter])
    device_int8.save_weights(sim.graph.model, run.folder.path("trained_weights.npz"))
    updated = max(steps["updated_fraction"])
    if updated > c.target_fraction + 1e-9:
        raise StageBudgetError("train", f"a step updated {100 * updated:.3f}% of the conv "
                               f"weights, more than {100 * c.target_fraction:g}%")
    return ["trained_weights.npz"], {
        "val_accuracy_per_epoch": history.get("val_accuracy", []),
        "train_accuracy_per_epoch": history.get("accuracy", []),
        "loss_per_epoch": history.get("loss", []), "steps": steps,
        "max_updated_fraction": updated, "final_coverage": steps["coverage"][-1],
        "train_examples": examples, "lr_schedule": c.lr_schedule, "augment": c.augment,
        "resumed_at_epoch": sim.resumed_at_epoch, "channel_updates": counter.to_dict()}


def _keras_progress(verbose: int) -> int:
    """Keras' progress for the train stage: from ``verbose`` 1 a bar with the epoch's ETA in
    a terminal, a line per epoch in a log file."""
    if not verbose:
        return 0
    return 1 if sys.stdout.isatty() else 2


def _check(run: _Run):
    c, d = run.config, run.data
    start = run.folder.path("check_start.tflite")
    info = export_training(run.folded(), run.scheme(), d.calibration, start,
                           output_params=True, **run.export_options())
    sim = run.trained_sim(fresh=True)
    params = device_int8.tflite_params(sim.graph.model, info.manifest)
    write_inference_model(info.path, params, run.folder.path("adapted.tflite"))
    trained = device_int8.with_initial_params(info.path, params,
                                              run.folder.path("check_trained.tflite"))
    comparison = device_int8.compare_steps(sim, trained, d.x_check, d.y_check)
    device_int8.load_weights(sim.graph.model, run.folder.path("trained_weights.npz"))
    run._sim = sim  # the trained state again, for evaluate (forward only)
    if comparison["channel_mismatches"] or comparison["param_mismatches"]:
        raise StageBudgetError("check", f"TFLM and the Keras int8 simulation differ after "
                               f"{comparison['steps']} steps from the trained state: channels "
                               f"{comparison['channel_mismatches'][:5]}, differing elements "
                               f"{comparison['param_mismatches']}")
    outputs = ["adapted.tflite", "check_start.tflite", "check_start.json",
               "check_trained.tflite", "check_trained.json"]
    return outputs, comparison | {"adapted_bytes":
                                  run.folder.path("adapted.tflite").stat().st_size}


# Images per TFLM call of the evaluate stage: quantizing all 10,000 CIFAR-10 test images at
# 128 px at once took ~6 GB of float temporaries; a multiple of the simulation's batch of 32.
EVALUATE_CHUNK = 2048


def _evaluate(run: _Run):
    split = run.config.evaluate_on
    x, y = run.data.evaluation()
    path = run.folder.path("adapted.tflite")
    _, parsed = read_tflite(path)
    image = tensor_details(parsed, int(parsed.subgraphs[0].inputs[0]))
    manifest = load_manifest(run.folder.path("check_start.tflite"))
    sim = run.trained_sim()
    tflm, keras_codes = [], []
    for start in range(0, len(x), EVALUATE_CHUNK):
        part = x[start:start + EVALUATE_CHUNK]
        codes = quantize(part, image)
        tflm.append(run_inference_tflm(path, codes[:, None]).outputs[0].reshape(len(part), -1))
        keras_codes.append(sim.int8_logits(part, manifest))
    tflm, keras_codes = np.concatenate(tflm), np.concatenate(keras_codes)
    differing = int((tflm != keras_codes).any(axis=1).sum())
    predictions = tflm.argmax(axis=1)
    same = int((predictions == keras_codes.argmax(axis=1)).sum())
    if differing:
        raise StageBudgetError("evaluate", f"the adapted model's TFLM logits differ from the "
                               f"Keras int8 simulation's on {differing} of {len(x)} "
                               f"{split} images ({same} equal predictions)")
    accuracy = float((predictions == y).mean())
    return [], {f"{split}_accuracy": accuracy, f"{split}_examples": len(x),
                "evaluated_on": split, "accuracy": accuracy, "runtime": "TFLM (host)",
                "predictions_equal_keras": same, "logits_equal_keras": len(x)}


def _write_report(run: _Run) -> dict:
    report = {"config": dataclasses.asdict(run.config), **run.results}
    write_json_atomically(run.folder.path("report.json"), report)
    plot_report(report, run.folder.path("report.png"))
    return report


def run_device_pipeline(config: DeviceConfig, verbose: int = 1) -> dict:
    """Run (or resume) every stage into ``config.output_dir``; the report as a dict (also
    written to ``report.json``). Raises `StageBudgetError` if a budget cannot be met."""
    runtime.seed_everything(config.seed)
    run = _Run(config, verbose)
    c = config
    # not the learning rate: one constant of the measured file, it does not change its size
    prune = _settings(c, *_DATA, "width", "flash_budget", "firmware_allowance", "sram_budget",
                      "prune_examples", "prune_epochs", "prune_batch_size",
                      "prune_learning_rate", "temperature", "prune_attempts", "blocks",
                      "min_blocks",
                      "target_fraction", "layers_per_step")
    # "teacher": prune folders from before the teacher kept its ImageNet classifier are redone
    # "sized for": prune folders sized for the deepest allowed scheme instead are redone
    prune |= {"model_sha256": _model_file_digest(c), "teacher": "pretrained classifier",
              "sized_for": f"planned scheme, SRAM margin {PRUNE_SRAM_MARGIN}"}
    run.stage("prune", prune, lambda: _prune(run))
    run.stage("plan", _settings(c, "sram_budget", "blocks", "min_blocks", "target_fraction",
                                "learning_rate", "layers_per_step", after=run.after("prune")),
              lambda: _plan(run))
    train = _settings(c, "epochs", "lr_schedule", "augment", after=run.after("plan"))
    run.stage("train", train, lambda: _train(run, train))
    run.stage("check", _settings(c, after=run.after("train")), lambda: _check(run))
    run.stage("evaluate", _settings(c, "evaluate_on", "test_examples",
                                    after=run.after("check")),
              lambda: _evaluate(run))
    return _write_report(run)
