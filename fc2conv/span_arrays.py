"""Tensors read from their bytes in a file as numpy arrays (memory-mapped), for the proofs that need no torch.

A :class:`SpanMatrix` is an FC weight or a conv kernel's rows, ``(out, in)``, over a
:class:`~fc2conv.diskio.ByteSpan` (row-major, little-endian: what safetensors and a ``torch.save`` zip
store): only the rows asked for are read. bfloat16, which numpy lacks, is read as its bits and widened
to float32 exactly.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from fc2conv.diskio import ByteSpan
from fc2conv.matrix import bfloat16_to_float32
from fc2conv.types import FLOAT_DTYPES

if TYPE_CHECKING:
    import numpy as np

__all__ = ["SpanMatrix", "span_vector"]

# numpy's name for the dtype the bytes are read as (bfloat16 as its bits).
_STORED_AS = {"float64": "<f8", "float32": "<f4", "float16": "<f2", "bfloat16": "<u2"}


def _mapped(span: ByteSpan, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """The span's bytes as a read-only array of ``shape`` (nothing read until indexed)."""
    import numpy as np

    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"{dtype} is not a floating dtype read as an array")
    stored = np.dtype(_STORED_AS[dtype])
    if span.nbytes != math.prod(shape) * stored.itemsize:
        raise ValueError(f"a span of {span.nbytes} bytes does not hold {dtype} {shape}")
    if span.nbytes == 0:
        return np.empty(shape, dtype=stored)
    return np.memmap(span.path, dtype=stored, mode="r", offset=span.offset, shape=shape)


def _widened(values: np.ndarray, dtype: str) -> np.ndarray:
    """Values read as stored, as float32 (float64 for float64): exact, and a new array."""
    import numpy as np

    if dtype == "bfloat16":
        return bfloat16_to_float32(values)
    return np.array(values, dtype=np.float64 if dtype == "float64" else np.float32)


class SpanMatrix:
    """A 2-D tensor's bytes in a file, read a few rows at a time (the :class:`fc2conv.matrix.Matrix` protocol)."""

    def __init__(self, span: ByteSpan, dtype: str, shape: tuple[int, int]) -> None:
        self._values = _mapped(span, dtype, shape)
        self._dtype = dtype

    @property
    def shape(self) -> tuple[int, int]:
        rows, columns = self._values.shape
        return rows, columns

    @property
    def dtype_name(self) -> str:
        return self._dtype

    def take(self, rows: np.ndarray) -> np.ndarray:
        """These rows as float32 (float64 for a float64 tensor)."""
        return _widened(self._values[rows], self._dtype)


def span_vector(span: ByteSpan, dtype: str, length: int) -> np.ndarray:
    """A 1-D tensor (a bias) read whole, as float32 (float64 for float64)."""
    return _widened(_mapped(span, dtype, (length,)), dtype)
