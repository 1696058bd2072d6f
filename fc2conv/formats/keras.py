"""Read Keras models (.keras, legacy .h5) with h5py alone: weights in PyTorch layouts, FC heads from the config.

Nothing here imports keras or runs code from the file: ``config.json`` / ``model_config`` is read as
data (a Lambda layer's code stays a string), and weights are read as HDF5 datasets. How a file maps
weights to layers follows Keras's own loaders:

* ``.keras`` (Keras 3, ``keras/src/saving/saving_lib.py``): a zip of ``config.json``,
  ``metadata.json`` and ``model.weights.h5``. Weights sit under class-and-position paths,
  ``layers/<snake_case(class)>[_<n>]/vars/<i>``, numbered in the order of the model's ``layers``
  (a Sequential omits its InputLayer, a Functional keeps it); a nested model's layers sit under its
  own path. Variables are numbered in creation order (Dense: kernel, bias; BatchNormalization:
  gamma, beta, moving_mean, moving_variance, without gamma/beta when ``scale``/``center`` is off).
* legacy ``.h5`` (``keras/src/legacy/saving/legacy_h5_format.py``): attribute ``model_config``,
  group ``model_weights/<layer>`` with a ``weight_names`` attribute naming each dataset
  (``fc1/kernel`` in Keras 3, ``fc1/kernel:0`` in tf.keras 2; a nested model's group holds its
  layers' weights as ``<sublayer>/<variable>``).
"""

from __future__ import annotations

import json
import math
import os
import re
import zipfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fc2conv.errors import CheckpointError, Fc2ConvError, PlanError
from fc2conv.formats.base import Listing, ReadOptions, Source
from fc2conv.types import FlattenOrder, HeadHint, InputShape, TensorInfo

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
_WEIGHTS_H5 = "model.weights.h5"
# config.json and metadata.json are small; a larger one is not a Keras file (or a zip bomb).
_MAX_JSON_BYTES = 64 * 2**20
# A dataset declaring far more bytes than it stores is a shape/decompression bomb (as Keras refuses).
_BOMB_FLOOR_BYTES = 2**32
_BOMB_MAX_EXPANSION = 1000

_CONTAINERS = {"Sequential", "Functional", "Model"}

# Layers that act on each value alone: allowed anywhere in a head, including between the Flatten and
# the first Dense (they commute with the flatten).
_ELEMENTWISE = {
    "Dropout",
    "GaussianNoise",
    "GaussianDropout",
    "AlphaDropout",
    "ActivityRegularization",
    "Identity",
    "ReLU",
    "LeakyReLU",
    "ELU",
    "ThresholdedReLU",
}
_ELEMENTWISE_ACTIVATIONS = {
    "linear", "relu", "relu6", "sigmoid", "tanh", "elu", "selu", "softplus", "softsign", "swish", "silu",
    "gelu", "exponential", "hard_sigmoid", "hard_silu", "hard_swish", "leaky_relu", "mish", "log_sigmoid",
    "celu", "hard_tanh", "squareplus", "sparse_plus", "soft_shrink", "hard_shrink", "tanh_shrink",
    "threshold",
}  # fmt: skip
# Over the last axis of a (N, units) tensor: valid after a Dense (one position, the units are the channels).
_FEATURE_ACTIVATIONS = {"softmax", "log_softmax"}

# Layers whose ``data_format`` says where a map's channels are.
_SPATIAL_2D = {
    "Conv2D",
    "Conv2DTranspose",
    "DepthwiseConv2D",
    "SeparableConv2D",
    "MaxPooling2D",
    "AveragePooling2D",
    "ZeroPadding2D",
    "Cropping2D",
    "UpSampling2D",
    "SpatialDropout2D",
}
# Shape-preserving layers that a walk back to the map's producer may pass through.
_PASS_THROUGH = _ELEMENTWISE | {"Activation", "Softmax", "BatchNormalization", "LayerNormalization", "Rescaling"}
_MERGE = {"Add", "Subtract", "Multiply", "Average", "Maximum", "Minimum"}

_TENSOR_PREFIX = "__keras_tensor__"


# --- what a read returns -------------------------------------------------------------------------


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

    @property
    def short_name(self) -> str:
        return self.name.rpartition(".")[2]


@dataclass(frozen=True)
class KerasHead:
    """A Flatten feeding a chain of Dense layers: what becomes an H x W conv and then 1x1 convs.

    ``feature_map`` is the map the Flatten reads, as (C, H, W); ``flatten_order`` says how Keras
    flattened it, in PyTorch's terms: ``"hwc"`` (channels-last flatten) or ``"chw"``.
    ``map_format`` is the layout of that map in the model (``channels_last`` or ``channels_first``).
    ``layers`` is the chain after the Flatten, in order (Dense layers and the elementwise layers
    between and after them); ``dense`` only its Dense layers.
    """

    flatten: str
    dense: tuple[str, ...]
    layers: tuple[str, ...]
    feature_map: InputShape
    flatten_order: FlattenOrder
    map_format: str
    source: str

    @property
    def hint(self) -> HeadHint:
        """What planning needs of this head: its Dense layers, the map and the order."""
        return HeadHint(self.dense, self.feature_map, self.flatten_order, self.source)

    @property
    def between(self) -> tuple[str, ...]:
        """The chain's layers that are not Dense (Dropout, Activation, BatchNormalization, ...)."""
        return tuple(name for name in self.layers if name not in self.dense)


@dataclass(frozen=True)
class RefusedHead:
    """A Flatten whose chain cannot be converted with proof, and why (the message names file and layers)."""

    flatten: str
    reason: str


@dataclass
class KerasFile:
    """A Keras model file opened for reading: tensors in PyTorch layouts, the layers, the FC heads.

    ``tensors`` is lazy: each access reads one dataset from the file. Names and layouts:

    * Dense ``kernel (in, out)`` -> ``<layer>.weight (out, in)``, ``bias`` -> ``<layer>.bias``;
    * Conv2D ``kernel (kh, kw, in, out)`` -> ``<layer>.weight (out, in, kh, kw)`` (Keras stores conv
      kernels this way whatever the layer's ``data_format``), ``<layer>.bias``;
    * BatchNormalization ``gamma, beta, moving_mean, moving_variance`` -> ``weight, bias,
      running_mean, running_var`` (absent when ``scale``/``center`` is off: see ``notes``);
    * anything else keeps Keras's layout under ``<layer>.<variable>`` (``<layer>.vars.<i>`` when the
      file does not say the variable's name).
    """

    path: Path
    flavour: str  # one of FLAVOURS
    keras_version: str
    backend: str
    config: Mapping[str, Any] = field(repr=False)
    layers: tuple[KerasLayer, ...]
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


