"""TEMPORARY (merged with the evidence branch's matrix.py): the Matrix protocol and dtype rounding."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import numpy as np

__all__ = ["Matrix", "bfloat16_to_float32", "round_to_dtype"]


class Matrix(Protocol):
    @property
    def shape(self) -> tuple[int, int]: ...

    @property
    def dtype_name(self) -> str: ...

    def take(self, rows: np.ndarray) -> np.ndarray: ...


def bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
    import numpy as np

    return (bits.astype(np.uint32) << 16).view(np.float32)


def round_to_dtype(values: np.ndarray, dtype: str) -> np.ndarray:
    """``values`` rounded (to nearest, ties to even) to the values ``dtype`` holds, kept in their own dtype.

    float16 and float32 by numpy's casts; bfloat16 (which numpy lacks) by rounding float32 bits to their
    upper half, as torch does. float64 values are returned as they are.
    """
    import numpy as np

    if dtype == "float64":
        return values
    with np.errstate(over="ignore"):  # values beyond the dtype's range round to infinity, as in torch
        if dtype == "float16":
            return values.astype(np.float16).astype(values.dtype)
        single = values.astype(np.float32)
    if dtype == "bfloat16":
        bits = single.view(np.uint32)
        rounded = (bits + (np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1)))) & np.uint32(0xFFFF0000)
        single = np.where(np.isnan(single), single, rounded.view(np.float32))
    return single.astype(values.dtype)
