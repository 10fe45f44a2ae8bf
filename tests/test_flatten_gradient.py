"""Plain sequential CNNs trained through Flatten / Reshape: the gradient of a RESHAPE's output
is a builtin RESHAPE of it back to the input's shape (`dgst_tf.export.training.backward`),
run in place by the offline memory plan.

Tiny nets (16x16x3, three 3x3 Conv2D with ReLU, then a Flatten or Reshape, Dense(16, ReLU),
Dense(5)) with the last two convs weight-updated at a ratio and the first bias-updated, so
the gradient crosses the RESHAPE into three convs:

- ``flatten``: Flatten of a 4x4 map (a RESHAPE to [1, 96] before the FULLY_CONNECTED);
- ``one_pixel``: Flatten of a 1x1 map, which the converter drops: the FULLY_CONNECTED reads
  the 4-D [1, 1, 1, C] map and its input gradient has that shape;
- ``rows``: Reshape((H * W, C)) then Flatten, merged by the converter into one RESHAPE;
- ``regrid``: a channel-preserving Reshape((2, 8, C)) with a conv after it, then Flatten:
  two RESHAPEs on the gradient path, one between two trained convs.

Oracles: TFLM's steps of the exported graph equal the Keras int8 simulation bit for bit
(logits codes, kept channels, int8 weights, int32 biases, loss); the float sparse step's
update equals tf.GradientTape's gradient; TFLM's arena is the memory model's, op for op and
planned byte for byte. A Dense applied per position after a Reshape((H * W, C)) is refused
by name.
"""
import numpy as np
import pytest

from small_models import int8_steps_equal_tflm

from dgst_tf.core.graph import UnsupportedModelError
from dgst_tf.core.int8_conversion import ConvertedModel
from dgst_tf.core.keras_compat import keras, tf
from dgst_tf.core.layer_kinds import input_channels, kernel_of
from dgst_tf.core.training_support import SUPPORT, check_gradient_path
from dgst_tf.export.tflite_editor import ModelEditor
from dgst_tf.export.tflite_file import read_tflite
from dgst_tf.export.training import TrainingExportError, export_training, train_tflm
from dgst_tf.export.training.offline_plan import in_place_aliases, tensor_lifetimes
from dgst_tf.planning import tflm_runtime
from dgst_tf.planning.memory import MemoryModel
from dgst_tf.training.int8_graph import int8_training_graph
from dgst_tf.training.scheme import UpdateScheme
from dgst_tf.training.sparse_model import SparseUpdateModel

SHAPE, CLASSES = (16, 16, 3), 5
SPEC = {"c1": "bias", "c2": 0.5, "c3": 0.5}
LOGITS_LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
STEPS, LR = 6, 0.05


