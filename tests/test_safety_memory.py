"""Tiny hostile files must not make fc2conv allocate what they do not hold (issue 10, item 1).

Each case is built inside the test (small on disk) and run in a new process whose address space is
capped with RLIMIT_AS, so a regression fails (the allocation is refused, the message is not the one
expected) instead of exhausting the machine. The process's peak RSS is measured too. The README's
safety table has a row per case (checked below, like tests/test_safety.py's CASES).
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import readme_safety_row

CAP_BYTES = 3 * 2**30  # address space: python + torch need about 1 GiB; every case asks for more than the rest
PEAK_RSS_MB = 700  # torch's import alone is about 300 MB here

_RUN_CAPPED = r"""
import os, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[1]), int(sys.argv[1])))
from fc2conv.cli import cli
code = cli.main(sys.argv[3:], prog_name="fc2conv", standalone_mode=False)
# VmHWM, not ru_maxrss: the latter keeps the parent's peak across fork and exec.
peak = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
with open(sys.argv[2], "w") as report:
    report.write(str(int(peak.split()[1]) // 1024))
sys.exit(code)
"""


def _pickle_ops(*parts: bytes) -> bytes:
    return b"\x80\x02" + b"".join(parts) + b"."


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _unicode(text: str) -> bytes:
    return b"X" + struct.pack("<I", len(text)) + text.encode()


def _int(value: int) -> bytes:
    return b"J" + struct.pack("<i", value)


def _torch_zip(path: Path, data_pkl: bytes, *, compress: bool = False, extra: dict[str, bytes] | None = None) -> Path:
    """A zip laid out as torch.save lays it out, with the given data.pkl (and more records)."""
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", data_pkl, compress_type=method, compresslevel=1)
        archive.writestr("archive/byteorder", b"little")
        archive.writestr("archive/version", b"3\n")
        for name, data in (extra or {}).items():
            archive.writestr(name, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=1)
    return path


def _bytearray_pickle(tmp: Path) -> Path:
    """32 bytes: builtins.bytearray(3 GiB), which torch's weights-only unpickler allows."""
    size = 3 * 2**30
    data = _pickle_ops(_global("builtins", "bytearray"), b"\x8a\x05" + size.to_bytes(5, "little"), b"\x85R")
    path = tmp / "bytearray.pt"
    path.write_bytes(data)
    assert len(data) == 32
    return path


def _tensor_from_sizes(tmp: Path) -> Path:
    """{"fc.weight": torch.Tensor(8192, 32768)}: a 1 GiB tensor with no storage in the file."""
    body = b"}" + _unicode("fc.weight") + _global("torch", "Tensor") + _int(8192) + _int(32768) + b"\x86Rs"
    return _torch_zip(tmp / "sizes.pt", _pickle_ops(body))


def _many_empty_tensors(tmp: Path) -> Path:
    """300 x torch.Tensor(1024): uninitialised heap memory, written out before this was refused."""
    items = b"".join(_unicode(f"t{i}.weight") + _global("torch", "Tensor") + _int(1024) + b"\x85R" for i in range(300))
    return _torch_zip(tmp / "empty.pt", _pickle_ops(b"}(" + items + b"u"))


def _pickle_bomb(tmp: Path) -> Path:
    """A data.pkl that deflates to 96 MiB (a valid pickle: a long string), in a file of about 100 KB."""
    text = 96 * 2**20
    data = _pickle_ops(b"X" + struct.pack("<I", text) + b"a" * text)
    return _torch_zip(tmp / "bomb.pt", data, compress=True)


def _lying_pickle_size(tmp: Path) -> Path:
    """A data.pkl whose zip entry declares 64 bytes but deflates to 96 MiB."""
    path = _pickle_bomb(tmp)
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("archive/data.pkl")
    for header in (raw.find(b"PK\x03\x04"), raw.find(b"PK\x01\x02")):  # local header, central directory
        size_at = header + (22 if raw[header + 2] == 3 else 24)
        raw[size_at : size_at + 4] = struct.pack("<I", 64)
    assert info.file_size > 64
    path.write_bytes(bytes(raw))
    return path


def _many_big_pickles(tmp: Path) -> Path:
    """A refused pickle (os.system) beside 150 other *.pkl records of 16 MiB each (2.4 GiB unpacked).

    The zip is written by hand so that the 16 MiB of zeros are compressed once, not 150 times.
    """
    evil = pickle.dumps(_RunsTrue(), protocol=4)  # torch's error names no global: the scan must
    zeros = b"\0" * 16 * 2**20
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    deflated = packer.compress(zeros) + packer.flush()
    entries = [("archive/data.pkl", evil, evil, 0), ("archive/byteorder", b"little", b"little", 0)]
    entries += [("archive/version", b"3\n", b"3\n", 0)]
    entries += [(f"archive/extra{i}.pkl", deflated, zeros, 8) for i in range(150)]
    path = tmp / "many.pt"
    path.write_bytes(_zip_by_hand(entries))
    return path


class _RunsTrue:
    def __reduce__(self):
        return (os.system, ("true",))


def _zip_by_hand(entries: list[tuple[str, bytes, bytes, int]]) -> bytes:
    """A zip of (name, data as stored, data unpacked, method: 0 stored or 8 deflated) entries."""
    body, directory = b"", b""
    for name, stored, unpacked, method in entries:
        crc, encoded = zlib.crc32(unpacked), name.encode()
        sizes = struct.pack("<III", crc, len(stored), len(unpacked))
        directory += struct.pack("<IHHHHHH", 0x02014B50, 20, 20, 0, method, 0, 0) + sizes
        directory += struct.pack("<HHHHHII", len(encoded), 0, 0, 0, 0, 0, len(body)) + encoded
        body += struct.pack("<IHHHHH", 0x04034B50, 20, 0, method, 0, 0) + sizes
        body += struct.pack("<HH", len(encoded), 0) + encoded + stored
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(entries), len(entries), len(directory), len(body), 0)
    return body + directory + end


def _compressed_storage(tmp: Path) -> Path:
    """A storage record that is deflated (1 GiB of zeros declared, a few KB in the file)."""
    rebuild = _global("torch._utils", "_rebuild_tensor_v2")
    pid = b"(" + _unicode("storage") + _global("torch", "FloatStorage") + _unicode("0") + _unicode("cpu")
    pid += _int(2**28) + b"tQ"
    args = b"(" + pid + _int(0) + _int(2**14) + _int(2**14) + b"\x86" + _int(2**14) + _int(1) + b"\x86"
    args += b"\x89" + _global("collections", "OrderedDict") + b")Rt"
    data = _pickle_ops(b"}" + _unicode("fc.weight") + rebuild + args + b"Rs")
    path = tmp / "deflated.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", data)
        archive.writestr("archive/byteorder", b"little")
        archive.writestr("archive/version", b"3\n")
        archive.writestr("archive/data/0", b"\0" * 2**20, zipfile.ZIP_DEFLATED)
    return path


