"""The numeric check from the files' bytes (numpy, no torch): held to torch's conv2d and to nn.Linear."""

from __future__ import annotations

import json
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from fc2conv.array_check import check_layer_arrays, conv2d
from fc2conv.check import check_layer, tolerance_for
from fc2conv.convert import fc_to_conv_weight
from fc2conv.diskio import ByteSpan
from fc2conv.formats.safetensors import open_safetensors
from fc2conv.matrix import round_to_dtype
from fc2conv.plan import LayerChange
from fc2conv.span_arrays import span_matrix, span_vector
from fc2conv.types import InputShape
from tests.conftest import ROOT

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


class _Rows:
    """A Matrix over an array of torch's values (float32, or float64 for float64): independent of the file reader."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.values = tensor.reshape(tensor.shape[0], -1)
        self.dtype_name = str(tensor.dtype).removeprefix("torch.")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.values.shape)

    def take(self, rows: np.ndarray) -> np.ndarray:
        wide = torch.float64 if self.values.dtype == torch.float64 else torch.float32
        return self.values[torch.from_numpy(rows)].to(wide).numpy()


def _change(shape: InputShape, order: str, out: int = 24, bias: bool = True, dtype: str = "float32") -> LayerChange:
    return LayerChange(
        name="fc", weight="fc.weight", bias="fc.bias" if bias else None, dtype=dtype,
        old_shape=(out, shape.features), in_map=shape, flatten_order=order,
    )  # fmt: skip


@pytest.mark.parametrize("kernel_size", [(1, 1), (3, 3), (4, 2), (7, 7)])
def test_conv2d_is_torchs_conv2d(kernel_size):
    """The definition the numpy check uses equals torch.nn.functional.conv2d (float64, stride 1, no padding)."""
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 9, 8, dtype=torch.float64, generator=generator)
    kernel = torch.randn(6, 5, *kernel_size, dtype=torch.float64, generator=generator)
    bias = torch.randn(6, dtype=torch.float64, generator=generator)
    ours = conv2d(x.numpy(), kernel.numpy(), bias.numpy())
    theirs = F.conv2d(x, kernel, bias).numpy()
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() < 1e-12 * np.abs(theirs).max()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_rounding_to_a_dtype_is_torchs(dtype):
    """float64 values rounded to float16/bfloat16/float32 as torch rounds them (ties to even included)."""
    values = torch.randn(10_000, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 100
    ties = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-11, 1 + 3 * 2**-11, -(1 + 2**-8)], dtype=torch.float64)
    values = torch.cat([values, ties, torch.tensor([0.0, -0.0, 1e-30, 6.6e4])])
    ours = round_to_dtype(values.to(torch.float32).numpy().astype(np.float64), dtype)
    theirs = values.to(torch.float32).to(DTYPES[dtype]).to(torch.float64).numpy()
    assert np.array_equal(ours, theirs)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize(("shape", "order"), [(InputShape(8, 4, 5), "chw"), (InputShape(8, 1, 1), "hwc")])
def test_a_right_kernel_passes_and_agrees_with_torchs_check(dtype, shape, order):
    """The kernel fc2conv writes passes; its error is of the size torch's check measures (same dtype, same maps)."""
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(24, shape.features, generator=generator).to(DTYPES[dtype])
    bias = torch.randn(24, generator=generator).to(DTYPES[dtype])
    change = _change(shape, order, dtype=dtype)
    kernel = fc_to_conv_weight(weight, change)
    ours = check_layer_arrays(change, _Rows(weight), _Rows(kernel), _Rows(bias[:, None]).take(np.arange(24))[:, 0],
                              max_rows=None)  # fmt: skip
    theirs = check_layer(change, weight, kernel, bias, max_rows=None)
    assert ours.ok and theirs.ok, (ours, theirs)
    assert ours.window_grid == (3, 3) and ours.rows_checked == 24
    assert ours.reference_scale == pytest.approx(theirs.reference_scale, rel=0.5)  # other seeded maps, same scale
    bound = tolerance_for(dtype, terms=shape.features)
    assert ours.max_rel_error <= bound.rtol + bound.atol / ours.reference_scale


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_wrong_order_a_changed_row_and_a_changed_bias_fail(dtype):
    """The witness can fail: a chw kernel read as hwc, one row scaled, a bias moved, each by far."""
    shape = InputShape(6, 3, 4)
    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(30, shape.features, generator=generator).to(DTYPES[dtype])
    bias = torch.randn(30, generator=generator).to(DTYPES[dtype]).float().numpy()
    right = _change(shape, "chw", out=30, dtype=dtype)
    assert check_layer_arrays(right, _Rows(weight), _Rows(weight), bias).ok
    wrong_order = check_layer_arrays(_change(shape, "hwc", out=30, dtype=dtype), _Rows(weight), _Rows(weight), bias)
    assert not wrong_order.ok and wrong_order.max_rel_error > 0.1
    scaled = weight.clone()
    scaled[17] *= 1.5
    assert not check_layer_arrays(right, _Rows(weight), _Rows(scaled), bias).ok
    moved = bias.copy()
    moved[29] += 10.0
    assert not check_layer_arrays(right, _Rows(weight), _Rows(weight), bias, moved).ok