# --- tensors --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _TensorSpec:
    """Where one tensor sits in the weights file, and how it becomes PyTorch's layout."""

    name: str  # fc2conv's name: "<layer>.weight"
    layer: str
    variable: str  # Keras's name: "kernel", "gamma", ... or the index in a .keras vars group
    dataset: str  # path inside the HDF5 file
    keras_shape: tuple[int, ...]
    dtype: str
    layout: str | None  # "dense", "conv2d" or None (kept as stored)

    @property
    def shape(self) -> tuple[int, ...]:
        s = self.keras_shape
        if self.layout == "dense":
            return (s[1], s[0])
        if self.layout == "conv2d":
            return (s[3], s[2], s[0], s[1])
        return s


class _LazyTensors(Mapping[str, "torch.Tensor"]):
    """Name -> tensor in PyTorch layout, read from the file when asked for."""

    def __init__(self, path: Path, in_zip: bool, specs: Sequence[_TensorSpec]) -> None:
        self._path = path
        self._in_zip = in_zip
        self._specs = {spec.name: spec for spec in specs}

    def __getitem__(self, name: str) -> torch.Tensor:
        spec = self._specs[name]
        tensor = self.keras(spec)
        if spec.layout == "dense":
            tensor = tensor.t()
        elif spec.layout == "conv2d":
            tensor = tensor.permute(3, 2, 0, 1)
        return tensor.contiguous()

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)

    def keras(self, spec: _TensorSpec) -> torch.Tensor:
        """The stored array as a tensor, in Keras's layout."""
        with _reading(self._path, f"layer {spec.layer}: cannot read {spec.dataset}"):
            with _open_weights(self._path, self._in_zip) as h5:
                return _read_dataset(h5, spec)


def _read_dataset(h5: h5py.File, spec: _TensorSpec) -> torch.Tensor:
    import numpy as np
    import torch

    dataset = _dataset(h5, spec.dataset)
    if spec.dtype == "bfloat16":  # stored opaque, 2 bytes each (keras's H5IOStore)
        raw = np.ascontiguousarray(np.asarray(dataset[()])).view(np.uint16)
        return torch.from_numpy(raw.copy()).view(torch.bfloat16)
    array = np.asarray(dataset[()])
    if not array.flags.writeable:
        array = array.copy()
    return torch.from_numpy(np.ascontiguousarray(array))


def _torch_dtype_name(dataset: h5py.Dataset) -> str:
    import numpy as np

    stored = dataset.attrs.get("dtype")
    if isinstance(stored, bytes):
        stored = stored.decode("utf8", "replace")
    if stored == "bfloat16" and dataset.dtype.itemsize == 2:
        return "bfloat16"
    kind = np.dtype(dataset.dtype)
    if kind.kind in "fiub" and kind.byteorder in "=<|":
        return "bool" if kind.kind == "b" else str(kind)
    return f"unsupported ({kind})"


# --- reading --------------------------------------------------------------------------------------

_READ_ERRORS = (OSError, KeyError, ValueError, TypeError, IndexError, RuntimeError, EOFError, zlib.error)


