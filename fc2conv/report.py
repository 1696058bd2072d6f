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
from rich.text import Text

from fc2conv.names import printable
from fc2conv.results import ConvertResult, Evidence, InspectResult, LayerCheck, ModuleCheck, VerifyResult
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


# --- shared pieces ------------------------------------------------------------------------------

# Below this width the tables stack two figures per cell (old/new shape, abs/rel error), so that an
# 80-column terminal shows every column and every layer name in full (names fold, never truncate).
WIDE = 110
# Layers left as they are that are listed one per line; the rest are counted (--json lists them all).
SKIPPED_SHOWN = 8


def _table(title: str) -> Table:
    return Table(title=title, box=box.SIMPLE_HEAVY, title_justify="left")


def _columns(table: Table, columns: list[tuple[str, JustifyMethod]]) -> None:
    for index, (header, justify) in enumerate(columns):
        # The first column holds names: it folds. Figures never wrap.
        table.add_column(header, justify=justify, overflow="fold", no_wrap=index > 0, min_width=5 if index else 12)


def _note(console: Console, text: str, style: str = "") -> None:
    """One note under a table: plain text (no markup), one line per note when piped (logs stay greppable).

    Names from the file in it are shown escaped (:func:`fc2conv.names.printable`): one note, one line.
    """
    console.print(Text("  " + printable(text), style=style), soft_wrap=not console.is_terminal)


def _stack(*figures: str) -> str:
    return "\n".join(figures)


# --- convert ------------------------------------------------------------------------------------


def convert_table(result: ConvertResult, width: int) -> Table:
    """One row per converted layer: what it became, shapes, parameters and the measured error."""
    table = _table(f"fc2conv convert: {escape(result.input.name)} -> {escape(result.output.name)}")
    wide = width >= WIDE
    if wide:
        _columns(table, [("Layer", "left"), ("Became", "left"), ("Old shape", "right"), ("New shape", "right"),
                         ("Params", "right"), ("Max abs err", "right"), ("Max rel err", "right"),
                         ("Check", "left")])  # fmt: skip
    else:
        _columns(table, [("Layer", "left"), ("Became", "left"), ("Shape: old\n-> new", "right"),
                         ("Error: abs\nrel", "right"), ("Check", "left")])  # fmt: skip
    for check in result.checks:
        table.add_row(*_check_row(check, wide))
    if result.end_to_end is not None:
        table.add_row(*_end_to_end_row(result.end_to_end, result.model_input_shape, wide))
    for export in result.exports:
        error = "not run" if export.max_abs_error is None else _float(export.max_abs_error)
        cells = [f"({export.kind})", escape(export.path.name), "", "", "", error, ""] if wide else [
            f"({export.kind})", escape(export.path.name), "", error]  # fmt: skip
        table.add_row(*cells, _verdict(export.ok))
    return table


def _check_row(check: LayerCheck, wide: bool) -> list[str]:
    verdict = _verdict(check.ok) + (" [yellow](non-finite)[/]" if check.nonfinite else "")
    old, new = _shape(check.old_shape), _shape(check.new_shape)
    if wide:
        return [escape(check.name), check.became, old, new, f"{check.parameters:,}", _float(check.max_abs_error),
                _float(check.max_rel_error), verdict]  # fmt: skip
    return [escape(check.name), check.became, _stack(old, f"-> {new}"),
            _stack(_float(check.max_abs_error), _float(check.max_rel_error)), verdict]  # fmt: skip


def _end_to_end_row(check: ModuleCheck, input_shape: InputShape | None, wide: bool) -> list[str]:
    grid = f"map {'x'.join(map(str, check.dense_grid))}"
    abs_error = _float(max(check.max_abs_error, check.dense_max_abs_error))
    rel_error = _float(max(check.max_rel_error, check.dense_max_rel_error))
    shape = str(input_shape) if input_shape else ""
    if wide:
        return ["(end to end)", "model", shape, grid, "", abs_error, rel_error, _verdict(check.ok)]
    return ["(end to end)", "model", _stack(shape, f"-> {grid}"), _stack(abs_error, rel_error), _verdict(check.ok)]