def test_a_pointwise_layer_is_checked_on_eight_positions():
    change = LayerChange(name="proj", weight="proj.weight", bias=None, dtype="float32", old_shape=(16, 32),
                         in_map=InputShape(32, 1, 1), flatten_order="chw", pointwise=True)  # fmt: skip
    weight = torch.randn(16, 32, generator=torch.Generator().manual_seed(4))
    result = check_layer_arrays(change, _Rows(weight), _Rows(weight))
    assert result.ok and result.window_grid == (1, 8)
    transposed = weight.reshape(32, 16).t().contiguous()  # same values, another layout: wrong
    assert not check_layer_arrays(change, _Rows(weight), _Rows(transposed)).ok


def test_empty_layers_and_wrong_shapes_are_named():
    shape = InputShape(0, 2, 2)
    change = _change(shape, "chw", out=3)
    empty = torch.zeros(3, 0)
    bias = np.array([1.0, 2.0, 3.0], dtype=np.float32)
    result = check_layer_arrays(change, _Rows(empty), _Rows(empty), bias, bias)
    assert result.ok and result.rows_checked == 0 and result.max_abs_error == 0
    assert not check_layer_arrays(change, _Rows(empty), _Rows(empty), bias, bias + 1).ok
    change = _change(InputShape(2, 2, 2), "chw", out=3)
    problem = check_layer_arrays(change, _Rows(torch.zeros(3, 8)), _Rows(torch.zeros(3, 9)), bias, bias).problem
    assert problem is not None and "(3, 2, 2, 2)" in problem


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_span_matrices_read_the_values_safetensors_holds(tmp_path, dtype):
    tensor = torch.randn(7, 5, generator=torch.Generator().manual_seed(5)).to(DTYPES[dtype])
    save_file({"a": torch.zeros(3), "w": tensor, "b": tensor[0].clone()}, tmp_path / "t.safetensors")
    source = open_safetensors(tmp_path / "t.safetensors")
    matrix = span_matrix(source.spans["w"], dtype, (7, 5))
    wide = torch.float64 if dtype == "float64" else torch.float32
    assert matrix.shape == (7, 5) and matrix.dtype_name == dtype
    assert np.array_equal(matrix.take(np.array([1, 4, 6])), tensor[[1, 4, 6]].to(wide).numpy())
    assert np.array_equal(span_vector(source.spans["b"], dtype, 5), tensor[0].to(wide).numpy())
    with pytest.raises(ValueError, match="does not hold"):
        span_matrix(source.spans["w"], dtype, (7, 6))
    with pytest.raises(ValueError, match="not a floating dtype"):
        span_matrix(ByteSpan(tmp_path / "t.safetensors", 0, 8), "int64", (1, 1))


_NO_TORCH = """
import sys
class _Refuse:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch was imported")
sys.meta_path.insert(0, _Refuse())
from fc2conv.cli import cli
try:
    cli.main(sys.argv[1:], prog_name="fc2conv")  # not fc2conv.cli.main, whose quick exit skips `finally`
finally:
    print("TORCH", "torch" in sys.modules, file=sys.stderr)
"""


def _run_without_torch(*args: object) -> subprocess.CompletedProcess[str]:
    """The CLI in a new process where importing torch raises: what needs torch fails loudly."""
    return subprocess.run([sys.executable, "-c", _NO_TORCH, *map(str, args)], capture_output=True, text=True,
                          check=False, cwd=ROOT)  # fmt: skip


