"""PyTorch pickles (.pt, .pth, .bin, .ckpt): weights-only loading, refusal forensics, the state dict inside."""

from __future__ import annotations

import pickle
import pickletools
import re
import sys
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fc2conv.diskio import ByteSpan
from fc2conv.errors import CheckpointError
from fc2conv.formats.base import Listing, ReadOptions, Source, check_readable
from fc2conv.types import TensorInfo, dtype_itemsize, tensor_infos

if TYPE_CHECKING:
    import torch

    from fc2conv.formats.pickle_data import BoundedReader, TensorRef
    from fc2conv.formats.torch_zip import TorchZip

__all__ = [
    "EMA_KEYS",
    "READER",
    "SUFFIXES",
    "WRAPPER_KEYS",
    "WRAPPER_PREFIXES",
    "find_state_dict",
    "open_torch_checkpoint",
]

SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")

# Keys under which training scripts nest the state dict, most specific first. The training weights
# are taken; an EMA copy (exponential moving average, timm's model_ema) only when it is the only one,
# or when the caller names its key. Every key passed over is reported.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "network", "module", "weights", "params")
EMA_KEYS = ("state_dict_ema", "model_ema", "ema", "ema_state_dict", "ema_model")
# Prefixes that wrappers add to every key: DataParallel/DDP and torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def open_torch_checkpoint(path: Path, options: ReadOptions | None = None) -> Source:
    """Load a PyTorch checkpoint without running code from it, and find its state dict.

    A ``torch.save`` zip is read as data, without torch (:mod:`fc2conv.formats.torch_zip`): its
    tensors are memory-mapped views of the file, their byte spans known. A file that reader does not
    model goes through ``torch.load(weights_only=True, mmap=True)`` (a plain weights-only load for the
    legacy, non-zip format), after its pickles have been read as data to refuse what would allocate
    memory the file does not hold. The state dict is then found inside common wrappers
    (``state_dict``, ``model``, ...) and a ``module.`` / ``_orig_mod.`` prefix shared by every key is
    stripped. With ``options.trust_pickle`` arbitrary objects are unpickled (this runs the file's
    code); a whole ``nn.Module`` is then kept in :attr:`Source.module` and stands for its ``state_dict()``.

    Raises:
        CheckpointError: the file is missing, unreadable, not a checkpoint, or needs pickled code.
    """
    check_readable(path)
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty (0 bytes)")
    trust = options is not None and options.trust_pickle
    if not trust:
        source = _open_as_data(path, options.state_dict_key if options else None)
        if source is not None:
            return source
    obj = _torch_load(path, trust)
    notes: list[str] = []
    module = obj if _is_module(obj) else None
    state_dict = find_state_dict(obj, path, notes, key=options.state_dict_key if options else None)
    _check_storage_sizes(state_dict, path)
    state_dict = _strip_wrapper_prefix(state_dict, notes)
    return Source(
        path, "torch", tensor_infos(state_dict), {}, notes, module_order=True, tensors=state_dict, module=module
    )


def _open_as_data(path: Path, key: str | None) -> Source | None:
    """The checkpoint read without torch, or None when torch's loader must read it (after a guard)."""
    from fc2conv.formats.pickle_data import Refused
    from fc2conv.formats.torch_zip import read_torch_zip, scan_legacy_pickles

    try:
        if _is_zip(path):
            found = read_torch_zip(path)
        else:
            found = None
            scan_legacy_pickles(path)
    except Refused as exc:
        raise CheckpointError(f"{path}: refused to load: the file {exc}") from exc
    except OSError as exc:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({exc.strerror or exc})") from exc
    if found is None or not found.little_endian:
        return None
    notes: list[str] = []
    refs = _strip_wrapper_prefix(find_state_dict(found.value, path, notes, key=key), notes)
    spans = {}
    for name, ref in refs.items():
        _check_ref(path, name, ref)
        if ref.is_contiguous():
            nbytes = ref.numel * dtype_itemsize(ref.dtype)
            spans[name] = ByteSpan(
                path, found.storage_offsets[ref.storage.key] + ref.offset * dtype_itemsize(ref.dtype), nbytes
            )
    infos = [TensorInfo(name, ref.shape, ref.dtype) for name, ref in refs.items()]
    tensors = _MappedTensors(path, refs, found)
    return Source(path, "torch", infos, {}, notes, module_order=True, tensors=tensors, spans=spans)


