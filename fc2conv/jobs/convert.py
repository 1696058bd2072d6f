"""``convert`` as a library call: read, plan, stream the converted tensors out, check the written file, publish."""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from fc2conv._version import __version__
from fc2conv.check import compare_spans, tensors_identical
from fc2conv.convert import converted_info, converted_tensor, keeps_bytes, rearranged_kernel
from fc2conv.diskio import ByteSpan
from fc2conv.errors import OutputError, PlanError
from fc2conv.formats import Source, open_source
from fc2conv.formats.hf_shards import INDEX_SUFFIX, index_json
from fc2conv.formats.safetensors import open_safetensors, write_safetensors
from fc2conv.jobs.planning import plan_for, weigh_evidence
from fc2conv.jobs.proofs import checks_ahead, moved_in_numpy, prove_layers, proven_without_torch
from fc2conv.layouts import LayoutChoice
from fc2conv.plan import LayerChange, Plan
from fc2conv.preload import preload_numpy, preload_torch
from fc2conv.publish import FolderOutput, atomic_folder, atomic_output, file_path, fsync_file
from fc2conv.record import METADATA_PREFIX, changes_from_metadata, plan_to_metadata
from fc2conv.results import ConvertResult, Evidence, Export, LayerCheck
from fc2conv.types import FlattenOrder, ShapeLike, TensorInfo

if TYPE_CHECKING:
    import numpy as np
    import torch

__all__ = [
    "CONVERTED_SUFFIX",
    "ProgressCallback",
    "convert_file",
    "convert_source",
    "default_output",
    "shared_storage_notes",
    "write_checked",
]

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
    flatten_order: FlattenOrder | None = None,
    layers: str | None = None,
    pointwise: bool = False,
    weight_layout: LayoutChoice = "auto",
    trust_shape: bool = False,
    overwrite: bool = False,
    strict: bool = False,
    trust_pickle: bool = False,
    state_dict_key: str | None = None,
    progress: ProgressCallback | None = None,
    keras_out: str | os.PathLike[str] | None = None,
) -> ConvertResult:
    """Convert a checkpoint to safetensors whose FC layers are convolution kernels.

    Tensors are streamed one at a time from the (memory-mapped) input into a temporary file beside
    the output; every byte of the written file is then compared with the input, every converted
    layer is checked numerically against the FC (from the written file; a kernel proven to be its
    weight's bytes, on those bytes, with numpy and while they are copied), and only if all checks
    pass is the file renamed onto the output path. A failed check leaves the output path untouched
    and returns ``written=False``.

    A sharded Hugging Face checkpoint (an ``*.safetensors.index.json``, or a folder of shards) is
    written as a folder of shards with the same names plus a new index; ``output_path`` is then
    that folder (default: ``<input folder>.conv`` beside the input folder).

    Args:
        input_path: ``.pt``/``.pth``/``.bin``/``.ckpt``, ``.safetensors``, an index, or a shard folder.
        output_path: Output file (or folder, for a sharded input).
        input_shape, flatten_order, layers, weight_layout, trust_shape: As for :func:`fc2conv.plan_conversion`.
        pointwise: Turn every Linear selected by ``layers`` into a 1x1 conv (:func:`fc2conv.plan_pointwise`).
        overwrite: Replace existing output files.
        strict: Fail layers with non-finite (NaN/Inf) weights too.
        trust_pickle: Unpickle arbitrary objects (runs the file's code: only for files you trust).
        state_dict_key: Where a training checkpoint keeps the weights (``"model_ema"``, ``"a.b"``).
        progress: Called after each tensor is written.
        keras_out: A Keras model as input only: also write the fully convolutional Keras model there.

    Raises:
        CheckpointError, PlanError, ShapeError, OutputError: the input cannot be read or converted
            (an fc2conv conversion already is one), or the output cannot be written.
    """
    source = open_source(input_path, trust_pickle=trust_pickle, state_dict_key=state_dict_key)
    return convert_source(
        source, output_path, input_shape=input_shape, flatten_order=flatten_order, layers=layers,
        pointwise=pointwise, weight_layout=weight_layout, trust_shape=trust_shape, overwrite=overwrite,
        strict=strict, progress=progress, keras_out=keras_out,
    )  # fmt: skip


