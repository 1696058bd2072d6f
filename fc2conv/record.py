"""The record of a conversion, kept in the output file's metadata: what ``verify`` reads to know what changed."""

from __future__ import annotations

import json
from collections import Counter

from fc2conv.errors import PlanError
from fc2conv.plan import LayerChange, Plan
from fc2conv.types import FLATTEN_ORDERS, FlattenOrder, InputShape

__all__ = ["METADATA_PREFIX", "changes_from_metadata", "plan_to_metadata"]

METADATA_PREFIX = "fc2conv."


def plan_to_metadata(plan: Plan, version: str, source: str | None = None) -> dict[str, str]:
    """The string metadata that lets ``verify`` (and people) see what a conversion did."""
    layers = [
        {
            "name": c.name,
            "weight": c.weight,
            "bias": c.bias,
            "became": c.became,
            "old_shape": list(c.old_shape),
            "new_shape": list(c.new_shape),
            "flatten_order": c.flatten_order,
            "pointwise": c.pointwise,
            "layout": c.layout,
        }
        for c in plan.layers
    ]
    metadata = {
        "format": "pt",
        f"{METADATA_PREFIX}version": version,
        f"{METADATA_PREFIX}mode": plan.mode,
        f"{METADATA_PREFIX}input_shape": str(plan.input_shape) if plan.input_shape else "none",
        f"{METADATA_PREFIX}flatten_order": plan.flatten_order,
        f"{METADATA_PREFIX}layers": json.dumps(layers, separators=(",", ":")),
    }
    if source:
        metadata[f"{METADATA_PREFIX}source"] = source
    return metadata


def changes_from_metadata(metadata: dict[str, str]) -> list[LayerChange] | None:
    """The layer changes recorded by :func:`plan_to_metadata`, or ``None`` if there is no record.

    Raises:
        PlanError: the record is present but malformed.
    """
    raw = metadata.get(f"{METADATA_PREFIX}layers")
    if raw is None:
        return None
    try:
        entries = json.loads(raw)
        if not isinstance(entries, list):
            raise TypeError(f"a list of layers is expected, not {type(entries).__name__}")
        changes = [_change_of(entry) for entry in entries]
    except RecursionError as exc:
        raise PlanError(f"the {METADATA_PREFIX}layers metadata is malformed (JSON nested too deeply)") from exc
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise PlanError(f"the {METADATA_PREFIX}layers metadata is malformed ({exc})") from exc
    for kind, values in (("layer", [c.name for c in changes]), ("weight", [c.weight for c in changes])):
        twice = [value for value, count in Counter(values).items() if count > 1]
        if twice:
            raise PlanError(f"the {METADATA_PREFIX}layers metadata is malformed (it lists {kind} {twice[0]!r} twice)")
    return changes


def _change_of(entry: dict[str, object]) -> LayerChange:
    """One recorded layer; every field is checked, since the record comes from a file."""
    _, channels, height, width = _sizes(entry["new_shape"], 4)
    old_out, old_in = _sizes(entry["old_shape"], 2)
    bias = entry.get("bias")
    if bias is not None and not isinstance(bias, str):
        raise TypeError(f"bias {bias!r} is not a tensor name")
    return LayerChange(
        name=str(entry["name"]),
        weight=str(entry["weight"]),
        bias=bias,
        dtype="",
        old_shape=(old_out, old_in),
        in_map=InputShape(channels, height, width),
        flatten_order=_order(entry.get("flatten_order", "chw")),
        pointwise=bool(entry.get("pointwise", False)),
        layout="in_out" if entry.get("layout") == "in_out" else "out_in",
    )


def _sizes(value: object, count: int) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) != count or not all(type(v) is int and v >= 0 for v in value):
        raise ValueError(f"shape {value!r} is not {count} non-negative integers")
    return tuple(value)


def _order(value: object) -> FlattenOrder:
    for order in FLATTEN_ORDERS:
        if value == order:
            return order
    raise ValueError(f"flatten order {value!r} is not one of {', '.join(FLATTEN_ORDERS)}")
