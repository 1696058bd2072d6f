"""Rich tables and JSON payloads built from result dataclasses; formatting only, no decisions."""

from __future__ import annotations

import math
import os
import sys
from typing import Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from fc2conv._version import __version__
from fc2conv.check import LayerCheck
from fc2conv.jobs import ConvertResult, InspectResult, VerifyResult
from fc2conv.plan import Plan

# Width used when stdout is not a terminal and COLUMNS is unset: wide enough for the tables.
_PIPE_WIDTH = 132


def make_console(stderr: bool = False) -> Console:
    """One console for all output: plain when not a terminal, and no escape codes at all with NO_COLOR."""
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() or "COLUMNS" in os.environ else _PIPE_WIDTH
    plain = bool(os.environ.get("NO_COLOR"))  # rich alone would still emit bold and italics
    return Console(file=stream, width=width, highlight=False, soft_wrap=False,
                   **({"color_system": None} if plain else {}))


def _shape(shape: tuple[int, ...] | list[int]) -> str:
    return "x".join(str(s) for s in shape) if shape else "scalar"


def _float(value: float) -> str:
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf"
    return f"{value:.2e}"


def _bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


def _json_float(value: float) -> float | None:
    """JSON has no inf/nan: they become null (and the layer's ``ok`` is false)."""
    return value if math.isfinite(value) else None


def _verdict(ok: bool) -> str:
    return "[green]ok[/]" if ok else "[bold red]FAIL[/]"


# --- progress -----------------------------------------------------------------------------------

# Only jobs at least this large get a progress bar: small ones finish before it would be read.
PROGRESS_MIN_BYTES = 64 * 2**20


class ByteProgress:
    """A rich progress bar of bytes written, shown only on a terminal and only for large jobs.

    Use as a context manager; pass the instance as the ``progress`` callback of ``convert_file``.
    """

    def __init__(self, console: Console) -> None:
        self._console = console
        self._progress: Progress | None = None
        self._task: TaskID | None = None

    def __enter__(self) -> ByteProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def __call__(self, done: int, total: int, name: str) -> None:
        if self._progress is None:
            if not self._console.is_terminal or total < PROGRESS_MIN_BYTES:
                return
            self._progress = Progress(
                TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                TimeRemainingColumn(), console=self._console, transient=True,
            )
            self._progress.start()
            self._task = self._progress.add_task("writing", total=total)
        assert self._task is not None
        self._progress.update(self._task, completed=done, description=f"writing {escape(name)}")


# --- convert ------------------------------------------------------------------------------------


def _check_row(check: LayerCheck) -> list[str]:
    return [
        escape(check.name),
        check.became,
        _shape(check.old_shape),
        _shape(check.new_shape),
        f"{check.parameters:,}",
        _float(check.max_abs_error),
        _float(check.max_rel_error),
        _verdict(check.ok) + (" [yellow](non-finite)[/]" if check.nonfinite else ""),
    ]


def convert_table(result: ConvertResult) -> Table:
    """One row per converted layer: what it became, shapes, parameters and the measured error."""
    table = Table(
        title=f"fc2conv convert: {escape(result.input.name)} -> {escape(result.output.name)}",
        box=box.SIMPLE_HEAVY,
        caption=(
            f"error: conv in the layer's dtype vs float64 Linear on the flattened map, "
            f"{_grid_text(result.checks)}; rel = abs / max|output|"
        ),
    )
    for header, justify in [
        ("Layer", "left"), ("Became", "left"), ("Old shape", "right"), ("New shape", "right"),
        ("Params", "right"), ("Max abs err", "right"), ("Max rel err", "right"), ("Check", "left"),
    ]:
        table.add_column(header, justify=justify)  # type: ignore[arg-type]
    for check in result.checks:
        table.add_row(*_check_row(check))
    return table


def _grid_text(checks: tuple[LayerCheck, ...]) -> str:
    grids = {c.window_grid for c in checks}
    grid = "x".join(map(str, next(iter(grids)))) if len(grids) == 1 else "NxN"
    return f"traced size + sliding window ({grid} positions)"