def _is_zip(path: Path) -> bool:
    try:
        return zipfile.is_zipfile(path)
    except (zipfile.BadZipFile, ValueError, EOFError):  # a zip's directory so broken it cannot be read
        return False


def _check_ref(path: Path, name: str, ref: TensorRef) -> None:
    """A tensor must lie inside its storage, and declare no more bytes than the storage holds."""
    itemsize = dtype_itemsize(ref.dtype)
    stored = ref.storage.numel * dtype_itemsize(ref.storage.dtype)
    declared = ref.numel * itemsize
    if declared > stored:
        raise CheckpointError(
            f"{path}: tensor {name!r} declares shape {ref.shape} ({declared} bytes) but its "
            f"storage holds {stored} bytes (an expanded view); refusing to materialise it"
        )
    if ref.extent() * itemsize > stored:
        raise CheckpointError(f"{path}: tensor {name!r} reaches past the end of its storage ({stored} bytes)")


class _MappedTensors(Mapping[str, "torch.Tensor"]):
    """Name -> tensor over a ``torch.save`` zip read as data: views of one private map of the file."""

    def __init__(self, path: Path, refs: Mapping[str, TensorRef], found: TorchZip) -> None:
        self._path, self._refs, self._offsets = path, dict(refs), found.storage_offsets
        self._file: Any = None

    def __getitem__(self, name: str) -> torch.Tensor:
        ref = self._refs[name]
        from fc2conv.preload import wait_for_torch

        wait_for_torch()
        import torch

        if self._file is None:  # MAP_PRIVATE, as torch.load(mmap=True) maps it: the file is never written
            self._file = torch.UntypedStorage.from_file(str(self._path), False, self._path.stat().st_size)
        start = self._offsets[ref.storage.key]
        storage = self._file[start : start + ref.storage.numel * dtype_itemsize(ref.storage.dtype)]
        dtype = getattr(torch, ref.dtype)
        return torch.empty(0, dtype=dtype).set_(storage, ref.offset, ref.shape, ref.stride)

    def __contains__(self, name: object) -> bool:  # by name: Mapping's default would make the tensor (and import torch)
        return name in self._refs

    def __iter__(self) -> Iterator[str]:
        return iter(self._refs)

    def __len__(self) -> int:
        return len(self._refs)


class _TorchPickleReader:
    """Reader for PyTorch checkpoints; it takes every path no other reader claims."""

    format = "torch"

    def claims(self, path: Path) -> bool:
        return True

    def listing(self, path: Path, options: ReadOptions) -> Listing:
        return open_torch_checkpoint(path, options)  # memory-mapped: the listing costs little

    def open(self, path: Path, options: ReadOptions) -> Source:
        return open_torch_checkpoint(path, options)


READER = _TorchPickleReader()


# --- loading ------------------------------------------------------------------------------------


def _is_module(obj: Any) -> bool:
    """A whole ``nn.Module`` (torch is then imported: only torch's loader makes one)."""
    module_type = getattr(getattr(sys.modules.get("torch"), "nn", None), "Module", None)
    return module_type is not None and isinstance(obj, module_type)


def _torch_load_quietly(path: Path, weights_only: bool) -> Any:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc):
            raise
        # Legacy (pre-zip) format: cannot be memory-mapped; load it plainly (same weights_only).
        return torch.load(path, map_location="cpu", weights_only=weights_only)


def _torch_load(path: Path, trust_pickle: bool) -> Any:
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
            "and convert that",
            remedy="trust_pickle",
        ) from exc
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({_first_sentence(exc)})") from exc