@dataclass(frozen=True)
class MemoryCase:
    id: str
    make: Callable[[Path], Path]
    command: str  # convert or inspect
    message: str


MEMORY_CASES = [
    MemoryCase("pickle-bytearray-3GiB", _bytearray_pickle, "convert", "builds a bytearray of 3221225472 bytes"),
    MemoryCase("pt-tensor-from-sizes", _tensor_from_sizes, "convert", "not backed by bytes of the file"),
    MemoryCase("pt-300-uninitialised-tensors", _many_empty_tensors, "convert", "not backed by bytes of the file"),
    MemoryCase("pt-data.pkl-deflates-to-96MiB", _pickle_bomb, "inspect", "more than 67108864 bytes is refused"),
    MemoryCase("pt-data.pkl-size-lies", _lying_pickle_size, "inspect", "not a readable PyTorch checkpoint"),
    MemoryCase("pt-refused-beside-150-big-pickles", _many_big_pickles, "convert", "refused to load"),
    MemoryCase("pt-compressed-storage", _compressed_storage, "convert", "is compressed"),
]


@pytest.mark.slow
@pytest.mark.parametrize("case", MEMORY_CASES, ids=[c.id for c in MEMORY_CASES])
def test_tiny_hostile_file_allocates_nothing_big(tmp_path, case):
    path = case.make(tmp_path)
    assert path.stat().st_size < 4 * 2**20  # small on disk
    report = tmp_path / "maxrss"
    args = [case.command, str(path), "--json"]
    if case.command == "convert":
        args += ["-o", str(tmp_path / "out.safetensors"), "--input-shape", "8x2x2"]
    done = subprocess.run(
        [sys.executable, "-c", _RUN_CAPPED, str(CAP_BYTES), str(report), *args],
        capture_output=True, text=True, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and case.message in lines[0], done.stderr
    assert json.loads(done.stdout)["ok"] is False
    assert int(report.read_text()) < PEAK_RSS_MB  # MB
    assert not (tmp_path / "out.safetensors").exists()


def test_readme_table_has_the_memory_cases():
    for case in MEMORY_CASES:
        row = readme_safety_row(case.id)
        assert "| 2 |" in row and case.message in row, row


def test_a_real_checkpoint_still_reads_under_the_same_cap(tmp_path, save_pt):
    """The cap leaves room for honest work: a real conversion passes under it."""
    import torch

    sd = {"conv.weight": torch.randn(8, 3, 3, 3), "fc.weight": torch.randn(10, 32), "fc.bias": torch.randn(10)}
    path = save_pt(sd, "real.pt")
    report = tmp_path / "maxrss"
    args = ["convert", str(path), "--input-shape", "8x2x2", "-o", str(tmp_path / "o.safetensors"), "--json"]
    done = subprocess.run(
        [sys.executable, "-c", _RUN_CAPPED, str(CAP_BYTES), str(report), *args],
        capture_output=True, text=True, check=False, env={**os.environ},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["ok"] is True and int(report.read_text()) < PEAK_RSS_MB
