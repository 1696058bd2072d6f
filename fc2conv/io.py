"""Load checkpoints safely (weights only, memory-mapped) and write safetensors atomically, streaming."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import struct
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fc2conv.errors import CheckpointError, OutputError
from fc2conv.plan import TensorInfo
from fc2conv.shards import ShardedTensors, ShardSet, find_shards, is_sharded, natural_key, read_shard_infos

if TYPE_CHECKING:
    import torch

SAFETENSORS_SUFFIX = ".safetensors"
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")

# safetensors dtype code <-> fc2conv/torch dtype name, and the size of one element in bytes.
_ST_DTYPES: dict[str, tuple[str, int]] = {
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
_ST_CODES = {name: code for code, (name, _) in _ST_DTYPES.items()}
_MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit

# Keys under which training scripts nest the state dict, most specific first.
WRAPPER_KEYS = (
    "state_dict",
    "model_state_dict",
    "state_dict_ema",
    "model_ema",
    "model",
    "net",
    "network",
    "module",
    "weights",
    "params",
)
# Prefixes that wrappers add to every key: DataParallel/DDP and torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@dataclass
class Checkpoint:
    """A loaded checkpoint: tensor listing, a way to fetch each tensor, and what was found on the way.

    Tensors are fetched on demand (memory-mapped where the file allows), so holding a Checkpoint
    costs little memory even for multi-gigabyte files.
    """

    path: Path
    format: str  # "torch", "safetensors" or "sharded safetensors"
    infos: list[TensorInfo]
    tensors: Mapping[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    shards: ShardSet | None = None  # for a sharded checkpoint: its files
    shard_tensors: dict[str, list[str]] | None = None  # shard file -> the tensor names it holds


# --- safetensors header (no torch needed) -------------------------------------------------------


@dataclass(frozen=True)
class SafetensorsHeader:
    """The parsed, validated header of a safetensors file."""

    infos: list[TensorInfo]
    metadata: dict[str, str]
    data_start: int


def read_safetensors_header(path: str | os.PathLike[str]) -> SafetensorsHeader:
    """Read and validate only the header of a safetensors file; no tensor data is read.

    Declared shapes, dtypes and offsets are checked against each other and the file size, so a
    corrupt or hostile header is an error here, before anything is allocated.

    Raises:
        CheckpointError: naming the file and what is wrong with it.
    """
    path = Path(path)
    _check_readable(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
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
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path}: safetensors header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: safetensors __metadata__ must map strings to strings")
    data_start = 8 + header_len
    data_len = size - data_start
    infos = []
    spans = []
    for name, entry in header.items():
        info, begin, end = _parse_entry(path, name, entry, data_len)
        infos.append(info)
        spans.append((begin, end, name))
    spans.sort()
    for (_, end_a, name_a), (begin_b, _, name_b) in zip(spans, spans[1:], strict=False):
        if begin_b < end_a:
            raise CheckpointError(f"{path}: tensors {name_a!r} and {name_b!r} overlap in the data section")
    return SafetensorsHeader(infos, dict(metadata), data_start)


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
    if code not in _ST_DTYPES:
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
    name_dtype, itemsize = _ST_DTYPES[code]
    numel = 1
    for s in shape:
        numel *= s
    if numel * itemsize != offsets[1] - offsets[0]:
        raise CheckpointError(
            f"{where}: shape {shape} of {code} needs {numel * itemsize} bytes, "
            f"but its offsets span {offsets[1] - offsets[0]}"
        )
    return TensorInfo(name, tuple(shape), name_dtype), offsets[0], offsets[1]


# --- loading ------------------------------------------------------------------------------------


def dtype_itemsize(dtype: str) -> int:
    """Bytes per element of a dtype name (``"bfloat16"`` -> 2); 0 if safetensors cannot store it."""
    code = _ST_CODES.get(dtype)
    return _ST_DTYPES[code][1] if code else 0


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file")
    if not os.access(path, os.R_OK):
        raise CheckpointError(f"{path}: permission denied (cannot read the file)")


def is_safetensors(path: str | os.PathLike[str]) -> bool:
    """Safetensors by suffix; other suffixes are read with ``torch.load``."""
    return Path(path).suffix == SAFETENSORS_SUFFIX


def read_tensor_infos(
    path: str | os.PathLike[str], *, trust_pickle: bool = False
) -> tuple[list[TensorInfo], dict[str, str], list[str]]:
    """Names, shapes and dtypes of a checkpoint's tensors, with its metadata and loading notes.

    For safetensors (single or sharded) only the headers are read (no torch import); ``.pt`` files
    are memory-mapped.
    """
    if is_sharded(path):
        sharded = open_sharded(path)  # headers only: shards are opened when a tensor is asked for
        return sharded.infos, sharded.metadata, sharded.notes
    if is_safetensors(path):
        header = read_safetensors_header(path)
        return _safetensors_order(header.infos), header.metadata, _safetensors_notes(header)
    checkpoint = load_checkpoint(path, trust_pickle=trust_pickle)
    return checkpoint.infos, checkpoint.metadata, checkpoint.notes


def _safetensors_order(infos: list[TensorInfo]) -> list[TensorInfo]:
    # The header keeps no module order (writers sort by dtype and name): use name order with
    # numbers compared as numbers, so features.2 comes before features.10.
    return sorted(infos, key=lambda info: natural_key(info.name))


def _safetensors_notes(header: SafetensorsHeader) -> list[str]:
    return [f"safetensors: {len(header.infos)} tensors, taken in name order (the format keeps no module order)"]


def load_checkpoint(path: str | os.PathLike[str], *, trust_pickle: bool = False) -> Checkpoint:
    """Open a checkpoint without running code from it.

    ``.safetensors`` files are opened memory-mapped. Other files go through
    ``torch.load(weights_only=True, mmap=True)`` (falling back to a plain load for the legacy,
    non-zip format), then the state dict is found inside common wrappers (``state_dict``, ``model``,
    ...) and a ``module.`` / ``_orig_mod.`` prefix shared by every key is stripped.

    Args:
        path: The checkpoint file.
        trust_pickle: Unpickle arbitrary objects (``weights_only=False``), e.g. a whole ``nn.Module``,
            whose ``state_dict()`` is then used. This runs any code the file contains: only for
            files you trust.

    Raises:
        CheckpointError: the file is missing, unreadable, not a checkpoint, or needs pickled code.
    """
    path = Path(path)
    if is_sharded(path):
        return open_sharded(path)
    if is_safetensors(path):
        return open_safetensors(path)
    _check_readable(path)
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty (0 bytes)")
    obj = _torch_load(path, trust_pickle)
    notes: list[str] = []
    state_dict = find_state_dict(obj, path, notes)
    _check_storage_sizes(state_dict, path)
    state_dict = strip_wrapper_prefix(state_dict, notes)
    from fc2conv.convert import tensor_infos

    return Checkpoint(path, "torch", tensor_infos(state_dict), state_dict, {}, notes)


def load_pickled_module(path: str | os.PathLike[str]) -> Any:
    """Unpickle a whole saved ``nn.Module`` (``torch.load(weights_only=False)``): runs the file's code.

    Raises:
        CheckpointError: unreadable, or the file does not hold a module.
    """
    import torch

    path = Path(path)
    _check_readable(path)
    obj = _torch_load(path, trust_pickle=True)
    if not isinstance(obj, torch.nn.Module):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a whole model; pass --model")
    return obj


def open_sharded(path: str | os.PathLike[str]) -> Checkpoint:
    """Open a Hugging Face sharded safetensors checkpoint (index file, or a folder of shards) lazily."""
    shards = find_shards(path)
    infos, by_shard, metadata = read_shard_infos(shards)
    tensors = ShardedTensors(shards, by_shard, [i.name for i in infos])
    return Checkpoint(
        Path(path), "sharded safetensors", infos, tensors, metadata, _shard_notes(shards, infos), shards, by_shard
    )


def _shard_notes(shards: ShardSet, infos: list[TensorInfo]) -> list[str]:
    source = shards.index.name if shards.index else "the folder (no index)"
    return [f"sharded safetensors: {len(infos)} tensors in {len(shards.files)} shards, from {source}"]


def open_safetensors(path: str | os.PathLike[str]) -> Checkpoint:
    """Open a safetensors file (whatever its suffix) memory-mapped, after validating its header."""
    path = Path(path)
    header = read_safetensors_header(path)
    from safetensors import safe_open

    try:
        handle = safe_open(str(path), framework="pt")
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: cannot open as safetensors ({exc})") from exc
    infos = _safetensors_order(header.infos)
    return Checkpoint(
        path,
        "safetensors",
        infos,
        _LazyTensors(handle, [i.name for i in infos]),
        header.metadata,
        [],
    )


class _LazyTensors(Mapping[str, "torch.Tensor"]):
    """A read-only name -> tensor mapping over an open safetensors file; tensors load on access."""

    def __init__(self, handle: Any, names: Sequence[str]) -> None:
        self._handle = handle
        self._names = list(names)
        self._known = set(names)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._known:
            raise KeyError(name)
        return self._handle.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def _torch_load_quietly(path: Path, weights_only: bool) -> Any:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc):
            raise
        # Legacy (pre-zip) format: cannot be memory-mapped; load it plainly (same weights_only).
        return torch.load(path, map_location="cpu", weights_only=weights_only)


def _torch_load(path: Path, trust_pickle: bool = False) -> Any:
    import pickle

    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols; the error says enough
            warnings.simplefilter("ignore")
            return _torch_load_quietly(path, weights_only=not trust_pickle)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL (\S+)|[Uu]nsupported global:? (?:GLOBAL )?(\S+)", str(exc))
        foreign = [found.group(1) or found.group(2)] if found else _foreign_globals(path)
        if not foreign or trust_pickle:
            detail = re.search(r"WeightsUnpickler error:\s*(.+?)\n", str(exc) + "\n")
            reason = detail.group(1).strip() if detail else "corrupt pickle data"
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({reason})") from exc
        what = f" ({', '.join(dict.fromkeys(foreign))})"
        raise CheckpointError(
            f"{path}: refused to load: the file holds pickled Python objects{what} beyond tensors, and "
            "unpickling them could run code from the file. Save the weights alone, e.g. "
            "torch.save(model.state_dict(), 'weights.pt') or safetensors.torch.save_file(...), "
            "and convert that (or, for a file you trust, pass --trust-pickle)"
        ) from exc
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({_first_sentence(exc)})") from exc


def _first_sentence(exc: BaseException) -> str:
    """A short cause for a one-line message: the exception's first sentence, with its type if terse."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = text.split(". ")[0].rstrip(".")
    return text if len(text) > 12 else f"{type(exc).__name__}: {text}".rstrip(": ")


