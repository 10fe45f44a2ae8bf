"""The TFLM subprocess runner: outputs, arena bytes, and clear errors instead of crashes."""
import numpy as np
import pytest

from dgst_tf.core.tflite_builder import ModelBuilder
from dgst_tf.export.tflite_file import TfliteFileError, pack_model, read_tflite, schema
from dgst_tf.export.tflm.runner import TflmCrashError, TflmError, parse_allocations, run_tflm


def add_model(scale=0.1, shape=(1, 4, 4, 2)):
    """y = x1 + x2, int8, all with the same scale and zero point 0 (so y = x1 + x2 exactly,
    saturated); a tiny model that TFLM runs without TensorFlow."""
    b = ModelBuilder()
    x1 = b.add_tensor("x1", shape, np.int8, scale=scale, zero_point=0)
    x2 = b.add_tensor("x2", shape, np.int8, scale=scale, zero_point=0)
    y = b.add_tensor("y", shape, np.int8, scale=scale, zero_point=0)
    b.add_builtin_op(schema.BuiltinOperator.ADD, [x1, x2], [y], schema.BuiltinOptions.AddOptions,
                     schema.AddOptionsT())
    return b.build([x1, x2], [y])


def softmax_model(input_scale):
    b = ModelBuilder()
    x = b.add_tensor("logits", (1, 4), np.int8, scale=input_scale, zero_point=0)
    y = b.add_tensor("probs", (1, 4), np.int8, scale=1 / 256, zero_point=-128)
    options = schema.SoftmaxOptionsT()
    options.beta = 1.0
    b.add_builtin_op(schema.BuiltinOperator.SOFTMAX, [x], [y],
                     schema.BuiltinOptions.SoftmaxOptions, options)
    return b.build([x], [y])


@pytest.fixture(scope="module")
def add_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("runner") / "add.tflite"
    path.write_bytes(add_model())
    return path


def test_outputs_and_arena_bytes(add_path):
    rng = np.random.default_rng(0)
    x1, x2 = (rng.integers(-60, 60, (1, 4, 4, 2)).astype(np.int8) for _ in range(2))
    result = run_tflm(add_path, [x1, x2])
    np.testing.assert_array_equal(result.outputs[0], x1 + x2)
    assert result.outputs[0].dtype == np.int8 and result.outputs[0].shape == (1, 4, 4, 2)
    assert result.arena_bytes == result.arena_head_bytes + result.arena_tail_bytes
    assert result.arena_head_bytes >= 32  # the 1x4x4x2 int8 output lives in the head
    assert result.allocations["NodeAndRegistration struct"] > 0
    assert result.output_details[0].scale == pytest.approx(0.1)
    assert "[RecordingMicroAllocator] Arena allocation total" in result.log


def test_several_invocations_in_one_interpreter(add_path):
    rng = np.random.default_rng(1)
    x1, x2 = (rng.integers(-60, 60, (5, 1, 4, 4, 2)).astype(np.int8) for _ in range(2))
    result = run_tflm(add_path, [x1, x2])
    assert result.outputs[0].shape == (5, 1, 4, 4, 2)
    np.testing.assert_array_equal(result.outputs[0], x1 + x2)


def test_arena_size_limit_is_reported(add_path):
    needed = run_tflm(add_path, [np.zeros((1, 4, 4, 2), np.int8)] * 2).arena_bytes
    with pytest.raises(TflmError, match=r"add\.tflite.*arena_size was 200 bytes"):
        run_tflm(add_path, [np.zeros((1, 4, 4, 2), np.int8)] * 2, arena_size=200)
    assert needed > 200


def test_bad_inputs_are_rejected_before_tflm(add_path):
    x = np.zeros((1, 4, 4, 2), np.int8)
    with pytest.raises(TypeError, match=r"add\.tflite: input 0 \('x1'\) is int8, got float32"):
        run_tflm(add_path, [x.astype(np.float32), x])
    with pytest.raises(ValueError, match=r"has shape \(1, 4, 4, 2\); got \(1, 4, 4, 3\)"):
        run_tflm(add_path, [x, np.zeros((1, 4, 4, 3), np.int8)])
    with pytest.raises(ValueError, match="2 input"):
        run_tflm(add_path, [x])
    with pytest.raises(ValueError, match="same length"):
        run_tflm(add_path, [x, np.zeros((2, 1, 4, 4, 2), np.int8)])


def test_abort_in_tflm_becomes_an_exception_naming_the_model(tmp_path):
    path = tmp_path / "degenerate_softmax.tflite"
    path.write_bytes(softmax_model(1e-9))  # TFLM aborts in QuantizeMultiplierGreaterThanOne
    with pytest.raises(TflmCrashError, match=r"SIGABRT .*degenerate_softmax\.tflite"):
        run_tflm(path, [np.zeros((1, 4), np.int8)])
    # the same graph with a sane scale runs: the crash is the model's, not the runner's
    path.write_bytes(softmax_model(0.1))
    out = run_tflm(path, [np.array([[10, 0, 0, 0]], np.int8)]).outputs[0]
    assert out[0, 0] > out[0, 1] == out[0, 2] == out[0, 3]


