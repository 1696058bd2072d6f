"""Loading (weights only, wrappers, prefixes, formats) and atomic, streamed safetensors writing."""

from __future__ import annotations

import json
import os
import pickle
import struct
from collections import OrderedDict

import pytest
import torch
from safetensors.torch import load_file, save_file

from fc2conv.errors import CheckpointError, OutputError
from fc2conv.io import (
    atomic_output,
    load_checkpoint,
    read_safetensors_header,
    read_tensor_infos,
    save_safetensors,
    write_safetensors,
)
from fc2conv.plan import TensorInfo

SD = OrderedDict(w=torch.arange(6.0).reshape(2, 3), b=torch.ones(2))


@pytest.mark.parametrize(
    "wrapped, note",
    [
        (SD, None),
        ({"state_dict": SD, "epoch": 3}, "['state_dict']"),
        ({"model_state_dict": SD, "optimizer_state_dict": {"lr": 0.1}}, "['model_state_dict']"),
        ({"model": SD}, "['model']"),
        ({"net": SD}, "['net']"),
        ({"checkpoint": {"state_dict": SD}}, "['checkpoint']['state_dict']"),
        ({"ema": SD, "step": 10}, "['ema']"),
    ],
)
def test_state_dict_is_found_inside_wrappers(save_pt, wrapped, note):
    checkpoint = load_checkpoint(save_pt(wrapped))
    assert list(checkpoint.tensors) == ["w", "b"]
    assert torch.equal(checkpoint.tensors["w"], SD["w"])
    if note:
        assert any(note in n for n in checkpoint.notes), checkpoint.notes


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod."])
def test_wrapper_prefix_is_stripped_only_when_every_key_has_it(save_pt, prefix):
    checkpoint = load_checkpoint(save_pt({f"{prefix}{k}": v for k, v in SD.items()}))
    assert list(checkpoint.tensors) == ["w", "b"]
    assert any(prefix in n for n in checkpoint.notes)
    mixed = load_checkpoint(save_pt({"module.w": SD["w"], "b": SD["b"]}, "mixed.pt"))
    assert list(mixed.tensors) == ["module.w", "b"]


def test_non_tensor_entries_are_dropped_and_reported(save_pt):
    checkpoint = load_checkpoint(save_pt({"w": SD["w"], "epoch": 4, "name": "x"}))
    assert list(checkpoint.tensors) == ["w"]
    assert any("ignored 2 non-tensor entries" in n for n in checkpoint.notes)


def test_no_tensors_is_an_error(save_pt):
    with pytest.raises(CheckpointError, match="no tensors found"):
        load_checkpoint(save_pt({"epoch": 4}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_dtypes_survive_pt_and_safetensors(tmp_path, save_pt, dtype):
    tensors = {"x": torch.randn(3, 4).to(dtype)}
    assert load_checkpoint(save_pt(tensors)).tensors["x"].dtype == dtype
    save_file(tensors, str(tmp_path / "x.safetensors"))
    checkpoint = load_checkpoint(tmp_path / "x.safetensors")
    assert checkpoint.format == "safetensors" and checkpoint.infos[0].dtype == str(dtype)[6:]
    assert torch.equal(checkpoint.tensors["x"], tensors["x"])


def test_pt_is_memory_mapped_weights_only_and_legacy_format_still_loads(tmp_path, monkeypatch):
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    new = tmp_path / "new.pt"
    torch.save(dict(SD), new)
    assert torch.equal(load_checkpoint(new).tensors["w"], SD["w"])
    assert calls == [{"map_location": "cpu", "weights_only": True, "mmap": True}]
    legacy = tmp_path / "legacy.pt"
    torch.save(dict(SD), legacy, _use_new_zipfile_serialization=False)
    assert torch.equal(load_checkpoint(legacy).tensors["w"], SD["w"])
    assert calls[-1] == {"map_location": "cpu", "weights_only": True}  # fallback: no mmap, still weights only


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"w": SD["w"], "payload": _RunsCode(marker)}, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert "refused to load" in str(info.value) and "state_dict()" in str(info.value)
    assert "posix.system" in str(info.value) or "os.system" in str(info.value)
    assert not marker.exists()
    plain = tmp_path / "evil.pkl.pt"
    plain.write_bytes(pickle.dumps(_RunsCode(marker)))
    with pytest.raises(CheckpointError):
        load_checkpoint(plain)
    assert not marker.exists()


def test_whole_module_checkpoint_is_refused_with_the_safe_way_out(tmp_path):
    path = tmp_path / "module.pt"
    torch.save(torch.nn.Linear(3, 2), path)
    with pytest.raises(CheckpointError, match=r"torch.save\(model.state_dict\(\)"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    "content, fragment",
    [
        (b"", "the file is empty"),
        (b"\x89PNG\r\n\x1a\n0000", "not a readable"),
        (b"hello world\n", "not a readable"),
        (b"PK\x03\x04truncated zip", "not a readable"),
    ],
)
def test_junk_pt_files_are_one_clear_error(tmp_path, content, fragment):
    path = tmp_path / "junk.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=fragment):
        load_checkpoint(path)


def test_missing_and_directory_paths(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="is a directory"):
        load_checkpoint(tmp_path)


def _safetensors_bytes(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize(
    "blob, fragment",
    [
        (b"\x01\x00", "too short"),
        (struct.pack("<Q", 10**9) + b"{}", "past the end"),
        (struct.pack("<Q", 4) + b"nope", "not valid JSON"),
        (
            _safetensors_bytes({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 16]}}, b"\0" * 8),
            "outside the 8-byte data section",
        ),
        (_safetensors_bytes({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 8), "needs 8 bytes"),
        (_safetensors_bytes({"a": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8), "unknown dtype"),
        (
            _safetensors_bytes({"a": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 8]}}, b"\0" * 8),
            "needs",
        ),
        (
            _safetensors_bytes(
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
    infos, metadata, notes = read_tensor_infos(tmp_path / "m.safetensors")
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


def test_atomic_output_keeps_existing_file_and_cleans_up_on_failure(tmp_path):
    target = tmp_path / "out.safetensors"
    target.write_bytes(b"old")
    with pytest.raises(OutputError, match="already exists; pass --force"):
        with atomic_output(target):
            pass
    with pytest.raises(RuntimeError):
        with atomic_output(target, overwrite=True) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("boom")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]
    with atomic_output(target, overwrite=True) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]


def test_atomic_output_refuses_inputs_and_bad_folders(tmp_path):
    source = tmp_path / "in.pt"
    source.write_bytes(b"x")
    with pytest.raises(OutputError, match="refusing to write over the input"):
        with atomic_output(source, overwrite=True, protect=[source]):
            pass
    with pytest.raises(OutputError, match="does not exist"):
        with atomic_output(tmp_path / "missing" / "o.safetensors"):
            pass
    with pytest.raises(OutputError, match="is a directory"):
        with atomic_output(tmp_path):
            pass
    assert source.read_bytes() == b"x"


def test_save_safetensors_round_trip(tmp_path):
    path = tmp_path / "sd.safetensors"
    save_safetensors(dict(SD), path, {"format": "pt"})
    assert all(torch.equal(load_file(str(path))[k], v) for k, v in SD.items())
    with pytest.raises(OutputError):
        save_safetensors(dict(SD), path)
