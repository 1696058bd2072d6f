"""The one way an output appears: written unnamed (or hidden), flushed, checked, then put in place whole.

Every output of fc2conv (a safetensors file, a folder of shards, an exported program, an ONNX file)
goes through this module, so a path only ever holds its previous content (or nothing) or the
complete new output. Without ``overwrite`` nothing is ever replaced, not even by a run started at
the same moment (the file is linked, or renamed with ``RENAME_NOREPLACE``, under its name). Every
output gets one mode: the strictest of the default (umask), the inputs' and the replaced output's.
:func:`published` lists what this process has put in place, so an interrupted run can say what it
wrote; SIGINT and SIGTERM wait while an output is being put in place, so that list is never behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import re
import shutil
import signal
import stat
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fc2conv.errors import CheckpointError, OutputError
from fc2conv.formats.safetensors import write_safetensors
from fc2conv.types import tensor_infos

if TYPE_CHECKING:
    import torch

__all__ = [
    "FolderOutput",
    "atomic_folder",
    "atomic_output",
    "file_path",
    "fsync_dir",
    "fsync_file",
    "published",
    "save_safetensors",
]

# What this process has put in place, in order (read by the CLI to report an interrupt honestly).
_PUBLISHED: list[Path] = []
# Hidden names of files and folders being built, beside the output; the pid tells a live run's from
# the leftovers of one killed with SIGKILL, which the next run writing there removes.
_STAGING = re.compile(r"\.fc2conv-(\d+)-[0-9a-f]{8}\.tmp")
_OLD_STAGING = re.compile(r"\.fc2conv-[a-z0-9_]{8}")  # staging folders inside an output, before version 1.1
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2  # renameat2(2) flags (Linux)
_AT_FDCWD = -100


def published() -> tuple[Path, ...]:
    """Every output this process has put in place so far, in order."""
    return tuple(_PUBLISHED)


def file_path(path: str | os.PathLike[str]) -> Path:
    """An output file's path; one ending in ``/`` names a folder (``Path`` would drop the slash).

    Raises:
        OutputError: the path ends with a separator.
    """
    text = os.fspath(path)
    if text.endswith("/") or text.endswith(os.sep):
        raise OutputError(f"{text}: ends with '/', so it names a folder; the output is a file", remedy="choose_output")
    return Path(text)


@contextlib.contextmanager
def atomic_output(
    target: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    protect: Sequence[str | os.PathLike[str]] = (),
    named: bool = False,
) -> Iterator[Path]:
    """Yield a temporary path in ``target``'s folder; if the block succeeds, the file becomes ``target``.

    ``target`` only ever holds its previous content (or nothing) or the complete new file. Where the
    filesystem allows (Linux ``O_TMPFILE``), the file has no name at all until it is complete, and is
    then linked under ``target`` (which fails if ``target`` appeared meanwhile, unless ``overwrite``),
    so even SIGKILL leaves nothing behind. Elsewhere, or when the writer needs a real name (``named``:
    exporters that write beside the path they are given), a hidden ``.fc2conv-<pid>-*.tmp`` file is
    used, removed on any error or interrupt (and, after SIGKILL, by the next run writing there).
    Errors name ``target``, never the temporary file. A link at ``target`` is followed: the file it
    names is the one replaced.

    Args:
        target: Final path.
        overwrite: Replace an existing regular file at ``target``; otherwise an existing file is an error.
        protect: The inputs: never written, even with ``overwrite``; their modes bound the output's.
        named: Always use a named temporary file (ending in ``target``'s suffix).

    Raises:
        OutputError: the target is an input, exists without ``overwrite``, is not a regular file, or its
            folder is missing or not writable.
    """
    target = _file_target(file_path(target), overwrite, protect)
    folder = target.parent
    _clear_stale(folder)
    mode = _output_mode([*map(Path, protect), target])
    descriptor = None if named else _open_anonymous(folder, target)
    if descriptor is None:
        yield from _named_output(folder, target, mode, overwrite)
    else:
        yield from _anonymous_output(descriptor, folder, target, mode, overwrite)
    fsync_dir(folder)


def _anonymous_output(descriptor: int, folder: Path, target: Path, mode: int, overwrite: bool) -> Iterator[Path]:
    tmp = Path(f"/proc/self/fd/{descriptor}")
    try:
        with _naming(tmp, target):
            yield tmp
        os.fchmod(descriptor, mode)
        with _signals_deferred():  # the link (or rename) and its record go together
            _link_descriptor(descriptor, folder, target, overwrite)
            _PUBLISHED.append(target)
    finally:
        os.close(descriptor)


def _named_output(folder: Path, target: Path, mode: int, overwrite: bool) -> Iterator[Path]:
    tmp = _staging_name(folder, target.suffix)
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as exc:
        raise OutputError(f"{target}: cannot write in {folder} ({exc.strerror or exc})") from exc
    try:
        with _naming(tmp, target):
            yield tmp
        os.chmod(tmp, mode)
        with _signals_deferred():
            _move(tmp, target, overwrite)
            _PUBLISHED.append(target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _file_target(target: Path, overwrite: bool, protect: Sequence[str | os.PathLike[str]]) -> Path:
    """The file to write: ``target``, or the file a link there names; refused if it cannot be an output."""
    if target.is_symlink():
        resolved = Path(os.path.realpath(target))
        if not resolved.exists():
            raise OutputError(
                f"{target}: is a link to {resolved}, which does not exist; refusing to create a file through it",
                remedy="choose_output",
            )
        target = resolved  # /dev/stdout -> /proc/self/fd/1 -> a pipe or a tty is refused below
    for other in protect:
        if _same_file(target, Path(other)):
            raise OutputError(f"{target}: refusing to write over the input file", remedy="choose_output")
    if target.is_dir():
        raise OutputError(f"{target}: is a directory, not a file", remedy="choose_output")
    if target.exists():
        if not overwrite:
            raise OutputError(f"{target}: already exists", remedy="overwrite")
        if not target.is_file():
            raise OutputError(f"{target}: is not a regular file; refusing to replace it")
    if not target.parent.is_dir():
        raise OutputError(f"{target}: folder {target.parent} does not exist")
    return target


def _open_anonymous(folder: Path, target: Path) -> int | None:
    """An unnamed file in ``folder`` (O_TMPFILE), or None where the OS or filesystem has none."""
    try:
        return _try_anonymous(folder)
    except OSError as exc:
        raise OutputError(f"{target}: cannot write in {folder} ({exc.strerror or exc})") from exc


def _try_anonymous(folder: Path) -> int | None:
    flag = getattr(os, "O_TMPFILE", None)
    if flag is None or not Path("/proc/self/fd").is_dir():
        return None
    try:
        return os.open(folder, flag | os.O_RDWR, 0o600)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT):
            return None  # this filesystem cannot: fall back to a named temporary file
        raise


def _link_descriptor(descriptor: int, folder: Path, target: Path, overwrite: bool) -> None:
    """Name an unnamed file ``target``: a link that fails if it exists, or (``overwrite``) a rename onto it."""
    # linkat(AT_SYMLINK_FOLLOW) on /proc/self/fd/N names the unnamed file; Python uses linkat (rather
    # than link, which would not follow) only when a dir_fd is given.
    source = f"/proc/self/fd/{descriptor}"
    folder_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            os.link(source, target.name, dst_dir_fd=folder_fd, follow_symlinks=True)
            return
        except FileExistsError:
            if not overwrite:
                raise OutputError(f"{target}: already exists", remedy="overwrite") from None
        hidden = _staging_name(folder, "")  # no link replaces a name: link aside, then rename over it
        os.link(source, hidden.name, dst_dir_fd=folder_fd, follow_symlinks=True)
        _move(hidden, target, overwrite=True)
    except OSError as exc:
        raise OutputError(f"{target}: cannot create the file ({exc.strerror or exc})") from exc
    finally:
        os.close(folder_fd)


def _move(source: Path, target: Path, overwrite: bool) -> None:
    """Rename a finished file onto ``target``; without ``overwrite`` an existing ``target`` is kept (an error)."""
    try:
        if overwrite:
            os.replace(source, target)
        elif not _renameat2(source, target, _RENAME_NOREPLACE):
            os.link(source, target)  # where renameat2 is missing: a link also refuses an existing name
            os.unlink(source)
    except FileExistsError:
        with contextlib.suppress(OSError):
            source.unlink()
        raise OutputError(f"{target}: already exists", remedy="overwrite") from None
    except OSError as exc:
        with contextlib.suppress(OSError):
            source.unlink()
        raise OutputError(f"{target}: cannot rename the finished file into place ({exc.strerror or exc})") from exc


@functools.lru_cache(maxsize=1)
def _libc_renameat2() -> Any:
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not Linux, or a C library older than glibc 2.28
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def _renameat2(source: Path, target: Path, flags: int) -> bool:
    """``renameat2(2)`` with ``flags``; False where the C library, the kernel or the filesystem has none.

    Raises:
        OSError: the rename failed (``FileExistsError`` for an existing target with RENAME_NOREPLACE).
    """
    function = _libc_renameat2()
    if function is None:
        return False
    if function(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), flags) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(error, os.strerror(error), str(source), None, str(target))


@contextlib.contextmanager
def _naming(tmp: Path, target: Path) -> Iterator[None]:
    """Errors raised while writing name the output the user asked for, never ``/proc/self/fd/3``."""
    try:
        yield
    except (OutputError, CheckpointError) as exc:
        if str(tmp) not in str(exc):
            raise
        raise type(exc)(str(exc).replace(str(tmp), str(target)), remedy=exc.remedy) from exc
    except OSError as exc:  # a writer's own I/O (an exporter, the text of an index): disk full, ...
        raise OutputError(f"{target}: write failed ({exc.strerror or exc})") from exc


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block is done, then are delivered to the handler they would have run.

    So an output and its record in :func:`published` appear together, and no hidden name is left
    between a link and its rename. Only SIGKILL can stop the block (see :func:`_clear_stale`).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []

    def hold(signum: int, frame: object) -> None:
        caught.append(signum)

    previous = {signum: signal.signal(signum, hold) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        for pending in dict.fromkeys(caught):
            signal.raise_signal(pending)


def _staging_name(folder: Path, suffix: str) -> Path:
    """A hidden name beside the output, short whatever the output's name (which may be 255 bytes)."""
    suffix = suffix if len(suffix.encode(errors="surrogateescape")) <= 16 else ""
    return folder / f".fc2conv-{os.getpid()}-{os.urandom(4).hex()}.tmp{suffix}"


def _clear_stale(folder: Path) -> None:
    """Remove what earlier fc2conv runs killed with SIGKILL left in ``folder`` (hidden, named with their pid)."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        match = _STAGING.match(entry.name)
        if match is None or _alive(int(match.group(1))):
            continue
        with contextlib.suppress(OSError):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OverflowError, ValueError):  # no such process can exist
        return False
    except OSError:  # EPERM: it exists, as another user
        return True
    return True


def _output_mode(paths: Iterable[Path], *, folder: bool = False) -> int:
    """The strictest of the default mode (umask) and the modes of ``paths`` (those that exist).

    One rule for every output: the inputs' modes and the replaced output's are kept if stricter, so a
    0600 checkpoint never gives a 0644 conversion. For a folder, a readable file means a searchable one.
    """
    umask = os.umask(0o022)
    os.umask(umask)
    mode = (0o777 if folder else 0o666) & ~umask
    for path in paths:
        try:
            found = os.stat(path)
        except OSError:
            continue
        bits = stat.S_IMODE(found.st_mode)
        if folder and not stat.S_ISDIR(found.st_mode):
            bits |= (bits & 0o444) >> 2  # r -> r-x
        mode &= bits
    return mode


class FolderOutput:
    """The files of an output folder being built: each is written unnamed, and all are named at once.

    :func:`atomic_folder` yields one. Its files are unnamed (``O_TMPFILE``) until the whole folder is
    put in place, so a run killed before that leaves nothing at all; where files cannot be unnamed, they
    are built in a hidden staging folder beside the output instead.
    """

    def __init__(self, target: Path, mode: int) -> None:
        self.target = target  # the folder being built
        self._mode = mode  # of each file
        self._held: dict[str, int] = {}  # name -> descriptor of a finished unnamed file
        self._staging: Path | None = None

    @contextlib.contextmanager
    def file(self, name: str) -> Iterator[Path]:
        """A path to write the file ``name`` to; kept if the block succeeds, dropped if it fails."""
        descriptor = self._open()
        path = self._staging_folder() / name if descriptor is None else Path(f"/proc/self/fd/{descriptor}")
        try:
            with _naming(path, self.target / name):
                yield path
            if descriptor is None:
                os.chmod(path, self._mode)
            else:
                os.fchmod(descriptor, self._mode)
                self._held[name] = descriptor
        except BaseException:
            if descriptor is not None:
                os.close(descriptor)
            raise

    def _open(self) -> int | None:
        try:
            return _try_anonymous(self.target.parent)
        except OSError as exc:
            if exc.errno == errno.EMFILE and self._held:  # many shards: name the finished ones, and go on
                self._name_held()
                return self._open()
            raise OutputError(f"{self.target}: cannot write in {self.target.parent} ({exc.strerror or exc})") from exc

    def _staging_folder(self) -> Path:
        if self._staging is None:
            staging = _staging_name(self.target.parent, "")
            try:
                staging.mkdir(mode=0o700)
            except OSError as exc:
                raise OutputError(
                    f"{self.target}: cannot create a folder in {staging.parent} ({exc.strerror})"
                ) from exc
            self._staging = staging
        return self._staging

    def _name_held(self) -> None:
        """Link every finished unnamed file into the staging folder under its name."""
        if not self._held:
            self._staging_folder()
            return
        folder_fd = os.open(self._staging_folder(), os.O_RDONLY | os.O_DIRECTORY)
        try:
            for name, descriptor in list(self._held.items()):
                os.link(f"/proc/self/fd/{descriptor}", name, dst_dir_fd=folder_fd, follow_symlinks=True)
                os.close(self._held.pop(name))
        finally:
            os.close(folder_fd)

    def _put_in_place(self, overwrite: bool, mode: int) -> None:
        """Name every file, then move the whole folder onto the target in one rename (or exchange)."""
        with _signals_deferred():
            try:
                self._name_held()
                staging = self._staging_folder()
                if overwrite and _entries(self.target):
                    _carry_over(self.target, staging)
                fsync_dir(staging)
                os.chmod(staging, mode)
                replaced = _swap_in(staging, self.target, overwrite)
            except OSError as exc:
                raise OutputError(f"{self.target}: cannot put the folder in place ({exc.strerror or exc})") from exc
            self._staging = replaced  # the old folder, if any, now has the staging name: removed below
            _PUBLISHED.append(self.target)
            fsync_dir(self.target.parent)
            self._discard()

    def _discard(self) -> None:
        for descriptor in self._held.values():
            os.close(descriptor)
        self._held.clear()
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None


@contextlib.contextmanager
def atomic_folder(
    folder: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    protect: str | os.PathLike[str] | None = None,
    inputs: Sequence[str | os.PathLike[str]] = (),
) -> Iterator[FolderOutput]:
    """Yield a :class:`FolderOutput`; if the block succeeds, its files appear together as ``folder``.

    The folder is built beside ``folder`` and put in place in one rename: a missing name or an empty
    folder is taken, an existing non-empty folder is kept (an error) unless ``overwrite``, which swaps
    it atomically for the new one (``renameat2(RENAME_EXCHANGE)``; where that is missing, the old
    folder is moved aside first) and then removes it. Files the user added to the old folder (a
    ``config.json``, ...) are kept: only its ``*.safetensors`` and index files are replaced. A run that
    fails or is interrupted leaves no new folder and nothing beside it.

    Args:
        folder: The output folder (its parent must exist).
        overwrite: Replace an existing output folder.
        protect: The input folder, which is never written.
        inputs: The input files, whose modes (with the input folder's) bound the output's.

    Raises:
        OutputError: ``folder`` is a file or the input folder, its parent is missing, it exists without
            ``overwrite``, or it holds a folder or special file that replacing it would delete.
    """
    target = _folder_target(Path(folder), overwrite, protect)
    _clear_stale(target.parent)
    old_files = [Path(e.path) for e in _entries(target) if e.name.endswith(_OUTPUT_SUFFIXES)]
    output = FolderOutput(target, _output_mode([*map(Path, inputs), *old_files]))
    folder_mode = _output_mode([*map(Path, [*inputs, *([protect] if protect else [])]), target], folder=True)
    try:
        yield output
        output._put_in_place(overwrite, folder_mode)
    finally:
        output._discard()


_OUTPUT_SUFFIXES = (".safetensors", ".safetensors.index.json")  # what an output folder of fc2conv holds


def _folder_target(folder: Path, overwrite: bool, protect: str | os.PathLike[str] | None) -> Path:
    """The output folder (a link there is followed), checked: refused if it cannot become the output."""
    if folder.is_symlink():
        resolved = Path(os.path.realpath(folder))
        if not resolved.exists():
            raise OutputError(f"{folder}: is a link to {resolved}, which does not exist", remedy="choose_output")
        folder = resolved
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder}: is a file; a sharded checkpoint is written to a folder", remedy="choose_output")
    if folder.exists() and protect is not None and os.path.samefile(folder, protect):
        raise OutputError(f"{folder}: is the input folder; refusing to write over its shards", remedy="choose_output")
    if not folder.exists():
        if not folder.parent.is_dir():
            raise OutputError(f"{folder}: its parent folder {folder.parent} does not exist")
        return folder
    entries = _entries(folder)
    if entries and not overwrite:
        raise OutputError(f"{folder}: already exists", remedy="overwrite")
    for entry in entries:
        if entry.is_dir(follow_symlinks=False) and not _OLD_STAGING.fullmatch(entry.name):
            raise OutputError(
                f"{folder}: holds the folder {entry.name!r}, which replacing the output folder would delete; "
                "refusing to replace it",
                remedy="choose_output",
            )
        if not (entry.is_dir(follow_symlinks=False) or entry.is_file(follow_symlinks=False) or entry.is_symlink()):
            raise OutputError(f"{folder}: holds {entry.name!r}, not a regular file; refusing to replace the folder")
    return folder


def _entries(folder: Path) -> list[os.DirEntry[str]]:
    try:
        return list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return []


def _carry_over(old: Path, new: Path) -> None:
    """Keep the files a user added to an output folder (a config.json, ...): linked into the new folder."""
    for entry in _entries(old):
        kept = new / entry.name
        if entry.name.endswith(_OUTPUT_SUFFIXES) or entry.is_dir(follow_symlinks=False) or os.path.lexists(kept):
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry.path), kept)
        else:
            os.link(entry.path, kept)


def _swap_in(staging: Path, target: Path, overwrite: bool) -> Path | None:
    """Move the built folder onto ``target``; returns where the replaced folder now is (to remove), if any."""
    if overwrite and _entries(target):
        if _renameat2(staging, target, _RENAME_EXCHANGE):
            return staging
        aside = _staging_name(target.parent, "")  # no atomic exchange here: the old folder moves aside first
        os.rename(target, aside)
        os.rename(staging, target)
        return aside
    try:
        os.rename(staging, target)  # takes a missing name or an empty folder; a non-empty one stays
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise OutputError(f"{target}: already exists", remedy="overwrite") from exc
        raise
    return None


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
