"""Find the FC chain in a name -> shape listing and decide what each layer becomes; no tensor is touched."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

from fc2conv.errors import PlanError, ShapeError
from fc2conv.shapes import as_spec, resolve_shape, square_map
from fc2conv.types import FLATTEN_ORDERS, FLOAT_DTYPES, FlattenOrder, InputShape, ShapeLike, ShapeSpec, TensorInfo

__all__ = [
    "Layer",
    "LayerChange",
    "LayerKind",
    "Plan",
    "PlanMode",
    "fc_candidates",
    "group_layers",
    "plan_conversion",
    "plan_pointwise",
]

LayerKind = Literal["Linear", "Conv1d", "Conv2d", "Conv3d", "BatchNorm", "Embedding", "other"]
PlanMode = Literal["chain", "pointwise"]

_EMBEDDING_NAME = re.compile(r"embed|(^|\.)(wte|wpe|tok_embeddings)(\.|$)", re.IGNORECASE)


@dataclass(frozen=True)
class Layer:
    """The tensors that share a module prefix (``fc1.weight`` + ``fc1.bias`` -> ``fc1``) and a guessed kind."""

    name: str
    kind: LayerKind
    tensors: tuple[TensorInfo, ...]

    @property
    def weight(self) -> TensorInfo | None:
        return next((t for t in self.tensors if t.name == _join(self.name, "weight")), None)

    @property
    def parameters(self) -> int:
        return sum(t.numel for t in self.tensors if not t.name.endswith("num_batches_tracked"))


@dataclass(frozen=True)
class LayerChange:
    """One FC layer and the convolution it becomes.

    ``in_map`` is the map this layer reads as a convolution: the flattened feature map for the
    first layer of a chain, ``in_features x 1 x 1`` for the later (1x1) ones.
    """

    name: str
    weight: str
    bias: str | None
    dtype: str
    old_shape: tuple[int, int]
    in_map: InputShape
    flatten_order: FlattenOrder
    pointwise: bool = False  # a projection turned 1x1 conv (--pointwise), not part of a flatten chain

    @property
    def out_features(self) -> int:
        return self.old_shape[0]

    @property
    def new_shape(self) -> tuple[int, int, int, int]:
        return (self.out_features, self.in_map.channels, self.in_map.height, self.in_map.width)

    @property
    def became(self) -> str:
        return f"Conv {self.in_map.height}x{self.in_map.width}"

    @property
    def parameters(self) -> int:
        return self.old_shape[0] * self.old_shape[1] + (self.out_features if self.bias else 0)


@dataclass(frozen=True)
class Plan:
    """What a conversion will do: the layer changes, and every tensor left as it is.

    ``mode`` is ``"chain"`` (a flattened map into an FC chain: ``input_shape`` is that map) or
    ``"pointwise"`` (selected Linear layers each become a 1x1 conv: no geometry, ``input_shape`` None).
    """

    input_shape: InputShape | None
    flatten_order: FlattenOrder
    layers: tuple[LayerChange, ...]
    untouched: tuple[str, ...]
    notes: tuple[str, ...] = field(default=())
    mode: PlanMode = "chain"

    def change_for(self, tensor_name: str) -> LayerChange | None:
        """The change whose weight is ``tensor_name``, if any (biases are never reshaped)."""
        return self._by_weight.get(tensor_name)

    @cached_property
    def _by_weight(self) -> dict[str, LayerChange]:
        return {c.weight: c for c in self.layers}


def _join(prefix: str, leaf: str) -> str:
    return f"{prefix}.{leaf}" if prefix else leaf


def _split(name: str) -> tuple[str, str]:
    prefix, _, leaf = name.rpartition(".")
    return prefix, leaf


def group_layers(infos: Sequence[TensorInfo]) -> list[Layer]:
    """Group tensors by module prefix, in first-seen order, and guess each module's kind."""
    groups: dict[str, list[TensorInfo]] = {}
    for info in infos:
        prefix, _ = _split(info.name)
        groups.setdefault(prefix, []).append(info)
    return [Layer(prefix, _guess_kind(prefix, members), tuple(members)) for prefix, members in groups.items()]


def _guess_kind(prefix: str, members: Sequence[TensorInfo]) -> LayerKind:
    leaves = {_split(t.name)[1]: t for t in members}
    weight = leaves.get("weight")
    if weight is None:
        return "other"
    if "running_mean" in leaves or "running_var" in leaves:
        return "BatchNorm"
    ndim = len(weight.shape)
    if ndim == 4:
        return "Conv2d"
    if ndim == 3:
        return "Conv1d"
    if ndim == 5:
        return "Conv3d"
    if ndim == 2:
        return "Embedding" if _EMBEDDING_NAME.search(prefix) else "Linear"
    return "other"


