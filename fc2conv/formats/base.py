"""What every reader returns, and the small interface a file format implements to join fc2conv."""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol

from fc2conv.diskio import ByteSpan
from fc2conv.errors import CheckpointError
from fc2conv.types import HeadHint, ShapeSpec, TensorInfo, WeightLayout

if TYPE_CHECKING:
    import torch

__all__ = [
    "MAX_JSON_BYTES",
    "Listing",
    "ReadOptions",
    "Reader",
    "ShardLayout",
    "Source",
    "check_readable",
    "natural_key",
    "open_regular",
    "read_json",
]

# JSON files that fc2conv reads (an index) are capped: a 2 GiB or endless (/dev/zero) "index" is refused
# unread. The largest real indexes (mixture-of-experts models, ~100k tensors) are around 10 MB.
MAX_JSON_BYTES = 64 * 2**20


@dataclass(frozen=True)
class ReadOptions:
    """How to read a checkpoint, whatever its format.

    ``trust_pickle`` unpickles arbitrary objects (``torch.load(weights_only=False)``): it runs any code
    the file holds, so it is for files the caller trusts.
    """

    trust_pickle: bool = False
    state_dict_key: str | None = None  # where a training checkpoint keeps the weights to read ("model_ema")
    input_shape: ShapeSpec | None = None  # a graph's input size (C x H x W), where an ONNX graph leaves it open


@dataclass(frozen=True)
class ShardLayout:
    """The files of a sharded checkpoint: which shard holds which tensors, and its index (if any)."""

    folder: Path
    index: Path | None  # None: a folder of shards without an index
    files: tuple[str, ...]
    tensors_by_file: Mapping[str, tuple[str, ...]]
    index_metadata: Mapping[str, Any]


@dataclass
class Listing:
    """Names, shapes and dtypes of a checkpoint's tensors, its metadata, and what was found on the way.

    All that planning and ``inspect`` need; for safetensors it comes from the headers alone.
    """

    path: Path
    format: str  # "torch", "safetensors", "sharded safetensors", ...
    infos: list[TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    module_order: bool = False  # infos come in module order (a PyTorch state dict), not sorted by name
    layout_hints: dict[str, WeightLayout] = field(default_factory=dict)  # FC layouts known from elsewhere
    # The heads the file itself describes (a model's config: nothing to infer); None for weights alone.
    heads: tuple[HeadHint, ...] | None = None
    heads_refused: tuple[str, ...] = ()  # why the file's other heads cannot be converted with proof
    native: Any = None  # the format's own reading of the file (a KerasFile, an OnnxFile), for its own outputs

    @cached_property
    def info_by_name(self) -> dict[str, TensorInfo]:
        """``infos`` by name, made once (a sharded checkpoint's shards each look names up in it)."""
        return {info.name: info for info in self.infos}


@dataclass
class Source(Listing):
    """A checkpoint opened for reading: its listing plus a way to fetch each tensor.

    Tensors are fetched on demand (memory-mapped where the file allows), so holding a Source costs
    little memory even for multi-gigabyte files.
    """

    tensors: Mapping[str, torch.Tensor] = field(default_factory=dict)
    # Where each tensor's bytes lie in the file(s), for those stored contiguous and little-endian: the
    # writer copies them in the kernel and the byte proof compares them mapped, without torch.
    spans: Mapping[str, ByteSpan] = field(default_factory=dict)
    shards: ShardLayout | None = None  # a sharded checkpoint: its files
    module: Any = None  # a whole nn.Module, unpickled because the caller trusted the file


class Reader(Protocol):
    """A file format: which paths it reads, their listing (cheaply) and their tensors.

    A new format is a module in ``fc2conv/formats/`` defining a reader, plus one line in
    :data:`fc2conv.formats.READERS`.
    """

    @property
    def format(self) -> str:
        """The format's name, as listings report it (``"torch"``, ``"safetensors"``, ...)."""
        ...

    def claims(self, path: Path) -> bool:
        """Whether this reader is the one for ``path`` (by name or kind; never by reading much)."""
        ...

    def listing(self, path: Path, options: ReadOptions) -> Listing:
        """Names, shapes and dtypes, reading as little as the format allows."""
        ...

    def open(self, path: Path, options: ReadOptions) -> Source:
        """The listing plus lazy access to every tensor."""
        ...


def natural_key(name: str) -> list[Any]:
    """Sort key comparing the numbers in names as numbers: ``layer.2`` before ``layer.10``.

    Runs of digits (every other part of the split) compare by length, then digit by digit, without
    ``int()``: a name from a file may hold a run of 5000 digits, which ``int()`` refuses.
    """
    parts = re.split(r"(\d+)", name)
    return [(len(part.lstrip("0")), part.lstrip("0")) if i % 2 else part for i, part in enumerate(parts)]


def check_readable(path: Path) -> None:
    """Refuse a path that is missing, a folder, not a regular file or unreadable, with the reason in the message.

    A FIFO or a socket would block the reader for ever and a device never ends (``/dev/zero``): only
    regular files (or links to them) are read.
    """
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read it ({exc.strerror or exc})") from exc
    if stat.S_ISDIR(mode):
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file")
    _require_regular(path, mode)
    if not os.access(path, os.R_OK):
        raise CheckpointError(f"{path}: permission denied (cannot read the file)")


def _require_regular(path: Path, mode: int) -> None:
    if not stat.S_ISREG(mode):
        kinds = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                 (stat.S_ISBLK, "a block device"))  # fmt: skip
        kind = next((name for test, name in kinds if test(mode)), "a special file")
        raise CheckpointError(f"{path}: is not a regular file ({kind}); refusing to read it")


def open_regular(path: Path) -> BinaryIO:
    """Open a regular file for reading; anything else is refused at once, never waited on.

    ``O_NONBLOCK`` makes the open of a FIFO (swapped in after :func:`check_readable`) return at once,
    and the descriptor is checked again: what is read is what was checked.
    """
    check_readable(path)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot open it ({exc.strerror or exc})") from exc
    try:
        _require_regular(path, os.fstat(fd).st_mode)
    except CheckpointError:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def read_json(path: Path, what: str, limit: int = MAX_JSON_BYTES) -> Any:
    """Parse a JSON file of at most ``limit`` bytes; larger ones are refused before anything is read.

    Raises:
        CheckpointError: not a regular file, too large, or not valid JSON (nested too deeply included).
    """
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        raw = f.read(limit + 1) if size <= limit else b""
    if size > limit or len(raw) > limit:
        raise CheckpointError(f"{path}: is {max(size, len(raw))} bytes, more than a {what} can be ({limit} at most)")
    try:
        return json.loads(raw)
    except RecursionError as exc:
        raise CheckpointError(f"{path}: not a valid {what} (JSON nested too deeply)") from exc
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{path}: not a valid {what} ({exc})") from exc
