"""The record of a conversion, kept in the output file's metadata: what ``verify`` reads to know what changed."""

from __future__ import annotations

import json

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
        changes = []
        for entry in entries:
            out, channels, height, width = (int(v) for v in entry["new_shape"])
            changes.append(
                LayerChange(
                    name=str(entry["name"]),
                    weight=str(entry["weight"]),
                    bias=entry.get("bias"),
                    dtype="",
                    old_shape=(int(entry["old_shape"][0]), int(entry["old_shape"][1])),
                    in_map=InputShape(channels, height, width),
                    flatten_order=_order(entry.get("flatten_order", "chw")),
                    pointwise=bool(entry.get("pointwise", False)),
                    layout="in_out" if entry.get("layout") == "in_out" else "out_in",
                )
            )
        return changes
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise PlanError(f"the {METADATA_PREFIX}layers metadata is malformed ({exc})") from exc


def _order(value: object) -> FlattenOrder:
    for order in FLATTEN_ORDERS:
        if value == order:
            return order
    raise ValueError(f"flatten order {value!r} is not one of {', '.join(FLATTEN_ORDERS)}")
