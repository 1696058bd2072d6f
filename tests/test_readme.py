"""The README's commands print what the README shows (times aside, measured errors within a tolerance)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, SAMPLES, run

# A measured error as printed: 7.91e-07. Its digits depend on the CPU's float rounding (another
# x86 CPU prints 1.31e-06 for the same layer), so they are compared with a tolerance, not as text.
_FIGURE = re.compile(r"\d\.\d\de[-+]\d\d")
_FIGURE_FACTOR = 10.0
# Printed versions of other packages (Keras) change with the installed release.
_VERSION = re.compile(r"(Keras) [0-9][0-9.]*")


def _block_after(readme: str, marker: str) -> str:
    start = readme.index("```text\n", readme.index(marker)) + len("```text\n")
    return readme[start : readme.index("```", start)]


def _normalise(text: str) -> list[str]:
    lines = [line.rstrip() for line in text.strip("\n").splitlines()]
    lines = [re.sub(r"time: [0-9.]+ s", "time: T s", line) for line in lines if line.strip()]
    return [_VERSION.sub(r"\1 V", _FIGURE.sub("F.FFe-FF", line)) for line in lines]


def _figures(text: str) -> list[float]:
    return [float(f) for f in _FIGURE.findall(text)]


def assert_same_output(printed: str, shown: str) -> None:
    """Equal text with each measured error masked, and each error within a factor of the README's."""
    assert _normalise(printed) == _normalise(shown)
    for got, expected in zip(_figures(printed), _figures(shown), strict=True):
        assert expected / _FIGURE_FACTOR <= got <= expected * _FIGURE_FACTOR, (got, expected)


def _run(cwd: Path, *args: str) -> str:
    env = {**os.environ, "NO_COLOR": "1"}
    env.pop("COLUMNS", None)
    done = subprocess.run(
        [sys.executable, "-m", "fc2conv", *args], cwd=cwd, capture_output=True, text=True, check=True, env=env
    )
    return done.stdout


def _command_block(readme: str, marker: str) -> tuple[list[str], str]:
    """A tested block that starts with its command (``$ fc2conv ...``): the arguments and the output shown."""
    block = _block_after(readme, marker)
    command, shown = block.split("\n", 1)
    return command.removeprefix("$ fc2conv ").split(), shown


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    shutil.copytree(SAMPLES, tmp_path / "sample_models")
    return tmp_path


@pytest.mark.slow
def test_main_job_and_verify_print_what_the_readme_shows(workdir):
    readme = (ROOT / "README.md").read_text()
    shown = _block_after(readme, "<!-- tested: the output of the command above")
    printed = _run(workdir, "convert", "sample_models/small_cnn.pt", "--input-shape", "32x4x4", "--force")
    assert_same_output(printed, shown)
    args, verify_shown = _command_block(readme, "<!-- tested: the output of fc2conv verify")
    assert_same_output(_run(workdir, *args), verify_shown)


@pytest.mark.slow
@pytest.mark.parametrize("marker, extra", [("Keras command", "keras"), ("ONNX command", "onnxruntime")])
def test_the_keras_and_onnx_commands_print_what_the_readme_shows(workdir, marker, extra):
    if importlib.util.find_spec(extra) is None:  # not imported here: keras would pick its default backend
        pytest.skip(f"{extra} is not installed")
    args, shown = _command_block((ROOT / "README.md").read_text(), f"<!-- tested: the output of the {marker}")
    assert_same_output(_run(workdir, *args), shown)


def _jsonc(readme: str, marker: str) -> dict:
    """The annotated JSON example after ``marker``, comments and the elided "..." stripped."""
    start = readme.index("```jsonc\n", readme.index(marker)) + len("```jsonc\n")
    text = readme[start : readme.index("```", start)]
    return json.loads(re.sub(r"\s+//.*", "", text))


def test_the_documented_json_keys_are_the_payload_keys(tmp_path):
    readme = (ROOT / "README.md").read_text()
    documented = _jsonc(readme, "<!-- tested: every key of this example")
    result = run("convert", SAMPLES / "small_cnn.pt", "-o", tmp_path / "o.safetensors", "--json")
    payload = json.loads(result.stdout)
    assert set(documented) == set(payload)
    assert set(documented["layers"][0]) == set(payload["layers"][0])
    for sentence in re.findall(r"`end_to_end` is `\{([^}]*)\}`", readme):
        keys = {key.strip() for key in sentence.split(",")}
        model = run("convert", SAMPLES / "digits_cnn.pt", "--model", "sample_models.train_digits:digits_cnn",
                    "--input-shape", "1x8x8", "-o", tmp_path / "d.safetensors", "--json")  # fmt: skip
        assert keys == set(json.loads(model.stdout)["end_to_end"]), model.output


def test_readme_commands_are_the_ci_commands():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python -m pytest\n" in ci and "```bash\npython -m pytest\n```" in readme
    assert 'pip install "torch==2.13.0" -e ".[test]"' in readme
    assert "torch==2.13.0" in ci
