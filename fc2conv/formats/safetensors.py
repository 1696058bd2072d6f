"""Safetensors: a validated header (no torch needed), lazily mapped tensors, and a streaming writer."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import struct
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from fc2conv.diskio import ByteSpan, Writeback, copy_span, pieces
from fc2conv.errors import CheckpointError, OutputError
from fc2conv.formats.base import Listing, ReadOptions, Source, natural_key, open_regular
from fc2conv.types import TensorInfo, dtype_itemsize, dtype_name

if TYPE_CHECKING:
    import numpy as np
    import torch

__all__ = [
    "READER",
    "SUFFIX",
    "SafetensorsHeader",
    "in_name_order",
    "open_safetensors",
    "read_safetensors_header",
    "write_safetensors",
]

SUFFIX = ".safetensors"

# safetensors dtype code <-> fc2conv/torch dtype name, and the size of one element in bytes.
_DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U64": ("uint64", 8),
    "U32": ("uint32", 4),
    "U16": ("uint16", 2),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
    "C64": ("complex64", 8),
}
_CODES = {name: code for code, (name, _) in _DTYPES.items()}
_MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit


@dataclass(frozen=True)
class SafetensorsHeader:
    """The parsed, validated header of a safetensors file."""

    infos: list[TensorInfo]
    metadata: dict[str, str]
    data_start: int
    offsets: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (begin, end) in the data

    def spans(self, path: Path) -> dict[str, ByteSpan]:
        """Where each tensor's bytes lie in the file (safetensors data is contiguous and little-endian)."""
        return {
            name: ByteSpan(path, self.data_start + begin, end - begin) for name, (begin, end) in self.offsets.items()
        }


def read_safetensors_header(path: str | os.PathLike[str]) -> SafetensorsHeader:
    """Read and validate only the header of a safetensors file; no tensor data is read.

    Declared shapes, dtypes and offsets are checked against each other and the file size, so a
    corrupt or hostile header is an error here, before anything is allocated.

    Raises:
        CheckpointError: naming the file and what is wrong with it.
    """
    path = Path(path)
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: not a safetensors file ({size} bytes, too short for a header)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(_MAX_HEADER_BYTES, size - 8):
            raise CheckpointError(
                f"{path}: not a valid safetensors file (header length {header_len} is past the end "
                f"of the {size}-byte file)"
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw, object_pairs_hook=_no_duplicate_keys)
    except RecursionError as exc:
        raise CheckpointError(f"{path}: safetensors header is not valid JSON (nested too deeply)") from exc
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path}: safetensors header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: safetensors __metadata__ must map strings to strings")
    data_start = 8 + header_len
    infos, spans = [], []
    for name, entry in header.items():
        info, begin, end = _parse_entry(path, name, entry, size - data_start)
        infos.append(info)
        spans.append((begin, end, name))
    spans.sort()
    for (_, end_a, name_a), (begin_b, _, name_b) in zip(spans, spans[1:], strict=False):
        if begin_b < end_a:
            raise CheckpointError(f"{path}: tensors {name_a!r} and {name_b!r} overlap in the data section")
    _check_covered(path, spans, size - data_start)
    offsets = {name: (begin, end) for begin, end, name in spans}
    return SafetensorsHeader(infos, dict(metadata), data_start, offsets)


def _check_covered(path: Path, spans: list[tuple[int, int, str]], data_len: int) -> None:
    """The tensors must fill the data section end to end, as safetensors' own reader demands."""
    position = 0
    for begin, end, name in spans:
        if begin != position:
            raise CheckpointError(
                f"{path}: not a valid safetensors file (tensor {name!r} starts at byte {begin} of the data "
                f"section, where {position} was expected)"
            )
        position = end
    if position != data_len:
        raise CheckpointError(
            f"{path}: not a valid safetensors file (its tensors fill {position} of the {data_len}-byte data section)"
        )


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate tensor name {key!r}")
        result[key] = value
    return result


