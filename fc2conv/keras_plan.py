"""Plan a Keras model's conversion from its heads: the map and flatten order come from the config, not from guesses."""

from __future__ import annotations

from collections.abc import Sequence

from fc2conv.errors import PlanError, ShapeError
from fc2conv.formats.keras import KerasFile, KerasHead, require_head
from fc2conv.plan import LayerChange, Plan
from fc2conv.shapes import as_spec, resolve_shape

try:  # the leaf module of the restructured package
    from fc2conv.types import FLATTEN_ORDERS, InputShape, ShapeSpec, TensorInfo
except ImportError:  # pragma: no cover - before fc2conv.types exists
    from fc2conv.plan import TensorInfo
    from fc2conv.shapes import FLATTEN_ORDERS, InputShape, ShapeSpec

__all__ = ["head_changes", "plan_keras"]


def head_changes(head: KerasHead, infos: Sequence[TensorInfo]) -> tuple[LayerChange, ...]:
    """The layer changes of one head: its first Dense becomes an H x W conv, each later Dense a 1x1 conv.

    Args:
        head: A head found by :func:`fc2conv.formats.keras.read_keras`.
        infos: The file's tensors (``KerasFile.infos``), in PyTorch layouts.

    Returns:
        One :class:`~fc2conv.plan.LayerChange` per Dense layer of the chain, in order.

    Raises:
        PlanError: a Dense weight is missing or does not fit the chain.
    """
    by_name = {info.name: info for info in infos}
    changes = []
    in_map = head.feature_map
    for index, dense in enumerate(head.dense):
        weight = by_name.get(f"{dense}.weight")
        if weight is None or len(weight.shape) != 2:
            raise PlanError(f"layer {dense} of the head after {head.flatten} has no 2-D weight")
        if weight.shape[1] != in_map.features:
            raise PlanError(
                f"layer {dense} takes {weight.shape[1]} inputs, but the head gives it {in_map} = {in_map.features}"
            )
        bias = f"{dense}.bias"
        changes.append(
            LayerChange(
                name=dense,
                weight=weight.name,
                bias=bias if bias in by_name else None,
                dtype=weight.dtype,
                old_shape=(weight.shape[0], weight.shape[1]),
                in_map=in_map,
                flatten_order=head.flatten_order if index == 0 else "chw",
            )
        )
        in_map = InputShape(weight.shape[0], 1, 1)
    return tuple(changes)


def plan_keras(
    kf: KerasFile,
    input_shape: ShapeSpec | InputShape | tuple[int, int, int] | str | None = None,
    flatten_order: str | None = None,
    head: str | None = None,
) -> Plan:
    """Plan the conversion of a Keras model's FC heads, with the geometry its config records.

    Nothing needs to be given: each head's feature map and flatten order are read from the config.
    A shape or order that is given must agree with it (a disagreement is an error, never an override).

    Args:
        kf: The file, from :func:`~fc2conv.formats.keras.read_keras`.
        input_shape: Optional: the map the user expects (``"32x4x4"``, partial forms allowed).
        flatten_order: Optional: the order the user expects (``"chw"`` or ``"hwc"``).
        head: Optional: convert only the head whose Flatten or Dense layer has this name; default
            every head that can be converted with proof.

    Returns:
        A chain plan. With several heads each change carries its own map; ``plan.input_shape`` and
        ``plan.flatten_order`` are those of the first head.

    Raises:
        PlanError: no head can be converted (the reason names the file and layer), or the given shape
            or order disagrees with the config.
        ShapeError: the given shape cannot be parsed.
    """
    heads = [require_head(kf, head)] if head is not None or len(kf.heads) <= 1 else list(kf.heads)
    spec = as_spec(input_shape)
    if flatten_order is not None and flatten_order not in FLATTEN_ORDERS:
        raise PlanError(f"flatten order must be one of {', '.join(FLATTEN_ORDERS)}, got {flatten_order!r}")
    changes: list[LayerChange] = []
    notes = list(kf.notes)
    for chosen in heads:
        _agree(kf, chosen, spec, flatten_order)
        changes.extend(head_changes(chosen, kf.infos))
        notes.append(chosen.source)
        for name in chosen.between:
            layer = kf.layer(name)
            if layer.class_name == "BatchNormalization":
                notes.append(f"{name} (BatchNormalization after a Dense) kept as it is: valid for BatchNorm2d")
    for refused in kf.refused:
        if head is None:
            notes.append(f"not converted: {refused.reason}")
    converted = {c.weight for c in changes}
    untouched = tuple(info.name for info in kf.infos if info.name not in converted)
    first = heads[0]
    return Plan(first.feature_map, first.flatten_order, tuple(changes), untouched, tuple(notes))


def _agree(kf: KerasFile, head: KerasHead, spec: ShapeSpec | None, flatten_order: str | None) -> None:
    """Refuse a given shape or order that is not what the config says."""
    if spec is not None:
        expected = head.feature_map
        try:
            given = resolve_shape(spec, expected.features, head.dense[0])
        except ShapeError as exc:  # the arithmetic does not even fit the layer
            raise PlanError(
                f"{kf.path}: the config says {head.flatten} reads a {expected} map (C x H x W); "
                f"the given shape {spec} does not fit it ({exc})"
            ) from exc
        if given != expected:
            raise PlanError(
                f"{kf.path}: the config says {head.flatten} reads a {expected} map (C x H x W); "
                f"the given shape {given} disagrees"
            )
    if flatten_order is not None and flatten_order != head.flatten_order:
        raise PlanError(
            f"{kf.path}: the config says {head.flatten} flattens in {head.flatten_order} order "
            f"({head.map_format.replace('_', '-')} map); the given order {flatten_order} disagrees"
        )
