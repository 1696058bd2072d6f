"""What every reader returns, and the small interface a file format implements to join fc2conv."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from fc2conv.diskio import ByteSpan
from fc2conv.errors import CheckpointError
from fc2conv.types import HeadHint, ShapeSpec, TensorInfo, WeightLayout

if TYPE_CHECKING:
    import torch

__all__ = ["Listing", "ReadOptions", "Reader", "ShardLayout", "Source", "check_readable", "natural_key"]


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
    """Sort key comparing the numbers in names as numbers: ``layer.2`` before ``layer.10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def check_readable(path: Path) -> None:
    """Refuse a path that is missing, a folder or unreadable, with the reason in the message."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file")
    if not os.access(path, os.R_OK):
        raise CheckpointError(f"{path}: permission denied (cannot read the file)")
