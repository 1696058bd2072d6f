"""Exports of a converted module with dynamic batch, height and width: torch.export and ONNX."""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from fc2conv.errors import DependencyError
from fc2conv.graph.rewrite import conversion_of, param_dtype
from fc2conv.results import ModuleConversion

if TYPE_CHECKING:
    from torch import nn

__all__ = ["export_onnx", "export_program", "onnx_error", "program_error", "require_onnx_exporter"]


def _dynamic_shapes(record: ModuleConversion) -> tuple[dict[int, Any], ...]:
    from torch.export import Dim

    shape = record.input_shape
    return (
        {
            0: Dim("batch", min=1, max=4096),
            2: Dim("height", min=shape.height, max=max(16384, shape.height)),
            3: Dim("width", min=shape.width, max=max(16384, shape.width)),
        },
    )


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """torch.export and the ONNX exporter print warnings and log lines on success; keep stderr clean."""
    import logging
    import warnings

    onnx_logger = logging.getLogger("torch.onnx")
    level = onnx_logger.level
    onnx_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            with _size_oblivious():
                yield
    finally:
        onnx_logger.setLevel(level)


def _size_oblivious() -> Any:
    """Let one exported program cover the traced size (a 1x1 head map) and every larger size.

    Without it, torch.export specialises intermediate sizes of 1 and refuses the range. The switch
    is torch-internal; where it is missing, export falls back to the default behaviour.
    """
    try:
        import torch.fx.experimental._config as fx_config

        patch = getattr(fx_config, "patch")  # noqa: B009 - set by torch's config module at import
        return patch(backed_size_oblivious=True)
    except (ImportError, AttributeError, KeyError):  # pragma: no cover - older or newer torch
        return contextlib.nullcontext()


def export_program(converted: nn.Module, path: str | os.PathLike[str]) -> None:
    """Save a ``torch.export`` program of the converted model with dynamic batch, height and width."""
    import torch

    record = conversion_of(converted)
    shape = record.input_shape
    example = torch.zeros(2, shape.channels, shape.height, shape.width, dtype=param_dtype(converted))
    with _quiet_export():
        program = torch.export.export(converted.eval(), (example,), dynamic_shapes=_dynamic_shapes(record))
        torch.export.save(program, str(path))


def export_onnx(converted: nn.Module, path: str | os.PathLike[str]) -> None:
    """Save an ONNX model (input ``image``, output ``scores``) with dynamic batch, height and width.

    Needs the ``onnx`` extra (``pip install fc2conv[onnx]``).
    """
    import torch

    record = conversion_of(converted)
    shape = record.input_shape
    example = torch.zeros(2, shape.channels, shape.height, shape.width, dtype=param_dtype(converted))
    require_onnx_exporter()
    with _quiet_export():
        torch.onnx.export(
            converted.eval(), (example,), str(path), input_names=["image"], output_names=["scores"],
            dynamic_shapes=_dynamic_shapes(record), dynamo=True, verbose=False,
        )  # fmt: skip


def require_onnx_exporter() -> None:
    """Raise :class:`DependencyError` unless the ONNX exporter's packages import (the ``onnx`` extra)."""
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise DependencyError(f"exporting ONNX needs the onnx extra ({exc.name} is missing)", extra="onnx") from exc


def onnx_error(path: str | os.PathLike[str], converted: nn.Module, *, seed: int = 0) -> float | None:
    """Max abs difference of onnxruntime vs torch on a larger input, or None without onnxruntime."""
    try:
        import onnxruntime
    except ImportError:
        return None
    import torch

    shape = conversion_of(converted).input_shape
    generator = torch.Generator().manual_seed(seed)
    dtype = param_dtype(converted)
    x = torch.randn(2, shape.channels, shape.height + 5, shape.width + 3, generator=generator).to(dtype)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (scores,) = session.run(None, {"image": x.numpy()})
    with torch.no_grad():
        expected = converted.eval()(x).numpy()
    return float(abs(scores - expected).max())


def program_error(path: str | os.PathLike[str], converted: nn.Module, *, seed: int = 0) -> float:
    """Load a saved program and run it at a size other than the traced one: max abs difference vs torch."""
    import torch

    program = torch.export.load(str(path)).module()
    shape = conversion_of(converted).input_shape
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, shape.channels, shape.height + 7, shape.width + 3, generator=generator)
    with torch.no_grad():
        return float((program(x) - converted.eval()(x)).abs().max())
