"""Which dataset of a Keras weights file holds each layer's variables, and its PyTorch name and layout.

How a file maps weights to layers follows Keras's own loaders:

* ``.keras`` (Keras 3, ``keras/src/saving/saving_lib.py``): weights sit under class-and-position
  paths, ``layers/<snake_case(class)>[_<n>]/vars/<i>``, numbered in the order of the model's
  ``layers``; a nested model's layers sit under its own path. Variables are numbered in creation
  order (Dense: kernel, bias; BatchNormalization: gamma, beta, moving_mean, moving_variance, without
  gamma/beta when ``scale``/``center`` is off).
* legacy ``.h5`` (``keras/src/legacy/saving/legacy_h5_format.py``): group ``model_weights/<layer>``
  with a ``weight_names`` attribute naming each dataset (``fc1/kernel`` in Keras 3, ``fc1/kernel:0``
  in tf.keras 2; a nested model's group holds its layers' weights as ``<sublayer>/<variable>``).

Tensors are named and laid out as PyTorch's layers name and lay out theirs:

* Dense ``kernel (in, out)`` -> ``<layer>.weight (out, in)``, ``bias`` -> ``<layer>.bias``;
* Conv2D ``kernel (kh, kw, in, out)`` -> ``<layer>.weight (out, in, kh, kw)`` (Keras stores conv
  kernels this way whatever the layer's ``data_format``), ``<layer>.bias``;
* BatchNormalization ``gamma, beta, moving_mean, moving_variance`` -> ``weight, bias, running_mean,
  running_var`` (absent when ``scale``/``center`` is off);
* anything else keeps Keras's layout under ``<layer>.<variable>`` (``<layer>.vars.<i>`` when the file
  does not say the variable's name).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fc2conv.errors import CheckpointError
from fc2conv.formats.keras_config import MERGE, PASS_THROUGH, ConfigLayer, ConfigModel, ModelGraph
from fc2conv.formats.keras_h5 import (
    WEIGHTS_H5,
    attr_text,
    list_attr,
    open_weights,
    read_dataset,
    reading,
    safe_dataset,
    torch_dtype_name,
)

if TYPE_CHECKING:
    import h5py
    import torch

__all__ = [
    "LazyTensors",
    "TensorSpec",
    "WeightMap",
    "layer_notes",
    "map_h5_weights",
    "map_keras_weights",
]

# How a Keras array becomes PyTorch's layout: the stored axes in PyTorch's order.
_TO_TORCH = {"dense": (1, 0), "conv2d": (3, 2, 0, 1)}
# Layers that save a kernel and (unless use_bias is off) a bias, and layers that save nothing.
_KERNEL_LAYERS = {"Dense", "Conv1D", "Conv2D", "Conv3D", "Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose"}
_WEIGHTLESS = PASS_THROUGH - {"BatchNormalization", "LayerNormalization"} | MERGE | {
    "InputLayer", "Flatten", "Reshape", "MaxPooling2D", "AveragePooling2D", "ZeroPadding2D", "Cropping2D",
    "UpSampling2D", "SpatialDropout2D", "GlobalAveragePooling2D", "GlobalMaxPooling2D", "Permute", "Concatenate",
}  # fmt: skip
_BATCHNORM_TORCH_NAMES = {
    "gamma": "weight",
    "beta": "bias",
    "moving_mean": "running_mean",
    "moving_variance": "running_var",
}


@dataclass(frozen=True)
class TensorSpec:
    """Where one tensor sits in the weights file, and how it becomes PyTorch's layout."""

    name: str  # fc2conv's name: "<layer>.weight"
    layer: str
    variable: str  # Keras's name: "kernel", "gamma", ...; "vars.<i>" where the file does not name it
    dataset: str  # path inside the HDF5 file
    keras_shape: tuple[int, ...]
    dtype: str
    layout: str | None  # "dense", "conv2d" (a key of _TO_TORCH) or None (kept as stored)

    @property
    def shape(self) -> tuple[int, ...]:
        """The tensor's shape in PyTorch's layout."""
        if self.layout is None:
            return self.keras_shape
        return tuple(self.keras_shape[axis] for axis in _TO_TORCH[self.layout])


