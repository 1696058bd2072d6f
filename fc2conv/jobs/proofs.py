"""Which proof each converted layer gets, and whether a command needs torch at all.

A kernel whose weight's bytes lie in a file (a ``torch.save`` zip or safetensors) and whose own bytes
lie in the written file, of the same floating dtype, is proven with numpy. One that keeps its weight's
bytes (a ``chw`` reshape or a 1x1 view) has its bytes compared with the weight's (``memcmp``); one that
moves them (an ``hwc`` permutation, a weight stored ``(in, out)``) with the weight rearranged in numpy
(:func:`fc2conv.convert.rearranged_kernel`). Both then get the numeric check computed from the files'
bytes (:mod:`fc2conv.array_check`). Every other layer (a dtype change, a tensor without a file span)
goes through torch (:func:`fc2conv.check.check_changes`). A conversion or a verification whose layers
are all of the first kind, and whose other tensors are all compared as bytes, never imports torch.
"""

from __future__ import annotations

import math
from collections.abc import Container, Mapping, Sequence
from concurrent.futures import Executor, Future
from dataclasses import replace

from fc2conv.check import MAX_ROWS, PROVEN_ROWS, check_changes, span_difference, tolerance_for
from fc2conv.convert import keeps_bytes
from fc2conv.diskio import ByteSpan
from fc2conv.formats import Source
from fc2conv.plan import LayerChange
from fc2conv.results import LayerCheck
from fc2conv.types import FLOAT_DTYPES, TensorInfo, dtype_itemsize

__all__ = ["checks_ahead", "moved_in_numpy", "prove_layers", "proven_without_torch"]

# Formats whose tensors are read without torch and lie in the file as plain bytes.
_BYTE_FORMATS = ("torch", "safetensors", "sharded safetensors")


def _readable(
    change: LayerChange,
    infos: Mapping[str, TensorInfo],
    spans: Container[str],
    out_infos: Mapping[str, TensorInfo],
    out_spans: Container[str],
) -> bool:
    """Whether ``change`` can be proven from the files' bytes: its weight and kernel (and biases) have spans.

    The tensors must be floating point, of the same dtype on both sides, and of the shapes the change
    says (anything else goes to torch's check, which names the problem).
    """
    names = [n for n in (change.weight, change.bias) if n is not None]
    if any(n not in infos or n not in out_infos for n in names):
        return False
    if any(n not in spans or n not in out_spans or infos[n].dtype != out_infos[n].dtype for n in names):
        return False
    weight, kernel = infos[change.weight], out_infos[change.weight]
    if weight.dtype not in FLOAT_DTYPES or weight.shape != change.stored_shape or kernel.shape != change.new_shape:
        return False
    if change.bias is None:
        return True
    bias, out_bias = infos[change.bias], out_infos[change.bias]
    return bias.dtype in FLOAT_DTYPES and bias.shape == out_bias.shape == (change.out_features,)


def _from_bytes(original: Source) -> bool:
    """Whether ``original``'s tensors are read without torch, as plain bytes of its files."""
    return original.format in _BYTE_FORMATS and original.module is None


def moved_in_numpy(
    changes: Sequence[LayerChange],
    original: Source,
    out_infos: Mapping[str, TensorInfo],
    out_spans: Container[str] | None = None,
) -> set[str]:
    """The weights whose kernels move bytes and are rearranged (and proven) with numpy from the input's bytes.

    ``out_spans``: the kernels that lie in the written file as bytes (by default every one of
    ``out_infos``: a file about to be written).
    """
    if not _from_bytes(original):
        return set()
    infos, written = original.info_by_name, out_infos if out_spans is None else out_spans
    return {c.weight for c in changes if not keeps_bytes(c) and _readable(c, infos, original.spans, out_infos, written)}


def proven_without_torch(original: Source, changes: Sequence[LayerChange], out_infos: Mapping[str, TensorInfo]) -> bool:
    """Whether a conversion of ``original`` (written as ``out_infos``) can be written and proven without torch.

    Every tensor must lie in the input as bytes (so each has a span: copied, or rearranged with
    numpy) and every converted layer proven by :func:`prove_layers`' numpy path.
    """
    if not _from_bytes(original) or any(info.name not in original.spans for info in original.infos):
        return False
    return all(_readable(c, original.info_by_name, original.spans, out_infos, out_infos) for c in changes)


def prove_layers(
    changes: Sequence[LayerChange],
    original: Source,
    converted: Source,
    compared: Mapping[str, int | None],
    *,
    atol: float | None = None,
    rtol: float | None = None,
    strict: bool = False,
    ahead: Mapping[str, Future[LayerCheck]] | None = None,
) -> list[LayerCheck]:
    """Each layer's numeric check and byte proof: with numpy from the files' bytes where it can, else torch.

    ``compared`` holds, per name, the first differing byte of the two files' spans (None: equal), as
    :func:`fc2conv.check.compare_spans` gives it; a layer whose weight was compared there is proven
    from the bytes. A kernel that moves its weight's bytes, both lying in the files, is compared here
    with the weight rearranged in numpy, and proven from the bytes too. ``ahead`` holds checks started
    by :func:`checks_ahead` (used only with the default tolerances: they were made with them).
    """
    ahead = ahead if ahead is not None and atol is None and rtol is None else {}
    infos, out_infos = original.info_by_name, converted.info_by_name
    by_bytes = {
        c.weight
        for c in changes
        if c.weight in compared and keeps_bytes(c) and _readable(c, infos, original.spans, out_infos, converted.spans)
    }
    moved = moved_in_numpy(changes, original, out_infos, converted.spans)  # compared here, with numpy's rearrangement
    compared = {**compared, **{
        c.weight: _moved_difference(c, infos, original.spans, converted.spans) for c in changes if c.weight in moved
    }}  # fmt: skip
    by_bytes |= moved
    rest = [c for c in changes if c.weight not in by_bytes]
    checked: list[LayerCheck] = []
    if rest:  # else torch is not needed, and not imported
        checked = check_changes(
            rest,
            original.tensors,
            converted.tensors,
            atol=atol,
            rtol=rtol,
            exact=True,
            strict=strict,
            compared=compared,
        )
    through_torch = iter(checked)
    return [
        _prove_from_bytes(c, infos, original, converted, compared[c.weight], atol, rtol, strict, ahead.get(c.weight))
        if c.weight in by_bytes
        else next(through_torch)
        for c in changes
    ]


