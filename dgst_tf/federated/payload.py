"""What a device sends after local training: only the channels it changed, int8 or fp16.

    from dgst_tf.federated.payload import sparse_update, encode, decode, dense_deltas
    entries = sparse_update(weights_before, weights_after)   # exact float32 deltas
    blob = encode(entries, "int8")        # the uplink payload; len(blob) is what is sent
    received = decode(blob, [w.shape for w in weights_before])
    deltas = dense_deltas(received, [w.shape for w in weights_before])

A model's weights are a list of arrays both ends know (the server sent them). Each array is
cut into channels along its channel axis (`channel_axis`: the input channels of a conv or
dense kernel, the entries of a bias), the unit in which the sparse training step updates
weights. An `Entry` holds one array's changed channels: their indices and their deltas
(after - before). Arrays with no change are not sent at all; an array whose channels all
changed (a bias, the classifier, dense fine-tuning) is sent without indices.

Binary format (little-endian)::

    header  b"DGSU" | version u8 | encoding u8 | entries u16
    entry   array u16 | flags u8 (bit 0: all channels, no indices) | channels u16
            | [channel indices u16 x channels] | [int8: scale f32] | values

Values are the changed channels' deltas, channel-major, as float32 ("fp32", lossless),
float16 ("fp16") or int8 with one symmetric scale per array (``max |delta| / 127``;
decoding error at most scale / 2 per value). ``len(encode(...))`` is the uplink payload
size and `payload_bytes` computes it from the entries without encoding.
"""
from __future__ import annotations

import dataclasses
import struct
import types

import numpy as np

from dgst_tf.training.channel_importance import channel_axis as kernel_channel_axis

ENCODINGS = ("int8", "fp16", "fp32")
MAGIC = b"DGSU"
VERSION = 1
_HEADER = struct.Struct("<4sBBH")
_ENTRY = struct.Struct("<HBH")
_ALL_CHANNELS = 1
_DTYPES = {"fp32": np.dtype("<f4"), "fp16": np.dtype("<f2"), "int8": np.dtype("i1")}
_MAX_U16 = 0xFFFF


class PayloadError(ValueError):
    """A payload that does not decode against the model's weight shapes."""


@dataclasses.dataclass
class Entry:
    """Deltas of some channels of weight array ``array``: ``values`` has the channels on
    axis 0 (``values[i]`` is channel ``channels[i]``), the rest of the array's shape after."""
    array: int
    channels: np.ndarray
    values: np.ndarray
    all_channels: bool = False


def channel_axis(shape) -> int:
    """The axis a sparse step updates by: a kernel's input channels (the training step's
    `dgst_tf.training.channel_importance.channel_axis`), the entries of a bias."""
    shape = tuple(shape)
    return 0 if len(shape) < 2 else kernel_channel_axis(types.SimpleNamespace(shape=shape))


def by_channel(array: np.ndarray) -> np.ndarray:
    """A view of ``array`` with its channels on axis 0 (a scalar as one channel)."""
    array = np.asarray(array)
    if array.ndim == 0:
        return array.reshape(1)
    return np.moveaxis(array, channel_axis(array.shape), 0)


def from_channels(values: np.ndarray, shape) -> np.ndarray:
    """The inverse of `by_channel`: channel-major ``values`` back in ``shape``."""
    if len(shape) == 0:
        return np.asarray(values).reshape(())
    return np.moveaxis(values, 0, channel_axis(shape))


def sparse_update(before, after) -> list[Entry]:
    """The float32 deltas of the channels that differ between two weight lists.

        entries = sparse_update(model_weights_received, model_weights_after_training)
    """
    if len(before) != len(after):
        raise PayloadError(f"weight lists differ in length: {len(before)} vs {len(after)}")
    entries = []
    for index, (old, new) in enumerate(zip(before, after)):
        old, new = np.asarray(old, np.float32), np.asarray(new, np.float32)
        if old.shape != new.shape:
            raise PayloadError(f"weight array {index}: shape {old.shape} became {new.shape}")
        delta = by_channel(new - old)
        changed = np.flatnonzero(np.any(by_channel(new != old).reshape(len(delta), -1),
                                        axis=1))
        if changed.size:
            entries.append(Entry(index, changed.astype(np.int64), delta[changed],
                                 all_channels=changed.size == len(delta)))
    return entries


def _int8(values: np.ndarray) -> tuple[float, np.ndarray]:
    peak = float(np.max(np.abs(values))) if values.size else 0.0
    scale = np.float32(peak / 127.0 if peak > 0 else 1.0)
    return scale, np.clip(np.round(values / scale), -127, 127).astype(np.int8)