class LazyTensors(Mapping[str, "torch.Tensor"]):
    """Name -> tensor in PyTorch layout, read from the file when asked for (one dataset per access)."""

    def __init__(self, path: Path, in_zip: bool, specs: Sequence[TensorSpec]) -> None:
        self._path = path
        self._in_zip = in_zip
        self._specs = {spec.name: spec for spec in specs}

    def __getitem__(self, name: str) -> torch.Tensor:
        spec = self._specs[name]
        with reading(self._path, f"layer {spec.layer}: cannot read {spec.dataset}"):
            with open_weights(self._path, self._in_zip) as h5:
                tensor = read_dataset(h5, spec.dataset, spec.dtype)
        if spec.layout is not None:
            tensor = tensor.permute(*_TO_TORCH[spec.layout])
        return tensor.contiguous()

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)


@dataclass(frozen=True)
class WeightMap:
    """Every tensor of the file, in the order Keras saved them, and notes for the user on how they were read."""

    specs: tuple[TensorSpec, ...]
    notes: tuple[str, ...]

    def by_layer(self) -> dict[str, tuple[str, ...]]:
        """Each layer's tensor names, in the order Keras saved them (layers without weights left out)."""
        return _names_by_layer(self.specs)


def map_keras_weights(path: Path, graph: ModelGraph, h5: h5py.File) -> WeightMap:
    """A ``.keras`` file's ``model.weights.h5``: ``layers/<class>_<n>/vars/<i>``, numbered as saving_lib numbers them.

    Raises:
        CheckpointError: a layer's weights are missing, or their count or shape does not fit its config.
    """
    mapper = _WeightMapper(path)
    mapper.keras_model(h5, graph.root, "")
    unclaimed = mapper.unclaimed_datasets(h5)
    if unclaimed:
        shown = ", ".join(unclaimed[:5]) + (", ..." if len(unclaimed) > 5 else "")
        mapper.notes.append(f"{len(unclaimed)} datasets of {WEIGHTS_H5} belong to no layer of config.json: {shown}")
    if "optimizer" in h5:
        mapper.notes.append("optimizer state in the file is not read")
    return mapper.result()


def map_h5_weights(path: Path, graph: ModelGraph, weights: h5py.Group) -> WeightMap:
    """A legacy ``.h5`` file's ``model_weights`` group: a group per top-level layer, its ``weight_names``.

    Raises:
        CheckpointError: a layer's weights are missing, or their shape does not fit its config.
    """
    import h5py

    if not isinstance(weights, h5py.Group):
        raise CheckpointError(f"{path}: model_weights is not a group")
    mapper = _WeightMapper(path)
    for child in graph.root.children:
        mapper.h5_group(weights, child)
    return mapper.result()