def convert_source(
    source: Source,
    output_path: str | os.PathLike[str] | None = None,
    *,
    input_shape: ShapeLike | None = None,
    flatten_order: FlattenOrder | None = None,
    layers: str | None = None,
    pointwise: bool = False,
    weight_layout: LayoutChoice = "auto",
    trust_shape: bool = False,
    overwrite: bool = False,
    strict: bool = False,
    progress: ProgressCallback | None = None,
    keras_out: str | os.PathLike[str] | None = None,
) -> ConvertResult:
    """:func:`convert_file` on a checkpoint already opened (see :func:`fc2conv.formats.open_source`).

    ``keras_out`` (a Keras model as input only) also writes the fully convolutional Keras model there,
    after the converted weights are published, proven in Keras before it is renamed into place.
    """
    started = time.perf_counter()
    _refuse_conversions(source)
    if keras_out is not None:
        require_keras_model(source)
    plan = plan_for(source, input_shape, flatten_order, layers, pointwise, weight_layout, trust_shape)
    out_infos = {info.name: converted_info(plan, info) for info in source.infos}
    if keras_out is None and not proven_without_torch(source, plan.layers, out_infos):
        preload_torch(source.format)  # torch is needed: its import overlaps copying the input's bytes
    preload_numpy()  # for the proofs from the files' bytes and the evidence, also while the bytes are copied
    metadata = {k: v for k, v in source.metadata.items() if not k.startswith(METADATA_PREFIX)}
    metadata.update(plan_to_metadata(plan, __version__, source=source.path.name))
    # The evidence is weighed on another thread while the bytes are copied; a strict conversion it
    # fails publishes nothing.
    with ThreadPoolExecutor(max_workers=1) as pool:
        weighed = pool.submit(weigh_evidence, plan, source, geometry_given=input_shape is not None)
        writer = _Writer(
            source, plan, out_infos, metadata, strict, progress, veto=lambda: _vetoed(weighed.result(), strict)
        )
        # The numeric checks of kernels copied as bytes, on the input's bytes, also while they are copied.
        writer.ahead = checks_ahead(plan.layers, source, out_infos, pool)
        if source.shards is None:
            output = file_path(output_path) if output_path is not None else default_output(source.path)
            written = writer.write_file(output, source.infos, overwrite=overwrite, protect=[source.path])
        else:
            output = Path(output_path) if output_path is not None else _default_output_folder(source.shards.folder)
            written = writer.write_shards(output, overwrite=overwrite)
        evidence = weighed.result()
    if _vetoed(evidence, strict):  # the evidence fails the conversion: nothing was written
        return ConvertResult(
            input=source.path, output=output, plan=plan, checks=(), load_notes=tuple(source.notes), output_bytes=0,
            written=False, seconds=time.perf_counter() - started, evidence=evidence, strict=True,
        )  # fmt: skip
    exports = [_keras_export(source, plan, keras_out, overwrite)] if keras_out is not None and written else []
    return ConvertResult(
        input=source.path,
        output=output,
        plan=plan,
        checks=tuple(writer.checks),
        load_notes=(*source.notes, *shared_storage_notes(source.tensors, source.spans)),
        output_bytes=writer.size if written else 0,
        written=written,
        seconds=time.perf_counter() - started,
        shards=len(source.shards.files) if source.shards else 0,
        exports=tuple(exports),
        evidence=evidence,
        strict=strict,
    )


def _vetoed(evidence: Evidence | None, strict: bool) -> bool:
    return strict and evidence is not None and bool(evidence.warnings)


def require_keras_model(source: Source) -> None:
    """A Keras export needs a Keras model as input, and keras installed: checked before any work."""
    from fc2conv.formats.keras import KerasFile
    from fc2conv.keras_export import require_keras

    if not isinstance(source.native, KerasFile):
        raise PlanError(f"{source.path}: a Keras export needs a Keras model (.keras or .h5) as input")
    require_keras()


