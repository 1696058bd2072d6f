"""Safetensors: header validation before any allocation, header-only listings, the streaming writer."""

from __future__ import annotations

import os
import struct
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from fc2conv.diskio import ByteSpan
from fc2conv.errors import CheckpointError, OutputError
from fc2conv.formats import read_listing
from fc2conv.formats.safetensors import read_safetensors_header, write_safetensors
from fc2conv.types import TensorInfo
from tests.conftest import st_bytes


@pytest.mark.parametrize(
    "blob, fragment",
    [
        (b"\x01\x00", "too short"),
        (struct.pack("<Q", 10**9) + b"{}", "past the end"),
        (struct.pack("<Q", 4) + b"nope", "not valid JSON"),
        (
            st_bytes({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 16]}}, b"\0" * 8),
            "outside the 8-byte data section",
        ),
        (st_bytes({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 8), "needs 8 bytes"),
        (st_bytes({"a": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8), "unknown dtype"),
        (
            st_bytes({"a": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 8]}}, b"\0" * 8),
            "needs",
        ),
        (
            st_bytes(
                {
                    "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                    "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
                },
                b"\0" * 12,
            ),
            "overlap",
        ),
        (
            struct.pack("<Q", 120)
            + b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
            b'"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}'.ljust(120)
            + b"\0" * 8,
            "duplicate",
        ),
    ],
)
def test_bad_safetensors_headers_are_refused_before_any_allocation(tmp_path, blob, fragment):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(blob)
    with pytest.raises(CheckpointError, match=fragment):
        read_safetensors_header(path)


def test_header_only_read_of_safetensors(tmp_path):
    save_file(
        {
            "b.weight": torch.zeros(2, 3),
            "a.weight": torch.zeros(4, dtype=torch.float16),
            "layer.10.w": torch.zeros(1),
            "layer.2.w": torch.zeros(1),
        },
        str(tmp_path / "m.safetensors"),
        metadata={"k": "v"},
    )
    listing = read_listing(tmp_path / "m.safetensors")
    infos, metadata, notes = listing.infos, listing.metadata, listing.notes
    assert [i.name for i in infos] == ["a.weight", "b.weight", "layer.2.w", "layer.10.w"]
    assert infos[0] == TensorInfo("a.weight", (4,), "float16")
    assert metadata == {"k": "v"} and "name order" in notes[0]


@pytest.mark.parametrize(
    "dtype",
    [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int8, torch.uint8, torch.bool],
)
def test_streamed_writer_matches_safetensors_reader(tmp_path, dtype):
    tensors = {
        "k": (torch.randn(5, 3, 2, 2) * 10).to(dtype),
        "empty": torch.zeros(0, 4).to(dtype),
        "scalar": torch.tensor(3).to(dtype),
        "t": torch.randn(4, 6).t().to(dtype),
    }  # non-contiguous
    infos = [TensorInfo(k, tuple(v.shape), str(v.dtype)[6:]) for k, v in tensors.items()]
    path = tmp_path / "out.safetensors"
    size = write_safetensors(path, infos, tensors.__getitem__, {"format": "pt", "x": "1"})
    assert size == path.stat().st_size
    loaded = load_file(str(path))
    for name, tensor in tensors.items():
        assert loaded[name].dtype == dtype and torch.equal(loaded[name], tensor)
    assert read_safetensors_header(path).metadata == {"format": "pt", "x": "1"}


def test_writer_refuses_a_tensor_that_is_not_as_declared(tmp_path):
    with pytest.raises(OutputError, match="declared float32"):
        write_safetensors(tmp_path / "o.safetensors", [TensorInfo("a", (2,), "float32")], lambda name: torch.zeros(3))


def _raw_file(path, pieces):
    """A file holding random bytes at the given offsets: ``{name: (offset, nbytes)}`` -> the bytes written."""
    generator = torch.Generator().manual_seed(3)
    size = max(offset + nbytes for offset, nbytes in pieces.values())
    data = bytearray(torch.randint(0, 256, (size,), dtype=torch.uint8, generator=generator).numpy().tobytes())
    path.write_bytes(data)
    return {name: bytes(data[offset : offset + nbytes]) for name, (offset, nbytes) in pieces.items()}


