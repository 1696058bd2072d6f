"""Hugging Face sharded safetensors: find the shards of a checkpoint, open them lazily, write an index."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fc2conv.errors import CheckpointError
from fc2conv.plan import TensorInfo

if TYPE_CHECKING:
    import torch

INDEX_SUFFIX = ".safetensors.index.json"


@dataclass(frozen=True)
class ShardSet:
    """The shards of one checkpoint: file names in order, and which shard holds each tensor."""

    folder: Path
    index: Path | None  # None: a folder of shards without an index
    files: tuple[str, ...]
    weight_map: dict[str, str]
    index_metadata: dict[str, Any]


def is_sharded(path: str | os.PathLike[str]) -> bool:
    """An index file, or a folder (which must then hold an index or ``.safetensors`` shards)."""
    path = Path(path)
    return path.name.endswith(INDEX_SUFFIX) or path.is_dir()


def find_shards(path: str | os.PathLike[str]) -> ShardSet:
    """Read ``*.safetensors.index.json`` (given, or the only one in a folder), or list a folder's shards.

    Raises:
        CheckpointError: no index and no shards, several indexes, a malformed index, or an index
            naming a shard that is missing.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_dir():
        indexes = sorted(path.glob(f"*{INDEX_SUFFIX}"))
        if len(indexes) > 1:
            names = ", ".join(p.name for p in indexes)
            raise CheckpointError(f"{path}: holds several indexes ({names}); name the one to use")
        if not indexes:
            files = sorted((p.name for p in path.glob("*.safetensors")), key=natural_key)
            if not files:
                raise CheckpointError(
                    f"{path}: is a directory, not a checkpoint (it holds no *.safetensors shards and no "
                    f"*{INDEX_SUFFIX})"
                )
            return ShardSet(path, None, tuple(files), {}, {})
        path = indexes[0]
    try:
        index = json.loads(path.read_text())
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise TypeError("weight_map must map tensor names to file names")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: not a valid safetensors index ({exc})") from exc
    for file in set(weight_map.values()):
        if Path(file).name != file:
            raise CheckpointError(f"{path}: shard name {file!r} is not a plain file name")
        if not (path.parent / file).is_file():
            raise CheckpointError(f"{path}: names shard {file!r}, which is missing")
    files = tuple(dict.fromkeys(sorted(weight_map.values(), key=natural_key)))
    metadata = index.get("metadata") if isinstance(index.get("metadata"), dict) else {}
    return ShardSet(path.parent, path, files, dict(weight_map), metadata)


def natural_key(name: str) -> list[Any]:
    """Sort key comparing the numbers in names as numbers: ``layer.2`` before ``layer.10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def read_shard_infos(shards: ShardSet) -> tuple[list[TensorInfo], dict[str, list[str]], dict[str, str]]:
    """Tensor infos of all shards (headers only), the tensor names of each shard, and shard 0's metadata.

    Raises:
        CheckpointError: a tensor in two shards, or an index that disagrees with the shards' headers.
    """
    from fc2conv.io import read_safetensors_header

    infos: list[TensorInfo] = []
    by_shard: dict[str, list[str]] = {}
    owner: dict[str, str] = {}
    metadata: dict[str, str] = {}
    for file in shards.files:
        header = read_safetensors_header(shards.folder / file)
        if not metadata:
            metadata = header.metadata
        names = []
        for info in sorted(header.infos, key=lambda i: natural_key(i.name)):
            if info.name in owner:
                raise CheckpointError(f"{shards.folder}: tensor {info.name!r} is in both {owner[info.name]} and {file}")
            owner[info.name] = file
            names.append(info.name)
            infos.append(info)
        by_shard[file] = names
    if shards.index is not None:
        wrong = [n for n, f in shards.weight_map.items() if owner.get(n) != f]
        unlisted = [n for n in owner if n not in shards.weight_map]
        if wrong or unlisted:
            example = (wrong or unlisted)[0]
            raise CheckpointError(
                f"{shards.index}: the index does not match the shards ({len(wrong)} tensors listed in the wrong "
                f"or no shard, {len(unlisted)} not listed; e.g. {example!r})"
            )
    infos.sort(key=lambda i: natural_key(i.name))
    return infos, by_shard, metadata


class ShardedTensors(Mapping[str, "torch.Tensor"]):
    """Name -> tensor over all shards; each shard is opened (memory-mapped) when first needed."""

    def __init__(self, shards: ShardSet, by_shard: dict[str, list[str]], order: list[str]) -> None:
        self._folder = shards.folder
        self._owner = {name: file for file, names in by_shard.items() for name in names}
        self._order = order
        self._handles: dict[str, Any] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        file = self._owner[name]
        handle = self._handles.get(file)
        if handle is None:
            from safetensors import safe_open

            handle = self._handles[file] = safe_open(str(self._folder / file), framework="pt")
        return handle.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._order)

    def __len__(self) -> int:
        return len(self._order)


def index_json(weight_map: Mapping[str, str], total_size: int, metadata: Mapping[str, Any]) -> str:
    """A Hugging Face index: ``{"metadata": {"total_size": ..., ...}, "weight_map": {...}}``."""
    return json.dumps({"metadata": {**metadata, "total_size": total_size}, "weight_map": dict(weight_map)}, indent=2)
