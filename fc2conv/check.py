"""Numeric equivalence of an FC layer and its conv: seeded inputs, a float64 reference, dtype tolerances."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from fc2conv.plan import LayerChange

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Tolerance:
    """A layer passes when ``max_abs_error <= atol + rtol * max|reference|``."""

    atol: float
    rtol: float


# Defaults per dtype: a few units of the dtype's rounding error, relative to the output's scale.
# The conv runs in the layer's own dtype (as it will when deployed); the reference is float64.
DEFAULT_TOLERANCES: dict[str, Tolerance] = {
    "float64": Tolerance(atol=1e-10, rtol=1e-10),
    "float32": Tolerance(atol=1e-5, rtol=1e-5),
    "float16": Tolerance(atol=1e-2, rtol=1e-2),
    "bfloat16": Tolerance(atol=5e-2, rtol=5e-2),
}

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
# Rows of a float64 weight held at once: bounds the check's extra memory (about 6x this) whatever the layer size.
_CHUNK_BYTES = 8 * 2**20


def tolerance_for(dtype: str, atol: float | None = None, rtol: float | None = None) -> Tolerance:
    """The default tolerance for ``dtype``, with either part overridden when given."""
    default = DEFAULT_TOLERANCES.get(dtype, DEFAULT_TOLERANCES["float32"])
    return Tolerance(default.atol if atol is None else atol, default.rtol if rtol is None else rtol)


def coarser_dtype(a: str, b: str) -> str:
    """Of two floating dtypes, the one with the larger rounding error (its tolerance applies)."""
    order = ["float64", "float32", "float16", "bfloat16"]
    return max((a, b), key=lambda d: order.index(d) if d in order else 0)


@dataclass(frozen=True)
class LayerCheck:
    """The measured difference between an FC layer and its conv, on the same seeded inputs.

    ``max_abs_error`` covers both the traced-size maps and the sliding-window map;
    ``max_rel_error`` is it divided by the largest reference output (the output's scale).
    """

    name: str
    became: str
    dtype: str
    old_shape: tuple[int, ...]
    new_shape: tuple[int, ...]
    parameters: int
    max_abs_error: float
    max_rel_error: float
    window_max_abs_error: float
    window_grid: tuple[int, int]
    reference_scale: float
    tolerance: Tolerance
    rows_checked: int = 0
    nonfinite: bool = False
    exact: bool | None = None
    problem: str | None = None
    strict: bool = False

    @property
    def ok(self) -> bool:
        """Within tolerance. Non-finite outputs pass where FC and conv agree on them, unless ``strict``."""
        if self.problem is not None or (self.strict and self.nonfinite):
            return False
        return self.max_abs_error <= self.tolerance.atol + self.tolerance.rtol * self.reference_scale


def _flatten(x: torch.Tensor, order: str) -> torch.Tensor:
    """Flatten (N, C, H, W) the way the source framework did: C-major (chw) or channels-last (hwc)."""
    if order == "hwc":
        x = x.permute(0, 2, 3, 1)
    return x.reshape(x.shape[0], -1)


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
        tolerance: Pass threshold; default from :data:`DEFAULT_TOLERANCES` for the coarser dtype.
        seed: Seed of the random maps (and of the row sample).
        max_rows: Check at most this many output rows (a seeded sample); ``None`` checks all.

    Returns:
        A :class:`LayerCheck` with the measured errors.
    """
    import torch
    import torch.nn.functional as F

    from fc2conv.convert import dtype_name

    dtype = coarser_dtype(dtype_name(weight.dtype), dtype_name(kernel.dtype))
    tolerance = tolerance or tolerance_for(dtype)
    common = dict(
        name=change.name,
        became=change.became,
        dtype=dtype,
        old_shape=tuple(weight.shape),
        new_shape=tuple(kernel.shape),
        parameters=change.parameters,
        tolerance=tolerance,
    )

    def failed(problem: str) -> LayerCheck:
        return LayerCheck(
            **common,
            max_abs_error=math.inf,
            max_rel_error=math.inf,
            window_max_abs_error=math.inf,
            window_grid=(0, 0),
            reference_scale=0.0,
            problem=problem,
        )

    if tuple(kernel.shape) != change.new_shape:
        return failed(f"kernel shape {tuple(kernel.shape)} != expected {change.new_shape}")
    if kernel_bias is None:
        kernel_bias = bias
    if (bias is None) != (kernel_bias is None):
        return failed("bias present on one side only")

    m = change.in_map
    compute_dtype = kernel.dtype
    generator = torch.Generator().manual_seed(seed)

    def draw(n: int, h: int, w: int) -> torch.Tensor:
        x = torch.randn(n, m.channels, h, w, generator=generator, dtype=torch.float64)
        return x.to(compute_dtype)  # both sides see these exact (rounded) values

    x_traced = draw(SAMPLES, m.height, m.width)
    grid = (1, POINTWISE_SEQUENCE) if change.pointwise else (WINDOW_GROWTH + 1, WINDOW_GROWTH + 1)
    x_big = draw(WINDOW_SAMPLES, m.height + grid[0] - 1, m.width + grid[1] - 1)
    windows = torch.cat(
        [
            _flatten(x_big[:, :, i : i + m.height, j : j + m.width].double(), change.flatten_order)
            for i in range(grid[0])
            for j in range(grid[1])
        ]
    )  # (positions * WINDOW_SAMPLES, in), position-major
    traced_flat = _flatten(x_traced.double(), change.flatten_order)

    rows = _rows_to_check(weight.shape[0], max_rows, generator)
    in_features = max(1, weight.shape[1])
    # Few large conv calls (each has a fixed cost), float64 reference weights in smaller pieces.
    conv_rows = max(1, 2 * _CHUNK_BYTES // (kernel.element_size() * in_features))
    ref_rows = max(1, _CHUNK_BYTES // (8 * in_features))
    errors = {"traced": 0.0, "window": 0.0}
    scale = 0.0
    nonfinite = False
    pattern_mismatch = False
    # Runs of consecutive rows, cut to at most conv_rows: slices are views (no copy of a mapped weight).
    chunks = [
        range(start, min(stop, start + conv_rows)) for start_run, stop in _runs(rows)
        for start in range(start_run, stop, conv_rows)
    ]  # fmt: skip
    for chunk in chunks:
        k = kernel[chunk.start : chunk.stop]
        kb = kernel_bias[chunk.start : chunk.stop].to(compute_dtype) if kernel_bias is not None else None
        got = {
            "traced": F.conv2d(x_traced, k, kb).double().reshape(SAMPLES, -1),
            # (WINDOW_SAMPLES, rows, gh, gw) -> (positions * WINDOW_SAMPLES, rows), position-major
            "window": F.conv2d(x_big, k, kb).double().permute(2, 3, 0, 1).reshape(-1, len(chunk)),
        }
        del k
        for sub in range(0, len(chunk), ref_rows):
            part = chunk[sub : sub + ref_rows]
            w64 = weight[part.start : part.stop].double()
            b64 = bias[part.start : part.stop].double() if bias is not None else None
            references = {"traced": F.linear(traced_flat, w64, b64), "window": F.linear(windows, w64, b64)}
            for key, ref in references.items():
                out = got[key][:, sub : sub + len(part)]
                finite = torch.isfinite(ref)
                if not bool(finite.all()):
                    nonfinite = True
                    if not torch.equal(finite, torch.isfinite(out)):
                        pattern_mismatch = True
                diff = (out - ref).abs()[finite]
                err = float(diff.max()) if diff.numel() else 0.0
                errors[key] = max(errors[key], math.inf if math.isnan(err) else err)
                scale = max(scale, float(ref.abs()[finite].max()) if bool(finite.any()) else 0.0)
    abs_traced, abs_window = errors["traced"], errors["window"]

    max_abs = max(abs_traced, abs_window)
    if pattern_mismatch:
        max_abs = math.inf
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    return LayerCheck(
        **common,
        max_abs_error=max_abs,
        max_rel_error=max_rel,
        window_max_abs_error=abs_window,
        window_grid=grid,
        reference_scale=scale,
        rows_checked=len(rows),
        nonfinite=nonfinite,
        problem="non-finite outputs differ between FC and conv" if pattern_mismatch else None,
    )


def _rows_to_check(out: int, max_rows: int | None, generator: torch.Generator) -> list[int]:
    """All rows, or a seeded sample of ``max_rows`` in blocks of :data:`ROW_BLOCK` consecutive rows.

    The sample always holds the first and the last block. Blocks keep reads of a memory-mapped weight
    sequential and let the check use views instead of copies.
    """
    import torch

    if max_rows is None or out <= max_rows:
        return list(range(out))
    block = min(ROW_BLOCK, max_rows // 2)
    starts = {0, out - block}
    candidates = torch.randperm(max(1, out // block), generator=generator).tolist()
    for index in candidates:
        if len(starts) * block >= max_rows:
            break
        starts.add(min(index * block, out - block))
    rows = sorted({r for s in starts for r in range(s, s + block)})
    return rows[:max_rows] if len(rows) > max_rows else rows


def _runs(rows: list[int]) -> list[tuple[int, int]]:
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
    import torch

    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    flat_a, flat_b = a.reshape(-1), b.reshape(-1)
    step = max(1, _CHUNK_BYTES // max(1, a.element_size()))
    for start in range(0, flat_a.numel(), step):
        chunk_a = flat_a[start : start + step].contiguous()
        chunk_b = flat_b[start : start + step].contiguous()
        try:
            same = torch.equal(chunk_a.view(torch.uint8), chunk_b.view(torch.uint8))
        except RuntimeError:  # dtypes without a byte view (quantized): value equality
            same = torch.equal(chunk_a, chunk_b)
        if not same:
            return False
    return True


def kernel_is_exact(change: LayerChange, weight: torch.Tensor, kernel: torch.Tensor) -> bool:
    """Whether ``kernel`` is bit for bit the rearrangement of ``weight`` that fc2conv would write."""
    from fc2conv.convert import fc_to_conv_weight

    if tuple(kernel.shape) != change.new_shape or kernel.dtype != weight.dtype:
        return False
    rows = max(1, _CHUNK_BYTES // max(1, weight.shape[1] * weight.element_size()))
    for start in range(0, weight.shape[0], rows):
        part = weight[start : start + rows]
        expected = fc_to_conv_weight(part, replace(change, old_shape=(part.shape[0], part.shape[1])))
        if not tensors_identical(expected, kernel[start : start + rows]):
            return False
    return True


def check_changes(
    changes: Sequence[LayerChange],
    original: Mapping[str, torch.Tensor],
    converted: Mapping[str, torch.Tensor],
    *,
    atol: float | None = None,
    rtol: float | None = None,
    exact: bool = False,
    strict: bool = False,
) -> list[LayerCheck]:
    """Run :func:`check_layer` for each change, reading weights and biases from the two mappings.

    Args:
        changes: The converted layers.
        original: Tensors of the source checkpoint (FC weights).
        converted: Tensors of the converted checkpoint (conv kernels).
        atol, rtol: Override the per-dtype defaults.
        exact: Also record whether each kernel is bit for bit the expected rearrangement.
        strict: Fail layers whose weights or outputs are not finite (NaN/Inf).
    """
    from fc2conv.convert import dtype_name

    results = []
    for change in changes:
        weight, kernel = original[change.weight], converted[change.weight]
        bias = original[change.bias] if change.bias else None
        kernel_bias = converted.get(change.bias) if change.bias else None
        dtype = coarser_dtype(dtype_name(weight.dtype), dtype_name(kernel.dtype))
        result = check_layer(change, weight, kernel, bias, kernel_bias, tolerance=tolerance_for(dtype, atol, rtol))
        result = replace(result, strict=strict)
        if exact:
            result = replace(result, exact=kernel_is_exact(change, weight, kernel))
        results.append(result)
    return results