def fc_candidates(infos: Sequence[TensorInfo], layers: str | None = None) -> list[Layer]:
    """The FC layers, in order: 2-D ``<name>.weight`` tensors, restricted by the ``layers`` regex.

    Embeddings are FC candidates only when ``layers`` names them explicitly.
    """
    pattern = re.compile(layers) if layers else None
    found = []
    for layer in group_layers(infos):
        weight = layer.weight
        if weight is None or len(weight.shape) != 2:
            continue
        if pattern is not None:
            if pattern.search(layer.name):
                found.append(layer)
        elif layer.kind == "Linear":
            found.append(layer)
    return found


def plan_conversion(
    infos: Iterable[TensorInfo],
    input_shape: ShapeLike | None = None,
    flatten_order: FlattenOrder = "chw",
    layers: str | None = None,
) -> Plan:
    """Decide which FC layers become convolutions, and how.

    The chain starts at the first FC whose ``in_features`` equals ``C * H * W`` (it becomes an
    ``H x W`` convolution) and follows each later FC whose ``in_features`` equals the previous
    ``out_features`` (each becomes a 1x1 convolution). Everything else is untouched.

    Args:
        infos: Every tensor of the checkpoint, in checkpoint order.
        input_shape: The flattened feature map: complete, partial (``"4x4"``, ``"256"``) or ``None``
            to infer it from the last convolution before the first FC layer.
        flatten_order: ``"chw"`` (PyTorch) or ``"hwc"`` (Keras/TensorFlow channels-last flatten).
        layers: Optional regex; only FC layers whose name matches are candidates.

    Returns:
        The plan; its ``notes`` say what was inferred.

    Raises:
        PlanError: nothing to convert, or the geometry cannot be decided.
        ShapeError: the given shape does not fit the first FC layer (the message shows the arithmetic).

    Example:
        >>> infos = [TensorInfo("fc1.weight", (1024, 4096), "float32"),
        ...          TensorInfo("fc2.weight", (10, 1024), "float32")]
        >>> [c.became for c in plan_conversion(infos, "256x4x4").layers]
        ['Conv 4x4', 'Conv 1x1']
    """
    infos = list(infos)
    if flatten_order not in FLATTEN_ORDERS:
        raise PlanError(f"flatten order must be one of {', '.join(FLATTEN_ORDERS)}, got {flatten_order!r}")
    _check_regex(layers)
    spec = as_spec(input_shape)
    if not infos:
        raise PlanError("the checkpoint holds no tensors")
    candidates = fc_candidates(infos, layers)
    if not candidates:
        where = f" whose name matches {layers!r}" if layers else ""
        raise PlanError(f"no fully connected layer{where} found (a 2-D '<name>.weight' tensor)", remedy="inspect")

    notes: list[str] = []
    if spec is None:
        start, shape = _infer_geometry(infos, candidates, notes)
    else:
        start, shape = _start_for_spec(spec, candidates)
        notes.append(f"input shape {shape} ({'given' if spec.is_complete else f'from {spec.text!r}'})")

    chain = [candidates[start]]
    for candidate in candidates[start + 1 :]:
        if _in_features(candidate) == _out_features(chain[-1]):
            chain.append(candidate)
    _require_float(chain)
    changes = [_change(chain[0], shape, flatten_order)]
    changes += [_change(layer, InputShape(_in_features(layer), 1, 1), "chw") for layer in chain[1:]]
    notes.extend(_between_notes(infos, chain))
    converted = {c.weight for c in changes}
    untouched = tuple(info.name for info in infos if info.name not in converted)
    return Plan(shape, flatten_order, tuple(changes), untouched, tuple(notes))


def _require_float(layers: Sequence[Layer]) -> None:
    for layer in layers:
        weight = layer.weight
        assert weight is not None
        if weight.dtype not in FLOAT_DTYPES:
            raise PlanError(
                f"{weight.name} is {weight.dtype}; only floating-point FC weights "
                f"({', '.join(FLOAT_DTYPES)}) can be converted (dequantize it first)"
            )


def _change(layer: Layer, in_map: InputShape, flatten_order: FlattenOrder, pointwise: bool = False) -> LayerChange:
    """What one FC layer becomes: a conv reading ``in_map`` (flattened in ``flatten_order``)."""
    weight = layer.weight
    assert weight is not None
    return LayerChange(
        name=layer.name,
        weight=weight.name,
        bias=_bias_of(layer),
        dtype=weight.dtype,
        old_shape=(weight.shape[0], weight.shape[1]),
        in_map=in_map,
        flatten_order=flatten_order,
        pointwise=pointwise,
    )


def _bias_of(layer: Layer) -> str | None:
    bias = _join(layer.name, "bias")
    return bias if any(t.name == bias for t in layer.tensors) else None


