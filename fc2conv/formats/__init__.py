"""Reading checkpoints: one module per file format, chosen here and only here.

Each format module defines a :class:`~fc2conv.formats.base.Reader`; :data:`READERS` lists them in
the order they are asked, and the first that claims a path reads it. A new input format is a new
module plus one line in that tuple. Importing this package imports no heavy library: readers import
torch, safetensors (and so on) when they read.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from fc2conv.formats import hf_shards, safetensors, torch_pickle
from fc2conv.formats.base import Listing, Reader, ReadOptions, ShardLayout, Source, check_readable
from fc2conv.formats.hf_config import add_layout_hints
from fc2conv.types import ShapeSpec

__all__ = [
    "READERS",
    "Listing",
    "ReadOptions",
    "Reader",
    "ShardLayout",
    "Source",
    "open_source",
    "read_listing",
    "reader_for",
]


class _Deferred:
    """A reader whose module is imported only for a path with one of its suffixes.

    The Keras and ONNX readers are many modules: a run on a safetensors file, or ``--help``, need not
    load them.
    """

    def __init__(self, module: str, suffixes: tuple[str, ...]) -> None:
        self._module, self._suffixes = module, suffixes

    @property
    def reader(self) -> Reader:
        reader: Reader = importlib.import_module(self._module).READER
        return reader

    @property
    def format(self) -> str:
        return self.reader.format

    def claims(self, path: Path) -> bool:
        return path.suffix.lower() in self._suffixes and self.reader.claims(path)

    def listing(self, path: Path, options: ReadOptions) -> Listing:
        return self.reader.listing(path, options)

    def open(self, path: Path, options: ReadOptions) -> Source:
        return self.reader.open(path, options)


READERS: tuple[Reader, ...] = (
    hf_shards.READER,  # an index file or a folder of shards
    safetensors.READER,  # *.safetensors
    _Deferred("fc2conv.formats.keras", (".keras", ".h5", ".hdf5")),  # Keras models, read as data with h5py
    _Deferred("fc2conv.formats.onnx", (".onnx",)),  # ONNX graphs (rewritten in the graph: fc2conv.jobs.onnx)
    torch_pickle.READER,  # everything else: .pt, .pth, .bin, .ckpt, ...
)


def reader_for(path: str | os.PathLike[str]) -> Reader:
    """The reader for ``path``: the first in :data:`READERS` that claims it.

    Raises:
        CheckpointError: ``path`` is neither a folder (of shards) nor a readable regular file: a FIFO
            would block a reader that opens it to look (before any reader is asked), a device never ends.
    """
    if not Path(path).is_dir():
        check_readable(Path(path))
    return next(reader for reader in READERS if reader.claims(Path(path)))


def read_listing(
    path: str | os.PathLike[str],
    *,
    trust_pickle: bool = False,
    input_shape: ShapeSpec | None = None,
    state_dict_key: str | None = None,
) -> Listing:
    """Names, shapes and dtypes of a checkpoint's tensors, its metadata and loading notes.

    For safetensors (single or sharded) only the headers are read, and torch is not imported.

    Raises:
        CheckpointError: the file is missing, unreadable, corrupt, or holds pickled code.
    """
    options = ReadOptions(trust_pickle=trust_pickle, input_shape=input_shape, state_dict_key=state_dict_key)
    return add_layout_hints(reader_for(path).listing(Path(path), options))


def open_source(
    path: str | os.PathLike[str],
    *,
    trust_pickle: bool = False,
    input_shape: ShapeSpec | None = None,
    state_dict_key: str | None = None,
) -> Source:
    """Open a checkpoint without running code from it (unless ``trust_pickle``); tensors are lazy.

    Raises:
        CheckpointError: the file is missing, unreadable, corrupt, or holds pickled code.
    """
    options = ReadOptions(trust_pickle=trust_pickle, input_shape=input_shape, state_dict_key=state_dict_key)
    source = reader_for(path).open(Path(path), options)
    add_layout_hints(source)
    return source
