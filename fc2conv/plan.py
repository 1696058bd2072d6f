"""Decide what each FC layer becomes, from a name -> shape listing alone; no tensor is touched."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

from fc2conv.errors import PlanError, ShapeError
from fc2conv.heads import RoleOf, assign_roles, channel_evidence, structural_roles
from fc2conv.layers import Layer, group_layers
from fc2conv.layouts import FCShape, LayoutChoice, resolve_layouts
from fc2conv.names import NamePattern, compile_pattern
from fc2conv.shapes import as_spec, resolve_shape, square_map
from fc2conv.types import (
    FLATTEN_ORDERS,
    FLOAT_DTYPES,
    FlattenOrder,
    HeadHint,
    InputShape,
    ShapeLike,
    ShapeSpec,
    TensorInfo,
    WeightLayout,
)

__all__ = [
    "LayerChange",
    "Plan",
    "PlanMode",
    "SkippedLayer",
    "fc_candidates",
    "plan_conversion",
    "plan_pointwise",
]

PlanMode = Literal["chain", "pointwise"]


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
    layout: WeightLayout = "out_in"  # how the weight is stored: (out, in), or transposed (in, out)

    @property
    def out_features(self) -> int:
        return self.old_shape[0]

    @property
    def stored_shape(self) -> tuple[int, int]:
        """The weight's shape in the file: ``old_shape`` (out, in), or (in, out) for a transposed layout."""
        return self.old_shape if self.layout == "out_in" else (self.old_shape[1], self.old_shape[0])

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
class SkippedLayer:
    """A 2-D floating weight that stays as it is, and why (an embedding, not fed by the map, ...)."""

    name: str
    shape: tuple[int, ...]
    reason: str


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
    skipped: tuple[SkippedLayer, ...] = field(default=())  # FC-like weights left as they are, and why
    flatten_order_origin: str = ""  # where the order comes from: given, the default, a model config

    def change_for(self, tensor_name: str) -> LayerChange | None:
        """The change whose weight is ``tensor_name``, if any (biases are never reshaped)."""
        return self._by_weight.get(tensor_name)

    @cached_property
    def _by_weight(self) -> dict[str, LayerChange]:
        return {c.weight: c for c in self.layers}


def fc_candidates(infos: Sequence[TensorInfo], layers: str | None = None) -> list[Layer]:
    """The FC layers, in order: 2-D ``<name>.weight`` tensors, restricted by the ``layers`` regex.

    Embeddings are FC candidates only when ``layers`` names them explicitly.
    """
    pattern = layer_pattern(layers)
    return [
        layer for layer in _fc_layers(group_layers(infos), pattern) if pattern is None or pattern.search(layer.name)
    ]