def plan_pointwise(infos: Iterable[TensorInfo], layers: str | None = None) -> Plan:
    """Turn every selected Linear weight ``(out, in)`` into a 1x1 conv kernel ``(out, in, 1, 1)``.

    No flatten geometry is involved: this is the layout NPUs such as Apple's Neural Engine want for
    transformer projections, applied to activations laid out ``(N, in, 1, S)``.

    Args:
        infos: Every tensor of the checkpoint.
        layers: Regex selecting layers by name (e.g. ``"proj|mlp"``); default every Linear layer
            (embeddings only when the regex names them).

    Raises:
        PlanError: nothing selected, a bad regex, or a selected weight that is not floating point.
    """
    infos = list(infos)
    _check_regex(layers)
    if not infos:
        raise PlanError("the checkpoint holds no tensors")
    selected = fc_candidates(infos, layers)
    if not selected:
        where = f" whose name matches {layers!r}" if layers else ""
        raise PlanError(f"no Linear layer{where} found (a 2-D '<name>.weight' tensor)", remedy="inspect")
    _require_float(selected)
    changes = [_change(layer, InputShape(_in_features(layer), 1, 1), "chw", pointwise=True) for layer in selected]
    converted = {c.weight for c in changes}
    untouched = tuple(info.name for info in infos if info.name not in converted)
    where = f" matching {layers!r}" if layers else ""
    note = f"pointwise: {len(changes)} Linear layers{where} -> 1x1 convolutions (activations laid out N x C x 1 x S)"
    return Plan(None, "chw", tuple(changes), untouched, (note,), mode="pointwise")


def _check_regex(layers: str | None) -> None:
    if layers is not None:
        try:
            re.compile(layers)
        except re.error as exc:
            raise PlanError(f"layer pattern {layers!r} is not a valid regular expression: {exc}") from exc


def _in_features(layer: Layer) -> int:
    assert layer.weight is not None
    return layer.weight.shape[1]


def _out_features(layer: Layer) -> int:
    assert layer.weight is not None
    return layer.weight.shape[0]


def _start_for_spec(spec: ShapeSpec, candidates: list[Layer]) -> tuple[int, InputShape]:
    """The first candidate the spec fits, or the error for the first candidate (with its arithmetic)."""
    for index, layer in enumerate(candidates):
        try:
            return index, resolve_shape(spec, _in_features(layer), layer.name)
        except ShapeError:
            continue
    first = candidates[0]
    resolve_shape(spec, _in_features(first), first.name)  # raises with the arithmetic
    raise AssertionError("unreachable")  # pragma: no cover


def _infer_geometry(infos: list[TensorInfo], candidates: list[Layer], notes: list[str]) -> tuple[int, InputShape]:
    """C from the last 4-D conv weight before the first FC layer, and a square map."""
    first = candidates[0]
    in_features = _in_features(first)
    first_index = next(i for i, t in enumerate(infos) if t.name == _join(first.name, "weight"))
    convs = [(i, t) for i, t in enumerate(infos) if len(t.shape) == 4 and t.name.endswith("weight")]
    if not convs:
        raise PlanError(
            f"cannot infer the input shape: there is no conv layer before {first.name} ({in_features} inputs)",
            remedy="input_shape",
        )
    before = [t for i, t in convs if i < first_index]
    conv = before[-1] if before else convs[-1][1]
    position = "the last conv before" if before else "the last conv in name order; none comes before"
    channels = conv.shape[0]
    try:
        shape = square_map(channels, in_features, first.name)
    except ShapeError as exc:
        fits = sorted({str(s) for s in _square_candidates(convs, in_features, first.name)})
        hint = f"; maps that would fit: {', '.join(fits)}" if fits else ""
        raise PlanError(
            f"cannot infer the input shape from {conv.name} (C = {channels}): {exc}{hint}", remedy="input_shape"
        ) from exc
    notes.append(
        f"input shape {shape} inferred: C = {channels} from {conv.name} ({position} {first.name}), "
        f"square map assumed ({in_features} = {channels} x {shape.height} x {shape.width})"
    )
    return 0, shape


def _square_candidates(convs: list[tuple[int, TensorInfo]], in_features: int, layer: str) -> Iterable[InputShape]:
    for _, conv in convs:
        try:
            yield square_map(conv.shape[0], in_features, layer)
        except ShapeError:
            continue


def _between_notes(infos: list[TensorInfo], chain: list[Layer]) -> list[str]:
    """Say which BatchNorm layers sit in the chain and stay as they are (valid as BatchNorm2d)."""
    chain_widths = {_out_features(layer) for layer in chain}
    first_weight = chain[0].weight
    assert first_weight is not None
    start = infos.index(first_weight)
    notes = []
    for layer in group_layers(infos[start:]):
        weight = layer.weight
        if layer.kind == "BatchNorm" and weight is not None and weight.shape[0] in chain_widths:
            notes.append(
                f"{layer.name} (BatchNorm over {weight.shape[0]} features) kept as it is: "
                "its tensors are valid for BatchNorm2d"
            )
    return notes