class _WeightMapper:
    """Collects the tensor specs of one file, checking each against its layer's config."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.specs: dict[str, TensorSpec] = {}
        self.notes: list[str] = []
        self.claimed: set[str] = set()  # datasets that belong to a layer

    def add(self, h5: h5py.File, layer: ConfigLayer, variable: str, dataset_path: str) -> None:
        """One variable of ``layer``, stored at ``dataset_path``."""
        dataset = safe_dataset(h5, dataset_path)
        shape = tuple(int(d) for d in dataset.shape)
        dtype = torch_dtype_name(dataset)
        if dtype.startswith("unsupported"):
            raise CheckpointError(f"{self.path}: layer {layer.name}: {dataset_path} holds {dtype} data")
        name, layout = _torch_name(layer, variable, shape, self.path)
        if name in self.specs:
            raise CheckpointError(f"{self.path}: layer {layer.name}: two weights map to {name}")
        self.specs[name] = TensorSpec(name, layer.name, variable, dataset_path, shape, dtype, layout)
        self.claimed.add(dataset_path)

    def result(self) -> WeightMap:
        return WeightMap(tuple(self.specs.values()), tuple(self.notes))

    # -- .keras ----------------------------------------------------------------------------------

    def keras_model(self, h5: h5py.File, model: ConfigModel, prefix: str) -> None:
        """Each child's group, numbered per class in the model's order: ``dense``, ``dense_1``, ..."""
        seen: dict[str, int] = {}
        for child in model.children:
            base = _snake_case(child.class_name)
            count = seen.get(base, 0)
            seen[base] = count + 1
            group_path = f"{prefix}layers/{base}_{count}" if count else f"{prefix}layers/{base}"
            resolved = _resolve_keras_path(h5, group_path)
            if isinstance(child, ConfigModel):
                self.keras_model(h5, child, f"{resolved or group_path}/")
            else:
                self.keras_layer(h5, child, resolved, group_path)

    def keras_layer(self, h5: h5py.File, layer: ConfigLayer, resolved: str | None, group_path: str) -> None:
        """The layer's ``vars/<i>``, then any sublayer weights tracked below it (wrappers, custom layers)."""
        vars_group = self._vars_group(h5, layer, resolved, group_path)
        indices = sorted((k for k in vars_group if k.isdigit()), key=int) if vars_group is not None else []
        for index, variable in zip(indices, self._keras_variable_names(layer, indices, group_path), strict=True):
            self.add(h5, layer, variable, f"{resolved}/vars/{index}")
        if resolved is not None:
            self._sublayer_weights(h5, layer, resolved)

    def _vars_group(
        self, h5: h5py.File, layer: ConfigLayer, resolved: str | None, group_path: str
    ) -> h5py.Group | None:
        """The layer's ``vars`` group, if any, checked to be the weights of this layer by its own record."""
        import h5py

        vars_group = h5.get(f"{resolved}/vars") if resolved else None
        if vars_group is None:
            return None
        if not isinstance(vars_group, h5py.Group):
            raise CheckpointError(f"{self.path}: layer {layer.name}: {group_path}/vars is not a group")
        saved_name = attr_text(vars_group.attrs, "name")
        if saved_name is not None and saved_name != layer.short:
            raise CheckpointError(
                f"{self.path}: layer {layer.name}: {group_path} holds the weights of layer {saved_name!r} "
                "by its own record; config.json and the weights file disagree"
            )
        return vars_group

    def _keras_variable_names(self, layer: ConfigLayer, indices: list[str], group_path: str) -> list[str]:
        """The names of the variables at ``indices``: from the layer's class, else ``vars.<i>``."""
        expected = _variable_names(layer)
        if expected is None:
            if indices:
                self.notes.append(
                    f"{layer.name} ({layer.class_name}): {len(indices)} variables kept as stored, "
                    f"named {layer.name}.vars.<i>"
                )
            return [f"vars.{i}" for i in indices]
        if not indices and expected:
            raise CheckpointError(
                f"{self.path}: layer {layer.name} ({layer.class_name}): no weights at {group_path}/vars "
                f"(expected {', '.join(expected)}); the layer's weights cannot be read"
            )
        if len(indices) != len(expected):
            raise CheckpointError(
                f"{self.path}: layer {layer.name} ({layer.class_name}): {group_path}/vars holds {len(indices)} "
                f"variables, its config implies {len(expected)} ({', '.join(expected)})"
            )
        return expected

    def _sublayer_weights(self, h5: h5py.File, layer: ConfigLayer, resolved: str) -> None:
        """Datasets below the layer's group but outside its ``vars``: kept as stored, named by their path."""
        import h5py

        group = h5[resolved]
        if not isinstance(group, h5py.Group):
            return
        extra: list[str] = []

        def collect(name: str, obj: Any) -> None:
            if isinstance(obj, h5py.Dataset) and not name.startswith("vars/"):
                extra.append(name)

        group.visititems(collect)
        for name in extra:
            self.add(h5, layer, name.replace("/vars/", ".").replace("/", "."), f"{resolved}/{name}")
        if extra:
            self.notes.append(f"{layer.name} ({layer.class_name}) holds sublayer weights, kept as stored")

    def unclaimed_datasets(self, h5: h5py.File) -> list[str]:
        """Layer datasets of the file that no layer of the config claimed."""
        import h5py

        unclaimed: list[str] = []

        def collect(name: str, obj: Any) -> None:
            if isinstance(obj, h5py.Dataset) and name.split("/")[0] in ("layers", "_layer_checkpoint_dependencies"):
                if name not in self.claimed:
                    unclaimed.append(name)

        h5.visititems(collect)
        return unclaimed

    # -- legacy .h5 ------------------------------------------------------------------------------

    def h5_group(self, weights: h5py.Group, child: ConfigLayer | ConfigModel) -> None:
        """``model_weights/<child>``: one top-level layer's weights, or a nested model's layers' weights."""
        import h5py

        short = child.name.rpartition(".")[2] if isinstance(child, ConfigModel) else child.short
        leaves = child.leaves() if isinstance(child, ConfigModel) else [child]
        group = weights.get(short)
        if group is None or not isinstance(group, h5py.Group):
            # A Sequential's InputLayer has no group; a Functional's has an empty one.
            for leaf in leaves:
                if _variable_names(leaf):
                    raise CheckpointError(
                        f"{self.path}: layer {leaf.name} ({leaf.class_name}): no model_weights/{short} group; "
                        "the layer's weights cannot be read"
                    )
            return
        found = self._h5_owners(group, child, leaves, short)
        for leaf in leaves:
            self._h5_layer(weights.file, leaf, found.get(leaf.name, []))

    def _h5_owners(
        self, group: h5py.Group, child: ConfigLayer | ConfigModel, leaves: list[ConfigLayer], short: str
    ) -> dict[str, list[tuple[str, str]]]:
        """Each layer's ``(variable, dataset)`` pairs, from the group's ``weight_names``."""
        by_short = {leaf.short: leaf for leaf in leaves}
        if len(by_short) != len(leaves):
            raise CheckpointError(f"{self.path}: nested model {short} has two layers of one name")
        found: dict[str, list[tuple[str, str]]] = {}
        for weight_name in list_attr(group, "weight_names"):
            parts = weight_name.split("/")
            leaf = child
            if isinstance(child, ConfigModel):  # "<sublayer>/<variable>": the nearest part naming a layer
                owner = next((p for p in reversed(parts[:-1]) if p in by_short), None)
                if owner is None:
                    raise CheckpointError(
                        f"{self.path}: model_weights/{short} holds {weight_name!r}, which names no layer "
                        f"of nested model {child.name}"
                    )
                leaf = by_short[owner]
            variable = parts[-1].removesuffix(":0")
            found.setdefault(leaf.name, []).append((variable, f"{group.name.lstrip('/')}/{weight_name}"))
        return found

    def _h5_layer(self, h5: h5py.File, layer: ConfigLayer, pairs: list[tuple[str, str]]) -> None:
        """One layer's variables, all that its class implies present, in Keras's order."""
        if layer.class_name in ("DepthwiseConv1D", "DepthwiseConv2D"):  # Keras 3 names it kernel, tf.keras 2 not
            pairs = [("depthwise_kernel" if v == "kernel" else v, dataset) for v, dataset in pairs]
        expected = _variable_names(layer)
        have = [variable for variable, _ in pairs]
        missing = [variable for variable in expected or [] if variable not in have]
        if missing:
            raise CheckpointError(
                f"{self.path}: layer {layer.name} ({layer.class_name}): the file lacks "
                f"{', '.join(missing)} (it holds {', '.join(have) or 'nothing'}); "
                "the layer's weights cannot be read"
            )
        order = {variable: i for i, variable in enumerate(expected or [])}
        for variable, dataset in sorted(pairs, key=lambda pair: order.get(pair[0], len(order))):
            self.add(h5, layer, variable, dataset)