def plan_conversion(
    infos: Iterable[TensorInfo],
    input_shape: ShapeLike | None = None,
    flatten_order: FlattenOrder | None = None,
    layers: str | None = None,
    *,
    weight_layout: LayoutChoice = "auto",
    layout_hints: Mapping[str, WeightLayout] | None = None,
    in_module_order: bool = True,
    trust_shape: bool = False,
    heads: Sequence[HeadHint] | None = None,
) -> Plan:
    """Decide which FC layers become convolutions, and how, from names and shapes alone.

    Every FC that reads the flattened map (``in_features == C * H * W``) becomes an ``H x W``
    convolution; every FC that reads a converted layer's outputs becomes a 1x1 convolution, so
    several heads on one map are all converted. FCs inside the conv trunk and squeeze-and-excitation
    pairs read no map and stay as they are; so does every FC nothing converted feeds. Each 2-D weight
    left as it is is listed in :attr:`Plan.skipped` with the reason.

    Args:
        infos: Every tensor of the checkpoint, in checkpoint order.
        input_shape: The flattened feature map: complete, partial (``"4x4"``, ``"256"``) or ``None``
            to infer it from the last convolution (or BatchNorm) before the first FC layer.
        flatten_order: ``"chw"`` (PyTorch) or ``"hwc"`` (Keras/TensorFlow channels-last flatten);
            ``None``: as ``heads`` say, else ``"chw"``.
        layers: Optional regex: only FC layers whose name matches are converted (their role, H x W or
            1x1, still comes from the whole network).
        weight_layout: ``"auto"`` (PyTorch's ``(out, in)`` unless a bias or a hint shows ``(in, out)``),
            or ``"out_in"`` / ``"in_out"`` for every FC layer.
        layout_hints: Layouts known from elsewhere (e.g. a ``config.json``), by layer name.
        in_module_order: Whether ``infos`` come in module order (PyTorch state dicts do; safetensors
            keeps names sorted): then an FC before the last conv is inside the trunk.
        trust_shape: Use a given shape even where the checkpoint shows another channel count.
        heads: What the file itself says of its heads (a Keras config): their layers, map and order.
            Nothing is then inferred, and a given shape or order must agree with them. ``None``: the
            file holds weights alone.

    Returns:
        The plan; its ``notes`` say what was inferred.

    Raises:
        PlanError: nothing to convert, the geometry cannot be decided, or a layout cannot be told.
        ShapeError: the given shape does not fit the first FC layer, or contradicts the checkpoint's
            channel count (the message shows the arithmetic and names the layer).

    Example:
        >>> infos = [TensorInfo("fc1.weight", (1024, 4096), "float32"),
        ...          TensorInfo("fc2.weight", (10, 1024), "float32")]
        >>> [c.became for c in plan_conversion(infos, "256x4x4").layers]
        ['Conv 4x4', 'Conv 1x1']
    """
    infos = list(infos)
    if flatten_order is not None and flatten_order not in FLATTEN_ORDERS:
        raise PlanError(f"flatten order must be one of {', '.join(FLATTEN_ORDERS)}, got {flatten_order!r}")
    pattern = layer_pattern(layers)
    all_layers = _layers_of(infos)
    fcs = resolve_layouts(_fc_layers(all_layers, pattern), weight_layout, layout_hints)
    spec = as_spec(input_shape)
    if heads is not None:
        if not heads:
            raise PlanError("the model describes no Flatten feeding an FC layer", remedy="inspect")
        return _plan_from_heads(infos, all_layers, fcs, heads, spec, flatten_order, pattern)
    order: FlattenOrder = flatten_order or "chw"
    given = spec.channels * spec.height * spec.width if spec and spec.channels and spec.height and spec.width else None
    roles = structural_roles(fcs, all_layers, in_module_order, given)
    set_aside = {role.fc.name for role in roles}
    candidates = [fc for fc in fcs if fc.name not in set_aside]
    if not candidates:
        raise PlanError(_nothing_found(layers, fcs), remedy="inspect")
    notes: list[str] = []
    shape = _geometry(all_layers, candidates, spec, trust_shape, notes)
    roles += assign_roles(candidates, shape.features, in_module_order)
    converted = [r for r in roles if r.role in ("head", "later") and _selected(r.fc, pattern)]
    if not converted:
        raise PlanError(_nothing_found(layers, fcs, shape), remedy="inspect")
    changes = [
        _change(r.fc, shape if r.role == "head" else InputShape(r.fc.in_features, 1, 1),
                order if r.role == "head" else "chw")
        for r in sorted(converted, key=lambda r: r.fc.layer.position)
    ]  # fmt: skip
    notes.extend(_batchnorm_notes(all_layers, changes))
    notes.extend(_layout_notes(fcs, changes))
    skipped = _skipped(all_layers, roles, {c.name for c in changes}, pattern)
    untouched = tuple(info.name for info in infos if info.name not in {c.weight for c in changes})
    origin = "given" if flatten_order else "PyTorch's, the default: not given"
    return Plan(shape, order, tuple(changes), untouched, tuple(notes), skipped=skipped, flatten_order_origin=origin)


