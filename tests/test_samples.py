"""The shipped sample models: rebuilt deterministically, and converted models equal to the real modules."""

from __future__ import annotations

import torch
from safetensors.torch import load_file
from torch import nn

from fc2conv import convert_file
from tests.conftest import SAMPLES


def test_committed_samples_are_what_the_script_builds(samples):
    assert samples.main(["--check"]) == 0


def _conv(kernel, bias):
    conv = nn.Conv2d(kernel.shape[1], kernel.shape[0], tuple(kernel.shape[2:])).double()
    conv.load_state_dict({"weight": kernel.double(), "bias": bias.double()})
    return conv


def _windows(feature_map, h, w):
    _, _, gh, gw = feature_map.shape
    for i in range(gh - h + 1):
        for j in range(gw - w + 1):
            yield i, j, feature_map[:, :, i : i + h, j : j + w]


def test_small_cnn_converted_head_equals_the_module_and_slides(tmp_path, samples):
    model = samples.SmallCNN().double().eval()
    model.load_state_dict(torch.load(SAMPLES / "small_cnn.pt", weights_only=True))
    result = convert_file(SAMPLES / "small_cnn.pt", tmp_path / "c.safetensors")
    assert result.ok and result.plan.input_shape.as_list() == [32, 4, 4]
    sd = load_file(str(tmp_path / "c.safetensors"))
    bn = nn.BatchNorm2d(128).double().eval()  # the BatchNorm1d tensors, loaded as they are
    bn.load_state_dict({k.removeprefix("classifier.2."): v for k, v in sd.items() if k.startswith("classifier.2.")})
    head = nn.Sequential(
        _conv(sd["classifier.1.weight"], sd["classifier.1.bias"]),
        bn,
        nn.ReLU(),
        _conv(sd["classifier.5.weight"], sd["classifier.5.bias"]),
    )
    with torch.no_grad():
        images = torch.randn(4, 3, 16, 16, dtype=torch.float64)
        torch.testing.assert_close(head(model.features(images)).flatten(1), model(images), rtol=1e-10, atol=1e-10)
        big = model.features(torch.randn(2, 3, 32, 32, dtype=torch.float64))  # a 32x8x8 map
        dense = head(big)
        assert dense.shape == (2, 10, 5, 5)
        for i, j, window in _windows(big, 4, 4):
            torch.testing.assert_close(dense[:, :, i, j], model.classifier(window), rtol=1e-10, atol=1e-10)


def test_wrapped_lenet_converts_with_everything_inferred(tmp_path, samples):
    model = samples.LeNet().double().eval()
    wrapped = torch.load(SAMPLES / "lenet_wrapped.pth", weights_only=True)
    model.load_state_dict({k.removeprefix("module."): v for k, v in wrapped["model_state_dict"].items()})
    result = convert_file(SAMPLES / "lenet_wrapped.pth", tmp_path / "l.safetensors")
    assert result.ok and [c.became for c in result.plan.layers] == ["Conv 5x5", "Conv 1x1", "Conv 1x1"]
    assert any("model_state_dict" in n for n in result.load_notes)
    sd = load_file(str(tmp_path / "l.safetensors"))
    assert "fc1.weight" in sd  # prefix stripped in the output
    head = nn.Sequential(
        _conv(sd["fc1.weight"], sd["fc1.bias"]),
        nn.ReLU(),
        _conv(sd["fc2.weight"], sd["fc2.bias"]),
        nn.ReLU(),
        _conv(sd["fc3.weight"], sd["fc3.bias"]),
    )
    with torch.no_grad():
        digits = torch.randn(3, 1, 32, 32, dtype=torch.float64)
        torch.testing.assert_close(head(model.features(digits)).flatten(1), model(digits), rtol=1e-10, atol=1e-10)


def test_seed_head_end_to_end(tmp_path, samples):
    """The seed: 256x4x4 -> 1024 -> 10. A 4x4 map gives 1x1x1024 then 1x1x10; an 8x8 map gives 5x5x10."""
    path = samples.write("seed_head.pt", samples.build_seed_head, tmp_path)
    result = convert_file(path, input_shape="256x4x4")
    assert result.ok
    assert [(c.name, c.became, c.new_shape) for c in result.checks] == [
        ("fc1", "Conv 4x4", (1024, 256, 4, 4)),
        ("fc2", "Conv 1x1", (10, 1024, 1, 1)),
    ]
    model = samples.SeedHead().double().eval()
    model.load_state_dict(torch.load(path, weights_only=True))
    sd = load_file(str(tmp_path / "seed_head.conv.safetensors"))
    conv1, conv2 = _conv(sd["fc1.weight"], sd["fc1.bias"]), _conv(sd["fc2.weight"], sd["fc2.bias"])
    with torch.no_grad():
        feature_map = torch.randn(2, 256, 4, 4, dtype=torch.float64)
        hidden = conv1(feature_map)
        assert hidden.shape == (2, 1024, 1, 1)
        scores = conv2(torch.relu(hidden))
        assert scores.shape == (2, 10, 1, 1)
        torch.testing.assert_close(scores.flatten(1), model.head(feature_map), rtol=1e-10, atol=1e-10)
        big = torch.randn(1, 256, 8, 8, dtype=torch.float64)
        dense = conv2(torch.relu(conv1(big)))
        assert dense.shape == (1, 10, 5, 5)
        for i, j, window in _windows(big, 4, 4):
            torch.testing.assert_close(dense[:, :, i, j], model.head(window), rtol=1e-10, atol=1e-10)
