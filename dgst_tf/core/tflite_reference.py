"""TFLite's reference kernels (``BUILTIN_REF``, via ai-edge-litert) on a flatbuffer in memory:
the golden int8 values TFLM must match bit for bit. `dgst_tf.export.reference_outputs` runs a
checked file through it; the int8 training simulation runs one-op graphs through it (the
forward tables of `dgst_tf.training.int8_activations`)::

    from dgst_tf.core.tflite_reference import builtin_ref_outputs

    outputs = builtin_ref_outputs(data, [x_q])      # one array per model output
"""
from __future__ import annotations

import numpy as np

__all__ = ["builtin_ref_outputs"]


def builtin_ref_outputs(data: bytes, inputs) -> list:
    """Outputs of ``BUILTIN_REF`` for the ``.tflite`` bytes ``data``. ``inputs``: one array per
    model input, of the input's exact shape (no stacking), or one array."""
    from ai_edge_litert import interpreter as litert

    interpreter = litert.Interpreter(
        model_content=data, num_threads=1,
        experimental_op_resolver_type=litert.OpResolverType.BUILTIN_REF)
    interpreter.allocate_tensors()
    if isinstance(inputs, np.ndarray):
        inputs = [inputs]
    for detail, value in zip(interpreter.get_input_details(), inputs):
        interpreter.set_tensor(detail["index"], np.asarray(value))
    interpreter.invoke()
    return [np.array(interpreter.get_tensor(d["index"]))
            for d in interpreter.get_output_details()]
