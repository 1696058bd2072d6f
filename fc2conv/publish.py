"""The one way an output appears: written aside, flushed to disk, then renamed into place whole.

Every output of fc2conv (a safetensors file, a folder of shards, an exported program, an ONNX file)
goes through this module, so a path only ever holds its previous content (or nothing) or the
complete new output.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from fc2conv.errors import OutputError
from fc2conv.formats.safetensors import write_safetensors
from fc2conv.types import tensor_infos

if TYPE_CHECKING:
    import torch

__all__ = ["atomic_folder", "atomic_output", "fsync_dir", "fsync_file", "save_safetensors"]


@contextlib.contextmanager
def atomic_output(
    target: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    protect: Sequence[str | os.PathLike[str]] = (),
    named: bool = False,
) -> Iterator[Path]:
    """Yield a temporary path in ``target``'s folder; if the block succeeds, the file becomes ``target``.

    ``target`` only ever holds its previous content (or nothing) or the complete new file: the new
    file is written under another name and atomically renamed onto ``target`` at the end. Where the
    filesystem allows (Linux ``O_TMPFILE``), the temporary file has no name at all until it is
    complete, so even a process killed with SIGKILL leaves nothing behind; elsewhere, or when the
    writer needs a real name (``named``: exporters that write beside the path they are given), a
    hidden ``.<name>.*`` file is used and removed on any error or interrupt.

    Args:
        target: Final path.
        overwrite: Replace an existing regular file at ``target``; otherwise an existing file is an error.
        protect: Paths that must never be written (the inputs), even with ``overwrite``.
        named: Always use a named temporary file (ending in ``target``'s suffix).

    Raises:
        OutputError: the target is an input, exists without ``overwrite``, is not a regular file, or its
            folder is missing or not writable.
    """
    target = Path(target)
    _check_target(target, overwrite, protect)
    folder = target.parent
    anonymous = None if named else _open_anonymous(folder, target)
    if anonymous is not None:
        try:
            yield Path(f"/proc/self/fd/{anonymous}")
            _rename_into_place(_give_name(anonymous, folder, target), target)
        finally:
            os.close(anonymous)
    else:
        try:
            fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{target.suffix}", dir=folder)
        except OSError as exc:
            raise OutputError(f"{target}: cannot write in {folder} ({exc.strerror or exc})") from exc
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            yield tmp
            _rename_into_place(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
    fsync_dir(folder)


def _check_target(target: Path, overwrite: bool, protect: Sequence[str | os.PathLike[str]]) -> None:
    for other in protect:
        if _same_file(target, Path(other)):
            raise OutputError(f"{target}: refusing to write over the input file", remedy="choose_output")
    if target.is_dir():
        raise OutputError(f"{target}: is a directory, not a file", remedy="choose_output")
    if target.exists() or target.is_symlink():
        if not overwrite:
            raise OutputError(f"{target}: already exists", remedy="overwrite")
        if not target.is_file():
            raise OutputError(f"{target}: is not a regular file; refusing to replace it")
    if not target.parent.is_dir():
        raise OutputError(f"{target}: folder {target.parent} does not exist")


def _open_anonymous(folder: Path, target: Path) -> int | None:
    """An unnamed file in ``folder`` (O_TMPFILE), or None where the OS or filesystem has none."""
    flag = getattr(os, "O_TMPFILE", None)
    if flag is None or not Path("/proc/self/fd").is_dir():
        return None
    try:
        return os.open(folder, flag | os.O_RDWR, 0o644)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT):
            return None  # this filesystem cannot: fall back to a named temporary file
        raise OutputError(f"{target}: cannot write in {folder} ({exc.strerror or exc})") from exc


def _give_name(fd: int, folder: Path, target: Path) -> Path:
    """Link an unnamed file into ``folder`` under a hidden name, for the rename that publishes it."""
    # linkat(AT_SYMLINK_FOLLOW) on /proc/self/fd/N names the unnamed file; Python only uses linkat
    # (rather than link, which would not follow) when a dir_fd is given.
    folder_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        while True:
            staging = folder / f".{target.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
            try:
                os.link(f"/proc/self/fd/{fd}", staging.name, dst_dir_fd=folder_fd, follow_symlinks=True)
                return staging
            except FileExistsError:
                continue
            except OSError as exc:
                raise OutputError(f"{target}: cannot create the file ({exc.strerror or exc})") from exc
    finally:
        os.close(folder_fd)


def _rename_into_place(tmp: Path, target: Path) -> None:
    try:
        os.replace(tmp, target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise OutputError(f"{target}: cannot rename the finished file into place ({exc.strerror or exc})") from exc


@contextlib.contextmanager
def atomic_folder(
    folder: str | os.PathLike[str],
    names: Sequence[str],
    *,
    overwrite: bool = False,
    protect: str | os.PathLike[str] | None = None,
) -> Iterator[Path]:
    """Yield a staging folder; if the block succeeds, the files ``names`` are moved into ``folder``.

    ``folder`` is created if missing (its parent must exist) and removed again if the block fails.
    The staging folder is hidden inside ``folder`` and always removed. Files move in the order of
    ``names``: put the one that names the set (an index) last.

    Raises:
        OutputError: ``folder`` is a file or the protected input folder, its parent is missing, or one of
            ``names`` exists there without ``overwrite``.
    """
    folder = Path(folder)
    created = _prepare_folder(folder, names, overwrite, protect)
    staging = Path(tempfile.mkdtemp(prefix=".fc2conv-", dir=folder))
    published = False
    try:
        yield staging
        for name in names:
            os.replace(staging / name, folder / name)
        fsync_dir(folder)
        published = True
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not published:  # a failure or an interrupt leaves no new folder behind
            with contextlib.suppress(OSError):
                folder.rmdir()


def _prepare_folder(
    folder: Path, names: Sequence[str], overwrite: bool, protect: str | os.PathLike[str] | None
) -> bool:
    """Check (and create) the output folder; True if it was created here."""
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder}: is a file; a sharded checkpoint is written to a folder", remedy="choose_output")
    if folder.exists() and protect is not None and os.path.samefile(folder, protect):
        raise OutputError(f"{folder}: is the input folder; refusing to write over its shards", remedy="choose_output")
    if not folder.exists():
        if not folder.parent.is_dir():
            raise OutputError(f"{folder}: its parent folder {folder.parent} does not exist")
        try:
            folder.mkdir()
        except OSError as exc:
            raise OutputError(f"{folder}: cannot create the folder ({exc.strerror or exc})") from exc
        return True
    existing = [name for name in names if (folder / name).exists()]
    if existing and not overwrite:
        raise OutputError(f"{folder / existing[0]}: already exists", remedy="overwrite")
    return False


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Flush a written file's data to the disk (raises OutputError if the disk refuses)."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise OutputError(f"{path}: write failed ({exc.strerror or exc})") from exc


def fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (a rename into it) to the disk, where the filesystem allows."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_safetensors(
    state_dict: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    metadata: Mapping[str, str] | None = None,
    *,
    overwrite: bool = False,
) -> int:
    """Save a state dict as safetensors, atomically (temporary file, fsync, rename); returns its size.

    Example:
        >>> save_safetensors(convert_state_dict(sd, "256x4x4"), "head.conv.safetensors")  # doctest: +SKIP
    """
    with atomic_output(path, overwrite=overwrite) as tmp:
        return write_safetensors(tmp, tensor_infos(state_dict), state_dict.__getitem__, metadata)
