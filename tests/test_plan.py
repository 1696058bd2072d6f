"""Finding the FC chain and deciding the geometry, from shapes alone."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fc2conv.errors import PlanError, ShapeError
from fc2conv.layers import group_layers
from fc2conv.plan import fc_candidates, plan_conversion
from fc2conv.record import changes_from_metadata, plan_to_metadata
from fc2conv.types import InputShape, TensorInfo


def T(name, *shape, dtype="float32"):
    return TensorInfo(name, tuple(shape), dtype)


SEED = [
    T("features.0.weight", 256, 64, 3, 3),
    T("features.0.bias", 256),
    T("fc1.weight", 1024, 4096),
    T("fc1.bias", 1024),
    T("fc2.weight", 10, 1024),
    T("fc2.bias", 10),
]


def test_seed_head_plan_with_given_shape():
    plan = plan_conversion(SEED, "256x4x4")
    assert [(c.name, c.became, c.new_shape) for c in plan.layers] == [
        ("fc1", "Conv 4x4", (1024, 256, 4, 4)),
        ("fc2", "Conv 1x1", (10, 1024, 1, 1)),
    ]
    assert plan.layers[0].bias == "fc1.bias"
    assert plan.untouched == ("features.0.weight", "features.0.bias", "fc1.bias", "fc2.bias")
    assert plan.input_shape == InputShape(256, 4, 4)


def test_geometry_inferred_from_last_conv_before_first_fc_and_said():
    plan = plan_conversion(SEED)
    assert plan.input_shape == InputShape(256, 4, 4)
    assert any(
        "inferred" in n and "from features.0 (the last conv before fc1)" in n and "4096 = 256x4x4" in n
        for n in plan.notes
    )


@pytest.mark.parametrize("spec, expected", [("4x4", (256, 4, 4)), ("256", (256, 4, 4)), ((256, 4, 4), (256, 4, 4))])
def test_partial_shapes(spec, expected):
    assert plan_conversion(SEED, spec).input_shape.as_list() == list(expected)


def test_wrong_shape_shows_arithmetic():
    with pytest.raises(ShapeError, match=r"fc1 takes 4096 inputs; 256x4x5 = 5120"):
        plan_conversion(SEED, "256x4x5")


def test_vgg_layout_inference_picks_last_conv_not_other_square_candidates():
    infos = [T(f"features.{i}.weight", c, 3, 3, 3) for i, c in enumerate([64, 128, 256, 512])]
    infos += [
        T("classifier.0.weight", 4096, 25088),
        T("classifier.3.weight", 4096, 4096),
        T("classifier.6.weight", 1000, 4096),
    ]
    plan = plan_conversion(infos)
    assert plan.input_shape == InputShape(512, 7, 7)
    assert [c.became for c in plan.layers] == ["Conv 7x7", "Conv 1x1", "Conv 1x1"]


def test_inference_when_name_order_puts_fc_first():
    # safetensors keeps no module order: "classifier" sorts before "features".
    infos = [
        T("classifier.0.weight", 10, 512),
        T("features.0.weight", 16, 3, 3, 3),
        T("features.3.weight", 32, 16, 3, 3),
    ]
    plan = plan_conversion(infos)
    assert plan.input_shape == InputShape(32, 4, 4)
    assert "none comes before" in plan.notes[0]


def test_non_square_inference_fails_with_candidates():
    infos = [T("conv.weight", 8, 3, 3, 3), T("dense1.weight", 16, 120)]
    with pytest.raises(PlanError) as info:
        plan_conversion(infos)
    message = str(info.value)
    assert "8x3x5" in message and "cannot infer" in message


def test_inference_lists_other_convs_that_would_fit():
    infos = [T("a.weight", 128, 3, 3, 3), T("b.weight", 256, 3, 3, 3), T("fc.weight", 10, 25088)]
    with pytest.raises(PlanError, match="maps that would fit: 128x14x14"):
        plan_conversion(infos)


def test_no_conv_means_input_shape_needed():
    with pytest.raises(PlanError, match="no conv layer before fc1 \\(784 inputs\\)") as info:
        plan_conversion([T("fc1.weight", 100, 784)])
    assert info.value.remedy == "input_shape"
    plan = plan_conversion([T("fc1.weight", 100, 784), T("fc2.weight", 10, 100)], "784")
    assert [c.became for c in plan.layers] == ["Conv 1x1", "Conv 1x1"]


def test_chain_follows_widths_and_skips_unrelated_fcs():
    infos = [
        T("fc1.weight", 64, 72),
        T("aux.weight", 3, 50),
        T("fc2.weight", 32, 64),
        T("fc3.weight", 10, 32),
        T("other.weight", 7, 99),
    ]
    plan = plan_conversion(infos, "8x3x3")
    assert [c.name for c in plan.layers] == ["fc1", "fc2", "fc3"]
    assert "aux.weight" in plan.untouched and "other.weight" in plan.untouched


def test_chain_starts_at_first_fc_matching_the_given_shape():
    infos = [T("proj.weight", 8, 8), T("fc1.weight", 64, 72), T("fc2.weight", 10, 64)]
    plan = plan_conversion(infos, "8x3x3")
    assert [c.name for c in plan.layers] == ["fc1", "fc2"]


def test_layers_regex_restricts_candidates():
    infos = [T("head.fc1.weight", 64, 72), T("head.fc2.weight", 10, 64)]
    plan = plan_conversion(infos, "8x3x3", layers=r"fc1$")
    assert [c.name for c in plan.layers] == ["head.fc1"]
    with pytest.raises(PlanError, match="whose name matches 'nothing'"):
        plan_conversion(infos, "8x3x3", layers="nothing")
    with pytest.raises(PlanError, match="not a valid regular expression"):
        plan_conversion(infos, "8x3x3", layers="(")


def test_batchnorm_between_fcs_is_untouched_and_noted():
    infos = [
        T("fc1.weight", 64, 72),
        T("bn.weight", 64),
        T("bn.bias", 64),
        T("bn.running_mean", 64),
        T("bn.running_var", 64),
        T("bn.num_batches_tracked", dtype="int64"),
        T("fc2.weight", 10, 64),
    ]
    plan = plan_conversion(infos, "8x3x3")
    assert [c.name for c in plan.layers] == ["fc1", "fc2"]
    assert {"bn.weight", "bn.running_mean", "bn.num_batches_tracked"} <= set(plan.untouched)
    assert any(n.startswith("bn (BatchNorm over 64 features)") for n in plan.notes)


def test_hwc_only_affects_the_first_layer():
    plan = plan_conversion(SEED, "256x4x4", flatten_order="hwc")
    assert [c.flatten_order for c in plan.layers] == ["hwc", "chw"]
    with pytest.raises(PlanError, match="flatten order"):
        plan_conversion(SEED, "256x4x4", flatten_order="whc")


def test_embeddings_are_not_fc_candidates_unless_named():
    infos = [T("tok_embeddings.weight", 72, 16), T("embed.weight", 100, 72), T("fc.weight", 5, 72)]
    assert [layer.name for layer in fc_candidates(infos)] == ["fc"]
    assert [layer.name for layer in fc_candidates(infos, "embed")] == ["tok_embeddings", "embed"]


@pytest.mark.parametrize("dtype", ["int8", "int32", "bool", "complex64", "uint8"])
def test_non_float_fc_weights_are_refused_with_dtype(dtype):
    with pytest.raises(PlanError, match=f"fc1.weight is {dtype}; only floating-point"):
        plan_conversion([T("fc1.weight", 10, 72, dtype=dtype)], "8x3x3")


@pytest.mark.parametrize(
    "infos, fragment",
    [
        ([], "no tensors"),
        ([T("conv.weight", 8, 3, 3, 3)], "no fully connected layer"),
        ([T("bn.weight", 8)], "no fully connected layer found"),
    ],
)
def test_nothing_to_convert(infos, fragment):
    with pytest.raises(PlanError, match=fragment) as info:
        plan_conversion(infos, "8x3x3")
    assert info.value.remedy == (None if fragment == "no tensors" else "inspect")


def test_group_layers_guesses_kinds():
    infos = [
        T("c.weight", 4, 3, 3, 3),
        T("c1d.weight", 4, 3, 3),
        T("fc.weight", 2, 4),
        T("bn.weight", 4),
        T("bn.running_mean", 4),
        T("ln.weight", 4),
        T("word_embeddings.weight", 100, 4),
        T("scale", 1),
    ]
    kinds = {layer.name: layer.kind for layer in group_layers(infos)}
    assert kinds == {
        "c": "Conv2d",
        "c1d": "Conv1d",
        "fc": "Linear",
        "bn": "BatchNorm",
        "ln": "other",
        "word_embeddings": "Embedding",
        "": "other",
    }


def test_metadata_round_trip():
    plan = plan_conversion(SEED, "256x4x4", flatten_order="hwc")
    metadata = plan_to_metadata(plan, "9.9", source="seed.pt")
    assert metadata["format"] == "pt" and metadata["fc2conv.input_shape"] == "256x4x4"
    assert all(isinstance(v, str) for v in metadata.values())
    assert changes_from_metadata(metadata) == [c.__class__(**{**c.__dict__, "dtype": ""}) for c in plan.layers]
    assert changes_from_metadata({}) is None
    with pytest.raises(PlanError, match="malformed"):
        changes_from_metadata({"fc2conv.layers": "[{}]"})


@settings(max_examples=150, deadline=None)
@given(
    c=st.integers(1, 64),
    h=st.integers(1, 9),
    w=st.integers(1, 9),
    widths=st.lists(st.integers(1, 300), min_size=1, max_size=4),
    noise=st.lists(st.tuples(st.integers(1, 300), st.integers(1, 300)), max_size=3),
)
def test_chain_property(c, h, w, widths, noise):
    """A chain built from (C, H, W) and widths is found whole; its shapes multiply out."""
    fan_in = c * h * w
    infos = [T("features.weight", c, 3, 3, 3)]
    for i, out in enumerate(widths):
        infos.append(T(f"head.{i}.weight", out, fan_in))
        fan_in = out
    infos += [T(f"zz_noise{i}.weight", o, n) for i, (o, n) in enumerate(noise)]
    plan = plan_conversion(infos, (c, h, w))
    first = plan.layers[0]
    assert first.name == "head.0" and first.new_shape == (widths[0], c, h, w)
    assert [c.name for c in plan.layers[: len(widths)]] == [f"head.{i}" for i in range(len(widths))]
    for change in plan.layers:
        out, cc, hh, ww = change.new_shape
        assert out * cc * hh * ww == change.old_shape[0] * change.old_shape[1]
    assert len(plan.untouched) + len(plan.layers) == len(infos)
