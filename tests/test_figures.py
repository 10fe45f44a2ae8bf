"""The pictures (`dgst_tf.jobs.figures`) plot the numbers of real tiny runs: the channel
counts `ChannelUpdateCounter` recorded, the memory report's per-layer entries, the accuracy
histories; and `dgst train`, `dgst plan` and the device report write them."""
import argparse
import json

import numpy as np
import pytest
from small_models import batch, residual_cnn
from test_sparse_update import _StopAfterEpoch

from dgst_tf import cli
from dgst_tf.core.keras_compat import keras
from dgst_tf.core.layer_kinds import weights_per_channel
from dgst_tf.jobs import figures
from dgst_tf.jobs.device_report import plot_report
from dgst_tf.planning.memory import training_memory
from dgst_tf.tflm_ops.reference import layer_active
from dgst_tf.training.scheme import UpdateScheme
from dgst_tf.training.selection import DynamicChannelSelection, StaticChannelSelection
from dgst_tf.training.sparse_model import SparseUpdateModel
from dgst_tf.training.update_counts import ChannelUpdateCounter

# kept channels divide each layer's input channels: expand 2 of 8, project 3 of 12, head 2 of 8
SCHEME = {"expand": 0.25, "project": 0.25, "head": 0.25}
STEPS = 23
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _fit(selection, epochs=1, steps=STEPS, validation=False):
    sparse = SparseUpdateModel(residual_cnn(), UpdateScheme(SCHEME))
    sparse.compile(optimizer=keras.optimizers.SGD(0.01),
                   loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                   metrics=["accuracy"])
    counter = ChannelUpdateCounter()
    x, y = batch(steps, seed=2)
    history = sparse.fit(x, y, batch_size=1, epochs=epochs, verbose=0, shuffle=False,
                         callbacks=[selection, counter],
                         validation_data=batch(8, seed=3) if validation else None)
    return sparse, counter, history


@pytest.fixture(scope="module")
def dgsu_run():
    """DGSU with one layer's weights per step: the layers take turns."""
    return _fit(DynamicChannelSelection("weight_l2", traversal=True, layers_per_step=1))


def _active_steps(layer_index, layers, steps):
    return sum(bool(layer_active(s, layer_index, layers, 1)) for s in range(steps))


def test_counter_counts_every_channel_update_of_the_layer_schedule(dgsu_run):
    """Per layer: (number of steps the schedule made it active) x kept channels updates,
    spread by the traversal so that no channel is ahead of another by more than one sweep;
    a channel was counted iff the model marked it visited; the coverage the counts imply is
    the one the model logged last."""
    sparse, counter, _ = dgsu_run
    names = list(sparse.selection.specs)
    assert list(counter.counts) == names and counter.steps == STEPS
    total = 0
    for i, name in enumerate(names):
        channels, kept = sparse.selection.specs[name]
        counts = counter.counts[name]
        updates = _active_steps(i, len(names), STEPS) * kept
        assert counts.sum() == updates, name
        assert counts.max() - counts.min() <= 1, (name, counts)  # traversal: sweeps
        np.testing.assert_array_equal(counts > 0, sparse.selection.numpy(name)["visited"])
        total += updates
    assert counter.updates == total
    per = {l.name: weights_per_channel(l) for l in sparse.weight_layers}
    visited = sum(int((counter.counts[n] > 0).sum()) * per[n] for n in names)
    all_weights = sum(sparse.selection.specs[n][0] * per[n] for n in names)
    assert counter.coverage[-1] == pytest.approx(visited / all_weights)
    assert len(counter.coverage) == STEPS


def test_counter_sees_a_static_selection_update_the_same_channels_every_step():
    sparse, counter, _ = _fit(StaticChannelSelection("magnitude+"), steps=6)
    for name, counts in counter.counts.items():
        kept = sparse.selection.numpy(name)["indices"]
        assert set(np.flatnonzero(counts)) == set(kept.tolist()), name
        assert (counts[kept] == 6).all(), name


