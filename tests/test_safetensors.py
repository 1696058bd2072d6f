"""Safetensors: header validation before any allocation, header-only listings, the streaming writer."""

from __future__ import annotations

import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

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
