"""verify and convert compare every byte of a converted kernel with the exact rearrangement of its weight.

The numeric check (a seeded sample of rows, float tolerances) proves the semantics of the rewrite; it
cannot see rows outside its sample or changes below its tolerance. These are the files that fooled
verify before (issue 9, item 5): each must now fail with exit 1, naming the layer and the first
differing index of the kernel.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import fc2conv.jobs.convert as convert_job
from fc2conv.check import first_difference, kernel_difference, rows_to_check
from fc2conv.formats.safetensors import read_safetensors_header
from fc2conv.plan import plan_conversion
from fc2conv.types import tensor_infos
from tests.conftest import head_state_dict, run


def _converted(tmp_path, sd, shape="8x2x2", *extra):
    source = tmp_path / "src.pt"
    torch.save(sd, source)
    out = tmp_path / "out.safetensors"
    done = run("convert", source, "--input-shape", shape, "-o", out, *extra)
    assert done.exit_code == 0, done.output
    with safe_open(str(out), "pt") as f:
        metadata = f.metadata()
    return source, load_file(str(out)), metadata


def _verify_tampered(tmp_path, source, tensors, metadata):
    tampered = tmp_path / "tampered.safetensors"
    save_file(tensors, str(tampered), metadata)
    result = run("verify", source, tampered, "--json")
    return result, json.loads(result.stdout)


def test_rows_outside_the_numeric_sample_are_still_compared(tmp_path):
    """1536 of 2048 rows set to 1000.0, exactly the rows the seeded 512-row sample leaves out."""
    sd = head_state_dict(c=8, h=2, w=2, widths=(2048, 10))
    source, tensors, metadata = _converted(tmp_path, sd)
    kernel = tensors["fc1.weight"].clone()
    # A chw kernel keeps its weight's bytes: checked from the files with numpy (fc2conv.array_check), which
    # draws the row sample first from its seeded generator.
    rng = np.random.default_rng(0)
    sampled = set(rows_to_check(2048, 512, lambda n: rng.permutation(n).tolist()))
    outside = [r for r in range(2048) if r not in sampled]
    assert len(outside) == 1536
    kernel[outside] = 1000.0
    result, payload = _verify_tampered(tmp_path, source, {**tensors, "fc1.weight": kernel}, metadata)
    assert result.exit_code == 1 and payload["ok"] is False
    fc1 = next(layer for layer in payload["layers"] if layer["name"] == "fc1")
    assert fc1["rows_checked"] == 512 and fc1["max_abs_error"] < 1e-4  # the sample alone sees nothing
    assert fc1["ok"] is False and fc1["exact"] is False
    assert f"index [{outside[0]}, 0, 0, 0]" in fc1["problem"]
    assert f"fc1: {fc1['problem']}" in result.stderr


def test_a_weight_changed_by_one_millionth_fails(tmp_path):
    sd = head_state_dict(c=8, h=2, w=2, widths=(16, 10))
    source, tensors, metadata = _converted(tmp_path, sd)
    kernel = tensors["fc1.weight"].clone()
    kernel[5, 3, 1, 0] += 1e-6
    result, payload = _verify_tampered(tmp_path, source, {**tensors, "fc1.weight": kernel}, metadata)
    assert result.exit_code == 1
    fc1 = payload["layers"][0]
    assert fc1["max_abs_error"] <= 1e-5  # within the numeric tolerance
    assert "index [5, 3, 1, 0]" in fc1["problem"] and fc1["ok"] is False


@pytest.mark.parametrize(
    "dtype, scale",
    # 1.0001 is below float16's resolution (every value rounds back to itself): 1.002 is its smallest here.
    [(torch.float16, 1.002), (torch.float16, 1.005), (torch.float64, 1.0001), (torch.float64, 1.005)],
)
def test_kernels_scaled_a_little_fail_in_their_own_dtype(tmp_path, dtype, scale):
    sd = head_state_dict(c=8, h=2, w=2, widths=(16, 10), dtype=dtype)
    source, tensors, metadata = _converted(tmp_path, sd)
    scaled = {**tensors, "fc2.weight": tensors["fc2.weight"] * scale}
    assert not torch.equal(scaled["fc2.weight"], tensors["fc2.weight"])
    result, payload = _verify_tampered(tmp_path, source, scaled, metadata)
    assert result.exit_code == 1 and payload["ok"] is False
    fc2 = payload["layers"][1]
    assert fc2["name"] == "fc2" and fc2["exact"] is False and "index [" in fc2["problem"]


def test_the_table_shows_the_problem(tmp_path):
    sd = head_state_dict(c=8, h=2, w=2, widths=(16, 10))
    source, tensors, metadata = _converted(tmp_path, sd)
    kernel = tensors["fc1.weight"].clone()
    kernel[0, 0, 0, 1] = -kernel[0, 0, 0, 1]
    tampered = tmp_path / "tampered.safetensors"
    save_file({**tensors, "fc1.weight": kernel}, str(tampered), metadata)
    result = run("verify", source, tampered)
    assert result.exit_code == 1 and "FAIL" in result.stdout and "index [0, 0, 0, 1]" in result.stdout


def test_a_dtype_change_is_judged_by_the_numeric_check_alone(tmp_path, save_pt):
    """Another tool's fp16 kernels of an fp32 layer: no exact form, so not a byte failure."""
    sd = head_state_dict(c=8, h=2, w=2, widths=(16, 10))
    source = save_pt(sd, "src.pt")
    theirs = dict(sd)
    theirs["fc1.weight"] = sd["fc1.weight"].reshape(16, 8, 2, 2).half()
    theirs["fc2.weight"] = sd["fc2.weight"][:, :, None, None].contiguous()
    save_file(theirs, str(tmp_path / "theirs.safetensors"))
    result = run("verify", source, tmp_path / "theirs.safetensors", "--json")
    payload = json.loads(result.stdout)
    assert result.exit_code == 0, result.output
    assert payload["layers"][0]["exact"] is False and payload["layers"][0]["problem"] is None


