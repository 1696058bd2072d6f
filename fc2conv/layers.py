"""Tensors grouped into layers by module prefix, each with a kind guessed from its shapes and name."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from fc2conv.types import TensorInfo

__all__ = ["Layer", "LayerKind", "group_layers", "join_name", "split_name"]

LayerKind = Literal["Linear", "Conv1d", "Conv2d", "Conv3d", "BatchNorm", "Embedding", "other"]

_EMBEDDING_NAME = re.compile(r"embed|(^|\.)(wte|wpe|tok_embeddings)(\.|$)", re.IGNORECASE)


def join_name(prefix: str, leaf: str) -> str:
    """``("fc1", "weight")`` -> ``"fc1.weight"``; a top-level tensor has no prefix."""
    return f"{prefix}.{leaf}" if prefix else leaf


def split_name(name: str) -> tuple[str, str]:
    """``"fc1.weight"`` -> ``("fc1", "weight")``."""
    prefix, _, leaf = name.rpartition(".")
    return prefix, leaf


@dataclass(frozen=True)
class Layer:
    """The tensors that share a module prefix (``fc1.weight`` + ``fc1.bias`` -> ``fc1``) and a guessed kind.

    ``position`` is the index of the layer's first tensor in the checkpoint's listing, so layers can be
    compared by where they come.
    """

    name: str
    kind: LayerKind
    tensors: tuple[TensorInfo, ...]
    position: int = 0

    @property
    def weight(self) -> TensorInfo | None:
        return self._leaf("weight")

    @property
    def bias(self) -> TensorInfo | None:
        return self._leaf("bias")

    @property
    def channels(self) -> int | None:
        """Output channels of a conv, features of a BatchNorm; None for other kinds (and for none at all)."""
        if self.weight is None or self.kind not in ("Conv1d", "Conv2d", "Conv3d", "BatchNorm"):
            return None
        return self.weight.shape[0] if self.weight.shape and self.weight.shape[0] > 0 else None

    @property
    def parameters(self) -> int:
        return sum(t.numel for t in self.tensors if not t.name.endswith("num_batches_tracked"))

    def _leaf(self, leaf: str) -> TensorInfo | None:
        return next((t for t in self.tensors if t.name == join_name(self.name, leaf)), None)


def group_layers(infos: Sequence[TensorInfo]) -> list[Layer]:
    """Group tensors by module prefix, in first-seen order, and guess each module's kind."""
    groups: dict[str, list[TensorInfo]] = {}
    first: dict[str, int] = {}
    for index, info in enumerate(infos):
        prefix, _ = split_name(info.name)
        groups.setdefault(prefix, []).append(info)
        first.setdefault(prefix, index)
    return [
        Layer(prefix, _guess_kind(prefix, members), tuple(members), first[prefix]) for prefix, members in groups.items()
    ]


def _guess_kind(prefix: str, members: Sequence[TensorInfo]) -> LayerKind:
    leaves = {split_name(t.name)[1]: t for t in members}
    weight = leaves.get("weight")
    if weight is None:
        return "other"
    if "running_mean" in leaves or "running_var" in leaves:
        return "BatchNorm"
    ndim = len(weight.shape)
    if ndim == 4:
        return "Conv2d"
    if ndim == 3:
        return "Conv1d"
    if ndim == 5:
        return "Conv3d"
    if ndim == 2:
        return "Embedding" if _EMBEDDING_NAME.search(prefix) else "Linear"
    return "other"