def test_convert_and_verify_of_kernels_that_keep_their_bytes_never_import_torch(tmp_path, save_pt):
    """A .pt (read as data) and a safetensors file, chw and pointwise: written, proven and verified without torch."""
    generator = torch.Generator().manual_seed(6)
    state = {
        "features.0.weight": torch.randn(16, 3, 3, 3, generator=generator),
        "features.0.bias": torch.randn(16, generator=generator),
        "classifier.0.weight": torch.randn(32, 16 * 4 * 4, generator=generator),
        "classifier.0.bias": torch.randn(32, generator=generator),
        "classifier.2.weight": torch.randn(10, 32, generator=generator),
        "classifier.2.bias": torch.randn(10, generator=generator),
    }
    checkpoint = save_pt(state, "cnn.pt")
    out = tmp_path / "cnn.conv.safetensors"
    converted = _run_without_torch("convert", checkpoint, "--input-shape", "16x4x4", "-o", out, "--json")
    assert converted.returncode == 0, converted.stderr
    assert "TORCH False" in converted.stderr
    report = json.loads(converted.stdout)
    assert [layer["ok"] for layer in report["layers"]] == [True, True]
    assert all(layer["exact"] for layer in report["layers"])
    assert all("numpy" in layer["proves"] for layer in report["layers"])
    verified = _run_without_torch("verify", checkpoint, out, "--json")
    assert verified.returncode == 0 and "TORCH False" in verified.stderr, verified.stderr
    assert json.loads(verified.stdout)["ok"] is True
    # The same kernels, independently: nn.Conv2d with the written weights on the map = nn.Linear on its flattening.
    from safetensors.torch import load_file

    written = load_file(out)
    x = torch.randn(3, 16, 4, 4, dtype=torch.float64, generator=generator)
    conv = F.conv2d(x, written["classifier.0.weight"].double(), written["classifier.0.bias"].double())
    linear = F.linear(x.flatten(1), state["classifier.0.weight"].double(), state["classifier.0.bias"].double())
    assert torch.allclose(conv.flatten(1), linear, rtol=1e-12, atol=1e-12)


def test_a_tampered_kernel_fails_verify_without_torch(tmp_path):
    weight = torch.randn(8, 32, generator=torch.Generator().manual_seed(7))
    save_file({"proj.weight": weight}, tmp_path / "m.safetensors")
    out = tmp_path / "m.conv.safetensors"
    assert _run_without_torch("convert", tmp_path / "m.safetensors", "--pointwise", "-o", out).returncode == 0
    data = bytearray(out.read_bytes())
    data[-5] ^= 0x01  # a bit of the last weight's mantissa
    out.write_bytes(bytes(data))
    verified = _run_without_torch("verify", tmp_path / "m.safetensors", out)
    assert verified.returncode == 1, verified.stderr
    assert "kernel differs from the exact rearrangement" in verified.stdout + verified.stderr


@pytest.mark.parametrize(
    "args, layout",
    [
        (["--input-shape", "6x3x3", "--flatten-order", "hwc"], "out_in"),  # a channels-last map: permuted
        (["--pointwise", "--weight-layout", "in-out"], "in_out"),  # GPT-2's Conv1D layout: transposed
        (["--input-shape", "6x3x3", "--flatten-order", "hwc", "--weight-layout", "in-out"], "in_out"),  # both
    ],
)
def test_kernels_that_move_bytes_are_rearranged_and_proven_without_torch(tmp_path, args, layout):
    """A permuted or transposed kernel is rearranged with numpy from the input's bytes, every byte proven
    against the rearrangement, and checked numerically: no torch, and the kernel is torch's own rule's."""
    generator = torch.Generator().manual_seed(11)
    weight = torch.randn(16, 6 * 3 * 3, generator=generator)
    stored = weight.t().contiguous() if layout == "in_out" else weight
    state = {"fc.weight": stored, "fc.bias": torch.randn(16, generator=generator)}
    save_file(state, tmp_path / "h.safetensors")
    out = tmp_path / "h.conv.safetensors"
    converted = _run_without_torch("convert", tmp_path / "h.safetensors", *args, "-o", out, "--json")
    assert converted.returncode == 0 and "TORCH False" in converted.stderr, converted.stderr
    [layer] = json.loads(converted.stdout)["layers"]
    assert layer["ok"] and layer["exact"] and "numpy" in layer["proves"]
    verified = _run_without_torch("verify", tmp_path / "h.safetensors", out, "--json")
    assert verified.returncode == 0 and "TORCH False" in verified.stderr, verified.stderr
    from safetensors.torch import load_file

    kernel = load_file(out)["fc.weight"]
    if "--pointwise" in args:
        assert torch.equal(kernel, weight[:, :, None, None])
        return
    # Independently: the conv on an NCHW map = the FC on the map flattened channels-last (H, W, C).
    x = torch.randn(2, 6, 3, 3, dtype=torch.float64, generator=generator)
    conv = F.conv2d(x, kernel.double(), state["fc.bias"].double()).flatten(1)
    linear = F.linear(x.permute(0, 2, 3, 1).flatten(1), weight.double(), state["fc.bias"].double())
    assert torch.allclose(conv, linear, rtol=1e-12, atol=1e-12)


