"""Building small `.tflite` graphs by hand through the flatbuffer object API.

Used for graphs the TFLite converter cannot produce: the dgst custom training ops (builtin
code CUSTOM + a custom code name). Custom options of every dgst op are a little-endian
int32 array whose word 0 is the format version (1); floats are stored as float32 bit
patterns (`int32_options` does both)::

    from dgst_tf.core.tflite_builder import ModelBuilder, int32_options

    b = ModelBuilder()
    dy = b.add_tensor("dy", (1, 4, 4, 8), np.int8, scale=0.05, zero_point=0)
    grad = b.add_tensor("grad", (8,), np.int32)
    b.add_custom_op("DGST_BIAS_GRAD", [dy], [grad], int32_options())
    data = b.build(inputs=[dy], outputs=[grad])       # bytes with the TFL3 identifier
"""
from __future__ import annotations

import numpy as np

from ai_edge_litert import schema_py_generated as schema

from dgst_tf.core.tflite_flatbuffer import pack_model

__all__ = ["ModelBuilder", "int32_options", "OPTIONS_VERSION", "append_buffer", "append_tensor",
           "operator_code", "custom_operator", "builtin_operator"]

OPTIONS_VERSION = 1

_TENSOR_TYPES = {
    np.dtype(np.float32): schema.TensorType.FLOAT32,
    np.dtype(np.int32): schema.TensorType.INT32,
    np.dtype(np.uint8): schema.TensorType.UINT8,
    np.dtype(np.int64): schema.TensorType.INT64,
    np.dtype(np.int16): schema.TensorType.INT16,
    np.dtype(np.int8): schema.TensorType.INT8,
    np.dtype(np.bool_): schema.TensorType.BOOL,
}


def int32_options(*values) -> bytes:
    """``[1, *values]`` as little-endian int32 words; Python floats and np.float32 values
    are stored as their IEEE-754 float32 bit patterns.

        int32_options(2, 2, 1, 1, 0, 0, -128)   # DGST_CONV2D_WEIGHT_GRAD geometry
    """
    words = [OPTIONS_VERSION]
    for value in values:
        if isinstance(value, (float, np.floating)):
            words.append(int(np.array(value, np.float32).view(np.int32)))
        elif isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            if not -2**31 <= int(value) < 2**31:
                raise ValueError(f"int32_options: {value} does not fit in an int32")
            words.append(int(value))
        else:
            raise TypeError(f"int32_options: {value!r} is neither an int nor a float")
    return np.array(words, dtype="<i4").tobytes()


def append_buffer(buffers: list, array) -> int:
    """Append ``array``'s bytes (little-endian) to ``buffers`` as a new ``BufferT``; returns
    its index.

        index = append_buffer(model.buffers, np.arange(4, dtype=np.int32))
    """
    array = np.ascontiguousarray(array)
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(array.astype(array.dtype.newbyteorder("<")).tobytes(), np.uint8)
    buffers.append(buffer)
    return len(buffers) - 1


def append_tensor(tensors: list, buffers: list, name: str, shape, dtype, data=None, scale=None,
                  zero_point=None, quantized_dimension: int = 0, variable: bool = False,
                  owner: str = "ModelBuilder") -> int:
    """Append a ``TensorT`` to ``tensors`` (its constant ``data``, if given, to ``buffers``)
    and return its index; the arguments are `ModelBuilder.add_tensor`'s, ``owner`` names the
    caller in errors.

        index = append_tensor(subgraph.tensors, model.buffers, "w", (2,), np.int8, data=[1, 2],
                              scale=0.1, zero_point=0)
    """
    dtype = np.dtype(dtype)
    if dtype not in _TENSOR_TYPES:
        raise TypeError(f"{owner}: tensor {name!r} has unsupported dtype {dtype}")
    tensor = schema.TensorT()
    tensor.name = name.encode()
    tensor.shape = [int(d) for d in shape]
    tensor.type = _TENSOR_TYPES[dtype]
    tensor.isVariable = bool(variable)
    tensor.buffer = 0
    if data is not None:
        array = np.asarray(data, dtype=dtype)
        if array.shape != tuple(tensor.shape):
            raise ValueError(f"{owner}: data of tensor {name!r} has shape {array.shape}, the "
                             f"tensor {tuple(tensor.shape)}")
        tensor.buffer = append_buffer(buffers, array)
    if scale is not None:
        q = schema.QuantizationParametersT()
        q.scale = [float(s) for s in np.atleast_1d(scale)]
        zp = np.zeros(len(q.scale), np.int64) if zero_point is None else np.atleast_1d(
            zero_point)
        q.zeroPoint = [int(z) for z in zp]
        q.quantizedDimension = int(quantized_dimension)
        tensor.quantization = q
    tensors.append(tensor)
    return len(tensors) - 1