@pytest.mark.parametrize("order", ["chw", "hwc"])  # a kernel copied as bytes, and one permuted (numpy)
def test_convert_checks_every_byte_of_the_written_file(tmp_path, monkeypatch, order):
    """A write that changes one byte of a kernel (a bad disk, a bug) is caught before publishing."""
    real = convert_job.write_safetensors

    def write_then_damage(path, infos, *args, **kwargs):
        size = real(path, infos, *args, **kwargs)
        kernel = read_safetensors_header(path).spans(path)["fc1.weight"]
        with open(path, "r+b") as f:
            f.seek(kernel.offset + 4 * 37 + 2)  # inside fc1's kernel, element 37
            byte = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([byte[0] ^ 0x01]))
        return size

    monkeypatch.setattr(convert_job, "write_safetensors", write_then_damage)
    sd = {"fc1.weight": torch.randn(16, 32), "fc2.weight": torch.randn(10, 16)}
    torch.save(sd, tmp_path / "src.pt")
    out = tmp_path / "out.safetensors"
    result = run("convert", tmp_path / "src.pt", "--input-shape", "8x2x2", "--flatten-order", order, "-o", out,
                 "--json")  # fmt: skip
    assert result.exit_code == 1
    fc1 = json.loads(result.stdout)["layers"][0]
    assert fc1["ok"] is False and "index [1, 1, 0, 1]" in fc1["problem"]
    assert not out.exists()


def test_first_difference_and_kernel_difference_by_hand():
    a = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    b = a.clone()
    assert first_difference(a, b) is None
    b[1, 2, 3] = -0.0 if a[1, 2, 3] == 0 else a[1, 2, 3] + 1
    assert first_difference(a, b) == (1, 2, 3)
    nan = torch.tensor([float("nan"), 0.0])
    assert first_difference(nan, nan.clone()) is None
    assert first_difference(torch.tensor([0.0]), torch.tensor([-0.0])) == (0,)
    sd = {"fc.weight": torch.randn(6, 12)}
    [change] = plan_conversion(tensor_infos(sd), (3, 2, 2), flatten_order="hwc").layers
    kernel = sd["fc.weight"].reshape(6, 2, 2, 3).permute(0, 3, 1, 2).contiguous()
    assert kernel_difference(change, sd["fc.weight"], kernel) is None
    kernel[4, 2, 1, 0] += 1
    assert "index [4, 2, 1, 0]" in (kernel_difference(change, sd["fc.weight"], kernel) or "")


def test_convert_compares_every_untouched_tensor_with_the_input(tmp_path, monkeypatch):
    """A copied tensor that does not read back as the input's bytes is a write failure: nothing published."""
    real = convert_job.write_safetensors

    def write_then_damage(path, infos, *args, **kwargs):
        size = real(path, infos, *args, **kwargs)
        with open(path, "r+b") as f:
            f.seek(-1, 2)  # the last byte of the last tensor written (name order: fc2.weight, then z.bias)
            byte = f.read(1)
            f.seek(-1, 2)
            f.write(bytes([byte[0] ^ 0x01]))
        return size

    monkeypatch.setattr(convert_job, "write_safetensors", write_then_damage)
    sd = {"fc1.weight": torch.randn(16, 32), "fc2.weight": torch.randn(10, 16), "z.bias": torch.randn(5)}
    torch.save(sd, tmp_path / "src.pt")
    out = tmp_path / "out.safetensors"
    result = run("convert", tmp_path / "src.pt", "--input-shape", "8x2x2", "-o", out)
    assert result.exit_code == 2 and "the written tensor 'z.bias' differs from the input" in result.stderr
    assert not out.exists()
