"""Publishing: an output path holds its old content or the complete new file, never a half-written one."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from safetensors.torch import load_file

from fc2conv.errors import OutputError
from fc2conv.publish import atomic_output, save_safetensors

SD = OrderedDict(w=torch.arange(6.0).reshape(2, 3), b=torch.ones(2))


def test_atomic_output_keeps_existing_file_and_cleans_up_on_failure(tmp_path):
    target = tmp_path / "out.safetensors"
    target.write_bytes(b"old")
    with pytest.raises(OutputError, match="already exists") as info:
        with atomic_output(target):
            pass
    assert info.value.remedy == "overwrite"
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
