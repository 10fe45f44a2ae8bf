"""Read a legacy (pre-1.6, non-zip) PyTorch ``.pth`` state dict without PyTorch.

The legacy format is a sequence of records in one file:

1. a pickled magic number, a pickled protocol version and pickled ``sys_info``;
2. the main pickle: the state dict, whose tensors are rebuilt by
   ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`` and whose
   storages arrive as persistent ids
   ``('storage', storage_type, key, location, numel, view_metadata)``;
3. a pickled list of storage keys;
4. for each key: an int64 element count, then the raw little-endian data.

Only the handful of globals such a file needs may be unpickled (see ``_ALLOWED_GLOBALS``);
anything else raises ``UnsupportedCheckpointError`` naming the class, so a malicious
pickle cannot run code. Example::

    from dgst_tf.models.torch_checkpoint import load_state_dict
    state = load_state_dict("mobilenet_v2-b0353104.pth")
    state["features.0.0.weight"].shape   # (32, 3, 3, 3), float32, C-contiguous
"""
from __future__ import annotations

import collections
import dataclasses
import io
import os
import pickle
import struct

import numpy as np

__all__ = ["load_state_dict", "UnsupportedCheckpointError"]

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001

# torch storage class name -> NumPy dtype of one element (always little-endian here).
_STORAGE_DTYPES = {
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


class UnsupportedCheckpointError(ValueError):
    """The file is not a legacy PyTorch checkpoint this reader can load safely."""


@dataclasses.dataclass(frozen=True)
class _StorageType:
    """Stand-in for a ``torch.*Storage`` class: only its element type matters."""

    name: str
    dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class _StorageRef:
    """A storage named by a persistent id; its bytes come after the main pickle."""

    key: str  # key of the root storage, whose bytes are in the file
    dtype: np.dtype
    view: tuple[int, int] | None  # (element offset, element count) into the root storage


@dataclasses.dataclass(frozen=True)
class _PendingTensor:
    """Arguments of ``_rebuild_tensor_v2``, kept until the storage data has been read."""

    storage: _StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, *unused):
    return _PendingTensor(storage, int(storage_offset), tuple(size), tuple(stride))


def _allowed_globals() -> dict[tuple[str, str], object]:
    allowed = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    }
    for name, dtype in _STORAGE_DTYPES.items():
        allowed[("torch", name)] = _StorageType(name, dtype)
    return allowed


