"""fc2conv.evidence: which flatten order and geometry a trained FC weight favours, on real numbers.

Trained weights must give the right order or none, never the wrong one; random weights must give
none. Expectations are margins and verdicts, never exact digits (weights trained here differ by a few
percent from CPU to CPU).
"""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from fc2conv import evidence
from fc2conv.convert import convert_state_dict, fc_to_conv_weight
from fc2conv.evidence import (
    geometry_evidence,
    map_factorisations,
    order_evidence,
    order_warning,
)
from fc2conv.matrix import ArrayMatrix, as_matrix, bfloat16_to_float32
from fc2conv.plan import LayerChange
from fc2conv.types import InputShape
from tests.conftest import ROOT, SAMPLES
from tests.evidence_cases import (
    RANDOM_CASES,
    SYNTHETIC_KINDS,
    TRAINED_CASES,
    random_weight,
    synthetic_weight,
    train_first_fc,
)

DIGITS_MAP = InputShape(32, 4, 4)


def digits_weight() -> torch.Tensor:
    return torch.load(SAMPLES / "digits_cnn.pt", weights_only=True)["classifier.1.weight"]


def channels_last_state() -> dict[str, torch.Tensor]:
    return load_file(SAMPLES / "digits_channels_last.safetensors")


# --- the committed samples -------------------------------------------------------------------------


def test_digits_sample_clearly_favours_chw():
    found = order_evidence(digits_weight(), DIGITS_MAP)
    assert found.strength == "clear" and found.favoured == "chw"
    assert found.margin > 1.2 and found.variance_margin > 1.1  # measured 1.33 and 1.17
    assert found.score("chw").smoothness < 0.85 < 0.95 < found.score("hwc").smoothness  # 0.79, 1.04
    assert found.rows == 64 and found.rows_agreeing > 0.75
    assert order_warning(found, "chw") is None
    warning = order_warning(found, "hwc")
    assert warning and "flatten order hwc is in use" in warning and "use flatten order chw" in warning


def test_channels_last_sample_clearly_favours_hwc():
    found = order_evidence(channels_last_state()["classifier.1.weight"], DIGITS_MAP)
    assert found.strength == "clear" and found.favoured == "hwc"
    assert found.margin > 1.15 and found.variance_margin > 1.08  # measured 1.28 and 1.15
    assert "use flatten order hwc" in order_warning(found, "chw")
    assert order_warning(found, "hwc") is None


def test_channels_last_sample_is_its_hwc_convolution_and_not_the_chw_one():
    from sample_models.train_digits import load_data
    from sample_models.train_digits_channels_last import DigitsChannelsLastCNN

    pytest.importorskip("sklearn")
    state = channels_last_state()
    model = DigitsChannelsLastCNN().eval()
    model.load_state_dict(state)
    *_, x_test, y_test = load_data()
    with torch.no_grad():
        scores = model(x_test)
        features = model.features(x_test)
        assert float((scores.argmax(1) == y_test).float().mean()) >= 0.95

        def conv_head(order: str) -> torch.Tensor:
            converted = convert_state_dict(state, "32x4x4", order)
            hidden = F.relu(F.conv2d(features, converted["classifier.1.weight"], converted["classifier.1.bias"]))
            return F.conv2d(hidden, converted["classifier.3.weight"], converted["classifier.3.bias"]).flatten(1)

        scale = float(scores.abs().max())
        assert float((conv_head("hwc") - scores).abs().max()) <= 1e-5 * scale
        assert float((conv_head("chw") - scores).abs().max()) > 0.1 * scale  # loads, runs, silently wrong


def test_geometry_of_the_digits_sample_is_32x4x4_among_all_factorisations_of_512():
    candidates = map_factorisations(512)
    assert DIGITS_MAP in candidates and len(candidates) == 54
    found = geometry_evidence(digits_weight(), candidates)
    assert found.ranking[0].shape == DIGITS_MAP and found.ranking[0].order == "chw"
    assert found.strength == "clear" and found.favoured == DIGITS_MAP
    assert found.margin > 1.1 and found.runner_up is not None and found.runner_up.shape != DIGITS_MAP
    assert found.order is not None and found.order.favoured == "chw"


def test_geometry_of_the_channels_last_sample_ranks_32x4x4_first_and_its_order_is_hwc():
    found = geometry_evidence(channels_last_state()["classifier.1.weight"], map_factorisations(512))
    assert found.ranking[0].shape == DIGITS_MAP
    assert found.favoured in (DIGITS_MAP, None)
    assert found.order is not None and found.order.favoured == "hwc"