def _prove_from_bytes(
    change: LayerChange,
    infos: Mapping[str, TensorInfo],
    original: Source,
    converted: Source,
    first_difference: int | None,
    atol: float | None,
    rtol: float | None,
    strict: bool,
    ahead: Future[LayerCheck] | None,
) -> LayerCheck:
    """The byte proof (the spans compared) and the numeric check from the files' bytes (numpy).

    A numeric check made ahead on the input's bytes is the kernel's own once the bytes are proven equal;
    a kernel whose bytes differ is checked from the converted file's bytes.
    """
    proven = first_difference is None
    if proven and ahead is not None:
        result = ahead.result()
    else:
        result = _numeric(change, infos, original.spans, converted.spans, proven, atol, rtol)
    result = replace(result, strict=strict, exact=proven)
    if first_difference is not None and result.problem is None:
        difference = span_difference(change, first_difference, dtype_itemsize(infos[change.weight].dtype))
        numeric = result.failure  # when the numbers fail too, they come first
        result = replace(result, problem=f"{numeric}; {difference}" if numeric else difference)
    return result


def _numeric(
    change: LayerChange,
    infos: Mapping[str, TensorInfo],
    spans: Mapping[str, ByteSpan],
    kernel_spans: Mapping[str, ByteSpan],
    proven: bool,
    atol: float | None,
    rtol: float | None,
) -> LayerCheck:
    """The numeric check with numpy: the FC from ``spans``, the conv from ``kernel_spans`` (maybe the same)."""
    from fc2conv.array_check import check_layer_arrays  # numpy: imported while the bytes were copied
    from fc2conv.span_arrays import span_matrix, span_vector

    dtype = infos[change.weight].dtype
    out, in_features = change.old_shape
    weight = span_matrix(spans[change.weight], dtype, change.stored_shape, transposed=change.layout == "in_out")
    kernel = span_matrix(kernel_spans[change.weight], dtype, (out, math.prod(change.new_shape[1:])))
    bias = kernel_bias = None
    if change.bias is not None:
        bias = span_vector(spans[change.bias], infos[change.bias].dtype, out)
        kernel_bias = span_vector(kernel_spans[change.bias], infos[change.bias].dtype, out)
    return check_layer_arrays(
        change, weight, kernel, bias, kernel_bias, tolerance=tolerance_for(dtype, atol, rtol, terms=in_features),
        max_rows=PROVEN_ROWS if proven else MAX_ROWS,
    )  # fmt: skip


def checks_ahead(
    changes: Sequence[LayerChange], original: Source, out_infos: Mapping[str, TensorInfo], pool: Executor
) -> dict[str, Future[LayerCheck]]:
    """Start, on ``pool``, the numeric checks of the layers that will be copied as bytes, on the input's bytes.

    Run while the bytes are copied: once the byte proof shows that a written kernel is its weight's
    bytes, the check on the input's bytes is the check of the written kernel
    (:func:`prove_layers` takes these results for such layers).
    """
    infos = original.info_by_name
    return {
        c.weight: pool.submit(_numeric, c, infos, original.spans, original.spans, True, None, None)
        for c in changes
        if keeps_bytes(c) and _readable(c, infos, original.spans, out_infos, original.spans)
    }


def _moved_difference(
    change: LayerChange,
    infos: Mapping[str, TensorInfo],
    spans: Mapping[str, ByteSpan],
    kernel_spans: Mapping[str, ByteSpan],
) -> int | None:
    """The first byte (None: none) at which the written kernel differs from its weight rearranged in numpy.

    Every byte is compared (``memcmp``), a block of kernel rows (at most 64 MB) rearranged at a time.
    """
    from fc2conv.convert import rearranged_rows  # numpy: imported while the bytes were copied
    from fc2conv.diskio import first_difference_at
    from fc2conv.span_arrays import span_array

    dtype = infos[change.weight].dtype
    row = math.prod(change.new_shape[1:])
    stored = span_array(spans[change.weight], dtype, change.stored_shape)
    written = span_array(kernel_spans[change.weight], dtype, (change.out_features, row))
    row_bytes = row * dtype_itemsize(dtype)
    for start, block in rearranged_rows(change, stored, _COMPARE_STEP // max(1, row_bytes)):
        if block.nbytes == 0:
            continue
        target = written[start : start + len(block)]
        differs = first_difference_at(block.ctypes.data, target.ctypes.data, block.nbytes)
        if differs is not None:
            return start * row_bytes + differs
    return None


# Bytes of a rearranged kernel compared at once (a block of its rows).
_COMPARE_STEP = 2**26
