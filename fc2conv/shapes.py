"""Parse and resolve the geometry of the feature map that is flattened into the first FC layer."""

from __future__ import annotations

import math
import re

from fc2conv.errors import ShapeError
from fc2conv.types import InputShape, ShapeLike, ShapeSpec

__all__ = ["as_spec", "parse_shape", "resolve_shape", "square_map"]

# No layer has 10^18 inputs: a longer part is a mistake (or an attack on int()), refused with its length.
_MAX_DIGITS = 18
_SEPARATORS = re.compile(r"\s*[xX,×*]\s*|\s+")


def parse_shape(text: str) -> ShapeSpec:
    """Parse ``"256x4x4"``, ``"256,4,4"``, ``"4x4"`` (H x W) or ``"256"`` (C) into a :class:`ShapeSpec`.

    Args:
        text: The shape as typed by a user.

    Returns:
        A spec; parts not given are ``None``.

    Raises:
        ShapeError: if a part is not a positive whole number, or there are more than three parts.

    Example:
        >>> parse_shape("256x4x4")
        ShapeSpec(channels=256, height=4, width=4, text='256x4x4')
    """
    stripped = text.strip()
    if not stripped:
        raise ShapeError("input shape is empty; expected CxHxW such as 256x4x4")
    pieces = _SEPARATORS.split(stripped)
    if "" in pieces:  # "x4x4", "32x4x4x", "4xx4": a part is missing, so the shape is not what was meant
        raise ShapeError(f"input shape {text!r} has an empty part; expected CxHxW such as 256x4x4")
    if len(pieces) > 3:
        raise ShapeError(
            f"input shape {text!r} has {len(pieces)} parts; expected CxHxW (256x4x4), HxW (4x4) or C (256)"
        )
    numbers: list[int] = []
    for piece in pieces:
        if not re.fullmatch(r"[0-9]+", piece):
            raise ShapeError(
                f"input shape {text!r}: {piece!r} is not a positive whole number; expected CxHxW such as 256x4x4"
            )
        if len(piece.lstrip("0")) > _MAX_DIGITS:  # int() of a 5000-digit part would raise (and be slow)
            raise ShapeError(f"input shape: a part of {len(piece)} digits is too large (at most {_MAX_DIGITS} digits)")
        value = int(piece)
        if value <= 0:
            raise ShapeError(f"input shape {text!r}: every part must be at least 1, got {value}")
        numbers.append(value)
    if len(numbers) == 3:
        return ShapeSpec(numbers[0], numbers[1], numbers[2], text=stripped)
    if len(numbers) == 2:
        return ShapeSpec(None, numbers[0], numbers[1], text=stripped)
    return ShapeSpec(numbers[0], None, None, text=stripped)


def resolve_shape(spec: ShapeSpec, in_features: int, layer: str) -> InputShape:
    """Fill in the open parts of ``spec`` so that ``C * H * W == in_features``.

    Args:
        spec: Parsed user input (possibly partial).
        in_features: Number of inputs of the first FC layer.
        layer: Name of that layer, used in error messages.

    Returns:
        The complete geometry.

    Raises:
        ShapeError: with the arithmetic, when no geometry fits.
    """
    c, h, w = spec.parts()
    if c is not None and h is not None and w is not None:
        if c * h * w != in_features:
            raise ShapeError(f"{layer} takes {in_features} inputs; {c}x{h}x{w} = {c * h * w}")
        return InputShape(c, h, w)
    if c is None:
        assert h is not None and w is not None
        if in_features % (h * w):
            raise ShapeError(
                f"{layer} takes {in_features} inputs, which is not a multiple of "
                f"{h}x{w} = {h * w} (C = {in_features} / {h * w} = {in_features / (h * w):g})"
            )
        return InputShape(in_features // (h * w), h, w)
    return square_map(c, in_features, layer)


def square_map(channels: int, in_features: int, layer: str) -> InputShape:
    """The square ``channels x S x S`` map that flattens to ``in_features``, or a ShapeError saying why not."""
    if in_features % channels:
        raise ShapeError(
            f"{layer} takes {in_features} inputs, which is not a multiple of C = {channels} "
            f"({in_features} / {channels} = {in_features / channels:g})"
        )
    area = in_features // channels
    side = math.isqrt(area)
    if side * side != area:
        options = " or ".join(f"{channels}x{h}x{area // h}" for h in _near_square_factors(area))
        raise ShapeError(
            f"{layer} takes {in_features} inputs = {channels} x {area}, and H*W = {area} is not a square; "
            f"maps that fit: {options}",
            remedy="input_shape",
        )
    return InputShape(channels, side, side)


def _near_square_factors(area: int, count: int = 2) -> list[int]:
    """Heights H dividing ``area``, closest to a square map first (for hints)."""
    heights = [h for h in range(1, area + 1) if area % h == 0] if area <= 10**6 else [1]
    return sorted(heights, key=lambda h: (abs(h - area // h), h))[:count]


def as_spec(value: ShapeLike | None) -> ShapeSpec | None:
    """Accept the forms the public API takes for an input shape: text, tuple, InputShape or spec."""
    if value is None or isinstance(value, ShapeSpec):
        return value
    if isinstance(value, InputShape):
        return ShapeSpec(value.channels, value.height, value.width, text=str(value))
    if isinstance(value, str):
        return parse_shape(value)
    return parse_shape("x".join(str(v) for v in value))