def _plan_from_heads(
    infos: Sequence[TensorInfo],
    layers: Sequence[Layer],
    fcs: Sequence[FCShape],
    heads: Sequence[HeadHint],
    spec: ShapeSpec | None,
    flatten_order: FlattenOrder | None,
    pattern: NamePattern | None,
) -> Plan:
    """The plan of heads the file describes: each first layer reads its map, each later one the one before."""
    by_name = {fc.name: fc for fc in fcs}
    roles: list[RoleOf] = []
    changes: list[LayerChange] = []
    for head in heads:
        _agree(head, spec, flatten_order, by_name)
        in_map, order = head.feature_map, head.flatten_order
        for name in head.layers:
            fc = by_name[name]
            if fc.in_features != in_map.features:
                raise PlanError(
                    f"{name} takes {fc.in_features} inputs, but its head gives it {in_map} = {in_map.features}"
                )
            roles.append(RoleOf(fc, "head" if in_map == head.feature_map else "later"))
            if _selected(fc, pattern):
                changes.append(_change(fc, in_map, order))
            in_map, order = InputShape(fc.out_features, 1, 1), "chw"
    if not changes:
        raise PlanError(
            _nothing_found(pattern.pattern if pattern else None, fcs, heads[0].feature_map), remedy="inspect"
        )
    in_heads = {r.fc.name for r in roles}
    roles += [
        RoleOf(fc, "not_fed", "not in a head the model's config describes") for fc in fcs if fc.name not in in_heads
    ]
    notes = [head.source for head in heads] + _batchnorm_notes(layers, changes)
    skipped = _skipped(layers, roles, {c.name for c in changes}, pattern)
    untouched = tuple(info.name for info in infos if info.name not in {c.weight for c in changes})
    first = heads[0]
    return Plan(first.feature_map, first.flatten_order, tuple(changes), untouched, tuple(notes), skipped=skipped,
                flatten_order_origin="from the model's config")  # fmt: skip


def _agree(
    head: HeadHint, spec: ShapeSpec | None, flatten_order: FlattenOrder | None, fcs: Mapping[str, FCShape]
) -> None:
    """A shape or order the caller gives must be what the file says; a head's layers must be FC layers."""
    missing = [name for name in head.layers if name not in fcs]
    if missing:
        raise PlanError(f"{missing[0]}: the model describes it as an FC layer, but it has no 2-D weight")
    if spec is not None:
        given = resolve_shape(spec, head.feature_map.features, head.layers[0])
        if given != head.feature_map:
            raise ShapeError(
                f"{head.layers[0]} reads a {head.feature_map} map (C x H x W) as the model says ({head.source}); "
                f"the given input shape {spec} means {given}"
            )
    if flatten_order is not None and flatten_order != head.flatten_order:
        raise PlanError(
            f"{head.layers[0]} reads its map flattened {head.flatten_order}, as the model says ({head.source}); "
            f"the given order is {flatten_order}"
        )


def layer_pattern(layers: str | None) -> NamePattern | None:
    """The compiled ``--layers`` regex (RE2, matched with ``search`` on layer names), or None for every layer.

    Raises:
        PlanError: not a valid regular expression.
    """
    return None if layers is None else compile_pattern(layers)


def _selected(fc: FCShape, pattern: NamePattern | None) -> bool:
    return pattern is None or pattern.search(fc.name) is not None


def _layers_of(infos: list[TensorInfo]) -> list[Layer]:
    if not infos:
        raise PlanError("the checkpoint holds no tensors")
    return group_layers(infos)


def _fc_layers(layers: Sequence[Layer], pattern: NamePattern | None) -> list[Layer]:
    """Linear layers (2-D weights), and embeddings where the layer pattern names them."""
    return [
        layer
        for layer in layers
        if layer.weight is not None
        and len(layer.weight.shape) == 2
        and (layer.kind == "Linear" or (pattern is not None and pattern.search(layer.name)))
    ]


def _nothing_found(layers: str | None, fcs: Sequence[FCShape], shape: InputShape | None = None) -> str:
    where = f" whose name matches {layers!r}" if layers else ""
    if shape is not None:
        return f"no fully connected layer{where} reads the {shape} map or a layer converted from it"
    if fcs:
        return f"no fully connected layer{where} reads a flattened map (each is inside the conv trunk or a squeeze)"
    return f"no fully connected layer{where} found (a 2-D '<name>.weight' tensor)"