def _parse_entry(path: Path, name: str, entry: Any, data_len: int) -> tuple[TensorInfo, int, int]:
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where}: header entry is not an object")
    code, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(code, str) or code not in _DTYPES:
        raise CheckpointError(f"{where}: unknown dtype {code!r}")
    if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
        raise CheckpointError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1] <= data_len
    ):
        raise CheckpointError(f"{where}: data offsets {offsets!r} are outside the {data_len}-byte data section")
    name_dtype, itemsize = _DTYPES[code]
    numel = 1
    for s in shape:
        numel *= s
    if numel * itemsize != offsets[1] - offsets[0]:
        raise CheckpointError(
            f"{where}: shape {shape} of {code} needs {numel * itemsize} bytes, "
            f"but its offsets span {offsets[1] - offsets[0]}"
        )
    return TensorInfo(name, tuple(shape), name_dtype), offsets[0], offsets[1]


def in_name_order(infos: list[TensorInfo]) -> list[TensorInfo]:
    """The header keeps no module order (writers sort by dtype and name): name order, numbers as numbers.

    So ``features.2`` comes before ``features.10``.
    """
    return sorted(infos, key=lambda info: natural_key(info.name))


def open_safetensors(path: str | os.PathLike[str]) -> Source:
    """Open a safetensors file (whatever its suffix) after validating its header; tensors map on access.

    Opening needs no torch: the tensors' byte spans come from the header, and the file is handed to
    safetensors (memory-mapped, which imports torch) when a first tensor is read.
    """
    path = Path(path)
    header = read_safetensors_header(path)
    listing = _listing(path, header)
    tensors = _LazyTensors(path, [i.name for i in listing.infos])
    spans = header.spans(path) if sys.byteorder == "little" else {}
    return Source(listing.path, listing.format, listing.infos, listing.metadata, [], tensors=tensors, spans=spans)


def _listing(path: Path, header: SafetensorsHeader | None = None) -> Listing:
    header = header or read_safetensors_header(path)
    infos = in_name_order(header.infos)
    note = f"safetensors: {len(infos)} tensors, taken in name order (the format keeps no module order)"
    return Listing(path, "safetensors", infos, header.metadata, [note])


def safetensors_handle(path: Path) -> Any:
    """safetensors' own memory-mapped reader of ``path`` (imports torch)."""
    from fc2conv.preload import wait_for_torch

    wait_for_torch()  # safetensors imports torch: not beside a background import of it
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt")
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: cannot open as safetensors ({exc})") from exc


class _LazyTensors(Mapping[str, "torch.Tensor"]):
    """A read-only name -> tensor mapping over a safetensors file; the file is opened at the first access."""

    def __init__(self, path: Path, names: Sequence[str]) -> None:
        self._path = path
        self._handle: Any = None
        self._names = list(names)
        self._known = set(names)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._known:
            raise KeyError(name)
        if self._handle is None:
            self._handle = safetensors_handle(self._path)
        return self._handle.get_tensor(name)

    def __contains__(self, name: object) -> bool:  # by name: Mapping's default would load the tensor (and torch)
        return name in self._known

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


class _SafetensorsReader:
    """Reader for ``*.safetensors`` files: the listing is the header alone (no torch import)."""

    format = "safetensors"

    def claims(self, path: Path) -> bool:
        return path.suffix == SUFFIX

    def listing(self, path: Path, options: ReadOptions) -> Listing:
        return _listing(path)

    def open(self, path: Path, options: ReadOptions) -> Source:
        return open_safetensors(path)


# The data section starts at a multiple of this (safetensors' writers pad the header to it).
_DATA_ALIGNMENT = 8
_PAGE = 4096

READER = _SafetensorsReader()


# --- writing ------------------------------------------------------------------------------------