def encode(entries: list[Entry], encoding: str = "int8") -> bytes:
    """The uplink payload of ``entries`` (see the module doc for the format).

        blob = encode(sparse_update(before, after), "fp16")
    """
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
    if len(entries) > _MAX_U16:
        raise PayloadError(f"{len(entries)} weight arrays: at most {_MAX_U16} fit the format")
    parts = [_HEADER.pack(MAGIC, VERSION, ENCODINGS.index(encoding), len(entries))]
    for entry in entries:
        count = len(entry.channels)
        if entry.array > _MAX_U16 or count > _MAX_U16 or (
                count and int(np.max(entry.channels)) > _MAX_U16):
            raise PayloadError(f"weight array {entry.array}: indices above {_MAX_U16}")
        parts.append(_ENTRY.pack(entry.array, _ALL_CHANNELS if entry.all_channels else 0,
                                 count))
        if not entry.all_channels:
            parts.append(np.asarray(entry.channels, "<u2").tobytes())
        values = np.asarray(entry.values, np.float32)
        if encoding == "int8":
            scale, values = _int8(values)
            parts.append(struct.pack("<f", scale))
        parts.append(np.ascontiguousarray(values, _DTYPES[encoding]).tobytes())
    return b"".join(parts)


def payload_bytes(entries: list[Entry], encoding: str = "int8") -> int:
    """``len(encode(entries, encoding))``, computed from the entries' sizes."""
    size = _HEADER.size
    for entry in entries:
        size += _ENTRY.size + (0 if entry.all_channels else 2 * len(entry.channels))
        size += (4 if encoding == "int8" else 0)
        size += int(np.size(entry.values)) * _DTYPES[encoding].itemsize
    return size


def decode(blob: bytes, shapes) -> list[Entry]:
    """The entries of a payload, values as float32, checked against the weight ``shapes``.

        entries = decode(blob, [w.shape for w in model.get_weights()])
    """
    shapes = [tuple(s) for s in shapes]
    view = memoryview(blob)
    magic, version, code, count = _unpack(_HEADER, view, 0, "header")
    if magic != MAGIC or version != VERSION or code >= len(ENCODINGS):
        raise PayloadError(f"not a DGSU v{VERSION} payload (magic {bytes(magic)!r}, version "
                           f"{version}, encoding code {code})")
    encoding, offset, entries = ENCODINGS[code], _HEADER.size, []
    for _ in range(count):
        entry, offset = _decode_entry(view, offset, encoding, shapes)
        entries.append(entry)
    if offset != len(blob):
        raise PayloadError(f"payload has {len(blob) - offset} trailing bytes")
    return entries


def _decode_entry(view, offset: int, encoding: str, shapes) -> tuple[Entry, int]:
    array, flags, count = _unpack(_ENTRY, view, offset, "entry header")
    offset += _ENTRY.size
    if array >= len(shapes):
        raise PayloadError(f"entry names weight array {array}; the model has {len(shapes)}")
    moved = by_channel(np.empty(shapes[array], np.uint8)).shape
    every = bool(flags & _ALL_CHANNELS)
    if every:
        channels = np.arange(moved[0])
        if count != moved[0]:
            raise PayloadError(f"weight array {array}: all-channel entry with {count} "
                               f"channels, the array has {moved[0]}")
    else:
        channels = _read(view, offset, "<u2", count, array).astype(np.int64)
        offset += 2 * count
        if count and (channels.max() >= moved[0] or len(set(channels.tolist())) != count):
            raise PayloadError(f"weight array {array}: channel indices out of range "
                               f"[0, {moved[0]}) or repeated: {channels.tolist()}")
    scale = 1.0
    if encoding == "int8":
        scale = float(_read(view, offset, "<f4", 1, array)[0])
        offset += 4
    size = count * int(np.prod(moved[1:], dtype=np.int64))
    raw = _read(view, offset, _DTYPES[encoding], size, array)
    offset += size * _DTYPES[encoding].itemsize
    values = raw.astype(np.float32) * np.float32(scale) if encoding == "int8" else (
        raw.astype(np.float32))
    return Entry(array, channels, values.reshape((count, *moved[1:])), every), offset


def _unpack(layout: struct.Struct, view, offset: int, what: str):
    if offset + layout.size > len(view):
        raise PayloadError(f"payload truncated in the {what} at byte {offset}")
    return layout.unpack_from(view, offset)


def _read(view, offset: int, dtype, count: int, array: int) -> np.ndarray:
    dtype = np.dtype(dtype)
    if offset + count * dtype.itemsize > len(view):
        raise PayloadError(f"payload truncated in weight array {array} at byte {offset}")
    return np.frombuffer(view, dtype, count, offset)


def dense_deltas(entries: list[Entry], shapes) -> list[np.ndarray]:
    """Full-size float32 delta arrays (zeros where nothing was sent).

        new_weights = [w + d for w, d in zip(weights, dense_deltas(entries, shapes))]
    """
    deltas = [np.zeros(s, np.float32) for s in shapes]
    for entry in entries:
        by_channel(deltas[entry.array])[entry.channels] = entry.values
    return deltas
