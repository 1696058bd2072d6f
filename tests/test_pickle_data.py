"""The data-only pickle reader and the torch.save zip reader: what torch reads, they read; nothing runs."""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
import zipfile

import pytest
import torch

from fc2conv.diskio import ByteSpan, copy_span, first_differing_byte, mapped
from fc2conv.formats import open_source
from fc2conv.formats.pickle_data import BoundedReader, Opaque, Refused, TensorRef, Truncated, read_pickle, storage_ref
from fc2conv.formats.torch_zip import read_torch_zip


def _read(data: bytes):
    return read_pickle(BoundedReader(io.BytesIO(data), len(data)), lambda pid: Opaque("pid"))


def test_plain_data_reads_as_python_data():
    value = {"a": [1, 2, (3, 4.5)], "b": None, "c": True, "d": "text", "e": -(2**40)}
    data = _read(pickle.dumps(value, protocol=2))
    assert data.value == value and data.modelled


def test_protocol_4_opcodes_are_refused_as_torch_refuses_them():
    with pytest.raises(Truncated, match="Unsupported operand"):
        _read(pickle.dumps({"a": 1}, protocol=4))


def test_globals_are_names_never_imported_or_called(tmp_path):
    marker = tmp_path / "ran"
    data = _read(
        b"\x80\x02cos\nsystem\nX"
        + len(f"touch {marker}").to_bytes(4, "little")
        + f"touch {marker}".encode()
        + b"\x85R."
    )
    assert isinstance(data.value, Opaque) and data.value.name == "os.system"
    assert data.globals == ["os.system"] and not data.modelled
    assert not marker.exists()


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"\x80\x02cbuiltins\nbytearray\n\x8a\x04\x00\x00\x00\x40\x85R.", "bytearray of 1073741824 bytes"),
        (b"\x80\x02ctorch\nTensor\nJ\x00\x10\x00\x00\x85R.", "not backed by bytes of the file"),
        (b"\x80\x02ctorch\nFloatTensor\nJ\x00\x10\x00\x00\x85\x81.", "not backed by bytes of the file"),
        (b"\x80\x02ctorch._utils\n_rebuild_meta_tensor_no_storage\n)R.", "no data in the file"),
    ],
)
def test_allocations_the_file_does_not_hold_are_refused(payload, message):
    with pytest.raises(Refused, match=message):
        _read(payload)


def test_reads_never_exceed_the_bound():
    huge_string = b"\x80\x02X" + (2**31).to_bytes(4, "little") + b"abc"
    with pytest.raises(Truncated):
        _read(huge_string)  # declares 2 GiB, 3 bytes follow: nothing of 2 GiB is allocated
    stream = BoundedReader(io.BytesIO(b"0123456789"), 4)
    assert stream.read(100) == b"0123" and stream.read(1) == b""


def test_storage_ids_need_a_known_type_and_pass_the_check():
    seen = []
    assert isinstance(storage_ref(("storage", "not a global", "0", "cpu", 4), seen.append), Opaque)
    assert seen == []


def test_torch_save_zip_reads_as_tensor_refs_with_the_files_bytes(tmp_path):
    sd = {"w": torch.randn(3, 4), "t": torch.randn(4, 3).t(), "p": torch.nn.Parameter(torch.ones(2)),
          "h": torch.arange(6, dtype=torch.float16), "b": torch.zeros(2, dtype=torch.bfloat16)}  # fmt: skip
    path = tmp_path / "m.pt"
    torch.save(sd, path)
    found = read_torch_zip(path)
    assert found is not None and found.little_endian
    refs = found.value
    assert isinstance(refs["w"], TensorRef) and refs["w"].shape == (3, 4) and refs["w"].dtype == "float32"
    assert not refs["t"].is_contiguous() and refs["p"].shape == (2,) and refs["b"].dtype == "bfloat16"
    source = open_source(path)
    for name, tensor in sd.items():
        assert torch.equal(source.tensors[name], tensor.detach()), name
    assert "t" not in source.spans  # a transposed view has no single contiguous span
    raw = path.read_bytes()
    span = source.spans["w"]
    assert raw[span.offset : span.offset + span.nbytes] == sd["w"].numpy().tobytes()


