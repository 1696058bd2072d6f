"""Proofs that a conv computes what its FC did: seeded inputs, a float64 reference, dtype tolerances.

Two kinds: the numeric check (:func:`check_layer`: the FC and the conv on the same seeded maps, at the
traced size and on a sliding window), which proves the semantics of the rewrite; and the bit-for-bit
comparisons (:func:`tensors_identical`, :func:`kernel_is_exact`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import TYPE_CHECKING

from fc2conv.convert import fc_to_conv_weight, fc_weight
from fc2conv.diskio import ByteSpan, first_differing_byte, mapped, pieces
from fc2conv.plan import LayerChange
from fc2conv.preload import wait_for_torch
from fc2conv.results import LayerCheck, Tolerance
from fc2conv.types import FlattenOrder, dtype_name

if TYPE_CHECKING:
    import numpy as np
    import torch

__all__ = [
    "DEFAULT_TOLERANCES",
    "blank_check",
    "check_changes",
    "check_layer",
    "coarser_dtype",
    "compare_spans",
    "first_difference",
    "grid_of",
    "kernel_difference",
    "kernel_is_exact",
    "Tally",
    "row_runs",
    "rows_to_check",
    "shape_problem",
    "span_difference",
    "tensors_identical",
    "tolerance_for",
]

# Defaults per dtype: a few units of the dtype's rounding error, relative to the output's scale.
# The conv runs in the layer's own dtype (as it will when deployed); the reference is float64.
DEFAULT_TOLERANCES: Mapping[str, Tolerance] = MappingProxyType(
    {
        "float64": Tolerance(atol=1e-10, rtol=1e-10),
        "float32": Tolerance(atol=1e-5, rtol=1e-5),
        "float16": Tolerance(atol=1e-2, rtol=1e-2),
        "bfloat16": Tolerance(atol=5e-2, rtol=5e-2),
    }
)

# Number of seeded random maps at the traced size, and of larger maps for the sliding-window check.
SAMPLES = 4
WINDOW_SAMPLES = 2
# The sliding-window map is the traced map grown by this much in H and W: a 3x3 grid of windows.
WINDOW_GROWTH = 2
# A pointwise layer (--pointwise) is checked on the NPU layout (N, C, 1, S) with this S.
POINTWISE_SEQUENCE = 8
# Output rows checked per layer: all of them up to this many, else a seeded sample of this many, in
# blocks of ROW_BLOCK consecutive rows (always with the first and the last block). A layout bug moves
# every row, so a sample catches it; the sample keeps the check of a 4096 x 25088 layer fast.
MAX_ROWS = 512
ROW_BLOCK = 64
# A kernel proven bit for bit equal to the rearrangement of its weight is the same function on every
# row: the numeric check then shows the semantics of the rewrite on fewer rows (the first and last 32).
PROVEN_ROWS = 64
# Rows of a float64 weight held at once: bounds the check's extra memory (about 6x this) whatever the layer size.
_CHUNK_BYTES = 8 * 2**20
# Span comparisons: pieces of this many bytes, on this many threads (one large tensor on both cores).
_COMPARE_STEP = 64 * 2**20
_COMPARE_THREADS = 2
# The flattened float64 windows of the sliding-window check are kept up to this size.
_WINDOWS_BYTES = 256 * 2**20


# The rounding error of a sum of n products grows like sqrt(n) (Higham and Mary's probabilistic bound:
# about u * sqrt(n) * sum|w x|, u the unit roundoff of the accumulation): a 25088-input layer measured
# 0.6 u sqrt(n) relative to max|output|, a 2^20-input one 0.6 too. The default rtol is therefore at
# least this many u * sqrt(n), so a correct wide layer passes on any CPU's summation order (a wrong
# layout gives errors of order 1 whatever n is).
ACCUMULATION_UNITS = 3.0
# Unit roundoff of the accumulation: CPU kernels accumulate float16 and bfloat16 in float32.
_ACCUMULATION_ROUNDOFF = {"float64": 2.0**-53}
_FLOAT32_ROUNDOFF = 2.0**-24


def tolerance_for(dtype: str, atol: float | None = None, rtol: float | None = None, *, terms: int = 1) -> Tolerance:
    """The default tolerance for ``dtype`` and sums of ``terms`` products, either part overridden when given.

    The default rtol is the dtype's (:data:`DEFAULT_TOLERANCES`), raised to ``ACCUMULATION_UNITS * u *
    sqrt(terms)`` for wide layers (u: the unit roundoff of the accumulation); a given ``rtol`` is used as is.
    """
    default = DEFAULT_TOLERANCES.get(dtype, DEFAULT_TOLERANCES["float32"])
    roundoff = _ACCUMULATION_ROUNDOFF.get(dtype, _FLOAT32_ROUNDOFF)
    wide = ACCUMULATION_UNITS * roundoff * math.sqrt(max(1, terms))
    return Tolerance(default.atol if atol is None else atol, max(default.rtol, wide) if rtol is None else rtol)


def coarser_dtype(a: str, b: str) -> str:
    """Of two floating dtypes, the one with the larger rounding error (its tolerance applies)."""
    order = ["float64", "float32", "float16", "bfloat16"]
    return max((a, b), key=lambda d: order.index(d) if d in order else 0)


def _flatten(x: torch.Tensor, order: FlattenOrder) -> torch.Tensor:
    """Flatten (N, C, H, W) the way the source framework did: C-major (chw) or channels-last (hwc)."""
    if order == "hwc":
        x = x.permute(0, 2, 3, 1)
    return x.reshape(x.shape[0], -1)


@dataclass(frozen=True)
class _Probe:
    """The seeded inputs of one layer's check: maps for the conv, their flattened forms for the FC."""

    traced: torch.Tensor  # (SAMPLES, C, H, W), in the kernel's dtype
    big: torch.Tensor  # (WINDOW_SAMPLES, C, H + gh - 1, W + gw - 1), in the kernel's dtype
    grid: tuple[int, int]  # positions of the sliding window
    traced_flat: torch.Tensor  # float64 (SAMPLES, in)
    flatten_order: FlattenOrder
    window_size: tuple[int, int]  # H, W of the traced map
    windows_flat: torch.Tensor | None  # float64 (positions * WINDOW_SAMPLES, in), position-major, if small

    def windows_linear(self, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``Linear(flatten(window))`` in float64 at each position: (positions * WINDOW_SAMPLES, rows)."""
        import torch
        import torch.nn.functional as F

        if self.windows_flat is not None:
            return F.linear(self.windows_flat, weight, bias)
        return torch.cat([F.linear(window, weight, bias) for window in self.windows()])

    def windows(self) -> list[torch.Tensor]:
        """The flattened float64 window at each position, position-major."""
        (h, w), (gh, gw) = self.window_size, self.grid
        return [
            _flatten(self.big[:, :, i : i + h, j : j + w].double(), self.flatten_order)
            for i in range(gh)
            for j in range(gw)
        ]


def _draw_probe(change: LayerChange, dtype: torch.dtype, generator: torch.Generator) -> _Probe:
    import torch

    m = change.in_map

    def draw(n: int, h: int, w: int) -> torch.Tensor:
        x = torch.randn(n, m.channels, h, w, generator=generator, dtype=torch.float64)
        return x.to(dtype)  # both sides see these exact (rounded) values

    traced = draw(SAMPLES, m.height, m.width)
    grid = grid_of(change)
    big = draw(WINDOW_SAMPLES, m.height + grid[0] - 1, m.width + grid[1] - 1)
    probe = _Probe(traced, big, grid, _flatten(traced.double(), change.flatten_order), change.flatten_order,
                   (m.height, m.width), None)  # fmt: skip
    # The flattened windows are kept when small (flattening them again for every block of rows is
    # slow); for very wide layers (2 GB at 2^24 inputs) each is made when needed.
    if grid[0] * grid[1] * WINDOW_SAMPLES * m.features * 8 <= _WINDOWS_BYTES:
        probe = replace(probe, windows_flat=torch.cat(probe.windows()))
    return probe


def grid_of(change: LayerChange) -> tuple[int, int]:
    """Output positions of the sliding-window check: 3x3 windows of a map, or S positions of a pointwise layer."""
    return (1, POINTWISE_SEQUENCE) if change.pointwise else (WINDOW_GROWTH + 1, WINDOW_GROWTH + 1)


class Tally:
    """The largest errors and the reference scale seen so far, over chunks of rows (numpy arrays, float64)."""

    def __init__(self) -> None:
        self.errors = {"traced": 0.0, "window": 0.0}
        self.scale = 0.0
        self.nonfinite = False
        self.pattern_mismatch = False

    def add(self, key: str, got: np.ndarray, reference: np.ndarray) -> None:
        """Errors of ``got`` against ``reference``, where the reference is finite (NaN/Inf must match there)."""
        import numpy as np

        finite = np.isfinite(reference)
        if not finite.all():
            self.nonfinite = True
            if not np.array_equal(finite, np.isfinite(got)):
                self.pattern_mismatch = True
        with np.errstate(invalid="ignore"):  # inf - inf where both overflow: not where the reference is finite
            diff = np.abs(got - reference)[finite]
        err = float(diff.max()) if diff.size else 0.0
        self.errors[key] = max(self.errors[key], math.inf if math.isnan(err) else err)
        if finite.any():
            self.scale = max(self.scale, float(np.abs(reference[finite]).max()))

    def result(self, check: LayerCheck, grid: tuple[int, int], rows: int) -> LayerCheck:
        """``check`` with the errors tallied over ``rows`` rows."""
        max_abs = math.inf if self.pattern_mismatch else max(self.errors.values())
        max_rel = max_abs / self.scale if self.scale > 0 else (0.0 if max_abs == 0 else math.inf)
        return replace(
            check, max_abs_error=max_abs, max_rel_error=max_rel, window_max_abs_error=self.errors["window"],
            window_grid=grid, reference_scale=self.scale, rows_checked=rows, nonfinite=self.nonfinite,
            problem="non-finite outputs differ between FC and conv" if self.pattern_mismatch else None,
        )  # fmt: skip


def check_layer(
    change: LayerChange,
    weight: torch.Tensor,
    kernel: torch.Tensor,
    bias: torch.Tensor | None = None,
    kernel_bias: torch.Tensor | None = None,
    *,
    tolerance: Tolerance | None = None,
    seed: int = 0,
    max_rows: int | None = MAX_ROWS,
) -> LayerCheck:
    """Measure ``Conv2d(x; kernel)`` against ``Linear(flatten(x); weight)`` in float64.

    Two checks on seeded standard-normal maps, cast to the layer's dtype so both sides see the
    same values:

    * traced size: ``x`` of shape ``(N, C, H, W)``; the conv (run in the kernel's dtype) must give a
      1x1 map equal to the float64 ``Linear`` on ``flatten(x)``;
    * sliding window: ``x`` grown by :data:`WINDOW_GROWTH` in H and W; every output position ``(i, j)``
      must equal the float64 ``Linear`` on the window ``x[:, :, i:i+H, j:j+W]``. For a pointwise
      layer the map is ``(N, in, 1, S)``, each of the S positions a separate Linear input.

    Layers with more than ``max_rows`` outputs are checked on a seeded sample of rows; the float64
    weight is made a chunk of rows at a time, so time and memory stay bounded for huge layers.

    Args:
        change: The layer's planned change (geometry and flatten order of the FC inputs).
        weight: The original FC weight ``(out, in)``.
        kernel: The conv kernel ``(out, C, H, W)`` to check.
        bias: The original FC bias, if any.
        kernel_bias: The conv's bias, if any (defaults to ``bias``).
        tolerance: Pass threshold; default: :func:`tolerance_for` the coarser dtype and the layer's inputs.
        seed: Seed of the random maps (and of the row sample).
        max_rows: Check at most this many output rows (a seeded sample); ``None`` checks all.

    Returns:
        A :class:`LayerCheck` with the measured errors.
    """
    import torch

    dtype = coarser_dtype(dtype_name(weight.dtype), dtype_name(kernel.dtype))
    result = blank_check(change, dtype, tuple(weight.shape), tuple(kernel.shape), tolerance)
    kernel_bias = bias if kernel_bias is None else kernel_bias
    problem = _shape_problem(change, weight, kernel, bias, kernel_bias)
    if problem is not None:
        return replace(result, problem=problem)
    if weight.numel() == 0:  # no inputs or no outputs: nothing to draw maps for (the shape may be 0 x 2^22)
        return _check_empty(result, change, bias, kernel_bias)
    generator = torch.Generator().manual_seed(seed)
    probe = _draw_probe(change, kernel.dtype, generator)
    rows = rows_to_check(weight.shape[0], max_rows, lambda n: torch.randperm(n, generator=generator).tolist())
    tally = Tally()
    for chunk in _row_chunks(rows, kernel, weight.shape[1]):
        _measure_chunk(probe, chunk, weight, kernel, bias, kernel_bias, tally)
    return tally.result(result, probe.grid, len(rows))


def blank_check(
    change: LayerChange,
    dtype: str,
    old_shape: tuple[int, ...],
    new_shape: tuple[int, ...],
    tolerance: Tolerance | None,
) -> LayerCheck:
    """A layer's check before anything is measured (errors infinite); ``tolerance`` defaults to the dtype's."""
    return LayerCheck(
        name=change.name, became=change.became, dtype=dtype, old_shape=old_shape, new_shape=new_shape,
        parameters=change.parameters, max_abs_error=math.inf, max_rel_error=math.inf,
        window_max_abs_error=math.inf, window_grid=(0, 0), reference_scale=0.0,
        tolerance=tolerance or tolerance_for(dtype, terms=old_shape[1] if len(old_shape) > 1 else 1),
        flatten_order=change.flatten_order, pointwise=change.pointwise,
    )  # fmt: skip


def _shape_problem(
    change: LayerChange,
    weight: torch.Tensor,
    kernel: torch.Tensor,
    bias: torch.Tensor | None,
    kernel_bias: torch.Tensor | None,
) -> str | None:
    """Why the tensors cannot be the layer the change describes (shapes come from a file: check them all)."""
    bias_shape = None if bias is None else tuple(bias.shape)
    kernel_bias_shape = None if kernel_bias is None else tuple(kernel_bias.shape)
    return shape_problem(change, tuple(weight.shape), tuple(kernel.shape), bias_shape, kernel_bias_shape)


def shape_problem(
    change: LayerChange,
    weight: tuple[int, ...],
    kernel: tuple[int, ...],
    bias: tuple[int, ...] | None,
    kernel_bias: tuple[int, ...] | None,
) -> str | None:
    """Why tensors of these shapes cannot be the layer the change describes (None: they can)."""
    if kernel != change.new_shape:
        return f"kernel shape {kernel} != expected {change.new_shape}"
    if weight != change.old_shape:
        return f"weight shape {weight} != expected {change.old_shape}"
    if (bias is None) != (kernel_bias is None):
        return "bias present on one side only"
    for side, shape in (("bias", bias), ("conv bias", kernel_bias)):
        if shape is not None and shape != (change.out_features,):
            return f"{side} shape {shape} != expected {(change.out_features,)}"
    return None


def _check_empty(
    result: LayerCheck, change: LayerChange, bias: torch.Tensor | None, kernel_bias: torch.Tensor | None
) -> LayerCheck:
    """A layer with no weights (zero inputs or zero outputs): both sides output the bias alone, if any."""
    error = scale = 0.0
    if bias is not None and kernel_bias is not None and bias.numel():
        scale = _max_abs(bias)
        if not tensors_identical(bias, kernel_bias.to(bias.dtype)):
            error = _max_abs(bias, kernel_bias)
    rel = error / scale if scale > 0 else (0.0 if error == 0 else math.inf)
    return replace(
        result, max_abs_error=error, max_rel_error=rel, window_max_abs_error=error, window_grid=grid_of(change),
        reference_scale=scale, rows_checked=0,
    )  # fmt: skip


def _max_abs(a: torch.Tensor, b: torch.Tensor | None = None) -> float:
    """max |a| (or max |a - b|) in float64, a chunk at a time; NaN counts as infinite."""
    flat_a, flat_b = a.reshape(-1), (b.reshape(-1) if b is not None else None)
    step, worst = max(1, _CHUNK_BYTES // 8), 0.0
    for start in range(0, flat_a.numel(), step):
        part = flat_a[start : start + step].double()
        if flat_b is not None:
            part = part - flat_b[start : start + step].double()
        worst = max(worst, float(part.abs().nan_to_num(nan=math.inf).max()))
    return worst


def _row_chunks(rows: list[int], kernel: torch.Tensor, in_features: int) -> Iterator[range]:
    """Runs of consecutive rows, cut to a few large conv calls (each has a fixed cost).

    Slices of consecutive rows are views: no copy of a memory-mapped weight.
    """
    conv_rows = max(1, 2 * _CHUNK_BYTES // (kernel.element_size() * max(1, in_features)))
    for start_run, stop in row_runs(rows):
        for start in range(start_run, stop, conv_rows):
            yield range(start, min(stop, start + conv_rows))


def _measure_chunk(
    probe: _Probe,
    chunk: range,
    weight: torch.Tensor,
    kernel: torch.Tensor,
    bias: torch.Tensor | None,
    kernel_bias: torch.Tensor | None,
    tally: Tally,
) -> None:
    """The conv on these rows (in the kernel's dtype) against the float64 Linear, a few rows at a time."""
    import torch.nn.functional as F

    k = kernel[chunk.start : chunk.stop]
    kb = kernel_bias[chunk.start : chunk.stop].to(kernel.dtype) if kernel_bias is not None else None
    got = {
        "traced": F.conv2d(probe.traced, k, kb).double().reshape(SAMPLES, -1),
        # (WINDOW_SAMPLES, rows, gh, gw) -> (positions * WINDOW_SAMPLES, rows), position-major
        "window": F.conv2d(probe.big, k, kb).double().permute(2, 3, 0, 1).reshape(-1, len(chunk)),
    }
    ref_rows = max(1, _CHUNK_BYTES // (8 * max(1, weight.shape[1])))
    for sub in range(0, len(chunk), ref_rows):
        part = chunk[sub : sub + ref_rows]
        w64 = weight[part.start : part.stop].double()
        b64 = bias[part.start : part.stop].double() if bias is not None else None
        traced, window = F.linear(probe.traced_flat, w64, b64), probe.windows_linear(w64, b64)
        tally.add("traced", got["traced"][:, sub : sub + len(part)].numpy(), traced.numpy())
        tally.add("window", got["window"][:, sub : sub + len(part)].numpy(), window.numpy())


def rows_to_check(out: int, max_rows: int | None, permutation: Callable[[int], list[int]]) -> list[int]:
    """All rows, or a seeded sample of ``max_rows`` in blocks of :data:`ROW_BLOCK` consecutive rows.

    The sample always holds the first and the last block; the other blocks are taken in the order of
    ``permutation(number of blocks)`` (a seeded random permutation). Blocks keep reads of a
    memory-mapped weight sequential and let the check use views instead of copies.
    """
    if max_rows is None or out <= max_rows:
        return list(range(out))
    block = min(ROW_BLOCK, max_rows // 2)
    starts = {0, out - block}
    for index in permutation(max(1, out // block)):
        if len(starts) * block >= max_rows:
            break
        starts.add(min(index * block, out - block))
    rows = sorted({r for s in starts for r in range(s, s + block)})
    return rows[:max_rows] if len(rows) > max_rows else rows


def row_runs(rows: list[int]) -> list[tuple[int, int]]:
    """Sorted row numbers as ``(start, stop)`` runs of consecutive rows."""
    runs: list[tuple[int, int]] = []
    for row in rows:
        if runs and runs[-1][1] == row:
            runs[-1] = (runs[-1][0], row + 1)
        else:
            runs.append((row, row + 1))
    return runs


def tensors_identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (so NaNs compare equal to themselves), read a chunk at a time."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return first_difference(a, b) is None


def first_difference(expected: torch.Tensor, got: torch.Tensor) -> tuple[int, ...] | None:
    """The index of the first element whose bytes differ (same shape and dtype assumed), or None.

    Both tensors are read a chunk at a time (memory-mapped ones stay on disk); bytes are compared, so
    a NaN equals itself and -0.0 differs from 0.0.
    """
    import torch

    if expected.numel() == 0:
        return None
    flat_e, flat_g = expected.reshape(-1), got.reshape(-1)
    step = max(1, _CHUNK_BYTES // max(1, expected.element_size()))
    for start in range(0, flat_e.numel(), step):
        chunk_e = flat_e[start : start + step].contiguous()
        chunk_g = flat_g[start : start + step].contiguous()
        try:
            bytes_e, bytes_g = chunk_e.view(torch.uint8), chunk_g.view(torch.uint8)
        except RuntimeError:  # dtypes without a byte view (quantized): value equality
            if torch.equal(chunk_e, chunk_g):
                continue
            return _unravel(start + int((chunk_e != chunk_g).nonzero()[0, 0]), tuple(expected.shape))
        if torch.equal(bytes_e, bytes_g):
            continue
        differs = (bytes_e != bytes_g).reshape(-1, expected.element_size()).any(dim=1)
        return _unravel(start + int(differs.nonzero()[0, 0]), tuple(expected.shape))
    return None


def _unravel(flat_index: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Row-major index of the ``flat_index``-th element of a tensor of ``shape``."""
    index = []
    for size in reversed(shape):
        flat_index, position = divmod(flat_index, size)
        index.append(position)
    return tuple(reversed(index))


def kernel_difference(change: LayerChange, weight: torch.Tensor, kernel: torch.Tensor) -> str | None:
    """Why ``kernel`` is not bit for bit the rearrangement of ``weight`` (``(out, in)``), or None if it is.

    Every byte is compared, a block of rows at a time (the expected kernel of a ``chw`` reshape or a
    1x1 is a view of the weight: nothing is copied). The reason names the first differing index of
    the kernel. Only for an unchanged dtype: a dtype change has no exact form (the numeric check
    judges it).
    """
    if tuple(kernel.shape) != change.new_shape:
        return f"kernel shape {tuple(kernel.shape)} != expected {change.new_shape}"
    if weight.numel() == 0:  # same shape and no data (the row loop below would run 2^40 empty steps)
        return None
    rows = max(1, _CHUNK_BYTES // max(1, weight.shape[1] * weight.element_size()))
    for start in range(0, weight.shape[0], rows):
        part = weight[start : start + rows]
        expected = fc_to_conv_weight(part, replace(change, old_shape=(part.shape[0], part.shape[1]), layout="out_in"))
        found = first_difference(expected, kernel[start : start + rows])
        if found is not None:
            return _difference_text(change, [start + found[0], *found[1:]])
    return None


def kernel_is_exact(change: LayerChange, weight: torch.Tensor, kernel: torch.Tensor) -> bool:
    """Whether ``kernel`` is bit for bit the rearrangement of ``weight`` that fc2conv would write."""
    if kernel.dtype != weight.dtype:
        return False
    return kernel_difference(change, weight, kernel) is None


def check_changes(
    changes: Sequence[LayerChange],
    original: Mapping[str, torch.Tensor],
    converted: Mapping[str, torch.Tensor],
    *,
    atol: float | None = None,
    rtol: float | None = None,
    exact: bool = False,
    strict: bool = False,
    compared: Mapping[str, int | None] | None = None,
) -> list[LayerCheck]:
    """Run :func:`check_layer` for each change, reading weights and biases from the two mappings.

    Args:
        changes: The converted layers.
        original: Tensors of the source checkpoint (FC weights).
        converted: Tensors of the converted checkpoint (conv kernels).
        atol, rtol: Override the per-dtype defaults.
        exact: Also compare every byte of each kernel with the exact rearrangement of its weight
            (where the dtype is unchanged): a difference is the layer's ``problem`` (it fails),
            naming the first differing index.
        strict: Fail layers whose weights or outputs are not finite (NaN/Inf).
        compared: Weight name -> the first differing byte between the weight's and the kernel's spans
            in their files (:func:`compare_spans`; None: equal). Used for the byte proof of a layer
            whose rearrangement leaves the bytes as they are (checked here, against the rule itself);
            every other layer is compared through torch.
    """
    wait_for_torch()  # a background import of torch: waited for here, not inside an import lock
    with _one_thread():
        return [_check_one(c, original, converted, atol, rtol, exact, strict, compared or {}) for c in changes]


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch on one thread meanwhile (the previous setting is restored).

    The checks are many small operations: on two threads, torch's synchronisation costs more than
    it saves, and on a CPU shared with other jobs it made the checks about ten times slower (measured
    0.8-1.0 s against 0.07-0.13 s for a 4096 x 25088 layer).
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _check_one(
    change: LayerChange,
    original: Mapping[str, torch.Tensor],
    converted: Mapping[str, torch.Tensor],
    atol: float | None,
    rtol: float | None,
    exact: bool,
    strict: bool,
    compared: Mapping[str, int | None],
) -> LayerCheck:
    """One layer: its byte proof first (which decides how many rows to sample), then its numeric check."""
    weight, kernel = fc_weight(change, original[change.weight]), converted[change.weight]
    bias = original[change.bias] if change.bias else None
    kernel_bias = converted.get(change.bias) if change.bias else None
    dtype = coarser_dtype(dtype_name(weight.dtype), dtype_name(kernel.dtype))
    proven, difference = (
        _byte_proof(change, weight, kernel, compared.get(change.weight, -1)) if exact else (False, None)
    )
    result = check_layer(
        change, weight, kernel, bias, kernel_bias, tolerance=tolerance_for(dtype, atol, rtol, terms=weight.shape[1]),
        max_rows=PROVEN_ROWS if proven else MAX_ROWS,
    )  # fmt: skip
    result = replace(result, strict=strict)
    if exact and difference is not None and result.problem is None:
        numeric = result.failure  # when the numbers fail too, they come first
        result = replace(result, problem=f"{numeric}; {difference}" if numeric else difference)
    return replace(result, exact=proven) if exact else result


def _byte_proof(
    change: LayerChange, weight: torch.Tensor, kernel: torch.Tensor, compared: int | None
) -> tuple[bool, str | None]:
    """Whether the kernel is bit for bit the rearrangement of the weight, and if not, the problem.

    A dtype change (or a wrong shape, which the numeric check reports) has no exact form: not exact,
    and no byte problem. ``compared`` is the first differing byte of the weight's and the kernel's
    spans (None: equal; -1: not compared), which proves the kernel when the rule keeps the weight's
    bytes as they are; otherwise the kernel is compared with the rule's output through torch.
    """
    if kernel.dtype != weight.dtype or tuple(kernel.shape) != change.new_shape:
        return False, None
    if compared != -1 and _rule_keeps_bytes(change, weight):
        difference = None if compared is None else span_difference(change, compared, weight.element_size())
    else:
        difference = kernel_difference(change, weight, kernel)
    return difference is None, difference


def _rule_keeps_bytes(change: LayerChange, weight: torch.Tensor) -> bool:
    """Whether the rule's kernel is the weight's own memory (so the weight's bytes are the kernel's)."""
    if not weight.is_contiguous():  # a weight stored (in, out) is a transposed view: its bytes move
        return False
    expected = fc_to_conv_weight(weight, replace(change, layout="out_in"))
    return expected.is_contiguous() and expected.data_ptr() == weight.data_ptr()


def span_difference(change: LayerChange, offset: int, itemsize: int) -> str:
    """The byte proof's failure when the kernel's bytes first differ from its weight's at ``offset``."""
    return _difference_text(change, list(_unravel(offset // itemsize, change.new_shape)))


def _difference_text(change: LayerChange, where: list[int]) -> str:
    return f"kernel differs from the exact rearrangement of {change.weight} at index {where} (every byte compared)"


def compare_spans(pairs: Mapping[str, tuple[ByteSpan, ByteSpan]]) -> dict[str, int | None]:
    """For each name, the offset of the first byte that differs between its two spans (None: equal).

    Every byte is compared (``memcmp`` over the mapped files, no torch); spans of different lengths
    differ at the end of the shorter one.
    """
    from concurrent.futures import ThreadPoolExecutor

    paths = [path for first, second in pairs.values() for path in (first.path, second.path)]
    # Pieces of at most _COMPARE_STEP bytes, on two threads (memcmp releases the GIL): a large tensor
    # is compared by both cores.
    parts = [
        (
            name,
            replace(first, offset=first.offset + start, nbytes=step),
            replace(second, offset=second.offset + start, nbytes=step),
        )
        for name, (first, second) in pairs.items()
        for start, step in pieces(min(first.nbytes, second.nbytes), _COMPARE_STEP) or [(0, 0)]  # one if empty
    ]
    found: dict[str, int | None] = dict.fromkeys(pairs)
    with mapped(*paths) as maps, ThreadPoolExecutor(max_workers=_COMPARE_THREADS) as pool:
        differing = pool.map(lambda p: first_differing_byte(maps[p[1].path], p[1], maps[p[2].path], p[2]), parts)
        for (name, a, _), differs in zip(parts, differing, strict=True):
            earlier = found[name]
            if differs is not None:
                where = a.offset - pairs[name][0].offset + differs
                found[name] = where if earlier is None else min(where, earlier)
    for name, (first, second) in pairs.items():
        if found[name] is None and first.nbytes != second.nbytes:
            found[name] = min(first.nbytes, second.nbytes)  # the shorter one ends there
    return found