def render_convert(console: Console, result: ConvertResult) -> None:
    plan = result.plan
    console.print(convert_table(result))
    for note in (*result.load_notes, *plan.notes):
        console.print(f"  {escape(note)}")
    if plan.mode == "chain":
        console.print(f"  flatten order: {plan.flatten_order}")
    if result.written:
        shards = f", {result.shards} shards + index" if result.shards else ""
        console.print(f"  output: {escape(str(result.output))} ({_bytes(result.output_bytes)}{shards})")
    else:
        console.print(
            f"  [bold red]output not written[/]: a numeric check failed; {escape(str(result.output))} is unchanged"
        )
    console.print(
        f"  untouched: {len(plan.untouched)} tensors copied bit for bit; "
        f"time: {result.seconds:.2f} s"
    )


def _plan_json(plan: Plan) -> dict[str, Any]:
    return {
        "mode": plan.mode,
        "input_shape": plan.input_shape.as_list() if plan.input_shape else None,
        "flatten_order": plan.flatten_order,
        "notes": list(plan.notes),
    }


def _check_json(check: LayerCheck) -> dict[str, Any]:
    return {
        "name": check.name,
        "became": check.became,
        "dtype": check.dtype,
        "old_shape": list(check.old_shape),
        "new_shape": list(check.new_shape),
        "parameters": check.parameters,
        "max_abs_error": _json_float(check.max_abs_error),
        "max_rel_error": _json_float(check.max_rel_error),
        "window_max_abs_error": _json_float(check.window_max_abs_error),
        "window_grid": list(check.window_grid),
        "rows_checked": check.rows_checked,
        "atol": check.tolerance.atol,
        "rtol": check.tolerance.rtol,
        "nonfinite": check.nonfinite,
        "exact": check.exact,
        "problem": check.problem,
        "ok": check.ok,
    }


def convert_json(result: ConvertResult) -> dict[str, Any]:
    return {
        "ok": result.ok,
        "command": "convert",
        "version": __version__,
        "input": str(result.input),
        "output": str(result.output),
        "written": result.written,
        "output_bytes": result.output_bytes,
        "shards": result.shards,
        **_plan_json(result.plan),
        "load_notes": list(result.load_notes),
        "layers": [_check_json(c) for c in result.checks],
        "untouched": list(result.plan.untouched),
        "seconds": round(result.seconds, 4),
    }


def warnings_for(checks: tuple[LayerCheck, ...]) -> list[str]:
    """Lines for stderr about layers that convert but deserve attention."""
    return [
        f"{c.name} has non-finite (NaN/Inf) weights or outputs; converted as they are"
        for c in checks
        if c.nonfinite
    ]


# --- inspect ------------------------------------------------------------------------------------


def inspect_table(result: InspectResult) -> Table:
    """The layers of a checkpoint, with their guessed kind and what convert would make of them."""
    became = {c.name: c.became for c in result.plan.layers} if result.plan else {}
    table = Table(title=f"fc2conv inspect: {escape(result.path.name)}", box=box.SIMPLE_HEAVY)
    for header, justify in [("Layer", "left"), ("Kind", "left"), ("Shapes", "left"), ("Dtype", "left"),
                            ("Params", "right"), ("Convert", "left")]:
        table.add_column(header, justify=justify)  # type: ignore[arg-type]
    for layer in result.layers:
        shapes = ", ".join(f"{t.name.rpartition('.')[2]} {_shape(t.shape)}" for t in layer.tensors)
        dtypes = ", ".join(sorted({t.dtype for t in layer.tensors}))
        table.add_row(
            escape(layer.name or "(top level)"), layer.kind, escape(shapes), dtypes,
            f"{layer.parameters:,}", became.get(layer.name, ""),
        )
    return table