# --- CNNs trained here -----------------------------------------------------------------------------


# A training takes a second or two; these six run here, and every case of TRAINED_CASES runs on two
# seeds in benchmarks/evidence_margins.py.
TESTED_NAMES = {
    "digits 32x4x4",
    "digits 24x4x6 (non-square)",
    "digits 4x8x8 (C < H*W)",
    "digits 64x2x2",
    "digits 64x2x2 (max pool)",
    "bars 16x8x8 (max pool)",
}
TESTED_CASES = [case for case in TRAINED_CASES if case.name in TESTED_NAMES]


@pytest.mark.parametrize("order", ["chw", "hwc"])
@pytest.mark.parametrize("case", TESTED_CASES, ids=[c.name for c in TESTED_CASES])
def test_trained_weights_give_the_right_order_or_none(case, order):
    if case.data == "digits":
        pytest.importorskip("sklearn")
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    weight, accuracy = train_first_fc(case, order)
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == (threads, deterministic)
    assert accuracy >= 0.9, accuracy
    found = order_evidence(weight, InputShape(*case.map_shape))
    assert found.favoured in (order, None), found.explanation  # never the wrong order
    if case.expect == "clear":
        assert found.strength == "clear" and found.favoured == order, found.explanation
        assert found.margin > MIN_MARGIN_WITH_ROOM and found.variance_margin > 1.07, found.explanation
    elif case.expect == "weak":
        assert found.strength == "weak", found.explanation


# The clear trained cases measure smoothness margins of 1.18 to 1.53 and variance margins of 1.12 to
# 1.61 on two seeds (benchmarks/evidence_margins.py); the thresholds leave room for other CPUs' rounding.
MIN_MARGIN_WITH_ROOM = 1.12


# --- synthetic structure ---------------------------------------------------------------------------


@pytest.mark.parametrize("order", ["chw", "hwc"])
@pytest.mark.parametrize("map_shape", [(32, 4, 4), (128, 7, 7), (3, 5, 7), (17, 4, 4)])
@pytest.mark.parametrize("kind", SYNTHETIC_KINDS)
def test_synthetic_structure_gives_the_right_order_or_none(kind, map_shape, order):
    """Smooth maps are found whatever the offsets and channel scales; offsets alone never mislead.

    Per-position offsets are what fools the smoothness alone when C is not a multiple of H*W
    (17x4x4, 128x7x7 in hwc order); the unexplained variance then disagrees, and the verdict is "weak".
    """
    found = order_evidence(synthetic_weight(kind, map_shape, order, rows=32), InputShape(*map_shape))
    assert found.favoured in (order, None), found.explanation
    if kind.startswith("smooth maps"):
        assert found.favoured == order, found.explanation
    if kind in ("position offsets", "smooth position offsets"):
        assert found.strength == "weak", found.explanation


def test_smoothness_alone_is_fooled_by_position_offsets_and_the_verdict_is_weak():
    weight = synthetic_weight("position offsets", (512, 7, 7), "hwc")
    found = order_evidence(weight, InputShape(512, 7, 7))
    assert found.leaning == "chw" and found.margin > 1.1  # the wrong way, consistently
    assert found.variance_margin < 1  # the unexplained variance leans the right way
    assert found.strength == "weak" and found.favoured is None
    assert "leans the other way" in found.explanation


# --- random, untrained weights ---------------------------------------------------------------------


@pytest.mark.parametrize("init", ["kaiming", "normal"])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("map_shape", "rows"), RANDOM_CASES, ids=[f"{c}x{h}x{w}-{r}" for (c, h, w), r in RANDOM_CASES])
def test_random_weights_claim_nothing(map_shape, rows, seed, init):
    found = order_evidence(random_weight(map_shape, rows, seed, init), InputShape(*map_shape))
    assert found.strength == "weak" and found.favoured is None, found.explanation
    assert 0.8 < found.score("chw").smoothness < 1.25 and 0.8 < found.score("hwc").smoothness < 1.25


def test_random_weights_have_no_clear_geometry():
    found = geometry_evidence(random_weight((32, 4, 4), 64, seed=3), map_factorisations(512))
    assert found.strength == "weak" and found.favoured is None, found.explanation


# --- not applicable, odd inputs --------------------------------------------------------------------


