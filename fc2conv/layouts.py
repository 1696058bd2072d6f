"""How each FC weight is stored: PyTorch's ``(out, in)`` or the transposed ``(in, out)``, and how we know.

``nn.Linear`` stores ``(out, in)``; Hugging Face's GPT-2 ``Conv1D`` and Keras's ``Dense`` store
``(in, out)``. A bias proves the layout when the weight is not square (its length is ``out``); a
square weight in a checkpoint that stores other layers ``(in, out)`` cannot be told, and converting
it on a guess would be silently wrong, so it is refused until the caller names the layout.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from fc2conv.errors import PlanError
from fc2conv.layers import Layer
from fc2conv.types import WeightLayout

__all__ = ["CONV1D_NAMES", "FCShape", "LayoutChoice", "resolve_layouts"]

LayoutChoice = Literal["auto", "out_in", "in_out"]

# transformers' GPT-2 family builds these projections with Conv1D, which stores (in, out).
CONV1D_NAMES = re.compile(r"(^|\.)(c_attn|c_proj|c_fc|q_attn)$")


@dataclass(frozen=True)
class FCShape:
    """An FC layer read as ``Linear(in_features -> out_features)``, with its stored layout and why.

    ``layout`` is None when it cannot be told (a square weight in a checkpoint that stores other
    layers ``(in, out)``); such a layer is refused if it is to be converted.
    """

    layer: Layer
    out_features: int
    in_features: int
    layout: WeightLayout | None
    why: str

    @property
    def name(self) -> str:
        return self.layer.name


def resolve_layouts(
    fcs: Sequence[Layer], choice: LayoutChoice = "auto", hints: Mapping[str, WeightLayout] | None = None
) -> list[FCShape]:
    """The layout of each FC layer: given by ``choice``, else proven by its bias, hinted, or PyTorch's.

    Args:
        fcs: Layers with a 2-D weight.
        choice: ``"out_in"`` or ``"in_out"`` for every layer, or ``"auto"``.
        hints: Layouts known from elsewhere (a ``config.json`` naming the architecture), by layer name.

    Raises:
        PlanError: a bias whose length matches neither dimension of its weight (naming the layer).
    """
    hints = hints or {}
    proven = {layer.name: _proven_by_bias(layer) for layer in fcs}
    conv1d_proven = any(v == "in_out" and CONV1D_NAMES.search(n) for n, v in proven.items())
    any_in_out = any(v == "in_out" for v in proven.values()) or "in_out" in hints.values()
    shapes = []
    for layer in fcs:
        layout, why = _layout_of(layer, choice, proven[layer.name], hints.get(layer.name), conv1d_proven, any_in_out)
        rows, cols = _weight_shape(layer)
        if layout is not None:
            _check_bias(layer, rows if layout == "out_in" else cols)
        out, in_ = (cols, rows) if layout == "in_out" else (rows, cols)
        shapes.append(FCShape(layer, out, in_, layout, why))
    return shapes


def _layout_of(
    layer: Layer,
    choice: LayoutChoice,
    proven: WeightLayout | None,
    hint: WeightLayout | None,
    conv1d_proven: bool,
    any_in_out: bool,
) -> tuple[WeightLayout | None, str]:
    if choice != "auto":
        return choice, "as given"
    if proven is not None:
        return proven, f"its bias has {_bias_length(layer)} values"
    if hint is not None:
        return hint, "from config.json"
    if conv1d_proven and CONV1D_NAMES.search(layer.name):
        return "in_out", "a transformers Conv1D by its name, as the biases of its siblings show"
    rows, cols = _weight_shape(layer)
    if any_in_out:
        what = "square" if rows == cols else "without a bias"
        return None, f"{what}, in a checkpoint that stores other layers (in, out)"
    return "out_in", "PyTorch's layout"


def _weight_shape(layer: Layer) -> tuple[int, int]:
    weight = layer.weight
    assert weight is not None and len(weight.shape) == 2
    return weight.shape[0], weight.shape[1]


def _bias_length(layer: Layer) -> int | None:
    bias = layer.bias
    return bias.shape[0] if bias is not None and len(bias.shape) == 1 else None


def _proven_by_bias(layer: Layer) -> WeightLayout | None:
    """``out_in`` or ``in_out`` when the bias length matches exactly one dimension of the weight."""
    rows, cols = _weight_shape(layer)
    length = _bias_length(layer)
    if length is None or rows == cols:
        return None
    if length == rows:
        return "out_in"
    if length == cols:
        return "in_out"
    return None


def _check_bias(layer: Layer, out_features: int) -> None:
    bias = layer.bias
    if bias is None:
        return
    if len(bias.shape) != 1 or bias.shape[0] != out_features:
        rows, cols = _weight_shape(layer)
        raise PlanError(
            f"{bias.name} has shape {list(bias.shape)}, but {layer.name}'s weight is {rows}x{cols}: a bias "
            f"has one value per output ({out_features})"
        )
