"""Fuzzing: random and mutated inputs never fail with anything but fc2conv's documented errors.

Bounded for CI; a long run:

    FC2CONV_FUZZ_EXAMPLES=20000 python -m pytest tests/test_fuzz.py
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fc2conv import convert_file, open_source, read_listing
from fc2conv.errors import Fc2ConvError, PlanError, ShapeError
from fc2conv.plan import plan_conversion
from fc2conv.shapes import parse_shape
from fc2conv.types import FLOAT_DTYPES, TensorInfo
from tests.conftest import SAMPLES

EXAMPLES = int(os.environ.get("FC2CONV_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

REAL_PT = (SAMPLES / "small_cnn.pt").read_bytes()
REAL_ST = (SAMPLES / "channels_last_head.safetensors").read_bytes()


@FUZZ
@given(st.text(alphabet="0123456789xX,*× -.eE+abc\t", max_size=24) | st.text(max_size=24))
def test_shape_parser(text):
    try:
        spec = parse_shape(text)
    except ShapeError as exc:
        assert str(exc)
        return
    assert all(v is None or (isinstance(v, int) and v >= 1) for v in spec.parts())


def _mutate(data: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    buffer = bytearray(data)
    for position, value in edits:
        buffer[position % len(buffer)] = value
    return bytes(buffer[:cut] if cut is not None else buffer)


def _load_everything(path: Path) -> None:
    """Load, then touch every tensor (what convert does); only fc2conv errors may escape."""
    checkpoint = open_source(path)
    for name in checkpoint.tensors:
        tensor = checkpoint.tensors[name]
        tensor.reshape(-1)[:1].tolist()


# Positions anywhere, but mostly where the structure is: headers at the start, a zip's directory at the end.
positions = st.integers(0, 2048) | st.integers(-2048, -1) | st.integers(0, 2**31)
edits = st.lists(st.tuples(positions, st.integers(0, 255)), min_size=1, max_size=8)


@FUZZ
@given(edits=edits, cut=st.none() | st.integers(0, len(REAL_PT)))
def test_mutated_torch_checkpoints(tmp_path_factory, edits, cut):
    path = tmp_path_factory.mktemp("pt") / "m.pt"
    path.write_bytes(_mutate(REAL_PT, edits, cut))
    try:
        _load_everything(path)
    except Fc2ConvError:
        pass


@FUZZ
@given(edits=edits, cut=st.none() | st.integers(0, len(REAL_ST)))
def test_mutated_safetensors(tmp_path_factory, edits, cut):
    path = tmp_path_factory.mktemp("st") / "m.safetensors"
    path.write_bytes(_mutate(REAL_ST, edits, cut))
    try:
        read_listing(path)
        _load_everything(path)
    except Fc2ConvError:
        pass


@FUZZ
@given(data=st.binary(max_size=512), suffix=st.sampled_from([".pt", ".safetensors", ".bin"]))
def test_random_bytes(tmp_path_factory, data, suffix):
    path = tmp_path_factory.mktemp("rnd") / f"r{suffix}"
    path.write_bytes(data)
    try:
        _load_everything(path)
    except Fc2ConvError:
        pass


@settings(
    max_examples=max(10, EXAMPLES // 5), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(edits=edits)
def test_mutated_checkpoint_through_the_whole_conversion(tmp_path_factory, edits):
    folder = tmp_path_factory.mktemp("conv")
    source = folder / "m.pt"
    source.write_bytes(_mutate(REAL_PT, edits, None))
    try:
        result = convert_file(source, folder / "o.safetensors", input_shape="32x4x4")
    except Fc2ConvError:
        assert sorted(p.name for p in folder.iterdir()) == ["m.pt"]
        return
    assert result.written == (folder / "o.safetensors").exists()


names = st.sampled_from(["fc", "fc1", "fc2", "head.0", "head.1", "conv", "features.3", "bn", "embed", "x.y.z", ""])
leaves = st.sampled_from(["weight", "bias", "running_mean", "running_var", "scale"])
dtypes = st.sampled_from([*FLOAT_DTYPES, "int8", "int64", "bool", "complex64", "uint8"])
shapes = st.lists(st.integers(0, 70), max_size=5).map(tuple)
infos = st.lists(
    st.builds(lambda n, leaf, s, d: TensorInfo(f"{n}.{leaf}" if n else leaf, s, d), names, leaves, shapes, dtypes),
    max_size=12,
    unique_by=lambda i: i.name,
)
specs = st.none() | st.sampled_from(["8x3x3", "4x4", "16", "1", "72", "2x6x6", "5x1x7"])


@FUZZ
@given(infos=infos, spec=specs, order=st.sampled_from(["chw", "hwc"]), layers=st.none() | st.sampled_from(["fc", "^x"]))
def test_chain_finder_on_random_state_dicts(infos, spec, order, layers):
    try:
        plan = plan_conversion(infos, spec, order, layers)
    except (PlanError, ShapeError) as exc:
        assert str(exc)
        return
    by_name = {i.name: i for i in infos}
    assert plan.layers
    for change in plan.layers:
        weight = by_name[change.weight]
        assert weight.dtype in FLOAT_DTYPES and len(weight.shape) == 2
        out, c, h, w = change.new_shape
        assert (out, c * h * w) == weight.shape
    assert plan.layers[0].in_map == plan.input_shape
    for previous, current in zip(plan.layers, plan.layers[1:], strict=False):
        assert current.old_shape[1] == previous.old_shape[0]
    assert set(plan.untouched) | {c.weight for c in plan.layers} == set(by_name)


@pytest.mark.parametrize("mode", ["empty", "header-only"])
def test_degenerate_safetensors(tmp_path, mode):
    path = tmp_path / "d.safetensors"
    path.write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}" if mode == "empty" else REAL_ST[: 8 + 16])
    with pytest.raises(Fc2ConvError):
        _load_everything(path)
        plan_conversion(open_source(path).infos)
