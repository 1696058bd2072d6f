"""Apply a plan: state dict in, state dict out. The FC -> conv reshape rule lives here, once."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

from fc2conv.errors import PlanError
from fc2conv.plan import LayerChange, Plan, plan_conversion
from fc2conv.types import FlattenOrder, ShapeLike, TensorInfo, tensor_infos

if TYPE_CHECKING:
    import numpy as np
    import torch

__all__ = [
    "apply_plan",
    "convert_state_dict",
    "converted_info",
    "converted_tensor",
    "fc_to_conv_weight",
    "fc_weight",
    "keeps_bytes",
    "rearranged_kernel",
    "rearranged_rows",
]


def fc_weight(change: LayerChange, stored: torch.Tensor) -> torch.Tensor:
    """The FC weight as PyTorch's ``(out, in)``: the stored tensor, or a transposed view of an ``(in, out)`` one.

    Raises:
        PlanError: if ``stored`` does not have the shape the plan was made for.
    """
    if tuple(stored.shape) != change.stored_shape:
        raise PlanError(f"{change.weight} has shape {tuple(stored.shape)}, but the plan expects {change.stored_shape}")
    return stored.t() if change.layout == "in_out" else stored


def fc_to_conv_weight(weight: torch.Tensor, change: LayerChange) -> torch.Tensor:
    """Rearrange one FC weight ``(out, C*H*W)`` into the conv kernel ``(out, C, H, W)`` it equals.

    ``chw`` (PyTorch's flatten of an NCHW map) is a plain reshape. ``hwc`` (Keras/TensorFlow flatten
    of an NHWC map) reads the inputs as ``(H, W, C)``, so the kernel is reshaped that way and its axes
    permuted to ``(C, H, W)``. A weight stored ``(in, out)`` (``change.layout == "in_out"``) is
    transposed first. The result is contiguous; for ``chw`` from ``(out, in)`` it is a view of ``weight``.

    Args:
        weight: The FC weight as stored: ``(out_features, in_features)``, or the reverse for ``in_out``.
        change: The planned change for this layer (geometry, flatten order, layout).

    Returns:
        The conv kernel, same dtype.

    Raises:
        PlanError: if ``weight`` does not have the shape the plan was made for.
    """
    weight = fc_weight(change, weight)
    out, m = change.out_features, change.in_map
    if change.flatten_order == "hwc":
        kernel = weight.reshape(out, m.height, m.width, m.channels).permute(0, 3, 1, 2)
    else:
        kernel = weight.reshape(out, m.channels, m.height, m.width)
    return kernel.contiguous()


def rearranged_kernel(change: LayerChange, stored: np.ndarray) -> np.ndarray:
    """:func:`fc_to_conv_weight` on a numpy array of the weight as stored: the same moves, a new array.

    Only whole elements move, so any element type does (bfloat16 as its 16-bit patterns). The tests
    hold it to :func:`fc_to_conv_weight` byte for byte in every order and layout.

    Raises:
        PlanError: if ``stored`` does not have the shape the plan was made for.
    """
    return _rearranged(change, _weight_rows(change, stored))


def rearranged_rows(change: LayerChange, stored: np.ndarray, rows: int) -> Iterator[tuple[int, np.ndarray]]:
    """:func:`rearranged_kernel` ``rows`` output rows at a time: ``(first row, (n, C, H, W) array)`` pairs.

    A block of kernel rows is made from the same rows of the ``(out, in)`` weight alone, so a large
    kernel is never whole in memory.
    """
    weight = _weight_rows(change, stored)
    for start in range(0, change.out_features, max(1, rows)):
        yield start, _rearranged(change, weight[start : start + max(1, rows)])


def _weight_rows(change: LayerChange, stored: np.ndarray) -> np.ndarray:
    """The stored weight as ``(out, in)`` rows (a transposed view of an ``(in, out)`` one)."""
    if tuple(stored.shape) != change.stored_shape:
        raise PlanError(f"{change.weight} has shape {tuple(stored.shape)}, but the plan expects {change.stored_shape}")
    return stored.T if change.layout == "in_out" else stored


def _rearranged(change: LayerChange, rows: np.ndarray) -> np.ndarray:
    """Rows of the ``(out, in)`` weight as the same rows of the kernel, contiguous (the rule of fc_to_conv_weight)."""
    import numpy as np

    m = change.in_map
    if change.flatten_order == "hwc":
        kernel = rows.reshape(len(rows), m.height, m.width, m.channels).transpose(0, 3, 1, 2)
    else:
        kernel = rows.reshape(len(rows), m.channels, m.height, m.width)
    return np.ascontiguousarray(kernel)


def keeps_bytes(change: LayerChange) -> bool:
    """Whether :func:`fc_to_conv_weight` leaves the weight's bytes as they are (so a copy writes the kernel).

    A ``chw`` reshape and a 1x1 kernel (either order) only relabel the axes of a row-major ``(out, in)``
    weight; an ``hwc`` kernel over a map larger than 1x1, or a weight stored ``(in, out)``, moves bytes.
    Checked against the rule itself when the written kernel is proven (:func:`fc2conv.check.check_changes`).
    """
    if change.layout != "out_in":
        return False
    return change.flatten_order == "chw" or change.in_map.height * change.in_map.width == 1


def _iter_converted(plan: Plan, tensors: Mapping[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    for name in tensors:
        yield name, converted_tensor(plan, name, tensors[name])


def converted_info(plan: Plan, info: TensorInfo) -> TensorInfo:
    """``info`` as the plan writes it: a conv kernel's shape if it is a planned FC weight."""
    change = plan.change_for(info.name)
    return TensorInfo(info.name, change.new_shape, info.dtype) if change else info


