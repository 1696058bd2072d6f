"""The trained digits sample, its training script and the dense-prediction demo."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from click.testing import CliRunner

from fc2conv.cli import cli
from sample_models.train_digits import DigitsCNN
from tests.conftest import ROOT, SAMPLES


def test_trained_digits_model_recognises_the_shipped_examples():
    model = DigitsCNN().eval()
    model.load_state_dict(torch.load(SAMPLES / "digits_cnn.pt", weights_only=True))
    examples = torch.load(SAMPLES / "digits_examples.pt", weights_only=True)
    with torch.no_grad():
        predicted = model(examples["images"]).argmax(1)
    assert float((predicted == examples["labels"]).float().mean()) >= 0.95


def test_training_script_reproduces_the_committed_files(tmp_path):
    pytest.importorskip("sklearn")
    from sample_models import train_digits

    assert train_digits.main(["--out", str(tmp_path)]) == 0
    for name in ("digits_cnn.pt", "digits_examples.pt"):
        assert (tmp_path / name).read_bytes() == (SAMPLES / name).read_bytes(), name


def test_digits_model_converts_from_the_cli_with_its_factory(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    result = CliRunner().invoke(cli, ["convert", str(SAMPLES / "digits_cnn.pt"), "--model",
                                      "sample_models.train_digits:digits_cnn", "--input-shape", "1x8x8",
                                      "-o", str(tmp_path / "d.safetensors"), "--export", str(tmp_path / "d.pt2"),
                                      "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["input_shape"] == [32, 4, 4] and payload["end_to_end"]["ok"]
    program = torch.export.load(str(tmp_path / "d.pt2")).module()
    assert program(torch.zeros(1, 1, 22, 72)).shape == (1, 10, 15, 65)


def test_dense_demo_gives_the_per_crop_scores_and_a_png(tmp_path):
    spec = importlib.util.spec_from_file_location("dense_digits", ROOT / "examples" / "dense_digits.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    figures = demo.main(["--png", str(tmp_path / "map.png"), "--repeat", "1"])
    assert figures["difference"] < 1e-4  # the one-pass map equals the original model on every crop
    assert figures["found"] == figures["placed"]  # each pasted digit is read at its position
    png = (tmp_path / "map.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and b"IEND" in png[-12:]