def flat_cnn(head: str = "flatten", seed: int = 0) -> keras.Model:
    """Three 3x3 convs (ReLU), the ``head`` (module doc), Dense(16, ReLU), Dense(5)."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input(SHAPE, name="image")
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="c1")(inp)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="c2")(x)
    x = keras.layers.Conv2D(6, 3, strides=2, padding="same", activation="relu", name="c3")(x)
    if head == "one_pixel":  # 4x4 -> 1x1
        x = keras.layers.Conv2D(12, 4, padding="valid", activation="relu", name="c4")(x)
    elif head == "rows":
        x = keras.layers.Reshape((16, 6), name="rows")(x)
    elif head == "regrid":
        x = keras.layers.Reshape((2, 8, 6), name="regrid")(x)
        x = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="c4")(x)
    elif head == "dense_rows":  # a Dense per position: refused on the gradient path
        x = keras.layers.Reshape((16, 6), name="rows")(x)
        x = keras.layers.Dense(4, activation="relu", name="fc_rows")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(16, activation="relu", name="fc1")(x)
    model = keras.Model(inp, keras.layers.Dense(CLASSES, name="fc2")(x), name=f"{head}_cnn")
    rng = np.random.default_rng(seed)  # biases as after training (the converter drops the
    for layer in model.layers:  # all-zero bias of a FULLY_CONNECTED)
        if getattr(layer, "bias", None) is not None:
            layer.bias.assign(rng.normal(0, 0.05, layer.bias.shape).astype(np.float32))
    return model


def images(n: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    return (rng.uniform(-1, 1, (n, *SHAPE)).astype(np.float32),
            rng.integers(0, CLASSES, n).astype(np.int32))


HEADS = ["flatten", "one_pixel", "rows", "regrid"]
# the converter's RESHAPEs of each head: (input shape, output shape)
RESHAPES = {"flatten": [((1, 4, 4, 6), (1, 96))], "one_pixel": [],
            "rows": [((1, 4, 4, 6), (1, 96))],
            "regrid": [((1, 4, 4, 6), (1, 2, 8, 6)), ((1, 2, 8, 6), (1, 96))]}
_EXPORTS = {}


def exported(head: str, folder):
    """The head's net, its scheme, the export (on-device DGSU traversal, stochastic
    rounding) and `STEPS` TFLM steps of it, made once per head."""
    if head not in _EXPORTS:
        model = flat_cnn(head)
        x, y = images(STEPS + 16, seed=3)
        calibration, x, y = x[STEPS:], x[:STEPS], y[:STEPS]
        scheme = UpdateScheme(SPEC)
        info = export_training(model, scheme, calibration, folder / f"{head}.tflite",
                               learning_rate=LR, policy="traversal", rounding="stochastic")
        _EXPORTS[head] = (model, scheme, calibration, x, y, info, train_tflm(info.path, x, y))
    return _EXPORTS[head]


def _backward_reshapes(path) -> list:
    """(input shape, output shape) of the exported float32 RESHAPEs that are no copies."""
    editor = ModelEditor(read_tflite(path)[1])
    found = []
    for op in editor.subgraph.operators:
        if editor.builtin(op) != "RESHAPE":
            continue
        source, target = int(op.inputs[0]), int(op.outputs[0])
        if editor.name(target).endswith("/grad"):
            assert editor.tensor(target).type == editor.tensor(source).type == 0  # float32
            found.append((tuple(editor.shape(source)), tuple(editor.shape(target))))
    return found


# ------------------------------------------------------------------ (a) TFLM = simulation
@pytest.mark.parametrize("head", HEADS)
def test_tflm_steps_through_the_reshape_equal_the_keras_int8_simulation(head, tmp_path):
    """`STEPS` steps of DGSU traversal on the device and in Keras: the same logits codes,
    kept channels, int8 weights and int32 biases at every step, the loss to float32; the
    export has one backward RESHAPE per forward one, back to its input's shape."""
    model, scheme, calibration, x, y, info, run = exported(head, tmp_path)
    converted = ConvertedModel(int8_training_graph(model, calibration).tflite_model)
    forward = [(tuple(converted.tensor(op.inputs[0]).shape),
                tuple(converted.tensor(op.outputs[0]).shape))
               for op in converted.ops if op.kind == "RESHAPE"]
    assert forward == RESHAPES[head]
    assert sorted(_backward_reshapes(info.path)) == sorted((o, i) for i, o in forward)
    graph = int8_training_graph(model, calibration)
    layers = [entry["name"] for entry in info.manifest["layers"]]
    assert layers[:3] == ["c1", "c2", "c3"] and layers[-1] == "fc2"
    start = {n: kernel_of(graph.model.get_layer(n)).numpy().copy() for n in layers}
    start_bias = {n: graph.model.get_layer(n).bias.numpy().copy() for n in layers}
    int8_steps_equal_tflm(graph, scheme, LR, run, x, y, "fc2", layers)
    for name in ("c1", "c2", "c3"):  # the gradient crossed the RESHAPE: the convs moved
        assert (graph.model.get_layer(name).bias.numpy() != start_bias[name]).any(), name
    for name in ("c2", "c3"):
        assert (kernel_of(graph.model.get_layer(name)).numpy() != start[name]).sum() >= 5, name