@pytest.mark.parametrize("map_shape", [(512, 1, 1), (1, 16, 32), (1, 1, 512)])
def test_orders_that_coincide_are_not_applicable(map_shape):
    found = order_evidence(digits_weight(), InputShape(*map_shape))
    assert found.strength == "not applicable" and found.favoured is None and found.leaning is None
    assert math.isnan(found.margin) and "both flatten orders read it the same way" in found.explanation


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_weights_are_not_applicable(bad):
    weight = digits_weight().clone()
    weight[17, 300] = bad
    found = order_evidence(weight, DIGITS_MAP)
    assert found.strength == "not applicable" and "NaN or Inf" in found.explanation
    assert geometry_evidence(weight, [DIGITS_MAP, InputShape(8, 8, 8)]).strength == "not applicable"


def test_integer_constant_and_empty_weights_are_not_applicable():
    assert order_evidence(torch.ones(8, 512, dtype=torch.int64), DIGITS_MAP).strength == "not applicable"
    assert order_evidence(torch.ones(8, 512), DIGITS_MAP).strength == "not applicable"
    assert order_evidence(torch.ones(0, 512), DIGITS_MAP).strength == "not applicable"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_every_floating_dtype_gives_the_float32_verdict(dtype):
    reference = order_evidence(digits_weight(), DIGITS_MAP)
    found = order_evidence(digits_weight().to(dtype), DIGITS_MAP)
    assert found.favoured == reference.favoured == "chw"
    assert found.margin == pytest.approx(reference.margin, rel=0.03)
    assert found.variance_margin == pytest.approx(reference.variance_margin, rel=0.03)


@pytest.mark.parametrize("scale", [1e30, 1e-30])
def test_huge_and_tiny_weights_give_the_same_verdict(scale):
    reference = order_evidence(digits_weight().double(), DIGITS_MAP)
    for weight in (digits_weight().double() * scale, digits_weight() * scale):
        found = order_evidence(weight, DIGITS_MAP)
        assert found.favoured == "chw"
        assert found.margin == pytest.approx(reference.margin, rel=1e-3)


def test_memory_mapped_weights_give_the_same_figures(tmp_path):
    weight = synthetic_weight("smooth maps", (64, 3, 3), "hwc", rows=300)
    torch.save({"fc.weight": weight}, tmp_path / "fc.pt")
    mapped = torch.load(tmp_path / "fc.pt", mmap=True, weights_only=True)["fc.weight"]
    in_memory, from_disk = order_evidence(weight, InputShape(64, 3, 3)), order_evidence(mapped, InputShape(64, 3, 3))
    assert from_disk == in_memory and from_disk.favoured == "hwc"


def test_a_parameter_or_a_transposed_view_measures_like_the_tensor():
    weight = digits_weight()
    reference = order_evidence(weight, DIGITS_MAP)
    assert order_evidence(torch.nn.Parameter(weight.clone()), DIGITS_MAP) == reference
    assert order_evidence(weight.T.contiguous().T, DIGITS_MAP) == reference  # a Keras (in, out) kernel's .T


def test_weights_memory_mapped_by_fc2conv_give_the_in_memory_figures():
    """The tensors fc2conv's loader hands out (memory-mapped safetensors) measure like loaded ones."""
    from fc2conv.formats import open_source

    checkpoint = open_source(SAMPLES / "digits_channels_last.safetensors")
    mapped = checkpoint.tensors["classifier.1.weight"]
    assert order_evidence(mapped, DIGITS_MAP) == order_evidence(
        channels_last_state()["classifier.1.weight"], DIGITS_MAP
    )


# --- weights as tensors, arrays or any Matrix --------------------------------------------------------


class RowsOfAnArray:
    """A Matrix of the protocol alone (as a reader of a file's mapped bytes would be): it logs what is read."""

    def __init__(self, array: np.ndarray, dtype_name: str | None = None) -> None:
        self.array, self.name, self.taken = array, dtype_name or array.dtype.name, []

    @property
    def shape(self) -> tuple[int, int]:
        return self.array.shape

    @property
    def dtype_name(self) -> str:
        return self.name

    def take(self, rows: np.ndarray) -> np.ndarray:
        assert rows.dtype == np.int64 and np.all(np.diff(rows) > 0)
        self.taken.append(rows.copy())
        return self.array[rows].astype(np.float64 if self.name == "float64" else np.float32)


