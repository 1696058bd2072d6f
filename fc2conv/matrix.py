"""A weight as a matrix whose rows are read a few at a time, as float numpy arrays, without importing torch.

:class:`Matrix` is all that :mod:`fc2conv.evidence` asks of a weight: its shape, its dtype name and
some of its rows. :func:`as_matrix` wraps a ``torch.Tensor`` (torch is touched only when the weight is
already a tensor, so it is imported already) or a ``numpy.ndarray``; anything else that implements the
protocol (say, rows read from a file's mapped bytes) is used as it is. Imports numpy and nothing of torch.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias, TypeGuard, runtime_checkable

import numpy as np

from fc2conv.types import dtype_name

if TYPE_CHECKING:
    import torch

__all__ = [
    "ArrayMatrix",
    "Matrix",
    "MatrixLike",
    "TensorMatrix",
    "as_matrix",
    "bfloat16_to_float32",
    "compute_dtype",
    "is_floating",
    "round_to_dtype",
]


@runtime_checkable
class Matrix(Protocol):
    """A 2-D weight that hands out copies of some of its rows as float32 (float64 for float64 weights)."""

    @property
    def shape(self) -> tuple[int, int]:
        """``(rows, columns)``: for an FC weight in PyTorch's layout, ``(out_features, in_features)``."""
        ...

    @property
    def dtype_name(self) -> str:
        """The stored dtype, by fc2conv's names: ``"float32"``, ``"float16"``, ``"bfloat16"``, ``"int8"``, ..."""
        ...

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The given rows (sorted int64 indices) as a new float32 array (float64 when :attr:`dtype_name` is
        ``"float64"``), C-contiguous, of shape ``(len(rows), columns)``: the caller may change it."""
        ...


# Every form of weight that :func:`as_matrix` accepts.
MatrixLike: TypeAlias = "Matrix | torch.Tensor | np.ndarray"


def is_floating(name: str) -> bool:
    """Whether a dtype name is a floating-point type (``float16``, ``bfloat16``, ``float8_e4m3fn``, ...)."""
    return name.startswith(("float", "bfloat"))


def compute_dtype(name: str) -> type[np.floating[Any]]:
    """The dtype rows of a weight of dtype ``name`` are read in: float64 for float64, else float32."""
    return np.float64 if name == "float64" else np.float32


def bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 values stored as uint16 bits, as a new float32 array (exact: bfloat16 is float32's top half)."""
    return (np.ascontiguousarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


class TensorMatrix:
    """A 2-D ``torch.Tensor`` (maybe memory-mapped, maybe an ``nn.Parameter``) as a :class:`Matrix`.

    Only the rows asked for are read (``index_select``), outside autograd, converted to float32
    (float64 for float64 tensors) on the CPU.
    """

    def __init__(self, tensor: torch.Tensor) -> None:
        if tensor.dim() != 2:
            raise ValueError(f"expected a 2-D matrix, got shape {tuple(tensor.shape)}")
        self._tensor = tensor.detach()

    @property
    def shape(self) -> tuple[int, int]:
        """``(rows, columns)`` of the tensor."""
        rows, columns = self._tensor.shape
        return int(rows), int(columns)

    @property
    def dtype_name(self) -> str:
        """The tensor's dtype without torch's prefix."""
        return dtype_name(self._tensor.dtype)

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The given rows, read from the tensor, as a new float32 (float64) array."""
        import torch

        tensor = self._tensor
        target = torch.float64 if tensor.dtype == torch.float64 else torch.float32
        index = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64)).to(tensor.device)
        # index_select copies the rows, so the array never aliases the weight, whatever .to() returns.
        picked = tensor.index_select(0, index).to(device="cpu", dtype=target).contiguous()
        return picked.numpy()


class ArrayMatrix:
    """A 2-D ``numpy.ndarray`` (maybe a ``np.memmap``) as a :class:`Matrix`.

    Args:
        array: The matrix. Any dtype; bfloat16 either as ml_dtypes' bfloat16 or as uint16 bits with
            ``dtype_name="bfloat16"``.
        dtype_name: The dtype the array's values stand for, if not the array's own (``"bfloat16"``).
    """

    def __init__(self, array: np.ndarray, dtype_name: str | None = None) -> None:
        if array.ndim != 2:
            raise ValueError(f"expected a 2-D matrix, got shape {tuple(array.shape)}")
        self._array = array
        self._dtype_name = dtype_name or array.dtype.name
        if self._dtype_name == "bfloat16" and array.dtype.itemsize != 2:
            raise ValueError(f"bfloat16 values are 2 bytes each; the array holds {array.dtype.name}")

    @property
    def shape(self) -> tuple[int, int]:
        """``(rows, columns)`` of the array."""
        rows, columns = self._array.shape
        return int(rows), int(columns)

    @property
    def dtype_name(self) -> str:
        """The dtype the values stand for (numpy's name unless given)."""
        return self._dtype_name

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The given rows, read by fancy indexing (a memory-mapped array reads just those), as a new array."""
        picked = self._array[np.asarray(rows, dtype=np.int64)]
        if self._dtype_name == "bfloat16":
            return bfloat16_to_float32(picked.view(np.uint16))
        return np.ascontiguousarray(picked, dtype=compute_dtype(self._dtype_name))


def _is_tensor(weight: object) -> TypeGuard[torch.Tensor]:
    """Whether ``weight`` is a ``torch.Tensor``, without importing torch (no tensor exists before it is)."""
    # torch may be importing on another thread (fc2conv.preload): a module without Tensor yet, and no
    # tensor can exist before it has one.
    tensor_type = getattr(sys.modules.get("torch"), "Tensor", None)
    return tensor_type is not None and isinstance(weight, tensor_type)


def as_matrix(weight: object) -> Matrix:
    """``weight`` as a :class:`Matrix`: a tensor or an array wrapped, a :class:`Matrix` as it is.

    Raises:
        ValueError: if a tensor or an array is not 2-D.
        TypeError: if ``weight`` is none of these.
    """
    if _is_tensor(weight):
        return TensorMatrix(weight)
    if isinstance(weight, np.ndarray):
        return ArrayMatrix(weight)
    if isinstance(weight, Matrix):
        return weight
    raise TypeError(
        f"expected a torch.Tensor, a numpy array or a Matrix (shape, dtype_name, take), got {type(weight).__name__}"
    )


def round_to_dtype(values: np.ndarray, dtype: str) -> np.ndarray:
    """``values`` rounded (to nearest, ties to even) to the values ``dtype`` holds, kept in their own dtype.

    float16 and float32 by numpy's casts; bfloat16 (which numpy lacks) by rounding the float32 bits to
    their upper half, as torch does; float64 values are returned as they are. Values beyond the dtype's
    range become infinite, as in torch.
    """
    if dtype == "float64":
        return values
    with np.errstate(over="ignore"):
        if dtype == "float16":
            return values.astype(np.float16).astype(values.dtype)
        single = values.astype(np.float32)
    if dtype == "bfloat16":
        bits = single.view(np.uint32)
        rounded = (bits + (np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1)))) & np.uint32(0xFFFF0000)
        single = np.where(np.isnan(single), single, rounded.view(np.float32))
    return single.astype(values.dtype)