def _first_sentence(exc: BaseException) -> str:
    """A short cause for a one-line message: the exception's first sentence, with its type if terse."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = text.split(". ")[0].rstrip(".")
    return text if len(text) > 12 else f"{type(exc).__name__}: {text}".rstrip(": ")


# --- naming what a refused file would have imported -----------------------------------------------

# Modules whose globals a weights-only checkpoint may name (tensors, storages, containers).
_CHECKPOINT_MODULES = ("torch", "collections", "_codecs", "numpy", "builtins.set", "builtins.frozenset")


def _foreign_globals(path: Path) -> list[str]:
    """Globals a pickle in the file would import, other than a checkpoint's own; read, never executed.

    Only for the message of a refused file (torch's weights-only unpickler has already refused it):
    it names what the file would have run, e.g. ``posix.system``. For a zip, torch's own
    ``get_unsafe_globals_in_checkpoint`` names them (its data.pkl is bounded first); otherwise, or
    where that fails, the pickle is scanned as a stream, every read bounded by the size left.
    """
    from fc2conv.formats.pickle_data import MAX_PICKLE_BYTES, BoundedReader
    from fc2conv.formats.torch_zip import check_pickle_size, data_pickle

    try:
        if _is_zip(path):
            with zipfile.ZipFile(path) as archive:
                info = data_pickle(archive)
                if info is None:
                    return []
                check_pickle_size(path, info)
                named = _unsafe_globals_by_torch(path)
                if named is not None:
                    return named
                with archive.open(info) as stream:
                    found = _globals_in(BoundedReader(stream, info.file_size))
        else:
            with open(path, "rb") as raw:
                found = _globals_in(BoundedReader(raw, min(path.stat().st_size, MAX_PICKLE_BYTES)))
    except Exception:  # noqa: BLE001 - a damaged archive: nothing to name, the refusal stands
        return []
    return [g for g in found if not g.startswith(_CHECKPOINT_MODULES)]


def _unsafe_globals_by_torch(path: Path) -> list[str] | None:
    import torch.serialization

    try:
        return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # noqa: BLE001 - opcodes it does not know (protocol 4 and later): scan by hand
        return None


def _globals_in(stream: BoundedReader) -> list[str]:
    """The GLOBAL / STACK_GLOBAL names of the pickles in ``stream`` (the legacy format holds several)."""
    found: list[str] = []
    for _ in range(8):
        strings: list[str] = []
        try:
            for opcode, arg, _ in pickletools.genops(stream):  # type: ignore[arg-type]  # a file-like reader
                if opcode.name in ("GLOBAL", "INST"):
                    found.append(str(arg).replace(" ", "."))
                elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str):
                    strings = [*strings[-1:], arg]
        except Exception:  # noqa: BLE001 - junk after the pickles: stop scanning
            break
        if stream.left <= 0:
            break
    return found


# --- the state dict inside ------------------------------------------------------------------------


def find_state_dict(obj: Any, path: str | Path, notes: list[str], key: str | None = None) -> dict[str, Any]:
    """The name -> tensor mapping inside a loaded checkpoint object.

    Accepts a plain state dict, one nested under a known key (:data:`WRAPPER_KEYS`, then
    :data:`EMA_KEYS`, up to three levels), or the only dict of tensors in the object; ``key`` names the
    nesting instead (``"model_ema"``, or ``"checkpoint.state_dict"`` for two levels). The key taken and
    those passed over are reported in ``notes``; non-tensor entries are dropped and reported.

    Raises:
        CheckpointError: no tensors found, or ``key`` names nothing in the checkpoint.

    A tensor is a ``torch.Tensor``, or a ``TensorRef`` when the file was read as data (without torch).
    """
    current, where = _walk(obj, path, key, notes) if key is not None else _descend(obj, notes)
    if not isinstance(current, Mapping):
        raise CheckpointError(f"{path}: holds a {type(current).__name__}, not a state dict of tensors")
    tensors = {str(k): v for k, v in current.items() if _is_tensor(v)}
    if not tensors:
        keys = ", ".join(map(str, list(current)[:8])) or "none"
        raise CheckpointError(f"{path}: no tensors found (top-level keys: {keys})")
    if where:
        notes.insert(0, f"state dict found under checkpoint{''.join(f'[{k!r}]' for k in where)}")
    dropped = [str(k) for k, v in current.items() if not _is_tensor(v)]
    if dropped:
        shown = ", ".join(dropped[:5]) + (", ..." if len(dropped) > 5 else "")
        notes.append(f"ignored {len(dropped)} non-tensor entries ({shown})")
    return tensors


def _descend(obj: Any, notes: list[str]) -> tuple[Any, list[str]]:
    """Follow wrapper keys down to the state dict, noting at each level the state dicts passed over."""
    where: list[str] = []
    current = _module_state(obj, notes)
    for _ in range(3):
        key = _wrapper_key(current)
        if key is None:
            break
        others = [str(k) for k in (*WRAPPER_KEYS, *EMA_KEYS) if k != key and _is_state(current.get(k))]
        if others:
            notes.append(
                f"checkpoint{''.join(f'[{k!r}]' for k in where)} also holds {', '.join(map(repr, others))}, "
                f"not converted ({key!r} was taken: the training weights come before EMA copies); "
                "a state-dict key chooses another"
            )
        where.append(str(key))
        current = _module_state(current[key], notes)
    return current, where


def _walk(obj: Any, path: str | Path, key: str, notes: list[str]) -> tuple[Any, list[str]]:
    """The object under a named key: the key itself, or dotted parts for nested dicts."""
    current = _module_state(obj, notes)
    if isinstance(current, Mapping) and key in current:
        return _module_state(current[key], notes), [key]
    where: list[str] = []
    for part in key.split("."):
        if not isinstance(current, Mapping) or part not in current:
            available = ", ".join(map(repr, list(current)[:8])) if isinstance(current, Mapping) else "none"
            level = "".join(f"[{k!r}]" for k in where)
            raise CheckpointError(f"{path}: has no state-dict key {key!r} (checkpoint{level} holds {available})")
        where.append(part)
        current = _module_state(current[part], notes)
    return current, where


def _is_tensor(value: Any) -> bool:
    """A ``torch.Tensor`` (torch is then imported: it loaded the file), or a ``TensorRef`` (read as data)."""
    data_reader = sys.modules.get("fc2conv.formats.pickle_data")  # a TensorRef exists only once it is imported
    if data_reader is not None and isinstance(value, data_reader.TensorRef):
        return True
    tensor_type = getattr(sys.modules.get("torch"), "Tensor", None)
    return tensor_type is not None and isinstance(value, tensor_type)


def _is_state(value: Any) -> bool:
    return isinstance(value, Mapping) or _is_module(value)


def _wrapper_key(current: Any) -> Any:
    """The key to descend into from a wrapper dict, or None when ``current`` is the state dict itself."""
    if not isinstance(current, Mapping) or (current and all(_is_tensor(v) for v in current.values())):
        return None
    key = next((k for k in (*WRAPPER_KEYS, *EMA_KEYS) if _is_state(current.get(k))), None)
    if key is not None:
        return key
    nested = [k for k, v in current.items() if isinstance(v, Mapping) and _has_tensors(v)]
    if len(nested) == 1 and not any(_is_tensor(v) for v in current.values()):
        return nested[0]
    return None


def _module_state(obj: Any, notes: list[str]) -> Any:
    """A whole ``nn.Module`` (only loadable with trust_pickle) stands for its ``state_dict()``."""
    if _is_module(obj):
        notes.append(f"unpickled a whole {type(obj).__name__} module; using its state_dict()")
        return obj.state_dict()
    return obj


def _has_tensors(mapping: Mapping[Any, Any], depth: int = 2) -> bool:
    return any(
        _is_tensor(v) or (depth > 1 and isinstance(v, Mapping) and _has_tensors(v, depth - 1)) for v in mapping.values()
    )


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


def _strip_wrapper_prefix(state_dict: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    """Remove ``module.`` (DataParallel) and ``_orig_mod.`` (torch.compile) while every key has one.

    Wrappers nest (a compiled DataParallel model has ``_orig_mod.module.``): prefixes are stripped
    until no key-wide prefix is left, and reported together.
    """
    stripped = []
    while state_dict:
        prefix = next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in state_dict)), None)
        if prefix is None:
            break
        stripped.append(prefix)
        state_dict = {k[len(prefix) :]: v for k, v in state_dict.items()}
    if stripped:
        notes.append(f"stripped the {''.join(stripped)!r} prefix shared by every key")
    return state_dict