def test_unregistered_custom_op_is_a_clear_error(tmp_path):
    b = ModelBuilder()
    x = b.add_tensor("x", (4,), np.int8, scale=1.0, zero_point=0)
    y = b.add_tensor("y", (4,), np.int8, scale=1.0, zero_point=0)
    b.add_custom_op("NOT_A_REGISTERED_OP", [x], [y])
    path = tmp_path / "custom.tflite"
    path.write_bytes(b.build([x], [y]))
    with pytest.raises(TflmError, match=r"custom\.tflite[\s\S]*NOT_A_REGISTERED_OP"):
        run_tflm(path, [np.zeros(4, np.int8)])
    with pytest.raises(TflmError, match="MISSING_REGISTERER"):
        run_tflm(path, [np.zeros(4, np.int8)], registerers=["MISSING_REGISTERER"])


def corrupt_files():
    """(name, bytes) of damaged models, each with a different defect."""
    good = add_model()
    _, model = read_tflite(good)
    files = [("empty", b""), ("short", good[:6]), ("random", bytes(range(256)) * 8),
             ("identifier", good[:4] + b"TFL2" + good[8:]),
             ("root-offset", (len(good) + 64).to_bytes(4, "little") + good[4:])]
    for cut in (8, 12, len(good) // 3, len(good) // 2, len(good) - 1):
        files.append((f"truncated-{cut}", good[:cut]))
    garbage = bytearray(np.random.default_rng(0).integers(0, 256, 512, dtype=np.uint8))
    garbage[4:8] = b"TFL3"
    files.append(("garbage-with-identifier", bytes(garbage)))

    def edited(name, change):
        _, m = read_tflite(good)
        change(m)
        files.append((name, pack_model(m)))

    edited("buffer-index", lambda m: setattr(m.subgraphs[0].tensors[0], "buffer", 99))
    edited("op-input-index", lambda m: setattr(m.subgraphs[0].operators[0], "inputs", [0, 42]))
    edited("opcode-index", lambda m: setattr(m.subgraphs[0].operators[0], "opcodeIndex", 5))
    edited("graph-output", lambda m: setattr(m.subgraphs[0], "outputs", [7]))
    edited("no-subgraph", lambda m: setattr(m, "subgraphs", []))
    edited("version", lambda m: setattr(m, "version", 2))

    def short_buffer(m):  # a constant tensor whose data is smaller than its shape
        t = m.subgraphs[0].tensors[1]
        b = schema.BufferT()
        b.data = np.zeros(5, np.uint8)
        m.buffers.append(b)
        t.buffer = len(m.buffers) - 1

    edited("short-constant", short_buffer)
    return files


@pytest.mark.parametrize("name,data", corrupt_files(), ids=[n for n, _ in corrupt_files()])
def test_corrupt_or_truncated_files_give_a_clear_error(tmp_path, name, data):
    path = tmp_path / f"{name}.tflite"
    path.write_bytes(data)
    with pytest.raises(TfliteFileError) as info:
        run_tflm(path, [np.zeros((1, 4, 4, 2), np.int8)] * 2)
    assert f"{name}.tflite" in str(info.value)


def test_damaged_bytes_never_crash_the_caller(tmp_path):
    """Overwrite 4 bytes at many places: each run either works or raises a clear error."""
    good = add_model()
    rng = np.random.default_rng(2)
    outcomes = set()
    for trial, position in enumerate(rng.choice(len(good) - 4, 30, replace=False)):
        data = bytearray(good)
        data[position:position + 4] = rng.integers(0, 256, 4, dtype=np.uint8).tobytes()
        path = tmp_path / f"damaged_{trial}.tflite"
        path.write_bytes(bytes(data))
        try:
            run_tflm(path, [np.zeros((1, 4, 4, 2), np.int8)] * 2)
            outcomes.add("ran")
        except (TfliteFileError, TflmError, TypeError, ValueError) as error:
            assert f"damaged_{trial}.tflite" in str(error), error
            outcomes.add(type(error).__name__)
    assert outcomes - {"ran"}, outcomes  # some damage was caught


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(TfliteFileError, match=r"nothing\.tflite: no such file"):
        run_tflm(tmp_path / "nothing.tflite", [])


def test_parse_allocations():
    text = ("noise\n[RecordingMicroAllocator] Arena allocation total 5520 bytes\n"
            "[RecordingMicroAllocator] Arena allocation head 2336 bytes\n"
            "[RecordingMicroAllocator] Arena allocation tail 3184 bytes\n"
            "[RecordingMicroAllocator] 'Persistent buffer data' used 1168 bytes with alignment "
            "overhead (requested 1128 bytes for 23 allocations)\n")
    assert parse_allocations(text) == {"total": 5520, "head": 2336, "tail": 3184,
                                       "categories": {"Persistent buffer data": 1168}}
    assert parse_allocations("nothing") == {"categories": {}}