# Modules whose globals a weights-only checkpoint may name (tensors, storages, containers).
_CHECKPOINT_MODULES = ("torch", "collections", "_codecs", "numpy", "builtins.set", "builtins.frozenset")
_SCAN_BYTES = 16 * 2**20


def _foreign_globals(path: Path) -> list[str]:
    """Globals a pickle in the file would import, other than a checkpoint's own; read, never executed.

    Only for the message of a refused file (torch's weights-only unpickler has already refused it):
    it names what the file would have run, e.g. ``posix.system``.
    """
    import io as _io
    import pickletools
    import zipfile

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                streams = [
                    archive.read(i)
                    for i in archive.infolist()  # no zip bomb: small pickles only
                    if i.filename.endswith(".pkl") and i.file_size <= _SCAN_BYTES
                ]
        else:
            with open(path, "rb") as f:
                streams = [f.read(_SCAN_BYTES)]
    except Exception:  # noqa: BLE001 - a damaged archive: nothing to name, the refusal stands
        return []
    found: list[str] = []
    for data in streams:
        stream = _io.BytesIO(data)
        for _ in range(8):  # the legacy format holds several pickles in a row
            strings: list[str] = []
            try:
                for opcode, arg, _ in pickletools.genops(stream):
                    if opcode.name in ("GLOBAL", "INST"):
                        found.append(str(arg).replace(" ", "."))
                    elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                        found.append(f"{strings[-2]}.{strings[-1]}")
                    elif isinstance(arg, str):
                        strings.append(arg)
            except Exception:  # noqa: BLE001 - junk after the pickles: stop scanning
                break
            if stream.tell() >= len(data):
                break
    return [g for g in found if not g.startswith(_CHECKPOINT_MODULES)]


