"""Tensors and constant buffers appended to a `.tflite`: `ModelBuilder` (a new graph) and
`ModelEditor` (a converted graph) share `tflite_builder.append_tensor` / `append_buffer`, so
both must write the same fields, little-endian bytes that read back as the data, and refuse
bad input naming the tensor."""
import numpy as np
import pytest

from dgst_tf.core.tflite_builder import ModelBuilder, append_buffer
from dgst_tf.export.tflite_editor import ModelEditor
from dgst_tf.export.tflite_file import read_tflite, schema


def _editor() -> ModelEditor:
    """An editor on a one-tensor graph written by the builder (read back from its bytes)."""
    b = ModelBuilder()
    x = b.add_tensor("x", (1, 2), np.float32)
    return ModelEditor(read_tflite(b.build(inputs=[x], outputs=[x]), "builder graph")[1])


def _fields(tensor, buffers) -> tuple:
    q = tensor.quantization
    quant = None if q is None else (list(q.scale), list(q.zeroPoint), q.quantizedDimension)
    data = buffers[tensor.buffer].data
    return (tensor.name, list(tensor.shape), tensor.type, bool(tensor.isVariable), quant,
            None if data is None else bytes(np.asarray(data, np.uint8)))


CASES = [  # (name, shape, dtype, keyword arguments)
    ("w", (2, 1, 1, 3), np.int8, dict(data=np.arange(-3, 3, dtype=np.int8).reshape(2, 1, 1, 3),
                                      scale=[0.5, 0.25], zero_point=[0, 0])),
    ("depthwise", (1, 1, 1, 2), np.int8, dict(data=[[[[7, -8]]]], scale=[0.1, 0.2],
                                              zero_point=[1, -1], quantized_dimension=3)),
    ("bias", (2,), np.int32, dict(data=[1, -2])),
    ("lr", (1,), np.float32, dict(data=[0.5])),
    ("step", (1,), np.int32, dict(variable=True)),
    ("act", (1, 4), np.int8, dict(scale=0.05, zero_point=-128)),
]


@pytest.mark.parametrize("name, shape, dtype, kwargs", CASES, ids=[c[0] for c in CASES])
def test_builder_and_editor_write_the_same_tensor(name, shape, dtype, kwargs):
    b, ed = ModelBuilder(), _editor()
    i = b.add_tensor(name, shape, dtype, **kwargs)
    j = ed.add_tensor(name, shape, dtype, **kwargs)
    assert (i, j) == (0, 1)
    assert _fields(b._tensors[i], b._buffers) == _fields(ed.tensor(j), ed.model.buffers)
    if "data" in kwargs:
        assert ed.tensor(j).buffer == len(ed.model.buffers) - 1 > 0
        np.testing.assert_array_equal(ed.data(j), np.asarray(kwargs["data"], dtype))
    else:
        assert ed.tensor(j).buffer == 0 and ed.data(j) is None


def test_buffer_bytes_are_little_endian_whatever_the_input_byte_order():
    buffers = [schema.BufferT()]
    assert append_buffer(buffers, np.array([1, -2], ">i4")) == 1
    assert append_buffer(buffers, np.array([[1.0], [-2.0]], "<f4").T) == 2  # non-contiguous
    assert bytes(buffers[1].data) == b"\x01\x00\x00\x00\xfe\xff\xff\xff"
    assert bytes(buffers[2].data) == np.array([1.0, -2.0], "<f4").tobytes()


def test_a_built_graph_reads_back_with_its_constants():
    b = ModelBuilder()
    w = b.add_tensor("w", (2, 2), np.int16, data=[[1, -300], [2**14, -2**15]])
    y = b.add_tensor("y", (2, 2), np.int16)
    ed = ModelEditor(read_tflite(b.build(inputs=[y], outputs=[w]), "graph")[1])
    np.testing.assert_array_equal(ed.data(w), [[1, -300], [2**14, -2**15]])
    assert ed.name(w) == "w" and ed.data(y) is None


@pytest.mark.parametrize("owner", ["ModelBuilder", "ModelEditor"])
def test_bad_tensors_are_refused_naming_the_tensor(owner):
    target = ModelBuilder() if owner == "ModelBuilder" else _editor()
    with pytest.raises(ValueError, match=rf"{owner}: data of tensor 'w' has shape \(3,\), "
                                         rf"the tensor \(2,\)"):
        target.add_tensor("w", (2,), np.int8, data=[1, 2, 3], scale=0.1, zero_point=0)
    with pytest.raises(TypeError, match=rf"{owner}: tensor 'c' has unsupported dtype complex64"):
        target.add_tensor("c", (2,), np.complex64)


def test_builder_refuses_a_variable_int8_tensor_without_zero_point_writing_nothing():
    b = ModelBuilder()
    with pytest.raises(ValueError, match="variable int8 tensor 'state' needs scale"):
        b.add_tensor("state", (2,), np.int8, data=[0, 0], variable=True)
    assert b._tensors == [] and len(b._buffers) == 1


def _op_fields(op, codes) -> tuple:
    code = codes[op.opcodeIndex]
    options = None if op.customOptions is None else bytes(np.asarray(op.customOptions, np.uint8))
    shape = None if op.builtinOptions is None else list(op.builtinOptions.newShape)
    return (code.builtinCode, code.deprecatedBuiltinCode, code.version, code.customCode,
            list(op.inputs), list(op.outputs), options, op.customOptionsFormat,
            op.builtinOptionsType, shape)


def test_builder_and_editor_write_the_same_operators():
    options = schema.ReshapeOptionsT()
    options.newShape = [1, 2]
    b, ed = ModelBuilder(), _editor()
    for i in range(5):
        b.add_tensor(f"t{i}", (1, 2), np.float32)
    b.add_custom_op("DGST_BIAS_GRAD", [0, -1], [1], b"\x01\x00\x00\x00")
    b.add_builtin_op(schema.BuiltinOperator.RESHAPE, [1], [2],
                     schema.BuiltinOptions.ReshapeOptions, options)
    b.add_custom_op("DGST_BIAS_GRAD", [3], [4])
    ops = [ed.custom_op("DGST_BIAS_GRAD", [0, -1], [1], b"\x01\x00\x00\x00"),
           ed.builtin_op(schema.BuiltinOperator.RESHAPE, [1], [2],
                         schema.BuiltinOptions.ReshapeOptions, options),
           ed.custom_op("DGST_BIAS_GRAD", [3], [4])]
    built = read_tflite(b.build(inputs=[], outputs=[]), "graph")[1]
    assert [_op_fields(op, built.operatorCodes) for op in built.subgraphs[0].operators] == \
        [_op_fields(op, ed.model.operatorCodes) for op in ops]
    assert len(built.operatorCodes) == 2  # the second DGST_BIAS_GRAD reuses its code
    assert [op.opcodeIndex for op in ops] == [0, 1, 0]
    assert ed.builtin(ops[0]) == "CUSTOM:DGST_BIAS_GRAD" and ed.builtin(ops[1]) == "RESHAPE"
    assert ops[2].customOptions is None
