"""A Keras file's HDF5 side, read safely: the weights file, its datasets and attributes, its errors.

The weights are an HDF5 file on disk (legacy ``.h5``) or a member of the ``.keras`` zip, opened in
place without extracting it. A dataset is checked before it is read, as Keras's own loader does:
no soft or external links, no external or virtual storage, no shape that declares far more bytes
than the file stores. Whatever h5py, zipfile or json raise becomes one :class:`CheckpointError` line
naming the file (:func:`reading`).
"""

from __future__ import annotations

import io
import json
import math
import struct
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fc2conv.errors import CheckpointError, DependencyError, Fc2ConvError

if TYPE_CHECKING:
    import h5py
    import torch

__all__ = [
    "WEIGHTS_H5",
    "attr_text",
    "list_attr",
    "open_weights",
    "read_dataset",
    "reading",
    "safe_dataset",
    "torch_dtype_name",
]

WEIGHTS_H5 = "model.weights.h5"  # the weights' member of a .keras zip
# A dataset declaring far more bytes than it stores is a shape/decompression bomb (as Keras refuses).
_BOMB_FLOOR_BYTES = 2**32
_BOMB_MAX_EXPANSION = 1000

_READ_ERRORS = (
    OSError, KeyError, ValueError, TypeError, IndexError, RuntimeError, EOFError, zlib.error,
    zipfile.BadZipFile, json.JSONDecodeError, UnicodeDecodeError,
)  # fmt: skip


@contextmanager
def reading(path: Path, what: str) -> Iterator[None]:
    """Turn whatever h5py, zipfile or json raise into one CheckpointError line naming the file.

    ``what`` says what could not be done (``"cannot read the file"``); the library's first line
    follows in brackets. fc2conv's own errors pass through unchanged.
    """
    try:
        yield
    except Fc2ConvError:
        raise
    except _READ_ERRORS as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: {what} ({reason})") from exc


@contextmanager
def open_weights(path: Path, in_zip: bool) -> Iterator[h5py.File]:
    """The HDF5 weights, read-only: ``path`` itself, or the ``model.weights.h5`` inside the zip at ``path``.

    Raises:
        DependencyError: h5py is not installed (the ``keras`` extra).
    """
    try:
        import h5py
    except ImportError as exc:
        raise DependencyError(f"reading a Keras model needs the h5py package ({exc})", extra="keras") from exc
    if in_zip:
        with zipfile.ZipFile(path) as archive:
            member = _stored_member(path, archive.getinfo(WEIGHTS_H5)) or archive.open(WEIGHTS_H5)
            with member, h5py.File(member, "r") as h5:
                yield h5
    else:
        with h5py.File(path, "r") as h5:
            yield h5


def _stored_member(path: Path, info: zipfile.ZipInfo) -> io.RawIOBase | None:
    """A zip member stored uncompressed (as Keras writes its weights), read in place; None if compressed.

    zipfile's own member object re-reads and re-checksums from the start on every backward seek, and
    HDF5 seeks for every dataset: on a 150 MB model that is most of the time. The stored bytes are
    contiguous in the file, so seeks and reads can go straight to it.
    """
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        header = f.read(30)
    if len(header) < 30 or header[:4] != b"PK\x03\x04":
        raise zipfile.BadZipFile(f"no local header for {info.filename}")
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    return _Window(path, info.header_offset + 30 + name_length + extra_length, info.file_size)


class _Window(io.RawIOBase):
    """``size`` bytes of a file from ``start``, as a read-only, seekable file of their own."""

    def __init__(self, path: Path, start: int, size: int) -> None:
        super().__init__()
        self._file = open(path, "rb")  # noqa: SIM115 - closed with the window
        self._start, self._size, self._position = start, size, 0
        if self._file.seek(0, 2) < start + size:
            self._file.close()
            raise zipfile.BadZipFile(f"{path}: the weights member runs past the end of the file")

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._position, 2: self._size}[whence]
        self._position = max(0, base + offset)
        return self._position

    def readinto(self, buffer: Any) -> int:
        wanted = min(len(buffer), max(0, self._size - self._position))
        self._file.seek(self._start + self._position)
        count = self._file.readinto(memoryview(buffer)[:wanted]) or 0
        self._position += count
        return count

    def close(self) -> None:
        self._file.close()
        super().close()


