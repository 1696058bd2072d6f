"""Hostile and broken inputs through the CLI: exit code, one `Error:` line, no output, input unchanged.

CASES is the table of bad inputs; the README's "Safety and failure behaviour" table is checked
against it (test_readme_table_matches_the_cases), so the two cannot drift apart.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file

from fc2conv.cli import cli
from tests.conftest import SAMPLES, head_state_dict, readme_safety_row, run_capped, st_bytes, st_entry

# --- payloads that run code when unpickled: each would create the file MARKER -------------------

MARKER = "pwned.marker"


class _SystemPayload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvalPayload(_SystemPayload):
    def __reduce__(self):
        return (eval, (f"open({self.marker!r}, 'w').close()",))


class _ExecPayload(_SystemPayload):
    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


class _ImportOs:
    def __reduce__(self):
        return (builtins.__import__, ("os",))


class _GetSystem:
    """Pickled as getattr(__import__('os'), 'system'); callable only so that pickle accepts it."""

    def __call__(self, *args):  # pragma: no cover - never called: unpickling rebuilds os.system
        raise AssertionError

    def __reduce__(self):
        return (getattr, (_ImportOs(), "system"))


class _ImportPayload(_SystemPayload):
    def __reduce__(self):  # __import__('os').system('touch marker'), built from pickle opcodes
        return (_GetSystem(), (f"touch {self.marker}",))


class _SubprocessPayload(_SystemPayload):
    def __reduce__(self):
        return (subprocess.call, (["touch", self.marker],))


PAYLOADS = {
    "os.system": _SystemPayload,
    "eval": _EvalPayload,
    "exec": _ExecPayload,
    "builtins.__import__": _ImportPayload,
    "subprocess": _SubprocessPayload,
}


def _payload_file(tmp: Path, kind: str, container: str) -> Path:
    payload = PAYLOADS[kind](str(tmp / MARKER))
    path = tmp / "evil.pt"
    if container == "torch zip":
        torch.save({"fc.weight": torch.zeros(2, 2), "x": payload}, path)
    elif container == "legacy torch":
        torch.save({"fc.weight": torch.zeros(2, 2), "x": payload}, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(payload))
    return path


def test_the_payloads_really_run_code_when_unpickled_unsafely(tmp_path):
    """Guard for the tests below: each payload does create the marker under plain pickle."""
    for kind in PAYLOADS:
        (tmp_path / MARKER).unlink(missing_ok=True)
        pickle.loads(pickle.dumps(PAYLOADS[kind](str(tmp_path / MARKER))))
        assert (tmp_path / MARKER).exists(), kind


# --- the table of bad inputs --------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    make: Callable[[Path], list[str]]  # builds the bad input in the folder, returns the CLI args
    exit_code: int
    message: str  # must appear in the one Error: line
    # Run in a new process with its memory capped and a timeout (run_capped): a regression that would
    # block (a FIFO) or allocate gigabytes fails the test instead of hanging it or exhausting the machine.
    isolated: bool = False


def _pt(tmp: Path, obj: object, name: str = "model.pt") -> str:
    torch.save(obj, tmp / name)
    return str(tmp / name)


def _bytes(tmp: Path, data: bytes, name: str) -> str:
    (tmp / name).write_bytes(data)
    return str(tmp / name)


def _real_pt_bytes() -> bytes:
    return (SAMPLES / "small_cnn.pt").read_bytes()


def _junk_data_pkl(tmp: Path) -> str:
    source = zipfile.ZipFile(SAMPLES / "small_cnn.pt")
    path = tmp / "junkpkl.pt"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as out:
        for item in source.infolist():
            data = source.read(item)
            out.writestr(item, b"\x80\x02junk junk junk" if item.filename.endswith("data.pkl") else data)
    return str(path)


def _float_head(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    sd = head_state_dict(c=8, h=3, w=3, widths=(5,))
    if dtype == torch.qint8:
        sd["fc1.weight"] = torch.quantize_per_tensor(sd["fc1.weight"], 0.1, 0, torch.qint8)
    elif dtype == torch.bool:
        sd["fc1.weight"] = sd["fc1.weight"] > 0
    else:
        sd["fc1.weight"] = (sd["fc1.weight"] * 10).to(dtype)
    return sd


def _fifo(tmp: Path, name: str) -> str:
    os.mkfifo(tmp / name)
    return str(tmp / name)


def _fifo_shard(tmp: Path) -> str:
    folder = tmp / "shards"
    folder.mkdir()
    _bytes(folder, st_bytes({"fc.weight": st_entry()}, b"\0" * 8), "model-00001-of-00002.safetensors")
    _fifo(folder, "model-00002-of-00002.safetensors")
    return str(folder)


def _index(tmp: Path, content: bytes | None = None, *, size: int = 0, link: str | None = None) -> str:
    """A shard folder whose index is ``content``, or a sparse file of ``size`` bytes, or a link to ``link``."""
    folder = tmp / "shards"
    folder.mkdir()
    _bytes(folder, st_bytes({"fc.weight": st_entry()}, b"\0" * 8), "a.safetensors")
    index = folder / "model.safetensors.index.json"
    if link is not None:
        index.symlink_to(link)
    elif size:
        with open(index, "wb") as f:  # sparse: 2 GiB declared, nothing on the disk
            f.write(b'{"weight_map": {"fc.weight": "a.safetensors"}, "metadata": {"x": "')
            f.truncate(size)
    else:
        index.write_bytes(content or b"")
    return str(index)


def _shard_linked_outside(tmp: Path) -> str:
    outside = tmp / "elsewhere"
    outside.mkdir()
    _bytes(outside, st_bytes({"private.weight": st_entry()}, b"\0" * 8), "private.safetensors")
    folder = tmp / "shards"
    folder.mkdir()
    _bytes(folder, st_bytes({"fc.weight": st_entry()}, b"\0" * 8), "model-00001-of-00002.safetensors")
    (folder / "model-00002-of-00002.safetensors").symlink_to(outside / "private.safetensors")
    return str(folder)


def _layer_listed_twice(tmp: Path) -> list[str]:
    source = _pt(tmp, head_state_dict())
    out = tmp / "conv.safetensors"
    assert CliRunner().invoke(cli, ["convert", source, "--input-shape", "8x3x3", "-o", str(out)]).exit_code == 0
    with safe_open(str(out), "pt") as handle:
        metadata, tensors = handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}
    layers = json.loads(metadata["fc2conv.layers"])
    save_file(tensors, str(out), metadata={**metadata, "fc2conv.layers": json.dumps([*layers, layers[0]])})
    return ["verify", source, str(out)]


def _forged_name(tmp: Path) -> list[str]:
    """An int8 FC weight whose name would put a forged ``verdict: PASS`` line into the error."""
    forged = {"fc\nverdict: PASS\nx.weight": torch.zeros(5, 72, dtype=torch.int8)}
    save_file({"features.0.weight": torch.zeros(8, 3, 3, 3), **forged}, str(tmp / "forged.safetensors"))
    return _convert(str(tmp / "forged.safetensors"), "--pointwise", "--layers", "fc")


def _link(tmp: Path, to: str) -> str:
    (tmp / "link.safetensors").symlink_to(to)
    return str(tmp / "link.safetensors")


def _over_a_folder_holding_a_folder(tmp: Path) -> list[str]:
    """A sharded conversion with --force onto an earlier output that has a directory where a shard goes."""
    out = tmp / "out"
    out.mkdir()
    (out / "model-00001-of-00004.safetensors").write_bytes(b"old")
    (out / "model-00003-of-00004.safetensors").mkdir()
    return ["convert", str(_shards(tmp)), "-o", str(out), "--input-shape", "16x3x3", "--force"]


def _convert(path: str, *extra: str) -> list[str]:
    return ["convert", path, "-o", str(Path(path).parent / "out.safetensors"), *extra]


CASES = [
    *[
        Case(
            f"pickle-{kind}-{container.replace(' ', '-')}",
            lambda tmp, k=kind, c=container: _convert(str(_payload_file(tmp, k, c))),
            2,
            "refused to load",
        )
        for kind in PAYLOADS
        for container in ("torch zip", "legacy torch", "plain pickle")
    ],
    Case("empty-file", lambda tmp: _convert(_bytes(tmp, b"", "empty.pt")), 2, "the file is empty"),
    Case(
        "truncated-zip",
        lambda tmp: _convert(_bytes(tmp, _real_pt_bytes()[:5000], "cut.pt")),
        2,
        "not a readable PyTorch checkpoint",
    ),
    Case("zip-with-junk-data.pkl", lambda tmp: _convert(_junk_data_pkl(tmp)), 2, "not a readable PyTorch checkpoint"),
    Case(
        "png-named-pt",
        lambda tmp: _convert(_bytes(tmp, b"\x89PNG\r\n\x1a\n" + b"\0" * 64, "image.pt")),
        2,
        "not a readable PyTorch checkpoint",
    ),
    Case(
        "text-named-pt",
        lambda tmp: _convert(_bytes(tmp, b"weights: none\n", "notes.pt")),
        2,
        "not a readable PyTorch checkpoint",
    ),
    Case("directory", lambda tmp: _convert(str(tmp)), 2, "is a directory"),
    Case("missing-path", lambda tmp: _convert(str(tmp / "absent.pt")), 2, "no such file"),
    Case(
        "st-header-past-end",
        lambda tmp: _convert(_bytes(tmp, st_bytes(b"{}", length=10**6), "a.safetensors")),
        2,
        "past the end",
    ),
    Case(
        "st-header-not-json",
        lambda tmp: _convert(_bytes(tmp, st_bytes(b"not json"), "a.safetensors")),
        2,
        "not valid JSON",
    ),
    Case(
        "st-offsets-past-data",
        lambda tmp: _convert(_bytes(tmp, st_bytes({"w": st_entry(offsets=(0, 64))}, b"\0" * 8), "a.safetensors")),
        2,
        "outside the 8-byte data section",
    ),
    Case(
        "st-overlapping-offsets",
        lambda tmp: _convert(
            _bytes(tmp, st_bytes({"a": st_entry(), "b": st_entry(offsets=(4, 12))}, b"\0" * 12), "a.safetensors")
        ),
        2,
        "overlap",
    ),
    Case(
        "st-unknown-dtype",
        lambda tmp: _convert(_bytes(tmp, st_bytes({"w": st_entry(dtype="F13")}, b"\0" * 8), "a.safetensors")),
        2,
        "unknown dtype 'F13'",
    ),
    Case(
        "st-absurd-shape",
        lambda tmp: _convert(_bytes(tmp, st_bytes({"w": st_entry(shape=(2**40, 2**40))}, b"\0" * 8), "a.safetensors")),
        2,
        "needs 4835703278458516698824704 bytes",
    ),
    Case(
        "st-duplicate-names",
        lambda tmp: _convert(
            _bytes(
                tmp,
                st_bytes(
                    b'{"w":'
                    + json.dumps(st_entry()).encode()
                    + b',"w":'
                    + json.dumps(st_entry(offsets=(8, 16))).encode()
                    + b"}",
                    b"\0" * 16,
                ),
                "a.safetensors",
            )
        ),
        2,
        "duplicate tensor name 'w'",
    ),
    Case(
        "pt-expanded-view",
        lambda tmp: _convert(_pt(tmp, {"fc.weight": torch.zeros(1).expand(2**20, 2**20)})),
        2,
        "storage holds 4 bytes (an expanded view)",
    ),
    Case("no-tensors", lambda tmp: _convert(_pt(tmp, {"epoch": 3, "note": "empty"})), 2, "no tensors found"),
    Case(
        "no-fc-layer",
        lambda tmp: _convert(_pt(tmp, {"conv.weight": torch.zeros(4, 3, 3, 3)})),
        2,
        "no fully connected layer found",
    ),
    *[
        Case(
            f"fc-weight-{name}",
            lambda tmp, d=dtype: _convert(_pt(tmp, _float_head(d)), "--input-shape", "8x3x3"),
            2,
            f"fc1.weight is {name}; only floating-point FC weights",
        )
        for name, dtype in [
            ("int8", torch.int8),
            ("int64", torch.int64),
            ("bool", torch.bool),
            ("complex64", torch.complex64),
            ("qint8", torch.qint8),
        ]
    ],
    *[
        Case(f"shape-{text}", lambda tmp, t=text: _convert(str(SAMPLES / "small_cnn.pt"), "--input-shape", t), 2, msg)
        for text, msg in [
            ("0x4x4", "every part must be at least 1"),
            ("-4x4x4", "'-4' is not a positive whole number"),
            ("4xfourx4", "'four' is not a positive whole number"),
            ("4x4x4x4x4", "has 5 parts"),
            ("1e3x2x2", "'1e3' is not a positive whole number"),
            ("32x4x5", "classifier.1 takes 512 inputs; 32x4x5 = 640"),
        ]
    ],
    Case(
        "st-dtype-as-list",
        lambda tmp: _convert(_bytes(tmp, st_bytes({"w": st_entry(dtype=["F32"])}, b"\0" * 8), "a.safetensors")),
        2,
        "unknown dtype ['F32']",
    ),
    Case(
        "st-header-nested-deep",
        lambda tmp: _convert(_bytes(tmp, st_bytes(b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"), "a.safetensors")),
        2,
        "not valid JSON (nested too deeply)",
    ),
    *[
        Case(f"fifo-{kind}", lambda tmp, m=make: _convert(m(tmp)), 2, "is not a regular file (a FIFO)", isolated=True)
        for kind, make in [
            ("safetensors", lambda tmp: _fifo(tmp, "a.safetensors")),
            ("pt", lambda tmp: _fifo(tmp, "a.pt")),
            ("keras", lambda tmp: _fifo(tmp, "a.keras")),  # the Keras reader opens a file to tell it apart
            ("onnx", lambda tmp: _fifo(tmp, "a.onnx")),
            ("shard", _fifo_shard),
            ("index", lambda tmp: _index(tmp, link=_fifo(tmp, "fifo"))),
        ]
    ],
    Case("device-as-input", lambda tmp: _convert("/dev/zero"), 2, "is not a regular file (a character device)"),
    Case(
        "index-2GiB-sparse",
        lambda tmp: _convert(_index(tmp, size=2 * 2**30)),
        2,
        "is 2147483648 bytes, more than a safetensors index can be",
        isolated=True,
    ),
    Case(
        "index-linked-to-dev-zero",
        lambda tmp: _convert(_index(tmp, link="/dev/zero")),
        2,
        "is not a regular file (a character device)",
        isolated=True,
    ),
    Case(
        "index-nested-deep",
        lambda tmp: _convert(_index(tmp, b"[" * 100_000 + b"]" * 100_000)),
        2,
        "not a valid safetensors index (JSON nested too deeply)",
    ),
    Case("shard-linked-outside", lambda tmp: _convert(_shard_linked_outside(tmp)), 2, "outside the checkpoint folder"),
    Case(
        "layers-not-a-regex-inspect",
        lambda tmp: ["inspect", str(SAMPLES / "small_cnn.pt"), "--layers", "(("],
        2,
        "layer pattern '((' is not a valid regular expression",
    ),
    Case("verify-layer-listed-twice", _layer_listed_twice, 2, "it lists layer 'fc1' twice"),
    Case("name-with-newlines", _forged_name, 2, "fc\\nverdict: PASS\\nx.weight is int8"),
    Case(
        "shape-5000-digits",
        lambda tmp: _convert(str(SAMPLES / "small_cnn.pt"), "--input-shape", "9" * 5000),
        2,
        "a part of 5000 digits is too large",
    ),
    Case(
        "output-folder-missing",
        lambda tmp: ["convert", _pt(tmp, head_state_dict()), "-o", str(tmp / "nowhere" / "o.safetensors")],
        2,
        "does not exist",
    ),
    Case(
        "output-is-input",
        lambda tmp: ["convert", _pt(tmp, head_state_dict()), "-o", str(tmp / "model.pt"), "--force"],
        2,
        "refusing to write over the input",
    ),
    Case(
        "output-exists",
        lambda tmp: ["convert", _pt(tmp, head_state_dict()), "-o", _bytes(tmp, b"keep me", "o.safetensors")],
        2,
        "already exists; pass --force",
    ),
    Case(
        "output-trailing-slash",
        lambda tmp: ["convert", _pt(tmp, head_state_dict()), "-o", f"{tmp}/newdir/"],
        2,
        "ends with '/', so it names a folder; the output is a file",
    ),
    Case(
        "output-link-to-a-device",
        lambda tmp: ["convert", _pt(tmp, head_state_dict()), "-o", _link(tmp, "/dev/null"), "--force"],
        2,
        "/dev/null: is not a regular file; refusing to replace it",
    ),
    Case(
        "output-dangling-link",
        lambda tmp: ["convert", _pt(tmp, head_state_dict()), "-o", _link(tmp, str(tmp / "nowhere")), "--force"],
        2,
        "which does not exist; refusing to create a file through it",
    ),
    Case(
        "output-folder-holds-a-folder",
        _over_a_folder_holding_a_folder,
        2,
        "holds the folder 'model-00003-of-00004.safetensors', which replacing the output folder would delete",
    ),
    Case(
        "output-is-a-device",
        lambda tmp: ["convert", _pt(tmp, head_state_dict()), "-o", "/dev/null", "--force"],
        2,
        "is not a regular file",
    ),
]


def _digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(2**24):  # a piece at a time: a test input may be a 2 GiB sparse file
            digest.update(chunk)
    return digest.hexdigest()


def _snapshot(folder: Path) -> dict[str, str]:
    """Every entry under ``folder`` (links and FIFOs by kind), with the hash of every regular file."""
    kinds = {str(p.relative_to(folder)): _kind(p) for p in folder.rglob("*")}
    return {name: _digest(folder / name) if kind == "file" else kind for name, kind in kinds.items()}


def _kind(path: Path) -> str:
    return "link" if path.is_symlink() else "file" if path.is_file() else "dir" if path.is_dir() else "special"


@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=pytest.mark.slow) if c.isolated else c for c in CASES], ids=[c.id for c in CASES]
)
def test_bad_input(tmp_path, case):
    args = case.make(tmp_path)
    before = _snapshot(tmp_path)
    if case.isolated:
        done = run_capped(*args, timeout=30)
        code, stdout, stderr = done.returncode, done.stdout, done.stderr
    else:
        result = CliRunner().invoke(cli, args, catch_exceptions=False)
        code, stdout, stderr = result.exit_code, result.stdout, result.stderr
    assert code == case.exit_code, stdout + stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), stderr
    assert case.message in lines[0]
    assert "Traceback" not in stdout + stderr
    assert stdout == ""
    assert _snapshot(tmp_path) == before  # no output, no temporary file, inputs unchanged
    assert not (tmp_path / MARKER).exists()


def test_readme_table_matches_the_cases():
    for case in CASES:
        row = readme_safety_row(case.id)
        assert f"| {case.exit_code} |" in row and case.message in row, row


def test_unreadable_file(tmp_path, monkeypatch):
    path = Path(_pt(tmp_path, head_state_dict()))
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == path else real_access(p, mode, **kw))
    result = CliRunner().invoke(cli, ["convert", str(path)], catch_exceptions=False)
    assert result.exit_code == 2 and "permission denied" in result.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file_for_real(tmp_path):
    path = Path(_pt(tmp_path, head_state_dict()))
    path.chmod(0)
    result = CliRunner().invoke(cli, ["convert", str(path)], catch_exceptions=False)
    assert result.exit_code == 2 and "permission denied" in result.stderr


def test_non_float_tensors_elsewhere_are_copied_untouched(tmp_path):
    sd = head_state_dict(c=8, h=3, w=3, widths=(5,))
    extra = {
        "ids": torch.arange(7),
        "mask": torch.tensor([True, False]),
        "phase": torch.randn(3, dtype=torch.complex64),
        "small": torch.randint(0, 9, (4, 4), dtype=torch.int8),
    }
    source = _pt(tmp_path, {**sd, **extra})
    out = tmp_path / "out.safetensors"
    runner = CliRunner()
    assert runner.invoke(cli, ["convert", source, "-o", str(out), "--input-shape", "8x3x3"]).exit_code == 0
    verified = runner.invoke(cli, ["verify", source, str(out), "--json"])
    assert verified.exit_code == 0 and json.loads(verified.stdout)["identical_tensors"] == len(sd) - 1 + len(extra)


def test_quantized_tensor_elsewhere_cannot_be_written_and_says_so(tmp_path):
    sd = {
        **head_state_dict(c=8, h=3, w=3, widths=(5,)),
        "q": torch.quantize_per_tensor(torch.randn(4), 0.1, 0, torch.qint8),
    }
    source = _pt(tmp_path, sd)
    result = CliRunner().invoke(cli, ["convert", source, "--input-shape", "8x3x3"])
    assert result.exit_code == 2 and "q: dtype qint8 has no safetensors equivalent" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_converted_flagged_and_fail_with_strict(tmp_path, bad):
    sd = head_state_dict(c=8, h=3, w=3, widths=(5, 3))
    sd["fc1.weight"][1, 2] = bad
    source = _pt(tmp_path, sd)
    runner = CliRunner()
    done = runner.invoke(cli, ["convert", source, "--input-shape", "8x3x3", "--json"])
    assert done.exit_code == 0
    payload = json.loads(done.stdout)
    assert payload["ok"] is True and payload["layers"][0]["nonfinite"] is True
    assert "Warning: fc1 has non-finite" in done.stderr
    table = runner.invoke(cli, ["convert", source, "--input-shape", "8x3x3", "--force"])
    assert "non-finite" in table.stdout
    (tmp_path / "model.conv.safetensors").unlink()
    strict = runner.invoke(cli, ["convert", source, "--input-shape", "8x3x3", "--strict", "--json"])
    assert strict.exit_code == 1 and json.loads(strict.stdout)["ok"] is False
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_trust_pickle_is_the_only_way_to_load_a_whole_module_and_warns(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(), torch.nn.Linear(72, 5)).eval()
    path = tmp_path / "whole.pt"
    torch.save(model, path)
    runner = CliRunner()
    refused = runner.invoke(cli, ["convert", str(path)])
    assert refused.exit_code == 2 and "--trust-pickle" in refused.stderr
    # With --trust-pickle a whole module needs no --model: --input-shape is then the network input.
    trusted = runner.invoke(cli, ["convert", str(path), "--input-shape", "3x5x5", "--trust-pickle", "--json"])
    assert trusted.exit_code == 0, trusted.output
    assert "Warning: --trust-pickle" in trusted.stderr and "runs any code" in trusted.stderr
    payload = json.loads(trusted.stdout)
    assert payload["end_to_end"]["ok"] and payload["input_shape"] == [8, 3, 3]
    wrong = runner.invoke(cli, ["convert", str(path), "--input-shape", "8x3x3", "--trust-pickle", "--force"])
    assert wrong.exit_code == 2 and "expected input[2, 8, 3, 3] to have 3 channels" in wrong.stderr


def _mount_tmpfs(folder: Path, options: str) -> bool:
    folder.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True, check=False
    )
    return done.returncode == 0


@pytest.fixture
def tmpfs(tmp_path):
    mounted = []

    def mount(name: str, options: str) -> Path:
        folder = tmp_path / name
        if os.geteuid() != 0 or not _mount_tmpfs(folder, options):
            pytest.skip("cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN)")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", str(folder)], check=False)


def test_full_disk_leaves_nothing(tmp_path, tmpfs):
    source = _pt(tmp_path, head_state_dict(c=16, h=8, w=8, widths=(256, 10)))  # ~4 MB of output
    small = tmpfs("small", "size=256k")
    result = CliRunner().invoke(cli, ["convert", source, "-o", str(small / "o.safetensors")])
    assert result.exit_code == 2
    assert "No space left on device" in result.stderr and result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"Error: {small / 'o.safetensors'}: ") and "/proc/" not in result.stderr
    assert list(small.iterdir()) == []


def test_read_only_folder(tmp_path, tmpfs):
    source = _pt(tmp_path, head_state_dict())
    read_only = tmpfs("ro", "ro,size=64k")
    result = CliRunner().invoke(cli, ["convert", source, "-o", str(read_only / "o.safetensors")])
    assert result.exit_code == 2 and "Read-only file system" in result.stderr
    assert list(read_only.iterdir()) == []


@pytest.mark.slow
def test_file_size_limit_is_a_clean_write_failure(tmp_path):
    """Like a full disk, on any machine: RLIMIT_FSIZE makes writes past 64 KB fail with EFBIG."""
    source = _pt(tmp_path, head_state_dict(c=16, h=8, w=8, widths=(256, 10)))
    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))\n"
        "from fc2conv.cli import main\n"
        "main(sys.argv[1:])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, "convert", source, "-o", str(tmp_path / "o.safetensors")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2 and "File too large" in done.stderr and done.stderr.count("\n") == 1
    assert done.stderr.startswith(f"Error: {tmp_path / 'o.safetensors'}: write failed (File too large)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


@pytest.mark.slow
def test_a_write_from_memory_that_vanished_names_the_output(tmp_path):
    """EFAULT: the write reads a mapped file that was cut short meanwhile; the error names the output."""
    mapped = tmp_path / "mapped.bin"
    mapped.write_bytes(b"\0" * 2**22)
    code = (
        "import os, sys, torch\n"
        "from fc2conv.errors import OutputError\n"
        "from fc2conv.publish import save_safetensors\n"
        f"t = torch.from_file({str(mapped)!r}, shared=True, size=2**20, dtype=torch.float32)\n"
        f"os.truncate({str(mapped)!r}, 0)\n"
        "try:\n"
        f"    save_safetensors({{'w': t}}, {str(tmp_path / 'o.safetensors')!r})\n"
        "except OutputError as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=60)
    assert done.stdout.strip() == f"{tmp_path / 'o.safetensors'}: write failed (Bad address)", done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mapped.bin"]


# --- signals during the write of a large output -------------------------------------------------


def _big_checkpoint(tmp: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    sd = {
        "features.weight": torch.randn(64, 3, 3, 3, generator=g),
        "fc1.weight": torch.randn(4096, 64 * 16 * 16, generator=g),  # 256 MB: the write takes a while
        "fc2.weight": torch.randn(10, 4096, generator=g),
    }
    path = tmp / "big.pt"
    torch.save(sd, path)
    return path


def _writing(pid: int, folder: Path) -> bool:
    """Whether the process has a file open for writing in ``folder`` (named or O_TMPFILE)."""
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        targets = [os.readlink(fd_dir / fd) for fd in os.listdir(fd_dir)]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return any(t.startswith(str(folder) + "/") and not t.endswith("big.pt") for t in targets)


@pytest.mark.slow
@pytest.mark.parametrize("sig, expected_code", [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGKILL, -9)])
def test_signal_during_write_leaves_no_output_and_no_litter(tmp_path, sig, expected_code):
    source = _big_checkpoint(tmp_path)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    out = tmp_path / "big.conv.safetensors"
    process = subprocess.Popen(
        [sys.executable, "-m", "fc2conv", "convert", str(source), "--input-shape", "64x16x16"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not _writing(process.pid, tmp_path):
        assert process.poll() is None, "finished before the signal could be sent"
        assert time.monotonic() < deadline
        time.sleep(0.002)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == expected_code
    if sig != signal.SIGKILL:
        assert stderr.startswith("Error: ") and stderr.count("\n") == 1 and "no output was written" in stderr
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.pt"]  # not even a temporary file
    assert hashlib.sha256(source.read_bytes()).hexdigest() == digest


# --- zero-size and absurd shapes: nothing is materialised (memory capped) --------------------------


def _declared(tmp: Path, name: str, shape: list[int], **more: dict) -> Path:
    """A safetensors file of a few hundred bytes declaring ``fc.weight`` of ``shape`` with no data."""
    path = tmp / name
    path.write_bytes(st_bytes({"fc.weight": st_entry(shape=tuple(shape), offsets=(0, 0)), **more}))
    return path


@pytest.mark.slow
def test_a_zero_size_layer_converts_and_verifies_without_allocating(tmp_path):
    """[0, 4194304] is 0 bytes; the check used to draw 4M-wide maps for it (1.6 GB)."""
    source = _declared(tmp_path, "z.safetensors", [0, 4194304])
    out = tmp_path / "z.conv.safetensors"
    done = run_capped("convert", source, "--input-shape", "1024x64x64", "-o", out, "--json")
    assert done.returncode == 0, done.stderr
    layer = json.loads(done.stdout)["layers"][0]
    assert layer["new_shape"] == [0, 1024, 64, 64] and layer["ok"] and layer["rows_checked"] == 0
    assert out.stat().st_size < 2048
    verified = run_capped("verify", source, out, "--json")
    assert verified.returncode == 0, verified.stderr
    assert json.loads(verified.stdout)["layers"][0]["exact"] is True


@pytest.mark.slow
@pytest.mark.parametrize("shape", [[2**31, 0], [10, 0], [2**62, 0]])
def test_pointwise_on_a_layer_without_inputs(tmp_path, shape):
    source = _declared(tmp_path, "p.safetensors", shape)
    done = run_capped("convert", source, "--pointwise", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["layers"][0]["new_shape"] == [*shape, 1, 1]
    verified = run_capped("verify", source, tmp_path / "p.conv.safetensors")
    assert verified.returncode == 0, verified.stderr


# --- a signal or SIGKILL at a chosen moment of publishing -----------------------------------------


def _signal_at(function: str, when: str, sig: int, call: int = 1) -> str:
    """Code making ``module.function`` send ``sig`` to its own process before or after its ``call``-th run."""
    module, _, name = function.rpartition(".")
    return (
        "import importlib as _il, os as _os\n"
        f"_module = _il.import_module({module!r})\n"
        f"_real, _calls = getattr(_module, {name!r}), []\n"
        "def _wrapped(*args, **kwargs):\n"
        "    _calls.append(1)\n"
        f"    if {when == 'before'} and len(_calls) == {call}:\n"
        f"        _os.kill(_os.getpid(), {int(sig)})\n"
        "    result = _real(*args, **kwargs)\n"
        f"    if {when == 'after'} and len(_calls) == {call}:\n"
        f"        _os.kill(_os.getpid(), {int(sig)})\n"
        "    return result\n"
        f"setattr(_module, {name!r}, _wrapped)\n"
    )


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture
def single(tmp_path):
    """A checkpoint, its conversion made once as the reference, and an old output to be replaced."""
    source = Path(_pt(tmp_path, head_state_dict(c=16, h=4, w=4, widths=(64, 10))))
    reference = tmp_path / "reference.safetensors"
    made = CliRunner().invoke(cli, ["convert", str(source), "--input-shape", "16x4x4", "-o", str(reference)])
    assert made.exit_code == 0
    out = tmp_path / "out" / "o.safetensors"
    out.parent.mkdir()
    out.write_bytes(b"old output")
    return source, reference.read_bytes(), out


@pytest.mark.slow
@pytest.mark.parametrize(
    "sig, function, when, code, new",
    [
        # interrupted while writing: nothing is put in place, and the run says so
        (signal.SIGTERM, "fc2conv.jobs.convert.write_safetensors", "after", 143, False),
        # once the file is renamed into place, the run has succeeded: it finishes and reports success
        (signal.SIGTERM, "fc2conv.publish._move", "after", 0, True),
        # between the hidden link and the rename (with --force): the signal waits, no *.tmp is left
        (signal.SIGTERM, "fc2conv.publish._move", "before", 0, True),
        (signal.SIGINT, "fc2conv.publish.fsync_dir", "before", 0, True),
        (signal.SIGKILL, "fc2conv.jobs.convert.write_safetensors", "after", -9, False),
        (signal.SIGKILL, "fc2conv.publish._link_descriptor", "before", -9, False),
        (signal.SIGKILL, "fc2conv.publish._move", "before", -9, False),  # may leave a hidden link (cleared below)
        (signal.SIGKILL, "fc2conv.publish._move", "after", -9, True),
    ],
)
def test_a_signal_at_any_moment_leaves_the_old_or_the_complete_new_output(single, sig, function, when, code, new):
    source, reference, out = single
    args = ["convert", source, "--input-shape", "16x4x4", "-o", out, "--force"]
    done = run_capped(*args, before=_signal_at(function, when, sig))
    assert done.returncode == code, done.stderr
    assert out.read_bytes() == (reference if new else b"old output")
    if code == 0:
        assert done.stderr == "" and "output:" in done.stdout  # success, reported as such
    elif code > 0:
        assert done.stderr.count("\n") == 1 and "no output was written" in done.stderr
    leftovers = _hidden(out.parent)
    assert leftovers == [] or (sig == signal.SIGKILL and function.endswith("_move") and when == "before")
    again = run_capped(*args)  # the next run into that folder clears what a killed one left
    assert again.returncode == 0 and out.read_bytes() == reference and _hidden(out.parent) == []


@pytest.mark.slow
def test_sigkill_right_after_a_new_output_is_named_leaves_it_complete(single):
    source, reference, out = single
    out.unlink()
    before = _signal_at("fc2conv.publish._link_descriptor", "after", signal.SIGKILL)
    done = run_capped("convert", source, "--input-shape", "16x4x4", "-o", out, before=before)
    assert done.returncode == -9 and out.read_bytes() == reference and os.listdir(out.parent) == ["o.safetensors"]


def _shards(tmp: Path) -> Path:
    folder = tmp / "in"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    weights = {
        "features.0.weight": torch.randn(16, 3, 3, 3, generator=g),
        "fc1.weight": torch.randn(64, 144, generator=g),
        "fc1.bias": torch.randn(64, generator=g),
        "fc2.weight": torch.randn(10, 64, generator=g),
    }
    weight_map = {}
    for i, name in enumerate(weights):
        file = f"model-{i + 1:05d}-of-00004.safetensors"
        save_file({name: weights[name]}, str(folder / file))
        weight_map[name] = file
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.slow
@pytest.mark.parametrize(
    "function, when, call, replace, new",
    [
        ("fc2conv.jobs.convert.write_safetensors", "after", 2, True, False),  # while writing shard 2
        ("fc2conv.jobs.convert.write_safetensors", "after", 2, False, False),
        ("fc2conv.publish._swap_in", "before", 1, True, False),  # all written and named, not yet in place
        ("fc2conv.publish._swap_in", "after", 1, True, True),  # swapped in; the old folder not yet removed
        ("fc2conv.publish._swap_in", "after", 1, False, True),
        ("shutil.rmtree", "before", 1, True, True),  # removing the old folder
    ],
)
def test_sigkill_of_a_sharded_conversion_leaves_the_old_or_the_complete_new_folder(
    tmp_path, function, when, call, replace, new
):
    source = _shards(tmp_path)
    args = ["convert", source, "--input-shape", "16x3x3"]
    reference = tmp_path / "reference"
    assert CliRunner().invoke(cli, [*map(str, args), "-o", str(reference)]).exit_code == 0
    out = tmp_path / "out"
    if replace:
        out.mkdir()
        (out / "model-00001-of-00004.safetensors").write_bytes(b"old")
        (out / "model.safetensors.index.json").write_text("{}")
    old = _files(out) if replace else None
    done = run_capped(*args, "-o", out, "--force", before=_signal_at(function, when, signal.SIGKILL, call))
    assert done.returncode == -9, done.stderr
    if new:
        assert _files(out) == _files(reference)  # complete, nothing staged inside it
    else:
        assert (_files(out) if out.exists() else None) == old
    leftovers = _hidden(tmp_path)  # only hidden .fc2conv-<pid>-* beside it, and only from the last moments
    assert all(name.startswith(".fc2conv-") for name in leftovers)
    assert not leftovers or function in ("fc2conv.publish._swap_in", "shutil.rmtree")
    again = run_capped(*args, "-o", out, "--force")
    assert again.returncode == 0 and _files(out) == _files(reference) and _hidden(tmp_path) == []


@pytest.mark.slow
@pytest.mark.parametrize("sharded", [False, True])
def test_two_runs_to_the_same_new_output_one_wins_the_other_says_it_exists(tmp_path, sharded):
    source = _shards(tmp_path) if sharded else _big_checkpoint(tmp_path)
    shape = "16x3x3" if sharded else "64x16x16"
    out = tmp_path / ("out" if sharded else "o.safetensors")
    args = [sys.executable, "-m", "fc2conv", "convert", str(source), "--input-shape", shape, "-o", str(out)]
    runs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = sorted((run.wait(timeout=120), run.stderr.read()) for run in runs)
    assert [code for code, _ in results] == [0, 2], results
    assert "already exists; pass --force" in results[1][1]
    assert _hidden(tmp_path) == []