_ALLOWED_GLOBALS = _allowed_globals()


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals a legacy state dict needs."""

    def find_class(self, module, name):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsupportedCheckpointError(
                f"refusing to unpickle {module}.{name}: only plain state dicts of tensors "
                f"are supported (allowed: {sorted('.'.join(k) for k in _ALLOWED_GLOBALS)})"
            ) from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise UnsupportedCheckpointError(f"unexpected persistent id {pid!r}")
        _, storage_type, key, _location, _numel, view_metadata = pid
        if not isinstance(storage_type, _StorageType):
            raise UnsupportedCheckpointError(f"unexpected storage type {storage_type!r}")
        view = None
        if view_metadata is not None:  # (view key, element offset, element count)
            _view_key, view_offset, view_numel = view_metadata
            view = (int(view_offset), int(view_numel))
        return _StorageRef(str(key), storage_type.dtype, view)


def _unpickle(stream: io.BytesIO):
    return _RestrictedUnpickler(stream).load()


def _read_header(stream: io.BytesIO) -> None:
    magic = _unpickle(stream)
    if magic != LEGACY_MAGIC_NUMBER:
        raise UnsupportedCheckpointError("missing the legacy PyTorch magic number")
    protocol = _unpickle(stream)
    if protocol != LEGACY_PROTOCOL_VERSION:
        raise UnsupportedCheckpointError(f"unsupported protocol version {protocol!r}")
    sys_info = _unpickle(stream)
    if not (isinstance(sys_info, dict) and sys_info.get("little_endian", False)):
        raise UnsupportedCheckpointError("only little-endian checkpoints are supported")


def _read_storages(stream: io.BytesIO, keys: list[str],
                   refs: dict[str, _StorageRef]) -> dict[str, np.ndarray]:
    """Read the raw storages in file order; each is an int64 count then the data."""
    storages = {}
    for key in keys:
        (numel,) = struct.unpack("<q", _read_exactly(stream, 8))
        if key not in refs:
            raise UnsupportedCheckpointError(f"storage {key!r} is used by no tensor")
        dtype = refs[key].dtype
        data = _read_exactly(stream, numel * dtype.itemsize)
        storages[key] = np.frombuffer(data, dtype=dtype)
    return storages


def _read_exactly(stream: io.BytesIO, n: int) -> bytes:
    data = stream.read(n)
    if len(data) != n:
        raise UnsupportedCheckpointError("file ends in the middle of the tensor data")
    return data


def _materialise(tensor: _PendingTensor, storages: dict[str, np.ndarray]) -> np.ndarray:
    ref = tensor.storage
    flat = storages[ref.key]
    if ref.view is not None:
        view_offset, view_numel = ref.view
        flat = flat[view_offset:view_offset + view_numel]
    native = flat.dtype.newbyteorder("=")
    if 0 in tensor.size:
        return np.zeros(tensor.size, dtype=native)
    last = tensor.offset + sum((n - 1) * s for n, s in zip(tensor.size, tensor.stride))
    if tensor.offset < 0 or last >= flat.size:
        raise UnsupportedCheckpointError("a tensor points outside its storage")
    strided = np.lib.stride_tricks.as_strided(
        flat[tensor.offset:],
        shape=tensor.size,
        strides=tuple(s * flat.itemsize for s in tensor.stride),
        writeable=False,
    )
    return np.ascontiguousarray(strided, dtype=native)


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Load a legacy (non-zip) PyTorch state dict as ``{name: np.ndarray}``.

    Arrays are C-contiguous and keep the storage's element type (``float32`` for
    ``FloatStorage`` weights, ``int64`` for ``num_batches_tracked``)::

        state = load_state_dict(path)
        state["classifier.1.weight"].shape   # (1000, 1280)

    Raises ``ValueError`` (``UnsupportedCheckpointError``) naming ``path`` when the file is
    not such a checkpoint: zip-format (PyTorch >= 1.6) files, truncated files, or pickles
    that reference anything but tensors.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:4] == b"PK\x03\x04":
        raise UnsupportedCheckpointError(
            f"{path}: zip-format PyTorch checkpoint (torch >= 1.6); only the legacy "
            f"format is supported. Re-save it with "
            f"torch.save(obj, path, _use_new_zipfile_serialization=False)."
        )
    try:
        return _parse(io.BytesIO(raw))
    except UnsupportedCheckpointError as e:
        raise UnsupportedCheckpointError(f"{path}: not a readable legacy PyTorch "
                                         f"checkpoint: {e}") from e
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError,
            IndexError, AttributeError, struct.error) as e:
        raise UnsupportedCheckpointError(
            f"{path}: not a readable legacy PyTorch checkpoint (corrupt or truncated?): "
            f"{type(e).__name__}: {e}"
        ) from e


def _parse(stream: io.BytesIO) -> dict[str, np.ndarray]:
    _read_header(stream)
    state = _unpickle(stream)
    if not isinstance(state, dict):
        raise UnsupportedCheckpointError(
            f"expected a state dict, got {type(state).__name__}")
    pending = {}
    for name, value in state.items():
        if not isinstance(value, _PendingTensor):
            raise UnsupportedCheckpointError(f"entry {name!r} is not a tensor")
        pending[name] = value
    keys = _unpickle(stream)
    refs = {t.storage.key: t.storage for t in pending.values()}
    missing = set(refs) - set(keys)
    if missing:
        raise UnsupportedCheckpointError(f"storages {sorted(missing)} have no data")
    storages = _read_storages(stream, [str(k) for k in keys], refs)
    if stream.read(1):
        raise UnsupportedCheckpointError("unexpected bytes after the last storage")
    return {name: _materialise(t, storages) for name, t in pending.items()}