def test_counter_resumed_from_its_file_equals_an_uninterrupted_count(tmp_path):
    """With ``path``, a fit killed after two epochs and resumed by BackupAndRestore counts
    exactly what one uninterrupted fit counts (the dgst device train stage's resume)."""
    x, y = batch(5, seed=4)

    def fit(counter, extra=()):
        sparse = SparseUpdateModel(residual_cnn(), UpdateScheme(SCHEME))
        sparse.compile(optimizer=keras.optimizers.SGD(0.01),
                       loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        sparse.fit(x, y, batch_size=1, epochs=3, verbose=0, shuffle=False, callbacks=[
            DynamicChannelSelection("weight_l2", traversal=True, layers_per_step=1), counter,
            *extra])

    straight = ChannelUpdateCounter()
    fit(straight)
    path = tmp_path / "backup" / "channel_updates.json"
    with pytest.raises(KeyboardInterrupt):
        fit(ChannelUpdateCounter(path), [
            keras.callbacks.BackupAndRestore(str(tmp_path / "backup")), _StopAfterEpoch(2)])
    assert len(json.loads(path.read_text())["epochs"]) == 2
    resumed = ChannelUpdateCounter(path)
    fit(resumed, [keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))])
    assert resumed.to_dict() == straight.to_dict()
    assert straight.steps == 15 and len(straight.coverage) == 15
    # a file with fewer epochs than the restored state is refused, not silently short
    path.write_text(json.dumps({"epochs": json.loads(path.read_text())["epochs"][:1]}))
    stale = ChannelUpdateCounter(path)
    stale.counts = {name: np.zeros(1, np.int64) for name in straight.counts}
    with pytest.raises(ValueError, match="counts of 1 epochs, but the fit resumes after "
                                         "epoch 2"):
        stale.on_epoch_begin(2)


def test_counter_needs_a_sparse_update_model():
    model = residual_cnn()
    model.compile(optimizer="sgd", loss="mse")
    x, y = batch(2)
    with pytest.raises(TypeError, match="needs a dgst_tf.SparseUpdateModel, got Functional"):
        model.fit(x, keras.utils.to_categorical(y, 4), verbose=0,
                  callbacks=[ChannelUpdateCounter()])


def test_heatmap_shows_the_counts_and_the_coverage(dgsu_run, tmp_path):
    _, counter, _ = dgsu_run
    fig = figures.selection_heatmap(counter.counts, counter.coverage)
    heat = fig.axes[0]
    coverage = next(ax for ax in fig.axes if ax.get_title() == "channel coverage")
    shown = heat.images[0].get_array()
    for row, (name, counts) in enumerate(counter.counts.items()):
        np.testing.assert_array_equal(shown[row, :len(counts)], counts, name)
        assert shown.mask[row, len(counts):].all(), name  # no channels there
    assert shown.sum() == counter.updates
    assert [t.get_text() for t in heat.get_yticklabels()] == list(counter.counts)
    np.testing.assert_allclose(coverage.lines[0].get_ydata(),
                               100 * np.array(counter.coverage))
    path = figures.save_png(fig, tmp_path / "sub" / "selection.png")
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with pytest.raises(ValueError, match="no weight-updated layer"):
        figures.selection_heatmap({})


def test_memory_bars_are_the_reports_entries():
    model = residual_cnn()
    report = training_memory(model, UpdateScheme(SCHEME), policy="traversal")
    fig = figures.memory_bars(report, budget_bytes=report.arena_bytes + 100)
    live, held = fig.axes
    bars = {c.get_label(): [p.get_height() for p in c.patches] for c in held.containers}
    assert len(bars) == len(figures.MEMORY_PARTS)
    for attr, label, _ in figures.MEMORY_PARTS:
        np.testing.assert_allclose(bars[label], [getattr(r, attr) / 1024 for r in report.layers],
                                   err_msg=attr)
    assert sum(sum(b) for b in bars.values()) > 0
    forward, backward, budget, arena, peak = live.lines
    np.testing.assert_allclose(forward.get_ydata(),
                               [r.forward_live_bytes / 1024 for r in report.layers])
    assert np.nanmax(backward.get_ydata()) == max(r.backward_live_bytes
                                                  for r in report.layers) / 1024
    assert budget.get_ydata()[0] == (report.arena_bytes + 100) / 1024
    assert arena.get_ydata()[0] == report.arena_bytes / 1024
    assert peak.get_ydata()[0] == report.training_peak_bytes / 1024
    assert " fits the budget" in live.get_title()
    tight = figures.memory_bars(report, report.training_peak_bytes - 1, "training_peak")
    assert "does NOT fit" in tight.axes[0].get_title()
    assert [line.get_ydata()[0] for line in tight.axes[0].lines[2:]] == [
        (report.training_peak_bytes - 1) / 1024, report.training_peak_bytes / 1024]
    with pytest.raises(ValueError, match="accounting must be one of"):
        figures.memory_bars(report, 1000, "flash")