def operator_code(builtin: int, custom: str | None = None):
    """The ``OperatorCodeT`` of builtin ``builtin`` (``custom``: the custom op's name).

        code = operator_code(schema.BuiltinOperator.CUSTOM, "DGST_BIAS_GRAD")
    """
    code = schema.OperatorCodeT()
    code.builtinCode = builtin
    code.deprecatedBuiltinCode = min(builtin, 127)
    code.version = 1
    if custom is not None:
        code.customCode = custom.encode()
    return code


def custom_operator(opcode_index: int, inputs, outputs, options: bytes = b""):
    """A custom ``OperatorT`` of operator code ``opcode_index``; -1 marks an omitted input.

        op = custom_operator(0, [dy], [grad], int32_options())
    """
    op = schema.OperatorT()
    op.opcodeIndex = opcode_index
    op.inputs = [int(i) for i in inputs]
    op.outputs = [int(i) for i in outputs]
    op.customOptions = list(options) if options else None
    op.customOptionsFormat = schema.CustomOptionsFormat.FLEXBUFFERS  # the only value
    return op


def builtin_operator(opcode_index: int, inputs, outputs, options_type: int = 0, options=None):
    """A builtin ``OperatorT`` of operator code ``opcode_index`` with its options.

        op = builtin_operator(1, [x], [y], schema.BuiltinOptions.ReshapeOptions, options)
    """
    op = schema.OperatorT()
    op.opcodeIndex = opcode_index
    op.inputs = [int(i) for i in inputs]
    op.outputs = [int(i) for i in outputs]
    op.builtinOptionsType = options_type
    op.builtinOptions = options
    return op


class ModelBuilder:
    """One-subgraph TFLite model assembled from tensors and ops (see the module doc)."""

    def __init__(self, description: str = "dgst-tf"):
        self.description = description
        self._tensors: list = []
        self._buffers: list = [schema.BufferT()]  # buffer 0: the empty sentinel
        self._operators: list = []
        self._codes: list = []  # (builtin code, custom name)

    def add_tensor(self, name: str, shape, dtype, data=None, scale=None, zero_point=None,
                   quantized_dimension: int = 0, variable: bool = False) -> int:
        """Add a tensor (constant when ``data`` is given) and return its index.

        ``scale``/``zero_point``: a number (per tensor) or a sequence (per channel along
        ``quantized_dimension``). Variable int8 tensors need a zero point (TFLM resets
        them to it).
        """
        if variable and scale is None and np.dtype(dtype) == np.int8:
            raise ValueError(f"ModelBuilder: variable int8 tensor {name!r} needs scale and "
                             f"zero_point (TFLM resets variables to the zero point)")
        return append_tensor(self._tensors, self._buffers, name, shape, dtype, data, scale,
                             zero_point, quantized_dimension, variable)

    def _opcode(self, builtin: int, custom: str | None) -> int:
        key = (builtin, custom)
        if key not in self._codes:
            self._codes.append(key)
        return self._codes.index(key)

    def add_custom_op(self, name: str, inputs, outputs, options: bytes = b"") -> None:
        """Append custom op ``name`` (e.g. ``"DGST_BIAS_GRAD"``); -1 marks an omitted input."""
        self._operators.append(custom_operator(
            self._opcode(schema.BuiltinOperator.CUSTOM, name), inputs, outputs, options))

    def add_builtin_op(self, builtin: int, inputs, outputs, options_type: int = 0,
                       options=None) -> None:
        """Append builtin op ``builtin`` (``schema.BuiltinOperator.X``) with its options."""
        self._operators.append(builtin_operator(self._opcode(builtin, None), inputs, outputs,
                                                options_type, options))

    def build(self, inputs, outputs) -> bytes:
        """Serialize with graph ``inputs``/``outputs`` (tensor indices); returns TFL3 bytes."""
        codes = [operator_code(builtin, custom) for builtin, custom in self._codes]
        subgraph = schema.SubGraphT()
        subgraph.tensors = self._tensors
        subgraph.inputs = [int(i) for i in inputs]
        subgraph.outputs = [int(i) for i in outputs]
        subgraph.operators = self._operators
        subgraph.name = b"main"
        model = schema.ModelT()
        model.version = 3
        model.operatorCodes = codes
        model.subgraphs = [subgraph]
        model.buffers = self._buffers
        model.description = self.description.encode()
        return pack_model(model)