def test_a_tensor_an_array_and_a_matrix_give_the_same_evidence(tmp_path):
    shape = InputShape(64, 3, 3)
    weight = synthetic_weight("smooth maps, channel and position offsets", (64, 3, 3), "hwc", rows=300)
    array = weight.numpy()
    mapped = np.memmap(tmp_path / "fc.bin", dtype=np.float32, mode="w+", shape=array.shape)
    mapped[:] = array
    custom = RowsOfAnArray(array)
    reference = order_evidence(weight, shape)
    assert reference.favoured == "hwc" and reference.rows == 64
    for form in (array, mapped, custom, as_matrix(weight), torch.nn.Parameter(weight.clone())):
        assert order_evidence(form, shape) == reference
    assert sum(len(rows) for rows in custom.taken) == 64  # the sample alone was read
    candidates = [shape, InputShape(16, 6, 6), InputShape(64, 9, 1)]
    assert geometry_evidence(array, candidates) == geometry_evidence(weight, candidates)

    bits = weight.bfloat16().view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(bfloat16_to_float32(bits), weight.bfloat16().float().numpy())
    in_bfloat16 = order_evidence(weight.bfloat16(), shape)
    assert order_evidence(ArrayMatrix(bits, "bfloat16"), shape) == in_bfloat16
    assert order_evidence(RowsOfAnArray(bfloat16_to_float32(bits), "bfloat16"), shape) == in_bfloat16
    assert in_bfloat16.favoured == "hwc" and in_bfloat16.margin == pytest.approx(reference.margin, rel=0.03)
    assert order_evidence(array.astype(np.float64), shape) == order_evidence(weight.double(), shape)
    assert order_evidence(array.astype(np.float16), shape) == order_evidence(weight.half(), shape)


def test_integer_arrays_and_matrices_are_not_applicable_and_are_not_read():
    found = order_evidence(np.ones((8, 512), dtype=np.int8), DIGITS_MAP)
    assert (
        found.strength == "not applicable"
        and found.explanation == "not applicable: the weight is int8, not floating point"
    )
    custom = RowsOfAnArray(np.ones((8, 512), dtype=np.int8))
    assert order_evidence(custom, DIGITS_MAP) == found and not custom.taken
    assert geometry_evidence(custom, [DIGITS_MAP]).strength == "not applicable"
    with pytest.raises(ValueError, match="2-D"):
        order_evidence(np.ones(512, dtype=np.float32), DIGITS_MAP)
    with pytest.raises(TypeError, match="a numpy array or a Matrix"):
        order_evidence([[1.0] * 512] * 8, DIGITS_MAP)


