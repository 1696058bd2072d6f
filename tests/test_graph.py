"""convert_module: the fx pass on the layouts people use, end to end and densely, plus the exports."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fc2conv import convert_state_dict
from fc2conv.errors import PlanError
from fc2conv.graph import check_module, conversion_of, convert_module, export_onnx, export_program, onnx_error
from tests.architectures import ARCHITECTURES, LeNetStyle, MLPHeadBN, ResNetStyle, VGGStyle, build


def windows(feature_map, h, w):
    for i in range(feature_map.shape[2] - h + 1):
        for j in range(feature_map.shape[3] - w + 1):
            yield i, j, feature_map[:, :, i : i + h, j : j + w]


@pytest.mark.parametrize("cls", ARCHITECTURES, ids=lambda c: c.__name__)
def test_traced_size_equals_the_original_and_larger_inputs_slide(cls):
    model = build(cls).double()
    converted = convert_module(model, cls.input_shape)
    record = conversion_of(converted)
    c, h, w = cls.input_shape
    x = torch.randn(3, c, h, w, dtype=torch.float64)
    with torch.no_grad():
        out = converted(x)
        assert out.shape[2:] == (1, 1)
        torch.testing.assert_close(out.flatten(1), model(x), rtol=1e-12, atol=1e-12)
        # Larger input: every position equals the original head on its window of the feature map.
        big = torch.randn(1, c, 2 * h + 3, 2 * w + 1, dtype=torch.float64)
        feature_map = model.features(big)
        dense = converted(big)
        fh, fw = record.feature_shape.height, record.feature_shape.width
        assert dense.shape[2:] == (feature_map.shape[2] - fh + 1, feature_map.shape[3] - fw + 1)
        for i, j, window in windows(feature_map, fh, fw):
            torch.testing.assert_close(dense[:, :, i, j], model.head(window), rtol=1e-12, atol=1e-12)
    assert model.training is False and isinstance(model, cls)  # the original is left as it was


def test_identity_pool_removed_global_pool_kept():
    vgg = conversion_of(convert_module(build(VGGStyle), VGGStyle.input_shape))
    assert "avgpool" in vgg.removed and any("identity at the traced size" in n for n in vgg.notes)
    resnet = convert_module(build(ResNetStyle), ResNetStyle.input_shape)
    record = conversion_of(resnet)
    assert record.feature_shape.as_list() == [16, 1, 1] and [c.became for c in record.changes] == ["Conv 1x1"]
    assert isinstance(resnet.avgpool, nn.AdaptiveAvgPool2d)
    assert resnet(torch.randn(1, 3, 40, 40)).shape == (1, 5, 1, 1)


def test_weights_are_exactly_what_the_state_dict_conversion_writes():
    model = build(VGGStyle)
    converted = convert_module(model, VGGStyle.input_shape)
    record = conversion_of(converted)
    expected = convert_state_dict(model.state_dict(), record.feature_shape)
    state = converted.state_dict()
    assert set(state) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name
    converted.load_state_dict(expected)  # a file from `fc2conv convert` loads into it


def test_batchnorm1d_becomes_batchnorm2d_or_is_folded():
    model = build(MLPHeadBN).double()
    kept = convert_module(model, MLPHeadBN.input_shape)
    assert isinstance(kept.get_submodule("head_layers.2"), nn.BatchNorm2d)
    folded = convert_module(model, MLPHeadBN.input_shape, fold_batchnorm=True)
    folded_record = conversion_of(folded)
    assert folded_record.folded == ("head_layers.1",)
    assert not any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in folded.modules())
    x = torch.randn(4, 3, 12, 12, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(folded(x).flatten(1), model(x), rtol=1e-12, atol=1e-12)
    assert check_module(model, folded).ok
    with pytest.raises(PlanError, match="eval mode"):
        convert_module(model.train(), MLPHeadBN.input_shape, fold_batchnorm=True)


def test_squeeze_output_option():
    model = build(LeNetStyle)
    converted = convert_module(model, "1x28x28", squeeze_output=True)
    assert converted(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert converted(torch.randn(2, 1, 40, 36)).shape == (2, 10, 4, 3)


@pytest.mark.parametrize("cls", ARCHITECTURES, ids=lambda c: c.__name__)
def test_end_to_end_check_passes_and_catches_a_wrong_kernel(cls):
    model = build(cls)
    converted = convert_module(model, cls.input_shape)
    record = conversion_of(converted)
    result = check_module(model, converted)
    assert result.ok and result.max_rel_error < 1e-12 and result.positions_checked >= 1
    first = record.changes[0]
    if first.in_map.height * first.in_map.width > 1:  # a kernel read in the wrong order is caught
        broken = copy.deepcopy(converted)
        kernel = broken.get_submodule(first.name).weight
        with torch.no_grad():
            kernel.copy_(kernel.transpose(2, 3).reshape(kernel.shape).clone())
        assert not check_module(model, broken).ok


class FlattenIntoCat(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4 * 4 * 4 + 2, 3)

    def forward(self, x):
        return self.fc(torch.cat([torch.flatten(self.conv(x), 1), x[:, 0, 0, :2]], dim=1))


class LinearTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(64, 64)

    def forward(self, x):
        return self.fc(self.fc(torch.flatten(self.conv(x), 1)))


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(64, 2)

    def forward(self, x):
        y = torch.flatten(self.conv(x), 1)
        if y.sum() > 0:
            y = -y
        return self.fc(y)


class NoFlatten(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(x)


@pytest.mark.parametrize(
    "model, message",
    [
        (FlattenIntoCat(), "node cat"),
        (LinearTwice(), "fc (node fc) is used more than once"),
        (DataDependent(), "cannot trace DataDependent with torch.fx"),
        (NoFlatten(), "no flatten of a (N, C, H, W) map"),
    ],
    ids=["flatten-into-cat", "linear-used-twice", "data-dependent", "no-flatten"],
)
def test_what_cannot_be_proven_equal_is_a_clear_error(model, message):
    with pytest.raises(PlanError) as info:
        convert_module(model.eval(), "3x6x6")
    assert message in str(info.value)


def test_wrong_input_shape_is_a_clear_error():
    with pytest.raises(PlanError, match="does not run on a 3x20x20 input"):
        convert_module(build(LeNetStyle), "3x20x20")
    with pytest.raises(PlanError, match="full network input shape"):
        convert_module(build(LeNetStyle), "28x28")


@pytest.mark.slow
@pytest.mark.parametrize("cls", ARCHITECTURES, ids=lambda c: c.__name__)
def test_exported_program_runs_at_new_sizes(tmp_path, cls):
    model = build(cls)
    converted = convert_module(model, cls.input_shape)
    export_program(converted, tmp_path / "m.pt2")
    program = torch.export.load(str(tmp_path / "m.pt2")).module()
    c, h, w = cls.input_shape
    for size in ((h, w), (h + 9, w + 4)):
        x = torch.randn(3, c, *size)
        with torch.no_grad():
            torch.testing.assert_close(program(x), converted(x), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("cls", ARCHITECTURES, ids=lambda c: c.__name__)
def test_onnx_export_runs_at_new_sizes(tmp_path, cls):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    model = build(cls)
    converted = convert_module(model, cls.input_shape)
    export_onnx(converted, tmp_path / "m.onnx")
    error = onnx_error(tmp_path / "m.onnx", converted)
    assert error is not None and error < 1e-4


def test_torchvision_models_if_available():
    models = pytest.importorskip("torchvision.models")
    for factory, size in ((models.vgg11, "3x64x64"), (models.alexnet, "3x96x96")):
        model = factory(weights=None).eval()
        converted = convert_module(model, size)
        assert check_module(model, converted).ok


def test_training_mode_model_keeps_its_statistics():
    model = build(MLPHeadBN).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    converted = convert_module(model, MLPHeadBN.input_shape)
    assert converted.training and converted.get_submodule("head_layers.2").training
    for name, tensor in converted.state_dict().items():
        if "head_layers.2" in name or "features" in name:
            assert torch.equal(tensor, before[name]), name
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


class TwoHeads(nn.Module):
    """Two classifiers reading the same flattened features: each becomes an H x W conv."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.cls = nn.Linear(64, 5)
        self.box = nn.Sequential(nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 4))

    def forward(self, x):
        features = torch.flatten(self.conv(x), 1)
        return self.cls(features), self.box(features)


def test_two_heads_on_one_flatten():
    model = TwoHeads().eval().double()
    converted = convert_module(model, "3x6x6")
    record = conversion_of(converted)
    assert [(c.name, c.became) for c in record.changes] == [("cls", "Conv 4x4"), ("box.0", "Conv 4x4"),
                                                            ("box.2", "Conv 1x1")]  # fmt: skip
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        for got, expected in zip(converted(x), model(x), strict=True):
            torch.testing.assert_close(got.flatten(1), expected, rtol=1e-12, atol=1e-12)
        scores, boxes = converted(torch.randn(1, 3, 9, 8, dtype=torch.float64))
    assert scores.shape == (1, 5, 4, 3) and boxes.shape == (1, 4, 4, 3)