def write_safetensors(
    path: str | os.PathLike[str],
    infos: Sequence[TensorInfo],
    fetch: Callable[[str], torch.Tensor | np.ndarray],
    metadata: Mapping[str, str] | None = None,
    *,
    sync: bool = True,
    on_tensor: Callable[[TensorInfo], None] | None = None,
    spans: Mapping[str, ByteSpan] | None = None,
) -> int:
    """Write a safetensors file tensor by tensor: only one tensor is in memory at a time.

    The header is computed from ``infos`` first. A tensor listed in ``spans`` (its exact bytes, found
    in an input file) is copied from there by the kernel, without torch; every other tensor is
    fetched, checked against its declared shape and dtype, and its bytes written straight from its
    memory. Writeback to the disk starts as the bytes are written (every 64 MB); the file is fsynced
    unless ``sync`` is false (the caller then syncs before publishing it), and its header is re-read
    and validated as the last step.

    Args:
        path: File to write (use :func:`fc2conv.publish.atomic_output` for a temporary path).
        infos: Name, shape and dtype of every tensor, in the order to write them (those copied from
            ``spans`` first, in the order their bytes lie there: :func:`_file_order`).
        fetch: Returns the tensor for a name (e.g. a memory-mapped one, converted on the fly), or a
            numpy array of its elements (bfloat16 as its bits).
        metadata: String metadata stored under ``__metadata__``.
        sync: fsync the file before returning.
        on_tensor: Called after each tensor is written (for progress reports).
        spans: Name -> where that tensor's bytes (as they are to be written) lie in an input file.

    Returns:
        The size of the written file in bytes.

    Raises:
        OutputError: a dtype safetensors cannot store, or a write failure (disk full, ...).
    """
    if sys.byteorder != "little":  # pragma: no cover - safetensors stores little-endian data
        raise OutputError("writing safetensors needs a little-endian machine")
    spans = spans or {}
    infos = _file_order(infos, spans)
    raw = _header_bytes(infos, metadata, spans)
    try:
        # Not opened with O_TRUNC: on ext4, a file truncated to zero and rewritten is flushed on close
        # (auto_da_alloc), which made writing ~2.5x slower. Any tail of an older file is cut below.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        with contextlib.ExitStack() as inputs:
            inputs.callback(os.close, fd)
            # Writeback is started on another thread as the bytes are written: the call can wait for
            # the disk's queue, and the copy need not wait with it (the fsync waits for it all).
            writeback = Writeback(fd)
            inputs.callback(writeback.close)
            position = _pwrite_all(fd, struct.pack("<Q", len(raw)) + raw, 0)
            sources = _InputFiles(inputs)
            for info in infos:
                span = spans.get(info.name)
                # A piece at a time, its writeback started at once: the disk writes while the rest is written.
                if span is not None and span.nbytes == info.nbytes:
                    for start, step in pieces(span.nbytes):
                        copy_span(sources.fd(span.path), span.offset + start, fd, position + start, step)
                        writeback.start(position + start, step)
                else:
                    data, _owner = _tensor_bytes(info, fetch(info.name))  # _owner keeps the memory alive
                    for start, step in pieces(len(data)):
                        _pwrite_all(fd, data[start : start + step], position + start)
                        writeback.start(position + start, step)
                position += info.nbytes
                if on_tensor is not None:
                    on_tensor(info)
            if os.fstat(fd).st_size > position:
                os.ftruncate(fd, position)
            if sync:
                os.fsync(fd)
    except OSError as exc:
        raise OutputError(f"{path}: write failed ({exc.strerror or exc})") from exc
    written = read_safetensors_header(path)
    if [(i.name, i.shape, i.dtype) for i in written.infos] != [(i.name, i.shape, i.dtype) for i in infos]:
        raise OutputError(f"{path}: the written header does not read back as written")
    return Path(path).stat().st_size


class _InputFiles:
    """Input files opened read-only once each, closed with the write."""

    def __init__(self, stack: contextlib.ExitStack) -> None:
        self._stack = stack
        self._fds: dict[Path, int] = {}

    def fd(self, path: Path) -> int:
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
            self._stack.callback(os.close, self._fds[path])
        return self._fds[path]


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> int:
    """Write all of ``data`` at ``offset``; returns the offset after it."""
    view = memoryview(data)
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)
    return offset + done