def test_accuracy_curves_plot_every_methods_history():
    histories = {}
    for name, selection in (("dgsu", DynamicChannelSelection(traversal=True)),
                            ("static", StaticChannelSelection())):
        histories[name] = _fit(selection, epochs=2, steps=8, validation=True)[2].history
    fig = figures.accuracy_curves(histories, {"dgsu": 0.5})
    lines = {line.get_label(): line for line in fig.axes[0].lines if
             not line.get_label().startswith("_")}
    for name, history in histories.items():
        for key, what in (("accuracy", "training"), ("val_accuracy", "validation")):
            line = lines[f"{name} ({what})"]
            np.testing.assert_allclose(line.get_ydata(), 100 * np.array(history[key]))
            np.testing.assert_array_equal(line.get_xdata(), [1, 2])
    with pytest.raises(ValueError, match="no 'accuracy'"):
        figures.accuracy_curves({"x": {"loss": [1.0]}})


def test_device_report_draws_the_heatmap_when_the_train_stage_counted(dgsu_run, tmp_path):
    _, counter, history = dgsu_run
    report = {"prune": {"unpruned_deployable_bytes": 3_000_000},
              "plan": {"flash_budget_bytes": 1 << 20, "sram_budget_bytes": 256 << 10,
                       "allowance_bytes": 160 << 10, "file_bytes": 700_000,
                       "analytic_bytes": 200_000, "arena_bytes": 201_000},
              "train": {"val_accuracy_per_epoch": history.history["accuracy"],
                        "train_accuracy_per_epoch": history.history["accuracy"],
                        "steps": {"coverage": counter.coverage}},
              "evaluate": {"accuracy": 0.5, "evaluated_on": "test"}}
    assert len(plot_report(report, tmp_path / "three.png").axes) == 3
    report["train"]["channel_updates"] = json.loads(json.dumps(counter.to_dict()))
    fig = plot_report(report, tmp_path / "four.png")
    assert fig.axes[3].images[0].get_array().sum() == counter.updates
    np.testing.assert_allclose(fig.axes[2].lines[0].get_ydata(),
                               100 * np.array(counter.coverage))
    memory = [p.get_height() for p in fig.axes[0].patches]
    assert memory[3] == 201_000 / 1024
    for name in ("three.png", "four.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_SIGNATURE


def test_dgst_train_writes_the_heatmap_and_accuracy_beside_result(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["train", "--dataset", "fashion_mnist", "--weights", "none", "--width",
                     "0.35", "--image-size", "32", "--train-examples", "12",
                     "--test-examples", "8", "--epochs", "2", "--verbose", "0",
                     "--output-dir", str(out)]) == 0
    assert "selection.png, accuracy.png" in capsys.readouterr().out
    selection = json.loads((out / "selection.json").read_text())
    result = json.loads((out / "result.json").read_text())
    steps = 2 * 12
    assert selection["counted_steps"] == steps == len(selection["coverage_per_step"])
    for name, layer in selection["layers"].items():  # dgsu: every layer, every step
        assert sum(layer["updates"]) == steps * len(layer["kept"]), name
    assert selection["coverage_per_step"][-1] == pytest.approx(result["coverage"])
    assert len(result["history"]["accuracy"]) == 2
    for name in figures.TRAIN_FIGURES.values():
        assert (out / name).read_bytes()[:8] == PNG_SIGNATURE
    del result["history"]  # a folder of an older dgst train
    (out / "result.json").write_text(json.dumps(result))
    with pytest.raises(ValueError, match="no 'history'"):
        figures.write_train_figures(out)


def test_dgst_plan_writes_the_memory_bars_beside_the_scheme(tmp_path, capsys):
    from dgst_tf.cli.plan import add_plan_parser, memory_bars_path

    parser = argparse.ArgumentParser(prog="dgst")
    add_plan_parser(parser.add_subparsers(dest="command", required=True))
    scheme = tmp_path / "plan" / "scheme.json"
    scheme.parent.mkdir()
    args = parser.parse_args(["plan", "--width", "0.35", "--image-size", "32",
                              "--evaluations", "8", "--budget", "160KB",
                              "--output", str(scheme)])
    assert args.func(args) == 0
    png = memory_bars_path(scheme)
    assert png == tmp_path / "plan" / "scheme_memory.png"
    assert f"wrote     {png}" in capsys.readouterr().out
    assert png.read_bytes()[:8] == PNG_SIGNATURE
