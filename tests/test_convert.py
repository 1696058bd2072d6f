"""The conversion itself, against independent nn.Linear / nn.Conv2d references in float64."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fc2conv import apply_plan, convert_state_dict, fc_to_conv_weight, plan_conversion, tensor_infos
from fc2conv.errors import PlanError

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def seed_modules():
    """The seed's head in float64: Linear(256*4*4 -> 1024) -> ReLU -> Linear(1024 -> 10)."""
    torch.manual_seed(0)
    fc1, fc2 = nn.Linear(4096, 1024).double(), nn.Linear(1024, 10).double()
    return fc1, fc2


def conv_modules(converted):
    conv1 = nn.Conv2d(256, 1024, (4, 4)).double()
    conv2 = nn.Conv2d(1024, 10, (1, 1)).double()
    conv1.load_state_dict({"weight": converted["fc1.weight"], "bias": converted["fc1.bias"]})
    conv2.load_state_dict({"weight": converted["fc2.weight"], "bias": converted["fc2.bias"]})
    return conv1, conv2


def seed_state_dict(fc1, fc2):
    return {
        "fc1.weight": fc1.weight.data,
        "fc1.bias": fc1.bias.data,
        "fc2.weight": fc2.weight.data,
        "fc2.bias": fc2.bias.data,
    }


def test_seed_example_1_fc1_becomes_a_4x4_conv_with_a_1x1x1024_output():
    fc1, fc2 = seed_modules()
    converted = convert_state_dict(seed_state_dict(fc1, fc2), "256x4x4")
    assert converted["fc1.weight"].shape == (1024, 256, 4, 4)
    conv1, _ = conv_modules(converted)
    x = torch.randn(3, 256, 4, 4, dtype=torch.float64)
    out = conv1(x)
    assert out.shape == (3, 1024, 1, 1)
    torch.testing.assert_close(out.flatten(1), fc1(x.flatten(1)), rtol=1e-12, atol=1e-12)


def test_seed_example_2_fc2_becomes_a_1x1_conv_with_a_1x1x10_output():
    fc1, fc2 = seed_modules()
    converted = convert_state_dict(seed_state_dict(fc1, fc2), "256x4x4")
    assert converted["fc2.weight"].shape == (10, 1024, 1, 1)
    assert torch.equal(converted["fc2.bias"], fc2.bias.data)
    conv1, conv2 = conv_modules(converted)
    x = torch.randn(3, 256, 4, 4, dtype=torch.float64)
    out = conv2(torch.relu(conv1(x)))
    assert out.shape == (3, 10, 1, 1)
    torch.testing.assert_close(out.flatten(1), fc2(torch.relu(fc1(x.flatten(1)))), rtol=1e-12, atol=1e-12)


def test_seed_example_3_an_8x8_map_gives_5x5_scores_each_equal_to_the_fc_on_its_window():
    fc1, fc2 = seed_modules()
    conv1, conv2 = conv_modules(convert_state_dict(seed_state_dict(fc1, fc2), "256x4x4"))
    x = torch.randn(2, 256, 8, 8, dtype=torch.float64)
    dense = conv2(torch.relu(conv1(x)))
    assert dense.shape == (2, 10, 5, 5)
    for i in range(5):
        for j in range(5):
            window = x[:, :, i : i + 4, j : j + 4].flatten(1)
            expected = fc2(torch.relu(fc1(window)))
            torch.testing.assert_close(dense[:, :, i, j], expected, rtol=1e-12, atol=1e-12)


def test_hwc_weights_need_the_permutation_and_a_plain_reshape_is_wrong():
    """A channels-last model flattens (H, W, C); its weights reshaped as CHW compute something else."""
    torch.manual_seed(1)
    c, h, w = 6, 3, 5
    fc = nn.Linear(c * h * w, 7).double()
    x = torch.randn(4, c, h, w, dtype=torch.float64)
    expected = fc(x.permute(0, 2, 3, 1).reshape(4, -1))  # what the Keras model computes
    sd = {"fc.weight": fc.weight.data, "fc.bias": fc.bias.data}
    right = convert_state_dict(sd, (c, h, w), flatten_order="hwc")
    wrong = convert_state_dict(sd, (c, h, w), flatten_order="chw")
    got = nn.functional.conv2d(x, right["fc.weight"], right["fc.bias"]).flatten(1)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    silently_wrong = nn.functional.conv2d(x, wrong["fc.weight"], wrong["fc.bias"]).flatten(1)
    assert (silently_wrong - expected).abs().max() > 0.1


def test_untouched_tensors_are_the_same_objects_and_names_are_kept():
    sd = {
        "conv.weight": torch.randn(8, 3, 3, 3),
        "fc.weight": torch.randn(5, 72),
        "fc.bias": torch.randn(5),
        "step": torch.tensor(3),
    }
    out = convert_state_dict(sd, "8x3x3")
    assert list(out) == list(sd)
    assert out["conv.weight"] is sd["conv.weight"] and out["step"] is sd["step"] and out["fc.bias"] is sd["fc.bias"]
    assert out["fc.weight"].is_contiguous()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("order", ["chw", "hwc"])