def _proof_notes(checks: tuple[LayerCheck, ...]) -> list[str]:
    """What the per-layer checks prove, once per distinct statement (a 1x1 layer's is implied by its head's)."""
    spatial = [c for c in checks if c.problem is None and c.new_shape[2:] != (1, 1)]
    statements = list(dict.fromkeys(c.proves for c in (spatial or [c for c in checks if c.problem is None])))
    notes = [f"checked: {s}; rel = abs / max|output|" for s in statements]
    if checks and all(c.exact for c in checks):
        notes.append("checked: every byte of each kernel is its FC weight rearranged")
    return notes


def _evidence_notes(evidence: Evidence | None) -> list[str]:
    """What the weights say of the order (and of the map, when it was inferred): evidence, not proof."""
    if evidence is None:
        return []
    lines = [f"order evidence ({evidence.order.strength}): {evidence.order.explanation}"]
    if evidence.geometry is not None:
        lines.append(f"map evidence ({evidence.geometry.strength}): {evidence.geometry.explanation}")
    return lines


def _failure_notes(failures: list[str]) -> list[str]:
    return [f"FAIL {failure}" for failure in failures]


def _skipped_notes(result: ConvertResult | InspectResult) -> list[str]:
    plan = result.plan
    if plan is None or not plan.skipped:
        return []
    lines = [f"left as it is: {s.name} ({_shape(s.shape)}): {s.reason}" for s in plan.skipped[:SKIPPED_SHOWN]]
    if len(plan.skipped) > SKIPPED_SHOWN:
        lines.append(f"left as they are: {len(plan.skipped) - SKIPPED_SHOWN} more 2-D weights (--json lists them)")
    return lines


def render_convert(console: Console, result: ConvertResult) -> None:
    plan = result.plan
    console.print(convert_table(result, console.width))
    for line in _failure_notes(result.failures):
        _note(console, line, "bold red")
    for line in (*_proof_notes(result.checks), *result.load_notes, *plan.notes, *_skipped_notes(result)):
        _note(console, line)
    if result.end_to_end is not None:
        _note(console, f"end to end: {result.end_to_end.how}")
    if plan.mode == "chain":
        origin = f" ({plan.flatten_order_origin})" if plan.flatten_order_origin else ""
        _note(console, f"flatten order: {plan.flatten_order}{origin}")
    for line in _evidence_notes(result.evidence):
        _note(console, line)
    if result.written:
        shards = f", {result.shards} shards + index" if result.shards else ""
        _note(console, f"output: {result.output} ({_bytes(result.output_bytes)}{shards})")
    else:
        _note(console, f"output not written: a check failed; {result.output} is unchanged", "bold red")
    _note(console, f"untouched: {len(plan.untouched)} tensors copied bit for bit; time: {result.seconds:.2f} s")


# --- inspect ------------------------------------------------------------------------------------


def inspect_table(result: InspectResult, width: int) -> Table:
    """The layers of a checkpoint, with their guessed kind and what convert would make of them."""
    became = {c.name: c.became for c in result.plan.layers} if result.plan else {}
    table = _table(f"fc2conv inspect: {escape(result.path.name)}")
    _columns(table, [("Layer", "left"), ("Kind", "left"), ("Shapes", "left"), ("Dtype", "left"),
                     ("Params", "right"), ("Convert", "left")])  # fmt: skip
    table.columns[2].no_wrap = False  # several tensors' shapes: they may fold too
    for layer in result.layers:
        shapes = ", ".join(f"{t.name.rpartition('.')[2]} {_shape(t.shape)}" for t in layer.tensors)
        dtypes = ", ".join(sorted({t.dtype for t in layer.tensors}))
        table.add_row(escape(layer.name or "(top level)"), layer.kind, escape(shapes), dtypes,
                      f"{layer.parameters:,}", became.get(layer.name, ""))  # fmt: skip
    return table


