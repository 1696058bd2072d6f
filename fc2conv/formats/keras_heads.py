"""A Keras model's FC heads, from its config: each Flatten -> Dense chain, the map it reads, its order.

A head is a Flatten (or a Reshape to a vector) followed by Dense layers, with only layers between and
after them whose effect is known and commutes with the conversion (Dropout, elementwise activations,
and after a Dense a softmax or BatchNormalization over the features). What the Flatten reads is taken
from the config, never guessed: the map's size (:mod:`fc2conv.formats.keras_shapes`) and where its
channels are (the nearest layer upstream that says so), which together give the flatten order. A
chain that cannot be converted with proof is refused with the reason, naming the layers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from fc2conv.errors import CheckpointError
from fc2conv.formats.keras_config import (
    ELEMENTWISE,
    ELEMENTWISE_ACTIVATIONS,
    FEATURE_ACTIVATIONS,
    MERGE,
    PASS_THROUGH,
    SPATIAL_2D,
    ConfigLayer,
    ModelGraph,
)
from fc2conv.formats.keras_shapes import input_shape_of
from fc2conv.types import FlattenOrder, HeadHint, InputShape

__all__ = ["KerasHead", "RefusedHead", "find_heads"]

# A softmax or BatchNormalization over these axes of a (N, units) tensor acts on the features.
_FEATURE_AXES = (-1, 1, [-1], [1])


@dataclass(frozen=True)
class KerasHead:
    """A Flatten feeding a chain of Dense layers: what becomes an H x W conv and then 1x1 convs.

    ``feature_map`` is the map the Flatten reads, as (C, H, W); ``flatten_order`` says how Keras
    flattened it, in PyTorch's terms: ``"hwc"`` (channels-last flatten) or ``"chw"``.
    ``map_format`` is the layout of that map in the model (``channels_last`` or ``channels_first``).
    ``layers`` is the chain after the Flatten, in order (Dense layers and the elementwise layers
    between and after them); ``dense`` only its Dense layers. ``source`` says how all this was read.
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


def find_heads(
    path: Path, graph: ModelGraph, weight_shapes: Mapping[str, tuple[int, ...]]
) -> tuple[tuple[KerasHead, ...], tuple[RefusedHead, ...]]:
    """Every Flatten -> Dense head of the model, and the Flattens whose chain is refused.

    Args:
        path: The file, for messages.
        graph: The model's config, read by :func:`~fc2conv.formats.keras_config.read_config`.
        weight_shapes: The file's tensors' shapes in PyTorch layouts (a Dense's ``weight`` is ``(out, in)``).

    Raises:
        CheckpointError: a head's first Dense has no kernel, or takes another number of inputs than
            the map the config describes (the config and the weights disagree).
    """
    return _HeadFinder(path, graph, weight_shapes).find()


class _Refused(Exception):
    """A head that cannot be converted with proof; becomes a RefusedHead."""


