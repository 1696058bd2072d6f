"""The command line: exit codes, one-line errors, JSON, tables; through CliRunner and the installed script."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import fc2conv.convert
import fc2conv.jobs.convert
from fc2conv import __version__
from tests.conftest import SAMPLES, error_line, head_state_dict, run

SMALL_CNN = SAMPLES / "small_cnn.pt"


def test_convert_sample_prints_table_and_writes_safetensors(tmp_path):
    out = tmp_path / "small.safetensors"
    result = run("convert", SMALL_CNN, "--input-shape", "32x4x4", "-o", out)
    assert result.exit_code == 0, result.output
    for text in ["classifier.1", "Conv 4x4", "128x32x4x4", "classifier.5", "Conv 1x1", "ok", "untouched: 11"]:
        assert text in result.stdout
    assert "\x1b[" not in result.stdout  # plain when not a terminal
    tensors = load_file(str(out))
    assert tensors["classifier.1.weight"].shape == (128, 32, 4, 4)
    original = torch.load(SMALL_CNN, weights_only=True)
    assert torch.equal(tensors["classifier.1.weight"].flatten(1), original["classifier.1.weight"])
    assert torch.equal(tensors["features.0.weight"], original["features.0.weight"])
    with safe_open(str(out), "pt") as f:
        metadata = f.metadata()
    assert metadata["format"] == "pt" and metadata["fc2conv.version"] == __version__
    assert metadata["fc2conv.input_shape"] == "32x4x4" and metadata["fc2conv.flatten_order"] == "chw"
    layers = json.loads(metadata["fc2conv.layers"])
    assert [(entry["name"], entry["new_shape"]) for entry in layers] == [
        ("classifier.1", [128, 32, 4, 4]),
        ("classifier.5", [10, 128, 1, 1]),
    ]


def test_convert_json_is_one_object_with_measured_errors(tmp_path):
    result = run("convert", SMALL_CNN, "-o", tmp_path / "o.safetensors", "--json")
    assert result.exit_code == 0
    payload = json.loads(result.stdout)  # the whole stdout is one JSON object
    assert payload["ok"] is True and payload["written"] is True
    assert payload["input_shape"] == [32, 4, 4] and payload["flatten_order"] == "chw"
    assert payload["output"] == str(tmp_path / "o.safetensors")
    assert payload["output_bytes"] == (tmp_path / "o.safetensors").stat().st_size
    assert [layer["name"] for layer in payload["layers"]] == ["classifier.1", "classifier.5"]
    for layer in payload["layers"]:
        assert set(layer) >= {"name", "old_shape", "new_shape", "max_abs_error", "max_rel_error"}
        assert 0 < layer["max_rel_error"] < 1e-5  # float32 rounding: measured, not zero, not large
    assert any("inferred" in note for note in payload["notes"])
    assert result.stderr == ""


def test_default_output_is_beside_the_input_and_kept_without_force(tmp_path):
    source = tmp_path / "model.pt"
    shutil.copy(SMALL_CNN, source)
    assert run("convert", source).exit_code == 0
    out = tmp_path / "model.conv.safetensors"
    assert out.exists()
    before = out.read_bytes()
    again = run("convert", source)
    assert again.exit_code == 2
    assert "already exists; pass --force" in error_line(again)
    assert out.read_bytes() == before
    assert run("convert", source, "--force").exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.conv.safetensors", "model.pt"]


def test_hwc_sample_needs_shape_and_order(tmp_path, samples):
    source = SAMPLES / "channels_last_head.safetensors"
    inferred = run("convert", source, "-o", tmp_path / "x.safetensors")
    assert inferred.exit_code == 2
    assert "8x3x5" in error_line(inferred)
    result = run(
        "convert",
        source,
        "--input-shape",
        "8x3x5",
        "--flatten-order",
        "hwc",
        "-o",
        tmp_path / "x.safetensors",
        "--json",
    )
    assert result.exit_code == 0
    payload = json.loads(result.stdout)
    assert payload["flatten_order"] == "hwc" and payload["layers"][0]["became"] == "Conv 3x5"
    # The converted kernel computes what the channels-last model computes.
    model = samples.ChannelsLastHead().double()
    model.load_state_dict({k: v.double() for k, v in load_file(str(source)).items()})
    converted = load_file(str(tmp_path / "x.safetensors"))
    feature_map = torch.randn(3, 8, 3, 5, dtype=torch.float64)
    y = torch.relu(
        torch.nn.functional.conv2d(feature_map, converted["dense1.weight"].double(), converted["dense1.bias"].double())
    )
    y = torch.nn.functional.conv2d(y, converted["dense2.weight"].double(), converted["dense2.bias"].double())
    torch.testing.assert_close(y.flatten(1), model.head(feature_map), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--input-shape", "4xfourx4"], "Invalid value for '--input-shape'"),
        (["--input-shape", "0x4x4"], "at least 1"),
        (["--input-shape", "32x4x5"], "classifier.1 takes 512 inputs; 32x4x5 = 640"),
        (["--flatten-order", "whc"], "'whc' is not one of"),
        (["--layers", "nothing"], "no fully connected layer whose name matches 'nothing'"),
        (["--bogus"], "No such option '--bogus' (see 'fc2conv convert --help')"),
    ],
)
def test_bad_usage_is_exit_2_with_one_error_line(tmp_path, args, fragment):
    result = run("convert", SMALL_CNN, "-o", tmp_path / "o.safetensors", *args)
    assert result.exit_code == 2
    assert fragment in error_line(result)
    assert not (tmp_path / "o.safetensors").exists()


def test_unreadable_inputs_are_exit_2(tmp_path, save_pt):
    missing = run("convert", tmp_path / "none.pt")
    assert missing.exit_code == 2 and "no such file" in error_line(missing)
    module = tmp_path / "module.pt"
    torch.save(torch.nn.Linear(3, 2), module)
    refused = run("convert", module)
    assert refused.exit_code == 2 and "refused to load" in error_line(refused)
    convs_only = save_pt({"conv.weight": torch.zeros(4, 3, 3, 3)}, "convs.pt")
    nothing = run("convert", convs_only)
    assert nothing.exit_code == 2 and "run 'fc2conv inspect'" in error_line(nothing)


def test_output_equal_to_input_is_refused_even_with_force(tmp_path):
    source = tmp_path / "m.pt"
    shutil.copy(SMALL_CNN, source)
    before = source.read_bytes()
    result = run("convert", source, "-o", source, "--force")
    assert result.exit_code == 2 and "refusing to write over the input" in error_line(result)
    assert source.read_bytes() == before


def test_failed_self_check_is_exit_1_and_leaves_no_output(tmp_path, monkeypatch):
    real = fc2conv.convert.fc_to_conv_weight
    monkeypatch.setattr(fc2conv.convert, "fc_to_conv_weight", lambda w, c: real(w, c).flip(0).contiguous())
    # A wrong rule: its kernels go through torch (not copied from the input), and the checks catch them.
    monkeypatch.setattr(fc2conv.jobs.convert, "keeps_bytes", lambda change: False)
    out = tmp_path / "o.safetensors"
    result = run("convert", SMALL_CNN, "-o", out, "--json")
    assert result.exit_code == 1
    payload = json.loads(result.stdout)
    assert payload["ok"] is False and payload["written"] is False
    assert not payload["layers"][0]["ok"] and payload["layers"][0]["max_rel_error"] > 0.01
    assert list(tmp_path.iterdir()) == []
    table = run("convert", SMALL_CNN, "-o", out)
    assert table.exit_code == 1 and "FAIL" in table.stdout and "output not written" in table.stdout


def test_json_error_is_still_one_object_on_stdout(tmp_path):
    result = run("convert", tmp_path / "none.pt", "--json")
    assert result.exit_code == 2
    payload = json.loads(result.stdout)
    assert payload == {"ok": False, "error": payload["error"], "exit_code": 2}
    assert "no such file" in payload["error"]


def test_inspect_table_and_json():
    result = run("inspect", SAMPLES / "lenet_wrapped.pth")
    assert result.exit_code == 0
    for text in [
        "conv2",
        "Conv2d",
        "fc1",
        "Linear",
        "Conv 5x5",
        "model_state_dict",
        "'module.'",
        "--input-shape 16x5x5",
    ]:
        assert text in result.stdout
    payload = json.loads(run("inspect", SAMPLES / "lenet_wrapped.pth", "--json").stdout)
    assert [c["name"] for c in payload["chain"]] == ["fc1", "fc2", "fc3"]
    assert payload["input_shape"] == [16, 5, 5]
    assert {layer["name"]: layer["kind"] for layer in payload["layers"]}["conv1"] == "Conv2d"
    assert payload["totals"]["parameters"] == sum(
        v.numel() for v in torch.load(SAMPLES / "lenet_wrapped.pth", weights_only=True)["model_state_dict"].values()
    )


def test_inspect_reports_why_there_is_no_plan_and_still_exits_0():
    result = run("inspect", SAMPLES / "channels_last_head.safetensors", "--json")
    assert result.exit_code == 0
    payload = json.loads(result.stdout)
    assert payload["chain"] == [] and "8x3x5" in payload["plan_problem"]
    with_shape = json.loads(
        run("inspect", SAMPLES / "channels_last_head.safetensors", "--input-shape", "8x3x5", "--json").stdout
    )
    assert with_shape["input_shape"] == [8, 3, 5]
    bad = run("inspect", SAMPLES / "channels_last_head.safetensors", "--input-shape", "8x4x4")
    assert bad.exit_code == 2 and "dense1 takes 120 inputs; 8x4x4 = 128" in error_line(bad)


def test_verify_passes_on_a_conversion_and_fails_on_tampering(tmp_path):
    out = tmp_path / "o.safetensors"
    run("convert", SMALL_CNN, "-o", out)
    ok = run("verify", SMALL_CNN, out, "--json")
    assert ok.exit_code == 0, ok.output
    payload = json.loads(ok.stdout)
    assert payload["ok"] and payload["identical_tensors"] == 11 and payload["mismatches"] == []
    assert all(layer["exact"] for layer in payload["layers"])

    tensors = load_file(str(out))
    with safe_open(str(out), "pt") as f:
        metadata = f.metadata()
    kernel = tensors["classifier.1.weight"].clone()
    kernel[0, 0, 0, 0] += 0.5
    save_file({**tensors, "classifier.1.weight": kernel}, str(tmp_path / "drift.safetensors"), metadata)
    drift = run("verify", SMALL_CNN, tmp_path / "drift.safetensors")
    assert drift.exit_code == 1 and "FAIL" in drift.stdout

    other = {**tensors, "features.0.bias": tensors["features.0.bias"] + 1e-6}
    save_file(other, str(tmp_path / "other.safetensors"), metadata)
    changed = json.loads(run("verify", SMALL_CNN, tmp_path / "other.safetensors", "--json").stdout)
    assert changed["ok"] is False
    assert changed["mismatches"][0]["name"] == "features.0.bias"
    assert "values differ" in changed["mismatches"][0]["reason"]

    missing = {k: v for k, v in tensors.items() if k != "features.0.bias"}
    save_file(missing, str(tmp_path / "missing.safetensors"), metadata)
    gone = json.loads(run("verify", SMALL_CNN, tmp_path / "missing.safetensors", "--json").stdout)
    assert {"name": "features.0.bias", "reason": "missing from the converted file"} in gone["mismatches"]


def test_verify_checks_conversions_made_by_other_tools(tmp_path, save_pt):
    """A timm-style reshape with no fc2conv metadata: layers found by shape, geometry from the kernel."""
    sd = head_state_dict(c=8, h=3, w=3, widths=(16, 5))
    source = save_pt(sd, "src.pt")
    theirs = dict(sd)
    theirs["fc1.weight"] = sd["fc1.weight"].reshape(16, 8, 3, 3).contiguous()
    theirs["fc2.weight"] = sd["fc2.weight"][:, :, None, None].contiguous()
    save_file(theirs, str(tmp_path / "theirs.safetensors"))
    result = run("verify", source, tmp_path / "theirs.safetensors", "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["input_shape"] == [8, 3, 3] and len(payload["layers"]) == 2
    assert run("verify", source, tmp_path / "theirs.safetensors", "--input-shape", "8x3x3").exit_code == 0
    clash = run("verify", source, tmp_path / "theirs.safetensors", "--input-shape", "2x6x6")
    assert clash.exit_code == 2 and "does not match" in error_line(clash)
    # The same kernels judged as channels-last weights are wrong, and verify says so.
    assert run("verify", source, tmp_path / "theirs.safetensors", "--flatten-order", "hwc").exit_code == 1


def test_verify_of_an_unconverted_copy_fails(tmp_path, save_pt):
    sd = head_state_dict()
    source = save_pt(sd, "src.pt")
    save_file(sd, str(tmp_path / "same.safetensors"))
    result = run("verify", source, tmp_path / "same.safetensors", "--json")
    assert result.exit_code == 1
    assert any("no converted layer" in n for n in json.loads(result.stdout)["notes"])


def test_verify_tolerance_flags(tmp_path):
    out = tmp_path / "o.safetensors"
    run("convert", SMALL_CNN, "-o", out)
    assert run("verify", SMALL_CNN, out, "--atol", "0", "--rtol", "0").exit_code == 1
    assert run("verify", SMALL_CNN, out, "--atol", "-1").exit_code == 2


def test_version_and_help():
    assert run("--version").stdout.strip() == f"fc2conv, version {__version__}"
    help_text = run("convert", "--help").stdout
    for option in ["--input-shape", "-o, --output", "--flatten-order", "--layers", "--force", "--json"]:
        assert option in help_text


@pytest.mark.slow
def test_installed_script_and_python_m(tmp_path):
    script = str(Path(sys.executable).parent / "fc2conv")  # installed beside the interpreter, venv active or not
    assert Path(script).is_file(), "the fc2conv console script is not installed"
    out = tmp_path / "o.safetensors"
    done = subprocess.run(
        [script, "convert", str(SMALL_CNN), "-o", str(out), "--json"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["ok"] is True
    verified = subprocess.run(
        [sys.executable, "-m", "fc2conv", "verify", str(SMALL_CNN), str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert verified.returncode == 0 and "PASS" in verified.stdout
    bad = subprocess.run(
        [script, "convert", str(SMALL_CNN), "--input-shape", "nope"], capture_output=True, text=True, check=False
    )
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.count("\n") == 1 and bad.stderr.startswith("Error: ")


@pytest.mark.slow
def test_inspect_of_safetensors_does_not_import_torch():
    code = (
        "import sys\n"
        "from fc2conv.cli import cli\n"
        f"code = cli.main(['inspect', {str(SAMPLES / 'channels_last_head.safetensors')!r}, '--json'],"
        " standalone_mode=False)\n"
        "assert code == 0, code\n"
        "print('torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "False"


def test_no_color_and_forced_terminal_output(tmp_path, monkeypatch):
    monkeypatch.setenv("FORCE_COLOR", "1")
    colored = run("inspect", SMALL_CNN)
    assert "\x1b[" in colored.stdout
    monkeypatch.setenv("NO_COLOR", "1")
    plain = run("inspect", SMALL_CNN)
    assert "\x1b[" not in plain.stdout


def test_input_file_is_never_modified(tmp_path):
    import hashlib

    source = tmp_path / "m.pt"
    shutil.copy(SMALL_CNN, source)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    stat = source.stat()
    for args in (
        ["convert", source],
        ["convert", source, "--force", "--flatten-order", "hwc"],
        ["inspect", source],
        ["verify", source, tmp_path / "m.conv.safetensors"],
    ):
        run(*args)
    assert hashlib.sha256(source.read_bytes()).hexdigest() == digest
    assert source.stat().st_mtime_ns == stat.st_mtime_ns


@pytest.mark.slow
def test_help_does_not_import_torch():
    code = (
        "import sys\nfrom fc2conv.cli import cli\n"
        "for args in (['--help'], ['convert', '--help'], ['--version']):\n"
        "    cli.main(args, standalone_mode=False)\n"
        "print('torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "False"


def test_tied_tensors_are_written_as_copies_and_the_output_says_so(tmp_path):
    """Two names sharing one storage (tied weights): each is written whole, and a note says so."""
    sd = head_state_dict(c=8, h=3, w=3, widths=(16, 5))
    sd["features.0.bias_copy"] = sd["features.0.bias"]  # tied: the same tensor under two names
    sd["fc2.bias"] = sd["fc1.bias"][:5]  # a view into another tensor's storage
    torch.save(sd, tmp_path / "tied.pt")
    result = run("convert", tmp_path / "tied.pt", "--input-shape", "8x3x3", "--json")
    assert result.exit_code == 0, result.output
    notes = [n for n in json.loads(result.stdout)["load_notes"] if "share memory" in n]
    assert len(notes) == 2 and any("features.0.bias, features.0.bias_copy share" in n for n in notes)
    out = load_file(str(tmp_path / "tied.conv.safetensors"))
    assert torch.equal(out["features.0.bias_copy"], sd["features.0.bias"])
    assert torch.equal(out["fc2.bias"], sd["fc1.bias"][:5])
    assert run("verify", tmp_path / "tied.pt", tmp_path / "tied.conv.safetensors").exit_code == 0


@pytest.mark.slow
def test_python_m_does_not_import_modules_from_the_current_folder(tmp_path):
    """``python -m`` puts the current folder first on the module path; fc2conv drops it before importing."""
    for module in ("rich", "click", "json", "typing", "torch", "safetensors", "re2"):
        (tmp_path / f"{module}.py").write_text(f"open({str(tmp_path / 'RAN')!r} + '-{module}', 'w').close()\n")
    done = subprocess.run(
        [sys.executable, "-m", "fc2conv", "inspect", str(SMALL_CNN), "--layers", "classifier"],
        capture_output=True, text=True, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith("RAN")]


_ENTRY_POINT = """
import os, sys
import fc2conv.cli

def command(**kwargs):  # stands in for the click group: prints what the command would see, then exits
    print("threads", os.environ.get("OPENBLAS_NUM_THREADS"), "args", kwargs["args"])
    sys.exit(int(sys.argv[1]) if sys.argv[1].isdigit() else sys.argv[1])

fc2conv.cli.cli.main = command
fc2conv.cli.main(["inspect", "x"])
"""


@pytest.mark.parametrize(
    "given, code, status, stderr",
    [(None, "0", 0, ""), (None, "2", 2, ""), ("4", "1", 1, ""), (None, "Error: gone", 1, "Error: gone\n")],
)
def test_the_entry_point_keeps_blas_to_one_thread_and_exits_with_the_commands_status(given, code, status, stderr):
    """`fc2conv` (the console script) sets OPENBLAS_NUM_THREADS=1 unless it is set, and its quick exit keeps
    the status and the flushed output of ``sys.exit``."""
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    if given is not None:
        env["OPENBLAS_NUM_THREADS"] = given
    done = subprocess.run([sys.executable, "-c", _ENTRY_POINT, code], capture_output=True, text=True, env=env)
    assert done.returncode == status
    assert done.stdout == f"threads {given or '1'} args ['inspect', 'x']\n"
    assert done.stderr == stderr
