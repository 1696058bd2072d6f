"""The records of a ``torch.save`` file read without torch: the pickle as data, each storage's bytes located.

A ``torch.save`` file is a zip whose ``<archive>/data.pkl`` pickle names storages, each stored
(uncompressed) as the record ``<archive>/data/<key>``. :func:`read_torch_zip` checks the archive (one
prefix, no duplicate names, sizes within the file, every read bounded by the declared and the actual
size), reads the pickle with :mod:`fc2conv.formats.pickle_data` and returns its object with
:class:`~fc2conv.formats.pickle_data.TensorRef` leaves and where each storage starts in the file.
It returns None when torch's own loader must decide (anything the data-only reader does not model),
and raises :class:`~fc2conv.formats.pickle_data.Refused` for what no loader should allocate.
"""

from __future__ import annotations

import os
import struct
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from fc2conv.formats.pickle_data import (
    MAX_PICKLE_BYTES,
    BoundedReader,
    Refused,
    StorageRef,
    Truncated,
    read_pickle,
    storage_ref,
)
from fc2conv.types import dtype_itemsize

__all__ = ["LEGACY_MAGIC", "TorchZip", "data_pickle", "read_torch_zip", "scan_legacy_pickles"]

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # the first pickle of a legacy (pre-zip) torch.save file
_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")
_LOCAL_SIGNATURE = 0x04034B50


@dataclass(frozen=True)
class TorchZip:
    """A ``torch.save`` zip read as data: its object, and the file offset of each storage's bytes."""

    value: Any
    storage_offsets: dict[str, int]  # storage key -> offset of its first byte in the file
    little_endian: bool


@contextmanager
def _archive(path: Path) -> Iterator[zipfile.ZipFile | None]:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError):
        yield None  # not a zip (or a broken one): torch's loader reports it
        return
    with archive:
        yield archive


def data_pickle(archive: zipfile.ZipFile) -> zipfile.ZipInfo | None:
    """The ``<archive>/data.pkl`` record that torch loads (the prefix is the first record's folder)."""
    infos = archive.infolist()
    if not infos:
        return None
    prefix = infos[0].filename.split("/", 1)[0]
    return next((i for i in infos if i.filename == f"{prefix}/data.pkl"), None)


def check_pickle_size(path: Path, info: zipfile.ZipInfo) -> None:
    """Refuse a pickle record whose declared size is beyond :data:`MAX_PICKLE_BYTES` (a zip bomb, say)."""
    if info.file_size > MAX_PICKLE_BYTES:
        raise Refused(
            f"has a pickle {info.filename} that declares {info.file_size} bytes ({info.compress_size} in the "
            f"file); a checkpoint's pickle holds names and shapes, and more than {MAX_PICKLE_BYTES} bytes is refused"
        )


def read_torch_zip(path: Path) -> TorchZip | None:
    """Read a ``torch.save`` zip as data, without torch; None when torch's own loader must decide.

    Raises:
        Refused: a pickle larger than :data:`MAX_PICKLE_BYTES`, a compressed or overlong storage, a
            storage larger than its record, or a construct that would allocate what the file does not hold.
    """
    size = path.stat().st_size
    with _archive(path) as archive:
        if archive is None:
            return None
        infos = archive.infolist()
        names = [i.filename for i in infos]
        pickle_info = data_pickle(archive)
        if pickle_info is None or len(set(names)) != len(names):
            return None
        check_pickle_size(path, pickle_info)
        prefix = pickle_info.filename[: -len("data.pkl")]
        records = {
            i.filename[len(prefix) + len("data/") :]: i for i in infos if i.filename.startswith(f"{prefix}data/")
        }
        with open(path, "rb") as raw:
            offsets = {key: _record_offset(raw, info, size) for key, info in records.items()}

        def check(ref: StorageRef) -> None:
            _check_storage(ref, records, offsets)

        try:
            with archive.open(pickle_info) as stream:
                data = read_pickle(BoundedReader(stream, pickle_info.file_size), lambda pid: storage_ref(pid, check))
            byteorder = records_text(archive, f"{prefix}byteorder")
        except Refused:
            raise
        except Exception:  # noqa: BLE001 - truncated, corrupt (zlib, CRC), unknown opcodes: torch says why
            return None
        if not data.modelled:
            return None
    used = {key: offset for key in data.storages if (offset := offsets.get(key)) is not None}
    return TorchZip(data.value, used, byteorder in (None, "little"))


def records_text(archive: zipfile.ZipFile, name: str) -> str | None:
    """A small text record (``byteorder``), read with a bound; None if absent."""
    try:
        info = archive.getinfo(name)
    except KeyError:
        return None
    with archive.open(info) as stream:
        return BoundedReader(stream, 64).read().decode("ascii", "replace").strip()


def _record_offset(raw: IO[bytes], info: zipfile.ZipInfo, file_size: int) -> int | None:
    """Where a stored record's bytes start in the file (after its local header); None if compressed or odd."""
    if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
        return None
    if not 0 <= info.header_offset <= file_size:  # a corrupt directory: seek() would refuse a huge offset
        return None
    raw.seek(info.header_offset)
    header = raw.read(_LOCAL_HEADER.size)
    if len(header) != _LOCAL_HEADER.size:
        return None
    fields = _LOCAL_HEADER.unpack(header)
    if fields[0] != _LOCAL_SIGNATURE:
        return None
    start = info.header_offset + _LOCAL_HEADER.size + fields[9] + fields[10]
    return start if start + info.file_size <= file_size else None


def _check_storage(ref: StorageRef, records: dict[str, zipfile.ZipInfo], offsets: dict[str, int | None]) -> None:
    """A storage must be a stored record of the file holding at least the bytes it declares."""
    info = records.get(ref.key)
    if info is None:
        raise Refused(f"names storage {ref.key!r}, which the file does not hold")
    if offsets.get(ref.key) is None:
        raise Refused(
            f"has a storage record {info.filename} that is compressed or lies outside the file; torch.save "
            "stores tensor data uncompressed, and a tensor must be backed by bytes of the file"
        )
    itemsize = dtype_itemsize(ref.dtype) or 1
    if ref.numel * itemsize > info.file_size:
        raise Refused(
            f"has a storage {ref.key!r} that declares {ref.numel * itemsize} bytes, but its record holds "
            f"{info.file_size}"
        )


def scan_legacy_pickles(path: Path) -> None:
    """Read the pickles at the start of a non-zip file as data, as torch's legacy loader would unpickle them.

    Only a guard: it refuses what would make torch allocate memory the file does not hold (a
    ``bytearray`` of a declared size, a tensor built from sizes, a storage larger than the file)
    before torch reads the file; everything else is left to torch.

    Raises:
        Refused: naming the construct.
    """
    size = os.stat(path).st_size

    def check(ref: StorageRef) -> None:
        nbytes = ref.numel * (dtype_itemsize(ref.dtype) or 1)
        if nbytes > size:
            raise Refused(
                f"has a storage {ref.key!r} that declares {nbytes} bytes, more than the whole {size}-byte file"
            )

    with open(path, "rb") as raw:
        stream = BoundedReader(raw, size)
        # magic number, protocol, system info, the object, the storage keys: then raw storage data.
        for index in range(5):
            try:
                data = read_pickle(stream, lambda pid: storage_ref(pid, check))
            except Truncated:
                return  # torch's reader stops there as well
            if index == 0 and data.value != LEGACY_MAGIC:
                return  # not torch's legacy format: torch unpickles this one object, then gives up
