"""The three commands as library calls: paths in, a result dataclass out (nothing printed here)."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fc2conv._version import __version__
from fc2conv.check import LayerCheck, check_changes
from fc2conv.errors import OutputError, PlanError, ShapeError
from fc2conv.io import (
    Checkpoint,
    atomic_output,
    dtype_itemsize,
    fsync_dir,
    fsync_file,
    is_safetensors,
    load_checkpoint,
    open_safetensors,
    read_tensor_infos,
    write_safetensors,
)
from fc2conv.module import ModuleCheck
from fc2conv.plan import (
    METADATA_PREFIX,
    Layer,
    LayerChange,
    Plan,
    TensorInfo,
    changes_from_metadata,
    group_layers,
    plan_conversion,
    plan_pointwise,
    plan_to_metadata,
)
from fc2conv.shapes import InputShape, ShapeSpec, as_spec, resolve_shape
from fc2conv.shards import INDEX_SUFFIX, ShardSet, index_json, is_sharded

CONVERTED_SUFFIX = ".conv.safetensors"


@dataclass(frozen=True)
class ConvertResult:
    """What ``convert`` did: the plan, the measured checks, and where the output went."""

    input: Path
    output: Path
    plan: Plan
    checks: tuple[LayerCheck, ...]
    load_notes: tuple[str, ...]
    output_bytes: int
    written: bool
    seconds: float
    shards: int = 0  # number of shard files written (0: a single file)
    end_to_end: ModuleCheck | None = None  # --model: original model vs converted model
    exports: tuple[Export, ...] = ()  # --export / --onnx files written
    model_input_shape: InputShape | None = None  # --model: the network input it was traced at

    @property
    def ok(self) -> bool:
        checks_ok = all(c.ok for c in self.checks) and (self.end_to_end is None or self.end_to_end.ok)
        return self.written and checks_ok and all(e.ok for e in self.exports)


@dataclass(frozen=True)
class Export:
    """A model file written by --export (torch.export) or --onnx, with its measured error if run."""

    kind: str  # "torch.export" or "onnx"
    path: Path
    max_abs_error: float | None  # vs the converted torch model on a larger input; None if not run
    tolerance: float = 1e-4

    @property
    def ok(self) -> bool:
        return self.max_abs_error is None or self.max_abs_error <= self.tolerance


@dataclass(frozen=True)
class InspectResult:
    """What a checkpoint holds, and what ``convert`` would do with it."""

    path: Path
    format: str
    layers: tuple[Layer, ...]
    infos: tuple[TensorInfo, ...]
    notes: tuple[str, ...]
    metadata: dict[str, str]
    plan: Plan | None
    plan_problem: str | None

    @property
    def parameters(self) -> int:
        return sum(t.numel for t in self.infos)

    @property
    def nbytes(self) -> int:
        return sum(t.numel * dtype_itemsize(t.dtype) for t in self.infos)


@dataclass(frozen=True)
class TensorMismatch:
    """A tensor that should be identical in both files but is not, or is only in one."""

    name: str
    reason: str


@dataclass(frozen=True)
class VerifyResult:
    """Per-layer numeric checks plus the bit-for-bit comparison of every other tensor."""

    original: Path
    converted: Path
    input_shape: InputShape | None
    flatten_order: str
    checks: tuple[LayerCheck, ...]
    identical: int
    mismatches: tuple[TensorMismatch, ...]
    notes: tuple[str, ...] = field(default=())
    end_to_end: ModuleCheck | None = None  # --model: original model vs converted model

    @property
    def ok(self) -> bool:
        if self.end_to_end is not None and not self.checks and not self.mismatches:
            return self.end_to_end.ok  # checked end to end only (see notes)
        end_to_end_ok = self.end_to_end is None or self.end_to_end.ok
        return bool(self.checks) and not self.mismatches and all(c.ok for c in self.checks) and end_to_end_ok


def default_output(path: str | os.PathLike[str]) -> Path:
    """``model.pt`` -> ``model.conv.safetensors`` beside it."""
    path = Path(path)
    return path.with_name(path.stem + CONVERTED_SUFFIX)


class _CheckFailed(Exception):
    """Raised inside the atomic write to discard an output whose check failed."""


ProgressCallback = Callable[[int, int, str], None]  # (bytes written so far, total bytes, tensor name)


def convert_file(
    input_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str] | None = None,
    *,
    input_shape: ShapeSpec | InputShape | tuple[int, int, int] | str | None = None,
    flatten_order: str = "chw",
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
        input_shape, flatten_order, layers: As for :func:`plan_conversion`.
        pointwise: Turn every Linear selected by ``layers`` into a 1x1 conv (:func:`plan_pointwise`).
        overwrite: Replace existing output files.
        strict: Fail layers with non-finite (NaN/Inf) weights too.
        trust_pickle: Passed to :func:`load_checkpoint`.
        progress: Called after each tensor is written.

    Raises:
        CheckpointError, PlanError, ShapeError, OutputError: the input cannot be read or converted,
            or the output cannot be written.
    """
    started = time.perf_counter()
    input_path = Path(input_path)
    checkpoint = load_checkpoint(input_path, trust_pickle=trust_pickle)
    if pointwise:
        plan = plan_pointwise(checkpoint.infos, layers)
    else:
        plan = plan_conversion(checkpoint.infos, input_shape, flatten_order, layers)
    metadata = {k: v for k, v in checkpoint.metadata.items() if not k.startswith(METADATA_PREFIX)}
    metadata.update(plan_to_metadata(plan, __version__, source=input_path.name))
    writer = _Writer(checkpoint, plan, metadata, strict, progress)
    if checkpoint.shards is None:
        output = Path(output_path) if output_path is not None else default_output(input_path)
        written = writer.write_file(output, checkpoint.infos, overwrite=overwrite, protect=[input_path])
    else:
        output = Path(output_path) if output_path is not None else _default_output_folder(checkpoint.shards)
        written = writer.write_shards(output, checkpoint.shards, checkpoint.shard_tensors or {}, overwrite=overwrite)
    return ConvertResult(
        input=input_path,
        output=output,
        plan=plan,
        checks=tuple(writer.checks),
        load_notes=tuple(checkpoint.notes),
        output_bytes=writer.size if written else 0,
        written=written,
        seconds=time.perf_counter() - started,
        shards=len(checkpoint.shards.files) if checkpoint.shards else 0,
    )


