"""Shared fixtures: tiny checkpoints built in tmp_path, and the sample models' module."""

from __future__ import annotations

import importlib.util
import json
import os
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner, Result

from fc2conv.cli import cli

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_models"


def _load_samples_module():
    spec = importlib.util.spec_from_file_location("make_samples", SAMPLES / "make_samples.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_samples"] = module
    spec.loader.exec_module(module)
    return module


make_samples = _load_samples_module()


# --- the README ---------------------------------------------------------------------------------------


def readme_safety_row(case_id: str) -> str:
    """The row of the README's safety tables that names the case ``case_id`` (fails the test if none does)."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Safety and failure behaviour") :]
    row = next((line for line in section.splitlines() if f"`{case_id}`" in line), None)
    assert row is not None, f"README has no row for {case_id}"
    return row


# --- running the command line ---------------------------------------------------------------------


def run(*args: object) -> Result:
    """The CLI in process (CliRunner), exceptions not caught: a bug fails the test with its traceback."""
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def run_process(*args: object, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """``python -m fc2conv ARGS`` in a new process (no activated venv needed), output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "fc2conv", *map(str, args)], capture_output=True, text=True, check=False, **kwargs
    )


# Address space of one command run by run_capped: a normal run maps about 0.9 GB (torch's libraries included),
# so a regression that allocates gigabytes on the word of a file fails the test instead of exhausting the machine.
MEMORY_CAP = 1536 * 2**20


def run_capped(
    *args: object, cap: int = MEMORY_CAP, timeout: float = 60, before: str = "", **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    """The CLI in a new process, its address space capped (RLIMIT_AS) and its time bounded.

    ``before`` is Python code run in that process before the command (to wrap a function, say). A run
    that blocks past ``timeout`` is killed and the test fails with ``TimeoutExpired``.
    """
    code = (
        "import resource, sys\n"
        f"resource.setrlimit(resource.RLIMIT_AS, ({cap}, {cap}))\n"
        f"{before}\n"
        "from fc2conv.cli import main\n"
        "main(sys.argv[1:])\n"
    )
    # One thread and few malloc arenas: on a many-core CI machine each thread would reserve address space.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2", **kwargs.pop("env", {})}
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, check=False, timeout=timeout,
        env=env, **kwargs,
    )  # fmt: skip


def error_line(result: Result) -> str:
    """The one ``Error:`` line a failed command prints on stderr (and nothing else, no traceback)."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    assert "Traceback" not in result.output
    return lines[0]


# --- safetensors bytes built by hand (for headers that no writer would produce) --------------------


def st_entry(dtype: str = "F32", shape: tuple[int, ...] = (2,), offsets: tuple[int, int] = (0, 8)) -> dict[str, Any]:
    """One header entry of a safetensors file."""
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def st_bytes(header: dict[str, Any] | bytes, data: bytes = b"", length: int | None = None) -> bytes:
    """A safetensors file: the 8-byte header length (``length`` if given, to lie), the header, the data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def head_state_dict(
    c: int = 8,
    h: int = 3,
    w: int = 3,
    widths: tuple[int, ...] = (16, 5),
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    bias: bool = True,
) -> dict[str, torch.Tensor]:
    """A conv feature extractor ending in C channels, then an FC chain C*H*W -> widths[0] -> ..."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {
        "features.0.weight": torch.randn(c, 3, 3, 3, generator=g),
        "features.0.bias": torch.randn(c, generator=g),
    }
    fan_in = c * h * w
    for i, out in enumerate(widths):
        sd[f"fc{i + 1}.weight"] = torch.randn(out, fan_in, generator=g) / fan_in**0.5
        if bias:
            sd[f"fc{i + 1}.bias"] = torch.randn(out, generator=g)
        fan_in = out
    return {k: v.to(dtype) for k, v in sd.items()}


@pytest.fixture(autouse=True)
def _restore_torch_settings():
    """A test that changes torch's global settings (threads, deterministic mode) does not change the next."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    if torch.are_deterministic_algorithms_enabled() != deterministic:  # the call costs seconds: only if needed
        torch.use_deterministic_algorithms(deterministic)


@pytest.fixture
def samples():
    return make_samples


@pytest.fixture
def save_pt(tmp_path: Path) -> Callable[..., Path]:
    def save(obj: object, name: str = "model.pt") -> Path:
        path = tmp_path / name
        torch.save(obj, path)
        return path

    return save


@pytest.fixture
def head_pt(save_pt) -> Path:
    return save_pt(head_state_dict(), "head.pt")