def _change(fc: FCShape, in_map: InputShape, flatten_order: FlattenOrder, pointwise: bool = False) -> LayerChange:
    """What one FC layer becomes: a conv reading ``in_map`` (flattened in ``flatten_order``)."""
    weight, bias = fc.layer.weight, fc.layer.bias
    assert weight is not None
    if weight.dtype not in FLOAT_DTYPES:
        raise PlanError(
            f"{weight.name} is {weight.dtype}; only floating-point FC weights "
            f"({', '.join(FLOAT_DTYPES)}) can be converted (dequantize it first)"
        )
    if fc.layout is None:
        raise PlanError(f"{fc.name}'s layout cannot be told: it is {fc.why}", remedy="weight_layout")
    return LayerChange(
        name=fc.name,
        weight=weight.name,
        bias=bias.name if bias is not None else None,
        dtype=weight.dtype,
        old_shape=(fc.out_features, fc.in_features),
        in_map=in_map,
        flatten_order=flatten_order,
        pointwise=pointwise,
        layout=fc.layout,
    )


def _geometry(
    layers: Sequence[Layer], candidates: Sequence[FCShape], spec: ShapeSpec | None, trust_shape: bool, notes: list[str]
) -> InputShape:
    """The map the heads read: the given shape (checked against the checkpoint), or one inferred from it."""
    if spec is None:
        return _infer_geometry(layers, candidates, notes)
    fc, shape = _first_fit(spec, candidates)
    evidence = channel_evidence(layers, fc.layer)
    if evidence is not None and evidence.strong and shape.channels != evidence.channels and not trust_shape:
        if fc.in_features % evidence.channels == 0:
            raise ShapeError(
                f"{fc.name} reads a map of {evidence.channels} channels ({evidence.source} comes right before it), "
                f"but the input shape {spec} means {shape}: {shape.channels} channels",
                remedy="trust_shape",
            )
    notes.append(f"input shape {shape} ({'given' if spec.is_complete else f'from {spec.text!r}'})")
    return shape


def _first_fit(spec: ShapeSpec, candidates: Sequence[FCShape]) -> tuple[FCShape, InputShape]:
    """The first candidate the spec fits, or the error for the first candidate (with its arithmetic)."""
    for fc in candidates:
        try:
            return fc, resolve_shape(spec, fc.in_features, fc.name)
        except ShapeError:
            continue
    resolve_shape(spec, candidates[0].in_features, candidates[0].name)  # raises with the arithmetic
    raise AssertionError("unreachable")  # pragma: no cover


def _infer_geometry(layers: Sequence[Layer], candidates: Sequence[FCShape], notes: list[str]) -> InputShape:
    """C from the last conv (or BatchNorm) before the first FC layer, and a square map."""
    first = candidates[0]
    evidence = channel_evidence(layers, first.layer)
    if evidence is None:
        raise PlanError(
            f"cannot infer the input shape: there is no conv layer before {first.name} ({first.in_features} inputs)",
            remedy="input_shape",
        )
    try:
        shape = square_map(evidence.channels, first.in_features, first.name)
    except ShapeError as exc:
        fits = sorted({str(s) for s in _square_maps(layers, first)})
        hint = f"; maps that would fit: {', '.join(fits)}" if fits else ""
        raise PlanError(
            f"cannot infer the input shape from {evidence.layer.name} (C = {evidence.channels}): {exc}{hint}",
            remedy="input_shape",
        ) from exc
    kind = "BatchNorm" if evidence.layer.kind == "BatchNorm" else "conv"
    where = f"the last {kind} before" if evidence.strong else f"the last {kind} in name order; none comes before"
    notes.append(
        f"input shape {shape} inferred: C = {evidence.channels} from {evidence.layer.name} ({where} "
        f"{first.name}), square map assumed ({first.in_features} = {shape})"
    )
    return shape


def _square_maps(layers: Sequence[Layer], fc: FCShape) -> Iterable[InputShape]:
    for layer in layers:
        if layer.channels is not None and layer.kind != "BatchNorm":
            try:
                yield square_map(layer.channels, fc.in_features, fc.name)
            except ShapeError:
                continue


def _batchnorm_notes(layers: Sequence[Layer], changes: Sequence[LayerChange]) -> list[str]:
    """Say which BatchNorm layers sit between converted layers and stay as they are (valid as BatchNorm2d)."""
    widths = {c.out_features for c in changes}
    first = min(layer.position for layer in layers if layer.name in {c.name for c in changes})
    return [
        f"{layer.name} (BatchNorm over {layer.channels} features) kept as it is: its tensors are valid for BatchNorm2d"
        for layer in layers
        if layer.kind == "BatchNorm" and layer.position > first and layer.channels in widths
    ]