def _keras_export(source: Source, plan: Plan, target: str | os.PathLike[str], overwrite: bool) -> Export:
    """Write the fully convolutional Keras model from the converted tensors; its error measured in Keras."""
    from fc2conv.keras_export import export_keras

    converted = {
        name: converted_tensor(plan, name, source.tensors[name])
        for change in plan.layers
        for name in (change.weight, change.bias)
        if name is not None
    }
    result = export_keras(source.native, converted, target, overwrite=overwrite)
    bound = result.tolerance.atol + result.tolerance.rtol * result.reference_scale
    return Export("keras", Path(target), result.max_abs_error, tolerance=bound, written=result.written)


def _refuse_conversions(source: Source) -> None:
    """A file fc2conv converted already is refused: converting it again would leave a record verify cannot use."""
    recorded = changes_from_metadata(source.metadata)
    if recorded is not None:
        done = ", ".join(f"{c.name} -> {c.became}" for c in recorded)
        raise PlanError(
            f"{source.path}: is already a conversion by fc2conv ({done}); convert the original checkpoint "
            "(every head is converted in one pass)"
        )


def shared_storage_notes(tensors: Mapping[str, torch.Tensor], spans: Mapping[str, ByteSpan] | None = None) -> list[str]:
    """Say which tensors share memory (tied weights, overlapping views): each is written as its own copy.

    safetensors has no shared tensors (``safetensors.torch.save_file`` refuses them), and dropping a
    name would change the checkpoint's keys; so every name is written whole, and the output says so.
    Tensors read as data share bytes of the file (their ``spans`` overlap); a state dict torch loaded
    shares storages. Lazily read formats (safetensors) share nothing.
    """
    regions: dict[object, list[tuple[int, int, str]]] = {}
    for name, span in (spans or {}).items():
        if span.nbytes:
            regions.setdefault(span.path, []).append((span.offset, span.offset + span.nbytes, name))
    if isinstance(tensors, dict):
        import torch

        for name, tensor in tensors.items():
            if tensor.layout is not torch.strided or tensor.is_quantized or tensor.numel() == 0:
                continue
            size, strides = tensor.element_size(), zip(tensor.shape, tensor.stride(), strict=True)
            last = tensor.storage_offset() + sum((n - 1) * step for n, step in strides)
            regions.setdefault(tensor.untyped_storage().data_ptr(), []).append(
                (tensor.storage_offset() * size, (last + 1) * size, name)
            )
    return [
        f"{', '.join(group)} share memory in the input (tied weights); safetensors has no shared tensors, so "
        "each is written as a copy of its own"
        for entries in regions.values()
        for group in _overlapping(entries)
    ]


def _overlapping(spans: list[tuple[int, int, str]]) -> list[list[str]]:
    """Groups (of two or more) of names whose byte spans overlap."""
    groups: list[list[str]] = []
    end = -1
    for begin, stop, name in sorted(spans):
        if groups and begin < end:
            groups[-1].append(name)
        else:
            groups.append([name])
        end = max(end, stop) if len(groups[-1]) > 1 else stop
    return [group for group in groups if len(group) > 1]


def _default_output_folder(folder: Path) -> Path:
    folder = folder.resolve()
    return folder.parent / f"{folder.name}.conv"


