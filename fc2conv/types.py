"""The vocabulary every stage shares: tensor listings, dtypes, feature-map shapes. Imports nothing of fc2conv."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Literal, TypeAlias

if TYPE_CHECKING:
    import torch

__all__ = [
    "FLATTEN_ORDERS",
    "FLOAT_DTYPES",
    "FlattenOrder",
    "HeadHint",
    "InputShape",
    "ShapeLike",
    "ShapeSpec",
    "TensorInfo",
    "WeightLayout",
    "dtype_itemsize",
    "dtype_name",
    "tensor_infos",
]

FlattenOrder = Literal["chw", "hwc"]
FLATTEN_ORDERS: tuple[FlattenOrder, ...] = ("chw", "hwc")

# How an FC weight is stored: PyTorch's Linear (out, in), or transposed (GPT-2's Conv1D, Keras's Dense).
WeightLayout = Literal["out_in", "in_out"]

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")

# Bytes per element of the dtypes a checkpoint may hold, by fc2conv's (torch's) dtype name.
_ITEMSIZE: Mapping[str, int] = MappingProxyType(
    {
        "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1,
        "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint64": 8, "uint32": 4, "uint16": 2, "uint8": 1,
        "bool": 1, "complex64": 8,
    }
)  # fmt: skip


@dataclass(frozen=True)
class TensorInfo:
    """Name, shape and dtype of one tensor: all that planning and ``inspect`` need."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # torch's name without the prefix: "float32", "bfloat16", "int8", ...

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor's data; 0 for a dtype safetensors cannot store."""
        return self.numel * dtype_itemsize(self.dtype)


@dataclass(frozen=True)
class InputShape:
    """A feature map of ``channels`` x ``height`` x ``width`` (one sample, no batch dimension)."""

    channels: int
    height: int
    width: int

    @property
    def features(self) -> int:
        """Number of values the map flattens to: ``C * H * W``."""
        return self.channels * self.height * self.width

    def __str__(self) -> str:
        return f"{self.channels}x{self.height}x{self.width}"

    def as_list(self) -> list[int]:
        return [self.channels, self.height, self.width]


@dataclass(frozen=True)
class ShapeSpec:
    """What the user gave on the command line; missing parts are ``None`` until resolved.

    ``256x4x4`` is complete, ``4x4`` leaves channels open, ``256`` leaves a square map open.
    """

    channels: int | None = None
    height: int | None = None
    width: int | None = None
    text: str = ""

    def __str__(self) -> str:
        return self.text or "x".join("?" if v is None else str(v) for v in self.parts())

    def parts(self) -> tuple[int | None, int | None, int | None]:
        return (self.channels, self.height, self.width)

    @property
    def is_complete(self) -> bool:
        return None not in self.parts()


@dataclass(frozen=True)
class HeadHint:
    """What a model file itself says about one head (a Keras config, an ONNX graph), so nothing is guessed.

    ``layers`` are the FC layers of the head in order (the first reads the flattened map, the others
    each read the previous one); ``feature_map`` is the map that is flattened, as (C, H, W), and
    ``flatten_order`` the order its values are flattened in; ``source`` says where this was read.
    """

    layers: tuple[str, ...]
    feature_map: InputShape
    flatten_order: FlattenOrder
    source: str


# Every form the public API accepts for a feature-map or network input shape.
ShapeLike: TypeAlias = "ShapeSpec | InputShape | tuple[int, int, int] | str"


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``: the dtype spelling used across fc2conv."""
    return str(dtype).removeprefix("torch.")


def dtype_itemsize(dtype: str) -> int:
    """Bytes per element of a dtype name (``"bfloat16"`` -> 2); 0 if safetensors cannot store it."""
    return _ITEMSIZE.get(dtype, 0)


def tensor_infos(state_dict: Mapping[str, torch.Tensor]) -> list[TensorInfo]:
    """Names, shapes and dtypes of a state dict, in its order (what planning reads)."""
    return [TensorInfo(name, tuple(t.shape), dtype_name(t.dtype)) for name, t in state_dict.items()]