def _layout_notes(fcs: Sequence[FCShape], changes: Sequence[LayerChange]) -> list[str]:
    """Say, in one line, which converted weights are stored (in, out) and how that is known."""
    transposed = [fc for fc in fcs if fc.name in {c.name for c in changes if c.layout == "in_out"}]
    if not transposed:
        return []
    reasons = dict.fromkeys(_LAYOUT_REASONS.get(fc.why.split(" ")[0], fc.why) for fc in transposed)
    names = transposed[0].name + (f" and {len(transposed) - 1} more" if len(transposed) > 1 else "")
    return [
        f"{names} stored (in, out), as GPT-2's Conv1D and Keras's Dense store weights (shown by "
        f"{', '.join(reasons)}): transposed"
    ]


# How a transposed layout was known, in a few words (by the first word of FCShape.why).
_LAYOUT_REASONS = {"its": "biases", "from": "config.json", "a": "names of transformers Conv1D", "as": "the caller"}


def _skipped(
    layers: Sequence[Layer], roles: Sequence[RoleOf], converted: set[str], pattern: NamePattern | None
) -> tuple[SkippedLayer, ...]:
    """Every 2-D floating weight that stays as it is, with the reason."""
    reasons = {r.fc.name: r.reason for r in roles if r.reason}
    for r in roles:
        if r.role in ("head", "later") and r.fc.name not in converted:
            reasons[r.fc.name] = "its name does not match the layer pattern"
    skipped = []
    for layer in layers:
        weight = layer.weight
        if layer.name in converted or weight is None or len(weight.shape) != 2 or weight.dtype not in FLOAT_DTYPES:
            continue
        if layer.name in reasons:
            reason = reasons[layer.name]
        elif layer.kind == "Embedding":
            reason = "an embedding (by its name); name it in the layer pattern to convert it"
        else:
            reason = "not an FC layer the plan reads"
        skipped.append(SkippedLayer(layer.name, weight.shape, reason))
    return tuple(skipped)


def plan_pointwise(
    infos: Iterable[TensorInfo],
    layers: str | None = None,
    *,
    weight_layout: LayoutChoice = "auto",
    layout_hints: Mapping[str, WeightLayout] | None = None,
) -> Plan:
    """Turn every selected Linear weight ``(out, in)`` into a 1x1 conv kernel ``(out, in, 1, 1)``.

    No flatten geometry is involved: this is the layout NPUs such as Apple's Neural Engine want for
    transformer projections, applied to activations laid out ``(N, in, 1, S)``.

    Args:
        infos: Every tensor of the checkpoint.
        layers: Regex selecting layers by name (e.g. ``"proj|mlp"``); default every Linear layer
            (embeddings only when the regex names them).
        weight_layout, layout_hints: As for :func:`plan_conversion`.

    Raises:
        PlanError: nothing selected, a bad regex, a layout that cannot be told, or a selected weight
            that is not floating point.
    """
    infos = list(infos)
    pattern = layer_pattern(layers)
    all_layers = _layers_of(infos)
    fcs = resolve_layouts(_fc_layers(all_layers, pattern), weight_layout, layout_hints)
    selected = [fc for fc in fcs if _selected(fc, pattern)]
    if not selected:
        where = f" whose name matches {layers!r}" if layers else ""
        raise PlanError(f"no Linear layer{where} found (a 2-D '<name>.weight' tensor)", remedy="inspect")
    changes = [_change(fc, InputShape(fc.in_features, 1, 1), "chw", pointwise=True) for fc in selected]
    converted = {c.name for c in changes}
    untouched = tuple(info.name for info in infos if info.name not in {c.weight for c in changes})
    where = f" matching {layers!r}" if layers else ""
    note = f"pointwise: {len(changes)} Linear layers{where} -> 1x1 convolutions (activations laid out N x C x 1 x S)"
    skipped = _skipped(all_layers, [], converted, pattern)
    notes = (note, *_layout_notes(fcs, changes))
    return Plan(None, "chw", tuple(changes), untouched, notes, mode="pointwise", skipped=skipped)