def test_a_tampered_permuted_kernel_fails_verify_without_torch(tmp_path):
    weight = torch.randn(8, 4 * 2 * 2, generator=torch.Generator().manual_seed(12))
    save_file({"fc.weight": weight}, tmp_path / "m.safetensors")
    out = tmp_path / "m.conv.safetensors"
    done = _run_without_torch("convert", tmp_path / "m.safetensors", "--input-shape", "4x2x2", "--flatten-order",
                              "hwc", "-o", out)  # fmt: skip
    assert done.returncode == 0, done.stderr
    data = bytearray(out.read_bytes())
    data[-5] ^= 0x01  # a bit of the kernel's last element but one
    out.write_bytes(bytes(data))
    verified = _run_without_torch("verify", tmp_path / "m.safetensors", out, "--json")
    assert verified.returncode == 1 and "TORCH False" in verified.stderr, verified.stderr
    [layer] = json.loads(verified.stdout)["layers"]
    assert "kernel differs from the exact rearrangement of fc.weight at index [7, 3, 1, 0]" in layer["problem"]


@pytest.mark.parametrize("order", ["chw", "hwc"])
def test_numpy_path_figures_agree_with_the_torch_path(tmp_path, order):
    """The same conversion proven from the files' bytes (numpy) and by torch's check: both pass, same scale."""
    from safetensors.torch import load_file

    from fc2conv.check import check_changes
    from fc2conv.jobs.convert import convert_file

    weight = torch.randn(64, 8 * 4 * 4, generator=torch.Generator().manual_seed(8))
    state = {"fc.weight": weight, "fc.bias": torch.zeros(64)}
    save_file(state, tmp_path / "a.safetensors")
    result = convert_file(tmp_path / "a.safetensors", tmp_path / "b.safetensors", input_shape="8x4x4",
                          flatten_order=order)  # fmt: skip
    (ours,) = result.checks
    (theirs,) = check_changes(result.plan.layers, state, load_file(tmp_path / "b.safetensors"), exact=True)
    assert ours.ok and theirs.ok and ours.exact and theirs.exact
    assert ours.engine == "numpy" and theirs.engine == "torch"
    assert 0.5 < ours.reference_scale / theirs.reference_scale < 2
    assert ours.max_rel_error < 3 * tolerance_for("float32", terms=128).rtol


def test_checks_made_ahead_on_the_input_are_taken_only_for_kernels_proven_byte_for_byte(tmp_path, monkeypatch):
    """The numeric check of a copied kernel runs on the input's bytes while copying; a damaged copy is re-checked."""
    import fc2conv.jobs.convert as convert_job
    import fc2conv.jobs.proofs as proofs

    calls: list[bool] = []
    real_numeric = proofs._numeric

    def numeric(change, infos, spans, kernel_spans, *args):
        calls.append(spans is kernel_spans)  # True: ahead, on the input's own bytes
        return real_numeric(change, infos, spans, kernel_spans, *args)

    monkeypatch.setattr(proofs, "_numeric", numeric)
    weight = torch.randn(16, 8 * 2 * 2, generator=torch.Generator().manual_seed(9))
    save_file({"fc.weight": weight}, tmp_path / "a.safetensors")
    result = convert_job.convert_file(tmp_path / "a.safetensors", tmp_path / "b.safetensors", input_shape="8x2x2")
    assert result.written and calls == [True] and result.checks[0].exact

    real_write = convert_job.write_safetensors

    def write_then_damage(path, infos, *args, **kwargs):
        size = real_write(path, infos, *args, **kwargs)
        with open(path, "r+b") as f:
            f.seek(-4, 2)  # the last weight of the kernel
            f.write(struct.pack("<f", 1000.0))
        return size

    calls.clear()
    monkeypatch.setattr(convert_job, "write_safetensors", write_then_damage)
    damaged = convert_job.convert_file(tmp_path / "a.safetensors", tmp_path / "c.safetensors", input_shape="8x2x2")
    assert calls == [True, False]  # made ahead, then redone on the written bytes, which differ
    (check,) = damaged.checks
    assert not damaged.written and not check.ok and not check.exact
    assert check.max_abs_error > 100 and "index [15, 7, 1, 1]" in check.problem
    assert not (tmp_path / "c.safetensors").exists()


