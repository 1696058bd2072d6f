"""The numeric check: it must report tiny errors for right conversions and catch wrong ones."""

from __future__ import annotations

import math

import pytest
import torch

import fc2conv.check as check_module
from fc2conv import InputShape, LayerChange, convert_state_dict, plan_conversion, tensor_infos
from fc2conv.check import (
    DEFAULT_TOLERANCES,
    Tolerance,
    check_changes,
    check_layer,
    kernel_is_exact,
    tensors_identical,
    tolerance_for,
)

EPS = {torch.float64: 2.0**-52, torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def layer(c=8, h=3, w=4, out=16, dtype=torch.float32, order="chw", seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {
        "fc.weight": (torch.randn(out, c * h * w, generator=g) / (c * h * w) ** 0.5).to(dtype),
        "fc.bias": torch.randn(out, generator=g).to(dtype),
    }
    plan = plan_conversion(tensor_infos(sd), (c, h, w), flatten_order=order)
    return plan.layers[0], sd, convert_state_dict(sd, (c, h, w), flatten_order=order)


@pytest.mark.parametrize("dtype", list(EPS))
@pytest.mark.parametrize("order", ["chw", "hwc"])
def test_right_conversion_has_error_of_a_few_rounding_units(dtype, order):
    change, sd, out = layer(dtype=dtype, order=order)
    result = check_layer(change, sd["fc.weight"], out["fc.weight"], sd["fc.bias"])
    assert result.ok, result
    assert result.max_rel_error < 8 * EPS[dtype]  # measured, relative to the output's scale
    assert result.window_grid == (3, 3)
    assert result.tolerance == DEFAULT_TOLERANCES[str(dtype).removeprefix("torch.")]


def test_wrong_flatten_order_is_caught():
    change, sd, out = layer(order="hwc")
    chw_kernel = convert_state_dict(sd, "8x3x4", flatten_order="chw")["fc.weight"]
    result = check_layer(change, sd["fc.weight"], chw_kernel, sd["fc.bias"])
    assert not result.ok and result.max_rel_error > 0.05


def test_one_corrupted_value_is_caught():
    change, sd, out = layer()
    kernel = out["fc.weight"].clone()
    kernel[7, 3, 1, 2] += 0.05
    result = check_layer(change, sd["fc.weight"], kernel, sd["fc.bias"])
    assert not result.ok and result.max_abs_error > 1e-3


def test_a_wrong_bias_is_caught():
    change, sd, out = layer()
    result = check_layer(change, sd["fc.weight"], out["fc.weight"], sd["fc.bias"], sd["fc.bias"] + 1e-3)
    assert not result.ok


def test_a_kernel_that_only_fails_at_an_offset_window_is_caught_by_the_sliding_check():
    # A kernel correct on a map of exactly HxW but reading the map transposed would fail already;
    # here: a kernel flipped in H and W equals the FC on symmetric inputs only, never on random windows.
    change, sd, out = layer(h=3, w=3)
    flipped = out["fc.weight"].flip(2, 3)
    result = check_layer(change, sd["fc.weight"], flipped, sd["fc.bias"])
    assert not result.ok and result.window_max_abs_error > 0.01


def test_shape_and_bias_problems_are_reported_not_raised():
    change, sd, out = layer()
    bad = check_layer(change, sd["fc.weight"], out["fc.weight"][:, :, :2], sd["fc.bias"])
    assert not bad.ok and "kernel shape" in bad.problem and math.isinf(bad.max_abs_error)
    half = check_layer(change, sd["fc.weight"], out["fc.weight"], None, sd["fc.bias"])
    assert not half.ok and "bias" in half.problem


def test_chunking_gives_the_same_result(monkeypatch):
    change, sd, out = layer(out=37)
    whole = check_layer(change, sd["fc.weight"], out["fc.weight"], sd["fc.bias"])
    monkeypatch.setattr(check_module, "_CHUNK_BYTES", 8 * 96 * 5)  # 5 rows per chunk
    chunked = check_layer(change, sd["fc.weight"], out["fc.weight"], sd["fc.bias"])
    assert chunked.max_abs_error == pytest.approx(whole.max_abs_error, rel=1e-6)
    assert chunked.reference_scale == pytest.approx(whole.reference_scale)


def test_nan_weights_are_flagged_and_pass_when_both_sides_agree():
    change, sd, out = layer()
    sd = dict(sd)
    sd["fc.weight"] = sd["fc.weight"].clone()
    sd["fc.weight"][2, 5] = float("nan")
    kernel = convert_state_dict(sd, "8x3x4")["fc.weight"]
    result = check_layer(change, sd["fc.weight"], kernel, sd["fc.bias"])
    assert result.nonfinite and result.ok and math.isfinite(result.max_abs_error)
    moved = kernel.clone()
    moved[2] = torch.nan_to_num(moved[2])
    moved[3, 0, 0, 0] = float("nan")
    assert not check_layer(change, sd["fc.weight"], moved, sd["fc.bias"]).ok


def test_the_default_rtol_grows_with_the_square_root_of_the_inputs():
    u32 = 2.0**-24
    assert tolerance_for("float32", terms=3000) == DEFAULT_TOLERANCES["float32"]  # 3 u sqrt(n) < 1e-5
    assert tolerance_for("float32", terms=2**20).rtol == pytest.approx(3 * u32 * 2**10)
    assert tolerance_for("float32", terms=2**20).atol == DEFAULT_TOLERANCES["float32"].atol
    assert tolerance_for("float32", rtol=1e-6, terms=2**20).rtol == 1e-6  # a given rtol is used as is
    # float16 and bfloat16 accumulate in float32 on CPU: their own rounding dominates at any width.
    assert tolerance_for("float16", terms=2**30) == DEFAULT_TOLERANCES["float16"]
    assert tolerance_for("float64", terms=2**30) == DEFAULT_TOLERANCES["float64"]


@pytest.mark.parametrize("c, h, w, rows", [(512, 7, 7, 512), (64, 128, 128, 4)])
def test_a_wide_layer_passes_and_a_wrong_order_still_fails(c, h, w, rows):
    # VGG16's first FC and a 2^20-input one: the float32 sum's rounding error grows like sqrt(n)
    # (measured 0.5-0.75 u sqrt(n) of max|output|; at 2^20 inputs 3e-5, over the fixed 1e-5). The
    # grown default passes them; a layout error is still of order 1.
    change, sd, out = layer(c=c, h=h, w=w, out=rows)
    units = 2.0**-24 * math.sqrt(c * h * w)
    result = check_layer(change, sd["fc.weight"], out["fc.weight"], sd["fc.bias"])
    assert result.ok, result
    assert result.tolerance.rtol == pytest.approx(3 * units)
    assert result.max_rel_error < 2 * units
    hwc = convert_state_dict(sd, (c, h, w), flatten_order="hwc")["fc.weight"]
    wrong = check_layer(change, sd["fc.weight"], hwc, sd["fc.bias"])
    assert not wrong.ok and wrong.max_rel_error > 0.05


def test_tolerance_overrides_and_coarser_dtype():
    assert tolerance_for("float16") == DEFAULT_TOLERANCES["float16"]
    assert tolerance_for("float32", atol=0.5) == Tolerance(0.5, DEFAULT_TOLERANCES["float32"].rtol)
    change, sd, out = layer()
    strict = check_layer(change, sd["fc.weight"], out["fc.weight"], sd["fc.bias"], tolerance=Tolerance(0, 0))
    assert strict.max_abs_error > 0 and not strict.ok  # float32 rounding is real, and measured
    # A kernel stored in fp16 from an fp32 layer is judged with fp16's tolerance.
    half = check_layer(change, sd["fc.weight"], out["fc.weight"].half(), sd["fc.bias"], sd["fc.bias"].half())
    assert half.dtype == "float16" and half.ok and half.max_rel_error > 1e-5


def test_tensors_identical_is_bitwise():
    a = torch.tensor([1.0, float("nan"), -0.0])
    assert tensors_identical(a, a.clone())
    assert not tensors_identical(a, torch.tensor([1.0, float("nan"), 0.0]))  # -0.0 vs 0.0
    assert not tensors_identical(a, a.double())
    assert not tensors_identical(a, a[:2])
    assert tensors_identical(torch.zeros(0), torch.zeros(0))
    assert tensors_identical(torch.tensor([True, False]), torch.tensor([True, False]))


def test_kernel_is_exact_detects_any_change(monkeypatch):
    change, sd, out = layer(order="hwc", out=9)
    monkeypatch.setattr(check_module, "_CHUNK_BYTES", 4 * 96 * 2)  # 2 rows per chunk
    assert kernel_is_exact(change, sd["fc.weight"], out["fc.weight"])
    tampered = out["fc.weight"].clone()
    tampered[8, 0, 0, 0] = torch.nextafter(tampered[8, 0, 0, 0], torch.tensor(10.0))
    assert not kernel_is_exact(change, sd["fc.weight"], tampered)


def test_check_changes_reads_both_mappings():
    change, sd, out = layer()
    [result] = check_changes([change], sd, out, exact=True)
    assert result.ok and result.exact is True and result.name == "fc"


def test_large_layers_are_checked_on_a_seeded_row_sample_that_still_catches_layout_bugs():
    change, sd, out = layer(out=300, order="hwc")
    sampled = check_layer(change, sd["fc.weight"], out["fc.weight"], sd["fc.bias"], max_rows=20)
    assert sampled.ok and sampled.rows_checked == 20
    every = check_layer(change, sd["fc.weight"], out["fc.weight"], sd["fc.bias"], max_rows=None)
    assert every.rows_checked == 300 and every.ok
    wrong = convert_state_dict(sd, "8x3x4", flatten_order="chw")["fc.weight"]
    assert not check_layer(change, sd["fc.weight"], wrong, sd["fc.bias"], max_rows=20).ok
    last_row_broken = out["fc.weight"].clone()
    last_row_broken[-1] += 1.0  # the first and last rows are always in the sample
    assert not check_layer(change, sd["fc.weight"], last_row_broken, sd["fc.bias"], max_rows=20).ok


def test_a_layer_without_inputs_outputs_its_bias_on_both_sides():
    """Linear(0, 3) and Conv2d(0, 3, 1) both output their bias: the check compares biases, drawing no map."""
    change = LayerChange("fc", "fc.weight", "fc.bias", "float32", (3, 0), InputShape(0, 1, 1), "chw", pointwise=True)
    weight, kernel = torch.zeros(3, 0), torch.zeros(3, 0, 1, 1)
    bias = torch.tensor([1.0, -2.0, 3.0])
    same = check_layer(change, weight, kernel, bias, bias.clone())
    assert same.ok and same.max_abs_error == 0 and same.reference_scale == 3 and same.rows_checked == 0
    moved = check_layer(change, weight, kernel, bias, bias + 1)
    assert not moved.ok and moved.max_abs_error == 1
    assert check_layer(change, weight, kernel).ok
    assert kernel_is_exact(change, weight, kernel)


def test_shapes_that_do_not_fit_the_change_are_problems_not_crashes():
    change = LayerChange("fc", "fc.weight", "fc.bias", "float32", (4, 6), InputShape(6, 1, 1), "chw")
    weight, kernel = torch.randn(4, 6), torch.randn(4, 6, 1, 1)
    assert "weight shape" in check_layer(change, torch.randn(5, 6), kernel).problem
    assert "bias shape" in check_layer(change, weight, kernel, torch.randn(3), torch.randn(3)).problem