def find_state_dict(obj: Any, path: str | os.PathLike[str], notes: list[str]) -> dict[str, torch.Tensor]:
    """The name -> tensor mapping inside a loaded checkpoint object.

    Accepts a plain state dict, or one nested under a known key (:data:`WRAPPER_KEYS`, up to two
    levels), or the only dict of tensors in the object. Non-tensor entries are dropped and reported.

    Raises:
        CheckpointError: if no tensors are found.
    """
    import torch

    where: list[str] = []
    current = _module_state(obj, notes)
    for _ in range(3):
        if not isinstance(current, Mapping):
            break
        if current and all(isinstance(v, torch.Tensor) for v in current.values()):
            break
        key = next((k for k in WRAPPER_KEYS if isinstance(current.get(k), (Mapping, torch.nn.Module))), None)
        if key is None:
            nested = [k for k, v in current.items() if isinstance(v, Mapping) and _has_tensors(v)]
            if len(nested) == 1 and not any(isinstance(v, torch.Tensor) for v in current.values()):
                key = nested[0]
        if key is None:
            break
        where.append(str(key))
        current = _module_state(current[key], notes)
    if not isinstance(current, Mapping):
        raise CheckpointError(f"{path}: holds a {type(current).__name__}, not a state dict of tensors")
    tensors = {str(k): v for k, v in current.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        keys = ", ".join(map(str, list(current)[:8])) or "none"
        raise CheckpointError(f"{path}: no tensors found (top-level keys: {keys})")
    if where:
        path_text = "".join(f"[{k!r}]" for k in where)
        notes.append(f"state dict found under checkpoint{path_text}")
    dropped = [str(k) for k, v in current.items() if not isinstance(v, torch.Tensor)]
    if dropped:
        shown = ", ".join(dropped[:5]) + (", ..." if len(dropped) > 5 else "")
        notes.append(f"ignored {len(dropped)} non-tensor entries ({shown})")
    return tensors


def _check_storage_sizes(state_dict: Mapping[str, torch.Tensor], path: Path) -> None:
    """Refuse tensors that declare more data than their storage holds (stride-0 expanded views).

    Such a tensor is a few bytes in the file but would be materialised at its full declared size
    when written: a checkpoint must not make fc2conv allocate what it does not contain.
    """
    import torch

    for name, tensor in state_dict.items():
        if tensor.layout is not torch.strided or tensor.is_quantized:
            continue
        declared = tensor.numel() * tensor.element_size()
        stored = tensor.untyped_storage().nbytes()
        if declared > stored:
            raise CheckpointError(
                f"{path}: tensor {name!r} declares shape {tuple(tensor.shape)} ({declared} bytes) but its "
                f"storage holds {stored} bytes (an expanded view); refusing to materialise it"
            )


def _module_state(obj: Any, notes: list[str]) -> Any:
    """A whole ``nn.Module`` (only loadable with trust_pickle) stands for its ``state_dict()``."""
    import torch

    if isinstance(obj, torch.nn.Module):
        notes.append(f"unpickled a whole {type(obj).__name__} module; using its state_dict()")
        return obj.state_dict()
    return obj


def _has_tensors(mapping: Mapping[Any, Any], depth: int = 2) -> bool:
    import torch

    return any(
        isinstance(v, torch.Tensor) or (depth > 1 and isinstance(v, Mapping) and _has_tensors(v, depth - 1))
        for v in mapping.values()
    )


def strip_wrapper_prefix(state_dict: dict[str, torch.Tensor], notes: list[str]) -> dict[str, torch.Tensor]:
    """Remove ``module.`` (DataParallel) or ``_orig_mod.`` (torch.compile) when every key has it."""
    for prefix in WRAPPER_PREFIXES:
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            notes.append(f"stripped the {prefix!r} prefix shared by every key")
            state_dict = {k[len(prefix) :]: v for k, v in state_dict.items()}
    return state_dict


# --- writing ------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_output(
    target: str | os.PathLike[str], *, overwrite: bool = False, protect: Sequence[str | os.PathLike[str]] = ()
) -> Iterator[Path]:
    """Yield a temporary path in ``target``'s folder; if the block succeeds, the file becomes ``target``.

    ``target`` only ever holds its previous content (or nothing) or the complete new file: the new
    file is written under another name and atomically renamed onto ``target`` at the end. Where the
    filesystem allows (Linux ``O_TMPFILE``), the temporary file has no name at all until it is
    complete, so even a process killed with SIGKILL leaves nothing behind; elsewhere a hidden
    ``.<name>.*.tmp`` file is used and removed on any error or interrupt.

    Args:
        target: Final path.
        overwrite: Replace an existing regular file at ``target``; otherwise an existing file is an error.
        protect: Paths that must never be written (the inputs), even with ``overwrite``.

    Raises:
        OutputError: the target is an input, exists without ``overwrite``, is not a regular file, or its
            folder is missing or not writable.
    """
    target = Path(target)
    for other in protect:
        if _same_file(target, Path(other)):
            raise OutputError(f"{target}: refusing to write over the input file; choose another -o")
    if target.is_dir():
        raise OutputError(f"{target}: is a directory; give a file path with -o")
    if target.exists() or target.is_symlink():
        if not overwrite:
            raise OutputError(f"{target}: already exists; pass --force to replace it")
        if not target.is_file():
            raise OutputError(f"{target}: is not a regular file; refusing to replace it")
    folder = target.parent
    if not folder.is_dir():
        raise OutputError(f"{target}: folder {folder} does not exist")
    anonymous = _open_anonymous(folder, target)
    if anonymous is not None:
        try:
            yield Path(f"/proc/self/fd/{anonymous}")
            _publish(Path(f"/proc/self/fd/{anonymous}"), folder, target, link=True)
        finally:
            os.close(anonymous)
    else:
        try:
            fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
        except OSError as exc:
            raise OutputError(f"{target}: cannot write in {folder} ({exc.strerror or exc})") from exc
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            yield tmp
            _publish(tmp, folder, target, link=False)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
    fsync_dir(folder)


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


