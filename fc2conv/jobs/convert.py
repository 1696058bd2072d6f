"""``convert`` as a library call: read, plan, stream the converted tensors out, check the written file, publish."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from fc2conv._version import __version__
from fc2conv.check import check_changes, compare_spans, tensors_identical
from fc2conv.convert import converted_info, converted_tensor, keeps_bytes
from fc2conv.diskio import ByteSpan
from fc2conv.errors import OutputError
from fc2conv.formats import Source, open_source
from fc2conv.formats.hf_shards import INDEX_SUFFIX, index_json
from fc2conv.formats.safetensors import open_safetensors, write_safetensors
from fc2conv.plan import LayerChange, Plan, plan_conversion, plan_pointwise
from fc2conv.preload import preload_torch
from fc2conv.publish import atomic_folder, atomic_output, fsync_file
from fc2conv.record import METADATA_PREFIX, plan_to_metadata
from fc2conv.results import ConvertResult, LayerCheck
from fc2conv.types import FlattenOrder, ShapeLike, TensorInfo

if TYPE_CHECKING:
    import torch

__all__ = ["CONVERTED_SUFFIX", "ProgressCallback", "convert_file", "convert_source", "default_output", "write_checked"]

CONVERTED_SUFFIX = ".conv.safetensors"

ProgressCallback = Callable[[int, int, str], None]  # (bytes written so far, total bytes, tensor name)


def default_output(path: str | os.PathLike[str]) -> Path:
    """``model.pt`` -> ``model.conv.safetensors`` beside it."""
    path = Path(path)
    return path.with_name(path.stem + CONVERTED_SUFFIX)


def convert_file(
    input_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str] | None = None,
    *,
    input_shape: ShapeLike | None = None,
    flatten_order: FlattenOrder = "chw",
    layers: str | None = None,
    pointwise: bool = False,
    overwrite: bool = False,
    strict: bool = False,
    trust_pickle: bool = False,
    progress: ProgressCallback | None = None,
) -> ConvertResult:
    """Convert a checkpoint to safetensors whose FC layers are convolution kernels.

    Tensors are streamed one at a time from the (memory-mapped) input into a temporary file beside
    the output; every converted layer is then checked numerically *from the written file* against
    the input, and only if all checks pass is the file renamed onto the output path. A failed check
    leaves the output path untouched and returns ``written=False``.

    A sharded Hugging Face checkpoint (an ``*.safetensors.index.json``, or a folder of shards) is
    written as a folder of shards with the same names plus a new index; ``output_path`` is then
    that folder (default: ``<input folder>.conv`` beside the input folder).

    Args:
        input_path: ``.pt``/``.pth``/``.bin``/``.ckpt``, ``.safetensors``, an index, or a shard folder.
        output_path: Output file (or folder, for a sharded input).
        input_shape, flatten_order, layers: As for :func:`fc2conv.plan_conversion`.
        pointwise: Turn every Linear selected by ``layers`` into a 1x1 conv (:func:`fc2conv.plan_pointwise`).
        overwrite: Replace existing output files.
        strict: Fail layers with non-finite (NaN/Inf) weights too.
        trust_pickle: Unpickle arbitrary objects (runs the file's code: only for files you trust).
        progress: Called after each tensor is written.

    Raises:
        CheckpointError, PlanError, ShapeError, OutputError: the input cannot be read or converted,
            or the output cannot be written.
    """
    preload_torch()  # the import overlaps reading the input and copying its bytes
    return convert_source(
        open_source(input_path, trust_pickle=trust_pickle), output_path, input_shape=input_shape,
        flatten_order=flatten_order, layers=layers, pointwise=pointwise, overwrite=overwrite, strict=strict,
        progress=progress,
    )  # fmt: skip


def convert_source(
    source: Source,
    output_path: str | os.PathLike[str] | None = None,
    *,
    input_shape: ShapeLike | None = None,
    flatten_order: FlattenOrder = "chw",
    layers: str | None = None,
    pointwise: bool = False,
    overwrite: bool = False,
    strict: bool = False,
    progress: ProgressCallback | None = None,
) -> ConvertResult:
    """:func:`convert_file` on a checkpoint already opened (see :func:`fc2conv.formats.open_source`)."""
    started = time.perf_counter()
    if pointwise:
        plan = plan_pointwise(source.infos, layers)
    else:
        plan = plan_conversion(source.infos, input_shape, flatten_order, layers)
    metadata = {k: v for k, v in source.metadata.items() if not k.startswith(METADATA_PREFIX)}
    metadata.update(plan_to_metadata(plan, __version__, source=source.path.name))
    writer = _Writer(source, plan, metadata, strict, progress)
    if source.shards is None:
        output = Path(output_path) if output_path is not None else default_output(source.path)
        written = writer.write_file(output, source.infos, overwrite=overwrite, protect=[source.path])
    else:
        output = Path(output_path) if output_path is not None else _default_output_folder(source.shards.folder)
        written = writer.write_shards(output, overwrite=overwrite)
    return ConvertResult(
        input=source.path,
        output=output,
        plan=plan,
        checks=tuple(writer.checks),
        load_notes=tuple(source.notes),
        output_bytes=writer.size if written else 0,
        written=written,
        seconds=time.perf_counter() - started,
        shards=len(source.shards.files) if source.shards else 0,
    )


def _default_output_folder(folder: Path) -> Path:
    folder = folder.resolve()
    return folder.parent / f"{folder.name}.conv"


class _Writer:
    """Streams converted tensors into output files, checking each file before it is published."""

    def __init__(
        self, source: Source, plan: Plan, metadata: dict[str, str], strict: bool, progress: ProgressCallback | None
    ) -> None:
        self.source, self.plan, self.metadata, self.strict = source, plan, metadata, strict
        self.out_infos = {info.name: converted_info(plan, info) for info in source.infos}
        self.total = sum(i.nbytes for i in self.out_infos.values())
        self.progress = progress
        # Tensors written as they lie in the input (untouched ones, and kernels whose rearrangement keeps
        # the bytes): copied from the input file by the kernel, then compared with it byte for byte.
        self.spans = {
            name: span
            for name, span in source.spans.items()
            if (change := plan.change_for(name)) is None or keeps_bytes(change)
        }
        self.size = 0  # bytes of the files written so far
        self.done = 0  # bytes of tensor data written so far
        self.checks: list[LayerCheck] = []

    def _fetch(self, name: str) -> torch.Tensor:
        return converted_tensor(self.plan, name, self.source.tensors[name])

    def _written(self, info: TensorInfo) -> None:
        self.done += info.nbytes
        if self.progress is not None:
            self.progress(self.done, self.total, info.name)

    def write_file(
        self, target: Path, infos: Sequence[TensorInfo], *, overwrite: bool, protect: Sequence[Path] = ()
    ) -> bool:
        """Write ``infos`` (converted) to ``target`` atomically; False (nothing written) if a check fails."""
        names = {info.name for info in infos}
        checks, size, written = write_checked(
            target,
            [self.out_infos[info.name] for info in infos],
            self._fetch,
            self.metadata,
            [c for c in self.plan.layers if c.weight in names],
            self.source.tensors,
            overwrite=overwrite,
            protect=protect,
            strict=self.strict,
            on_tensor=self._written,
            spans=self.spans,
            untouched=self.source.tensors,
        )
        self.checks.extend(checks)
        self.size += size
        return written

    def write_shards(self, folder: Path, *, overwrite: bool) -> bool:
        """Write every shard into a staging folder, then move them and a new index into ``folder``."""
        layout = self.source.shards
        assert layout is not None
        index_name = layout.index.name if layout.index else f"model{INDEX_SUFFIX}"
        by_file = layout.tensors_by_file
        try:
            with atomic_folder(
                folder, [*layout.files, index_name], overwrite=overwrite, protect=layout.folder
            ) as staging:
                for file in layout.files:
                    infos = [self.out_infos[name] for name in by_file.get(file, ())]
                    if not self.write_file(staging / file, infos, overwrite=False):
                        raise _CheckFailed  # nothing is published: the staging folder goes
                weight_map = {name: file for file in layout.files for name in by_file.get(file, ())}
                index_metadata = {k: v for k, v in layout.index_metadata.items() if k != "total_size"}
                with atomic_output(staging / index_name) as tmp:
                    tmp.write_text(index_json(weight_map, self.total, index_metadata))
                    fsync_file(tmp)
        except _CheckFailed:
            return False
        return True


class _CheckFailed(Exception):
    """Raised inside an atomic write to discard an output whose check failed."""


def write_checked(
    target: Path,
    out_infos: Sequence[TensorInfo],
    fetch: Callable[[str], torch.Tensor],
    metadata: dict[str, str],
    changes: Sequence[LayerChange],
    original: Mapping[str, torch.Tensor],
    *,
    overwrite: bool,
    protect: Sequence[Path] = (),
    strict: bool = False,
    on_tensor: Callable[[TensorInfo], None] | None = None,
    spans: Mapping[str, ByteSpan] | None = None,
    untouched: Mapping[str, torch.Tensor] | None = None,
) -> tuple[list[LayerCheck], int, bool]:
    """Write a safetensors file atomically, check every byte of it and its converted layers, then publish it.

    Tensors in ``spans`` are copied from the input file by the kernel. The written file is then
    checked while it is flushed to the disk: each converted kernel byte for byte against the exact
    rearrangement of its weight and numerically against the FC; each other tensor, when ``untouched``
    (the input's tensors) is given, byte for byte against the input (a difference is a write failure).

    Returns the checks, the file size and whether it was published (False: a check failed, and
    nothing is left at ``target``).
    """
    checks: list[LayerCheck] = []
    try:
        with atomic_output(target, overwrite=overwrite, protect=protect) as tmp:
            size = write_safetensors(tmp, out_infos, fetch, metadata, sync=False, on_tensor=on_tensor, spans=spans)
            # The disk flush (I/O) and the checks of the written file (memory and CPU) overlap.
            with ThreadPoolExecutor(max_workers=1) as pool:
                synced = pool.submit(fsync_file, tmp)
                checks = _check_written(tmp, out_infos, changes, original, spans or {}, untouched, strict)
                synced.result()
            if not all(c.ok for c in checks):
                raise _CheckFailed
    except _CheckFailed:
        return checks, 0, False
    return checks, size, True


def _check_written(
    path: Path,
    out_infos: Sequence[TensorInfo],
    changes: Sequence[LayerChange],
    original: Mapping[str, torch.Tensor],
    spans: Mapping[str, ByteSpan],
    untouched: Mapping[str, torch.Tensor] | None,
    strict: bool,
) -> list[LayerCheck]:
    """Every byte of the written file against the input; the numeric check of every converted layer."""
    written = open_safetensors(path)
    # Spans first: memcmp over the mapped files needs no torch (which may still be importing).
    compared = compare_spans({n: (span, written.spans[n]) for n, span in spans.items() if n in written.spans})
    converted = {c.weight for c in changes}
    if untouched is not None:
        for info in out_infos:
            if info.name in converted:
                continue
            if info.name in compared:
                same = compared[info.name] is None
            else:
                same = tensors_identical(untouched[info.name], written.tensors[info.name])
            if not same:
                raise OutputError(
                    f"{path}: the written tensor {info.name!r} differs from the input; nothing was published"
                )
    return check_changes(changes, original, written.tensors, exact=True, strict=strict, compared=compared)
