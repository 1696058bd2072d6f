"""PyTorch checkpoints: weights-only loading, the state dict inside wrappers and prefixes, refusals."""

from __future__ import annotations

import os
import pickle
from collections import OrderedDict

import pytest
import torch
from safetensors.torch import save_file

from fc2conv.errors import CheckpointError
from fc2conv.formats import open_source

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
    checkpoint = open_source(save_pt(wrapped))
    assert list(checkpoint.tensors) == ["w", "b"]
    assert torch.equal(checkpoint.tensors["w"], SD["w"])
    if note:
        assert any(note in n for n in checkpoint.notes), checkpoint.notes


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod."])
def test_wrapper_prefix_is_stripped_only_when_every_key_has_it(save_pt, prefix):
    checkpoint = open_source(save_pt({f"{prefix}{k}": v for k, v in SD.items()}))
    assert list(checkpoint.tensors) == ["w", "b"]
    assert any(prefix in n for n in checkpoint.notes)
    mixed = open_source(save_pt({"module.w": SD["w"], "b": SD["b"]}, "mixed.pt"))
    assert list(mixed.tensors) == ["module.w", "b"]


def test_non_tensor_entries_are_dropped_and_reported(save_pt):
    checkpoint = open_source(save_pt({"w": SD["w"], "epoch": 4, "name": "x"}))
    assert list(checkpoint.tensors) == ["w"]
    assert any("ignored 2 non-tensor entries" in n for n in checkpoint.notes)


def test_no_tensors_is_an_error(save_pt):
    with pytest.raises(CheckpointError, match="no tensors found"):
        open_source(save_pt({"epoch": 4}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_dtypes_survive_pt_and_safetensors(tmp_path, save_pt, dtype):
    tensors = {"x": torch.randn(3, 4).to(dtype)}
    assert open_source(save_pt(tensors)).tensors["x"].dtype == dtype
    save_file(tensors, str(tmp_path / "x.safetensors"))
    checkpoint = open_source(tmp_path / "x.safetensors")
    assert checkpoint.format == "safetensors" and checkpoint.infos[0].dtype == str(dtype)[6:]
    assert torch.equal(checkpoint.tensors["x"], tensors["x"])


def test_pt_is_read_as_data_else_memory_mapped_weights_only_and_legacy_format_still_loads(tmp_path, monkeypatch):
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    new = tmp_path / "new.pt"
    torch.save(dict(SD), new)
    source = open_source(new)
    assert torch.equal(source.tensors["w"], SD["w"])
    assert calls == []  # a plain torch.save zip is read as data: no unpickler at all
    assert set(source.spans) == set(SD)  # and each tensor's bytes are located in the file
    quantized = tmp_path / "quantized.pt"
    torch.save({**SD, "q": torch.quantize_per_tensor(torch.randn(4), 0.1, 0, torch.qint8)}, quantized)
    assert open_source(quantized).tensors["q"].is_quantized  # not modelled: torch's weights-only loader
    assert calls == [{"map_location": "cpu", "weights_only": True, "mmap": True}]
    legacy = tmp_path / "legacy.pt"
    torch.save(dict(SD), legacy, _use_new_zipfile_serialization=False)
    assert torch.equal(open_source(legacy).tensors["w"], SD["w"])
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
        open_source(path)
    assert "refused to load" in str(info.value) and "state_dict()" in str(info.value)
    assert "posix.system" in str(info.value) or "os.system" in str(info.value)
    assert not marker.exists()
    plain = tmp_path / "evil.pkl.pt"
    plain.write_bytes(pickle.dumps(_RunsCode(marker)))
    with pytest.raises(CheckpointError):
        open_source(plain)
    assert not marker.exists()


def test_whole_module_checkpoint_is_refused_with_the_safe_way_out(tmp_path):
    path = tmp_path / "module.pt"
    torch.save(torch.nn.Linear(3, 2), path)
    with pytest.raises(CheckpointError, match=r"torch.save\(model.state_dict\(\)"):
        open_source(path)


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
        open_source(path)


def test_missing_and_directory_paths(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        open_source(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="is a directory"):
        open_source(tmp_path)


EMA = OrderedDict(w=torch.full((2, 3), 7.0), b=torch.zeros(2))


@pytest.mark.parametrize(
    "wrapped, taken, passed_over",
    [
        ({"model": SD, "model_ema": EMA}, "['model']", "'model_ema'"),
        ({"model_ema": EMA, "model": SD}, "['model']", "'model_ema'"),  # the order in the file does not matter
        ({"state_dict": SD, "state_dict_ema": EMA}, "['state_dict']", "'state_dict_ema'"),
    ],
)
def test_training_weights_are_taken_before_ema_copies_and_both_are_reported(save_pt, wrapped, taken, passed_over):
    source = open_source(save_pt(wrapped))
    assert torch.equal(source.tensors["w"], SD["w"])
    assert source.notes[0] == f"state dict found under checkpoint{taken}"
    assert any(f"also holds {passed_over}, not converted" in note for note in source.notes), source.notes


def test_an_ema_copy_alone_is_taken_and_a_named_key_chooses(save_pt):
    assert torch.equal(open_source(save_pt({"model_ema": EMA, "epoch": 3})).tensors["w"], EMA["w"])
    both = save_pt({"model": SD, "model_ema": EMA}, "both.pt")
    assert torch.equal(open_source(both, state_dict_key="model_ema").tensors["w"], EMA["w"])
    nested = save_pt({"checkpoint": {"state_dict": SD, "state_dict_ema": EMA}}, "nested.pt")
    assert torch.equal(open_source(nested, state_dict_key="checkpoint.state_dict_ema").tensors["w"], EMA["w"])
    with pytest.raises(
        CheckpointError, match=r"has no state-dict key 'modle' \(checkpoint holds 'model', 'model_ema'\)"
    ):
        open_source(both, state_dict_key="modle")


def test_nested_wrapper_prefixes_are_all_stripped(save_pt):
    source = open_source(save_pt({f"_orig_mod.module.{k}": v for k, v in SD.items()}))
    assert list(source.tensors) == ["w", "b"]
    assert "stripped the '_orig_mod.module.' prefix shared by every key" in source.notes
