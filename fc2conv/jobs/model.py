"""Converting with the model's code: build it, load the weights strictly, rewrite the module, prove, write, export."""

from __future__ import annotations

import importlib
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fc2conv._version import __version__
from fc2conv.check import tolerance_for
from fc2conv.errors import ModelError, ShapeError
from fc2conv.formats import Source
from fc2conv.graph import check_module, conversion_of, convert_module, export_onnx, export_program
from fc2conv.graph.export import onnx_error, program_error, require_onnx_exporter
from fc2conv.graph.rewrite import param_dtype
from fc2conv.jobs.convert import default_output, shared_storage_notes, write_checked
from fc2conv.jobs.verify import verify_sources
from fc2conv.plan import Plan
from fc2conv.publish import atomic_output, file_path
from fc2conv.record import METADATA_PREFIX, plan_to_metadata
from fc2conv.results import ConvertResult, Export, LayerCheck, ModuleConversion, VerifyResult
from fc2conv.shapes import as_spec
from fc2conv.types import ShapeLike, ShapeSpec, dtype_name, tensor_infos

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["build_model", "convert_model_source", "import_factory", "load_weights_strictly", "verify_model_sources"]


def import_factory(spec: str) -> Callable[[], nn.Module]:
    """``"package.module:factory"`` -> the callable, importing from the current folder too."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ModelError(f"model {spec!r}: expected package.module:factory")
    added = os.getcwd() not in sys.path
    if added:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # an import runs the module's code: any error is the user's to see
        raise ModelError(f"model {spec!r}: cannot import {module_name} ({type(exc).__name__}: {exc})") from exc
    finally:
        if added:
            sys.path.remove(os.getcwd())
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise ModelError(f"model {spec!r}: {module_name} has no callable {attribute}")
    return factory


def build_model(spec: str | nn.Module | None, source: Source) -> nn.Module:
    """The model of ``spec`` with the checkpoint's weights loaded strictly, or the module the file holds.

    ``spec`` may also be a module built already; with no ``spec``, the source must hold a whole
    (trusted, unpickled) module.

    Raises:
        ModelError: the factory cannot be imported or called, or the weights do not fit the model
            (the missing and unexpected keys are listed).
    """
    from torch import nn

    if isinstance(spec, nn.Module):
        return spec.eval()
    if spec is None:
        if source.module is None:
            raise ModelError(f"{source.path}: holds weights only; the model's code is needed", remedy="model")
        return source.module.eval()
    factory = import_factory(spec)
    try:
        model = factory()
    except Exception as exc:
        raise ModelError(f"model {spec!r}: calling the factory failed ({type(exc).__name__}: {exc})") from exc
    if not isinstance(model, nn.Module):
        raise ModelError(f"model {spec!r}: the factory returned a {type(model).__name__}, not an nn.Module")
    load_weights_strictly(model, source.tensors, source.path)
    return model.eval()


def load_weights_strictly(model: nn.Module, tensors: Mapping[str, torch.Tensor], path: str | os.PathLike[str]) -> None:
    """``model.load_state_dict(..., strict=True, assign=True)``, with an error that lists what does not fit.

    ``assign`` keeps the checkpoint's tensors, dtypes included: an fp16 checkpoint gives an fp16
    model, and its conversion is written in fp16.
    """
    tensors = dict(tensors)
    expected = model.state_dict()
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    wrong = [
        f"{k} {tuple(tensors[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in tensors and tuple(tensors[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or wrong:
        parts = [
            f"{label}: {', '.join(items[:6])}{', ...' if len(items) > 6 else ''}"
            for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
            if items
        ]
        raise ModelError(f"{path}: the weights do not fit the model ({'; '.join(parts)})")
    model.load_state_dict(tensors, strict=True, assign=True)


def _network_shape(input_shape: ShapeLike | None) -> ShapeSpec:
    spec = as_spec(input_shape)
    if spec is None or not spec.is_complete:
        raise ShapeError(
            "the network's input shape CxHxW (e.g. 3x224x224) is needed to trace the model",
            remedy="model_input_shape",
        )
    return spec


def convert_model_source(
    source: Source,
    output: str | os.PathLike[str] | None = None,
    *,
    model: str | nn.Module | None,
    input_shape: ShapeLike | None,
    fold_batchnorm: bool = False,
    export: str | os.PathLike[str] | None = None,
    onnx: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
) -> ConvertResult:
    """Build the model, convert it (:func:`fc2conv.convert_module`), check it, write its weights and exports.

    The weights file is checked per layer (from the written file) and the converted model end to end
    against the original (at the traced size and densely); exports are written after, and an ONNX
    file is run with onnxruntime when that is installed.
    """
    started = time.perf_counter()
    spec = _network_shape(input_shape)
    if onnx is not None:
        require_onnx_exporter()  # before any work: a missing extra must not cost the other outputs
    original = build_model(model, source)
    converted = convert_module(original, spec, fold_batchnorm=fold_batchnorm)
    record = conversion_of(converted)
    end_to_end = check_module(original, converted)
    state = {k: v.detach().contiguous() for k, v in converted.state_dict().items()}
    plan = _plan_of(record, state)
    metadata = plan_to_metadata(plan, __version__, source=source.path.name)
    metadata[f"{METADATA_PREFIX}model_input_shape"] = str(record.input_shape)
    if record.folded:
        metadata[f"{METADATA_PREFIX}folded"] = ",".join(record.folded)
    target = file_path(output) if output is not None else default_output(source.path)
    checked = [c for c in record.changes if c.name not in record.folded]  # folded kernels: end to end only
    checks: list[LayerCheck] = []
    size, written = 0, False
    if end_to_end.ok:  # a model that fails end to end is not written at all
        weights = original.state_dict()
        before = Source(path=source.path, format="torch module", infos=tensor_infos(weights), tensors=weights)
        checks, size, written = write_checked(
            target, tensor_infos(state), state.__getitem__, metadata, checked, before, overwrite=overwrite,
            protect=[source.path],
        )  # fmt: skip
    exports = _write_exports(converted, export, onnx, overwrite, source.path) if written else []
    return ConvertResult(
        input=source.path, output=target, plan=plan, checks=tuple(checks),
        load_notes=tuple(shared_storage_notes(state)), output_bytes=size if written else 0, written=written,
        seconds=time.perf_counter() - started, end_to_end=end_to_end, exports=tuple(exports),
        model_input_shape=record.input_shape,
    )  # fmt: skip


def _write_exports(
    converted: nn.Module,
    export: str | os.PathLike[str] | None,
    onnx: str | os.PathLike[str] | None,
    overwrite: bool,
    source: Path,
) -> list[Export]:
    """Write the requested exports atomically and run each: a loaded program, an ONNX Runtime session."""
    exports = []
    if export is not None:
        with atomic_output(export, overwrite=overwrite, protect=[source], named=True) as tmp:
            export_program(converted, tmp)
        exports.append(Export("torch.export", Path(export), program_error(export, converted)))
    if onnx is not None:
        with atomic_output(onnx, overwrite=overwrite, protect=[source], named=True) as tmp:
            export_onnx(converted, tmp)
        exports.append(Export("onnx", Path(onnx), onnx_error(onnx, converted)))
    return exports


def _plan_of(record: ModuleConversion, state: Mapping[str, Any]) -> Plan:
    converted = {c.weight for c in record.changes}
    notes = [f"model traced at {record.input_shape}; the head reads a {record.feature_shape} map", *record.notes]
    untouched = tuple(name for name in state if name not in converted)
    return Plan(record.feature_shape, "chw", record.changes, untouched, tuple(notes))


def verify_model_sources(
    original: Source,
    converted: Source,
    *,
    model: str | nn.Module | None,
    input_shape: ShapeLike | None,
    atol: float | None = None,
    rtol: float | None = None,
) -> VerifyResult:
    """``verify`` with a model: the usual per-layer and bit-for-bit checks, plus the converted weights
    loaded into the converted model and compared with the original end to end and densely.

    ``atol`` and ``rtol`` override the tolerances of the per-layer checks and of the end-to-end one.
    """
    spec = _network_shape(input_shape)
    reference = build_model(model, original)
    folded = f"{METADATA_PREFIX}folded" in converted.metadata
    structure = convert_module(reference, spec, fold_batchnorm=folded)
    record = conversion_of(structure)
    load_weights_strictly(structure, converted.tensors, converted.path)
    tolerance = tolerance_for(dtype_name(param_dtype(reference)), atol, rtol)
    end_to_end = check_module(reference, structure, tolerance=tolerance)
    if not isinstance(model, str) or folded:
        # No state dict to compare tensor by tensor (a pickled module), or folded kernels that are no
        # plain rearrangement of the FC weights: the end-to-end and dense check is the proof.
        why = "CONVERTED has BatchNorm folded into its convs" if folded else "ORIGINAL is a pickled module"
        return VerifyResult(original.path, converted.path, record.feature_shape, "chw", (), 0, (),
                            (f"checked end to end only: {why}",), end_to_end)  # fmt: skip
    return replace(verify_sources(original, converted, atol=atol, rtol=rtol), end_to_end=end_to_end)