def render_inspect(console: Console, result: InspectResult) -> None:
    console.print(inspect_table(result))
    for note in result.notes:
        console.print(f"  {escape(note)}")
    if result.plan is not None:
        chain = " -> ".join(f"{c.name} ({c.old_shape[1]} -> {c.old_shape[0]})" for c in result.plan.layers)
        console.print(f"  FC chain: {escape(chain)}")
        for note in result.plan.notes:
            console.print(f"  {escape(note)}")
        if result.plan.input_shape is not None:
            console.print(f"  convert would use: --input-shape {result.plan.input_shape} "
                          f"--flatten-order {result.plan.flatten_order}")
    else:
        console.print(f"  [yellow]no conversion plan[/]: {escape(result.plan_problem or '')}")
    console.print(
        f"  totals: {len(result.infos)} tensors in {len(result.layers)} layers, "
        f"{result.parameters:,} values, {_bytes(result.nbytes)}"
    )


def inspect_json(result: InspectResult) -> dict[str, Any]:
    plan = result.plan
    return {
        "ok": True,
        "command": "inspect",
        "version": __version__,
        "path": str(result.path),
        "format": result.format,
        "notes": list(result.notes),
        "metadata": result.metadata,
        "layers": [
            {
                "name": layer.name,
                "kind": layer.kind,
                "parameters": layer.parameters,
                "tensors": [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype} for t in layer.tensors],
            }
            for layer in result.layers
        ],
        "chain": [
            {"name": c.name, "became": c.became, "old_shape": list(c.old_shape), "new_shape": list(c.new_shape)}
            for c in plan.layers
        ] if plan else [],
        "input_shape": plan.input_shape.as_list() if plan and plan.input_shape else None,
        "flatten_order": plan.flatten_order if plan else None,
        "plan_notes": list(plan.notes) if plan else [],
        "plan_problem": result.plan_problem,
        "totals": {"tensors": len(result.infos), "parameters": result.parameters, "bytes": result.nbytes},
    }


# --- verify -------------------------------------------------------------------------------------


def verify_table(result: VerifyResult) -> Table:
    table = Table(
        title=f"fc2conv verify: {escape(result.original.name)} vs {escape(result.converted.name)}",
        box=box.SIMPLE_HEAVY,
        caption=f"{_grid_text(result.checks)}; pass: abs <= atol + rtol * max|output|",
    )
    for header, justify in [("Layer", "left"), ("Became", "left"), ("Dtype", "left"), ("Max abs err", "right"),
                            ("Max rel err", "right"), ("atol / rtol", "right"), ("Bit-exact", "left"),
                            ("Check", "left")]:
        table.add_column(header, justify=justify)  # type: ignore[arg-type]
    for check in result.checks:
        table.add_row(
            escape(check.name), check.became, check.dtype, _float(check.max_abs_error),
            _float(check.max_rel_error), f"{check.tolerance.atol:g} / {check.tolerance.rtol:g}",
            "yes" if check.exact else "no",
            _verdict(check.ok) + (f" [red]{escape(check.problem)}[/]" if check.problem else ""),
        )
    return table


def render_verify(console: Console, result: VerifyResult) -> None:
    console.print(verify_table(result))
    for note in result.notes:
        console.print(f"  {escape(note)}")
    if result.input_shape is not None:
        console.print(f"  geometry: {result.input_shape} ({result.flatten_order})")
    console.print(f"  other tensors: {result.identical} identical, {len(result.mismatches)} not")
    for mismatch in result.mismatches:
        console.print(f"    [red]{escape(mismatch.name)}[/]: {escape(mismatch.reason)}")
    console.print("  verdict: " + ("[green]PASS[/]" if result.ok else "[bold red]FAIL[/]"))


def verify_json(result: VerifyResult) -> dict[str, Any]:
    return {
        "ok": result.ok,
        "command": "verify",
        "version": __version__,
        "original": str(result.original),
        "converted": str(result.converted),
        "input_shape": result.input_shape.as_list() if result.input_shape else None,
        "flatten_order": result.flatten_order,
        "layers": [_check_json(c) for c in result.checks],
        "identical_tensors": result.identical,
        "mismatches": [{"name": m.name, "reason": m.reason} for m in result.mismatches],
        "notes": list(result.notes),
    }
