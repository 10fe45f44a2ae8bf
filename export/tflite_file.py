"""Reading, checking and writing `.tflite` flatbuffers without TensorFlow or TFLM.

Everything that hands a file to TensorFlow Lite Micro goes through `read_tflite` first: TFLM
trusts the flatbuffer and may crash on a damaged one, so the identifier (``TFL3``), the
parse and the index ranges are checked here, with errors that name the file::

    from dgst_tf.export.tflite_file import read_tflite, write_atomically

    data, model = read_tflite("model.tflite")   # bytes, schema ModelT (object API)
    print(tensor_details(model, model.subgraphs[0].inputs[0]))
    write_atomically("copy.tflite", data)       # dgst_tf.core.files: temp file + os.replace

The schema is the flatbuffer object API of ``ai_edge_litert.schema_py_generated`` (the same
``schema.fbs`` as TFLM's copy); importing it loads no interpreter library, so it is safe in a
process that also runs TensorFlow.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import struct

import numpy as np
from ai_edge_litert import schema_py_generated as schema

# one implementation of atomic writes for the whole project; refuses a missing folder
from dgst_tf.core.files import write_atomically
from dgst_tf.core.tflite_flatbuffer import FILE_IDENTIFIER, pack_model

__all__ = ["TfliteFileError", "read_tflite", "write_atomically", "pack_model", "TensorDetails",
           "tensor_details", "numpy_dtype", "schema", "FILE_IDENTIFIER"]

_NUMPY_TYPES = {
    schema.TensorType.FLOAT32: np.float32,
    schema.TensorType.FLOAT16: np.float16,
    schema.TensorType.INT32: np.int32,
    schema.TensorType.UINT8: np.uint8,
    schema.TensorType.INT64: np.int64,
    schema.TensorType.BOOL: np.bool_,
    schema.TensorType.INT16: np.int16,
    schema.TensorType.INT8: np.int8,
    schema.TensorType.FLOAT64: np.float64,
    schema.TensorType.UINT64: np.uint64,
    schema.TensorType.UINT32: np.uint32,
    schema.TensorType.UINT16: np.uint16,
}


_KNOWN_TYPES = {v for k, v in vars(schema.TensorType).items() if not k.startswith("_")}


class TfliteFileError(ValueError):
    """A `.tflite` file is missing, truncated, corrupt or not a TFLite model."""


@dataclasses.dataclass(frozen=True)
class TensorDetails:
    """Name, shape, dtype and per-tensor/per-channel quantization of one tensor."""

    index: int
    name: str
    shape: tuple
    dtype: type
    scales: tuple = ()
    zero_points: tuple = ()
    is_variable: bool = False

    @property
    def scale(self) -> float:
        """The per-tensor scale (the first one), 0.0 if the tensor is not quantized."""
        return float(self.scales[0]) if self.scales else 0.0

    @property
    def zero_point(self) -> int:
        return int(self.zero_points[0]) if self.zero_points else 0


def numpy_dtype(tensor_type: int, where: str = "tensor"):
    """The NumPy dtype of a schema ``TensorType`` value (ValueError for packed/odd types)."""
    try:
        return _NUMPY_TYPES[tensor_type]
    except KeyError:
        raise ValueError(f"{where}: TFLite tensor type {tensor_type} has no NumPy "
                         f"equivalent") from None


def tensor_details(model, index: int, subgraph: int = 0) -> TensorDetails:
    """`TensorDetails` of tensor ``index`` of ``model`` (a schema ``ModelT``).

        details = tensor_details(model, model.subgraphs[0].inputs[0])
        details.shape, details.dtype, details.scale, details.zero_point
    """
    tensor = model.subgraphs[subgraph].tensors[index]
    q = tensor.quantization
    scales = tuple(float(s) for s in q.scale) if q is not None and q.scale is not None else ()
    zps = tuple(int(z) for z in q.zeroPoint) if q is not None and q.zeroPoint is not None else ()
    name = tensor.name.decode() if isinstance(tensor.name, bytes) else str(tensor.name or "")
    shape = tuple(int(d) for d in tensor.shape) if tensor.shape is not None else ()
    return TensorDetails(index, name, shape, numpy_dtype(tensor.type, name), scales, zps,
                         bool(tensor.isVariable))


def _label(source) -> str:
    return "<bytes>" if isinstance(source, (bytes, bytearray, memoryview)) else os.fspath(source)


def read_tflite(source, what: str | None = None):
    """Read and check a TFLite flatbuffer; return ``(bytes, ModelT)``.

    ``source``: a path or the bytes. Raises `TfliteFileError` naming the file (or ``what``)
    if it is missing, too short, lacks the ``TFL3`` identifier, cannot be parsed, or has
    out-of-range indices or constant buffers of the wrong size (a truncated file). Example::

        data, model = read_tflite("model.tflite")
    """
    label = what or _label(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    else:
        path = pathlib.Path(source)
        if not path.is_file():
            raise TfliteFileError(f"TFLite model {label}: no such file")
        data = path.read_bytes()
    if len(data) < 8:
        raise TfliteFileError(f"TFLite model {label}: {len(data)} bytes is too short to be a "
                              f"TFLite flatbuffer (truncated or empty file)")
    if data[4:8] != FILE_IDENTIFIER:
        raise TfliteFileError(f"TFLite model {label}: file identifier is {data[4:8]!r}, not "
                              f"{FILE_IDENTIFIER!r}; not a TFLite model, or a corrupt one")
    (root,) = struct.unpack_from("<I", data, 0)
    if root + 4 > len(data):
        raise TfliteFileError(f"TFLite model {label}: root table offset {root} lies beyond the "
                              f"end of the {len(data)}-byte file (truncated or corrupt)")
    try:
        model = schema.ModelT.InitFromObj(schema.Model.GetRootAs(data, 0))
    except Exception as error:  # flatbuffers raises struct.error, IndexError, ValueError...
        raise TfliteFileError(f"TFLite model {label}: cannot be parsed as a TFLite flatbuffer "
                              f"(truncated or corrupt): {type(error).__name__}: {error}") from None
    _check_model(model, label, len(data))
    return data, model


def _check_model(model, label: str, size: int) -> None:
    def fail(message):
        raise TfliteFileError(f"TFLite model {label}: {message} (corrupt or truncated file)")

    if model.version != 3:
        fail(f"schema version is {model.version}, expected 3")
    if not model.subgraphs:
        fail("has no subgraph")
    buffers = model.buffers or []
    codes = model.operatorCodes or []
    for b, buffer in enumerate(buffers):
        if buffer.offset or buffer.size:  # >2 GB layout: data outside the flatbuffer
            if buffer.offset < 0 or buffer.offset + buffer.size > size:
                fail(f"buffer {b} points to bytes {buffer.offset}..{buffer.offset + buffer.size}"
                     f" outside the {size}-byte file")
    for s, subgraph in enumerate(model.subgraphs):
        tensors = subgraph.tensors or []
        n = len(tensors)
        for t, tensor in enumerate(tensors):
            if not 0 <= tensor.buffer < max(len(buffers), 1):
                fail(f"subgraph {s} tensor {t} refers to buffer {tensor.buffer} of "
                     f"{len(buffers)}")
            if tensor.type not in _KNOWN_TYPES:
                fail(f"subgraph {s} tensor {t} has unknown type {tensor.type}")
            shape = [] if tensor.shape is None else [int(d) for d in tensor.shape]
            if any(d < 0 for d in shape):
                fail(f"subgraph {s} tensor {t} has negative dimensions {shape}")
            data = buffers[tensor.buffer].data if buffers else None
            dtype = _NUMPY_TYPES.get(tensor.type)
            if data is not None and len(data) and dtype is not None:
                expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
                if len(data) != expected:
                    fail(f"subgraph {s} tensor {t} of shape {shape} needs {expected} bytes, its "
                         f"buffer {tensor.buffer} has {len(data)}")
        for kind in ("inputs", "outputs"):
            for t in getattr(subgraph, kind) if getattr(subgraph, kind) is not None else []:
                if not 0 <= t < n:
                    fail(f"subgraph {s} {kind[:-1]} tensor {t} is out of range (0..{n - 1})")
        for o, op in enumerate(subgraph.operators or []):
            if not 0 <= op.opcodeIndex < len(codes):
                fail(f"subgraph {s} operator {o} has opcode index {op.opcodeIndex} of "
                     f"{len(codes)}")
            for kind in ("inputs", "outputs", "intermediates"):
                values = getattr(op, kind)
                for t in values if values is not None else []:
                    if not -1 <= t < n:
                        fail(f"subgraph {s} operator {o} {kind[:-1]} tensor {t} is out of range")
