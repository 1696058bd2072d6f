"""A checkpoint's plan from its listing, and what its weights say of the plan: shared by the commands.

Light to import: ``inspect`` plans from shapes alone; the evidence (numpy) is imported when it is weighed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fc2conv.errors import PlanError
from fc2conv.formats import Listing, Source
from fc2conv.layouts import LayoutChoice
from fc2conv.plan import LayerChange, Plan, plan_conversion, plan_pointwise
from fc2conv.results import Evidence
from fc2conv.types import FLOAT_DTYPES, FlattenOrder, ShapeLike

if TYPE_CHECKING:
    import torch

    from fc2conv.matrix import Matrix

__all__ = ["first_fc_weight", "plan_for", "weigh_evidence"]


def plan_for(
    listing: Listing,
    input_shape: ShapeLike | None,
    flatten_order: FlattenOrder | None,
    layers: str | None,
    pointwise: bool,
    weight_layout: LayoutChoice,
    trust_shape: bool,
) -> Plan:
    """The plan for a checkpoint's listing, with what its reader knows (module order, layout hints)."""
    if pointwise:
        return plan_pointwise(listing.infos, layers, weight_layout=weight_layout, layout_hints=listing.layout_hints)
    if listing.heads is not None and not listing.heads and listing.heads_refused:
        raise PlanError(listing.heads_refused[0])  # the model has heads, none of them provable: say why
    return plan_conversion(
        listing.infos, input_shape, flatten_order, layers, weight_layout=weight_layout,
        layout_hints=listing.layout_hints, in_module_order=listing.module_order, trust_shape=trust_shape,
        heads=listing.heads,
    )  # fmt: skip


# Where an order is stated by the file (a model's config, a graph), the weights' evidence is not weighed.
_ORDER_STATED = ("from the model's config", "from the graph")


def weigh_evidence(plan: Plan, source: Source, *, geometry_given: bool) -> Evidence | None:
    """What the first head's weights say of the flatten order in use (and of the map, if it was inferred).

    Only for a chain whose order nothing states, and whose map has several channels and positions
    (otherwise both orders are one). The figures come from a seeded sample of rows (see
    :mod:`fc2conv.evidence`), read from the file's bytes where the weight lies there as ``(out, in)``
    (no torch), else from the tensor.
    """
    if plan.mode != "chain" or plan.flatten_order_origin in _ORDER_STATED:
        return None
    first = next((c for c in plan.layers if c.in_map.height * c.in_map.width > 1 and c.in_map.channels > 1), None)
    if first is None:
        return None
    from fc2conv.evidence import geometry_evidence, map_factorisations, order_evidence

    weight = first_fc_weight(first, source)
    geometry = None if geometry_given else geometry_evidence(weight, map_factorisations(first.old_shape[1]))
    return Evidence(first.name, first.flatten_order, first.in_map, order_evidence(weight, first.in_map), geometry)


def first_fc_weight(change: LayerChange, source: Source) -> Matrix | torch.Tensor:
    """An FC weight ``(out, in)`` to weigh evidence on: over the file's bytes if it lies there, else the tensor.

    A weight stored ``(in, out)`` is read transposed from the bytes (each row taken is a column of the file).
    """
    info = source.info_by_name.get(change.weight)
    span = source.spans.get(change.weight)
    if span is not None and info is not None and info.shape == change.stored_shape and info.dtype in FLOAT_DTYPES:
        from fc2conv.span_arrays import span_matrix

        return span_matrix(span, info.dtype, change.stored_shape, transposed=change.layout == "in_out")
    from fc2conv.convert import fc_weight

    return fc_weight(change, source.tensors[change.weight])