def test_copied_tensors_are_written_in_the_input_order_keeping_their_place_in_the_page(tmp_path):
    """Bytes copied from an input lie at the same offset within a page as there (the kernel copies them
    faster): the header is padded with spaces, which safetensors allows."""
    source = tmp_path / "raw.bin"
    pieces = {"small": (24, 8192), "big": (10_000, 2**20), "tail": (2_000_000, 100)}
    expected = _raw_file(source, pieces)
    spans = {name: ByteSpan(source, offset, nbytes) for name, (offset, nbytes) in pieces.items()}
    infos = [TensorInfo(name, (nbytes // 4,), "float32") for name, (_, nbytes) in pieces.items()]
    out = tmp_path / "out.safetensors"
    write_safetensors(out, infos[::-1], _no_fetch, {"note": "x" * 37}, spans=spans)
    header = read_safetensors_header(out)
    assert header.data_start % 8 == 0
    written = header.spans(out)
    assert sorted(written, key=lambda name: written[name].offset) == ["small", "big", "tail"]  # the input's order
    assert written["big"].offset % 4096 == pieces["big"][0] % 4096  # the most bytes keep their page offset
    loaded = load_file(str(out))
    for name, data in expected.items():
        assert loaded[name].numpy().tobytes() == data


def test_the_header_is_padded_to_8_bytes_when_no_page_offset_can_be_kept(tmp_path):
    source = tmp_path / "raw.bin"
    pieces = {"odd": (1001, 4096), "other": (8191, 4000)}  # neither keeps the data section 8-byte aligned
    expected = _raw_file(source, pieces)
    spans = {name: ByteSpan(source, offset, nbytes) for name, (offset, nbytes) in pieces.items()}
    infos = [TensorInfo(name, (nbytes,), "uint8") for name, (_, nbytes) in pieces.items()]
    out = tmp_path / "out.safetensors"
    write_safetensors(out, infos, _no_fetch, spans=spans)
    header = read_safetensors_header(out)
    raw_length = len(out.read_bytes()[8 : header.data_start].rstrip(b" "))
    assert header.data_start % 8 == 0 and header.data_start - 8 - raw_length < 8
    assert {name: t.numpy().tobytes() for name, t in load_file(str(out)).items()} == expected


def test_the_writer_leaves_no_descriptor_open(tmp_path):
    """The writeback helper has a descriptor of its own, closed once its queue is done."""
    source = tmp_path / "raw.bin"
    pieces = {f"t{i}": (i * 3 * 2**20, 3 * 2**20) for i in range(4)}
    _raw_file(source, pieces)
    spans = {name: ByteSpan(source, offset, nbytes) for name, (offset, nbytes) in pieces.items()}
    infos = [TensorInfo(name, (nbytes,), "uint8") for name, (_, nbytes) in pieces.items()]
    before = set(os.listdir("/proc/self/fd"))
    for attempt in range(3):
        write_safetensors(tmp_path / f"out{attempt}.safetensors", infos, _no_fetch, spans=spans, sync=False)
    deadline = time.monotonic() + 10
    while set(os.listdir("/proc/self/fd")) - before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not set(os.listdir("/proc/self/fd")) - before


def _no_fetch(name):
    raise AssertionError(f"{name} was to be copied from its span, not fetched")


def test_the_writer_takes_numpy_arrays_of_the_elements_bits(tmp_path):
    """A kernel rearranged with numpy is written from its array (bfloat16 as uint16 bits); one that is not as
    declared is refused before anything is written."""
    tensors = {"k": torch.randn(4, 3, 2, 2).to(torch.bfloat16), "b": torch.randn(4)}
    arrays = {"k": tensors["k"].view(torch.int16).numpy(), "b": tensors["b"].numpy()}
    infos = [TensorInfo("k", (4, 3, 2, 2), "bfloat16"), TensorInfo("b", (4,), "float32")]
    write_safetensors(tmp_path / "a.safetensors", infos, arrays.__getitem__)
    loaded = load_file(str(tmp_path / "a.safetensors"))
    assert all(torch.equal(loaded[name], tensor) for name, tensor in tensors.items())
    with pytest.raises(OutputError, match="declared bfloat16"):
        write_safetensors(tmp_path / "b.safetensors", infos, {"k": arrays["k"][:2], "b": arrays["b"]}.__getitem__)
    with pytest.raises(OutputError, match="declared float32"):
        write_safetensors(tmp_path / "c.safetensors", infos, {"k": arrays["k"], "b": arrays["b"][::2]}.__getitem__)
