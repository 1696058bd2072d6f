"""Read Keras models (.keras, legacy .h5) with h5py alone: weights in PyTorch layouts, FC heads from the config.

Nothing here imports keras or runs code from the file. This module tells the two kinds of file
apart, checks what they say of themselves, and puts the pieces together in a :class:`KerasFile`;
its :data:`READER` is the one :mod:`fc2conv.formats` asks. The pieces, each in its own module:

* :mod:`~fc2conv.formats.keras_config`: the model config read as data (layers, what each reads);
* :mod:`~fc2conv.formats.keras_weights`: which dataset holds each layer's variables, in which layout,
  read through :mod:`~fc2conv.formats.keras_h5` (the HDF5 side, read safely);
* :mod:`~fc2conv.formats.keras_heads`: the Flatten -> Dense heads, with the shapes of
  :mod:`~fc2conv.formats.keras_shapes`.

The two kinds of file:

* ``.keras`` (Keras 3, ``keras/src/saving/saving_lib.py``): a zip of ``config.json``,
  ``metadata.json`` (the Keras version) and ``model.weights.h5``.
* legacy ``.h5`` (``keras/src/legacy/saving/legacy_h5_format.py``): attributes ``model_config``,
  ``keras_version`` and ``backend``, and group ``model_weights``.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fc2conv.errors import CheckpointError, PlanError
from fc2conv.formats.base import Listing, ReadOptions, Source, check_readable
from fc2conv.formats.keras_config import ModelGraph, read_config
from fc2conv.formats.keras_h5 import WEIGHTS_H5, attr_text, open_weights, reading
from fc2conv.formats.keras_heads import KerasHead, RefusedHead, find_heads
from fc2conv.formats.keras_weights import LazyTensors, WeightMap, layer_notes, map_h5_weights, map_keras_weights
from fc2conv.types import TensorInfo

if TYPE_CHECKING:
    import h5py
    import torch

__all__ = [
    "FLAVOURS",
    "KerasFile",
    "KerasHead",
    "KerasLayer",
    "KerasReader",
    "READER",
    "RefusedHead",
    "is_keras_file",
    "read_keras",
    "require_head",
]

FLAVOURS = ("keras", "h5 (Keras 3)", "h5 (tf.keras 2)")

_ZIP_MAGIC = b"PK\x03\x04"
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_CONFIG_JSON = "config.json"
_METADATA_JSON = "metadata.json"
# config.json and metadata.json are small; a larger one is not a Keras file (or a zip bomb).
_MAX_JSON_BYTES = 64 * 2**20


@dataclass(frozen=True)
class KerasLayer:
    """One layer of the model, as its config describes it.

    ``name`` is qualified by the models that contain it (``trunk.conv1`` for layer ``conv1`` of the
    nested model ``trunk``); ``inputs`` are the qualified names of the layers it reads; ``tensors`` the
    names under which its weights appear in :attr:`KerasFile.tensors`.
    """

    name: str
    class_name: str
    config: Mapping[str, Any] = field(repr=False, compare=False)
    inputs: tuple[str, ...] = ()
    tensors: tuple[str, ...] = ()
    calls: int = 1  # how many times the model calls it (a shared layer: more than 1)
    builtin: bool = True  # a layer class of Keras itself (not custom, not Lambda)
    model: str = ""  # qualified name of the (nested) model holding it; "" for the top level


@dataclass
class KerasFile:
    """A Keras model file opened for reading: tensors in PyTorch layouts, the layers, the FC heads.

    ``tensors`` is lazy: each access reads one dataset from the file. Their names and layouts are
    PyTorch's (``<layer>.weight`` of a Dense is ``(out, in)``; see :mod:`fc2conv.formats.keras_weights`).
    ``outputs`` are the layers whose outputs the model returns.
    """

    path: Path
    flavour: str  # one of FLAVOURS
    keras_version: str
    backend: str
    config: Mapping[str, Any] = field(repr=False)
    layers: tuple[KerasLayer, ...]
    outputs: tuple[str, ...]
    infos: tuple[TensorInfo, ...]
    tensors: Mapping[str, torch.Tensor] = field(repr=False)
    heads: tuple[KerasHead, ...]
    refused: tuple[RefusedHead, ...]
    notes: tuple[str, ...]

    def layer(self, name: str) -> KerasLayer:
        """The layer of that (qualified) name."""
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)


def is_keras_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` looks like a Keras model: a ``.keras`` zip, or an ``.h5``/``.hdf5``/``.keras`` HDF5 file."""
    p = Path(path)
    if p.suffix.lower() not in (".keras", ".h5", ".hdf5"):
        return False
    try:
        with open(p, "rb") as f:
            head = f.read(8)
    except OSError:
        return True  # let the reader say what is wrong with it
    return head.startswith(_ZIP_MAGIC) or head == _HDF5_MAGIC or p.suffix.lower() == ".keras"


