"""Hugging Face sharded safetensors: an index (or a folder of shards), opened lazily, and a new index."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fc2conv.diskio import ByteSpan
from fc2conv.errors import CheckpointError
from fc2conv.formats.base import Listing, ReadOptions, ShardLayout, Source, natural_key, read_json
from fc2conv.formats.safetensors import read_safetensors_header, safetensors_handle
from fc2conv.types import TensorInfo

if TYPE_CHECKING:
    import torch

__all__ = ["INDEX_SUFFIX", "READER", "index_json", "is_sharded", "open_sharded"]

INDEX_SUFFIX = ".safetensors.index.json"


def is_sharded(path: str | os.PathLike[str]) -> bool:
    """An index file, or a folder (which must then hold an index or ``.safetensors`` shards)."""
    path = Path(path)
    return path.name.endswith(INDEX_SUFFIX) or path.is_dir()


@dataclass(frozen=True)
class _Index:
    """Where the shards are and what the index (if any) says of them."""

    folder: Path
    index: Path | None
    files: tuple[str, ...]
    weight_map: dict[str, str]
    metadata: dict[str, Any]


def _find_shards(path: Path) -> _Index:
    """Read ``*.safetensors.index.json`` (given, or the only one in a folder), or list a folder's shards.

    Raises:
        CheckpointError: no index and no shards, several indexes, a malformed index, or an index
            naming a shard that is missing.
    """
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_dir():
        indexes = sorted(path.glob(f"*{INDEX_SUFFIX}"))
        if len(indexes) > 1:
            names = ", ".join(p.name for p in indexes)
            raise CheckpointError(f"{path}: holds several indexes ({names}); name the one to use")
        if not indexes:
            shard_files = sorted((p.name for p in path.glob("*.safetensors")), key=natural_key)
            if not shard_files:
                raise CheckpointError(
                    f"{path}: is a directory, not a checkpoint (it holds no *.safetensors shards and no "
                    f"*{INDEX_SUFFIX})"
                )
            return _Index(path, None, tuple(shard_files), {}, {})
        path = indexes[0]
    weight_map, metadata = _read_index(path)
    for file in set(weight_map.values()):
        if Path(file).name != file:
            raise CheckpointError(f"{path}: shard name {file!r} is not a plain file name")
        if not (path.parent / file).exists():
            raise CheckpointError(f"{path}: names shard {file!r}, which is missing")
    files = tuple(dict.fromkeys(sorted(weight_map.values(), key=natural_key)))
    return _Index(path.parent, path, files, weight_map, metadata)


def _inside(found: _Index) -> _Index:
    """Refuse a shard (or an index found in a folder) that is a link to a file outside the checkpoint's folder.

    Otherwise a downloaded folder could make fc2conv read, and copy into its output, any file the
    user can read (``model-00002.safetensors -> ~/private/other.safetensors``). In a Hugging Face cache
    every file of ``<repo>/snapshots/<revision>/`` is a link to ``<repo>/blobs/<hash>``: there the
    repository's cache folder is the one links must stay in.
    """
    folder = found.folder.resolve()
    if folder.parent.name == "snapshots":
        folder = folder.parent.parent
    for name in (*found.files, *([found.index.name] if found.index is not None else [])):
        target = (found.folder / name).resolve()
        if not target.is_relative_to(folder):
            raise CheckpointError(
                f"{found.folder / name}: is a link to {target}, outside the checkpoint folder {folder}; "
                "refusing to read it"
            )
    return found


def _read_index(path: Path) -> tuple[dict[str, str], dict[str, Any]]:
    index = read_json(path, "safetensors index")
    try:
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise TypeError("weight_map must map tensor names to file names")
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: not a valid safetensors index ({exc})") from exc
    metadata = index.get("metadata") if isinstance(index.get("metadata"), dict) else {}
    return dict(weight_map), metadata


def _listing(path: Path, spans: dict[str, ByteSpan] | None = None) -> tuple[Listing, ShardLayout]:
    """Headers of every shard, checked against each other and against the index (``spans`` filled too)."""
    found = _inside(_find_shards(path))
    folder, index, files = found.folder, found.index, found.files
    infos: list[TensorInfo] = []
    by_file: dict[str, tuple[str, ...]] = {}
    owner: dict[str, str] = {}
    metadata: dict[str, str] = {}
    for file in files:
        header = read_safetensors_header(folder / file)
        if spans is not None:
            spans.update(header.spans(folder / file))
        metadata = metadata or header.metadata
        names = []
        for info in sorted(header.infos, key=lambda i: natural_key(i.name)):
            if info.name in owner:
                raise CheckpointError(f"{folder}: tensor {info.name!r} is in both {owner[info.name]} and {file}")
            owner[info.name] = file
            names.append(info.name)
            infos.append(info)
        by_file[file] = tuple(names)
    if index is not None:
        wrong = [n for n, f in found.weight_map.items() if owner.get(n) != f]
        unlisted = [n for n in owner if n not in found.weight_map]
        if wrong or unlisted:
            example = (wrong or unlisted)[0]
            raise CheckpointError(
                f"{index}: the index does not match the shards ({len(wrong)} tensors listed in the wrong "
                f"or no shard, {len(unlisted)} not listed; e.g. {example!r})"
            )
    infos.sort(key=lambda i: natural_key(i.name))
    source = index.name if index else "the folder (no index)"
    note = f"sharded safetensors: {len(infos)} tensors in {len(files)} shards, from {source}"
    layout = ShardLayout(folder, index, files, by_file, found.metadata)
    return Listing(Path(path), "sharded safetensors", infos, metadata, [note]), layout


def open_sharded(path: str | os.PathLike[str]) -> Source:
    """Open a sharded checkpoint (an index file, or a folder of shards); shards are mapped when first read."""
    spans: dict[str, ByteSpan] = {}
    listing, layout = _listing(Path(path), spans)
    tensors = _ShardedTensors(layout, [i.name for i in listing.infos])
    return Source(
        listing.path, listing.format, listing.infos, listing.metadata, listing.notes, tensors=tensors,
        spans=spans if sys.byteorder == "little" else {}, shards=layout,
    )  # fmt: skip


class _ShardedTensors(Mapping[str, "torch.Tensor"]):
    """Name -> tensor over all shards; each shard is opened (memory-mapped) when first needed."""

    def __init__(self, layout: ShardLayout, order: list[str]) -> None:
        self._folder = layout.folder
        self._owner = {name: file for file, names in layout.tensors_by_file.items() for name in names}
        self._order = order
        self._handles: dict[str, Any] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        file = self._owner[name]
        handle = self._handles.get(file)
        if handle is None:
            handle = self._handles[file] = safetensors_handle(self._folder / file)
        return handle.get_tensor(name)

    def __contains__(self, name: object) -> bool:  # by name: Mapping's default would load the tensor (and torch)
        return name in self._owner

    def __iter__(self) -> Iterator[str]:
        return iter(self._order)

    def __len__(self) -> int:
        return len(self._order)


class _ShardsReader:
    """Reader for sharded checkpoints: an index file, or a folder of shards."""

    format = "sharded safetensors"

    def claims(self, path: Path) -> bool:
        return is_sharded(path)

    def listing(self, path: Path, options: ReadOptions) -> Listing:
        return _listing(path)[0]

    def open(self, path: Path, options: ReadOptions) -> Source:
        return open_sharded(path)


READER = _ShardsReader()


def index_json(weight_map: Mapping[str, str], total_size: int, metadata: Mapping[str, Any]) -> str:
    """A Hugging Face index: ``{"metadata": {"total_size": ..., ...}, "weight_map": {...}}``."""
    return json.dumps({"metadata": {**metadata, "total_size": total_size}, "weight_map": dict(weight_map)}, indent=2)
