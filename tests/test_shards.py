"""Sharded Hugging Face checkpoints, pointwise mode and the progress bar."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file, save_file
from torch import nn

import fc2conv.convert
import fc2conv.jobs.convert
from fc2conv import convert_file, plan_pointwise, tensor_infos
from fc2conv.errors import PlanError
from fc2conv.report import PROGRESS_MIN_BYTES, ByteProgress
from tests.conftest import run

SHARDS = {
    "model-00001-of-00003.safetensors": ["features.0.weight", "features.0.bias"],
    "model-00002-of-00003.safetensors": ["classifier.0.weight"],
    "model-00003-of-00003.safetensors": ["classifier.0.bias", "classifier.3.weight", "classifier.3.bias"],
}


def vgg_like() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "features.0.weight": torch.randn(16, 3, 3, 3, generator=g),
        "features.0.bias": torch.randn(16, generator=g),
        "classifier.0.weight": torch.randn(32, 16 * 3 * 3, generator=g) / 12,  # its bias is in another shard
        "classifier.0.bias": torch.randn(32, generator=g),
        "classifier.3.weight": torch.randn(10, 32, generator=g) / 6,
        "classifier.3.bias": torch.randn(10, generator=g),
    }


def write_sharded(folder: Path, sd: dict[str, torch.Tensor], index: bool = True) -> Path:
    folder.mkdir()
    for file, names in SHARDS.items():
        save_file({n: sd[n] for n in names}, str(folder / file), metadata={"format": "pt"})
    if index:
        weight_map = {n: f for f, names in SHARDS.items() for n in names}
        total = sum(t.numel() * t.element_size() for t in sd.values())
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total, "note": "kept"}, "weight_map": weight_map})
        )
    return folder


@pytest.mark.parametrize("given", ["index", "folder", "folder-without-index"])
def test_sharded_conversion_writes_same_shards_and_a_new_index(tmp_path, given):
    sd = vgg_like()
    source = write_sharded(tmp_path / "in", sd, index=given != "folder-without-index")
    arg = source / "model.safetensors.index.json" if given == "index" else source
    out = tmp_path / "out"
    result = run("convert", arg, "--input-shape", "16x3x3", "-o", out, "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["shards"] == 3 and payload["output"] == str(out)
    assert [layer["name"] for layer in payload["layers"]] == ["classifier.0", "classifier.3"]
    assert sorted(p.name for p in out.iterdir()) == sorted([*SHARDS, "model.safetensors.index.json"])
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {n: f for f, names in SHARDS.items() for n in names}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in sd.values())
    if given != "folder-without-index":
        assert index["metadata"]["note"] == "kept"
    merged = {}
    for file in SHARDS:
        merged.update(load_file(str(out / file)))
    assert merged["classifier.0.weight"].shape == (32, 16, 3, 3)
    assert torch.equal(merged["classifier.0.weight"].flatten(1), sd["classifier.0.weight"])
    assert merged["classifier.3.weight"].shape == (10, 32, 1, 1)
    assert torch.equal(merged["features.0.weight"], sd["features.0.weight"])
    verified = run("verify", arg, out, "--json")
    assert verified.exit_code == 0, verified.output
    assert json.loads(verified.stdout)["identical_tensors"] == 4


@pytest.mark.slow
def test_sharded_inspect_reads_headers_only_without_torch(tmp_path):
    source = write_sharded(tmp_path / "in", vgg_like())
    code = (
        "import sys, json\nfrom fc2conv.cli import cli\n"
        f"cli.main(['inspect', {str(source)!r}, '--json'], standalone_mode=False)\n"
        "print('torch' in sys.modules, file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    payload = json.loads(done.stdout)
    assert done.stderr.strip() == "False"
    assert payload["format"] == "sharded safetensors" and payload["input_shape"] == [16, 3, 3]
    assert payload["totals"]["tensors"] == 6 and "3 shards" in payload["notes"][0]


def test_sharded_output_rules(tmp_path):
    source = write_sharded(tmp_path / "in", vgg_like())
    refused = run("convert", source, "--input-shape", "16x3x3", "-o", source, "--force")
    assert refused.exit_code == 2 and "is the input folder" in refused.stderr
    no_parent = run("convert", source, "--input-shape", "16x3x3", "-o", tmp_path / "a" / "b")
    assert no_parent.exit_code == 2 and "does not exist" in no_parent.stderr
    out = tmp_path / "out"
    assert run("convert", source, "--input-shape", "16x3x3", "-o", out).exit_code == 0
    again = run("convert", source, "--input-shape", "16x3x3", "-o", out)
    assert again.exit_code == 2 and "already exists; pass --force" in again.stderr
    assert run("convert", source, "--input-shape", "16x3x3", "-o", out, "--force").exit_code == 0
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging folder left
    default = run("convert", source, "--input-shape", "16x3x3")
    assert default.exit_code == 0 and (tmp_path / "in.conv" / "model.safetensors.index.json").exists()


def test_sharded_failed_check_leaves_no_folder(tmp_path, monkeypatch):
    source = write_sharded(tmp_path / "in", vgg_like())
    real = fc2conv.convert.fc_to_conv_weight
    monkeypatch.setattr(fc2conv.convert, "fc_to_conv_weight", lambda w, c: real(w, c).flip(0).contiguous())
    # A wrong rule: its kernels go through torch (not copied from the input), and the checks catch them.
    monkeypatch.setattr(fc2conv.jobs.convert, "keeps_bytes", lambda change: False)
    result = run("convert", source, "--input-shape", "16x3x3", "-o", tmp_path / "out")
    assert result.exit_code == 1
    assert not (tmp_path / "out").exists()


def test_bad_indexes(tmp_path):
    source = write_sharded(tmp_path / "in", vgg_like())
    index = source / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["classifier.3.weight"] = "model-00001-of-00003.safetensors"
    index.write_text(json.dumps(data))
    wrong = run("inspect", index)
    assert wrong.exit_code == 2 and "does not match the shards" in wrong.stderr
    data["weight_map"]["x"] = "missing.safetensors"
    index.write_text(json.dumps(data))
    assert "which is missing" in run("inspect", index).stderr
    index.write_text("{not json")
    assert "not a valid safetensors index" in run("inspect", index).stderr


# --- pointwise ----------------------------------------------------------------------------------


def transformer_like() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    sd = {"embeddings.word_embeddings.weight": torch.randn(50, 16, generator=g)}
    for i in range(2):
        p = f"layer.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            sd[f"{p}.attn.{proj}.weight"] = torch.randn(16, 16, generator=g) / 4
            sd[f"{p}.attn.{proj}.bias"] = torch.randn(16, generator=g)
        sd[f"{p}.mlp.fc1.weight"] = torch.randn(64, 16, generator=g) / 4
        sd[f"{p}.mlp.fc1.bias"] = torch.randn(64, generator=g)
        sd[f"{p}.mlp.fc2.weight"] = torch.randn(16, 64, generator=g) / 8
        sd[f"{p}.norm.weight"] = torch.ones(16)
        sd[f"{p}.norm.bias"] = torch.zeros(16)
    return sd


def test_pointwise_plan_selects_by_regex_and_leaves_embeddings():
    sd = transformer_like()
    plan = plan_pointwise(tensor_infos(sd), "proj|mlp")
    assert len(plan.layers) == 12 and plan.mode == "pointwise" and plan.input_shape is None
    assert all(c.became == "Conv 1x1" and c.pointwise for c in plan.layers)
    assert "embeddings.word_embeddings.weight" in plan.untouched
    assert len(plan_pointwise(tensor_infos(sd)).layers) == 12  # every Linear; the embedding is not one
    with pytest.raises(PlanError, match="no Linear layer whose name matches"):
        plan_pointwise(tensor_infos(sd), "nothing")


def test_pointwise_conversion_matches_linear_on_the_npu_layout(tmp_path):
    sd = transformer_like()
    torch.save(sd, tmp_path / "t.pt")
    result = run("convert", tmp_path / "t.pt", "--pointwise", "--layers", "attn", "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["mode"] == "pointwise" and payload["input_shape"] is None and len(payload["layers"]) == 8
    assert all(layer["window_grid"] == [1, 8] for layer in payload["layers"])
    out = load_file(str(tmp_path / "t.conv.safetensors"))
    for name, tensor in sd.items():
        if ".attn." in name and name.endswith("weight"):
            assert out[name].shape == (*tensor.shape, 1, 1)
            linear = nn.Linear(16, 16).double()
            linear.load_state_dict({"weight": tensor.double(), "bias": sd[name[:-6] + "bias"].double()})
            conv = nn.Conv2d(16, 16, 1).double()
            conv.load_state_dict({"weight": out[name].double(), "bias": out[name[:-6] + "bias"].double()})
            x = torch.randn(2, 16, 1, 7, dtype=torch.float64)  # (N, C, 1, S)
            expected = linear(x.squeeze(2).transpose(1, 2)).transpose(1, 2).unsqueeze(2)
            torch.testing.assert_close(conv(x), expected, rtol=1e-12, atol=1e-12)
        else:
            assert torch.equal(out[name], tensor), name
    assert run("verify", tmp_path / "t.pt", tmp_path / "t.conv.safetensors").exit_code == 0


def test_pointwise_refuses_geometry_options(tmp_path):
    torch.save(transformer_like(), tmp_path / "t.pt")
    result = run("convert", tmp_path / "t.pt", "--pointwise", "--input-shape", "16x1x1")
    assert result.exit_code == 2 and "--pointwise takes no --input-shape" in result.stderr


def test_pointwise_on_a_sharded_checkpoint(tmp_path):
    source = write_sharded(tmp_path / "in", vgg_like())
    result = run("convert", source, "--pointwise", "--layers", "classifier", "-o", tmp_path / "out", "--json")
    assert result.exit_code == 0, result.output
    assert [layer["new_shape"] for layer in json.loads(result.stdout)["layers"]] == [[32, 144, 1, 1], [10, 32, 1, 1]]
    assert run("verify", source, tmp_path / "out").exit_code == 0


# --- progress -----------------------------------------------------------------------------------


def test_progress_bar_only_on_a_terminal_and_for_large_jobs():
    shown = io.StringIO()
    with ByteProgress(Console(file=shown, force_terminal=True, width=100)) as progress:
        progress(PROGRESS_MIN_BYTES // 2, PROGRESS_MIN_BYTES, "fc6.weight")
    assert "writing" in shown.getvalue()
    small = io.StringIO()
    with ByteProgress(Console(file=small, force_terminal=True)) as progress:
        progress(10, 100, "fc.weight")
    assert small.getvalue() == ""
    piped = io.StringIO()
    with ByteProgress(Console(file=piped, force_terminal=False)) as progress:
        progress(PROGRESS_MIN_BYTES, PROGRESS_MIN_BYTES, "fc6.weight")
    assert piped.getvalue() == ""


def test_progress_callback_reports_every_tensor(tmp_path):
    sd = vgg_like()
    torch.save(sd, tmp_path / "m.pt")
    calls = []
    convert_file(
        tmp_path / "m.pt", input_shape="16x3x3", progress=lambda done, total, name: calls.append((done, total, name))
    )
    total = sum(t.numel() * t.element_size() for t in sd.values())
    assert [c[2] for c in calls] == list(sd) and calls[-1][:2] == (total, total)


def test_a_hugging_face_cache_snapshot_is_read_and_links_elsewhere_are_refused(tmp_path):
    """In the hub cache, snapshots/<rev>/<file> links to ../../blobs/<hash>: inside the repo's cache folder."""
    repo = tmp_path / "models--org--vgg"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "0123abc"
    staged = write_sharded(tmp_path / "staged", vgg_like())
    snapshot.mkdir(parents=True)
    for number, file in enumerate(sorted(staged.iterdir())):
        blob = repo / "blobs" / f"{number:040x}"
        file.rename(blob)
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", blob.name))
    result = run("convert", snapshot, "--input-shape", "16x3x3", "-o", tmp_path / "out", "--json")
    assert result.exit_code == 0, result.output
    outside = tmp_path / "private.safetensors"
    outside.write_bytes(b"")
    (snapshot / "model-00002-of-00003.safetensors").unlink()
    (snapshot / "model-00002-of-00003.safetensors").symlink_to(outside)
    refused = run("inspect", snapshot)
    assert refused.exit_code == 2 and "outside the checkpoint folder" in refused.stderr
