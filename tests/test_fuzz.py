"""Fuzzing: random and mutated inputs never fail with anything but fc2conv's documented errors.

Bounded for CI; a long run:

    FC2CONV_FUZZ_EXAMPLES=20000 python -m pytest tests/test_fuzz.py
"""

from __future__ import annotations

import math
import os
import random
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from fc2conv import convert_file, open_source, read_listing
from fc2conv.check import tensors_identical
from fc2conv.diskio import ByteSpan
from fc2conv.errors import Fc2ConvError, PlanError, ShapeError
from fc2conv.formats.safetensors import read_safetensors_header, write_safetensors
from fc2conv.plan import plan_conversion
from fc2conv.shapes import parse_shape
from fc2conv.types import FLOAT_DTYPES, TensorInfo, dtype_name
from tests.conftest import SAMPLES, st_bytes, st_entry

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
@example(edits=[(0, 99), (103, 128)], cut=120)  # a pickle string that is not UTF-8 (found by this test)
def test_mutated_torch_checkpoints(tmp_path_factory, edits, cut):
    path = tmp_path_factory.mktemp("pt") / "m.pt"
    path.write_bytes(_mutate(REAL_PT, edits, cut))
    try:
        _load_everything(path)
    except Fc2ConvError:
        pass


def _read_by_safetensors(path: Path) -> dict[str, torch.Tensor] | None:
    """What safetensors' own reader makes of the file, or None if it refuses it."""
    try:
        with safe_open(str(path), "pt") as f:
            return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except Exception:  # noqa: BLE001 - its errors are its own types
        return None


def _read_by_fc2conv(path: Path) -> dict[str, torch.Tensor] | None:
    """What fc2conv makes of the file (listing and tensors, which must agree), or None if it refuses it."""
    try:
        listing = read_listing(path)
        source = open_source(path)
        tensors = {name: source.tensors[name] for name in source.tensors}
    except Fc2ConvError:
        return None
    assert [i.name for i in listing.infos] == list(tensors)
    for info in listing.infos:
        assert (tuple(tensors[info.name].shape), dtype_name(tensors[info.name].dtype)) == (info.shape, info.dtype)
    return tensors


def _assert_same_reading(path: Path) -> None:
    """fc2conv reads what safetensors reads, value for value; it may refuse more (duplicate names), never less."""
    ours, theirs = _read_by_fc2conv(path), _read_by_safetensors(path)
    if theirs is None:
        assert ours is None, "fc2conv read a file that safetensors refuses"
    if ours is None or theirs is None:
        return
    assert sorted(ours) == sorted(theirs)
    for name, tensor in theirs.items():
        assert tensors_identical(ours[name], tensor), name


@FUZZ
@given(edits=edits, cut=st.none() | st.integers(0, len(REAL_ST)))
def test_mutated_safetensors(tmp_path_factory, edits, cut):
    path = tmp_path_factory.mktemp("st") / "m.safetensors"
    path.write_bytes(_mutate(REAL_ST, edits, cut))
    _assert_same_reading(path)


_ITEMSIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I8": 1, "U8": 1, "BOOL": 1}


@st.composite
def _safetensors_files(draw: st.DrawFn) -> bytes:
    """Headers near the valid ones: right or slightly wrong offsets, sizes, dtypes and lengths."""
    count = draw(st.integers(0, 4))
    names = draw(
        st.lists(st.sampled_from(["a", "b", "fc.weight", "x.y", ""]), min_size=count, max_size=count, unique=True)
    )
    header, offset = {}, 0
    for name in names:
        dtype = draw(st.sampled_from([*_ITEMSIZES, "F13"]))
        shape = draw(st.lists(st.integers(0, 3), max_size=3))
        size = _ITEMSIZES.get(dtype, 4) * math.prod(shape)
        start = offset + draw(st.sampled_from([0] * 12 + [1, -1]))  # mostly right, sometimes off by one
        stop = start + size + draw(st.sampled_from([0] * 12 + [1, -2]))
        header[name] = st_entry(dtype, tuple(shape), (start, stop))
        offset = max(offset, stop)
    data = draw(
        st.binary(min_size=offset, max_size=offset) | st.binary(min_size=max(0, offset - 2), max_size=offset + 2)
    )
    length = draw(st.sampled_from([None] * 12 + [0, 7, 9, 300]))  # the header length, sometimes a lie
    return st_bytes(header, data, length=length)


@FUZZ
@given(blob=_safetensors_files())
def test_safetensors_headers_read_as_safetensors_reads_them(tmp_path_factory, blob):
    path = tmp_path_factory.mktemp("hdr") / "h.safetensors"
    path.write_bytes(blob)
    _assert_same_reading(path)


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
@example(edits=[(-43, 129)])  # a central directory whose header offset does not fit a seek (found by this test)
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


@FUZZ
@given(
    pieces=st.lists(
        st.tuples(st.integers(0, 9000), st.integers(0, 3000), st.sampled_from([1, 2, 4, 8])), min_size=1, max_size=6
    ),
    order=st.randoms(use_true_random=False),
    note=st.text(max_size=40),
)
def test_the_writer_copies_any_spans_into_a_file_safetensors_reads(tmp_path_factory, pieces, order, note):
    """Spans anywhere in an input (any gaps, any order, any itemsize): the written file reads back, with
    safetensors' own reader, as exactly their bytes; its data starts 8-byte aligned after at most a page
    of padding; copied tensors lie in the input's order."""
    folder = tmp_path_factory.mktemp("spans")
    source = folder / "raw.bin"
    offsets, position = [], 0
    for gap, count, itemsize in pieces:
        position += gap
        offsets.append((position, count * itemsize))
        position += count * itemsize
    data = random.Random(position).randbytes(position)
    source.write_bytes(data)
    dtypes = {1: "uint8", 2: "float16", 4: "float32", 8: "float64"}
    infos = [
        TensorInfo(f"t{i}", (count,), dtypes[itemsize]) for i, (_, count, itemsize) in enumerate(pieces)
    ]  # fmt: skip
    spans = {f"t{i}": ByteSpan(source, offset, nbytes) for i, (offset, nbytes) in enumerate(offsets)}
    shuffled = list(infos)
    order.shuffle(shuffled)
    out = folder / "out.safetensors"
    write_safetensors(out, shuffled, _never_fetched, {"note": note}, spans=spans)
    header = read_safetensors_header(out)
    unpadded = len(out.read_bytes()[8 : header.data_start].rstrip(b" "))
    assert header.data_start % 8 == 0 and header.data_start - 8 - unpadded < 4096 + 8
    with safe_open(str(out), "numpy") as f:
        for name, (offset, nbytes) in zip(spans, offsets, strict=True):
            assert f.get_tensor(name).tobytes() == data[offset : offset + nbytes]
    written = header.spans(out)
    nonempty = [name for name in spans if spans[name].nbytes]  # their input offsets differ
    assert sorted(nonempty, key=lambda n: written[n].offset) == sorted(nonempty, key=lambda n: spans[n].offset)


def _never_fetched(name):
    raise AssertionError(f"{name} was to be copied from its span")