def _default_output_folder(shards: ShardSet) -> Path:
    folder = shards.folder.resolve()
    return folder.parent / f"{folder.name}.conv"


class _Writer:
    """Streams converted tensors into output files, checking each file before it is published."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        plan: Plan,
        metadata: dict[str, str],
        strict: bool,
        progress: ProgressCallback | None,
    ) -> None:
        self.checkpoint, self.plan, self.metadata, self.strict = checkpoint, plan, metadata, strict
        self.out_infos = {info.name: _converted_info(plan, info) for info in checkpoint.infos}
        self.total = sum(i.numel * dtype_itemsize(i.dtype) for i in self.out_infos.values())
        self.progress = progress
        self.size = 0  # bytes of the files written so far
        self.done = 0  # bytes of tensor data written so far
        self.checks: list[LayerCheck] = []

    def _fetch(self, name: str):  # noqa: ANN202 - a torch.Tensor, imported lazily
        from fc2conv import convert

        return convert.converted_tensor(self.plan, name, self.checkpoint.tensors[name])

    def _written(self, info: TensorInfo) -> None:
        self.done += info.numel * dtype_itemsize(info.dtype)
        if self.progress is not None:
            self.progress(self.done, self.total, info.name)

    def write_file(
        self, target: Path, infos: list[TensorInfo], *, overwrite: bool, protect: list[Path] | tuple[()] = ()
    ) -> bool:
        """Write ``infos`` (converted) to ``target`` atomically; False (nothing written) if a check fails."""
        names = {info.name for info in infos}
        checks, size, written = write_checked(
            target,
            [self.out_infos[info.name] for info in infos],
            self._fetch,
            self.metadata,
            [c for c in self.plan.layers if c.weight in names],
            self.checkpoint.tensors,
            overwrite=overwrite,
            protect=protect,
            strict=self.strict,
            on_tensor=self._written,
        )
        self.checks.extend(checks)
        self.size += size
        return written

    def write_shards(
        self, folder: Path, shards: ShardSet, shard_tensors: dict[str, list[str]], *, overwrite: bool
    ) -> bool:
        """Write every shard into a staging folder, then move them and a new index into ``folder``."""
        index_name = shards.index.name if shards.index else f"model{INDEX_SUFFIX}"
        created = _prepare_output_folder(folder, shards, [*shards.files, index_name], overwrite)
        staging = Path(tempfile.mkdtemp(prefix=".fc2conv-", dir=folder))
        published = False
        try:
            for file in shards.files:
                infos = [self.out_infos[name] for name in shard_tensors.get(file, [])]
                if not self.write_file(staging / file, infos, overwrite=False):
                    return False
            weight_map = {name: file for file in shards.files for name in shard_tensors.get(file, [])}
            index_metadata = {k: v for k, v in shards.index_metadata.items() if k != "total_size"}
            with atomic_output(staging / index_name) as tmp:
                tmp.write_text(index_json(weight_map, self.total, index_metadata))
                fsync_file(tmp)
            for name in [*shards.files, index_name]:  # the index last: it names the finished set
                os.replace(staging / name, folder / name)
            fsync_dir(folder)
            published = True
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            if created and not published:  # a failure or an interrupt leaves no new folder behind
                with contextlib.suppress(OSError):
                    folder.rmdir()
        return True


def write_checked(
    target: Path,
    out_infos: list[TensorInfo],
    fetch: Callable[[str], Any],
    metadata: dict[str, str],
    changes: list[LayerChange],
    original: Mapping[str, Any],
    *,
    overwrite: bool,
    protect: list[Path] | tuple[()] = (),
    strict: bool = False,
    on_tensor: Callable[[TensorInfo], None] | None = None,
) -> tuple[list[LayerCheck], int, bool]:
    """Write a safetensors file atomically, check its converted layers from the file, then publish it.

    Returns the checks, the file size and whether it was published (False: a check failed, and
    nothing is left at ``target``).
    """
    checks: list[LayerCheck] = []
    try:
        with atomic_output(target, overwrite=overwrite, protect=protect) as tmp:
            size = write_safetensors(tmp, out_infos, fetch, metadata, sync=False, on_tensor=on_tensor)
            # The disk flush (I/O) and the check of the written file (CPU) overlap.
            with ThreadPoolExecutor(max_workers=1) as pool:
                synced = pool.submit(fsync_file, tmp)
                checks = check_changes(changes, original, open_safetensors(tmp).tensors, strict=strict)
                synced.result()
            if not all(c.ok for c in checks):
                raise _CheckFailed
    except _CheckFailed:
        return checks, 0, False
    return checks, size, True


def _prepare_output_folder(folder: Path, shards: ShardSet, names: list[str], overwrite: bool) -> bool:
    """Check (and create) the output folder; True if it was created here."""
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder}: is a file; a sharded checkpoint is written to a folder (-o FOLDER)")
    if folder.exists() and os.path.samefile(folder, shards.folder):
        raise OutputError(f"{folder}: is the input folder; refusing to write over its shards; choose another -o")
    if not folder.exists():
        if not folder.parent.is_dir():
            raise OutputError(f"{folder}: its parent folder {folder.parent} does not exist")
        try:
            folder.mkdir()
        except OSError as exc:
            raise OutputError(f"{folder}: cannot create the folder ({exc.strerror or exc})") from exc
        return True
    existing = [name for name in names if (folder / name).exists()]
    if existing and not overwrite:
        raise OutputError(f"{folder / existing[0]}: already exists; pass --force to replace it")
    return False


def _converted_info(plan: Plan, info: TensorInfo) -> TensorInfo:
    change = plan.change_for(info.name)
    return TensorInfo(info.name, change.new_shape, info.dtype) if change else info


def inspect_file(
    path: str | os.PathLike[str],
    *,
    input_shape: ShapeSpec | InputShape | tuple[int, int, int] | str | None = None,
    flatten_order: str = "chw",
    layers: str | None = None,
    trust_pickle: bool = False,
) -> InspectResult:
    """List a checkpoint's layers and the conversion plan, reading only shapes.

    A safetensors file's header is all that is read. When no plan can be made without an input shape,
    the reason is returned in ``plan_problem``; a shape given by the caller that does not fit raises
    :class:`ShapeError`.
    """
    infos, metadata, notes = read_tensor_infos(path, trust_pickle=trust_pickle)
    plan: Plan | None = None
    problem: str | None = None
    recorded = changes_from_metadata(metadata)
    if recorded is not None:
        notes = [
            *notes,
            f"converted by fc2conv {metadata.get('fc2conv.version', '?')}: "
            + ", ".join(f"{c.name} -> {c.became}" for c in recorded),
        ]
    try:
        plan = plan_conversion(infos, input_shape, flatten_order, layers)
    except PlanError as exc:  # a ShapeError (a given shape that does not fit) is the caller's error
        problem = str(exc)
    return InspectResult(
        path=Path(path),
        format=_format_of(Path(path)),
        layers=tuple(group_layers(infos)),
        infos=tuple(infos),
        notes=tuple(notes),
        metadata=metadata,
        plan=plan,
        plan_problem=problem,
    )


def verify_files(
    original_path: str | os.PathLike[str],
    converted_path: str | os.PathLike[str],
    *,
    input_shape: ShapeSpec | InputShape | tuple[int, int, int] | str | None = None,
    flatten_order: str | None = None,
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
        trust_pickle: Passed to :func:`load_checkpoint` for both files.
    """
    original = load_checkpoint(original_path, trust_pickle=trust_pickle)
    converted = load_checkpoint(converted_path, trust_pickle=trust_pickle)
    notes: list[str] = [*original.notes, *converted.notes]
    recorded = changes_from_metadata(converted.metadata)
    if recorded is not None:
        changes = recorded
        notes.append(f"converted layers read from the metadata of {Path(converted_path).name}")
    else:
        changes = _changes_from_shapes(original.infos, converted.infos, flatten_order or "chw")
        notes.append("no fc2conv metadata: converted layers found by shape (2-D in original, 4-D in converted)")
    if flatten_order is not None:
        changes = [
            replace(c, flatten_order=flatten_order) if c.in_map.height * c.in_map.width > 1 else c for c in changes
        ]
    # The layer whose map is more than 1x1 carries the geometry (a chain's first layer).
    first = next((c for c in changes if c.in_map.height * c.in_map.width > 1), changes[0] if changes else None)
    spec = as_spec(input_shape)
    if spec is not None and first is not None:
        given = resolve_shape(spec, first.old_shape[1], first.name)
        if given != first.in_map:
            raise ShapeError(
                f"{first.name}: --input-shape {given} does not match the converted kernel's map {first.in_map}"
            )

    original_names = {i.name for i in original.infos}
    converted_names = {i.name for i in converted.infos}
    only_original, only_converted = original_names - converted_names, converted_names - original_names
    mismatches = [TensorMismatch(n, "missing from the converted file") for n in sorted(only_original)]
    mismatches += [TensorMismatch(n, "not in the original file") for n in sorted(only_converted)]
    present = [c for c in changes if c.weight in original_names and c.weight in converted_names]
    checks = check_changes(
        present, original.tensors, converted.tensors, atol=atol, rtol=rtol, exact=True, strict=strict
    )

    from fc2conv.check import tensors_identical

    identical = 0
    for name in sorted((original_names & converted_names) - {c.weight for c in changes}):
        a, b = original.tensors[name], converted.tensors[name]
        if tensors_identical(a, b):
            identical += 1
        else:
            mismatches.append(TensorMismatch(name, _difference(a, b)))
    if not changes:
        notes.append("no converted layer found: nothing is 2-D in the original and 4-D in the converted file")
    return VerifyResult(
        original=Path(original_path),
        converted=Path(converted_path),
        input_shape=first.in_map if first is not None else None,
        flatten_order=first.flatten_order if first is not None else (flatten_order or "chw"),
        checks=tuple(checks),
        identical=identical,
        mismatches=tuple(mismatches),
        notes=tuple(notes),
    )


def _format_of(path: Path) -> str:
    if is_sharded(path):
        return "sharded safetensors"
    return "safetensors" if is_safetensors(path) else "torch"


def _changes_from_shapes(
    original: list[TensorInfo], converted: list[TensorInfo], flatten_order: str
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


def _difference(a, b) -> str:  # noqa: ANN001 - torch tensors, imported lazily
    from fc2conv.convert import dtype_name

    if a.dtype != b.dtype:
        return f"dtype changed: {dtype_name(a.dtype)} -> {dtype_name(b.dtype)}"
    if a.shape != b.shape:
        return f"shape changed: {tuple(a.shape)} -> {tuple(b.shape)}"
    if a.is_floating_point():
        worst = math.nan
        flat_a, flat_b = a.reshape(-1), b.reshape(-1)
        step = 2**22  # float64 copies a piece at a time, not of the whole tensor
        for start in range(0, flat_a.numel(), step):
            diff = (flat_a[start : start + step].double() - flat_b[start : start + step].double()).abs()
            diff = diff[~diff.isnan()]
            if diff.numel():
                worst = max(float(diff.max()), 0.0 if math.isnan(worst) else worst)
        return f"values differ (max abs difference {worst:.3g})"
    return "values differ"
