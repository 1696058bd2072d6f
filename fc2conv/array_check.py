"""The numeric check of a layer whose kernel is its weight's own bytes, computed with numpy: no torch.

A kernel proven byte for byte to be its FC weight (a ``chw`` reshape or a 1x1 view: the same bytes,
relabelled axes) needs the numeric check only to show the semantics of the rewrite: that the
convolution, reading those bytes as ``(out, C, H, W)``, computes the FC. That takes no deep-learning
library: the convolution here is its definition (PyTorch's cross-correlation over an ``(out, C, kH,
kW)`` kernel, :func:`conv2d`, which the tests hold to ``torch.nn.functional.conv2d``), computed in the
kernel's precision (float32 for float32, float16 and bfloat16 kernels, which CPUs accumulate in
float32; the outputs rounded to the kernel's dtype), against the FC on the flattened map in float64.
Everything else is :func:`fc2conv.check.check_layer`'s: the seeded maps at the traced size and on a
sliding window, the rows sampled, the tolerances, the :class:`~fc2conv.results.LayerCheck` returned.
So a conversion whose kernels all keep their bytes is proven without importing torch (2-3 s here).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np

from fc2conv.check import (
    MAX_ROWS,
    SAMPLES,
    WINDOW_SAMPLES,
    Tally,
    blank_check,
    coarser_dtype,
    grid_of,
    row_runs,
    rows_to_check,
    shape_problem,
)
from fc2conv.matrix import Matrix, round_to_dtype
from fc2conv.plan import LayerChange
from fc2conv.results import LayerCheck, Tolerance
from fc2conv.types import FlattenOrder

__all__ = ["check_layer_arrays", "conv2d"]

# Values of the float64 weight rows held at once (8 MB): bounds the check's memory whatever the layer.
_CHUNK_VALUES = 2**20


def conv2d(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """``torch.nn.functional.conv2d(x, kernel, bias)`` (stride 1, no padding) by its definition.

    ``out[n, o, i, j] = bias[o] + sum over c, y, x of kernel[o, c, y, x] * x[n, c, i + y, j + x]``: a
    cross-correlation (the kernel is not flipped), ``x`` (N, C, H, W), ``kernel`` (O, C, kH, kW), the
    arithmetic in their common dtype.
    """
    n, kh, kw = x.shape[0], kernel.shape[2], kernel.shape[3]
    windows = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))  # (N, C, H', W', kH, kW)
    grid = windows.shape[2:4]
    # Each window (C, kH, kW) as a row, dotted with each kernel (C, kH, kW) as a row: the sum above.
    rows = np.ascontiguousarray(windows.transpose(0, 2, 3, 1, 4, 5)).reshape(n * grid[0] * grid[1], -1)
    out = _fc(rows, kernel.reshape(kernel.shape[0], -1)).reshape(n, *grid, -1).transpose(0, 3, 1, 2)
    return out if bias is None else out + bias[:, None, None]


def _fc(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """``x @ weight.T``, by numpy's BLAS.

    A threaded BLAS spins its idle threads between the many small products of a check, which on two
    cores took the CPU from the copy beside it (15-25 % slower, measured): the ``fc2conv`` command
    holds it to one thread (:func:`fc2conv.cli.main`). numpy's own loops (einsum) took twice as long
    (84 projections of the LLM-like benchmark: 0.63 s against 0.35 s).
    """
    return x @ weight.T


def _flatten(x: np.ndarray, order: FlattenOrder) -> np.ndarray:
    """Flatten (N, C, H, W) as the source framework did: C-major (chw) or channels-last (hwc)."""
    if order == "hwc":
        x = x.transpose(0, 2, 3, 1)
    return x.reshape(x.shape[0], -1)


@dataclass(frozen=True)
class _Maps:
    """The seeded maps of one layer's check, in the conv's precision (their values exact in the kernel's dtype)."""

    traced: np.ndarray  # (SAMPLES, C, H, W)
    big: np.ndarray  # (WINDOW_SAMPLES, C, H + gh - 1, W + gw - 1)
    grid: tuple[int, int]

    def flattened(self, x: np.ndarray, change: LayerChange) -> np.ndarray:
        """Maps flattened as the FC read them, in float64."""
        return _flatten(x, change.flatten_order).astype(np.float64)

    def windows(self, change: LayerChange) -> Iterator[np.ndarray]:
        """The window at each position of the grid, position-major."""
        (h, w), (gh, gw) = (change.in_map.height, change.in_map.width), self.grid
        for i in range(gh):
            for j in range(gw):
                yield self.big[:, :, i : i + h, j : j + w]


def _draw_maps(change: LayerChange, dtype: str, rng: np.random.Generator) -> _Maps:
    m, grid = change.in_map, grid_of(change)
    precision = np.float64 if dtype == "float64" else np.float32

    def draw(n: int, h: int, w: int) -> np.ndarray:
        # Rounded to the kernel's dtype, so both sides see these values.
        return round_to_dtype(rng.standard_normal((n, m.channels, h, w)), dtype).astype(precision)

    traced = draw(SAMPLES, m.height, m.width)
    return _Maps(traced, draw(WINDOW_SAMPLES, m.height + grid[0] - 1, m.width + grid[1] - 1), grid)


def check_layer_arrays(
    change: LayerChange,
    weight: Matrix,
    kernel: Matrix,
    bias: np.ndarray | None = None,
    kernel_bias: np.ndarray | None = None,
    *,
    tolerance: Tolerance | None = None,
    seed: int = 0,
    max_rows: int | None = MAX_ROWS,
) -> LayerCheck:
    """:func:`fc2conv.check.check_layer` computed with numpy from the weight's and the kernel's values.

    Args:
        change: The layer's planned change (geometry and flatten order of the FC inputs).
        weight: The FC weight ``(out, in)``.
        kernel: The conv kernel's rows, ``(out, C*H*W)``: read as ``(out, C, H, W)``.
        bias, kernel_bias: The FC's and the conv's biases (float arrays), if any.
        tolerance, seed, max_rows: As for :func:`~fc2conv.check.check_layer`.
    """
    dtype = coarser_dtype(weight.dtype_name, kernel.dtype_name)
    result = replace(blank_check(change, dtype, weight.shape, change.new_shape, tolerance), engine="numpy")
    kernel_bias = bias if kernel_bias is None else kernel_bias
    problem = _shape_problem(change, weight, kernel, bias, kernel_bias)
    if problem is not None or weight.shape[0] * weight.shape[1] == 0:
        return _empty(result, change, bias, kernel_bias) if problem is None else replace(result, problem=problem)
    rng = np.random.default_rng(seed)  # the rows are drawn first, then the maps
    rows = rows_to_check(weight.shape[0], max_rows, lambda n: rng.permutation(n).tolist())
    maps = _draw_maps(change, kernel.dtype_name, rng)
    tally = Tally()
    for chunk in _row_chunks(rows, weight.shape[1]):
        _measure_chunk(change, maps, chunk, weight, kernel, bias, kernel_bias, tally)
    return tally.result(result, maps.grid, len(rows))


def _shape_problem(
    change: LayerChange, weight: Matrix, kernel: Matrix, bias: np.ndarray | None, kernel_bias: np.ndarray | None
) -> str | None:
    """Why the arrays cannot be the layer the change describes (the kernel's rows read as its shape)."""
    kernel_shape: tuple[int, ...] = tuple(kernel.shape)
    if kernel_shape == (change.out_features, math.prod(change.new_shape[1:])):
        kernel_shape = change.new_shape
    shapes = (bias, kernel_bias)
    return shape_problem(
        change, tuple(weight.shape), kernel_shape, *(b.shape if b is not None else None for b in shapes)
    )


def _empty(
    result: LayerCheck, change: LayerChange, bias: np.ndarray | None, kernel_bias: np.ndarray | None
) -> LayerCheck:
    """A layer with no weights: both sides output the bias alone, if any."""
    error = scale = 0.0
    if bias is not None and kernel_bias is not None and bias.size:
        scale = float(np.nan_to_num(np.abs(bias.astype(np.float64)), nan=math.inf).max())
        difference = np.abs(bias.astype(np.float64) - kernel_bias.astype(np.float64))
        same_nan = np.isnan(bias) & np.isnan(kernel_bias)
        error = float(np.nan_to_num(np.where(same_nan, 0.0, difference), nan=math.inf).max())
    rel = error / scale if scale > 0 else (0.0 if error == 0 else math.inf)
    return replace(
        result, max_abs_error=error, max_rel_error=rel, window_max_abs_error=error, window_grid=grid_of(change),
        reference_scale=scale, rows_checked=0,
    )  # fmt: skip


def _row_chunks(rows: list[int], in_features: int) -> Iterator[range]:
    """Runs of consecutive rows, cut so that a chunk's float64 rows stay within ``_CHUNK_VALUES`` values."""
    step = max(1, _CHUNK_VALUES // max(1, in_features))
    for start_run, stop in row_runs(rows):
        for start in range(start_run, stop, step):
            yield range(start, min(stop, start + step))


def _measure_chunk(
    change: LayerChange,
    maps: _Maps,
    chunk: range,
    weight: Matrix,
    kernel: Matrix,
    bias: np.ndarray | None,
    kernel_bias: np.ndarray | None,
    tally: Tally,
) -> None:
    """The conv on these rows (in the kernel's precision) against the float64 FC."""
    rows = np.arange(chunk.start, chunk.stop)
    k = kernel.take(rows)  # float32, or float64 for a float64 kernel
    k = k.reshape(len(rows), *change.new_shape[1:])
    kb = kernel_bias[rows].astype(k.dtype) if kernel_bias is not None else None
    traced = conv2d(maps.traced, k, kb)  # (SAMPLES, rows, 1, 1)
    window = conv2d(maps.big, k, kb)  # (WINDOW_SAMPLES, rows, gh, gw)
    got_traced = round_to_dtype(traced, kernel.dtype_name).reshape(SAMPLES, -1)
    got_window = round_to_dtype(window, kernel.dtype_name).transpose(2, 3, 0, 1).reshape(-1, len(rows))
    w64 = weight.take(rows).astype(np.float64)
    b64 = bias[rows].astype(np.float64) if bias is not None else 0.0
    tally.add("traced", got_traced, _fc(maps.flattened(maps.traced, change), w64) + b64)
    tally.add("window", got_window, _window_reference(maps, change, w64, b64))


def _window_reference(maps: _Maps, change: LayerChange, w64: np.ndarray, b64: np.ndarray | float) -> np.ndarray:
    """The float64 FC on the window at every position, position-major (as the conv's grid is read).

    The flattened windows are stacked for one product, in groups of at most ``_CHUNK_VALUES`` values
    (one window alone when it is larger: a 2^24-input pointwise layer's would take gigabytes).
    """
    windows = list(maps.windows(change))
    per_group = max(1, _CHUNK_VALUES // max(1, windows[0].size))
    return np.concatenate([
        _fc(np.concatenate([maps.flattened(w, change) for w in windows[start : start + per_group]]), w64) + b64
        for start in range(0, len(windows), per_group)
    ])  # fmt: skip
