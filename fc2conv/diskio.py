"""File bytes moved and compared by the kernel: copy_file_range, early writeback, memcmp over mapped ranges.

Tensors whose bytes do not change (everything but a permuted kernel) are copied from the input file to
the output file without passing through Python, and proven equal by comparing the two mapped ranges at
memory speed. Each function falls back to plain reads and writes where the system lacks the call.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

__all__ = [
    "WRITEBACK_STEP",
    "ByteSpan",
    "MappedFile",
    "Writeback",
    "copy_span",
    "first_difference_at",
    "first_differing_byte",
    "pieces",
    "start_writeback",
]

# Bytes moved or compared per call at most. Each call returns to Python, which must then take the GIL
# back, and while torch is being imported on another thread that can wait for a long C call (loading
# its libraries): so no small calls. (The writer copies WRITEBACK_STEP at a time, to start writeback
# as it goes: a channels-last VGG16, torch importing beside the copy, converted no slower, measured.)
# A signal (Ctrl-C) still ends a copy early (the kernel returns what it copied so far, and Python's
# handler runs).
_COPY_STEP = 2**30
# copy_file_range and sendfile say "not here" with these: fall back to reading and writing.
_UNSUPPORTED = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF, errno.ETXTBSY}
_SYNC_FILE_RANGE_WRITE = 2
# Bytes written before their writeback is started: the disk then works while the next ones are copied
# (a 411 MB tensor started at once only after its copy made the copy and the flush take turns: 0.44 s
# for VGG16's 553 MB copy + fsync, against 0.30 s in 64 MB steps, measured).
WRITEBACK_STEP = 2**26


@dataclass(frozen=True)
class ByteSpan:
    """Where a tensor's bytes lie in a file: contiguous, row-major, little-endian, as safetensors stores them."""

    path: Path
    offset: int
    nbytes: int


def pieces(nbytes: int, step: int = WRITEBACK_STEP) -> list[tuple[int, int]]:
    """``(start, length)`` pieces of at most ``step`` bytes covering ``nbytes`` bytes (none if 0)."""
    return [(start, min(step, nbytes - start)) for start in range(0, nbytes, step)]


def copy_span(source_fd: int, source_offset: int, target_fd: int, target_offset: int, nbytes: int) -> None:
    """Copy ``nbytes`` from one file to another at the given offsets, in the kernel where it can.

    ``os.copy_file_range`` (no user-space copy; a reflink on filesystems that share blocks), else a
    ``pread``/``pwrite`` loop. Errors such as a full disk are raised as ``OSError``.
    """
    done = 0
    use_kernel = hasattr(os, "copy_file_range")
    while done < nbytes:
        step = min(_COPY_STEP, nbytes - done)
        if use_kernel:
            try:
                copied = os.copy_file_range(source_fd, target_fd, step, source_offset + done, target_offset + done)
            except OSError as exc:
                if exc.errno not in _UNSUPPORTED:
                    raise
                use_kernel = False
                continue
            if copied == 0:  # the source ended early: it changed under us
                raise OSError(errno.EIO, f"the input ended {nbytes - done} bytes early")
        else:
            copied = _copy_by_hand(source_fd, source_offset + done, target_fd, target_offset + done, step)
        done += copied


def _copy_by_hand(source_fd: int, source_offset: int, target_fd: int, target_offset: int, nbytes: int) -> int:
    data = os.pread(source_fd, nbytes, source_offset)
    if not data:
        raise OSError(errno.EIO, f"the input ended {nbytes} bytes early")
    view = memoryview(data)
    written = 0
    while written < len(view):
        written += os.pwrite(target_fd, view[written:], target_offset + written)
    return len(data)