def test_a_matrix_is_told_from_a_tensor_while_torch_is_still_importing(monkeypatch):
    """torch half imported on another thread (a module without Tensor yet): arrays and matrices are read as such."""
    import types

    from fc2conv.matrix import as_matrix

    monkeypatch.setitem(sys.modules, "torch", types.ModuleType("torch"))  # as sys.modules shows it mid-import
    values = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert np.array_equal(as_matrix(values).take(np.array([2])), values[[2]])


def test_the_readme_sample_converts_and_verifies_without_torch(tmp_path):
    """The set-up command of the README never imports torch (its two kernels keep their weights' bytes)."""
    out = tmp_path / "small_cnn.conv.safetensors"
    source = ROOT / "sample_models" / "small_cnn.pt"
    converted = _run_without_torch("convert", source, "--input-shape", "32x4x4", "-o", out)
    assert converted.returncode == 0 and "TORCH False" in converted.stderr, converted.stderr
    assert "conv (float32, numpy) = FC (float64)" in converted.stdout
    verified = _run_without_torch("verify", source, out)
    assert verified.returncode == 0 and "TORCH False" in verified.stderr, verified.stderr


def test_spans_compared_in_pieces_on_two_threads_give_the_first_difference(tmp_path, monkeypatch):
    import fc2conv.check as check

    monkeypatch.setattr(check, "_COMPARE_STEP", 64)  # 1000-byte spans in 16 pieces
    data = bytes(range(256)) * 16
    (tmp_path / "a").write_bytes(data)
    changed = bytearray(data)
    changed[100 + 700] ^= 1
    changed[100 + 130] ^= 1
    changed[1100 + 999] ^= 1
    (tmp_path / "b").write_bytes(bytes(changed))
    a, b = tmp_path / "a", tmp_path / "b"
    found = check.compare_spans(
        {
            "two": (ByteSpan(a, 100, 1000), ByteSpan(b, 100, 1000)),
            "last": (ByteSpan(a, 1100, 1000), ByteSpan(b, 1100, 1000)),
            "same": (ByteSpan(a, 0, 100), ByteSpan(b, 0, 100)),
            "shorter": (ByteSpan(a, 0, 100), ByteSpan(b, 0, 90)),
            "empty": (ByteSpan(a, 5, 0), ByteSpan(b, 5, 0)),
        }
    )
    assert found == {"two": 130, "last": 999, "same": None, "shorter": 90, "empty": None}


def test_a_permuted_kernel_from_a_torch_save_zip_needs_no_torch_either(tmp_path, save_pt):
    """The README's promise for both byte formats: a `torch.save` zip's hwc head converts and verifies without torch."""
    generator = torch.Generator().manual_seed(13)
    state = {
        "fc.weight": torch.randn(12, 5 * 2 * 3, generator=generator),
        "fc.bias": torch.randn(12, generator=generator),
    }
    checkpoint = save_pt(state, "h.pt")
    out = tmp_path / "h.conv.safetensors"
    done = _run_without_torch("convert", checkpoint, "--input-shape", "5x2x3", "--flatten-order", "hwc", "-o", out,
                              "--json")  # fmt: skip
    assert done.returncode == 0 and "TORCH False" in done.stderr, done.stderr
    [layer] = json.loads(done.stdout)["layers"]
    assert layer["ok"] and layer["exact"] and "numpy" in layer["proves"]
    from safetensors.torch import load_file

    expected = state["fc.weight"].reshape(12, 2, 3, 5).permute(0, 3, 1, 2)
    assert torch.equal(load_file(out)["fc.weight"], expected)
    verified = _run_without_torch("verify", checkpoint, out)
    assert verified.returncode == 0 and "TORCH False" in verified.stderr, verified.stderr
