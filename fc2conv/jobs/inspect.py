"""``inspect`` as a library call: what a checkpoint holds and what ``convert`` would make of it, from shapes."""

from __future__ import annotations

import os

from fc2conv.errors import PlanError
from fc2conv.formats import open_source, read_listing
from fc2conv.jobs.planning import plan_for, weigh_evidence
from fc2conv.layers import group_layers
from fc2conv.layouts import LayoutChoice
from fc2conv.plan import Plan, layer_pattern
from fc2conv.record import changes_from_metadata
from fc2conv.results import InspectResult
from fc2conv.shapes import as_spec
from fc2conv.types import FlattenOrder, ShapeLike

__all__ = ["inspect_file"]


def inspect_file(
    path: str | os.PathLike[str],
    *,
    input_shape: ShapeLike | None = None,
    flatten_order: FlattenOrder | None = None,
    layers: str | None = None,
    weight_layout: LayoutChoice = "auto",
    trust_shape: bool = False,
    trust_pickle: bool = False,
    state_dict_key: str | None = None,
    evidence: bool = False,
) -> InspectResult:
    """List a checkpoint's layers and the conversion plan, reading only shapes.

    A safetensors file's header is all that is read, unless ``evidence`` asks what the first head's
    weights say of the flatten order (and of the map, when it is inferred): that reads those weights.
    When no plan can be made without an input shape, the reason is returned in ``plan_problem``; a
    shape given by the caller that does not fit raises :class:`~fc2conv.errors.ShapeError`, and a layer
    pattern that is not valid a PlanError.
    """
    layer_pattern(layers)  # the caller's mistake, as in convert: not a "no plan" for this checkpoint
    listing = read_listing(
        path, trust_pickle=trust_pickle, input_shape=as_spec(input_shape), state_dict_key=state_dict_key
    )
    notes = list(listing.notes)
    recorded = changes_from_metadata(listing.metadata)
    if recorded is not None:
        version = listing.metadata.get("fc2conv.version", "?")
        notes.append(f"converted by fc2conv {version}: " + ", ".join(f"{c.name} -> {c.became}" for c in recorded))
    plan: Plan | None = None
    problem: str | None = None
    try:
        if listing.format == "onnx":
            from fc2conv.jobs.onnx import onnx_file_of, onnx_plan

            plan = onnx_plan(onnx_file_of(listing))
        else:
            plan = plan_for(listing, input_shape, flatten_order, layers, False, weight_layout, trust_shape)
    except PlanError as exc:  # a ShapeError (a given shape that does not fit) is the caller's error
        problem = str(exc)
    weighed = None
    if evidence and plan is not None:
        source = open_source(path, trust_pickle=trust_pickle, state_dict_key=state_dict_key)
        weighed = weigh_evidence(plan, source, geometry_given=input_shape is not None)
    return InspectResult(
        evidence=weighed,
        path=listing.path,
        format=listing.format,
        layers=tuple(group_layers(listing.infos)),
        infos=tuple(listing.infos),
        notes=tuple(notes),
        metadata=listing.metadata,
        plan=plan,
        plan_problem=problem,
    )
