"""The README's commands print what the README shows (times aside)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from tests.conftest import ROOT, SAMPLES


def _block_after(readme: str, marker: str) -> str:
    start = readme.index("```text\n", readme.index(marker)) + len("```text\n")
    return readme[start : readme.index("```", start)]


def _normalise(text: str) -> list[str]:
    lines = [line.rstrip() for line in text.strip("\n").splitlines()]
    return [re.sub(r"time: [0-9.]+ s", "time: T s", line) for line in lines if line.strip()]


def _run(cwd: Path, *args: str) -> str:
    env = {**os.environ, "NO_COLOR": "1"}
    env.pop("COLUMNS", None)
    done = subprocess.run(
        [shutil.which("fc2conv") or "fc2conv", *args], cwd=cwd, capture_output=True, text=True, check=True, env=env
    )
    return done.stdout


def test_main_job_and_verify_print_what_the_readme_shows(tmp_path):
    readme = (ROOT / "README.md").read_text()
    (tmp_path / "sample_models").mkdir()
    shutil.copy(SAMPLES / "small_cnn.pt", tmp_path / "sample_models")
    shown = _block_after(readme, "<!-- tested: the output of the command above")
    printed = _run(tmp_path, "convert", "sample_models/small_cnn.pt", "--input-shape", "32x4x4", "--force")
    assert _normalise(printed) == _normalise(shown)
    verify_shown = _block_after(readme, "<!-- tested: the output of fc2conv verify")
    verify_shown = verify_shown.split("\n", 1)[1]  # drop the "$ fc2conv verify ..." line
    printed = _run(tmp_path, "verify", "sample_models/small_cnn.pt", "sample_models/small_cnn.conv.safetensors")
    assert _normalise(printed) == _normalise(verify_shown)


def test_readme_commands_are_the_ci_commands():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python -m pytest\n" in ci and "```bash\npython -m pytest\n```" in readme
    assert 'pip install "torch==2.13.0" -e ".[test]"' in readme
    assert "torch==2.13.0" in ci
