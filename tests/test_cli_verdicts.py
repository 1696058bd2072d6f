"""Every `ok` and PASS means what a user reads into it: geometry checked, every head converted, layouts
proven, the --model path true to its word, exit 1 saying why, and tables readable where people read them."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.architectures import LeNetStyle, TimmStyle, TwoHeadsStyle, build
from tests.conftest import SAMPLES, error_line, head_state_dict, run
from tests.test_heads import SqueezeExcite, TwoHeads

SMALL_CNN = SAMPLES / "small_cnn.pt"


# --- 1. geometry checked against the checkpoint --------------------------------------------------


@pytest.mark.parametrize("given", ["32x4", "8x8", "2x16x16"])
def test_a_shape_contradicting_the_last_conv_is_exit_2_naming_both_numbers(tmp_path, given):
    result = run("convert", SMALL_CNN, "--input-shape", given, "-o", tmp_path / "o.safetensors")
    assert result.exit_code == 2
    line = error_line(result)
    assert "classifier.1 reads a map of 32 channels (features.3 (conv, 32 channels)" in line
    assert f"the input shape {given} means" in line and "pass --trust-shape" in line
    assert not (tmp_path / "o.safetensors").exists()
    assert (
        run("convert", SMALL_CNN, "--input-shape", given, "--trust-shape", "-o", tmp_path / "t.safetensors").exit_code
        == 0
    )


@pytest.mark.parametrize("given", ["x4x4", "32x4x4x"])
def test_malformed_shapes_are_usage_errors(tmp_path, given):
    result = run("convert", SMALL_CNN, "--input-shape", given, "-o", tmp_path / "o.safetensors")
    assert result.exit_code == 2 and "has an empty part" in error_line(result)


# --- 3. every Linear accounted for, and the right chain ---------------------------------------------


def test_two_heads_on_one_map_are_converted_and_verified(tmp_path):
    torch.manual_seed(0)
    model = TwoHeads().eval()
    torch.save(model.state_dict(), tmp_path / "heads.pt")
    out = tmp_path / "heads.conv.safetensors"
    converted = run("convert", tmp_path / "heads.pt", "--json")
    assert converted.exit_code == 0, converted.output
    payload = json.loads(converted.stdout)
    assert [(layer["name"], layer["became"]) for layer in payload["layers"]] == [
        ("cls", "Conv 4x4"), ("box.0", "Conv 4x4"), ("box.2", "Conv 1x1")]  # fmt: skip
    assert payload["skipped_layers"] == []
    assert run("verify", tmp_path / "heads.pt", out).exit_code == 0
    kernels = load_file(str(out))
    x = torch.randn(3, 3, 4, 4)
    with torch.no_grad():
        feature_map = model.features(x)
        scores = torch.nn.functional.conv2d(feature_map, kernels["cls.weight"], kernels["cls.bias"]).flatten(1)
        torch.testing.assert_close(scores, model(x)[0], rtol=1e-5, atol=1e-5)


def test_a_converted_file_is_refused_as_input(tmp_path):
    out = tmp_path / "o.safetensors"
    assert run("convert", SMALL_CNN, "-o", out).exit_code == 0
    again = run("convert", out, "--layers", "classifier", "-o", tmp_path / "again.safetensors")
    assert again.exit_code == 2
    assert "is already a conversion by fc2conv (classifier.1 -> Conv 4x4, classifier.5 -> Conv 1x1)" in error_line(
        again
    )


def test_a_squeeze_excitation_block_is_listed_and_the_head_converted(tmp_path):
    torch.save(SqueezeExcite(conv_after=False).state_dict(), tmp_path / "se.pt")
    result = run("convert", tmp_path / "se.pt", "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert [layer["name"] for layer in payload["layers"]] == ["head"]
    assert {s["name"]: s["shape"] for s in payload["skipped_layers"]} == {"se.fc1": [8, 32], "se.fc2": [32, 8]}
    assert all("squeeze-and-excitation" in s["reason"] for s in payload["skipped_layers"])
    table = run("convert", tmp_path / "se.pt", "--force")
    assert "left as it is: se.fc1 (8x32): a squeeze-and-excitation pair" in table.stdout


def test_a_later_layer_selected_alone_is_a_1x1_conv(tmp_path):
    result = run("convert", SMALL_CNN, "--layers", r"classifier\.5", "-o", tmp_path / "o.safetensors", "--json")
    assert result.exit_code == 0, result.output
    (layer,) = json.loads(result.stdout)["layers"]
    assert (layer["name"], layer["became"], layer["new_shape"]) == ("classifier.5", "Conv 1x1", [10, 128, 1, 1])


# --- 6. the --model path keeps its promises ----------------------------------------------------------


def test_an_fp16_checkpoint_with_model_stays_fp16(tmp_path):
    torch.save(build(LeNetStyle).half().state_dict(), tmp_path / "half.pt")
    out = tmp_path / "half.conv.safetensors"
    result = run("convert", tmp_path / "half.pt", "--model", "tests.architectures:LeNetStyle",
                 "--input-shape", "1x28x28", "-o", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    with safe_open(str(out), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}  # noqa: SIM118
    assert run("verify", tmp_path / "half.pt", out).exit_code == 0


@pytest.mark.parametrize("given", ["16x4x4", "1x28x28x"])
def test_a_wrong_network_shape_with_model_is_one_line_naming_the_module(tmp_path, given):
    torch.save(build(LeNetStyle).state_dict(), tmp_path / "m.pt")
    result = run("convert", tmp_path / "m.pt", "--model", "tests.architectures:LeNetStyle", "--input-shape", given)
    assert result.exit_code == 2
    line = error_line(result)
    if given == "16x4x4":
        assert (
            "LeNetStyle does not run on a 16x4x4 input (the network's input, not the map its head reads): at conv1"
            in line
        )


@pytest.mark.parametrize("factory", ["TwoHeadsStyle", "TimmStyle"])
def test_tuple_outputs_and_linear_subclasses_convert_and_verify_end_to_end(tmp_path, factory):
    cls = {"TwoHeadsStyle": TwoHeadsStyle, "TimmStyle": TimmStyle}[factory]
    torch.save(build(cls).state_dict(), tmp_path / "m.pt")
    shape = "x".join(map(str, cls.input_shape))
    args = ["--model", f"tests.architectures:{factory}", "--input-shape", shape]
    result = run("convert", tmp_path / "m.pt", *args, "--json")
    assert result.exit_code == 0, result.output
    e2e = json.loads(result.stdout)["end_to_end"]
    assert e2e["ok"] and e2e["max_rel_error"] < 1e-12 and e2e["dense_max_rel_error"] < 1e-12
    assert run("verify", tmp_path / "m.pt", tmp_path / "m.conv.safetensors", *args).exit_code == 0


def test_onnx_without_its_extra_fails_before_anything_is_written(tmp_path, monkeypatch):
    torch.save(build(LeNetStyle).state_dict(), tmp_path / "m.pt")
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if the onnx extra were not installed
    result = run("convert", tmp_path / "m.pt", "--model", "tests.architectures:LeNetStyle", "--input-shape",
                 "1x28x28", "--onnx", tmp_path / "m.onnx")  # fmt: skip
    assert result.exit_code == 2
    assert 'install it from fc2conv\'s folder: pip install -e ".[onnx]"' in error_line(result)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


class CountsItsUnpickling:
    """Appends a line to a file each time it is unpickled: how many times did fc2conv unpickle the file?"""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (_count, (self.path,))


def _count(path: str) -> str:
    with open(path, "a") as f:
        f.write("unpickled\n")
    return path


def test_trust_pickle_unpickles_a_file_once(tmp_path):
    counter = tmp_path / "count.txt"
    sd = {**head_state_dict(c=8, h=3, w=3, widths=(5,)), "meta": CountsItsUnpickling(str(counter))}
    torch.save(sd, tmp_path / "m.pt")
    assert run("convert", tmp_path / "m.pt", "--trust-pickle", "--input-shape", "8x3x3").exit_code == 0
    assert counter.read_text().count("unpickled") == 1
    assert run("verify", tmp_path / "m.pt", tmp_path / "m.conv.safetensors", "--trust-pickle").exit_code == 0
    assert counter.read_text().count("unpickled") == 2


def test_tolerances_apply_end_to_end_too(tmp_path):
    torch.save(build(LeNetStyle).state_dict(), tmp_path / "m.pt")
    args = ["--model", "tests.architectures:LeNetStyle", "--input-shape", "1x28x28"]
    assert run("convert", tmp_path / "m.pt", *args).exit_code == 0
    strict = run("verify", tmp_path / "m.pt", tmp_path / "m.conv.safetensors", *args, "--atol", "0", "--rtol", "0",
                 "--json")  # fmt: skip
    payload = json.loads(strict.stdout)
    assert (payload["end_to_end"]["atol"], payload["end_to_end"]["rtol"]) == (0.0, 0.0)
    assert strict.exit_code == 1  # float32 layers are not exact, and now neither is the model end to end


# --- 7. exit 1 says why -------------------------------------------------------------------------


def test_strict_nan_is_exit_1_with_the_layer_and_the_reason(tmp_path):
    sd = head_state_dict(c=8, h=3, w=3, widths=(5,))
    sd["fc1.weight"][0, 0] = float("nan")
    torch.save(sd, tmp_path / "m.pt")
    result = run("convert", tmp_path / "m.pt", "--input-shape", "8x3x3", "--strict", "--json")
    assert result.exit_code == 1
    line = [x for x in result.stderr.splitlines() if x.startswith("Error: ")]
    assert line == [
        "Error: check failed: fc1: non-finite (NaN/Inf) weights or outputs, refused as strict; no output was written"
    ]
    payload = json.loads(result.stdout)
    assert payload["layers"][0]["problem"] == "non-finite (NaN/Inf) weights or outputs, refused as strict"
    assert payload["problem"].startswith("fc1: non-finite")


def test_a_verify_fail_names_the_layer_and_the_numbers(tmp_path):
    out = tmp_path / "o.safetensors"
    run("convert", SMALL_CNN, "-o", out)
    tensors = load_file(str(out))
    with safe_open(str(out), "pt") as f:
        metadata = f.metadata()
    tensors["classifier.1.weight"] = tensors["classifier.1.weight"] * 1.5
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata)
    result = run("verify", SMALL_CNN, tmp_path / "bad.safetensors", "--json")
    assert result.exit_code == 1
    line = error_line(result)
    assert re.search(r"Error: check failed: classifier\.1: .*max abs error [0-9.e+-]+ > [0-9.e+-]+ allowed", line)
    assert json.loads(result.stdout)["layers"][0]["problem"]


# --- 8. readable where people read it -------------------------------------------------------------

LONG = ["encoder.layer.11.attention.output.dense", "classifier.head.projection.final_linear_layer"]


def _long_named(tmp_path: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    sd = {
        "backbone.stage4.block2.conv.weight": torch.randn(8, 3, 3, 3, generator=g),
        f"{LONG[0]}.weight": torch.randn(1_000, 72, generator=g) / 9,
        f"{LONG[0]}.bias": torch.randn(1_000, generator=g),
        f"{LONG[1]}.weight": torch.randn(10, 1_000, generator=g) / 32,
    }
    torch.save(sd, tmp_path / "long.pt")
    return tmp_path / "long.pt"


def _layer_column(stdout: str) -> list[str]:
    """The Layer column's text, each name whole again (a folded name continues on the next lines).

    A row starts where its Check cell (the last column, filled on a row's first line only) is filled.
    """
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.lstrip().startswith("Layer"))
    start = lines[header].index("Layer")
    end = lines[header].index(lines[header][start:].split()[1], start)
    check = max(line.rfind("Check") for line in lines[header - 1 : header + 1])
    names: list[str] = []
    for line in lines[header + 2 :]:
        if not line.strip():
            break
        cell = line[start:end].strip()
        if line[check:].strip():
            names.append(cell)
        elif cell:
            names[-1] += cell
    return names


@pytest.mark.parametrize("columns", [80, 120])
@pytest.mark.parametrize("command", ["convert", "verify"])
def test_tables_fit_the_terminal_and_keep_every_name_whole(tmp_path, monkeypatch, columns, command):
    source = _long_named(tmp_path)
    assert run("convert", source, "--input-shape", "8x3x3").exit_code == 0
    monkeypatch.setenv("COLUMNS", str(columns))
    args = ["convert", source, "--input-shape", "8x3x3", "--force"] if command == "convert" else [
        "verify", source, tmp_path / "long.conv.safetensors"]  # fmt: skip
    result = run(*args)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    table = "\n".join(lines[: next(i for i, line in enumerate(lines) if line.startswith("  checked:"))])
    assert all(len(line) <= columns for line in table.splitlines()), table
    assert _layer_column(result.stdout) == LONG
    assert "…" not in table  # nothing truncated


def test_notes_stay_whole_lines_when_piped(tmp_path):
    result = run("convert", SMALL_CNN, "-o", tmp_path / "o.safetensors")
    notes = [line for line in result.stdout.splitlines() if line.startswith("  input shape")]
    assert notes == [
        "  input shape 32x4x4 inferred: C = 32 from features.3 (the last conv before classifier.1), square map "
        "assumed (512 = 32x4x4)"
    ]
    assert not result.stdout.lstrip().startswith("error")


def test_bare_command_prints_help_and_succeeds_and_debug_goes_anywhere(tmp_path):
    bare = run()
    assert bare.exit_code == 0 and "Commands:" in bare.stdout and bare.stderr == ""
    debug = run("convert", tmp_path / "missing.pt", "--debug")
    assert debug.exit_code == 2 and "Traceback" in debug.stderr and "Error: " in debug.stderr


def test_each_command_describes_its_own_options():
    inspect_help = run("inspect", "--help").stdout
    assert "--model" not in inspect_help
    verify_help = run("verify", "--help").stdout
    assert "ORIGINAL's weights go into it" in verify_help and "Convert the model" not in verify_help


def test_state_dict_key_chooses_the_ema_weights(tmp_path):
    sd = head_state_dict(c=8, h=3, w=3, widths=(5,))
    ema = {k: v + 1 for k, v in sd.items()}
    torch.save({"model": sd, "model_ema": ema}, tmp_path / "ckpt.pt")
    default = json.loads(run("convert", tmp_path / "ckpt.pt", "--input-shape", "8x3x3", "--json").stdout)
    assert any("also holds 'model_ema'" in note for note in default["load_notes"])
    chosen = run("convert", tmp_path / "ckpt.pt", "--input-shape", "8x3x3", "--state-dict-key", "model_ema",
                 "-o", tmp_path / "ema.safetensors")  # fmt: skip
    assert chosen.exit_code == 0
    assert torch.equal(load_file(str(tmp_path / "ema.safetensors"))["fc1.bias"], ema["fc1.bias"])


# --- 2. flatten order: say what is proven, and bring evidence ----------------------------------------


def test_trained_channels_last_weights_converted_as_chw_get_a_warning_with_the_figures(tmp_path):
    source = SAMPLES / "digits_channels_last.safetensors"
    result = run("convert", source, "-o", tmp_path / "o.safetensors", "--json")
    assert result.exit_code == 0  # the conversion is what was asked for; the warning says it is doubtful
    warning = [line for line in result.stderr.splitlines() if line.startswith("Warning: ")]
    assert len(warning) == 1 and "flatten order chw is in use, but the weights fit hwc order" in warning[0]
    evidence = json.loads(result.stdout)["evidence"]
    assert evidence["order"]["strength"] == "clear" and evidence["order"]["favoured"] == "hwc"
    assert evidence["order"]["margin"] > 1.1 and evidence["warnings"]
    assert evidence["geometry"]["favoured"] == [32, 4, 4]  # and the inferred map is the one the weights show
    strict = run("convert", source, "-o", tmp_path / "s.safetensors", "--strict")
    assert strict.exit_code == 1 and "evidence (strict)" in error_line_of(strict)
    assert not (tmp_path / "s.safetensors").exists()
    right = run("convert", source, "--flatten-order", "hwc", "-o", tmp_path / "h.safetensors", "--strict", "--json")
    assert right.exit_code == 0 and json.loads(right.stdout)["evidence"]["warnings"] == []


def test_the_trained_pytorch_sample_is_evidence_for_chw_and_random_weights_claim_nothing(tmp_path):
    trained = json.loads(run("convert", SAMPLES / "digits_cnn.pt", "-o", tmp_path / "d.safetensors", "--json").stdout)
    assert trained["evidence"]["order"]["favoured"] == "chw" and trained["evidence"]["warnings"] == []
    untrained = run("convert", SAMPLES / "channels_last_head.safetensors", "--input-shape", "8x3x5",
                    "-o", tmp_path / "u.safetensors", "--json")  # fmt: skip
    evidence = json.loads(untrained.stdout)["evidence"]
    assert evidence["order"]["strength"] == "weak" and evidence["warnings"] == [] and untrained.stderr == ""


def test_verify_weighs_the_recorded_order_and_inspect_shows_the_evidence_when_asked(tmp_path):
    source = SAMPLES / "digits_channels_last.safetensors"
    assert run("convert", source, "-o", tmp_path / "o.safetensors").exit_code == 0
    verified = run("verify", source, tmp_path / "o.safetensors")
    assert verified.exit_code == 0 and "Warning: classifier.1: flatten order chw is in use" in verified.stderr
    assert run("verify", source, tmp_path / "o.safetensors", "--strict").exit_code == 1
    plain = run("inspect", source)
    assert "order evidence" not in plain.stdout and plain.stderr == ""
    asked = run("inspect", source, "--evidence")
    assert "order evidence (clear): the weights fit hwc order" in asked.stdout


def error_line_of(result) -> str:
    return next(line for line in result.stderr.splitlines() if line.startswith("Error: "))


def test_tolerances_apply_to_onnx_pairs(tmp_path):
    pytest.importorskip("onnxruntime")
    converted = tmp_path / "d.conv.onnx"
    assert run("convert", SAMPLES / "digits_cnn.onnx", "-o", converted).exit_code == 0
    assert run("verify", SAMPLES / "digits_cnn.onnx", converted).exit_code == 0
    exact = run("verify", SAMPLES / "digits_cnn.onnx", converted, "--atol", "0", "--rtol", "0", "--json")
    payload = json.loads(exact.stdout)
    assert exact.exit_code == 1 and (payload["end_to_end"]["atol"], payload["end_to_end"]["rtol"]) == (0.0, 0.0)
    assert {(layer["atol"], layer["rtol"]) for layer in payload["layers"]} == {(0.0, 0.0)}
