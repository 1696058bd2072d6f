"""The --model paths of the CLI: convert a module, its exports, verify end to end, strict loading."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from fc2conv.graph import convert_module
from tests.architectures import LeNetStyle, MLPHeadBN, build
from tests.conftest import ROOT, run, run_capped


@pytest.fixture
def lenet_pt(tmp_path):
    torch.save(build(LeNetStyle).state_dict(), tmp_path / "lenet.pt")
    return tmp_path / "lenet.pt"


@pytest.mark.slow
def test_convert_model_writes_weights_export_and_reports_end_to_end(tmp_path, lenet_pt):
    result = run(
        "convert",
        lenet_pt,
        "--model",
        "tests.architectures:LeNetStyle",
        "--input-shape",
        "1x28x28",
        "-o",
        tmp_path / "out.safetensors",
        "--export",
        tmp_path / "m.pt2",
        "--json",
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["model_input_shape"] == [1, 28, 28] and payload["input_shape"] == [16, 4, 4]
    assert [layer["became"] for layer in payload["layers"]] == ["Conv 4x4", "Conv 1x1", "Conv 1x1"]
    e2e = payload["end_to_end"]
    assert e2e["ok"] and e2e["max_rel_error"] < 1e-12 and e2e["dense_grid"] == [8, 8]
    assert payload["exports"][0]["kind"] == "torch.export" and payload["exports"][0]["ok"]
    # The weights load into the converted module; the program runs at a new size.
    converted = convert_module(build(LeNetStyle), "1x28x28")
    converted.load_state_dict(load_file(str(tmp_path / "out.safetensors")))
    program = torch.export.load(str(tmp_path / "m.pt2")).module()
    x = torch.randn(2, 1, 37, 45)
    with torch.no_grad():
        torch.testing.assert_close(program(x), converted(x), rtol=1e-5, atol=1e-5)
    table = run(
        "convert",
        lenet_pt,
        "--model",
        "tests.architectures:LeNetStyle",
        "--input-shape",
        "1x28x28",
        "-o",
        tmp_path / "out.safetensors",
        "--force",
    )
    assert "(end to end)" in table.stdout and "map 8x8" in table.stdout


@pytest.mark.slow
def test_convert_model_onnx(tmp_path, lenet_pt):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    result = run(
        "convert",
        lenet_pt,
        "--model",
        "tests.architectures:LeNetStyle",
        "--input-shape",
        "1x28x28",
        "--onnx",
        tmp_path / "m.onnx",
        "--json",
    )
    assert result.exit_code == 0, result.output
    (export,) = json.loads(result.stdout)["exports"]
    assert export["kind"] == "onnx" and export["max_abs_error"] < 1e-4
    assert result.stderr == ""


def test_fold_batchnorm_from_the_cli(tmp_path):
    torch.save(build(MLPHeadBN).state_dict(), tmp_path / "mlp.pt")
    result = run(
        "convert",
        tmp_path / "mlp.pt",
        "--model",
        "tests.architectures:MLPHeadBN",
        "--input-shape",
        "3x12x12",
        "--fold-batchnorm",
        "--json",
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["end_to_end"]["ok"] and [layer["name"] for layer in payload["layers"]] == ["head_layers.4"]
    assert "head_layers.2.running_mean" not in load_file(str(tmp_path / "mlp.conv.safetensors"))


def test_weights_that_do_not_fit_are_listed(tmp_path):
    sd = build(LeNetStyle).state_dict()
    sd.pop("fc3.bias")
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "bad.pt")
    result = run(
        "convert", tmp_path / "bad.pt", "--model", "tests.architectures:LeNetStyle", "--input-shape", "1x28x28"
    )
    assert result.exit_code == 2
    assert "missing: fc3.bias" in result.stderr and "unexpected: extra.weight" in result.stderr
    assert result.stderr.count("\n") == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "nowhere.module:f", "--input-shape", "1x28x28"], "cannot import nowhere.module"),
        (["--model", "tests.architectures:Missing", "--input-shape", "1x28x28"], "has no callable Missing"),
        (["--model", "tests.architectures", "--input-shape", "1x28x28"], "expected package.module:factory"),
        (["--model", "tests.architectures:LeNetStyle"], "the network's input shape CxHxW (e.g. 3x224x224) is needed"),
        (["--model", "tests.architectures:LeNetStyle", "--input-shape", "3x28x28"], "does not run on a 3x28x28"),
        (["--export", "x.pt2"], "--export, --onnx and --fold-batchnorm need --model"),
    ],
)
def test_model_usage_errors(lenet_pt, args, message):
    result = run("convert", lenet_pt, *args)
    assert result.exit_code == 2 and message in result.stderr, result.stderr


def test_verify_model_end_to_end_and_tampering(tmp_path, lenet_pt):
    out = tmp_path / "out.safetensors"
    assert (
        run(
            "convert", lenet_pt, "--model", "tests.architectures:LeNetStyle", "--input-shape", "1x28x28", "-o", out
        ).exit_code
        == 0
    )
    ok = run("verify", lenet_pt, out, "--model", "tests.architectures:LeNetStyle", "--input-shape", "1x28x28", "--json")
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["end_to_end"]["ok"]
    tensors = load_file(str(out))
    tensors["fc1.weight"] = tensors["fc1.weight"].transpose(2, 3).contiguous()
    save_file(tensors, str(tmp_path / "bad.safetensors"))
    bad = run(
        "verify",
        lenet_pt,
        tmp_path / "bad.safetensors",
        "--model",
        "tests.architectures:LeNetStyle",
        "--input-shape",
        "1x28x28",
        "--json",
    )
    assert bad.exit_code == 1
    payload = json.loads(bad.stdout)
    assert payload["end_to_end"]["ok"] is False and payload["layers"][0]["ok"] is False


def test_verify_model_of_a_folded_conversion_is_end_to_end(tmp_path):
    torch.save(build(MLPHeadBN).state_dict(), tmp_path / "mlp.pt")
    args = ["--model", "tests.architectures:MLPHeadBN", "--input-shape", "3x12x12"]
    assert run("convert", tmp_path / "mlp.pt", *args, "--fold-batchnorm").exit_code == 0
    result = run("verify", tmp_path / "mlp.pt", tmp_path / "mlp.conv.safetensors", *args, "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["end_to_end"]["ok"] and "folded" in payload["notes"][0]


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["export_program", "program_error"])
def test_an_interrupt_says_which_outputs_were_written(tmp_path, lenet_pt, moment):
    """SIGTERM while the export is written: the weights are in place and the error says so; once the
    export is in place too (while it is being run), the command has succeeded."""
    out, program = tmp_path / "out.safetensors", tmp_path / "m.pt2"
    before = (
        "import os, signal, fc2conv.jobs.model as _job\n"
        f"_real = _job.{moment}\n"
        "def _wrapped(*args, **kwargs):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return _real(*args, **kwargs)\n"
        f"_job.{moment} = _wrapped\n"
    )
    done = run_capped(
        "convert", lenet_pt, "--model", "tests.architectures:LeNetStyle", "--input-shape", "1x28x28", "-o", out,
        "--export", program, before=before, cap=2**34, timeout=300, cwd=ROOT,
    )  # fmt: skip
    if moment == "export_program":
        assert done.returncode == 143
        assert done.stderr == f"Error: terminated (SIGTERM) after writing {out}; no other output was written\n"
        assert not program.exists()
    else:
        assert done.returncode == 0, done.stderr
        assert program.exists()
    assert load_file(str(out))  # complete
    expected = ["lenet.pt", out.name, *([program.name] if program.exists() else [])]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(expected)  # nothing else, nothing hidden
