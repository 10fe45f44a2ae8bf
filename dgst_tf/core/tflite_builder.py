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

__all__ = ["ModelBuilder", "int32_options", "OPTIONS_VERSION"]

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
        dtype = np.dtype(dtype)
        if dtype not in _TENSOR_TYPES:
            raise TypeError(f"ModelBuilder: tensor {name!r} has unsupported dtype {dtype}")
        tensor = schema.TensorT()
        tensor.name = name.encode()
        tensor.shape = [int(d) for d in shape]
        tensor.type = _TENSOR_TYPES[dtype]
        tensor.isVariable = bool(variable)
        tensor.buffer = 0
        if data is not None:
            array = np.ascontiguousarray(np.asarray(data, dtype=dtype))
            if array.shape != tuple(tensor.shape):
                raise ValueError(f"ModelBuilder: data of tensor {name!r} has shape "
                                 f"{array.shape}, the tensor {tuple(tensor.shape)}")
            buffer = schema.BufferT()
            buffer.data = np.frombuffer(array.astype(dtype.newbyteorder("<")).tobytes(),
                                        np.uint8)
            self._buffers.append(buffer)
            tensor.buffer = len(self._buffers) - 1
        if scale is not None:
            q = schema.QuantizationParametersT()
            q.scale = [float(s) for s in np.atleast_1d(scale)]
            zp = np.zeros(len(q.scale), np.int64) if zero_point is None else np.atleast_1d(
                zero_point)
            q.zeroPoint = [int(z) for z in zp]
            q.quantizedDimension = int(quantized_dimension)
            tensor.quantization = q
        elif variable and dtype == np.int8:
            raise ValueError(f"ModelBuilder: variable int8 tensor {name!r} needs scale and "
                             f"zero_point (TFLM resets variables to the zero point)")
        self._tensors.append(tensor)
        return len(self._tensors) - 1

    def _opcode(self, builtin: int, custom: str | None) -> int:
        key = (builtin, custom)
        if key not in self._codes:
            self._codes.append(key)
        return self._codes.index(key)

    def add_custom_op(self, name: str, inputs, outputs, options: bytes = b"") -> None:
        """Append custom op ``name`` (e.g. ``"DGST_BIAS_GRAD"``); -1 marks an omitted input."""
        op = schema.OperatorT()
        op.opcodeIndex = self._opcode(schema.BuiltinOperator.CUSTOM, name)
        op.inputs = [int(i) for i in inputs]
        op.outputs = [int(i) for i in outputs]
        op.customOptions = list(options) if options else None
        op.customOptionsFormat = schema.CustomOptionsFormat.FLEXBUFFERS  # the only value
        self._operators.append(op)

    def add_builtin_op(self, builtin: int, inputs, outputs, options_type: int = 0,
                       options=None) -> None:
        """Append builtin op ``builtin`` (``schema.BuiltinOperator.X``) with its options."""
        op = schema.OperatorT()
        op.opcodeIndex = self._opcode(builtin, None)
        op.inputs = [int(i) for i in inputs]
        op.outputs = [int(i) for i in outputs]
        op.builtinOptionsType = options_type
        op.builtinOptions = options
        self._operators.append(op)

    def build(self, inputs, outputs) -> bytes:
        """Serialize with graph ``inputs``/``outputs`` (tensor indices); returns TFL3 bytes."""
        codes = []
        for builtin, custom in self._codes:
            code = schema.OperatorCodeT()
            code.builtinCode = builtin
            code.deprecatedBuiltinCode = min(builtin, 127)
            code.version = 1
            if custom is not None:
                code.customCode = custom.encode()
            codes.append(code)
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