class _HeadFinder:
    """The chain after each Flatten, then the map it reads and how it flattens it."""

    def __init__(self, path: Path, graph: ModelGraph, weight_shapes: Mapping[str, tuple[int, ...]]) -> None:
        self.path = path
        self.layers = graph.layers
        self.weight_shapes = weight_shapes
        self.consumers: dict[str, list[str]] = {name: [] for name in self.layers}
        for layer in self.layers.values():
            for source in layer.inputs:
                if source in self.consumers:
                    self.consumers[source].append(layer.name)

    def find(self) -> tuple[tuple[KerasHead, ...], tuple[RefusedHead, ...]]:
        heads: list[KerasHead] = []
        refused: list[RefusedHead] = []
        for layer in self.layers.values():
            if not _is_flatten(layer):
                continue
            try:
                head = self._head(layer)
            except _Refused as exc:
                refused.append(RefusedHead(layer.name, f"{self.path}: {exc}"))
                continue
            if head is not None:
                heads.append(head)
        return tuple(heads), tuple(refused)

    def _head(self, flatten: ConfigLayer) -> KerasHead | None:
        """The head that starts at ``flatten``; None if no Dense follows it or it reads a vector."""
        if flatten.calls > 1:
            raise _Refused(f"flatten layer {flatten.name} is called {flatten.calls} times (a shared layer)")
        chain, dense = self._chain(flatten)
        if not dense:
            return None
        in_features = self._in_features(dense[0])
        read = self._map_read(flatten, dense[0], in_features)
        if read is None:
            return None  # a Flatten of a vector: nothing to convert
        dims, where = read
        map_format, evidence = self._map_format(flatten)
        feature_map, layout = _feature_map(dims, map_format)
        order, how = _flatten_order(flatten, map_format, layout, evidence)
        if feature_map.features != in_features:
            raise CheckpointError(
                f"{self.path}: flatten layer {flatten.name} reads a {layout} = {feature_map.features} values, "
                f"but {dense[0].name} takes {in_features} inputs; the config and the weights disagree"
            )
        kind = (
            "Reshape to a vector" if flatten.class_name == "Reshape" else f"Flatten, data_format {flatten.data_format}"
        )
        source = (
            f"{flatten.name} ({kind}) reads a {layout}, {where}; layout {evidence}; {how}: "
            f"flatten order {order}, map {feature_map}"
        )
        return KerasHead(
            flatten=flatten.name,
            dense=tuple(layer.name for layer in dense),
            layers=tuple(layer.name for layer in chain),
            feature_map=feature_map,
            flatten_order=order,
            map_format=map_format,
            source=source,
        )

    # -- the chain after a Flatten ------------------------------------------------------------------

    def _chain(self, flatten: ConfigLayer) -> tuple[list[ConfigLayer], list[ConfigLayer]]:
        """The layers after ``flatten`` that belong to its head, and the Dense layers among them.

        The chain follows single consumers. Before the first Dense, anything that is not provable
        refuses the head; after it, the chain simply ends there (the rest of the model stays as it is).
        """
        chain: list[ConfigLayer] = []
        dense: list[ConfigLayer] = []
        current = flatten
        while len(self.consumers[current.name]) == 1:
            following = self.layers[self.consumers[current.name][0]]
            if following.class_name == "Dense" and following.builtin and following.calls == 1:
                activation = following.config.get("activation", "linear")
                if not (isinstance(activation, str) and activation in ELEMENTWISE_ACTIVATIONS | FEATURE_ACTIVATIONS):
                    if dense:
                        break
                    raise _Refused(
                        f"layer {following.name} (Dense) has activation {activation!r}, which fc2conv cannot prove"
                    )
                if following.quantized:
                    raise _Refused(f"layer {following.name} (Dense) is quantized; fc2conv converts float weights")
                dense.append(following)
            else:
                problem = _chain_problem(following, after_dense=bool(dense))
                if problem is not None:
                    if dense:
                        break
                    raise _Refused(f"layer {problem} sits between flatten layer {flatten.name} and its Dense layer")
            chain.append(following)
            current = following
        consumers = self.consumers[current.name]
        if not dense and len(consumers) > 1:
            raise _Refused(
                f"flatten layer {flatten.name} feeds {len(consumers)} layers ({', '.join(consumers)}); "
                "fc2conv converts one chain per Flatten"
            )
        return chain, dense

    def _in_features(self, dense: ConfigLayer) -> int:
        weight = self.weight_shapes.get(f"{dense.name}.weight")
        if weight is None:
            raise CheckpointError(f"{self.path}: layer {dense.name} (Dense) has no kernel in the file")
        return weight[1]

    # -- the map: shape and layout --------------------------------------------------------------------

    def _map_read(
        self, flatten: ConfigLayer, first: ConfigLayer, in_features: int
    ) -> tuple[tuple[int, int, int], str] | None:
        """The three sizes of the map ``flatten`` reads, in its own layout, and how they are known.

        None for a Flatten of a vector; refused when the config does not fix an image map's size.
        """
        shape, where = input_shape_of(flatten, self.layers)
        if shape is None:
            raise _Refused(
                f"the map that flatten layer {flatten.name} reads has no size in the config ({where}); "
                f"{first.name} takes {in_features} inputs"
            )
        if len(shape) == 2:
            return None
        if len(shape) != 4:
            raise _Refused(
                f"flatten layer {flatten.name} reads a rank-{len(shape) - 1} tensor {shape[1:]}, "
                "not an image map (H, W, C) or (C, H, W)"
            )
        d1, d2, d3 = shape[1:]
        if d1 is None or d2 is None or d3 is None:
            raise _Refused(
                f"the map that flatten layer {flatten.name} reads has an open size {shape[1:]} in the config; "
                "its Dense layers fix it, but the config does not say how"
            )
        return (d1, d2, d3), where

    def _map_format(self, flatten: ConfigLayer) -> tuple[str, str]:
        """Where the map's channels are: from the nearest layer upstream that says so, else the Flatten."""
        current = flatten.inputs[0] if flatten.inputs else None
        seen: set[str] = set()
        while current is not None and current not in seen:
            seen.add(current)
            layer = self.layers[current]
            if layer.class_name in SPATIAL_2D:
                fmt = layer.data_format
                return fmt, f"{fmt.replace('_', '-')} as {layer.name} ({layer.class_name}) produces it"
            if layer.class_name == "BatchNormalization":
                axis = layer.config.get("axis", -1)
                axis = axis[0] if isinstance(axis, list) and len(axis) == 1 else axis
                if axis in (-1, 3):
                    return "channels_last", f"channels-last as {layer.name} normalises axis {axis}"
                if axis == 1:
                    return "channels_first", f"channels-first as {layer.name} normalises axis 1"
            if layer.class_name in PASS_THROUGH or layer.class_name in MERGE:
                current = layer.inputs[0] if layer.inputs else None
                continue
            break
        if flatten.class_name == "Reshape":
            return "channels_last", "channels-last (no layer upstream says otherwise; Keras's default)"
        fmt = flatten.data_format
        return fmt, f"{fmt.replace('_', '-')} as the Flatten's data_format declares (no layer upstream says)"