# --- names and layouts ----------------------------------------------------------------------------


def _variable_names(layer: ConfigLayer) -> list[str] | None:
    """The variables a built-in layer saves, in Keras's order (None: not known, kept by index)."""
    config, cls = layer.config, layer.class_name
    if layer.quantized:
        return None
    bias = ["bias"] if config.get("use_bias", True) else []
    if cls in _KERNEL_LAYERS:
        return ["kernel", *bias]
    if cls in ("DepthwiseConv1D", "DepthwiseConv2D"):
        return ["depthwise_kernel", *bias]
    if cls in ("SeparableConv1D", "SeparableConv2D"):
        return ["depthwise_kernel", "pointwise_kernel", *bias]
    if cls == "BatchNormalization":
        return (
            (["gamma"] if config.get("scale", True) else [])
            + (["beta"] if config.get("center", True) else [])
            + ["moving_mean", "moving_variance"]
        )
    if cls == "Embedding":
        return ["embeddings"]
    if cls == "PReLU":
        return ["alpha"]
    if cls in _WEIGHTLESS:
        return []
    return None


def _torch_name(layer: ConfigLayer, variable: str, shape: tuple[int, ...], path: Path) -> tuple[str, str | None]:
    """fc2conv's tensor name for one Keras variable, and the layout change it needs (see the module docstring).

    Raises:
        CheckpointError: a Dense or Conv2D kernel whose shape does not fit the layer's config.
    """
    name, cls = layer.name, layer.class_name
    if cls in ("Dense", "Conv2D") and variable == "bias":
        return f"{name}.bias", None
    if cls == "Dense" and variable == "kernel":
        units = layer.config.get("units")
        if len(shape) != 2:
            raise CheckpointError(f"{path}: layer {name} (Dense): its kernel has shape {shape}, not (in, units)")
        if isinstance(units, int) and shape[1] != units:
            raise CheckpointError(
                f"{path}: layer {name} (Dense): its kernel is {shape}, but the config says {units} units"
            )
        return f"{name}.weight", "dense"
    if cls == "Conv2D" and variable == "kernel":
        filters = layer.config.get("filters")
        if len(shape) != 4 or (isinstance(filters, int) and shape[3] != filters):
            raise CheckpointError(
                f"{path}: layer {name} (Conv2D): its kernel has shape {shape}, not (kh, kw, in, {filters})"
            )
        return f"{name}.weight", "conv2d"
    if cls == "BatchNormalization" and _single_axis(layer.config) and variable in _BATCHNORM_TORCH_NAMES:
        return f"{name}.{_BATCHNORM_TORCH_NAMES[variable]}", None
    return f"{name}.{variable}", None