@cache
def _libc() -> Any:
    """The C library's functions (memcmp, sync_file_range), loaded at first use: importing this is cheap."""
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True)  # the process's own symbols, the C library's among them
    except OSError:  # pragma: no cover - every supported system has one
        return None


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing these bytes to the disk now (Linux ``sync_file_range``).

    Without it, dirty pages wait for the final fsync; with it, the disk works while fc2conv copies and
    checks, and the fsync has less left to wait for. Durability still comes from the fsync: this call
    only starts writeback early, and is skipped where the system has no such call.
    """
    import ctypes

    function = getattr(_libc(), "sync_file_range", None)
    if function is None:
        return
    function.argtypes = (ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint)
    function(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)


class Writeback:
    """Writeback started on a helper thread as ranges are written (:func:`start_writeback`), never waited for.

    ``sync_file_range`` can wait for the disk's queue; the writer goes on meanwhile, and its fsync,
    which waits for every dirty page however it was started, is what makes the data durable. The
    helper has a descriptor of its own (a duplicate), closed after its last call: the writer may close
    its own at once.
    """

    def __init__(self, fd: int) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._fd = os.dup(fd)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fc2conv-writeback")
        self._finished = False

    def start(self, offset: int, nbytes: int) -> None:
        """Queue the writeback of ``nbytes`` written at ``offset``."""
        self._pool.submit(self._start, offset, nbytes)

    def _start(self, offset: int, nbytes: int) -> None:
        if not self._finished:  # after close(), the fsync is flushing the rest anyway
            start_writeback(self._fd, offset, nbytes)

    def close(self) -> None:
        """No more ranges: the helper skips what is queued, closes its descriptor and ends."""
        self._finished = True
        self._pool.submit(os.close, self._fd)
        self._pool.shutdown(wait=False)


class MappedFile:
    """A file mapped read-only (private), with the address of its first byte for ``memcmp``."""

    def __init__(self, path: Path) -> None:
        import ctypes
        import mmap

        with open(path, "rb") as f:
            self.size = os.fstat(f.fileno()).st_size
            # ACCESS_COPY: a private mapping, writable in name only, so ctypes can take its address;
            # nothing writes to it, so no page is ever copied.
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if self.size else None
        self._anchor = ctypes.c_char.from_buffer(self._map) if self._map is not None else None
        self.address = ctypes.addressof(self._anchor) if self._anchor is not None else 0

    def close(self) -> None:
        self._anchor = None  # the exported buffer must go before the map can close
        if self._map is not None:
            self._map.close()
            self._map = None


@contextlib.contextmanager
def mapped(*paths: Path) -> Iterator[dict[Path, MappedFile]]:
    """Map each distinct path once; unmap them all at the end."""
    maps: dict[Path, MappedFile] = {}
    try:
        for path in paths:
            if path not in maps:
                maps[path] = MappedFile(path)
        yield maps
    finally:
        for mapped_file in maps.values():
            mapped_file.close()


def _memcmp(a: int, b: int, nbytes: int) -> int:
    import ctypes

    libc = _libc()
    if libc is None:  # pragma: no cover - every supported system has a C library
        return 0 if ctypes.string_at(a, nbytes) == ctypes.string_at(b, nbytes) else 1
    return int(libc.memcmp(ctypes.c_void_p(a), ctypes.c_void_p(b), ctypes.c_size_t(nbytes)))


def first_differing_byte(first: MappedFile, a: ByteSpan, second: MappedFile, b: ByteSpan) -> int | None:
    """The offset (within the spans) of the first byte that differs between two equal-length spans, or None.

    The comparison is ``memcmp`` over the two mapped ranges, a large step at a time (ctypes releases
    the GIL, so other threads run meanwhile); a differing step is narrowed down by halves.
    """
    if a.nbytes != b.nbytes:
        raise ValueError(f"spans of {a.nbytes} and {b.nbytes} bytes")
    if a.offset + a.nbytes > first.size or b.offset + b.nbytes > second.size:
        raise ValueError("a span reaches past the end of its file")
    return first_difference_at(first.address + a.offset, second.address + b.offset, a.nbytes)


def first_difference_at(a: int, b: int, nbytes: int) -> int | None:
    """The offset of the first byte that differs between ``nbytes`` at two addresses, or None.

    ``memcmp`` a large step at a time (ctypes releases the GIL, so other threads run meanwhile); a
    differing step is narrowed down by halves. Both ranges must be readable memory (a mapped file, an
    array's buffer).
    """
    for start in range(0, nbytes, _COPY_STEP):
        length = min(_COPY_STEP, nbytes - start)
        if _memcmp(a + start, b + start, length) == 0:
            continue
        while length > 1:  # the first half that differs, down to one byte
            half = length // 2
            if _memcmp(a + start, b + start, half) == 0:
                start, length = start + half, length - half
            else:
                length = half
        return start
    return None
