"""ONNX graphs as library calls: heads rewritten as Conv nodes in the graph, proven in ONNX Runtime, published.

Unlike a checkpoint, an ONNX model is converted into an ONNX model: the graph is the output.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from fc2conv.check import tensors_identical
from fc2conv.errors import PlanError
from fc2conv.formats import Listing, Source
from fc2conv.formats.onnx import OnnxFile, OnnxTensors, load_onnx_model, write_onnx
from fc2conv.jobs.verify import difference
from fc2conv.onnx_check import OnnxProof, prove_onnx, returns_maps
from fc2conv.onnx_rewrite import onnx_changes, rewrite_onnx
from fc2conv.plan import Plan
from fc2conv.publish import atomic_output, fsync_file
from fc2conv.results import ConvertResult, ModuleCheck, TensorMismatch, VerifyResult
from fc2conv.types import InputShape

__all__ = ["convert_onnx_source", "default_onnx_output", "onnx_plan", "verify_onnx_sources"]

ONNX_SUFFIX = ".conv.onnx"


def default_onnx_output(path: str | os.PathLike[str]) -> Path:
    """``model.onnx`` -> ``model.conv.onnx`` beside it."""
    path = Path(path)
    return path.with_name(path.stem + ONNX_SUFFIX)


def onnx_file_of(listing: Listing) -> OnnxFile:
    """The graph a listing of an ``.onnx`` file carries."""
    if not isinstance(listing.native, OnnxFile):
        raise PlanError(f"{listing.path}: is not an ONNX model")
    return listing.native


def onnx_plan(onnx_file: OnnxFile) -> Plan:
    """The plan of a graph: every layer of every head, as the graph's shapes and transposes say."""
    changes = onnx_changes(onnx_file)
    converted = {c.weight for c in changes}
    first = onnx_file.heads[0]
    untouched = tuple(info.name for info in onnx_file.infos if info.name not in converted)
    return Plan(first.feature_map, first.flatten_order, changes, untouched, (), flatten_order_origin="from the graph")


def convert_onnx_source(
    source: Source, output: str | os.PathLike[str] | None = None, *, dense: bool = False, overwrite: bool = False
) -> ConvertResult:
    """Rewrite a graph's heads as convolutions, prove the result, and publish it if every check passes.

    Args:
        source: An ``.onnx`` file opened with :func:`fc2conv.formats.open_source`.
        output: The ``.onnx`` file to write (default ``<stem>.conv.onnx`` beside the input).
        dense: Drop the flatten and open the input's height and width: the model returns a map of
            scores, each position equal to the original on its window (checked position by position).
        overwrite: Replace an existing output file.
    """
    started = time.perf_counter()
    onnx_file = onnx_file_of(source)
    model = rewrite_onnx(onnx_file, dense=dense)
    proof = prove_onnx(onnx_file, model)
    target = Path(output) if output is not None else default_onnx_output(source.path)
    size = 0
    if proof.ok:
        with atomic_output(target, overwrite=overwrite, protect=[source.path]) as tmp:
            size = write_onnx(model, tmp)
            fsync_file(tmp)
    plan = onnx_plan(onnx_file)
    return ConvertResult(
        input=source.path, output=target, plan=plan, checks=proof.layers, load_notes=tuple(source.notes),
        output_bytes=size, written=proof.ok, seconds=time.perf_counter() - started,
        end_to_end=_end_to_end(proof, onnx_file), model_input_shape=_input_size(onnx_file),
    )  # fmt: skip


def verify_onnx_sources(
    original: Source, converted_path: str | os.PathLike[str], *, atol: float | None = None, rtol: float | None = None
) -> VerifyResult:
    """A converted graph against its original: per layer, end to end in ONNX Runtime, densely if it is dense.

    Initializers that are in both graphs and not converted must be identical, byte for byte.
    """
    onnx_file = onnx_file_of(original)
    converted = load_onnx_model(Path(converted_path))
    proof = prove_onnx(onnx_file, converted, atol=atol, rtol=rtol)
    changes = onnx_changes(onnx_file)
    theirs = OnnxTensors(converted)
    ours = onnx_file.tensors
    others = sorted(set(ours) & set(theirs) - {c.weight for c in changes})
    mismatches = tuple(
        TensorMismatch(name, difference(ours[name], theirs[name]))
        for name in others
        if not tensors_identical(ours[name], theirs[name])
    )
    kind = "a dense graph (maps of scores)" if returns_maps(onnx_file, converted) else "a graph of the same outputs"
    notes = (*original.notes, f"converted: {kind}")
    first = onnx_file.heads[0]
    return VerifyResult(
        original=original.path, converted=Path(converted_path), input_shape=first.feature_map,
        flatten_order=first.flatten_order, checks=proof.layers, identical=len(others) - len(mismatches),
        mismatches=mismatches, notes=notes, end_to_end=_end_to_end(proof, onnx_file),
    )  # fmt: skip


def _input_size(onnx_file: OnnxFile) -> InputShape | None:
    image = onnx_file.image_input
    return image.size if image is not None else None


def _end_to_end(proof: OnnxProof, onnx_file: OnnxFile) -> ModuleCheck:
    """ONNX Runtime's end-to-end (and dense) measurements as the end-to-end row of a result."""
    runtime, dense = proof.runtime, proof.dense
    shape = "x".join(map(str, runtime.input_shape))
    how = f"original vs converted graph in ONNX Runtime on seeded inputs {shape}"
    if dense is not None:
        big = "x".join(map(str, dense.input_shape))
        how += (
            f", and on {big}: {dense.positions_checked} output positions against the original head (extracted "
            "from the original graph) on their windows of the feature map"
        )
    grid = dense.grids[0] if dense is not None and dense.grids else (1, 1)
    return ModuleCheck(
        max_abs_error=runtime.max_abs_error, max_rel_error=runtime.max_rel_error,
        dense_max_abs_error=dense.max_abs_error if dense else 0.0,
        dense_max_rel_error=dense.max_rel_error if dense else 0.0, dense_grid=grid,
        positions_checked=dense.positions_checked if dense else 0, tolerance=runtime.tolerance,
        reference_scale=runtime.reference_scale, dense_reference_scale=dense.reference_scale if dense else 0.0,
        problem=runtime.problem or (dense.problem if dense else None), how=how,
        dtype=onnx_file.heads[0].layers[0].dtype,
    )  # fmt: skip