def _feature_map(dims: tuple[int, int, int], map_format: str) -> tuple[InputShape, str]:
    """The map as (C, H, W), and its sizes in the model's own layout, said in words."""
    d1, d2, d3 = dims
    if map_format == "channels_last":
        return InputShape(d3, d1, d2), f"{d1}x{d2}x{d3} channels-last map (H x W x C)"
    return InputShape(d1, d2, d3), f"{d1}x{d2}x{d3} channels-first map (C x H x W)"


def _flatten_order(flatten: ConfigLayer, map_format: str, layout: str, evidence: str) -> tuple[FlattenOrder, str]:
    """How the Flatten orders a map of ``map_format``, in PyTorch's terms, and why.

    A Reshape flattens as stored; a Flatten with ``data_format="channels_first"`` first moves a
    channels-first map's channels last, and would scramble a channels-last map as (W, C, H).
    """
    flatten_format = "channels_last" if flatten.class_name == "Reshape" else flatten.data_format
    if flatten_format == "channels_first" and map_format == "channels_last":
        raise _Refused(
            f"flatten layer {flatten.name} has data_format channels_first but reads a {layout} ({evidence}): "
            "it flattens the map as (W, C, H), an order fc2conv cannot express as a conv"
        )
    if flatten_format == "channels_first":
        return "hwc", "it moves channels last, then flattens (H, W, C)"
    if map_format == "channels_first":
        return "chw", "it flattens (C, H, W) as stored"
    return "hwc", "it flattens (H, W, C) as stored"


def _chain_problem(layer: ConfigLayer, *, after_dense: bool) -> str | None:
    """None if ``layer`` may sit in a head here; else a description of it for the refusal."""
    described = f"{layer.name} ({layer.class_name})"
    if not layer.builtin:
        return f"{described}, whose code fc2conv does not run and so cannot prove,"
    if layer.calls > 1:
        return f"{described}, called {layer.calls} times,"
    if layer.class_name in ELEMENTWISE:
        return None
    if layer.class_name == "Activation":
        activation = layer.config.get("activation")
        if not isinstance(activation, str):
            return f"{described} with a custom activation, whose code fc2conv does not run,"
        if activation in ELEMENTWISE_ACTIVATIONS or (after_dense and activation in FEATURE_ACTIVATIONS):
            return None
        return f"{described} with activation {activation!r}, which is not elementwise,"
    if layer.class_name in ("Softmax", "BatchNormalization"):
        if after_dense and layer.config.get("axis", -1) in _FEATURE_AXES:
            return None
        if not after_dense:
            return f"{described}, which acts on all C*H*W features at once,"
    return f"{described}, which is not elementwise,"


def _is_flatten(layer: ConfigLayer) -> bool:
    """A built-in Flatten, or a Reshape to one dimension (which flattens the same way)."""
    if not layer.builtin:
        return False
    if layer.class_name == "Flatten":
        return True
    if layer.class_name == "Reshape":
        target = layer.config.get("target_shape")
        return isinstance(target, (list, tuple)) and len(target) == 1
    return False
