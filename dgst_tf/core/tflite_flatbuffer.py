"""Serializing a TFLite flatbuffer from the schema's object API (``ModelT``).

Reading is `dgst_tf.export.tflite_file.read_tflite` (with the checks TFLM needs) or
`dgst_tf.core.int8_conversion.ConvertedModel`; writing a ``ModelT`` back is here, so the
converter's output can be edited in the core stage and by the exporter alike::

    model = schema.ModelT.InitFromObj(schema.Model.GetRootAs(data, 0))
    model.description = b"edited"
    data = pack_model(model)
"""
from __future__ import annotations

__all__ = ["FILE_IDENTIFIER", "pack_model"]

FILE_IDENTIFIER = b"TFL3"


def pack_model(model) -> bytes:
    """Serialize a schema ``ModelT`` with the ``TFL3`` file identifier.

        data = pack_model(model)
    """
    import flatbuffers

    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=FILE_IDENTIFIER)
    return bytes(builder.Output())