def read_keras(path: str | os.PathLike[str]) -> KerasFile:
    """Read a Keras model file: its tensors (lazily, in PyTorch layouts), its layers and its FC heads.

    Args:
        path: A ``.keras`` file (Keras 3) or a full-model ``.h5`` (Keras 3's ``model.save("x.h5")``
            or tf.keras 2's).

    Returns:
        A :class:`KerasFile`. Heads that cannot be converted with proof (a Lambda or custom layer in
        the chain, an unknown map size) are in ``refused``, with the reason.

    Raises:
        CheckpointError: the file is missing, not a Keras model, corrupt or truncated, or a layer's
            weights are missing or do not fit its config.

    Example:
        >>> kf = read_keras("sample_models/digits_keras.keras")      # doctest: +SKIP
        >>> kf.heads[0].feature_map, kf.heads[0].flatten_order       # doctest: +SKIP
        (InputShape(channels=32, height=4, width=4), 'hwc')
    """
    path = Path(path)
    check_readable(path)
    with reading(path, "cannot read the file"):
        with open(path, "rb") as f:
            head = f.read(8)
    if head.startswith(_ZIP_MAGIC):
        return _read_zip(path)
    if head == _HDF5_MAGIC:
        return _read_h5(path)
    raise CheckpointError(f"{path}: not a Keras model file (neither a .keras zip nor an HDF5 file)")


# --- .keras ---------------------------------------------------------------------------------------


def _read_zip(path: Path) -> KerasFile:
    with reading(path, "not a readable .keras archive (corrupt or truncated zip)"):
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            if _CONFIG_JSON not in names:
                raise CheckpointError(f"{path}: the archive has no {_CONFIG_JSON}; it is not a .keras model")
            if WEIGHTS_H5 not in names:
                other = "model.weights.npz (NumPy weights)" if "model.weights.npz" in names else "no weights file"
                raise CheckpointError(
                    f"{path}: the archive holds {other}, not {WEIGHTS_H5}; fc2conv reads HDF5 weights"
                )
            config = _json_member(path, archive, _CONFIG_JSON)
            metadata = _json_member(path, archive, _METADATA_JSON) if _METADATA_JSON in names else {}
    if not isinstance(config, dict) or "class_name" not in config:
        raise CheckpointError(f"{path}: {_CONFIG_JSON} does not describe a Keras model")
    version = str(metadata.get("keras_version", "unknown")) if isinstance(metadata, dict) else "unknown"
    graph = _read_graph(path, config)
    with reading(path, f"{WEIGHTS_H5} inside the archive is not a readable HDF5 file (corrupt or truncated)"):
        with open_weights(path, in_zip=True) as h5:
            weights = map_keras_weights(path, graph, h5)
    return _keras_file(path, config, graph, weights, flavour="keras", version=version, backend="", in_zip=True)


def _json_member(path: Path, archive: zipfile.ZipFile, name: str) -> Any:
    info = archive.getinfo(name)
    if info.file_size > _MAX_JSON_BYTES:
        raise CheckpointError(f"{path}: {name} is {info.file_size} bytes; a Keras config is far smaller")
    with reading(path, f"{name} is not valid JSON"):
        return json.loads(archive.read(name).decode("utf8"))


# --- legacy .h5 -----------------------------------------------------------------------------------


def _read_h5(path: Path) -> KerasFile:
    with reading(path, "not a readable HDF5 file (corrupt or truncated)"):
        with open_weights(path, in_zip=False) as h5:
            config = _h5_model_config(path, h5)
            version = attr_text(h5.attrs, "keras_version") or "unknown"
            backend = attr_text(h5.attrs, "backend") or "unknown"
            if version.startswith("1"):
                raise CheckpointError(f"{path}: written by Keras {version}; fc2conv reads Keras 2 and 3 files")
            if backend in ("theano", "cntk"):
                raise CheckpointError(
                    f"{path}: written with the {backend} backend, whose conv kernels are stored flipped; "
                    "load and save it again with TensorFlow or Keras 3"
                )
            graph = _read_graph(path, config)
            if "model_weights" not in h5:
                raise CheckpointError(f"{path}: has a model_config but no model_weights group")
            weights = map_h5_weights(path, graph, h5["model_weights"])
    flavour = "h5 (Keras 3)" if version.startswith("3") else "h5 (tf.keras 2)"
    return _keras_file(path, config, graph, weights, flavour=flavour, version=version, backend=backend, in_zip=False)