def render_inspect(console: Console, result: InspectResult) -> None:
    console.print(inspect_table(result, console.width))
    for note in result.notes:
        _note(console, note)
    plan = result.plan
    if plan is not None:
        layers = ", ".join(f"{c.name} ({c.old_shape[1]} -> {c.old_shape[0]}: {c.became})" for c in plan.layers)
        _note(console, f"converts: {layers}")
        for note in (*plan.notes, *_skipped_notes(result)):
            _note(console, note)
        for line in _evidence_notes(result.evidence):
            _note(console, line)
        if plan.input_shape is not None and result.format != "onnx":  # an ONNX graph's input is another shape
            _note(console, f"convert would use: --input-shape {plan.input_shape} --flatten-order {plan.flatten_order}")
    else:
        _note(console, f"no conversion plan: {result.plan_problem or ''}", "yellow")
    _note(
        console,
        f"totals: {len(result.infos)} tensors in {len(result.layers)} layers, "
        f"{result.parameters:,} values, {_bytes(result.nbytes)}",
    )


# --- verify -------------------------------------------------------------------------------------


def verify_table(result: VerifyResult, width: int) -> Table:
    table = _table(f"fc2conv verify: {escape(result.original.name)} vs {escape(result.converted.name)}")
    wide = width >= WIDE
    if wide:
        _columns(table, [("Layer", "left"), ("Became", "left"), ("Dtype", "left"), ("Max abs err", "right"),
                         ("Max rel err", "right"), ("atol / rtol", "right"), ("Bit-exact", "left"),
                         ("Check", "left")])  # fmt: skip
    else:
        _columns(table, [("Layer", "left"), ("Became", "left"), ("Error: abs\nrel", "right"),
                         ("Tolerance:\natol / rtol", "right"), ("Exact", "left"), ("Check", "left")])  # fmt: skip
    rows = []
    if result.end_to_end is not None:
        e2e = result.end_to_end
        rows.append(("(end to end)", "model", e2e.dtype, max(e2e.max_abs_error, e2e.dense_max_abs_error),
                     max(e2e.max_rel_error, e2e.dense_max_rel_error), e2e.tolerance, "", e2e.ok))  # fmt: skip
    for c in result.checks:
        rows.append((escape(c.name), c.became, c.dtype, c.max_abs_error, c.max_rel_error, c.tolerance,
                     {True: "yes", False: "no", None: "-"}[c.exact], c.ok))  # fmt: skip
    for name, became, dtype, abs_error, rel_error, tolerance, exact, ok in rows:
        tol = f"{tolerance.atol:g} / {tolerance.rtol:g}"
        if wide:
            table.add_row(name, became, dtype, _float(abs_error), _float(rel_error), tol, exact, _verdict(ok))
        else:
            table.add_row(name, f"{became}\n{dtype}", _stack(_float(abs_error), _float(rel_error)), tol, exact,
                          _verdict(ok))  # fmt: skip
    return table


def render_verify(console: Console, result: VerifyResult) -> None:
    console.print(verify_table(result, console.width))
    for line in _failure_notes(result.failures):
        _note(console, line, "bold red")
    for line in (*_proof_notes(result.checks), *result.notes):
        _note(console, line)
    if result.end_to_end is not None:
        _note(console, f"end to end: {result.end_to_end.how}")
    if result.input_shape is not None:
        _note(console, f"geometry: {result.input_shape} ({result.flatten_order})")
    for line in _evidence_notes(result.evidence):
        _note(console, line)
    _note(console, f"other tensors: {result.identical} identical, {len(result.mismatches)} not")
    console.print("  verdict: " + ("[green]PASS[/]" if result.ok else "[bold red]FAIL[/]"))