# ------------------------------------------------------- (b) float step = GradientTape
@pytest.mark.parametrize("head", ["flatten", "regrid"])
def test_sparse_step_through_the_flatten_equals_gradient_tape(head):
    """One static-selection step of `SparseUpdateModel` is lr x tf.GradientTape's gradient
    of cross-entropy on the logits, restricted to the kept input channels; c1 (bias only)
    moves its bias alone."""
    sparse = SparseUpdateModel(flat_cnn(head), UpdateScheme(SPEC), dropout=False)
    sparse.compile(optimizer=keras.optimizers.SGD(LR), loss=LOGITS_LOSS)
    rng = np.random.default_rng(0)
    kept = {l.name: np.sort(rng.choice(input_channels(l), sparse.scheme.kept_channels(l),
                                       replace=False)) for l in sparse.weight_layers}
    assert set(kept) == {"c2", "c3"}
    for name, channels in kept.items():
        sparse.selection.assign(name, channels)
    x, y = images(2)
    trained = {"c1", "c2", "c3", "fc1", "fc2"}
    weights = [v for v in sparse.base.trainable_weights if v.name.split("/")[0] in trained]
    with tf.GradientTape() as tape:
        loss = LOGITS_LOSS(y, sparse.base(x))
    grads = {v.name: g.numpy() for v, g in zip(weights, tape.gradient(loss, weights))}
    before = {v.name: v.numpy() for v in sparse.base.weights}
    sparse.fit(x, y, batch_size=2, epochs=1, verbose=0, shuffle=False)
    for var in sparse.base.weights:
        layer, step = var.name.split("/")[0], before[var.name] - var.numpy()
        if layer not in trained or layer == "fc1" or (layer == "c1" and "bias" not in
                                                      var.name):
            assert not step.any(), var.name  # frozen (fc1 is in no scheme entry)
        elif layer in kept and "bias" not in var.name:
            expected = np.zeros_like(step)
            expected[:, :, kept[layer]] = LR * grads[var.name][:, :, kept[layer]]
            np.testing.assert_allclose(step, expected, atol=1e-6, err_msg=var.name)
            assert np.abs(expected).max() > 1e-4, var.name
        else:  # biases of c1, c2, c3; the classifier fc2 in full
            np.testing.assert_allclose(step, LR * grads[var.name], atol=1e-6,
                                       err_msg=var.name)
            assert np.abs(step).max() > 1e-6, var.name


# --------------------------------------------- (c) a Reshape is fine, a per-row Dense not
def test_flatten_and_reshape_train_and_a_dense_per_position_is_refused(tmp_path):
    row = next(r for r in SUPPORT if r.label == "Flatten, Reshape")
    assert row.trains and "RESHAPE" in row.note
    check_gradient_path(flat_cnn("rows"), {"c2", "fc2"}, "check")  # Reshape((16, 6)): fine
    model = flat_cnn("dense_rows")
    check_gradient_path(model, {"fc1", "fc2"}, "check")  # after it: fine
    match = (r"layer 'fc_rows' \(Dense\) lies between the first updated layer 'c3'.*"
             r"Dense on a \(16, 6\) input, applied to the last axis at each position.*Flatten")
    with pytest.raises(UnsupportedModelError, match=match):
        check_gradient_path(model, {"c3", "fc2"}, "check")
    x, _ = images(4)
    with pytest.raises(TrainingExportError, match=match):
        export_training(model, UpdateScheme({"c3": "bias"}), x, tmp_path / "t.tflite")
    assert not (tmp_path / "t.tflite").exists()


# ------------------------------------------------------------- (d) memory model = TFLM
@pytest.mark.parametrize("head", HEADS)
def test_memory_model_counts_the_backward_reshape_as_tflm_does(head, tmp_path):
    """The analytic arena within 5% of TFLM's; op for op in the exported order (the
    backward RESHAPEs included), tensor for tensor, and the planned tensors where the
    offline plan puts them (the backward RESHAPE in place), byte for byte."""
    model, scheme, _, _, _, info, run = exported(head, tmp_path)
    memory = MemoryModel(model, policy="traversal")
    report = memory.report(scheme, dense=False)
    assert report.arena_bytes == pytest.approx(run.arena_bytes, rel=0.05), head
    timeline = memory.timeline(scheme)
    editor = ModelEditor(read_tflite(info.path)[1])
    kinds = [editor.builtin(op).removeprefix("CUSTOM:") for op in editor.subgraph.operators]
    assert [op.kind for op in timeline.ops] == kinds
    backward = [op for op in timeline.ops if op.kind == "RESHAPE" and op.phase == "backward"]
    assert len(backward) == len(RESHAPES[head])
    assert timeline.tensor_count == len(editor.subgraph.tensors)
    assert tflm_runtime.planned_peak_bytes(timeline) == run.result.arena_head_bytes
    # the export runs each backward RESHAPE in place (its offline plan gives the reshaped
    # gradient the memory of the one it reads), and so does the model
    aliases = in_place_aliases(editor, tensor_lifetimes(editor))
    reshapes = [(int(op.inputs[0]), int(op.outputs[0])) for op in editor.subgraph.operators
                if editor.builtin(op) == "RESHAPE" and
                editor.name(int(op.outputs[0])).endswith("/grad")]
    assert len(reshapes) == len(backward)
    assert set(reshapes) <= {(x, y) for x, y, delta in aliases if delta == 0}
    assert info.manifest["offline_plan"]["in_place"] == len(aliases) == \
        len(timeline.in_place())
    modelled = [y.name for _, y, _ in timeline.in_place() if y.name.startswith("value ")]
    assert len(modelled) == len(backward)  # "value N/grad": only a reshape's is in place