def safe_dataset(h5: h5py.File, path: str) -> h5py.Dataset:
    """The dataset at ``path``, refusing links, external or virtual storage and shape bombs (as Keras does).

    Raises:
        KeyError, ValueError: what is wrong with the path or the dataset (worded by :func:`reading`).
    """
    import h5py

    node: Any = h5
    parts = path.split("/")
    for index, part in enumerate(parts):
        if not part or part not in node:
            raise KeyError(f"no {path!r} in the weights file")
        link = node.get(part, getlink=True)
        if isinstance(link, (h5py.SoftLink, h5py.ExternalLink)):
            raise ValueError(f"{path!r} is a {type(link).__name__}, which fc2conv does not follow")
        node = node[part]
        if index < len(parts) - 1 and not isinstance(node, h5py.Group):
            raise ValueError(f"{'/'.join(parts[: index + 1])!r} is not a group")
    if not isinstance(node, h5py.Dataset):
        raise ValueError(f"{path!r} is not a dataset")
    if node.external:
        raise ValueError(f"{path!r} keeps its data in an external file")
    if node.is_virtual:
        raise ValueError(f"{path!r} is a virtual dataset")
    declared = math.prod(node.shape or ()) * node.dtype.itemsize
    stored = node.id.get_storage_size()
    if declared > _BOMB_FLOOR_BYTES and declared > _BOMB_MAX_EXPANSION * stored:
        raise ValueError(f"{path!r} declares {declared} bytes but stores {stored}")
    return node


def read_dataset(h5: h5py.File, path: str, dtype: str) -> torch.Tensor:
    """The dataset at ``path`` as a tensor, as stored; ``dtype`` is its :func:`torch_dtype_name`."""
    import numpy as np
    import torch

    dataset = safe_dataset(h5, path)
    if dtype == "bfloat16":  # stored opaque, 2 bytes each (keras's H5IOStore)
        raw = np.ascontiguousarray(np.asarray(dataset[()])).view(np.uint16)
        return torch.from_numpy(raw.copy()).view(torch.bfloat16)
    array = np.asarray(dataset[()])
    if not array.flags.writeable:
        array = array.copy()
    return torch.from_numpy(np.ascontiguousarray(array))


def torch_dtype_name(dataset: h5py.Dataset) -> str:
    """The dtype the tensor will have (``"float32"``, ``"bfloat16"``, ...), or ``"unsupported (...)"``."""
    import numpy as np

    stored = dataset.attrs.get("dtype")
    if isinstance(stored, bytes):
        stored = stored.decode("utf8", "replace")
    if stored == "bfloat16" and dataset.dtype.itemsize == 2:
        return "bfloat16"
    kind = np.dtype(dataset.dtype)
    if kind.kind in "fiub" and kind.byteorder in "=<|":
        return "bool" if kind.kind == "b" else str(kind)
    return f"unsupported ({kind})"


def attr_text(attrs: Any, name: str) -> str | None:
    """An HDF5 attribute as text (h5py gives bytes or str, by how it was written); None if absent."""
    value = attrs.get(name)
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf8")
    return str(value)


def list_attr(group: h5py.Group, name: str) -> list[str]:
    """load_attributes_from_hdf5_group: the attribute, or its chunks ``<name>0``, ``<name>1``, ..."""
    values: list[Any] = []
    if name in group.attrs:
        values = list(group.attrs[name])
    else:
        chunk = 0
        while f"{name}{chunk}" in group.attrs:
            values.extend(group.attrs[f"{name}{chunk}"])
            chunk += 1
    return [v.decode("utf8") if isinstance(v, bytes) else str(v) for v in values]