def _h5_model_config(path: Path, h5: h5py.File) -> dict[str, Any]:
    """The ``model_config`` attribute, parsed; a weights-only file (``save_weights``) is refused."""
    raw_config = attr_text(h5.attrs, "model_config")
    if raw_config is None:
        if "layer_names" in h5.attrs or "model_weights" not in h5:
            raise CheckpointError(
                f"{path}: holds weights only (no model_config attribute); fc2conv needs the whole "
                "model saved with model.save() to know its layers"
            )
        raise CheckpointError(f"{path}: has no model_config attribute; it is not a Keras model file")
    if len(raw_config) > _MAX_JSON_BYTES:
        raise CheckpointError(f"{path}: its model_config is {len(raw_config)} bytes; not a Keras config")
    with reading(path, "its model_config attribute is not valid JSON"):
        config = json.loads(raw_config)
    if not isinstance(config, dict) or "class_name" not in config:
        raise CheckpointError(f"{path}: its model_config does not describe a Keras model")
    return config


# --- the result -----------------------------------------------------------------------------------


def _read_graph(path: Path, config: Mapping[str, Any]) -> ModelGraph:
    with reading(path, "the model config is not a model Keras can describe"):
        return read_config(path, config)


def _keras_file(
    path: Path,
    config: Mapping[str, Any],
    graph: ModelGraph,
    weights: WeightMap,
    *,
    flavour: str,
    version: str,
    backend: str,
    in_zip: bool,
) -> KerasFile:
    """The file as read: its layers with their tensors, the tensors' listing, the heads, the notes."""
    tensors_of = weights.by_layer()
    layers = tuple(
        KerasLayer(
            name=layer.name,
            class_name=layer.class_name,
            config=layer.config,
            inputs=layer.inputs,
            tensors=tensors_of.get(layer.name, ()),
            calls=layer.calls,
            builtin=layer.builtin,
            model=layer.model,
        )
        for layer in graph.layers.values()
    )
    notes = (*weights.notes, *layer_notes(graph, weights))
    infos = tuple(TensorInfo(spec.name, spec.shape, spec.dtype) for spec in weights.specs)
    heads, refused = find_heads(path, graph, {info.name: info.shape for info in infos})
    writer = f"Keras {version}" + (f", backend {backend}" if backend else "")
    return KerasFile(
        path=path,
        flavour=flavour,
        keras_version=version,
        backend=backend,
        config=config,
        layers=layers,
        outputs=graph.outputs,
        infos=infos,
        tensors=LazyTensors(path, in_zip, weights.specs),
        heads=heads,
        refused=refused,
        notes=(f"{flavour} file written by {writer}", *notes),
    )


# --- the reader interface of fc2conv.formats --------------------------------------------------------


class KerasReader:
    """fc2conv's reader for Keras files (``.keras``, ``.h5``, ``.hdf5``), for ``fc2conv.formats.READERS``."""

    format = "keras"

    def claims(self, path: Path) -> bool:
        return is_keras_file(path)

    def listing(self, path: Path, options: ReadOptions) -> Listing:
        """Names, shapes and dtypes (reads the config and the HDF5 headers, no tensor data), and the heads."""
        return self.open(path, options)

    def open(self, path: Path, options: ReadOptions) -> Source:
        """The listing plus lazy tensors in PyTorch layouts; the heads come from the model's config."""
        kf = read_keras(path)
        return Source(
            path=path, format=kf.flavour, infos=list(kf.infos), notes=list(_listing_notes(kf)), module_order=True,
            heads=tuple(head.hint for head in kf.heads), heads_refused=tuple(r.reason for r in kf.refused),
            tensors=kf.tensors, native=kf,
        )  # fmt: skip


def _listing_notes(kf: KerasFile) -> Iterator[str]:
    yield from kf.notes
    for refused in kf.refused:
        yield f"not converted: {refused.reason}"


READER = KerasReader()


def require_head(kf: KerasFile, name: str | None = None) -> KerasHead:
    """The head to convert: the only one, or the one whose Flatten or Dense layer is ``name``.

    Raises:
        PlanError: no head (with the reasons of refused ones), several and none chosen, or no such head.
    """
    if name is not None:
        for head in kf.heads:
            if name == head.flatten or name in head.dense:
                return head
        for refused in kf.refused:
            if refused.flatten == name:
                raise PlanError(refused.reason)
        raise PlanError(f"{kf.path}: no Flatten -> Dense head involves layer {name!r}")
    if len(kf.heads) == 1:
        return kf.heads[0]
    if not kf.heads:
        if kf.refused:
            raise PlanError(kf.refused[0].reason)
        raise PlanError(f"{kf.path}: no Flatten feeds a Dense layer; there is no FC head to convert")
    names = ", ".join(f"{h.flatten} -> {' -> '.join(h.dense)}" for h in kf.heads)
    raise PlanError(f"{kf.path}: {len(kf.heads)} heads ({names}); name the one to convert")