@pytest.mark.slow
def test_evidence_from_an_array_never_imports_torch():
    code = (
        "import sys\n"
        "from safetensors.numpy import load_file\n"
        "from fc2conv.evidence import geometry_evidence, map_factorisations, order_evidence\n"
        "from fc2conv.types import InputShape\n"
        "weight = load_file('sample_models/digits_channels_last.safetensors')['classifier.1.weight']\n"
        "found = order_evidence(weight, InputShape(32, 4, 4))\n"
        "geometry = geometry_evidence(weight, map_factorisations(512))\n"
        "print(type(weight).__name__, found.favoured, geometry.ranking[0].shape, 'torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert done.stdout.split() == ["ndarray", "hwc", "32x4x4", "False"]


def test_a_sample_of_rows_gives_the_verdict_of_every_row():
    """The default reads 64 seeded rows; on a large layer that gives the verdict of all of them."""
    shape = InputShape(64, 6, 6)
    structured = synthetic_weight("smooth maps, channel and position offsets", (64, 6, 6), "hwc", rows=768)
    random = random_weight((64, 6, 6), 768, seed=5)
    for weight, verdict in ((structured, "hwc"), (random, None)):
        sampled = order_evidence(weight, shape)
        every_row = order_evidence(weight, shape, max_rows=None)
        other_sample = order_evidence(weight, shape, seed=1)
        assert (sampled.rows, every_row.rows) == (64, 768)
        assert sampled.favoured == every_row.favoured == other_sample.favoured == verdict
        assert sampled.margin == pytest.approx(every_row.margin, rel=0.05)
        assert sampled.score("chw").smoothness == pytest.approx(every_row.score("chw").smoothness, rel=0.05)


def test_bad_arguments_raise():
    weight = digits_weight()
    with pytest.raises(ValueError, match="takes 512 inputs; 32x4x5 = 640"):
        order_evidence(weight, InputShape(32, 4, 5))
    with pytest.raises(ValueError, match="2-D"):
        order_evidence(weight[0], DIGITS_MAP)
    with pytest.raises(ValueError, match="unknown flatten order 'cwh'"):
        order_evidence(weight, DIGITS_MAP, orders=("chw", "cwh"))
    with pytest.raises(ValueError, match="two flatten orders"):
        order_evidence(weight, DIGITS_MAP, orders=("chw",))
    with pytest.raises(ValueError, match="takes 512 inputs"):
        geometry_evidence(weight, [DIGITS_MAP, InputShape(3, 3, 3)])
    assert geometry_evidence(weight, [InputShape(512, 1, 1)]).strength == "not applicable"


def test_map_factorisations():
    assert map_factorisations(1) == ()
    assert map_factorisations(7) == (InputShape(1, 1, 7), InputShape(1, 7, 1))
    shapes = map_factorisations(25088)
    assert InputShape(512, 7, 7) in shapes and len(shapes) == len(set(shapes))
    assert all(s.features == 25088 and s.height * s.width > 1 for s in shapes)


# --- the arithmetic, against independent references ------------------------------------------------


@pytest.mark.parametrize("order", ["chw", "hwc"])
@pytest.mark.parametrize("map_shape", [(3, 5, 7), (4, 1, 6), (2, 6, 1), (5, 2, 2), (16, 3, 4)])
def test_layout_and_sums_match_a_direct_computation(map_shape, order):
    """The kernel is the one fc2conv writes; the closed-form sums equal the sums taken directly."""
    shape = InputShape(*map_shape)
    values = torch.randn(6, shape.features, dtype=torch.float64)
    values -= values.mean(dim=1, keepdim=True)
    change = LayerChange("fc", "fc.weight", None, "float64", (6, shape.features), shape, order)
    kernel = fc_to_conv_weight(values, change)
    assert torch.equal(torch.from_numpy(evidence._kernel_view(values.numpy(), shape, order)), kernel)

    residual = kernel - kernel.mean(dim=(2, 3), keepdim=True) - kernel.mean(dim=1, keepdim=True)
    cross = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    neighbours = F.conv2d(residual, cross.expand(shape.channels, 1, 3, 3), padding=1, groups=shape.channels)
    adjacent = sum(
        (pair[0] - pair[1]).square().sum(dim=(1, 2, 3))
        for pair in (
            (residual[..., :, 1:], residual[..., :, :-1]),
            (residual[..., 1:, :], residual[..., :-1, :]),
        )
    )
    products = (residual * neighbours).sum(dim=(1, 2, 3))
    unexplained = residual.square().sum(dim=(1, 2, 3)) - products.clamp(min=0).square() / neighbours.square().sum(
        dim=(1, 2, 3)
    )
    rows = values.numpy()
    sums = evidence._order_sums(evidence._SampledRows(rows, (rows**2).sum(axis=1)), shape, order)
    assert torch.allclose(torch.from_numpy(sums.smooth_adjacent), adjacent)
    assert torch.allclose(torch.from_numpy(sums.unexplained), unexplained)
    raw_adjacent = (kernel[..., :, 1:] - kernel[..., :, :-1]).square().sum(dim=(1, 2, 3)) + (
        kernel[..., 1:, :] - kernel[..., :-1, :]
    ).square().sum(dim=(1, 2, 3))
    assert torch.allclose(torch.from_numpy(evidence._adjacent_squares(rows, shape, order, {})), raw_adjacent)


def test_statistics_are_about_one_for_noise():
    weight = torch.randn(2000, 3 * 5 * 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    found = order_evidence(weight, InputShape(3, 5, 7), max_rows=None)
    for score in found.scores:
        assert score.smoothness == pytest.approx(1.0, abs=0.02)


@pytest.mark.parametrize(
    ("t", "dof", "p"),
    [(2.262, 9, 0.05), (4.303, 2, 0.05), (12.706, 1, 0.05), (2.750, 30, 0.01), (3.291, 10**4, 0.001), (0.0, 5, 1.0)],
)
def test_t_test_p_values_match_the_tables(t, dof, p):
    assert evidence._t_test_p(t, dof) == pytest.approx(p, rel=2e-3, abs=1e-12)


def test_sign_test_p_values():
    assert evidence._sign_test_p(8, 8) == pytest.approx(2 / 256)
    assert evidence._sign_test_p(0, 8) == pytest.approx(2 / 256)
    assert evidence._sign_test_p(43, 64) <= 0.01 < evidence._sign_test_p(42, 64)
    assert evidence._sign_test_p(32, 64) == 1.0
