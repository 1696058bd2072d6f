"""The --model paths: import a model factory, load weights strictly, convert the module, check, write, export."""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fc2conv._version import __version__
from fc2conv.errors import CheckpointError, OutputError, PlanError
from fc2conv.io import load_checkpoint, load_pickled_module
from fc2conv.jobs import ConvertResult, Export, VerifyResult, default_output, verify_files, write_checked
from fc2conv.module import (
    ModuleConversion,
    check_module,
    conversion_of,
    convert_module,
    export_onnx,
    export_program,
    onnx_error,
)
from fc2conv.plan import METADATA_PREFIX, Plan, plan_to_metadata
from fc2conv.shapes import InputShape, ShapeSpec, as_spec

if TYPE_CHECKING:
    from torch import nn


def import_factory(spec: str) -> Callable[[], nn.Module]:
    """``"package.module:factory"`` -> the callable, importing from the current folder too."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise PlanError(f"--model {spec!r}: expected package.module:factory")
    added = os.getcwd() not in sys.path
    if added:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # an import runs the module's code: any error is the user's to see
        raise PlanError(f"--model {spec!r}: cannot import {module_name} ({type(exc).__name__}: {exc})") from exc
    finally:
        if added:
            sys.path.remove(os.getcwd())
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise PlanError(f"--model {spec!r}: {module_name} has no callable {attribute}")
    return factory


def build_model(
    spec: str | nn.Module | None, checkpoint: str | os.PathLike[str], *, trust_pickle: bool = False
) -> nn.Module:
    """The model of ``spec`` with the checkpoint's weights loaded strictly, or the pickled module itself.

    ``spec`` may also be a module already unpickled from ``checkpoint`` (so the file runs only once).

    Raises:
        PlanError: the factory cannot be imported or called, or the weights do not fit the model
            (the missing and unexpected keys are listed).
    """
    from torch import nn

    if isinstance(spec, nn.Module):
        return spec.eval()
    if spec is None:
        if not trust_pickle:
            raise PlanError("a model is needed: pass --model package.module:factory")
        return load_pickled_module(checkpoint).eval()
    factory = import_factory(spec)
    try:
        model = factory()
    except Exception as exc:
        raise PlanError(f"--model {spec!r}: calling the factory failed ({type(exc).__name__}: {exc})") from exc
    if not isinstance(model, nn.Module):
        raise PlanError(f"--model {spec!r}: the factory returned a {type(model).__name__}, not an nn.Module")
    load_weights_strictly(model, checkpoint, trust_pickle=trust_pickle)
    return model.eval()


def load_weights_strictly(model: nn.Module, path: str | os.PathLike[str], *, trust_pickle: bool = False) -> None:
    """``model.load_state_dict(..., strict=True)``, with an error that lists what does not fit."""
    tensors = dict(load_checkpoint(path, trust_pickle=trust_pickle).tensors)
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
        raise CheckpointError(f"{path}: the weights do not fit the model ({'; '.join(parts)})")
    model.load_state_dict(tensors, strict=True)


def convert_model_file(
    checkpoint: str | os.PathLike[str],
    output: str | os.PathLike[str] | None = None,
    *,
    model: str | nn.Module | None,
    input_shape: ShapeSpec | InputShape | tuple[int, int, int] | str,
    fold_batchnorm: bool = False,
    export: str | os.PathLike[str] | None = None,
    onnx: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    trust_pickle: bool = False,
) -> ConvertResult:
    """Build the model, convert it (:func:`convert_module`), check it, write its weights and exports.

    The weights file is checked per layer (from the written file) and the converted model end to end
    against the original (at the traced size and densely); exports are written after, and an ONNX
    file is run with onnxruntime when that is installed.
    """
    started = time.perf_counter()
    checkpoint = Path(checkpoint)
    spec = as_spec(input_shape)
    if spec is None or not spec.is_complete:
        raise PlanError("--model needs --input-shape CxHxW: the network's input, e.g. 3x224x224")
    original = build_model(model, checkpoint, trust_pickle=trust_pickle)
    converted = convert_module(original, spec, fold_batchnorm=fold_batchnorm)
    record = conversion_of(converted)
    end_to_end = check_module(original, converted)
    state = {k: v.detach().contiguous() for k, v in converted.state_dict().items()}
    from fc2conv.convert import tensor_infos

    infos = tensor_infos(state)
    plan = _plan_of(record, state)
    metadata = plan_to_metadata(plan, __version__, source=checkpoint.name)
    metadata[f"{METADATA_PREFIX}model_input_shape"] = str(record.input_shape)
    if record.folded:
        metadata[f"{METADATA_PREFIX}folded"] = ",".join(record.folded)
    target = Path(output) if output is not None else default_output(checkpoint)
    checked = [c for c in record.changes if c.name not in record.folded]  # folded kernels: end to end only
    checks, size, written = [], 0, False
    if end_to_end.ok:  # a model that fails end to end is not written at all
        checks, size, written = write_checked(
            target, infos, state.__getitem__, metadata, checked, original.state_dict(),
            overwrite=overwrite, protect=[checkpoint],
        )  # fmt: skip
    exports: list[Export] = []
    if written:
        if export is not None:
            _atomic_write(Path(export), overwrite, lambda path: export_program(converted, path), checkpoint)
            exports.append(Export("torch.export", Path(export), _program_error(Path(export), converted)))
        if onnx is not None:
            _atomic_write(Path(onnx), overwrite, lambda path: export_onnx(converted, path), checkpoint)
            exports.append(Export("onnx", Path(onnx), onnx_error(onnx, converted)))
    return ConvertResult(
        input=checkpoint,
        output=target,
        plan=plan,
        checks=tuple(checks),
        load_notes=(),
        output_bytes=size if written else 0,
        written=written,
        seconds=time.perf_counter() - started,
        end_to_end=end_to_end,
        exports=tuple(exports),
        model_input_shape=record.input_shape,
    )


def _plan_of(record: ModuleConversion, state: dict[str, Any]) -> Plan:
    converted = {c.weight for c in record.changes}
    notes = [f"model traced at {record.input_shape}; the head reads a {record.feature_shape} map", *record.notes]
    untouched = tuple(name for name in state if name not in converted)
    return Plan(record.feature_shape, "chw", record.changes, untouched, tuple(notes))


def _atomic_write(path: Path, overwrite: bool, write: Callable[[Path], None], source: Path) -> None:
    """Write an export through a temporary file in the same folder, renamed into place when complete.

    Not :func:`fc2conv.io.atomic_output`: its unnamed file has no real path, and exporters write
    beside the path they are given (ONNX external data), so this temporary file needs a name.
    """
    if path.exists() and not overwrite:
        raise OutputError(f"{path}: already exists; pass --force to replace it")
    if path.exists() and source.exists() and os.path.samefile(path, source):
        raise OutputError(f"{path}: refusing to write over the input file")
    if not path.parent.is_dir():
        raise OutputError(f"{path}: folder {path.parent} does not exist")
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _program_error(path: Path, converted: nn.Module) -> float:
    """Load the saved program and run it at a size other than the traced one."""
    import torch

    program = torch.export.load(str(path)).module()
    shape = conversion_of(converted).input_shape
    x = torch.randn(2, shape.channels, shape.height + 7, shape.width + 3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return float((program(x) - converted.eval()(x)).abs().max())


def verify_model_files(
    original: str | os.PathLike[str],
    converted: str | os.PathLike[str],
    *,
    model: str | nn.Module | None,
    input_shape: ShapeSpec | InputShape | tuple[int, int, int] | str,
    trust_pickle: bool = False,
) -> VerifyResult:
    """``verify`` with a model: the usual per-layer and bit-for-bit checks, plus the converted weights
    loaded into the converted model and compared with the original end to end and densely."""
    spec = as_spec(input_shape)
    if spec is None or not spec.is_complete:
        raise PlanError("--model needs --input-shape CxHxW: the network's input, e.g. 3x224x224")
    reference = build_model(model, original, trust_pickle=trust_pickle)
    folded = f"{METADATA_PREFIX}folded" in load_checkpoint(converted, trust_pickle=trust_pickle).metadata
    structure = convert_module(reference, spec, fold_batchnorm=folded)
    record = conversion_of(structure)
    load_weights_strictly(structure, converted, trust_pickle=trust_pickle)
    end_to_end = check_module(reference, structure)
    if not isinstance(model, str) or folded:
        # No state dict to compare tensor by tensor (a pickled module), or folded kernels that are no
        # plain rearrangement of the FC weights: the end-to-end and dense check is the proof.
        why = "CONVERTED has BatchNorm folded into its convs" if folded else "ORIGINAL is a pickled module"
        return VerifyResult(Path(original), Path(converted), record.feature_shape, "chw", (), 0, (),
                            (f"checked end to end only: {why}",), end_to_end)  # fmt: skip
    return replace(verify_files(original, converted, trust_pickle=trust_pickle), end_to_end=end_to_end)
