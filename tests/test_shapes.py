"""Parsing and resolving the flattened feature map's geometry."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fc2conv.errors import ShapeError
from fc2conv.shapes import as_spec, parse_shape, resolve_shape, square_map
from fc2conv.types import InputShape, ShapeSpec


@pytest.mark.parametrize(
    "text, parts",
    [
        ("256x4x4", (256, 4, 4)),
        ("256,4,4", (256, 4, 4)),
        (" 256 x 4 x 4 ", (256, 4, 4)),
        ("256X4X4", (256, 4, 4)),
        ("512x7x7", (512, 7, 7)),
        ("8x3x5", (8, 3, 5)),
        ("4x4", (None, 4, 4)),
        ("4,5", (None, 4, 5)),
        ("256", (256, None, None)),
    ],
)
def test_parse_accepts_full_and_partial_forms(text, parts):
    assert parse_shape(text).parts() == parts


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("", "empty"),
        ("0x4x4", "at least 1"),
        ("-4x4x4", "'-4' is not a positive whole number"),
        ("4xfourx4", "'four' is not a positive whole number"),
        ("4x4x4x4x4", "has 5 parts"),
        ("1e3x2x2", "'1e3' is not a positive whole number"),
        ("2.5x2x2", "'2.5'"),
        ("x4x4", "has an empty part"),
        ("32x4x4x", "has an empty part"),
        ("4xx4", "has an empty part"),
        ("x", "has an empty part"),
        (",", "has an empty part"),
    ],
)
def test_parse_rejects_bad_shapes_with_a_reason(text, fragment):
    with pytest.raises(ShapeError, match=None) as info:
        parse_shape(text)
    assert fragment in str(info.value)


def test_resolve_complete_shape_shows_the_arithmetic_when_it_does_not_fit():
    with pytest.raises(ShapeError) as info:
        resolve_shape(parse_shape("256x4x5"), 4096, "fc1")
    assert str(info.value) == "fc1 takes 4096 inputs; 256x4x5 = 5120"


def test_resolve_partial_hw_takes_channels_from_in_features():
    assert resolve_shape(parse_shape("4x4"), 4096, "fc1") == InputShape(256, 4, 4)
    with pytest.raises(ShapeError, match="not a multiple of 5x5 = 25"):
        resolve_shape(parse_shape("5x5"), 4096, "fc1")


def test_resolve_partial_channels_assumes_a_square_map():
    assert resolve_shape(parse_shape("512"), 25088, "fc6") == InputShape(512, 7, 7)
    with pytest.raises(ShapeError, match="H\\*W = 98 is not a square") as info:
        resolve_shape(parse_shape("256"), 25088, "fc6")
    assert "256x7x14" in str(info.value)  # a hint with a factorisation that fits


def test_square_map_needs_a_multiple():
    with pytest.raises(ShapeError, match="not a multiple of C = 3"):
        square_map(3, 100, "fc")


def test_as_spec_accepts_every_public_form():
    expected = (256, 4, 4)
    for value in ["256x4x4", (256, 4, 4), InputShape(256, 4, 4), ShapeSpec(256, 4, 4)]:
        assert as_spec(value).parts() == expected
    assert as_spec(None) is None


@given(st.integers(1, 2048), st.integers(1, 64), st.integers(1, 64), st.sampled_from(["x", ",", " x "]))
def test_parse_then_resolve_round_trips(c, h, w, sep):
    spec = parse_shape(sep.join(map(str, (c, h, w))))
    shape = resolve_shape(spec, c * h * w, "fc")
    assert shape == InputShape(c, h, w)
    assert shape.features == c * h * w
    assert parse_shape(str(shape)).parts() == (c, h, w)


@given(st.text(max_size=20))
def test_parse_never_fails_with_anything_but_shape_error(text):
    try:
        spec = parse_shape(text)
    except ShapeError:
        return
    assert all(v is None or v >= 1 for v in spec.parts())