def _file_order(infos: Sequence[TensorInfo], spans: Mapping[str, ByteSpan]) -> list[TensorInfo]:
    """Tensors copied from input files first, in the order their bytes lie there; the others after, as given.

    A safetensors file's tensor order is not part of its meaning (readers look tensors up by name),
    so the copy reads each input front to back and, with :func:`_page_padding`, keeps its page offsets.
    """

    def key(item: tuple[int, TensorInfo]) -> tuple[int, str, int, int]:
        index, info = item
        span = spans.get(info.name)
        if span is None or span.nbytes != info.nbytes:
            return (1, "", 0, index)
        return (0, str(span.path), span.offset, index)

    return [info for _, info in sorted(enumerate(infos), key=key)]


def _page_padding(infos: Sequence[TensorInfo], spans: Mapping[str, ByteSpan], header_end: int) -> int:
    """Spaces after the header (which safetensors allows) so that most copied bytes keep their place in a page.

    A copy whose source and target offsets differ within a page is ~1.5x slower in the kernel (VGG16's
    553 MB: 0.43 s against 0.28 s, copy + fsync, measured). The tensors' bytes are contiguous, so one
    padding fixes the offset of every tensor modulo the page: the one that aligns the most bytes is
    chosen, keeping the data section 8-byte aligned.
    """
    aligned_bytes: dict[int, int] = {}
    offset = 0
    for info in infos:
        span = spans.get(info.name)
        if span is not None and span.nbytes == info.nbytes and info.nbytes:
            start = (span.offset - offset) % _PAGE  # where the data section must start, modulo the page
            if start % _DATA_ALIGNMENT == 0:
                aligned_bytes[start] = aligned_bytes.get(start, 0) + info.nbytes
        offset += info.nbytes
    if not aligned_bytes:
        return -header_end % _DATA_ALIGNMENT
    best = max(aligned_bytes, key=lambda start: (aligned_bytes[start], -start))
    return (best - header_end) % _PAGE


def _header_bytes(
    infos: Sequence[TensorInfo], metadata: Mapping[str, str] | None, spans: Mapping[str, ByteSpan] | None = None
) -> bytes:
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for info in infos:
        code = _CODES.get(info.dtype)
        if code is None:
            raise OutputError(
                f"{info.name}: dtype {info.dtype} has no safetensors equivalent, so it cannot be written "
                "(dequantize or drop that tensor first)"
            )
        nbytes = info.numel * _DTYPES[code][1]
        header[info.name] = {"dtype": code, "shape": list(info.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    # The data section starts 8-byte aligned, at the page offset that suits the copy.
    return raw + b" " * _page_padding(infos, spans or {}, 8 + len(raw))


def _tensor_bytes(info: TensorInfo, tensor: torch.Tensor | np.ndarray) -> tuple[memoryview, object]:
    """The bytes of a tensor (or a numpy array) declared as ``info``, and the object that holds them."""
    if not hasattr(tensor, "data_ptr"):  # a numpy array: its elements' bytes as they are
        return _array_bytes(info, tensor), tensor
    tensor = cast("torch.Tensor", tensor)
    if tuple(tensor.shape) != info.shape or dtype_name(tensor.dtype) != info.dtype:
        raise OutputError(
            f"{info.name}: got {dtype_name(tensor.dtype)}{tuple(tensor.shape)}, declared {info.dtype}{info.shape}"
        )
    tensor = tensor.contiguous()
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes == 0:
        return memoryview(b""), tensor
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    # Zero-copy view of the tensor's bytes, valid while `tensor` is referenced (the caller holds it).
    return memoryview((ctypes.c_ubyte * nbytes).from_address(tensor.data_ptr())).cast("B"), tensor


def _array_bytes(info: TensorInfo, array: np.ndarray) -> memoryview:
    """A C-contiguous numpy array of ``info``'s shape and element size (its dtype may stand for another)."""
    if tuple(array.shape) != info.shape or array.itemsize != dtype_itemsize(info.dtype) or not array.flags.c_contiguous:
        raise OutputError(
            f"{info.name}: got an array {array.dtype}{tuple(array.shape)}, declared {info.dtype}{info.shape}"
        )
    return array.data.cast("B") if array.size else memoryview(b"")