class _Writer:
    """Streams converted tensors into output files, checking each file before it is published."""

    def __init__(
        self,
        source: Source,
        plan: Plan,
        out_infos: Mapping[str, TensorInfo],
        metadata: dict[str, str],
        strict: bool,
        progress: ProgressCallback | None,
        veto: Callable[[], bool] | None = None,
    ) -> None:
        self.source, self.plan, self.metadata, self.strict = source, plan, metadata, strict
        self.veto = veto  # asked before each file is published: True discards it
        self.out_infos = out_infos  # each tensor as written (converted_info)
        self.total = sum(i.nbytes for i in self.out_infos.values())
        self.progress = progress
        # Tensors written as they lie in the input (untouched ones, and kernels whose rearrangement keeps
        # the bytes): copied from the input file by the kernel, then compared with it byte for byte.
        self.spans = {
            name: span
            for name, span in source.spans.items()
            if (change := plan.change_for(name)) is None or keeps_bytes(change)
        }
        # Kernels that move bytes, rearranged with numpy from the input's bytes (no torch).
        self.moved = moved_in_numpy(plan.layers, source, self.out_infos)
        self.ahead: Mapping[str, Future[LayerCheck]] = {}  # numeric checks started before the write
        self.size = 0  # bytes of the files written so far
        self.done = 0  # bytes of tensor data written so far
        self.checks: list[LayerCheck] = []

    def _fetch(self, name: str) -> torch.Tensor | np.ndarray:
        if name in self.moved:
            from fc2conv.span_arrays import span_array

            change = self.plan.change_for(name)
            assert change is not None
            stored = span_array(self.source.spans[name], self.out_infos[name].dtype, change.stored_shape)
            return rearranged_kernel(change, stored)
        return converted_tensor(self.plan, name, self.source.tensors[name])

    def _written(self, info: TensorInfo) -> None:
        self.done += info.nbytes
        if self.progress is not None:
            self.progress(self.done, self.total, info.name)

    def write_file(
        self,
        target: Path,
        infos: Sequence[TensorInfo],
        *,
        overwrite: bool,
        protect: Sequence[Path] = (),
    ) -> bool:
        """Write ``infos`` (converted) to ``target`` atomically; False (nothing written) if a check fails."""
        names = {info.name for info in infos}
        checks, size, written = write_checked(
            target,
            [self.out_infos[info.name] for info in infos],
            self._fetch,
            self.metadata,
            [c for c in self.plan.layers if c.weight in names],
            self.source,
            overwrite=overwrite,
            protect=protect,
            strict=self.strict,
            on_tensor=self._written,
            spans=self.spans,
            untouched=self.source.tensors,
            veto=self.veto,
            ahead=self.ahead,
        )
        self.checks.extend(checks)
        self.size += size
        return written

    def write_shards(self, folder: Path, *, overwrite: bool) -> bool:
        """Write every shard and a new index, each checked, then put them in place as ``folder`` at once."""
        layout = self.source.shards
        assert layout is not None
        index_name = layout.index.name if layout.index else f"model{INDEX_SUFFIX}"
        by_file = layout.tensors_by_file
        inputs = [layout.folder / file for file in (*layout.files, *([index_name] if layout.index else []))]
        try:
            with atomic_folder(folder, overwrite=overwrite, protect=layout.folder, inputs=inputs) as output:
                # Each shard is checked (and flushed) on another thread while the next one is written.
                with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fc2conv-check") as checker:
                    pending: deque[Future[tuple[list[LayerCheck], int]]] = deque()
                    for file in layout.files:
                        if len(pending) == _SHARDS_AHEAD:  # a bounded lead: each pending check holds a descriptor
                            self._collect(pending.popleft())
                        pending.append(self._write_shard(output, file, by_file.get(file, ()), checker))
                    while pending:
                        self._collect(pending.popleft())
                if not all(c.ok for c in self.checks) or (self.veto is not None and self.veto()):
                    raise _CheckFailed  # nothing is published: the finished shards go
                weight_map = {name: file for file in layout.files for name in by_file.get(file, ())}
                index_metadata = {k: v for k, v in layout.index_metadata.items() if k != "total_size"}
                with output.file(index_name) as tmp:
                    tmp.write_text(index_json(weight_map, self.total, index_metadata))
                    fsync_file(tmp)
        except _CheckFailed:
            return False
        return True

    def _write_shard(
        self, output: FolderOutput, file: str, names: Sequence[str], checker: Executor
    ) -> Future[tuple[list[LayerCheck], int]]:
        """Write one shard into the output folder; its checks run on ``checker``, through a descriptor of their own."""
        out_infos = [self.out_infos[name] for name in names]
        with output.file(file) as tmp:
            size = write_safetensors(tmp, out_infos, self._fetch, self.metadata, sync=False, on_tensor=self._written,
                                     spans=self.spans)  # fmt: skip
            reader = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)  # the file, whatever its name becomes meanwhile
        # Through the descriptor where the system names descriptors (an unnamed file's only path); else by the
        # staging name, which stays until the folder is published (after every check).
        by_descriptor = Path(f"/proc/self/fd/{reader}")
        path = by_descriptor if by_descriptor.exists() else tmp
        written = set(names)
        changes = [c for c in self.plan.layers if c.weight in written]
        return checker.submit(self._check_shard, reader, path, out_infos, changes, size)

    def _collect(self, future: Future[tuple[list[LayerCheck], int]]) -> None:
        checks, size = future.result()
        self.checks.extend(checks)
        self.size += size

    def _check_shard(
        self, reader: int, path: Path, out_infos: list[TensorInfo], changes: list[LayerChange], size: int
    ) -> tuple[list[LayerCheck], int]:
        """A written shard flushed to the disk and checked as :func:`write_checked` checks a file."""
        try:
            os.fsync(reader)
            checks = _check_written(
                path, out_infos, changes, self.source, self.spans, self.source.tensors, self.strict, self.ahead
            )
        finally:
            os.close(reader)
        return checks, size