def test_dtype_is_preserved_and_values_only_move(dtype, order):
    weight = torch.randn(5, 72).to(dtype)
    out = convert_state_dict({"fc.weight": weight}, "8x3x3", flatten_order=order)["fc.weight"]
    assert out.dtype == dtype and out.is_contiguous()
    assert sorted(out.flatten().double().tolist()) == sorted(weight.flatten().double().tolist())


def test_apply_plan_checks_shapes_and_presence():
    plan = plan_conversion(tensor_infos({"fc.weight": torch.zeros(5, 72)}), "8x3x3")
    with pytest.raises(PlanError, match="has no fc.weight"):
        apply_plan(plan, {})
    with pytest.raises(PlanError, match="plan expects"):
        fc_to_conv_weight(torch.zeros(5, 71), plan.layers[0])


def _reference_head(weights, biases, x, order):
    """Linear chain with ReLU between, on the source framework's flatten of x (float64)."""
    y = (x.permute(0, 2, 3, 1) if order == "hwc" else x).reshape(x.shape[0], -1)
    for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
        layer = nn.Linear(w.shape[1], w.shape[0]).double()
        layer.load_state_dict({"weight": w.double(), "bias": b.double()})
        y = layer(y)
        if i < len(weights) - 1:
            y = torch.relu(y)
    return y


def _conv_head(converted, names, x):
    y = x
    for i, name in enumerate(names):
        kernel = converted[f"{name}.weight"].double()
        conv = nn.Conv2d(kernel.shape[1], kernel.shape[0], tuple(kernel.shape[2:])).double()
        conv.load_state_dict({"weight": kernel, "bias": converted[f"{name}.bias"].double()})
        y = conv(y)
        if i < len(names) - 1:
            y = torch.relu(y)
    return y


@settings(max_examples=60, deadline=None)
@given(
    c=st.integers(1, 12),
    h=st.integers(1, 5),
    w=st.integers(1, 5),
    widths=st.lists(st.integers(1, 24), min_size=1, max_size=3),
    dtype=st.sampled_from(DTYPES),
    order=st.sampled_from(["chw", "hwc"]),
    grow=st.tuples(st.integers(0, 3), st.integers(0, 3)),
    seed=st.integers(0, 2**16),
)
def test_property_conv_head_equals_linear_head_at_traced_size_and_densely(c, h, w, widths, dtype, order, grow, seed):
    g = torch.Generator().manual_seed(seed)
    fan_in, weights, biases, sd, names = c * h * w, [], [], {}, []
    for i, out in enumerate(widths):
        weights.append(torch.randn(out, fan_in, generator=g).to(dtype))
        biases.append(torch.randn(out, generator=g).to(dtype))
        sd[f"l{i}.weight"], sd[f"l{i}.bias"] = weights[-1], biases[-1]
        names.append(f"l{i}")
        fan_in = out
    converted = convert_state_dict(sd, (c, h, w), flatten_order=order)
    for name in names:
        assert converted[f"{name}.weight"].dtype == dtype
    # Traced size: a 1x1 map of scores equal to the Linear head.
    x = torch.randn(2, c, h, w, generator=g, dtype=torch.float64)
    got = _conv_head(converted, names, x)
    assert got.shape == (2, widths[-1], 1, 1)
    torch.testing.assert_close(got.flatten(1), _reference_head(weights, biases, x, order), rtol=1e-9, atol=1e-9)
    # Larger map: each position equals the Linear head on its window.
    big = torch.randn(1, c, h + grow[0], w + grow[1], generator=g, dtype=torch.float64)
    dense = _conv_head(converted, names, big)
    assert dense.shape == (1, widths[-1], grow[0] + 1, grow[1] + 1)
    for i in range(grow[0] + 1):
        for j in range(grow[1] + 1):
            window = big[:, :, i : i + h, j : j + w]
            torch.testing.assert_close(
                dense[:, :, i, j], _reference_head(weights, biases, window, order), rtol=1e-9, atol=1e-9
            )


@pytest.mark.parametrize("order", ["chw", "hwc"])
@pytest.mark.parametrize("layout", ["out_in", "in_out"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_the_numpy_rearrangement_is_torchs_rule_byte_for_byte(order, layout, dtype):
    """rearranged_kernel (whole) and rearranged_rows (a few rows at a time) write what fc_to_conv_weight makes,
    on the stored elements' bits (bfloat16 as uint16), for every order and layout."""
    import numpy as np

    from fc2conv.convert import rearranged_kernel, rearranged_rows

    weight = torch.randn(10, 3 * 4 * 5, generator=torch.Generator().manual_seed(5)).to(dtype)
    stored = weight.t().contiguous() if layout == "in_out" else weight
    [change] = plan_conversion(tensor_infos({"fc.weight": stored}), (3, 4, 5), flatten_order=order,
                               weight_layout=layout).layers  # fmt: skip
    assert change.layout == layout
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[stored.element_size()]
    stored_bits = stored.view(bits).numpy()
    expected = fc_to_conv_weight(stored, change).view(bits).numpy()
    assert rearranged_kernel(change, stored_bits).tobytes() == expected.tobytes()
    blocks = list(rearranged_rows(change, stored_bits, 3))
    assert [start for start, _ in blocks] == [0, 3, 6, 9]
    assert np.concatenate([block for _, block in blocks]).tobytes() == expected.tobytes()
    with pytest.raises(PlanError, match="plan expects"):
        rearranged_kernel(change, stored_bits[:-1])
