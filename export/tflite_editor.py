"""Editing a converted `.tflite` in place through the flatbuffer object API.

`ModelEditor` wraps a schema ``ModelT`` (one subgraph) and appends tensors, constant buffers,
operator codes and operators to it; `dgst_tf.export.training` uses it to turn the
converter's int8 inference graph into a training graph::

    from dgst_tf.export.tflite_editor import ModelEditor

    data, model = read_tflite("model.tflite")
    ed = ModelEditor(model)
    g = ed.add_tensor("grad", (1, 10), np.float32)
    op = ed.custom_op("DGST_QUANTIZE_GRAD", [g, -1], [q, s])     # an OperatorT, not placed
    ed.subgraph.operators.append(op)
    data = ed.pack()
"""
from __future__ import annotations

import numpy as np

from dgst_tf.core.tflite_builder import (append_buffer, append_tensor, builtin_operator,
                                        custom_operator, operator_code)
from dgst_tf.export.tflite_file import numpy_dtype, pack_model, schema

__all__ = ["ModelEditor", "BUILTIN_NAMES"]

BUILTIN_NAMES = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}


class ModelEditor:
    """Appends tensors / ops to subgraph 0 of a ``ModelT`` (see the module doc)."""

    def __init__(self, model):
        self.model = model
        self.subgraph = model.subgraphs[0]
        self.subgraph.tensors = list(self.subgraph.tensors or [])
        self.subgraph.operators = list(self.subgraph.operators or [])
        model.buffers = list(model.buffers or [schema.BufferT()])
        model.operatorCodes = list(model.operatorCodes or [])

    # ------------------------------------------------------------------ reading
    def builtin(self, op) -> str:
        """The builtin op name of ``op`` (``"CUSTOM:<name>"`` for a custom op)."""
        code = self.model.operatorCodes[op.opcodeIndex]
        builtin = max(code.builtinCode, code.deprecatedBuiltinCode)
        if builtin == schema.BuiltinOperator.CUSTOM:
            return f"CUSTOM:{code.customCode.decode()}"
        return BUILTIN_NAMES.get(builtin, str(builtin))

    def tensor(self, index: int):
        return self.subgraph.tensors[int(index)]

    def name(self, index: int) -> str:
        name = self.tensor(index).name
        return name.decode() if isinstance(name, bytes) else str(name)

    def shape(self, index: int) -> tuple:
        return tuple(int(d) for d in self.tensor(index).shape)

    def data(self, index: int) -> np.ndarray | None:
        """The constant data of a tensor (None for activations and variables)."""
        t = self.tensor(index)
        buffer = self.model.buffers[t.buffer]
        if buffer.data is None or len(buffer.data) == 0:
            return None
        dtype = np.dtype(numpy_dtype(t.type, self.name(index))).newbyteorder("<")
        return np.frombuffer(np.asarray(buffer.data, np.uint8).tobytes(), dtype).reshape(
            self.shape(index))

    def quantization(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        q = self.tensor(index).quantization
        if q is None or q.scale is None:
            return np.zeros(0, np.float32), np.zeros(0, np.int64)
        return (np.asarray(q.scale, np.float32),
                np.asarray(q.zeroPoint if q.zeroPoint is not None else [0] * len(q.scale),
                           np.int64))

    # ------------------------------------------------------------------ writing
    def add_buffer(self, array) -> int:
        """Append ``array`` as a new constant buffer; returns its index."""
        return append_buffer(self.model.buffers, array)

    def set_data(self, index: int, array) -> None:
        """Give tensor ``index`` new constant data (a new buffer; it stops being variable)."""
        t = self.tensor(index)
        array = np.asarray(array, numpy_dtype(t.type)).reshape(self.shape(index))
        t.buffer = self.add_buffer(array)
        t.isVariable = False

    def add_tensor(self, name: str, shape, dtype, data=None, scale=None, zero_point=None,
                   quantized_dimension: int = 0, variable: bool = False) -> int:
        """Append a tensor (constant when ``data`` is given) to the subgraph; returns its index
        (arguments as `dgst_tf.core.tflite_builder.ModelBuilder.add_tensor`)."""
        return append_tensor(self.subgraph.tensors, self.model.buffers, name, shape, dtype, data,
                             scale, zero_point, quantized_dimension, variable, owner="ModelEditor")

    def _opcode(self, builtin: int, custom: str | None) -> int:
        for i, code in enumerate(self.model.operatorCodes):
            b = max(code.builtinCode, code.deprecatedBuiltinCode)
            c = code.customCode.decode() if code.customCode is not None else None
            if b == builtin and c == custom:
                return i
        self.model.operatorCodes.append(operator_code(builtin, custom))
        return len(self.model.operatorCodes) - 1

    def custom_op(self, name: str, inputs, outputs, options: bytes = b""):
        """A new custom ``OperatorT`` (not yet placed in the operator list)."""
        return custom_operator(self._opcode(schema.BuiltinOperator.CUSTOM, name), inputs,
                               outputs, options)

    def builtin_op(self, builtin: int, inputs, outputs, options_type: int = 0, options=None):
        """A new builtin ``OperatorT`` (not yet placed)."""
        return builtin_operator(self._opcode(builtin, None), inputs, outputs, options_type,
                                options)

    def prune(self) -> dict:
        """Drop tensors that no op, graph input or output uses, and buffers no tensor uses
        (renumbering the rest); returns ``{old index: new index}`` of the tensors kept.
        Single-subgraph models only."""
        sg = self.subgraph
        order = sorted(self._used_tensors())
        new_index = {old: new for new, old in enumerate(order)}
        sg.tensors = [sg.tensors[i] for i in order]
        remap = lambda values: [new_index[int(i)] if i >= 0 else -1 for i in values]  # noqa: E731
        sg.inputs, sg.outputs = remap(sg.inputs), remap(sg.outputs)
        for op in sg.operators:
            op.inputs, op.outputs = remap(op.inputs), remap(op.outputs)
        self.prune_buffers()
        self.model.signatureDefs = None  # they name tensor indices that changed
        return new_index

    def prune_buffers(self) -> None:
        """Drop the data of tensors no op, graph input or output uses, and the buffers no
        tensor or metadata uses (data replaced by `set_data`, say), renumbering the rest;
        tensor indices do not change."""
        sg = self.subgraph
        used = self._used_tensors()
        for index, tensor in enumerate(sg.tensors):
            if index not in used:
                tensor.buffer = 0
        metadata = list(self.model.metadata or [])
        buffers = sorted({0} | {int(t.buffer) for t in sg.tensors}
                         | {int(m.buffer) for m in metadata})
        new_buffer = {old: new for new, old in enumerate(buffers)}
        self.model.buffers = [self.model.buffers[b] for b in buffers]
        for t in sg.tensors:
            t.buffer = new_buffer[int(t.buffer)]
        for m in metadata:
            m.buffer = new_buffer[int(m.buffer)]

    def _used_tensors(self) -> set:
        sg = self.subgraph
        used = set(int(i) for i in sg.inputs) | set(int(i) for i in sg.outputs)
        for op in sg.operators:
            used |= {int(i) for i in list(op.inputs) + list(op.outputs) if i >= 0}
        return used

    def pack(self) -> bytes:
        return pack_model(self.model)
