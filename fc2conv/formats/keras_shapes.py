"""The shape a Keras layer reads, from the config alone: as Keras recorded it, or computed forward.

Where the config records no input shape for a layer (tf.keras 2 files, layers after the first), the
shape is computed from the nearest recorded one upstream with Keras's own ``compute_output_shape``
rules, written here for the layers a conv trunk is made of (convolutions, pooling, padding, cropping,
upsampling and shape-preserving layers). A layer with no rule here stops the computation: the shape
is then unknown, never guessed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from fc2conv.formats.keras_config import MERGE, PASS_THROUGH, SPATIAL_2D, ConfigLayer, Shape

__all__ = ["input_shape_of", "output_shape"]


def input_shape_of(layer: ConfigLayer, layers: Mapping[str, ConfigLayer]) -> tuple[Shape | None, str]:
    """The shape ``layer`` reads (batch first), and how it is known; ``(None, why not)`` if it is not.

    Args:
        layer: The layer.
        layers: Every layer of the model by qualified name, to walk back through its inputs.
    """
    if layer.recorded_shape is not None:
        if layer.shape_from_build_config:
            return layer.recorded_shape, "as its build config records"
        return layer.recorded_shape, "as the config records its input"
    if not layer.inputs:
        return None, "nothing feeds it"
    # Walk back to a layer whose input shape is recorded, then apply the shape rules forward.
    trail = [layers[layer.inputs[0]]]
    while trail[-1].recorded_shape is None:
        if not trail[-1].inputs or len(trail) > len(layers):
            return None, f"no input shape is recorded upstream of {trail[-1].name}"
        trail.append(layers[trail[-1].inputs[0]])
    shape: Shape | None = trail[-1].recorded_shape
    for upstream in reversed(trail):
        assert shape is not None
        try:
            shape = output_shape(upstream, shape)
        except (ValueError, TypeError, KeyError) as exc:
            return None, f"{upstream.name} ({upstream.class_name}) has a config fc2conv cannot follow ({exc})"
        if shape is None:
            return None, f"{upstream.name} ({upstream.class_name}) has no shape rule in fc2conv and no recorded shape"
    computed = [upstream.name for upstream in reversed(trail) if upstream.class_name != "InputLayer"]
    through = f" through {', '.join(computed)}" if computed else ""
    return shape, f"computed from the input shape{through}"


def output_shape(layer: ConfigLayer, shape: Shape) -> Shape | None:
    """Keras's ``compute_output_shape`` of ``layer`` on ``shape``; None for a layer with no rule here.

    Raises:
        ValueError, TypeError, KeyError: the layer's config holds sizes this rule cannot read.
    """
    cls = layer.class_name
    if cls == "InputLayer" or cls in PASS_THROUGH or cls in MERGE:
        return shape
    if cls == "Flatten":
        rest = shape[1:]
        return (shape[0], None if any(d is None for d in rest) else math.prod(rest))  # type: ignore[arg-type]
    if cls in SPATIAL_2D and len(shape) == 4:
        return _map_output_shape(layer, shape)
    return None


def _map_output_shape(layer: ConfigLayer, shape: Shape) -> Shape | None:
    """A 2-D layer's output on an (N, H, W, C) or (N, C, H, W) map, as its ``data_format`` says."""
    cls, config = layer.class_name, layer.config
    channels_last = layer.data_format == "channels_last"
    n, (h, w), c = (shape[0], shape[1:3], shape[3]) if channels_last else (shape[0], shape[2:4], shape[1])
    if cls in ("Conv2D", "DepthwiseConv2D", "SeparableConv2D"):
        h, w = _windowed(h, w, config.get("kernel_size"), config.get("strides"), config.get("dilation_rate"), config)
        if cls == "DepthwiseConv2D":
            c = None if c is None else c * int(config.get("depth_multiplier", 1))
        else:
            c = int(config["filters"])
    elif cls in ("MaxPooling2D", "AveragePooling2D"):
        pool = _pair(config.get("pool_size"), 2)
        h, w = _windowed(h, w, pool, config.get("strides") or pool, None, config)
    elif cls in ("ZeroPadding2D", "Cropping2D"):
        padded = cls == "ZeroPadding2D"
        amounts = config.get("padding", 1) if padded else config.get("cropping", 0)
        (top, bottom), (left, right) = _padding_pairs(amounts)
        sign = 1 if padded else -1
        h = None if h is None else h + sign * (top + bottom)
        w = None if w is None else w + sign * (left + right)
    elif cls == "UpSampling2D":
        size = _pair(config.get("size"), 2)
        h = None if h is None else h * size[0]
        w = None if w is None else w * size[1]
    elif cls != "SpatialDropout2D":  # SpatialDropout2D keeps the shape; the others have no rule here
        return None
    return (n, h, w, c) if channels_last else (n, c, h, w)


def _windowed(
    h: int | None, w: int | None, kernel: Any, strides: Any, dilation: Any, config: Mapping[str, Any]
) -> tuple[int | None, int | None]:
    """H and W after a sliding window (a convolution or a pooling) with the layer's padding."""
    kernel_hw, stride_hw, dilation_hw = _pair(kernel, 1), _pair(strides, 1), _pair(dilation, 1)
    padding = str(config.get("padding", "valid")).lower()
    return (
        _spatial_out(h, kernel_hw[0], stride_hw[0], dilation_hw[0], padding),
        _spatial_out(w, kernel_hw[1], stride_hw[1], dilation_hw[1], padding),
    )


def _spatial_out(size: int | None, kernel: int, stride: int, dilation: int, padding: str) -> int | None:
    if size is None:
        return None
    if padding == "same":
        return -(-size // stride)
    if padding == "valid":
        return (size - dilation * (kernel - 1) - 1) // stride + 1
    raise ValueError(f"padding {padding!r}")


def _pair(value: Any, default: int) -> tuple[int, int]:
    """A size Keras lets be one int or two: ``3`` or ``(3, 3)``; ``default`` for both when absent."""
    if value is None:
        return (default, default)
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return (int(value[0]), int(value[1]))
    raise ValueError(f"not a pair of sizes: {value!r}")


def _padding_pairs(value: Any) -> tuple[tuple[int, int], tuple[int, int]]:
    """ZeroPadding2D / Cropping2D: ``1``, ``(1, 2)`` or ``((top, bottom), (left, right))``."""
    if isinstance(value, int):
        return ((value, value), (value, value))
    if isinstance(value, (list, tuple)) and len(value) == 2:
        first, second = value
        if isinstance(first, int) and isinstance(second, int):
            return ((first, first), (second, second))
        return (_pair(first, 0), _pair(second, 0))
    raise ValueError(f"not a padding: {value!r}")
