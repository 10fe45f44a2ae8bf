"""The main job: adapt a pretrained model to a new dataset the way the MCU would.

Batch size 1, plain SGD, only what the training method updates (`dgst_tf.training.methods`: by
default DGSU at 2% of conv weights per step), then held-out accuracy, the fraction of conv
weights updated per step, their coverage, the SRAM the trained parameters take as int8,
and the analytic int8 memory of one training step (`dgst_tf.planning.memory`; with ``budget`` the
run stops before the first step if the step would not fit). With ``output_dir`` it writes
the adapted model, its scheme and channel selection next to ``result.json``
(`dgst_tf.jobs.train_outputs`), ready for `dgst export --from-train`.

    from dgst_tf.jobs.adapt import AdaptConfig, run
    result = run(AdaptConfig(dataset="fashion_mnist", train_examples=500, epochs=1))
    print(result["test_accuracy"])
"""
import dataclasses
import pathlib
import time

from dgst_tf import data, models
from dgst_tf.core import runtime
from dgst_tf.core.files import write_json_atomically  # noqa: F401  (its old import path)
from dgst_tf.core.keras_compat import keras
from dgst_tf.core.layer_kinds import kernel_of
from dgst_tf.jobs.train_outputs import save_train_outputs, selection_mode
from dgst_tf.models.own_model import is_model_file, load_own_model
from dgst_tf.planning.budget import MemoryBudget
from dgst_tf.planning.memory import training_memory
from dgst_tf.training.methods import METHODS, build_method
from dgst_tf.training.scheme import UpdateScheme
from dgst_tf.training.selection import DynamicChannelSelection, StaticChannelSelection
from dgst_tf.training.sparse_model import SparseUpdateModel
from dgst_tf.training.update_counts import ChannelUpdateCounter

DATASETS = data.DATASETS


@dataclasses.dataclass
class AdaptConfig:
    """Settings of one adaptation run (all have offline defaults)."""

    dataset: str = "fashion_mnist"
    data_path: str | None = None  # cifar10: folder or archive; folder: an image-folder tree
    model: str = "mobilenet_v2"  # or a saved tf-keras model file (dgst_tf.models.own_model)
    width: float = 1.0
    image_size: int = 96
    weights: str = "imagenet"
    method: str = "dgsu"
    target_fraction: float = 0.02
    scheme_path: str | None = None  # an UpdateScheme JSON (e.g. from `dgst plan`)
    selection: str = "dynamic"  # channel choice for scheme_path: "dynamic" or "static"
    layers_per_step: int | None = None  # dynamic: update this many layers' weights per step
    train_examples: int | None = 2000
    test_examples: int | None = 1000
    epochs: int = 2
    batch_size: int = 1
    learning_rate: float = 0.001  # batch-1 SGD on backbone layers diverges at 0.01
    activation_pattern: str | None = None  # e.g. "stride2": store a pattern of the inputs
    budget: str | None = None  # e.g. "256KB": refuse to train a step that needs more SRAM
    seed: int = 0
    output_dir: str | None = None
    backup_dir: str | None = None  # save after every epoch; a rerun resumes from the last one

    def __post_init__(self):
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        if self.dataset == "folder" and not self.data_path:
            raise ValueError("dataset='folder' needs data_path (an image-folder tree)")
        if self.selection not in ("dynamic", "static"):
            raise ValueError(f"selection must be 'dynamic' or 'static', got {self.selection!r}")
        if self.layers_per_step is not None and (self.selection == "static" and self.scheme_path
                                                 or not self.scheme_path
                                                 and self.method != "dgsu"):
            raise ValueError("layers_per_step is the layer schedule of dynamic selection: use "
                             "method='dgsu' or a scheme_path with selection='dynamic'")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.batch_size < 1 or self.epochs < 1:
            raise ValueError(f"batch_size and epochs must be >= 1, got {self.batch_size}, "
                             f"{self.epochs}")


def load_splits(config: AdaptConfig):
    """(train, test) `data.DatasetSplit`s for the config, preprocessed for the model."""
    common = dict(
        path=config.data_path,
        image_size=(config.image_size, config.image_size),
        batch_size=config.batch_size,
        preprocessing=models.preprocessing_for(config.weights),
        seed=config.seed,
    )
    train = data.load(config.dataset, "train", limit=config.train_examples, augment=False,
                      shuffle=True, **common)
    test = data.load(config.dataset, "test", limit=config.test_examples, shuffle=False,
                     **common)
    return train, test


