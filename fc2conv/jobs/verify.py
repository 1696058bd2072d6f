"""``verify`` as a library call: a converted checkpoint against its source, layer by layer and byte by byte."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from fc2conv.check import compare_spans, tensors_identical
from fc2conv.convert import keeps_bytes
from fc2conv.diskio import ByteSpan
from fc2conv.errors import ShapeError
from fc2conv.formats import Source, open_source
from fc2conv.jobs.planning import first_fc_weight
from fc2conv.jobs.proofs import prove_layers, proven_without_torch
from fc2conv.plan import LayerChange
from fc2conv.preload import preload_numpy, preload_torch
from fc2conv.record import changes_from_metadata
from fc2conv.results import Evidence, TensorMismatch, VerifyResult
from fc2conv.shapes import as_spec, resolve_shape
from fc2conv.types import FlattenOrder, InputShape, ShapeLike, TensorInfo, dtype_name

if TYPE_CHECKING:
    import torch

__all__ = ["difference", "verify_files", "verify_sources"]


def verify_files(
    original_path: str | os.PathLike[str],
    converted_path: str | os.PathLike[str],
    *,
    input_shape: ShapeLike | None = None,
    flatten_order: FlattenOrder | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    strict: bool = False,
    trust_pickle: bool = False,
) -> VerifyResult:
    """Check a converted checkpoint against its source.

    Converted layers come from the converted file's fc2conv metadata when it has it; otherwise every
    tensor that is 2-D in the original and 4-D in the converted file is taken as converted (so files
    made by other tools can be checked too). Each is checked numerically (traced size and sliding
    window) and for bit-exactness; every other tensor must be bit-for-bit identical.

    Args:
        original_path, converted_path: The two checkpoints.
        input_shape: Optional cross-check of the first converted layer's geometry.
        flatten_order: Overrides the recorded order (default: recorded, else ``chw``).
        atol, rtol: Override the per-dtype tolerances.
        strict: Fail layers with non-finite (NaN/Inf) weights or outputs.
        trust_pickle: Unpickle arbitrary objects in both files (runs their code: only for files you trust).
    """
    return verify_sources(
        open_source(original_path, trust_pickle=trust_pickle), open_source(converted_path, trust_pickle=trust_pickle),
        input_shape=input_shape, flatten_order=flatten_order, atol=atol, rtol=rtol, strict=strict,
    )  # fmt: skip


def verify_sources(
    original: Source,
    converted: Source,
    *,
    input_shape: ShapeLike | None = None,
    flatten_order: FlattenOrder | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    strict: bool = False,
) -> VerifyResult:
    """:func:`verify_files` on two checkpoints already opened."""
    notes: list[str] = [*original.notes, *converted.notes]
    changes = _converted_layers(original, converted, flatten_order, notes)
    if not _without_torch(original, converted, changes):
        preload_torch(original.format, converted.format)  # its import overlaps comparing the bytes
    preload_numpy()  # for the proofs from the bytes, also while they are compared
    # The layer whose map is more than 1x1 carries the geometry (a chain's first layer).
    first = next((c for c in changes if c.in_map.height * c.in_map.width > 1), changes[0] if changes else None)
    if first is not None:
        _cross_check(input_shape, first)
    original_names = {i.name for i in original.infos}
    converted_names = {i.name for i in converted.infos}
    mismatches = [
        TensorMismatch(n, "missing from the converted file") for n in sorted(original_names - converted_names)
    ]
    mismatches += [TensorMismatch(n, "not in the original file") for n in sorted(converted_names - original_names)]
    present = [c for c in changes if c.weight in original_names and c.weight in converted_names]
    others = sorted((original_names & converted_names) - {c.weight for c in changes})
    # Every byte, compared first where both files give the spans (memcmp, no torch needed yet).
    compared = compare_spans(_span_pairs(original, converted, present, others))
    checks = prove_layers(present, original, converted, compared, atol=atol, rtol=rtol, strict=strict)
    different = [TensorMismatch(n, difference(original.tensors[n], converted.tensors[n])) for n in others
                 if not _identical(n, compared, original, converted)]  # fmt: skip
    if not changes:
        notes.append("no converted layer found: nothing is 2-D in the original and 4-D in the converted file")
    evidence = _recorded_evidence(changes, original, converted)
    return VerifyResult(
        original=original.path,
        converted=converted.path,
        input_shape=first.in_map if first is not None else None,
        flatten_order=first.flatten_order if first is not None else (flatten_order or "chw"),
        checks=tuple(checks),
        identical=len(others) - len(different),
        mismatches=(*mismatches, *different),
        notes=tuple(notes),
        evidence=evidence,
        strict=strict,
    )


def _without_torch(original: Source, converted: Source, changes: Sequence[LayerChange]) -> bool:
    """Whether every tensor of both files is compared as bytes and every layer proven from them (no torch)."""
    if converted.format not in ("safetensors", "sharded safetensors") or converted.module is not None:
        return False
    if any(info.name not in converted.spans for info in converted.infos):
        return False
    converted_infos = converted.info_by_name
    kernels = {c.weight for c in changes}
    others = [i for i in original.infos if i.name not in kernels]
    if any(converted_infos.get(i.name) != i for i in others):  # a difference is named through torch
        return False
    return proven_without_torch(original, changes, converted_infos)


def _span_pairs(
    original: Source, converted: Source, changes: Sequence[LayerChange], others: Sequence[str]
) -> dict[str, tuple[ByteSpan, ByteSpan]]:
    """The byte spans to compare: other tensors of the same dtype and shape, kernels that keep their bytes."""
    original_infos, converted_infos = original.info_by_name, converted.info_by_name
    names = [n for n in others if original_infos[n] == converted_infos[n]]
    names += [c.weight for c in changes if keeps_bytes(c)]
    return {n: (original.spans[n], converted.spans[n]) for n in names if n in original.spans and n in converted.spans}


def _identical(name: str, compared: dict[str, int | None], original: Source, converted: Source) -> bool:
    if name in compared:
        return compared[name] is None
    return tensors_identical(original.tensors[name], converted.tensors[name])


def _recorded_evidence(changes: Sequence[LayerChange], original: Source, converted: Source) -> Evidence | None:
    """What the original weights say of the order the conversion used (unless a model file stated it)."""
    first = next((c for c in changes if c.in_map.height * c.in_map.width > 1 and c.in_map.channels > 1), None)
    if first is None or first.weight not in original.tensors or original.heads is not None:
        return None
    from fc2conv.evidence import order_evidence  # numpy, imported meanwhile on another thread

    weight = first_fc_weight(first, original)
    return Evidence(first.name, first.flatten_order, first.in_map, order_evidence(weight, first.in_map))


def _converted_layers(
    original: Source, converted: Source, flatten_order: FlattenOrder | None, notes: list[str]
) -> list[LayerChange]:
    """The converted layers, from the converted file's record, else found by shape; the order applied."""
    recorded = changes_from_metadata(converted.metadata)
    if recorded is not None:
        changes = recorded
        notes.append(f"converted layers read from the metadata of {Path(converted.path).name}")
    else:
        changes = _changes_from_shapes(original.infos, converted.infos, flatten_order or "chw")
        notes.append("no fc2conv metadata: converted layers found by shape (2-D in original, 4-D in converted)")
    if flatten_order is None:
        return changes
    return [replace(c, flatten_order=flatten_order) if c.in_map.height * c.in_map.width > 1 else c for c in changes]