@contextmanager
def _reading(path: Path, what: str) -> Iterator[None]:
    """Turn whatever h5py, zipfile or json raise into one CheckpointError line naming the file."""
    try:
        yield
    except Fc2ConvError:
        raise
    except (*_READ_ERRORS, zipfile.BadZipFile, json.JSONDecodeError, UnicodeDecodeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: {what} ({reason})") from exc


@contextmanager
def _open_weights(path: Path, in_zip: bool) -> Iterator[h5py.File]:
    import h5py

    if in_zip:
        with zipfile.ZipFile(path) as archive, archive.open(_WEIGHTS_H5) as member:
            with h5py.File(member, "r") as h5:
                yield h5
    else:
        with h5py.File(path, "r") as h5:
            yield h5


def _dataset(h5: h5py.File, path: str) -> h5py.Dataset:
    """The dataset at ``path``, refusing links, external or virtual storage and shape bombs (as Keras does)."""
    import h5py

    group: Any = h5
    parts = path.split("/")
    for index, part in enumerate(parts):
        if not part or part not in group:
            raise KeyError(f"no {path!r} in the weights file")
        link = group.get(part, getlink=True)
        if isinstance(link, (h5py.SoftLink, h5py.ExternalLink)):
            raise ValueError(f"{path!r} is a {type(link).__name__}, which fc2conv does not follow")
        group = group[part]
        if index < len(parts) - 1 and not isinstance(group, h5py.Group):
            raise ValueError(f"{'/'.join(parts[: index + 1])!r} is not a group")
    if not isinstance(group, h5py.Dataset):
        raise ValueError(f"{path!r} is not a dataset")
    if group.external:
        raise ValueError(f"{path!r} keeps its data in an external file")
    if group.is_virtual:
        raise ValueError(f"{path!r} is a virtual dataset")
    declared = math.prod(group.shape or ()) * group.dtype.itemsize
    stored = group.id.get_storage_size()
    if declared > _BOMB_FLOOR_BYTES and declared > _BOMB_MAX_EXPANSION * stored:
        raise ValueError(f"{path!r} declares {declared} bytes but stores {stored}")
    return group


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
    _check_readable(path)
    with _reading(path, "cannot read the file"):
        with open(path, "rb") as f:
            head = f.read(8)
    if head.startswith(_ZIP_MAGIC):
        return _read_zip(path)
    if head == _HDF5_MAGIC:
        return _read_h5(path)
    raise CheckpointError(f"{path}: not a Keras model file (neither a .keras zip nor an HDF5 file)")


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, not a Keras model file")
    if not os.access(path, os.R_OK):
        raise CheckpointError(f"{path}: permission denied (cannot read the file)")


def _json_member(path: Path, archive: zipfile.ZipFile, name: str) -> Any:
    info = archive.getinfo(name)
    if info.file_size > _MAX_JSON_BYTES:
        raise CheckpointError(f"{path}: {name} is {info.file_size} bytes; a Keras config is far smaller")
    with _reading(path, f"{name} is not valid JSON"):
        return json.loads(archive.read(name).decode("utf8"))


def _read_zip(path: Path) -> KerasFile:
    with _reading(path, "not a readable .keras archive (corrupt or truncated zip)"):
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            if _CONFIG_JSON not in names:
                raise CheckpointError(f"{path}: the archive has no {_CONFIG_JSON}; it is not a .keras model")
            if _WEIGHTS_H5 not in names:
                other = "model.weights.npz (NumPy weights)" if "model.weights.npz" in names else "no weights file"
                raise CheckpointError(
                    f"{path}: the archive holds {other}, not {_WEIGHTS_H5}; fc2conv reads HDF5 weights"
                )
            config = _json_member(path, archive, _CONFIG_JSON)
            metadata = _json_member(path, archive, _METADATA_JSON) if _METADATA_JSON in names else {}
    if not isinstance(config, dict) or "class_name" not in config:
        raise CheckpointError(f"{path}: {_CONFIG_JSON} does not describe a Keras model")
    version = str(metadata.get("keras_version", "unknown")) if isinstance(metadata, dict) else "unknown"
    builder = _ModelReader(path, config, flavour="keras", keras_version=version, backend="")
    with _reading(path, f"{_WEIGHTS_H5} inside the archive is not a readable HDF5 file (corrupt or truncated)"):
        with _open_weights(path, in_zip=True) as h5:
            builder.read_weights_keras(h5)
    return builder.finish(in_zip=True)


def _attr_text(attrs: Any, name: str) -> str | None:
    value = attrs.get(name)
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf8")
    return str(value)


def _read_h5(path: Path) -> KerasFile:
    import h5py  # noqa: F401 - the error below names the missing package if it is absent

    with _reading(path, "not a readable HDF5 file (corrupt or truncated)"):
        with _open_weights(path, in_zip=False) as h5:
            raw_config = _attr_text(h5.attrs, "model_config")
            if raw_config is None:
                if "layer_names" in h5.attrs or "model_weights" not in h5:
                    raise CheckpointError(
                        f"{path}: holds weights only (no model_config attribute); fc2conv needs the whole "
                        "model saved with model.save() to know its layers"
                    )
                raise CheckpointError(f"{path}: has no model_config attribute; it is not a Keras model file")
            if len(raw_config) > _MAX_JSON_BYTES:
                raise CheckpointError(f"{path}: its model_config is {len(raw_config)} bytes; not a Keras config")
            with _reading(path, "its model_config attribute is not valid JSON"):
                config = json.loads(raw_config)
            if not isinstance(config, dict) or "class_name" not in config:
                raise CheckpointError(f"{path}: its model_config does not describe a Keras model")
            version = _attr_text(h5.attrs, "keras_version") or "unknown"
            backend = _attr_text(h5.attrs, "backend") or "unknown"
            if version.startswith("1"):
                raise CheckpointError(f"{path}: written by Keras {version}; fc2conv reads Keras 2 and 3 files")
            if backend in ("theano", "cntk"):
                raise CheckpointError(
                    f"{path}: written with the {backend} backend, whose conv kernels are stored flipped; "
                    "load and save it again with TensorFlow or Keras 3"
                )
            flavour = "h5 (Keras 3)" if version.startswith("3") else "h5 (tf.keras 2)"
            builder = _ModelReader(path, config, flavour=flavour, keras_version=version, backend=backend)
            if "model_weights" not in h5:
                raise CheckpointError(f"{path}: has a model_config but no model_weights group")
            builder.read_weights_h5(h5["model_weights"])
    return builder.finish(in_zip=False)


# --- the config: layers, their inputs, their recorded shapes ---------------------------------------


@dataclass
class _Node:
    """A layer while the config is being read (becomes a KerasLayer)."""

    name: str
    short: str
    class_name: str
    config: dict[str, Any]
    entry: dict[str, Any]
    inputs: list[str]
    model: str
    calls: int
    builtin: bool
    recorded_shape: tuple[int | None, ...] | None = None  # the input shape Keras recorded for it
    tensors: list[str] = field(default_factory=list)


@dataclass
class _Scope:
    """A (nested) model: its qualified name and its layers, in the order Keras saves their weights."""

    name: str
    class_name: str
    children: list[_Node | _Scope]


def _snake_case(name: str) -> str:
    """keras.src.utils.naming.to_snake_case: the name of a layer's weights group in a .keras file."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def _shape_tuple(value: Any) -> tuple[int | None, ...] | None:
    if isinstance(value, dict) and "shape" in value:  # a serialized TensorShape / KerasTensor config
        value = value["shape"]
    if not isinstance(value, (list, tuple)):
        return None
    if value and isinstance(value[0], (list, tuple)):  # several inputs: not one map
        return None
    out: list[int | None] = []
    for dim in value:
        if dim is None or (isinstance(dim, int) and not isinstance(dim, bool)):
            out.append(dim)
        else:
            return None
    return tuple(out)


def _tensor_refs(node: Any) -> list[tuple[str, tuple[int | None, ...] | None]]:
    """The (layer, shape) of every tensor a call node reads, for both config styles."""
    refs: list[tuple[str, tuple[int | None, ...] | None]] = []

    def keras3(value: Any) -> None:
        if isinstance(value, dict):
            if value.get("class_name") == _TENSOR_PREFIX:
                config = value.get("config", {})
                history = config.get("keras_history") or []
                if history and isinstance(history[0], str):
                    refs.append((history[0], _shape_tuple(config.get("shape"))))
                return
            for item in value.values():
                keras3(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                keras3(item)

    if isinstance(node, dict):  # Keras 3: {"args": [...], "kwargs": {...}}
        keras3(node.get("args", []))
    elif isinstance(node, (list, tuple)):  # tf.keras 2: [[layer, node_index, tensor_index, kwargs], ...]
        for item in node:
            if isinstance(item, (list, tuple)) and item and isinstance(item[0], str):
                refs.append((item[0], None))
    return refs


def _layer_refs(value: Any) -> list[str]:
    """``input_layers`` / ``output_layers``: ``[name, 0, 0]`` or ``[[name, 0, 0], ...]``."""
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], str):
        return [value[0]]
    if isinstance(value, dict):  # a dict of named inputs
        return [n for item in value.values() for n in _layer_refs(item)]
    if isinstance(value, (list, tuple)):
        return [n for item in value for n in _layer_refs(item)]
    return []


def _is_builtin(entry: dict[str, Any]) -> bool:
    module = entry.get("module")
    if entry.get("class_name") in ("Lambda", "TFOpLambda", "SlicingOpLambda"):
        return False
    if entry.get("registered_name") not in (None, entry.get("class_name")):
        return False
    return module is None or str(module).startswith("keras")


class _ModelReader:
    """Walks the config once (layers, graph, shapes), then the weights file, then finds the heads."""

    def __init__(self, path: Path, config: dict[str, Any], *, flavour: str, keras_version: str, backend: str) -> None:
        self.path = path
        self.config = config
        self.flavour = flavour
        self.keras_version = keras_version
        self.backend = backend
        self.nodes: dict[str, _Node] = {}
        self.notes: list[str] = []
        self.specs: list[_TensorSpec] = []
        with _reading(path, "the model config is not a model Keras can describe"):
            self.root = self._model(config, "", None, top=True)[0]

    # -- config ------------------------------------------------------------------------------------

    def _model(
        self, entry: dict[str, Any], prefix: str, outer_inputs: list[str] | None, *, top: bool = False
    ) -> tuple[_Scope, list[str]]:
        class_name = entry.get("class_name")
        config = entry.get("config")
        name = (config.get("name") if isinstance(config, dict) else None) or entry.get("name") or ""
        qualified = "" if top else prefix + name
        if class_name == "Sequential":
            return self._sequential(entry, qualified, outer_inputs)
        if class_name in ("Functional", "Model") and isinstance(config, dict) and "layers" in config:
            return self._functional(entry, qualified, outer_inputs)
        what = "the file's model" if top else f"nested model {qualified}"
        raise CheckpointError(
            f"{self.path}: {what} is a {class_name!r}; fc2conv reads Sequential and Functional models "
            "(a subclassed model's structure is code, not config)"
        )

    def _leaf(self, entry: dict[str, Any], scope: str, inputs: list[str], calls: int, shape: Any) -> _Node:
        config: dict[str, Any] = entry["config"] if isinstance(entry.get("config"), dict) else {}
        short = entry.get("name") or config.get("name")
        if not isinstance(short, str) or not short:
            raise CheckpointError(f"{self.path}: a {entry.get('class_name')} layer in the config has no name")
        name = f"{scope}.{short}" if scope else short
        if name in self.nodes:
            raise CheckpointError(f"{self.path}: two layers are named {name!r} in the config")
        recorded = _shape_tuple((entry.get("build_config") or {}).get("input_shape")) or _shape_tuple(shape)
        node = _Node(
            name=name,
            short=short,
            class_name=str(entry.get("class_name")),
            config=config,
            entry=entry,
            inputs=inputs,
            model=scope,
            calls=calls,
            builtin=_is_builtin(entry),
            recorded_shape=recorded,
        )
        self.nodes[name] = node
        return node

    def _sequential(self, entry: dict[str, Any], name: str, outer_inputs: list[str] | None) -> tuple[_Scope, list[str]]:
        config = entry.get("config")
        layers = config.get("layers") if isinstance(config, dict) else config  # Keras 2.0-2.2: a list
        if not isinstance(layers, list):
            raise CheckpointError(f"{self.path}: Sequential model {name or '(top level)'} lists no layers")
        scope = _Scope(name, "Sequential", [])
        previous = list(outer_inputs or [])
        build_shape = _shape_tuple((entry.get("build_config") or {}).get("input_shape"))
        if build_shape is None and isinstance(config, dict):
            build_shape = _shape_tuple(config.get("build_input_shape"))
        for index, layer in enumerate(layers):
            if not isinstance(layer, dict):
                raise CheckpointError(f"{self.path}: layer {index} of {name or 'the model'} is not a config entry")
            layer_config: dict[str, Any] = layer["config"] if isinstance(layer.get("config"), dict) else {}
            declared = _shape_tuple(layer_config.get("batch_shape")) or _shape_tuple(
                layer_config.get("batch_input_shape")
            )
            if index == 0 and declared is None and not previous:
                declared = build_shape
            if layer.get("class_name") in _CONTAINERS:
                child, outputs = self._model(layer, f"{name}." if name else "", previous or None)
                scope.children.append(child)
                previous = outputs
                continue
            node = self._leaf(layer, name, previous[:1], 1, declared)
            previous = [node.name]
            if not (index == 0 and node.class_name == "InputLayer"):  # Sequential.layers omits its InputLayer
                scope.children.append(node)
        return scope, previous

    def _functional(self, entry: dict[str, Any], name: str, outer_inputs: list[str] | None) -> tuple[_Scope, list[str]]:
        config = entry["config"]
        scope = _Scope(name, "Functional", [])
        outputs_of: dict[str, list[str]] = {}  # short layer name -> qualified node(s) giving its output
        input_names = _layer_refs(config.get("input_layers"))
        for index, layer in enumerate(config["layers"]):
            if not isinstance(layer, dict):
                raise CheckpointError(f"{self.path}: layer {index} of {name or 'the model'} is not a config entry")
            short = str(layer.get("name") or (layer.get("config") or {}).get("name"))
            call_nodes = layer.get("inbound_nodes") or []
            refs = _tensor_refs(call_nodes[0]) if call_nodes else []
            inputs = []
            for ref, _ in refs:
                if ref not in outputs_of:
                    raise CheckpointError(
                        f"{self.path}: layer {short!r} reads {ref!r}, which the config does not define before it"
                    )
                inputs.extend(outputs_of[ref][:1])
            if layer.get("class_name") == "InputLayer" and outer_inputs is not None and short in input_names:
                inputs = (
                    [outer_inputs[input_names.index(short)]] if input_names.index(short) < len(outer_inputs) else []
                )
            if layer.get("class_name") in _CONTAINERS:
                if len(call_nodes) > 1:
                    raise CheckpointError(
                        f"{self.path}: nested model {short!r} is called {len(call_nodes)} times; "
                        "fc2conv reads models whose nested models are called once"
                    )
                child, outputs = self._model(layer, f"{name}." if name else "", inputs)
                scope.children.append(child)
                outputs_of[short] = outputs
                continue
            shape = refs[0][1] if len(refs) == 1 else None
            if layer.get("class_name") == "InputLayer":
                layer_config = layer.get("config") or {}
                shape = _shape_tuple(layer_config.get("batch_shape")) or _shape_tuple(
                    layer_config.get("batch_input_shape")
                )
            node = self._leaf(layer, name, inputs, max(1, len(call_nodes)), shape)
            scope.children.append(node)
            outputs_of[node.short] = [node.name]
        outputs = [o for ref in _layer_refs(config.get("output_layers")) for o in outputs_of.get(ref, [])[:1]]
        return scope, outputs

    # -- weights: .keras -------------------------------------------------------------------------

    def read_weights_keras(self, h5: h5py.File) -> None:
        """Map ``layers/<class>_<n>/vars/<i>`` to layers exactly as saving_lib numbers them."""
        import h5py

        claimed: set[str] = set()

        def visit(scope: _Scope, path: str) -> None:
            used: dict[str, int] = {}
            for child in scope.children:
                base = _snake_case(child.class_name)
                if base in used:
                    used[base] += 1
                    key = f"{base}_{used[base]}"
                else:
                    used[base] = 0
                    key = base
                group_path = f"{path}layers/{key}"
                resolved = _resolve_keras_path(h5, group_path)
                if isinstance(child, _Scope):
                    visit(child, f"{resolved or group_path}/")
                    continue
                self._keras_layer_vars(h5, child, resolved, group_path, claimed)

        visit(self.root, "")
        unclaimed = []

        def collect(name: str, obj: Any) -> None:
            if isinstance(obj, h5py.Dataset) and name.split("/")[0] in ("layers", "_layer_checkpoint_dependencies"):
                if name not in claimed:
                    unclaimed.append(name)

        h5.visititems(collect)
        if unclaimed:
            shown = ", ".join(unclaimed[:5]) + (", ..." if len(unclaimed) > 5 else "")
            self.notes.append(f"{len(unclaimed)} datasets of {_WEIGHTS_H5} belong to no layer of config.json: {shown}")
        if "optimizer" in h5:
            self.notes.append("optimizer state in the file is not read")

    def _keras_layer_vars(
        self, h5: h5py.File, node: _Node, resolved: str | None, group_path: str, claimed: set[str]
    ) -> None:
        import h5py

        vars_group = h5.get(f"{resolved}/vars") if resolved else None
        if vars_group is not None and not isinstance(vars_group, h5py.Group):
            raise CheckpointError(f"{self.path}: layer {node.name}: {group_path}/vars is not a group")
        if vars_group is not None:
            saved_name = _attr_text(vars_group.attrs, "name")
            if saved_name is not None and saved_name != node.short:
                raise CheckpointError(
                    f"{self.path}: layer {node.name}: {group_path} holds the weights of layer {saved_name!r} "
                    "by its own record; config.json and the weights file disagree"
                )
        indices = sorted((k for k in (vars_group or {}) if k.isdigit()), key=int) if vars_group is not None else []
        expected = _variable_names(node)
        if expected is not None and len(indices) != len(expected):
            if not indices and expected:
                raise CheckpointError(
                    f"{self.path}: layer {node.name} ({node.class_name}): no weights at {group_path}/vars "
                    f"(expected {', '.join(expected)}); the layer's weights cannot be read"
                )
            raise CheckpointError(
                f"{self.path}: layer {node.name} ({node.class_name}): {group_path}/vars holds {len(indices)} "
                f"variables, its config implies {len(expected)} ({', '.join(expected)})"
            )
        names = expected if expected is not None else [f"vars.{i}" for i in indices]
        if expected is None and indices:
            self.notes.append(
                f"{node.name} ({node.class_name}): {len(indices)} variables kept as stored, named {node.name}.vars.<i>"
            )
        for index, variable in zip(indices, names, strict=True):
            dataset = f"{resolved}/vars/{index}"
            self._add_tensor(h5, node, variable, dataset)
            claimed.add(dataset)
        # Sublayers tracked as attributes (wrappers, custom layers): every vars group below the layer.
        if resolved is not None:
            extra: list[str] = []

            def collect(name: str, obj: Any) -> None:
                if isinstance(obj, h5py.Dataset) and not name.startswith("vars/"):
                    extra.append(name)

            group = h5[resolved]
            if isinstance(group, h5py.Group):
                group.visititems(collect)
            for name in extra:
                variable = name.replace("/vars/", ".").replace("/", ".")
                self._add_tensor(h5, node, variable, f"{resolved}/{name}")
                claimed.add(f"{resolved}/{name}")
            if extra:
                self.notes.append(f"{node.name} ({node.class_name}) holds sublayer weights, kept as stored")

    # -- weights: legacy .h5 ----------------------------------------------------------------------

    def read_weights_h5(self, weights: h5py.Group) -> None:
        """Map ``model_weights/<layer>`` groups and their ``weight_names`` to layers (legacy_h5_format)."""
        import h5py

        if not isinstance(weights, h5py.Group):
            raise CheckpointError(f"{self.path}: model_weights is not a group")
        top_level: list[_Node | _Scope] = list(self.root.children)
        # A Sequential's InputLayer has no group; a Functional's has an empty one.
        for child in top_level:
            short = child.name.rpartition(".")[2] if isinstance(child, _Scope) else child.short
            group = weights.get(short)
            leaves = _leaves(child) if isinstance(child, _Scope) else [child]
            if group is None or not isinstance(group, h5py.Group):
                for leaf in leaves:
                    expected = _variable_names(leaf)
                    if expected:
                        raise CheckpointError(
                            f"{self.path}: layer {leaf.name} ({leaf.class_name}): no model_weights/{short} group; "
                            "the layer's weights cannot be read"
                        )
                continue
            weight_names = _h5_list_attr(group, "weight_names")
            by_short = {leaf.short: leaf for leaf in leaves}
            if len(by_short) != len(leaves):
                raise CheckpointError(f"{self.path}: nested model {short} has two layers of one name")
            found: dict[str, list[tuple[str, str]]] = {}
            for weight_name in weight_names:
                parts = weight_name.split("/")
                variable = parts[-1].removesuffix(":0")
                if isinstance(child, _Scope):
                    owner = next((p for p in reversed(parts[:-1]) if p in by_short), None)
                    if owner is None:
                        raise CheckpointError(
                            f"{self.path}: model_weights/{short} holds {weight_name!r}, which names no layer "
                            f"of nested model {child.name}"
                        )
                    leaf = by_short[owner]
                else:
                    leaf = child
                found.setdefault(leaf.name, []).append((variable, f"{group.name.lstrip('/')}/{weight_name}"))
            for leaf in leaves:
                pairs = found.get(leaf.name, [])
                expected = _variable_names(leaf)
                have = [v for v, _ in pairs]
                if expected is not None and sorted(have) != sorted(expected):
                    missing = [v for v in expected if v not in have]
                    if missing:
                        raise CheckpointError(
                            f"{self.path}: layer {leaf.name} ({leaf.class_name}): the file lacks "
                            f"{', '.join(missing)} (it holds {', '.join(have) or 'nothing'}); "
                            "the layer's weights cannot be read"
                        )
                order = {v: i for i, v in enumerate(expected or [])}
                for variable, dataset in sorted(pairs, key=lambda p: order.get(p[0], len(order))):
                    self._add_tensor(weights.file, leaf, variable, dataset)

    # -- tensors -----------------------------------------------------------------------------------

    def _add_tensor(self, h5: h5py.File, node: _Node, variable: str, dataset_path: str) -> None:
        dataset = _dataset(h5, dataset_path)
        shape = tuple(int(d) for d in dataset.shape)
        dtype = _torch_dtype_name(dataset)
        if dtype.startswith("unsupported"):
            raise CheckpointError(f"{self.path}: layer {node.name}: {dataset_path} holds {dtype} data")
        name, layout = _torch_name(node, variable, shape, self.path)
        if any(spec.name == name for spec in self.specs):
            raise CheckpointError(f"{self.path}: layer {node.name}: two weights map to {name}")
        spec = _TensorSpec(name, node.name, variable, dataset_path, shape, dtype, layout)
        self.specs.append(spec)
        node.tensors.append(name)

    # -- the result ----------------------------------------------------------------------------

    def finish(self, *, in_zip: bool) -> KerasFile:
        self._layer_notes()
        layers = tuple(
            KerasLayer(
                name=n.name,
                class_name=n.class_name,
                config=n.config,
                inputs=tuple(n.inputs),
                tensors=tuple(n.tensors),
                calls=n.calls,
                builtin=n.builtin,
                model=n.model,
            )
            for n in self.nodes.values()
        )
        infos = tuple(TensorInfo(spec.name, spec.shape, spec.dtype) for spec in self.specs)
        heads, refused = _HeadFinder(self).find()
        version = f"Keras {self.keras_version}" + (f", backend {self.backend}" if self.backend else "")
        notes = [f"{self.flavour} file written by {version}", *self.notes]
        return KerasFile(
            path=self.path,
            flavour=self.flavour,
            keras_version=self.keras_version,
            backend=self.backend,
            config=self.config,
            layers=layers,
            infos=infos,
            tensors=_LazyTensors(self.path, in_zip, self.specs),
            heads=heads,
            refused=refused,
            notes=tuple(notes),
        )

    def _layer_notes(self) -> None:
        for node in self.nodes.values():
            if node.class_name == "BatchNormalization" and node.tensors:
                config = node.config
                missing = [
                    f"{flag}=False (no {tensor}: {value})"
                    for flag, tensor, value in (("scale", "weight", "gamma = 1"), ("center", "bias", "beta = 0"))
                    if config.get(flag, True) is False
                ]
                epsilon = config.get("epsilon", 1e-3)
                note = f"{node.name} (BatchNormalization): epsilon {epsilon:g}, PyTorch's default is 1e-05"
                if missing:
                    note += "; " + ", ".join(missing)
                self.notes.append(note)
            elif node.tensors and node.class_name not in ("Dense", "Conv2D", "BatchNormalization"):
                if not any(spec.layout for spec in self.specs if spec.layer == node.name):
                    if not node.tensors[0].startswith(f"{node.name}.vars."):
                        self.notes.append(f"{node.name} ({node.class_name}): weights kept in Keras's layout")


def _resolve_keras_path(h5: h5py.File, path: str) -> str | None:
    """H5IOStore.get: the path itself, else the Keras 2.13 spelling with ``_layer_checkpoint_dependencies``."""
    if path in h5:
        return path
    if "_layer_checkpoint_dependencies" in h5:
        legacy = path.replace("layers", "_layer_checkpoint_dependencies")
        if legacy in h5:
            return legacy
    return None


def _leaves(scope: _Scope) -> list[_Node]:
    out: list[_Node] = []
    for child in scope.children:
        out.extend(_leaves(child) if isinstance(child, _Scope) else [child])
    return out


def _h5_list_attr(group: h5py.Group, name: str) -> list[str]:
    """load_attributes_from_hdf5_group: the attribute, or its chunks ``<name>0``, ``<name>1``, ..."""
    values: list[Any] = []
    if name in group.attrs:
        values = list(group.attrs[name])
    else:
        chunk = 0
        while f"{name}{chunk}" in group.attrs:
            values.extend(group.attrs[f"{name}{chunk}"])
            chunk += 1
    return [v.decode("utf8") if isinstance(v, bytes) else str(v) for v in values]


def _quantized(node: _Node) -> bool:
    dtype = node.config.get("dtype")
    policy = dtype.get("class_name", "") if isinstance(dtype, dict) else ""
    return "Quantized" in policy or "GPTQ" in policy or "AWQ" in policy or bool(node.config.get("quantization_config"))


def _variable_names(node: _Node) -> list[str] | None:
    """The variables a built-in layer saves, in Keras's order (None: not known, kept by index)."""
    config, name = node.config, node.class_name
    if _quantized(node):
        return None
    bias = ["bias"] if config.get("use_bias", True) else []
    if name in ("Dense", "Conv1D", "Conv2D", "Conv3D", "Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose"):
        return ["kernel", *bias]
    if name in ("DepthwiseConv1D", "DepthwiseConv2D"):
        return ["depthwise_kernel", *bias]
    if name in ("SeparableConv1D", "SeparableConv2D"):
        return ["depthwise_kernel", "pointwise_kernel", *bias]
    if name == "BatchNormalization":
        return (
            (["gamma"] if config.get("scale", True) else [])
            + (["beta"] if config.get("center", True) else [])
            + ["moving_mean", "moving_variance"]
        )
    if name == "Embedding":
        return ["embeddings"]
    if name == "PReLU":
        return ["alpha"]
    if name in _PASS_THROUGH - {"BatchNormalization", "LayerNormalization"} or name in (
        "InputLayer", "Flatten", "Reshape", "MaxPooling2D", "AveragePooling2D", "ZeroPadding2D", "Cropping2D",
        "UpSampling2D", "SpatialDropout2D", "GlobalAveragePooling2D", "GlobalMaxPooling2D", "Permute",
        *_MERGE, "Concatenate",
    ):  # fmt: skip
        return []
    return None


def _bn_single_axis(config: Mapping[str, Any]) -> bool:
    axis = config.get("axis", -1)
    return isinstance(axis, int) or (isinstance(axis, list) and len(axis) == 1)


def _torch_name(node: _Node, variable: str, shape: tuple[int, ...], path: Path) -> tuple[str, str | None]:
    """fc2conv's tensor name for one Keras variable, and the layout change it needs."""
    name, cls = node.name, node.class_name
    if cls == "Dense" and variable in ("kernel", "bias"):
        if variable == "kernel":
            if len(shape) != 2:
                raise CheckpointError(f"{path}: layer {name} (Dense): its kernel has shape {shape}, not (in, units)")
            units = node.config.get("units")
            if isinstance(units, int) and shape[1] != units:
                raise CheckpointError(
                    f"{path}: layer {name} (Dense): its kernel is {shape}, but the config says {units} units"
                )
            return f"{name}.weight", "dense"
        return f"{name}.bias", None
    if cls == "Conv2D" and variable in ("kernel", "bias"):
        if variable == "kernel":
            filters = node.config.get("filters")
            if len(shape) != 4 or (isinstance(filters, int) and shape[3] != filters):
                raise CheckpointError(
                    f"{path}: layer {name} (Conv2D): its kernel has shape {shape}, not (kh, kw, in, {filters})"
                )
            return f"{name}.weight", "conv2d"
        return f"{name}.bias", None
    if cls == "BatchNormalization" and _bn_single_axis(node.config):
        torch_names = {
            "gamma": "weight",
            "beta": "bias",
            "moving_mean": "running_mean",
            "moving_variance": "running_var",
        }
        if variable in torch_names:
            return f"{name}.{torch_names[variable]}", None
    return f"{name}.{variable}", None


# --- shapes and heads ----------------------------------------------------------------------------


def _pair(value: Any, default: int) -> tuple[int, int]:
    if value is None:
        return (default, default)
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return (int(value[0]), int(value[1]))
    raise ValueError(f"not a pair of sizes: {value!r}")


def _padding_pairs(value: Any) -> tuple[tuple[int, int], tuple[int, int]]:
    if isinstance(value, int):
        return ((value, value), (value, value))
    if isinstance(value, (list, tuple)) and len(value) == 2:
        first, second = value
        if isinstance(first, int) and isinstance(second, int):
            return ((first, first), (second, second))
        return (_pair(first, 0), _pair(second, 0))
    raise ValueError(f"not a padding: {value!r}")


def _spatial_out(size: int | None, kernel: int, stride: int, dilation: int, padding: str) -> int | None:
    if size is None:
        return None
    if padding == "same":
        return -(-size // stride)
    if padding == "valid":
        return (size - dilation * (kernel - 1) - 1) // stride + 1
    raise ValueError(f"padding {padding!r}")


def _data_format(node: _Node) -> str:
    return str(node.config.get("data_format") or "channels_last")


class _HeadFinder:
    """Shapes and map layouts from the config, then every Flatten -> Dense chain."""

    def __init__(self, reader: _ModelReader) -> None:
        self.reader = reader
        self.path = reader.path
        self.nodes = reader.nodes
        self.consumers: dict[str, list[str]] = {name: [] for name in self.nodes}
        for node in self.nodes.values():
            for source in node.inputs:
                if source in self.consumers:
                    self.consumers[source].append(node.name)

    def find(self) -> tuple[tuple[KerasHead, ...], tuple[RefusedHead, ...]]:
        heads: list[KerasHead] = []
        refused: list[RefusedHead] = []
        for node in self.nodes.values():
            if not _is_flatten(node):
                continue
            try:
                head = self._head(node)
            except _Refused as exc:
                refused.append(RefusedHead(node.name, f"{self.path}: {exc}"))
                continue
            if head is not None:
                heads.append(head)
        return tuple(heads), tuple(refused)

    # -- the chain after a Flatten ------------------------------------------------------------------

    def _head(self, flatten: _Node) -> KerasHead | None:
        chain: list[_Node] = []
        dense: list[_Node] = []
        current = flatten
        if flatten.calls > 1:
            raise _Refused(f"flatten layer {flatten.name} is called {flatten.calls} times (a shared layer)")
        while True:
            consumers = self.consumers[current.name]
            if len(consumers) != 1:
                if not dense and len(consumers) > 1:
                    raise _Refused(
                        f"flatten layer {flatten.name} feeds {len(consumers)} layers ({', '.join(consumers)}); "
                        "fc2conv converts one chain per Flatten"
                    )
                break
            following = self.nodes[consumers[0]]
            activation = following.config.get("activation", "linear")
            plain = isinstance(activation, str) and activation in _ELEMENTWISE_ACTIVATIONS | _FEATURE_ACTIVATIONS
            if following.class_name == "Dense" and following.builtin and following.calls == 1 and not plain:
                if not dense:
                    raise _Refused(
                        f"layer {following.name} (Dense) has activation {activation!r}, which fc2conv cannot prove"
                    )
                break
            if following.class_name == "Dense" and following.builtin and following.calls == 1:
                if _quantized(following):
                    raise _Refused(f"layer {following.name} (Dense) is quantized; fc2conv converts float weights")
                chain.append(following)
                dense.append(following)
                current = following
                continue
            problem = self._chain_problem(following, after_dense=bool(dense))
            if problem is None:
                chain.append(following)
                current = following
                continue
            if not dense:
                raise _Refused(f"layer {problem} sits between flatten layer {flatten.name} and its Dense layer")
            break
        while chain and chain[-1].class_name != "Dense" and not self._trailing_ok(chain[-1]):
            chain.pop()
        if not dense:
            return None
        rank_shape, where = self._input_shape(flatten)
        first = dense[0]
        in_features = self._in_features(first)
        if rank_shape is None:
            raise _Refused(
                f"the map that flatten layer {flatten.name} reads has no size in the config ({where}); "
                f"{first.name} takes {in_features} inputs"
            )
        if len(rank_shape) != 4:
            if len(rank_shape) == 2:
                return None  # a Flatten of a vector: nothing to convert
            raise _Refused(
                f"flatten layer {flatten.name} reads a rank-{len(rank_shape) - 1} tensor {rank_shape[1:]}, "
                "not an image map (H, W, C) or (C, H, W)"
            )
        dims = rank_shape[1:]
        if any(d is None for d in dims):
            raise _Refused(
                f"the map that flatten layer {flatten.name} reads has an open size {dims} in the config; "
                "its Dense layers fix it, but the config does not say how"
            )
        map_format, evidence = self._map_format(flatten)
        flatten_format = "channels_last" if flatten.class_name == "Reshape" else _data_format(flatten)
        d1, d2, d3 = (int(d) for d in dims)  # type: ignore[arg-type]
        if map_format == "channels_last":
            feature_map = InputShape(d3, d1, d2)
            layout = f"{d1}x{d2}x{d3} channels-last map (H x W x C)"
        else:
            feature_map = InputShape(d1, d2, d3)
            layout = f"{d1}x{d2}x{d3} channels-first map (C x H x W)"
        if map_format == "channels_last" and flatten_format == "channels_first":
            raise _Refused(
                f"flatten layer {flatten.name} has data_format channels_first but reads a {layout} ({evidence}): "
                "it flattens the map as (W, C, H), an order fc2conv cannot express as a conv"
            )
        order: FlattenOrder
        if map_format == "channels_first" and flatten_format == "channels_first":
            order, how = "hwc", "it moves channels last, then flattens (H, W, C)"
        elif map_format == "channels_first":
            order, how = "chw", "it flattens (C, H, W) as stored"
        else:
            order, how = "hwc", "it flattens (H, W, C) as stored"
        if feature_map.features != in_features:
            raise CheckpointError(
                f"{self.path}: flatten layer {flatten.name} reads a {layout} = {feature_map.features} values, "
                f"but {first.name} takes {in_features} inputs; the config and the weights disagree"
            )
        kind = "Reshape to a vector" if flatten.class_name == "Reshape" else f"Flatten, data_format {flatten_format}"
        source = (
            f"{flatten.name} ({kind}) reads a {layout}, {where}; layout {evidence}; {how}: "
            f"flatten order {order}, map {feature_map}"
        )
        return KerasHead(
            flatten=flatten.name,
            dense=tuple(n.name for n in dense),
            layers=tuple(n.name for n in chain),
            feature_map=feature_map,
            flatten_order=order,
            map_format=map_format,
            source=source,
        )

    def _in_features(self, dense: _Node) -> int:
        weight = next((s for s in self.reader.specs if s.name == f"{dense.name}.weight"), None)
        if weight is None:
            raise CheckpointError(f"{self.path}: layer {dense.name} (Dense) has no kernel in the file")
        return weight.shape[1]

    def _chain_problem(self, node: _Node, *, after_dense: bool) -> str | None:
        """None if ``node`` may sit in a head here; else a description of it for the refusal."""
        described = f"{node.name} ({node.class_name})"
        if not node.builtin:
            return f"{described}, whose code fc2conv does not run and so cannot prove,"
        if node.calls > 1:
            return f"{described}, called {node.calls} times,"
        if node.class_name in _ELEMENTWISE:
            return None
        if node.class_name == "Activation":
            activation = node.config.get("activation")
            if not isinstance(activation, str):
                return f"{described} with a custom activation, whose code fc2conv does not run,"
            if activation in _ELEMENTWISE_ACTIVATIONS or (after_dense and activation in _FEATURE_ACTIVATIONS):
                return None
            return f"{described} with activation {activation!r}, which is not elementwise,"
        if after_dense and node.class_name == "Softmax" and node.config.get("axis", -1) in (-1, 1, [-1], [1]):
            return None
        if (
            after_dense
            and node.class_name == "BatchNormalization"
            and node.config.get("axis", -1) in (-1, 1, [-1], [1])
        ):
            return None
        if not after_dense and node.class_name in ("BatchNormalization", "Softmax"):
            return f"{described}, which acts on all C*H*W features at once,"
        return f"{described}, which is not elementwise,"

    def _trailing_ok(self, node: _Node) -> bool:
        return self._chain_problem(node, after_dense=True) is None

    # -- the map: shape and layout --------------------------------------------------------------------

    def _input_shape(self, node: _Node) -> tuple[tuple[int | None, ...] | None, str]:
        """The shape a layer reads: as the config records it, else computed from the input layers."""
        if node.recorded_shape is not None:
            if (node.entry.get("build_config") or {}).get("input_shape") is not None:
                return node.recorded_shape, "as its build config records"
            return node.recorded_shape, "as the config records its input"
        if not node.inputs:
            return None, "nothing feeds it"
        # Walk back to a layer whose input shape is recorded, then apply the shape rules forward.
        trail: list[_Node] = []
        current: _Node | None = self.nodes[node.inputs[0]]
        while current is not None and current.recorded_shape is None:
            trail.append(current)
            if not current.inputs or len(trail) > len(self.nodes):
                return None, f"no input shape is recorded upstream of {current.name}"
            current = self.nodes[current.inputs[0]]
        assert current is not None
        trail.append(current)
        shape: tuple[int | None, ...] | None = current.recorded_shape
        for layer in reversed(trail):
            assert shape is not None
            try:
                shape = _layer_output_shape(layer, shape)
            except (ValueError, TypeError, KeyError) as exc:
                return None, f"{layer.name} ({layer.class_name}) has a config fc2conv cannot follow ({exc})"
            if shape is None:
                return None, f"{layer.name} ({layer.class_name}) has no shape rule in fc2conv and no recorded shape"
        computed = [layer.name for layer in reversed(trail) if layer.class_name != "InputLayer"]
        through = f" through {', '.join(computed)}" if computed else ""
        return shape, f"computed from the input shape{through}"

    def _map_format(self, flatten: _Node) -> tuple[str, str]:
        """Where the map's channels are: from the nearest layer upstream that says so, else the Flatten."""
        current = flatten.inputs[0] if flatten.inputs else None
        seen: set[str] = set()
        while current is not None and current not in seen:
            seen.add(current)
            node = self.nodes[current]
            if node.class_name in _SPATIAL_2D:
                fmt = _data_format(node)
                return fmt, f"{fmt.replace('_', '-')} as {node.name} ({node.class_name}) produces it"
            if node.class_name == "BatchNormalization":
                axis = node.config.get("axis", -1)
                axis = axis[0] if isinstance(axis, list) and len(axis) == 1 else axis
                if axis in (-1, 3):
                    return "channels_last", f"channels-last as {node.name} normalises axis {axis}"
                if axis == 1:
                    return "channels_first", f"channels-first as {node.name} normalises axis 1"
            if node.class_name in _PASS_THROUGH or node.class_name in _MERGE:
                current = node.inputs[0] if node.inputs else None
                continue
            break
        if flatten.class_name == "Reshape":
            return "channels_last", "channels-last (no layer upstream says otherwise; Keras's default)"
        fmt = _data_format(flatten)
        return fmt, f"{fmt.replace('_', '-')} as the Flatten's data_format declares (no layer upstream says)"


class _Refused(Exception):
    """A head that cannot be converted with proof; becomes a RefusedHead."""


def _is_flatten(node: _Node) -> bool:
    if not node.builtin:
        return False
    if node.class_name == "Flatten":
        return True
    if node.class_name == "Reshape":
        target = node.config.get("target_shape")
        return isinstance(target, (list, tuple)) and len(target) == 1
    return False


def _layer_output_shape(node: _Node, shape: tuple[int | None, ...]) -> tuple[int | None, ...] | None:
    """Keras's compute_output_shape for the layers a conv trunk is made of; None for any other."""
    cls, config = node.class_name, node.config
    if cls == "InputLayer" or cls in _PASS_THROUGH or cls in _MERGE:
        return shape
    if cls == "Flatten":
        rest = shape[1:]
        return (shape[0], None if any(d is None for d in rest) else math.prod(rest))  # type: ignore[arg-type]
    if cls in _SPATIAL_2D and len(shape) == 4:
        channels_last = _data_format(node) == "channels_last"
        n, (h, w), c = (shape[0], shape[1:3], shape[3]) if channels_last else (shape[0], shape[2:4], shape[1])
        if cls in ("Conv2D", "DepthwiseConv2D", "SeparableConv2D"):
            kernel = _pair(config.get("kernel_size"), 1)
            stride = _pair(config.get("strides"), 1)
            dilation = _pair(config.get("dilation_rate"), 1)
            padding = str(config.get("padding", "valid")).lower()
            h = _spatial_out(h, kernel[0], stride[0], dilation[0], padding)
            w = _spatial_out(w, kernel[1], stride[1], dilation[1], padding)
            if cls == "DepthwiseConv2D":
                c = None if c is None else c * int(config.get("depth_multiplier", 1))
            else:
                c = int(config["filters"])
        elif cls in ("MaxPooling2D", "AveragePooling2D"):
            pool = _pair(config.get("pool_size"), 2)
            stride = _pair(config.get("strides") or pool, 1)
            padding = str(config.get("padding", "valid")).lower()
            h = _spatial_out(h, pool[0], stride[0], 1, padding)
            w = _spatial_out(w, pool[1], stride[1], 1, padding)
        elif cls in ("ZeroPadding2D", "Cropping2D"):
            key = "padding" if cls == "ZeroPadding2D" else "cropping"
            (top, bottom), (left, right) = _padding_pairs(config.get(key, 1 if cls == "ZeroPadding2D" else 0))
            sign = 1 if cls == "ZeroPadding2D" else -1
            h = None if h is None else h + sign * (top + bottom)
            w = None if w is None else w + sign * (left + right)
        elif cls == "UpSampling2D":
            size = _pair(config.get("size"), 2)
            h = None if h is None else h * size[0]
            w = None if w is None else w * size[1]
        elif cls == "SpatialDropout2D":
            pass
        else:
            return None
        return (n, h, w, c) if channels_last else (n, c, h, w)
    return None


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