def build_model(config: AdaptConfig, num_classes: int):
    """(SparseUpdateModel, callbacks): the pretrained backbone with a new classifier, or the
    model file ``config.model`` (checked: input size, layers, ``num_classes`` outputs)."""
    if is_model_file(config.model):
        model = load_own_model(config.model, config.image_size, num_classes)
    else:
        model = models.mobilenet_v2(
            width=config.width,
            input_shape=(config.image_size, config.image_size, 3),
            classes=num_classes,
            weights=config.weights,
            seed=config.seed,
        )
    if config.scheme_path:
        scheme = UpdateScheme.load(config.scheme_path)
        callbacks = [DynamicChannelSelection(layers_per_step=config.layers_per_step,
                                             seed=config.seed)
                     if config.selection == "dynamic"
                     else StaticChannelSelection("magnitude+", seed=config.seed)]
    else:
        scheme, callbacks = build_method(config.method, model, config.target_fraction,
                                         seed=config.seed,
                                         layers_per_step=config.layers_per_step)
    sparse = SparseUpdateModel(model, scheme, activation_patterns=config.activation_pattern)
    if config.budget:  # checked before the first step, with the breakdown in the error
        callbacks = [MemoryBudget(config.budget, full_weights_in_sram=_dynamic(callbacks)),
                     *callbacks]
    return sparse, callbacks


def _dynamic(callbacks) -> bool:
    """Channels change every step: the whole kernel of an updated layer sits in SRAM."""
    return selection_mode(callbacks) == "dynamic"


def training_memory_summary(sparse: SparseUpdateModel, callbacks, image_size: int) -> dict:
    """The analytic int8 memory of one training step at batch 1 (`dgst_tf.planning.memory`)."""
    report = training_memory(sparse.base, sparse.scheme, (image_size, image_size, 3),
                             full_weights_in_sram=_dynamic(callbacks),
                             activation_patterns=sparse.activation_patterns or None)
    return {"whole_kernels_in_sram": _dynamic(callbacks),
            "training_peak_bytes": report.training_peak_bytes,
            "extra_memory_bytes": report.extra_memory_bytes,
            "inference_peak_bytes": report.forward_peak_bytes,
            "dense_training_bytes": report.dense_training_bytes}


def trained_parameter_sram(sparse: SparseUpdateModel) -> dict:
    """Bytes the updated parameters take in SRAM on the MCU (int8 weights, int32 biases).

    Only the selected channels of a weight-updated layer count; the rest stays in flash.
    """
    weights = biases = 0
    for layer in sparse.weight_layers:
        channels, kept = sparse.selection.specs[layer.name]
        weights += int(kernel_of(layer).shape.num_elements()) * kept // channels
    for var in sparse._trained:
        if len(var.shape) == 1:
            biases += int(var.shape.num_elements())
    classifier = sparse._classifier.kernel
    weights += int(classifier.shape.num_elements())
    return {"trainable_parameters": weights + biases, "sram_bytes": weights + 4 * biases}


def _fit(model, callbacks, train, config: AdaptConfig, verbose: int):
    """Compile with the on-device optimizer and fit; (history, seconds)."""
    model.compile(
        optimizer=keras.optimizers.SGD(config.learning_rate),  # the on-device optimizer
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    if config.backup_dir:  # weights, optimizer step and selection state, after every epoch
        callbacks = [*callbacks, keras.callbacks.BackupAndRestore(config.backup_dir)]
    start = time.time()
    history = model.fit(train.dataset, epochs=config.epochs, verbose=verbose,
                        callbacks=callbacks)
    return history, time.time() - start


def run(config: AdaptConfig, verbose: int = 1) -> dict:
    """Fine-tune, evaluate and (if ``config.output_dir``) write ``result.json`` with the
    adapted model, scheme and selection state beside it (`save_train_outputs`)."""
    runtime.seed_everything(config.seed)
    train, test = load_splits(config)
    model, callbacks = build_model(config, len(train.class_names))
    # selection.json's per-channel counts, resumed with the run from its backup
    counts = pathlib.Path(config.backup_dir, "channel_updates.json") if config.backup_dir else None
    callbacks = [*callbacks, ChannelUpdateCounter(counts)]
    history, train_seconds = _fit(model, callbacks, train, config, verbose)
    _, test_accuracy = model.evaluate(test.dataset, verbose=0)
    result = {
        "config": dataclasses.asdict(config),
        "train_examples": train.num_examples,
        "test_examples": test.num_examples,
        "final_train_loss": float(history.history["loss"][-1]),
        "updated_fraction": float(history.history["updated_fraction"][-1]),
        "coverage": float(history.history["coverage"][-1]),
        "test_accuracy": float(test_accuracy),
        "history": {key: [float(v) for v in values]  # per epoch
                    for key, values in history.history.items()},
        "train_seconds": round(train_seconds, 1),
        **trained_parameter_sram(model),
        "memory": training_memory_summary(model, callbacks, config.image_size),
    }
    if config.output_dir:
        save_train_outputs(config.output_dir, model, callbacks, result)
    return result
