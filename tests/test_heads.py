"""Which FC layers read the map, which follow, which are something else: heads, SE blocks, --layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fc2conv import convert_state_dict, plan_conversion, tensor_infos
from fc2conv.errors import PlanError, ShapeError
from fc2conv.types import InputShape, TensorInfo


def T(name, *shape, dtype="float32"):
    return TensorInfo(name, tuple(shape), dtype)


class TwoHeads(nn.Module):
    """A classifier and a box regressor reading one flattened 16x4x4 map."""

    def __init__(self):
        super().__init__()
        self.features = nn.Conv2d(3, 16, 3, padding=1)
        self.cls = nn.Linear(256, 5)
        self.box = nn.Sequential(nn.Linear(256, 8), nn.ReLU(), nn.Linear(8, 4))

    def forward(self, x):
        flat = torch.flatten(self.features(x), 1)
        return self.cls(flat), self.box(flat)


class SqueezeExcite(nn.Module):
    """A conv trunk with a squeeze-and-excitation block (Linear 32 -> 8 -> 32), then a 512 -> 10 head."""

    def __init__(self, conv_after: bool):
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 3, padding=1)
        self.se = nn.Module()
        self.se.fc1, self.se.fc2 = nn.Linear(32, 8), nn.Linear(8, 32)
        self.conv2 = nn.Conv2d(32, 32, 3, padding=1) if conv_after else nn.Identity()
        self.head = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x):
        x = self.conv(x)
        scale = torch.sigmoid(self.se.fc2(torch.relu(self.se.fc1(x.mean((2, 3))))))
        x = self.conv2(x * scale[:, :, None, None])
        return self.head(torch.flatten(x, 1))


def _conv(kernel, bias):
    return lambda x: nn.functional.conv2d(x, kernel.double(), bias.double())


def test_two_heads_on_one_map_are_both_converted_and_compute_what_the_module_does():
    torch.manual_seed(0)
    model = TwoHeads().double().eval()
    sd = model.state_dict()
    plan = plan_conversion(tensor_infos(sd))
    assert [(c.name, c.became) for c in plan.layers] == [("cls", "Conv 4x4"), ("box.0", "Conv 4x4"),
                                                         ("box.2", "Conv 1x1")]  # fmt: skip
    assert plan.skipped == ()
    converted = convert_state_dict(sd)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    feature_map = model.features(x)
    scores = _conv(converted["cls.weight"], converted["cls.bias"])(feature_map)
    boxes = _conv(converted["box.2.weight"], converted["box.2.bias"])(
        torch.relu(_conv(converted["box.0.weight"], converted["box.0.bias"])(feature_map))
    )
    expected_scores, expected_boxes = model(x)
    torch.testing.assert_close(scores.flatten(1), expected_scores, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(boxes.flatten(1), expected_boxes, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("conv_after", [True, False], ids=["se-inside-the-trunk", "se-after-the-last-conv"])
def test_a_squeeze_excitation_block_is_left_alone_and_the_real_head_converted(conv_after):
    sd = SqueezeExcite(conv_after).state_dict()
    plan = plan_conversion(tensor_infos(sd))
    assert plan.input_shape == InputShape(32, 4, 4)
    assert [(c.name, c.became) for c in plan.layers] == [("head", "Conv 4x4")]
    reasons = {s.name: s.reason for s in plan.skipped}
    assert set(reasons) == {"se.fc1", "se.fc2"}
    expected = "inside the conv trunk" if conv_after else "squeeze-and-excitation pair (32 -> 8 -> 32"
    assert all(expected in reason for reason in reasons.values()), reasons


def test_a_selected_later_layer_is_1x1_whatever_the_pattern_selects():
    infos = [
        T("features.0.weight", 32, 3, 3, 3),
        T("classifier.1.weight", 128, 512),
        T("classifier.1.bias", 128),
        T("classifier.5.weight", 10, 128),
        T("classifier.5.bias", 10),
    ]
    plan = plan_conversion(infos, layers=r"classifier\.5")
    assert [(c.name, c.became, c.new_shape) for c in plan.layers] == [("classifier.5", "Conv 1x1", (10, 128, 1, 1))]
    assert [(s.name, "does not match the layer pattern" in s.reason) for s in plan.skipped] == [("classifier.1", True)]


def test_every_2d_weight_left_alone_is_listed_with_its_reason():
    infos = [
        T("embed.weight", 100, 16),
        T("conv.weight", 8, 3, 3, 3),
        T("fc1.weight", 64, 72),
        T("fc2.weight", 10, 64),
        T("aux.weight", 7, 99),
    ]
    plan = plan_conversion(infos, "8x3x3")
    reasons = {s.name: s.reason for s in plan.skipped}
    assert set(reasons) == {"embed", "aux"}
    assert reasons["embed"].startswith("an embedding")
    assert "not fed by the map (72 values) or a converted layer: it reads 99" in reasons["aux"]


@pytest.mark.parametrize("given", ["32x4", "8x8", "2x16x16", "128x2x2"])
def test_a_shape_contradicting_the_last_conv_is_refused_naming_both_numbers(given):
    infos = [
        T("features.3.weight", 32, 16, 3, 3),
        T("classifier.1.weight", 128, 512),
        T("classifier.5.weight", 10, 128),
    ]
    with pytest.raises(ShapeError) as info:
        plan_conversion(infos, given)
    message = str(info.value)
    assert "classifier.1 reads a map of 32 channels" in message and "features.3" in message
    assert info.value.remedy == "trust_shape"
    assert plan_conversion(infos, given, trust_shape=True).input_shape.features == 512
    assert plan_conversion(infos, "32x4x4").input_shape == InputShape(32, 4, 4)


def test_a_batchnorm_after_the_last_conv_gives_the_channels_of_a_concatenated_map():
    """DenseNet: the last conv has the growth rate's channels; norm5 (BatchNorm2d) has the map's."""
    infos = [
        T("block.conv.weight", 8, 16, 3, 3),
        T("norm5.weight", 24),
        T("norm5.bias", 24),
        T("norm5.running_mean", 24),
        T("norm5.running_var", 24),
        T("classifier.weight", 10, 24 * 2 * 2),
    ]
    assert plan_conversion(infos).input_shape == InputShape(24, 2, 2)
    with pytest.raises(ShapeError, match="classifier reads a map of 24 channels"):
        plan_conversion(infos, "6x4x4")


def test_channels_that_cannot_be_the_map_are_no_evidence():
    """Inception: the last BatchNorm (192) is one branch of a 2048-channel concatenation; 192 does not divide it."""
    infos = [T("branch.conv.weight", 192, 64, 1, 1), T("branch.bn.weight", 192), T("branch.bn.running_var", 192),
             T("fc.weight", 1000, 2048)]  # fmt: skip
    assert plan_conversion(infos, "2048x1x1").input_shape == InputShape(2048, 1, 1)
    with pytest.raises(PlanError, match="cannot infer the input shape from branch.bn"):
        plan_conversion(infos)