def test_a_quantized_checkpoint_is_left_to_torch(tmp_path):
    path = tmp_path / "q.pt"
    torch.save({"q": torch.quantize_per_tensor(torch.randn(4), 0.1, 0, torch.qint8)}, path)
    assert read_torch_zip(path) is None


def test_a_storage_larger_than_its_record_is_refused(tmp_path):
    path = tmp_path / "m.pt"
    torch.save({"w": torch.randn(4)}, path)
    lying = tmp_path / "lying.pt"
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(lying, "w") as out:
        for info in source.infolist():
            data = source.read(info)
            if info.filename.endswith("data.pkl"):
                data = data.replace(b"K\x04t", b"J\x00\x00\x00\x01t")  # numel 4 -> 2**24
            out.writestr(info, data)
    with pytest.raises(Refused, match="declares 67108864 bytes"):
        read_torch_zip(lying)


def test_copy_span_and_first_differing_byte(tmp_path):
    source, target = tmp_path / "a", tmp_path / "b"
    source.write_bytes(os.urandom(3000))
    target.write_bytes(b"\0" * 100)
    fd_in, fd_out = os.open(source, os.O_RDONLY), os.open(target, os.O_RDWR)
    try:
        copy_span(fd_in, 1000, fd_out, 10, 2000)
    finally:
        os.close(fd_in)
        os.close(fd_out)
    data = target.read_bytes()
    assert data[10:2010] == source.read_bytes()[1000:3000]
    with mapped(source, target) as maps:
        a, b = ByteSpan(source, 1000, 2000), ByteSpan(target, 10, 2000)
        assert first_differing_byte(maps[source], a, maps[target], b) is None
    changed = bytearray(data)
    changed[10 + 1234] ^= 0x80
    target.write_bytes(bytes(changed))
    with mapped(source, target) as maps:
        assert first_differing_byte(maps[source], a, maps[target], b) == 1234


@pytest.mark.skipif(sys.platform != "linux", reason="copy_file_range is Linux's")
def test_copy_span_falls_back_where_the_kernel_cannot(tmp_path, monkeypatch):
    def unsupported(*args):
        raise OSError(18, "Invalid cross-device link")  # EXDEV

    monkeypatch.setattr(os, "copy_file_range", unsupported)
    source, target = tmp_path / "a", tmp_path / "b"
    source.write_bytes(b"x" * 5000)
    fd_in, fd_out = os.open(source, os.O_RDONLY), os.open(target, os.O_RDWR | os.O_CREAT)
    try:
        copy_span(fd_in, 0, fd_out, 0, 5000)
    finally:
        os.close(fd_in)
        os.close(fd_out)
    assert target.read_bytes() == b"x" * 5000


def test_inspect_of_a_torch_save_file_does_not_import_torch():
    """A torch.save zip is read as data: inspecting it needs no torch at all."""
    from tests.conftest import SAMPLES

    code = (
        "import sys\n"
        "from fc2conv.cli import cli\n"
        f"code = cli.main(['inspect', {str(SAMPLES / 'small_cnn.pt')!r}, '--json'], standalone_mode=False)\n"
        "assert code == 0, code\n"
        "print('torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "False"


def test_torch_is_preloaded_only_for_formats_read_without_it(monkeypatch):
    import fc2conv.preload as preload

    started = []
    monkeypatch.setattr(preload.sys, "modules", {k: v for k, v in sys.modules.items() if k != "torch"})
    monkeypatch.setattr(preload.threading, "Thread", lambda **kwargs: started.append(kwargs) or _NoThread())
    monkeypatch.setattr(preload, "_thread", None)
    preload.preload_torch("keras")
    preload.preload_torch("torch", "onnx")
    assert started == []
    preload.preload_torch("torch", "safetensors")
    assert len(started) == 1


class _NoThread:
    def start(self):
        pass

    def is_alive(self):
        return False