def converted_tensor(plan: Plan, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as the plan writes it: a conv kernel if it is a planned FC weight, else unchanged."""
    change = plan.change_for(name)
    return fc_to_conv_weight(tensor, change) if change else tensor


def apply_plan(plan: Plan, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert ``state_dict`` as ``plan`` says; untouched tensors are the same objects as the input's.

    Converted kernels may share memory with the input weights (a ``chw`` reshape is a view);
    ``.clone()`` them if you will modify one side in place.
    """
    missing = [c.weight for c in plan.layers if c.weight not in state_dict]
    if missing:
        raise PlanError(f"the state dict has no {', '.join(missing)}, which the plan converts")
    return dict(_iter_converted(plan, state_dict))


def convert_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    input_shape: ShapeLike | None = None,
    flatten_order: FlattenOrder | None = None,
    layers: str | None = None,
) -> dict[str, torch.Tensor]:
    """Rewrite the FC chain of a state dict as convolution kernels.

    Args:
        state_dict: Tensor name -> tensor, e.g. ``model.state_dict()``.
        input_shape: The feature map flattened into the first FC layer (``"256x4x4"``,
            ``(256, 4, 4)``, a partial ``"4x4"`` or ``"256"``); ``None`` infers it.
        flatten_order: ``"chw"`` for PyTorch models, ``"hwc"`` for weights from channels-last frameworks.
        layers: Optional regex restricting which FC layers may be converted.

    Returns:
        A new dict with the same names: the chain's weights as kernels, everything else as it was.

    Example:
        >>> import torch
        >>> sd = {"fc1.weight": torch.randn(1024, 4096), "fc2.weight": torch.randn(10, 1024)}
        >>> {k: tuple(v.shape) for k, v in convert_state_dict(sd, "256x4x4").items()}
        {'fc1.weight': (1024, 256, 4, 4), 'fc2.weight': (10, 1024, 1, 1)}
    """
    plan = plan_conversion(tensor_infos(state_dict), input_shape, flatten_order, layers)
    return apply_plan(plan, state_dict)