# Shards written while earlier ones are still being checked, at most.
_SHARDS_AHEAD = 2


class _CheckFailed(Exception):
    """Raised inside an atomic write to discard an output whose check failed."""


def write_checked(
    target: Path,
    out_infos: Sequence[TensorInfo],
    fetch: Callable[[str], torch.Tensor | np.ndarray],
    metadata: dict[str, str],
    changes: Sequence[LayerChange],
    original: Source,
    *,
    overwrite: bool,
    protect: Sequence[Path] = (),
    strict: bool = False,
    on_tensor: Callable[[TensorInfo], None] | None = None,
    spans: Mapping[str, ByteSpan] | None = None,
    untouched: Mapping[str, torch.Tensor] | None = None,
    veto: Callable[[], bool] | None = None,
    ahead: Mapping[str, Future[LayerCheck]] | None = None,
) -> tuple[list[LayerCheck], int, bool]:
    """Write a safetensors file atomically, check every byte of it and its converted layers, then publish it.

    Tensors in ``spans`` are copied from the input file by the kernel. The written file is then
    checked while it is flushed to the disk: each converted kernel byte for byte against the exact
    rearrangement of its weight in ``original`` and numerically against the FC (from the files' bytes
    with numpy where the kernel keeps its weight's bytes, else through torch:
    :func:`fc2conv.jobs.proofs.prove_layers`); each other tensor, when ``untouched``
    (the input's tensors) is given, byte for byte against the input (a difference is a write failure).
    ``veto``, asked last, can still discard the file (nothing is published).

    Returns the checks, the file size and whether it was published (False: a check failed, and
    nothing is left at ``target``). ``ahead``: numeric checks already started on the input's bytes
    (:func:`fc2conv.jobs.proofs.checks_ahead`).
    """
    checks: list[LayerCheck] = []
    output = atomic_output(target, overwrite=overwrite, protect=protect)
    try:
        with output as tmp:
            size = write_safetensors(tmp, out_infos, fetch, metadata, sync=False, on_tensor=on_tensor, spans=spans)
            # The disk flush (I/O) and the checks of the written file (memory and CPU) overlap.
            with ThreadPoolExecutor(max_workers=1) as pool:
                synced = pool.submit(fsync_file, tmp)
                checks = _check_written(tmp, out_infos, changes, original, spans or {}, untouched, strict, ahead)
                synced.result()
            if not all(c.ok for c in checks) or (veto is not None and veto()):
                raise _CheckFailed
    except _CheckFailed:
        return checks, 0, False
    return checks, size, True


def _check_written(
    path: Path,
    out_infos: Sequence[TensorInfo],
    changes: Sequence[LayerChange],
    original: Source,
    spans: Mapping[str, ByteSpan],
    untouched: Mapping[str, torch.Tensor] | None,
    strict: bool,
    ahead: Mapping[str, Future[LayerCheck]] | None = None,
) -> list[LayerCheck]:
    """Every byte of the written file against the input; the numeric check of every converted layer."""
    written = open_safetensors(path)
    # Spans first: memcmp over the mapped files needs no torch (which may still be importing).
    # The written file's tensors looked up in the input's spans (a shard holds a few of many).
    compared = compare_spans({n: (spans[n], span) for n, span in written.spans.items() if n in spans})
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
    return prove_layers(changes, original, written, compared, strict=strict, ahead=ahead)
