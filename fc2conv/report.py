"""Rich tables and the progress bar, built from result dataclasses; formatting only, no decisions."""

from __future__ import annotations

import math
import os
import sys

from rich import box
from rich.console import Console, JustifyMethod
from rich.markup import escape as escape_markup
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

from fc2conv.names import printable
from fc2conv.results import ConvertResult, InspectResult, LayerCheck, ModuleCheck, VerifyResult
from fc2conv.types import InputShape

__all__ = ["PROGRESS_MIN_BYTES", "ByteProgress", "make_console", "render_convert", "render_inspect", "render_verify"]


def escape(text: str) -> str:
    """Text from a file, safe to print: no rich markup, and every unprintable character as an escape.

    So a tensor name holding a newline cannot add a line (a forged ``verdict: PASS``) to a table.
    """
    return escape_markup(printable(text))


# Width used when stdout is not a terminal and COLUMNS is unset: wide enough for the tables.
_PIPE_WIDTH = 132


def make_console(stderr: bool = False) -> Console:
    """One console for all output: plain when not a terminal, and no escape codes at all with NO_COLOR."""
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() or "COLUMNS" in os.environ else _PIPE_WIDTH
    if os.environ.get("NO_COLOR"):  # rich alone would still emit bold and italics
        return Console(file=stream, width=width, highlight=False, soft_wrap=False, color_system=None)
    return Console(file=stream, width=width, highlight=False, soft_wrap=False)


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
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=self._console,
                transient=True,
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
    columns: list[tuple[str, JustifyMethod]] = [
        ("Layer", "left"),
        ("Became", "left"),
        ("Old shape", "right"),
        ("New shape", "right"),
        ("Params", "right"),
        ("Max abs err", "right"),
        ("Max rel err", "right"),
        ("Check", "left"),
    ]
    for header, justify in columns:
        table.add_column(header, justify=justify)
    for check in result.checks:
        table.add_row(*_check_row(check))
    if result.end_to_end is not None:
        table.add_row(*_end_to_end_row(result.end_to_end, result.model_input_shape))
    for export in result.exports:
        error = "not run" if export.max_abs_error is None else _float(export.max_abs_error)
        table.add_row(f"({export.kind})", escape(export.path.name), "", "", "", error, "", _verdict(export.ok))
    return table


def _end_to_end_row(check: ModuleCheck, input_shape: InputShape | None) -> list[str]:
    grid = "x".join(map(str, check.dense_grid))
    return [
        "(end to end)", "model", str(input_shape) if input_shape else "", f"map {grid}", "",
        _float(max(check.max_abs_error, check.dense_max_abs_error)),
        _float(max(check.max_rel_error, check.dense_max_rel_error)), _verdict(check.ok),
    ]  # fmt: skip


def _grid_text(checks: tuple[LayerCheck, ...]) -> str:
    grids = {c.window_grid for c in checks}
    grid = "x".join(map(str, next(iter(grids)))) if len(grids) == 1 else "NxN"
    return f"traced size + sliding window ({grid} positions)"


def render_convert(console: Console, result: ConvertResult) -> None:
    plan = result.plan
    console.print(convert_table(result))
    for note in (*result.load_notes, *plan.notes):
        console.print(f"  {escape(note)}")
    if result.end_to_end is not None:
        e2e = result.end_to_end
        console.print(
            f"  end to end: original vs converted model (float64 copies) at {result.model_input_shape}, and on a "
            f"2x larger input: {e2e.positions_checked} of the {'x'.join(map(str, e2e.dense_grid))} output positions "
            "against the original head on their windows"
        )
    if plan.mode == "chain":
        console.print(f"  flatten order: {plan.flatten_order}")
    if result.written:
        shards = f", {result.shards} shards + index" if result.shards else ""
        console.print(f"  output: {escape(str(result.output))} ({_bytes(result.output_bytes)}{shards})")
    else:
        console.print(
            f"  [bold red]output not written[/]: a numeric check failed; {escape(str(result.output))} is unchanged"
        )
    console.print(f"  untouched: {len(plan.untouched)} tensors copied bit for bit; time: {result.seconds:.2f} s")


# --- inspect ------------------------------------------------------------------------------------


def inspect_table(result: InspectResult) -> Table:
    """The layers of a checkpoint, with their guessed kind and what convert would make of them."""
    became = {c.name: c.became for c in result.plan.layers} if result.plan else {}
    table = Table(title=f"fc2conv inspect: {escape(result.path.name)}", box=box.SIMPLE_HEAVY)
    columns: list[tuple[str, JustifyMethod]] = [
        ("Layer", "left"),
        ("Kind", "left"),
        ("Shapes", "left"),
        ("Dtype", "left"),
        ("Params", "right"),
        ("Convert", "left"),
    ]
    for header, justify in columns:
        table.add_column(header, justify=justify)
    for layer in result.layers:
        shapes = ", ".join(f"{t.name.rpartition('.')[2]} {_shape(t.shape)}" for t in layer.tensors)
        dtypes = ", ".join(sorted({t.dtype for t in layer.tensors}))
        table.add_row(
            escape(layer.name or "(top level)"),
            layer.kind,
            escape(shapes),
            dtypes,
            f"{layer.parameters:,}",
            became.get(layer.name, ""),
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
            console.print(
                f"  convert would use: --input-shape {result.plan.input_shape} "
                f"--flatten-order {result.plan.flatten_order}"
            )
    else:
        console.print(f"  [yellow]no conversion plan[/]: {escape(result.plan_problem or '')}")
    console.print(
        f"  totals: {len(result.infos)} tensors in {len(result.layers)} layers, "
        f"{result.parameters:,} values, {_bytes(result.nbytes)}"
    )


# --- verify -------------------------------------------------------------------------------------


def verify_table(result: VerifyResult) -> Table:
    table = Table(
        title=f"fc2conv verify: {escape(result.original.name)} vs {escape(result.converted.name)}",
        box=box.SIMPLE_HEAVY,
        caption=f"{_grid_text(result.checks)}; pass: abs <= atol + rtol * max|output|",
    )
    columns: list[tuple[str, JustifyMethod]] = [
        ("Layer", "left"),
        ("Became", "left"),
        ("Dtype", "left"),
        ("Max abs err", "right"),
        ("Max rel err", "right"),
        ("atol / rtol", "right"),
        ("Bit-exact", "left"),
        ("Check", "left"),
    ]
    for header, justify in columns:
        table.add_column(header, justify=justify)
    if result.end_to_end is not None:
        e2e = result.end_to_end
        table.add_row(
            "(end to end)", "model", "float64", _float(max(e2e.max_abs_error, e2e.dense_max_abs_error)),
            _float(max(e2e.max_rel_error, e2e.dense_max_rel_error)), f"rel {e2e.tolerance:g}", "", _verdict(e2e.ok),
        )  # fmt: skip
    for check in result.checks:
        table.add_row(
            escape(check.name),
            check.became,
            check.dtype,
            _float(check.max_abs_error),
            _float(check.max_rel_error),
            f"{check.tolerance.atol:g} / {check.tolerance.rtol:g}",
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
