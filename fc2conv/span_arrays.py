"""Tensors read from their bytes in a file as numpy arrays (memory-mapped), for the proofs that need no torch.

An FC weight or a conv kernel's rows, ``(out, in)``, over a :class:`~fc2conv.diskio.ByteSpan` (row-major,
little-endian: what safetensors and a ``torch.save`` zip store) is an :class:`~fc2conv.matrix.ArrayMatrix`
over the mapped file: only the rows asked for are read. bfloat16, which numpy lacks, is read as its
bits and widened to float32 exactly.
"""

from __future__ import annotations

import math

import numpy as np

from fc2conv.diskio import ByteSpan
from fc2conv.matrix import ArrayMatrix, Matrix, bfloat16_to_float32, compute_dtype
from fc2conv.types import FLOAT_DTYPES

__all__ = ["span_array", "span_matrix", "span_vector"]

# numpy's name for the dtype the bytes are read as (bfloat16 as its bits).
_STORED_AS = {"float64": "<f8", "float32": "<f4", "float16": "<f2", "bfloat16": "<u2"}


def _mapped(span: ByteSpan, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """The span's bytes as a read-only array of ``shape`` (nothing read until indexed)."""
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"{dtype} is not a floating dtype read as an array")
    stored = np.dtype(_STORED_AS[dtype])
    if span.nbytes != math.prod(shape) * stored.itemsize:
        raise ValueError(f"a span of {span.nbytes} bytes does not hold {dtype} {shape}")
    if span.nbytes == 0:
        return np.empty(shape, dtype=stored)
    return np.memmap(span.path, dtype=stored, mode="r", offset=span.offset, shape=shape)


class _EmptyMatrix:
    """A matrix without values (a dimension is 0), of any declared shape: ``(2**62, 0)`` makes no array."""

    def __init__(self, dtype: str, shape: tuple[int, int]) -> None:
        self.dtype_name, self.shape = dtype, shape

    def take(self, rows: np.ndarray) -> np.ndarray:
        return np.empty((len(rows), 0), dtype=compute_dtype(self.dtype_name))


def span_array(span: ByteSpan, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """A tensor's bytes in a file as a read-only array of its elements (bfloat16 as its bits), mapped."""
    return _mapped(span, dtype, shape)


def span_matrix(span: ByteSpan, dtype: str, shape: tuple[int, int], *, transposed: bool = False) -> Matrix:
    """A 2-D tensor's bytes in a file as a :class:`~fc2conv.matrix.Matrix`, read a few rows at a time.

    ``transposed``: the file holds ``shape`` and the matrix is its transpose (a weight stored ``(in,
    out)``, read as ``(out, in)``; each row taken is then a column of the file, gathered).
    """
    if 0 in shape and span.nbytes == 0:
        return _EmptyMatrix(dtype, (shape[1], shape[0]) if transposed else shape)
    array = _mapped(span, dtype, shape)
    return ArrayMatrix(array.T if transposed else array, dtype)


def span_vector(span: ByteSpan, dtype: str, length: int) -> np.ndarray:
    """A 1-D tensor (a bias) read whole, as float32 (float64 for float64)."""
    values = _mapped(span, dtype, (length,))
    if dtype == "bfloat16":
        return bfloat16_to_float32(values)
    return np.array(values, dtype=compute_dtype(dtype))