def _publish(tmp: Path, folder: Path, target: Path, *, link: bool) -> None:
    """Rename the complete file onto ``target`` (first giving an unnamed file a hidden name)."""
    if link:
        # linkat(AT_SYMLINK_FOLLOW) on /proc/self/fd/N names the unnamed file; Python only uses
        # linkat (rather than link, which would not follow) when a dir_fd is given.
        folder_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            while True:
                staging = folder / f".{target.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
                try:
                    os.link(tmp, staging.name, dst_dir_fd=folder_fd, follow_symlinks=True)
                    break
                except FileExistsError:
                    continue
                except OSError as exc:
                    raise OutputError(f"{target}: cannot create the file ({exc.strerror or exc})") from exc
        finally:
            os.close(folder_fd)
        tmp = staging
    try:
        os.replace(tmp, target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise OutputError(f"{target}: cannot rename the finished file into place ({exc.strerror or exc})") from exc


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


def fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_safetensors(
    path: str | os.PathLike[str],
    infos: Sequence[TensorInfo],
    fetch: Callable[[str], torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    *,
    sync: bool = True,
    on_tensor: Callable[[TensorInfo], None] | None = None,
) -> int:
    """Write a safetensors file tensor by tensor: only one tensor is in memory at a time.

    The header is computed from ``infos`` first; each tensor is then fetched, checked against its
    declared shape and dtype, and its bytes written straight from its memory. The file is flushed
    (and fsynced, unless ``sync`` is false: then call :func:`fsync_file` before publishing it), and
    its header re-read and validated as the last step.

    Args:
        path: File to write (use :func:`atomic_output` for a temporary path).
        infos: Name, shape and dtype of every tensor, in the order to write them.
        fetch: Returns the tensor for a name (e.g. a memory-mapped one, converted on the fly).
        metadata: String metadata stored under ``__metadata__``.
        sync: fsync the file before returning.
        on_tensor: Called after each tensor is written (for progress reports).

    Returns:
        The size of the written file in bytes.

    Raises:
        OutputError: a dtype safetensors cannot store, or a write failure (disk full, ...).
    """
    if sys.byteorder != "little":  # pragma: no cover - safetensors stores little-endian data
        raise OutputError("writing safetensors needs a little-endian machine")
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for info in infos:
        code = _ST_CODES.get(info.dtype)
        if code is None:
            raise OutputError(
                f"{info.name}: dtype {info.dtype} has no safetensors equivalent, so it cannot be written "
                "(dequantize or drop that tensor first)"
            )
        nbytes = info.numel * _ST_DTYPES[code][1]
        header[info.name] = {"dtype": code, "shape": list(info.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data section starts 8-byte aligned
    try:
        # Not opened with O_TRUNC: on ext4, a file truncated to zero and rewritten is flushed on close
        # (auto_da_alloc), which made writing ~2.5x slower. Any tail of an older file is cut below.
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT, 0o644), "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for info in infos:
                _write_tensor(f, info, fetch(info.name))
                if on_tensor is not None:
                    on_tensor(info)
            if os.fstat(f.fileno()).st_size > f.tell():
                f.truncate()
            f.flush()
            if sync:
                os.fsync(f.fileno())
    except OSError as exc:
        raise OutputError(f"{path}: write failed ({exc.strerror or exc})") from exc
    written = read_safetensors_header(path)
    if [(i.name, i.shape, i.dtype) for i in written.infos] != [(i.name, i.shape, i.dtype) for i in infos]:
        raise OutputError(f"{path}: the written header does not read back as written")
    return Path(path).stat().st_size


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


def _write_tensor(f: Any, info: TensorInfo, tensor: torch.Tensor) -> None:
    from fc2conv.convert import dtype_name

    if tuple(tensor.shape) != info.shape or dtype_name(tensor.dtype) != info.dtype:
        raise OutputError(
            f"{info.name}: got {dtype_name(tensor.dtype)}{tuple(tensor.shape)}, declared {info.dtype}{info.shape}"
        )
    tensor = tensor.contiguous()
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes == 0:
        return
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    # Zero-copy view of the tensor's bytes; `tensor` stays referenced until the write returns.
    buffer = (ctypes.c_ubyte * nbytes).from_address(tensor.data_ptr())
    f.write(memoryview(buffer))


def save_safetensors(
    state_dict: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    metadata: Mapping[str, str] | None = None,
    *,
    overwrite: bool = False,
) -> int:
    """Save a state dict as safetensors, atomically (temporary file, fsync, rename).

    Example:
        >>> save_safetensors(convert_state_dict(sd, "256x4x4"), "head.conv.safetensors")  # doctest: +SKIP
    """
    from fc2conv.convert import tensor_infos

    with atomic_output(path, overwrite=overwrite) as tmp:
        size = write_safetensors(tmp, tensor_infos(state_dict), state_dict.__getitem__, metadata)
    return size