def _cross_check(input_shape: ShapeLike | None, first: LayerChange) -> None:
    """A shape the caller gave must be the geometry the converted kernel has."""
    spec = as_spec(input_shape)
    if spec is None:
        return
    given = resolve_shape(spec, first.old_shape[1], first.name)
    if given != first.in_map:
        raise ShapeError(
            f"{first.name}: the given input shape {given} does not match the converted kernel's map {first.in_map}"
        )


def _changes_from_shapes(
    original: Sequence[TensorInfo], converted: Sequence[TensorInfo], flatten_order: FlattenOrder
) -> list[LayerChange]:
    by_name = {i.name: i for i in converted}
    original_names = {i.name for i in original}
    changes = []
    for info in original:
        new = by_name.get(info.name)
        if new is None or len(info.shape) != 2 or len(new.shape) != 4 or not info.name.endswith("weight"):
            continue
        out, channels, height, width = new.shape
        if out != info.shape[0] or channels * height * width != info.shape[1]:
            continue
        module = info.name[: -len("weight")].rstrip(".")
        bias = f"{module}.bias" if module else "bias"
        changes.append(
            LayerChange(
                name=module or info.name,
                weight=info.name,
                bias=bias if bias in original_names else None,
                dtype=info.dtype,
                old_shape=(info.shape[0], info.shape[1]),
                in_map=InputShape(channels, height, width),
                flatten_order=flatten_order if height * width > 1 else "chw",
            )
        )
    return changes


def difference(a: torch.Tensor, b: torch.Tensor) -> str:
    """How two tensors that should be identical differ: dtype, shape, or values (with the largest gap)."""
    if a.dtype != b.dtype:
        return f"dtype changed: {dtype_name(a.dtype)} -> {dtype_name(b.dtype)}"
    if a.shape != b.shape:
        return f"shape changed: {tuple(a.shape)} -> {tuple(b.shape)}"
    if not a.is_floating_point():
        return "values differ"
    worst = math.nan
    flat_a, flat_b = a.reshape(-1), b.reshape(-1)
    step = 2**22  # float64 copies a piece at a time, not of the whole tensor
    for start in range(0, flat_a.numel(), step):
        diff = (flat_a[start : start + step].double() - flat_b[start : start + step].double()).abs()
        diff = diff[~diff.isnan()]
        if diff.numel():
            worst = max(float(diff.max()), 0.0 if math.isnan(worst) else worst)
    return f"values differ (max abs difference {worst:.3g})"
