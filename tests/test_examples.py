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


@pytest.mark.slow
def test_training_script_reproduces_the_committed_model(tmp_path):
    """Retrained here, the model is the committed one up to this CPU's rounding: same accuracy, same
    predictions, weights within a few percent (bytes differ from CPU to CPU, so they are not compared)."""
    pytest.importorskip("sklearn")
    from sample_models import train_digits

    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    assert train_digits.main(["--out", str(tmp_path)]) == 0
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == (threads, deterministic)
    committed, retrained = DigitsCNN().eval(), DigitsCNN().eval()
    committed.load_state_dict(torch.load(SAMPLES / "digits_cnn.pt", weights_only=True))
    retrained.load_state_dict(torch.load(tmp_path / "digits_cnn.pt", weights_only=True))
    for name, weight in committed.state_dict().items():
        relative = float((retrained.state_dict()[name] - weight).norm() / weight.norm())
        assert relative < 0.25, (name, relative)  # another seed gives 1.1 to 1.5
    _, _, x_test, y_test = train_digits.load_data()
    with torch.no_grad():
        ours, theirs = retrained(x_test).argmax(1), committed(x_test).argmax(1)
    assert float((ours == y_test).float().mean()) >= 0.95
    assert float((ours == theirs).float().mean()) >= 0.97
    examples = torch.load(tmp_path / "digits_examples.pt", weights_only=True)
    shipped = torch.load(SAMPLES / "digits_examples.pt", weights_only=True)
    assert torch.equal(examples["labels"], shipped["labels"]) and torch.equal(examples["images"], shipped["images"])


@pytest.mark.slow
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


@pytest.mark.slow
def test_dense_demo_gives_the_per_crop_scores_and_a_png(tmp_path):
    spec = importlib.util.spec_from_file_location("dense_digits", ROOT / "examples" / "dense_digits.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    figures = demo.main(["--png", str(tmp_path / "map.png"), "--repeat", "1"])
    assert figures["difference"] < 1e-4  # the one-pass map equals the original model on every crop
    assert figures["found"] == figures["placed"]  # each pasted digit is read at its position
    png = (tmp_path / "map.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and b"IEND" in png[-12:]
