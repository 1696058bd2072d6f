"""FC weights stored (out, in) or (in, out): proven by biases, names or config.json; refused when unknowable."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from fc2conv import convert_file, plan_conversion, plan_pointwise, tensor_infos
from fc2conv.errors import PlanError
from fc2conv.types import TensorInfo
from tests.conftest import error_line, run


def T(name, *shape, dtype="float32"):
    return TensorInfo(name, tuple(shape), dtype)


def gpt2_like(width: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """The projections of one GPT-2 block as transformers' Conv1D stores them: weight (in, out), bias (out,)."""
    g = torch.Generator().manual_seed(seed)
    sd = {"wte.weight": torch.randn(50, width, generator=g)}
    for name, (n_in, n_out) in {
        "h.0.attn.c_attn": (width, 3 * width),
        "h.0.attn.c_proj": (width, width),  # square: its layout shows only through its siblings
        "h.0.mlp.c_fc": (width, 4 * width),
        "h.0.mlp.c_proj": (4 * width, width),
    }.items():
        sd[f"{name}.weight"] = torch.randn(n_in, n_out, generator=g)
        sd[f"{name}.bias"] = torch.randn(n_out, generator=g)
    return sd


def conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """transformers' Conv1D.forward, written out: x @ W + b with W stored (in, out)."""
    return torch.addmm(bias.double(), x, weight.double())


def test_gpt2_projections_are_read_in_out_and_converted_right():
    sd = gpt2_like()
    plan = plan_pointwise(tensor_infos(sd))
    layouts = {c.name: (c.layout, c.old_shape) for c in plan.layers}
    assert layouts == {
        "h.0.attn.c_attn": ("in_out", (24, 8)),
        "h.0.attn.c_proj": ("in_out", (8, 8)),
        "h.0.mlp.c_fc": ("in_out", (32, 8)),
        "h.0.mlp.c_proj": ("in_out", (8, 32)),
    }
    assert [s.name for s in plan.skipped] == ["wte"]


def test_gpt2_conversion_computes_what_conv1d_computes(tmp_path):
    sd = gpt2_like()
    save_file(sd, str(tmp_path / "gpt2.safetensors"))
    result = convert_file(tmp_path / "gpt2.safetensors", tmp_path / "out.safetensors", pointwise=True)
    assert result.ok and all(c.max_rel_error < 1e-5 for c in result.checks)
    converted = load_file(str(tmp_path / "out.safetensors"))
    x = torch.randn(5, 32, dtype=torch.float64)  # 5 tokens, laid out (N, C, 1, S) for the 1x1 conv
    for name in ("h.0.attn.c_attn", "h.0.attn.c_proj", "h.0.mlp.c_fc", "h.0.mlp.c_proj"):
        n_in = sd[f"{name}.weight"].shape[0]
        tokens = x[:, :n_in]
        expected = conv1d(tokens, sd[f"{name}.weight"], sd[f"{name}.bias"])
        kernel, bias = converted[f"{name}.weight"].double(), converted[f"{name}.bias"].double()
        got = torch.nn.functional.conv2d(tokens.T[None, :, None, :], kernel, bias)[0, :, 0, :].T
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("length, fragment", [(7, "has shape [7]"), (30, "has shape [30]")])
def test_a_bias_that_fits_no_dimension_is_refused_naming_the_layer(length, fragment):
    infos = [T("conv.weight", 8, 3, 3, 3), T("fc.weight", 10, 72), T("fc.bias", length)]
    with pytest.raises(PlanError) as info:
        plan_conversion(infos)
    assert fragment in str(info.value) and "fc's weight is 10x72" in str(info.value)


def test_a_square_weight_beside_in_out_layers_is_refused_until_the_layout_is_given():
    infos = [T("enc.weight", 8, 24), T("enc.bias", 24), T("mix.weight", 24, 24)]  # enc is proven (in, out)
    with pytest.raises(PlanError) as info:
        plan_pointwise(infos)
    assert "mix's layout cannot be told: it is square" in str(info.value) and info.value.remedy == "weight_layout"
    plan = plan_pointwise(infos, weight_layout="in_out")
    assert [c.layout for c in plan.layers] == ["in_out", "in_out"]
    assert plan_pointwise([T("mix.weight", 24, 24)]).layers[0].layout == "out_in"  # plain PyTorch: (out, in)


def test_config_json_names_gpt2_layouts_even_without_biases(tmp_path):
    sd = {k: v for k, v in gpt2_like().items() if not k.endswith(".bias")}
    save_file(sd, str(tmp_path / "model.safetensors"))
    assumed = run("convert", tmp_path / "model.safetensors", "--pointwise", "-o", tmp_path / "a.safetensors", "--json")
    assert assumed.exit_code == 0  # no bias, no config: nothing says (in, out), so PyTorch's layout it is
    assert not any("(in, out)" in note for note in json.loads(assumed.stdout)["notes"])
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 8}))
    result = run("convert", tmp_path / "model.safetensors", "--pointwise", "-o", tmp_path / "b.safetensors", "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert any("config.json: model_type 'gpt2'" in note for note in payload["load_notes"])
    assert any("stored (in, out)" in note and "shown by config.json" in note for note in payload["notes"])
    converted = load_file(str(tmp_path / "b.safetensors"))
    assert torch.equal(converted["h.0.mlp.c_fc.weight"][:, :, 0, 0], sd["h.0.mlp.c_fc.weight"].T)


def test_cli_bias_length_is_exit_2_with_one_line(tmp_path):
    sd = {"conv.weight": torch.zeros(8, 3, 3, 3), "fc.weight": torch.zeros(10, 72), "fc.bias": torch.zeros(12)}
    torch.save(sd, tmp_path / "m.pt")
    result = run("convert", tmp_path / "m.pt")
    assert result.exit_code == 2 and "fc.bias has shape [12]" in error_line(result)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


def test_cli_ambiguous_layout_names_the_option(tmp_path):
    sd = {"enc.weight": torch.zeros(8, 24), "enc.bias": torch.zeros(24), "mix.weight": torch.zeros(24, 24)}
    torch.save(sd, tmp_path / "m.pt")
    result = run("convert", tmp_path / "m.pt", "--pointwise")
    assert result.exit_code == 2 and "pass --weight-layout" in error_line(result)
    assert run("convert", tmp_path / "m.pt", "--pointwise", "--weight-layout", "in-out").exit_code == 0