def _single_axis(config: Mapping[str, Any]) -> bool:
    """A BatchNormalization over one axis, as PyTorch's are (so its variables take PyTorch's names)."""
    axis = config.get("axis", -1)
    return isinstance(axis, int) or (isinstance(axis, list) and len(axis) == 1)


def _names_by_layer(specs: Sequence[TensorSpec]) -> dict[str, tuple[str, ...]]:
    names: dict[str, list[str]] = {}
    for spec in specs:
        names.setdefault(spec.layer, []).append(spec.name)
    return {layer: tuple(tensors) for layer, tensors in names.items()}


def layer_notes(graph: ModelGraph, weights: WeightMap) -> list[str]:
    """What a PyTorch user should know of the layers' weights: BatchNorm's epsilon and missing
    scale/center (PyTorch's defaults differ), and weights kept in Keras's layout."""
    notes = []
    laid_out = {spec.layer for spec in weights.specs if spec.layout is not None}
    by_layer = weights.by_layer()
    for layer in graph.layers.values():
        tensors = by_layer.get(layer.name)
        if not tensors:
            continue
        if layer.class_name == "BatchNormalization":
            notes.append(_batchnorm_note(layer))
        elif layer.class_name not in ("Dense", "Conv2D") and layer.name not in laid_out:
            if not tensors[0].startswith(f"{layer.name}.vars."):  # those have their own note
                notes.append(f"{layer.name} ({layer.class_name}): weights kept in Keras's layout")
    return notes


def _batchnorm_note(layer: ConfigLayer) -> str:
    missing = [
        f"{flag}=False (no {tensor}: {value})"
        for flag, tensor, value in (("scale", "weight", "gamma = 1"), ("center", "bias", "beta = 0"))
        if layer.config.get(flag, True) is False
    ]
    epsilon = layer.config.get("epsilon", 1e-3)
    note = f"{layer.name} (BatchNormalization): epsilon {epsilon:g}, PyTorch's default is 1e-05"
    return note + ("; " + ", ".join(missing) if missing else "")


def _snake_case(name: str) -> str:
    """keras.src.utils.naming.to_snake_case: the name of a layer's weights group in a .keras file."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def _resolve_keras_path(h5: h5py.File, path: str) -> str | None:
    """H5IOStore.get: the path itself, else the Keras 2.13 spelling with ``_layer_checkpoint_dependencies``."""
    if path in h5:
        return path
    if "_layer_checkpoint_dependencies" in h5:
        legacy = path.replace("layers", "_layer_checkpoint_dependencies")
        if legacy in h5:
            return legacy
    return None
