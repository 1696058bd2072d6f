"""ONNX graphs in, ONNX graphs out: heads found, rewritten as Conv, checked in ONNX Runtime against
float64 references written here (never fc2conv's own check), and the refusals."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from fc2conv.errors import CheckpointError, PlanError, ShapeError  # noqa: E402
from fc2conv.formats.onnx import load_onnx_model, read_onnx, write_onnx  # noqa: E402
from fc2conv.onnx_check import convert_onnx, verify_onnx  # noqa: E402
from fc2conv.onnx_rewrite import rewrite_onnx  # noqa: E402
from tests.conftest import error_line  # noqa: E402
from tests.conftest import run as run_cli  # noqa: E402

# ONNX Runtime computes in float32; the references here in float64. Relative to the output's scale,
# float32 rounding over these fan-ins stays below 1e-6; 1e-4 leaves room on any CPU and still fails
# any wrong layout (errors of order 1).
RTOL = 1e-4
FLOAT = TensorProto.FLOAT


# --- building graphs ----------------------------------------------------------------------------


def make_model(nodes, inputs, outputs, initializers, opset=17, **graph_kwargs):
    graph = helper.make_graph(
        nodes, "g", inputs, outputs,
        initializer=[numpy_helper.from_array(np.asarray(v), k) for k, v in initializers.items()], **graph_kwargs,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8  # what this ONNX Runtime reads for opsets up to 17
    onnx.checker.check_model(model, full_check=True)
    return model


def save(model, folder: Path, name: str) -> Path:
    path = folder / name
    onnx.save(model, str(path))
    return path


def weights(rng, *shape):
    fan_in = shape[-1] if len(shape) == 2 else int(np.prod(shape[1:]))
    return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)


def run(model, feeds):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True))


def t64(a):
    return torch.from_numpy(np.asarray(a, dtype=np.float64))


def assert_close(got, expected):
    got, expected = np.asarray(got, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert got.shape == expected.shape
    scale = np.abs(expected).max()
    assert np.abs(got - expected).max() <= RTOL * scale, (np.abs(got - expected).max(), scale)


class Case:
    """A graph, its float64 reference (trunk to the feature map, then head), and its input geometry."""

    def __init__(self, model, input_name, traced, big, trunk, head, map_hw, output="out"):
        self.model, self.input_name, self.traced, self.big = model, input_name, traced, big
        self.trunk, self.head, self.map_hw, self.output = trunk, head, map_hw, output

    def reference(self, x):
        return self.head(self.trunk(t64(x))).numpy()


def tutorial_head(rng) -> Case:
    """The tutorial head, as written: a 256x4x4 map -> Flatten -> Gemm(1024) -> Relu -> Gemm(10)."""
    w1, b1 = weights(rng, 1024, 4096), weights(rng, 1024, 1)[:, 0]
    w2, b2 = weights(rng, 10, 1024), weights(rng, 10, 1)[:, 0]
    model = make_model(
        [
            helper.make_node("Flatten", ["features"], ["flat"], name="flatten", axis=1),
            helper.make_node("Gemm", ["flat", "fc1.weight", "fc1.bias"], ["h"], name="fc1", transB=1),
            helper.make_node("Relu", ["h"], ["h_relu"], name="relu"),
            helper.make_node("Gemm", ["h_relu", "fc2.weight", "fc2.bias"], ["out"], name="fc2", transB=1),
        ],
        [helper.make_tensor_value_info("features", FLOAT, ["N", 256, 4, 4])],
        [helper.make_tensor_value_info("out", FLOAT, ["N", 10])],
        {"fc1.weight": w1, "fc1.bias": b1, "fc2.weight": w2, "fc2.bias": b2},
    )
    model.doc_string = "the tutorial head"
    helper.set_model_props(model, {"author": "tests"})

    def head(m):
        return torch.relu(m.flatten(1) @ t64(w1).T + t64(b1)) @ t64(w2).T + t64(b2)

    return Case(model, "features", (2, 256, 4, 4), (1, 256, 7, 6), lambda x: x, head, (4, 4))


def trunk_reshape_matmul(rng) -> Case:
    """Conv (no padding) -> Relu -> MaxPool -> Reshape(0, -1) -> MatMul + Add -> Relu -> Gemm(transB=0)."""
    k, kb = weights(rng, 8, 3, 3, 3), weights(rng, 8, 1)[:, 0]
    w1, b1 = weights(rng, 32, 200).T.copy(), weights(rng, 32, 1)[:, 0]  # MatMul stores (in, out)
    w2, b2 = weights(rng, 10, 32).T.copy(), weights(rng, 10, 1)[:, 0]  # Gemm transB=0: (in, out)
    model = make_model(
        [
            helper.make_node("Conv", ["image", "conv.weight", "conv.bias"], ["c"], name="conv", kernel_shape=[3, 3]),
            helper.make_node("Relu", ["c"], ["r"], name="conv_relu"),
            helper.make_node("MaxPool", ["r"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
            helper.make_node("Reshape", ["p", "flat_shape"], ["flat"], name="reshape"),
            helper.make_node("MatMul", ["flat", "dense1.kernel"], ["mm"], name="dense1"),
            helper.make_node("Add", ["mm", "dense1.bias"], ["h"], name="dense1_bias"),
            helper.make_node("Relu", ["h"], ["hr"], name="relu"),
            helper.make_node("Gemm", ["hr", "dense2.kernel", "dense2.bias"], ["out"], name="dense2", transB=0),
        ],
        [helper.make_tensor_value_info("image", FLOAT, ["N", 3, 12, 12])],
        [helper.make_tensor_value_info("out", FLOAT, ["N", 10])],
        {"conv.weight": k, "conv.bias": kb, "flat_shape": np.array([0, -1], dtype=np.int64),
         "dense1.kernel": w1, "dense1.bias": b1, "dense2.kernel": w2, "dense2.bias": b2},
    )  # fmt: skip

    def trunk(x):
        return F.max_pool2d(torch.relu(F.conv2d(x, t64(k), t64(kb))), 2)

    def head(m):
        return torch.relu(m.flatten(1) @ t64(w1) + t64(b1)) @ t64(w2) + t64(b2)

    return Case(model, "image", (2, 3, 12, 12), (1, 3, 24, 22), trunk, head, (5, 5))


def channels_last(rng) -> Case:
    """tf2onnx's layout: NHWC input, Transpose to NCHW, Conv, Transpose(perm=[0, 2, 3, 1]), Reshape, MatMul + Add."""
    k, kb = weights(rng, 4, 3, 3, 3), weights(rng, 4, 1)[:, 0]
    w1, b1 = weights(rng, 16, 144).T.copy(), weights(rng, 16, 1)[:, 0]
    w2, b2 = weights(rng, 5, 16).T.copy(), weights(rng, 5, 1)[:, 0]
    model = make_model(
        [
            helper.make_node("Transpose", ["input"], ["nchw"], name="to_nchw", perm=[0, 3, 1, 2]),
            helper.make_node("Conv", ["nchw", "conv.kernel", "conv.bias"], ["c"], name="conv", kernel_shape=[3, 3],
                             pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["r"], name="conv_relu"),
            helper.make_node("Transpose", ["r"], ["nhwc"], name="to_nhwc", perm=[0, 2, 3, 1]),
            helper.make_node("Reshape", ["nhwc", "flat_shape"], ["flat"], name="flatten"),
            helper.make_node("MatMul", ["flat", "dense.kernel"], ["mm1"], name="dense/MatMul"),
            helper.make_node("Add", ["mm1", "dense.bias"], ["h"], name="dense/BiasAdd"),
            helper.make_node("Relu", ["h"], ["hr"], name="dense/Relu"),
            helper.make_node("MatMul", ["hr", "dense_1.kernel"], ["mm2"], name="dense_1/MatMul"),
            helper.make_node("Add", ["mm2", "dense_1.bias"], ["logits"], name="dense_1/BiasAdd"),
            helper.make_node("Softmax", ["logits"], ["out"], name="dense_1/Softmax", axis=-1),
        ],
        [helper.make_tensor_value_info("input", FLOAT, ["N", 6, 6, 3])],
        [helper.make_tensor_value_info("out", FLOAT, ["N", 5])],
        {"conv.kernel": k, "conv.bias": kb, "flat_shape": np.array([-1, 144], dtype=np.int64),
         "dense.kernel": w1, "dense.bias": b1, "dense_1.kernel": w2, "dense_1.bias": b2},
    )  # fmt: skip

    def trunk(x):  # NHWC in, NCHW feature map out
        return torch.relu(F.conv2d(x.permute(0, 3, 1, 2), t64(k), t64(kb), padding=1))

    def head(m):  # the channels-last flatten: (N, H, W, C) order
        h = torch.relu(m.permute(0, 2, 3, 1).reshape(m.shape[0], -1) @ t64(w1) + t64(b1))
        return torch.softmax(h @ t64(w2) + t64(b2), dim=1)

    return Case(model, "input", (2, 6, 6, 3), (1, 11, 13, 3), trunk, head, (6, 6))


def folded_gemms(rng) -> Case:
    """Gemm alpha/beta != 1 with (1, out) and one-value biases, transB 1 and 0, and between the layers
    Dropout, BatchNormalization and a per-feature Mul (tf2onnx writes a BatchNorm as Mul/Add)."""
    w1, c1 = weights(rng, 20, 54), weights(rng, 1, 20)
    w2, c2 = weights(rng, 20, 7), np.array([0.3], dtype=np.float32)  # transB=0: (in, out)
    scale, shift = weights(rng, 20, 1)[:, 0] + 1, weights(rng, 20, 1)[:, 0]
    mean, var = weights(rng, 20, 1)[:, 0], np.abs(weights(rng, 20, 1)[:, 0]) + 0.5
    gain = weights(rng, 20, 1)[:, 0] + 1
    model = make_model(
        [
            helper.make_node("Flatten", ["map"], ["flat"], name="flatten"),
            helper.make_node("Gemm", ["flat", "w1", "c1"], ["g1"], name="gemm1", transB=1, alpha=0.5, beta=2.0),
            helper.make_node("Dropout", ["g1", "ratio"], ["d"], name="dropout"),
            helper.make_node("BatchNormalization", ["d", "bn.scale", "bn.shift", "bn.mean", "bn.var"], ["bn"],
                             name="bn", epsilon=1e-3),
            helper.make_node("Mul", ["bn", "gain"], ["m"], name="gain"),
            helper.make_node("Relu", ["m"], ["r"], name="relu"),
            helper.make_node("Gemm", ["r", "w2", "c2"], ["out"], name="gemm2", transB=0, alpha=1.5, beta=0.25),
        ],
        [helper.make_tensor_value_info("map", FLOAT, ["N", 6, 3, 3])],
        [helper.make_tensor_value_info("out", FLOAT, ["N", 7])],
        {"w1": w1, "c1": c1, "w2": w2, "c2": c2, "ratio": np.array(0.5, dtype=np.float32), "bn.scale": scale,
         "bn.shift": shift, "bn.mean": mean, "bn.var": var, "gain": gain},
    )  # fmt: skip

    def head(m):
        h = 0.5 * m.flatten(1) @ t64(w1).T + 2.0 * t64(c1)
        h = (h - t64(mean)) / torch.sqrt(t64(var) + 1e-3) * t64(scale) + t64(shift)
        return 1.5 * torch.relu(h * t64(gain)) @ t64(w2) + 0.25 * t64(c2)

    return Case(model, "map", (3, 6, 3, 3), (2, 6, 8, 5), lambda x: x, head, (3, 3))


CASES = [tutorial_head, trunk_reshape_matmul, channels_last, folded_gemms]


def spatial(case: Case) -> tuple[int, int]:
    return (1, 2) if case.input_name == "input" else (2, 3)  # the channels-last case has an NHWC input


# --- conversions, checked against the references ------------------------------------------------


@pytest.mark.parametrize("build", CASES, ids=lambda f: f.__name__)
def test_traced_size_same_outputs(build, tmp_path):
    case = build(np.random.default_rng(0))
    path = save(case.model, tmp_path, "model.onnx")
    source = read_onnx(path)
    converted = rewrite_onnx(source)
    onnx.checker.check_model(converted, full_check=True)
    assert {n.op_type for n in converted.graph.node} >= {"Conv"}
    assert not {"Gemm", "MatMul"} & {n.op_type for n in converted.graph.node}
    assert [o.name for o in converted.graph.output] == [o.name for o in case.model.graph.output]
    assert converted.opset_import == case.model.opset_import
    x = np.random.default_rng(1).standard_normal(case.traced).astype(np.float32)
    got = run(converted, {case.input_name: x})[case.output]
    assert got.shape == (case.traced[0], case.model.graph.output[0].type.tensor_type.shape.dim[1].dim_value)
    assert_close(got, case.reference(x))


@pytest.mark.parametrize("build", CASES, ids=lambda f: f.__name__)
def test_dense_map_position_by_position(build, tmp_path):
    case = build(np.random.default_rng(0))
    converted = rewrite_onnx(read_onnx(save(case.model, tmp_path, "model.onnx")), dense=True)
    dims = next(i for i in converted.graph.input if i.name == case.input_name).type.tensor_type.shape.dim
    assert all(dims[a].dim_param for a in spatial(case))  # height and width are dynamic now
    x = np.random.default_rng(2).standard_normal(case.big).astype(np.float32)
    dense = run(converted, {case.input_name: x})[case.output]
    feature_map = case.trunk(t64(x))
    h, w = case.map_hw
    grid = (feature_map.shape[2] - h + 1, feature_map.shape[3] - w + 1)
    assert dense.shape == (case.big[0], dense.shape[1], *grid) and grid[0] * grid[1] > 1
    for i in range(grid[0]):
        for j in range(grid[1]):
            expected = case.head(feature_map[:, :, i : i + h, j : j + w]).numpy()
            assert_close(dense[:, :, i, j], expected)
    # At the traced size the dense model gives the original's scores as (N, K, 1, 1).
    x = np.random.default_rng(3).standard_normal(case.traced).astype(np.float32)
    at_traced = run(converted, {case.input_name: x})[case.output]
    assert_close(at_traced.reshape(at_traced.shape[:2]), case.reference(x))


@pytest.mark.parametrize("build", CASES, ids=lambda f: f.__name__)
def test_convert_onnx_proof(build, tmp_path):
    case = build(np.random.default_rng(0))
    path = save(case.model, tmp_path, "model.onnx")
    result = convert_onnx(path, dense=True)
    assert result.ok
    assert len(result.proof.layers) == 2 and all(c.max_rel_error < RTOL for c in result.proof.layers)
    assert result.proof.runtime.ok and result.proof.runtime.max_rel_error < RTOL
    dense = result.proof.dense
    assert dense is not None and dense.ok and dense.positions_checked >= 4
    # Written, read back, and verified as a file against its original.
    out = tmp_path / "model.conv.onnx"
    assert write_onnx(result.model, out) == out.stat().st_size
    verified = verify_onnx(path, out)
    assert verified.ok and verified.dense and len(verified.proof.layers) == 2


def test_names_metadata_and_layout_kept(tmp_path):
    case = tutorial_head(np.random.default_rng(0))
    source = read_onnx(save(case.model, tmp_path, "head.onnx"))
    (head,) = source.heads
    assert (head.flatten, head.flatten_order, str(head.feature_map)) == ("flatten", "chw", "256x4x4")
    assert [(layer.node, layer.shape) for layer in head.layers] == [("fc1", (1024, 4096)), ("fc2", (10, 1024))]
    converted = rewrite_onnx(source)
    kernels = {t.name: tuple(t.dims) for t in converted.graph.initializer}
    # The kernels replace the FC weights under their own names; the biases are the same tensors.
    assert kernels == {"fc1.weight": (1024, 256, 4, 4), "fc1.bias": (1024,), "fc2.weight": (10, 1024, 1, 1),
                       "fc2.bias": (10,)}  # fmt: skip
    assert [(n.op_type, n.name) for n in converted.graph.node] == [
        ("Conv", "fc1"), ("Relu", "relu"), ("Conv", "fc2"), ("Flatten", "flatten")
    ]  # fmt: skip
    props = {p.key: p.value for p in converted.metadata_props}
    assert props["author"] == "tests" and props["fc2conv.dense"] == "false"
    assert converted.doc_string == "the tutorial head"
    # The kernel is the weight reshaped, bit for bit (alpha = 1: nothing folded).
    kernel = numpy_helper.to_array(next(t for t in converted.graph.initializer if t.name == "fc1.weight"))
    weight = numpy_helper.to_array(next(t for t in case.model.graph.initializer if t.name == "fc1.weight"))
    assert np.array_equal(kernel, weight.reshape(1024, 256, 4, 4))


def test_channels_last_transpose_is_absorbed_and_a_chw_kernel_is_caught(tmp_path):
    case = channels_last(np.random.default_rng(0))
    path = save(case.model, tmp_path, "keras.onnx")
    source = read_onnx(path)
    (head,) = source.heads
    assert (head.flatten_order, head.transpose, head.feature_tensor) == ("hwc", "to_nhwc", "r")
    assert source.image_input.layout == "nhwc"
    converted = rewrite_onnx(source)
    assert [list(n.attribute[0].ints) for n in converted.graph.node if n.op_type == "Transpose"] == [[0, 3, 1, 2]]
    # The classic silent bug: the same weights reshaped channel-major. It loads, runs, has the right
    # shapes, and verify measures it wrong.
    weight = numpy_helper.to_array(next(t for t in case.model.graph.initializer if t.name == "dense.kernel")).T
    wrong = next(t for t in converted.graph.initializer if t.name == "dense.kernel")
    wrong.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(weight.reshape(16, 4, 6, 6)), "dense.kernel"))
    bad = tmp_path / "keras.conv.onnx"
    write_onnx(converted, bad)
    verified = verify_onnx(path, bad)
    assert not verified.ok
    assert not verified.proof.layers[0].ok and verified.proof.layers[1].ok
    assert not verified.proof.runtime.ok and verified.proof.runtime.max_rel_error > 1e-2


def dynamic_input(rng):
    """Conv 3x3 -> Flatten -> Gemm(6) on an input of open height and width; the Gemm fits an 8x8 input."""
    k, w = weights(rng, 4, 3, 3, 3), weights(rng, 6, 4 * 6 * 6)
    model = make_model(
        [
            helper.make_node("Conv", ["image", "k"], ["c"], name="conv", kernel_shape=[3, 3]),
            helper.make_node("Flatten", ["c"], ["flat"], name="flatten"),
            helper.make_node("Gemm", ["flat", "w"], ["out"], name="fc", transB=1),
        ],
        [helper.make_tensor_value_info("image", FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("out", FLOAT, ["N", 6])],
        {"k": k, "w": w},
    )
    return model, k, w


def test_dynamic_input_needs_its_size(tmp_path):
    model, k, w = dynamic_input(np.random.default_rng(0))
    path = save(model, tmp_path, "dynamic.onnx")
    with pytest.raises(PlanError, match=r"graph's input 'image' is dynamic") as caught:
        read_onnx(path)
    assert "\n" not in str(caught.value) and "--" not in str(caught.value)
    with pytest.raises(ShapeError, match="channels is 3, not 4"):
        read_onnx(path, "4x8x8")
    result = convert_onnx(path, input_shape="8x8")  # C comes from the graph
    assert result.ok and str(result.source.heads[0].feature_map) == "4x6x6"
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
    expected = (F.conv2d(t64(x), t64(k)).flatten(1) @ t64(w).T).numpy()
    assert_close(run(result.model, {"image": x})["out"], expected)


# --- a PyTorch model through torch.onnx.export ---------------------------------------------------


class SmallVGG(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(16 * 4 * 4, 64), nn.ReLU(), nn.Dropout(), nn.Linear(64, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy-Flatten", "dynamo-Reshape"])
def test_pytorch_export(dynamo, tmp_path):
    torch.manual_seed(0)
    model = SmallVGG().eval()
    path = tmp_path / "vgg.onnx"
    quiet = contextlib.redirect_stdout(io.StringIO())
    with warnings.catch_warnings(), quiet:
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        kwargs = {"dynamic_axes": {"image": {0: "batch"}}} if not dynamo else {}
        torch.onnx.export(model, (torch.zeros(2, 3, 16, 16),), str(path), dynamo=dynamo, input_names=["image"],
                          output_names=["scores"], **kwargs)  # fmt: skip
    source = read_onnx(path)
    (head,) = source.heads
    # The legacy exporter writes Flatten + Gemm; the dynamo exporter a Reshape to a constant shape + Gemm.
    assert head.flatten_op == ("Reshape" if dynamo else "Flatten")
    assert [layer.op for layer in head.layers] == ["Gemm", "Gemm"]
    result = convert_onnx(path, dense=True)
    assert result.ok
    reference = model.double()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        expected = reference(x).numpy()
        got = run(result.model, {"image": x.float().numpy()})["scores"]
        assert_close(got.reshape(expected.shape), expected)
        big = torch.randn(2, 3, 40, 28, dtype=torch.float64)
        dense = run(result.model, {"image": big.float().numpy()})["scores"]
        feature_map = reference.features(big)
        assert dense.shape == (2, 10, 7, 4)
        for i in range(7):
            for j in range(4):
                assert_close(dense[:, :, i, j], reference.classifier(feature_map[:, :, i : i + 4, j : j + 4]).numpy())


# --- refusals -----------------------------------------------------------------------------------


def _head_graph(flatten_nodes, *, extra_outputs=(), inputs=None, initializers=None, map_shape=("N", 4, 2, 2)):
    """A map -> [flatten nodes] -> 'flat' -> Gemm 'fc' graph, for the refusals."""
    rng = np.random.default_rng(0)
    inits = {"w": weights(rng, 5, 16), "b": np.zeros(5, np.float32), **(initializers or {})}
    nodes = [*flatten_nodes, helper.make_node("Gemm", ["flat", "w", "b"], ["out"], name="fc", transB=1)]
    outputs = [helper.make_tensor_value_info("out", FLOAT, [None, 5])]
    outputs += [helper.make_tensor_value_info(name, FLOAT, [None, None]) for name in extra_outputs]
    inputs = inputs or [helper.make_tensor_value_info("map", FLOAT, list(map_shape))]
    return make_model(nodes, inputs, outputs, inits)


def refusal_cases():
    flatten = helper.make_node("Flatten", ["map"], ["flat"], name="flatten")
    return {
        "flatten also a graph output": (
            _head_graph([flatten], extra_outputs=["flat"]), "flatten's output feeds 2 consumers"),
        "flatten into Softmax before the Gemm": (
            _head_graph([helper.make_node("Flatten", ["map"], ["f0"], name="flatten"),
                         helper.make_node("Softmax", ["f0"], ["flat"], name="softmax", axis=1)]),
            "flatten feeds softmax (Softmax) before fc (Gemm)"),
        "weight not an initializer": (
            _head_graph([flatten], inputs=[helper.make_tensor_value_info("map", FLOAT, ["N", 4, 2, 2]),
                                           helper.make_tensor_value_info("w", FLOAT, [5, 16])]),
            "fc (Gemm): its weight 'w' is not an initializer"),
        "data-dependent reshape": (
            _head_graph([helper.make_node("Reshape", ["map", "target"], ["flat"], name="reshape")],
                        inputs=[helper.make_tensor_value_info("map", FLOAT, ["N", 4, 2, 2]),
                                helper.make_tensor_value_info("target", TensorProto.INT64, [2])]),
            "reshape (Reshape) before fc (Gemm) takes its target shape from the graph"),
        "several maps into one Gemm": (
            _head_graph([helper.make_node("Flatten", ["map"], ["fa"], name="flatten_a"),
                         helper.make_node("Flatten", ["map"], ["fb"], name="flatten_b"),
                         helper.make_node("Concat", ["fa", "fb"], ["flat"], name="join", axis=1)],
                        initializers={"w": weights(np.random.default_rng(0), 5, 32)}),
            "fc (Gemm) reads several tensors joined by join (Concat)"),
        "flatten not on axis 1": (
            _head_graph([helper.make_node("Flatten", ["map"], ["flat"], name="flatten", axis=2)],
                        initializers={"w": weights(np.random.default_rng(0), 5, 4)}),
            "flatten (Flatten, axis 2) feeds fc (Gemm): only a flatten on axis 1"),
        "reshape that is not a flatten": (
            _head_graph([helper.make_node("Reshape", ["map", "target"], ["flat"], name="reshape")],
                        initializers={"target": np.array([-1, 4], dtype=np.int64),
                                      "w": weights(np.random.default_rng(0), 5, 4)}),
            "reshape (Reshape to [-1, 4]) turns (N, 4, 2, 2) into"),
        "transA": (
            make_model([flatten, helper.make_node("Gemm", ["flat", "w"], ["out"], name="fc", transA=1)],
                       [helper.make_tensor_value_info("map", FLOAT, [16, 4, 2, 2])],
                       [helper.make_tensor_value_info("out", FLOAT, [None, 5])],
                       {"w": weights(np.random.default_rng(0), 16, 5)}),
            "fc (Gemm) has transA=1"),
    }  # fmt: skip


@pytest.mark.parametrize("name", list(refusal_cases()))
def test_refusals_name_the_node(name, tmp_path):
    model, message = refusal_cases()[name]
    path = save(model, tmp_path, "model.onnx")
    with pytest.raises(PlanError) as caught:
        read_onnx(path)
    text = str(caught.value)
    assert message in text and "\n" not in text and "--" not in text


def test_dense_refused_when_the_output_is_not_elementwise(tmp_path):
    case = tutorial_head(np.random.default_rng(0))
    model = case.model
    model.graph.node.append(helper.make_node("ArgMax", ["out"], ["label"], name="argmax", axis=1, keepdims=0))
    model.graph.output.append(helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]))
    source = read_onnx(save(model, tmp_path, "argmax.onnx"))
    with pytest.raises(PlanError, match=r"argmax \(ArgMax\) reads the output of fc2"):
        rewrite_onnx(source, dense=True)
    result = convert_onnx(source.path)  # without dense, the ArgMax reads the (N, 10) scores as before
    assert result.ok and result.proof.runtime.outputs == ("out", "label")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_and_truncated_files(damage, tmp_path):
    good = save(tutorial_head(np.random.default_rng(0)).model, tmp_path, "good.onnx").read_bytes()
    data = {"garbage": bytes(range(256)) * 64, "truncated": good[: len(good) // 2], "empty": b""}[damage]
    path = tmp_path / "bad.onnx"
    path.write_bytes(data)
    with pytest.raises(CheckpointError) as caught:
        read_onnx(path)
    assert "bad.onnx" in str(caught.value) and "\n" not in str(caught.value)


def test_external_data_inside_the_folder_is_read_outside_is_refused(tmp_path):
    case = trunk_reshape_matmul(np.random.default_rng(0))
    folder = tmp_path / "model"
    folder.mkdir()
    path = folder / "model.onnx"
    onnx.save(case.model, str(path), save_as_external_data=True, location="weights.bin", size_threshold=0)
    assert (folder / "weights.bin").is_file()
    result = convert_onnx(path)
    assert result.ok
    x = np.random.default_rng(1).standard_normal(case.traced).astype(np.float32)
    assert_close(run(result.model, {"image": x})["out"], case.reference(x))
    # The same model pointing at a side file one folder up: refused, naming the file, nothing read.
    (tmp_path / "weights.bin").write_bytes((folder / "weights.bin").read_bytes())
    stored = onnx.load(str(path), load_external_data=False)
    for tensor in stored.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../weights.bin"
    escaped = folder / "escaped.onnx"
    onnx.save(stored, str(escaped))
    with pytest.raises(CheckpointError, match=r"'\.\./weights\.bin', outside the model's folder") as caught:
        load_onnx_model(escaped)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("ir_version", "opset", "dtype", "rtol"),
    [(3, 8, np.float32, RTOL), (8, 17, np.float16, 1e-2)],
    ids=["ir3-initializers-as-inputs", "float16"],
)
def test_old_ir_and_float16(ir_version, opset, dtype, rtol, tmp_path):
    rng = np.random.default_rng(0)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    tensors = {"w1": weights(rng, 16, 32), "b1": weights(rng, 16, 1)[:, 0], "w2": weights(rng, 4, 16),
               "b2": weights(rng, 1, 4)}  # fmt: skip
    tensors = {k: v.astype(dtype) for k, v in tensors.items()}
    inputs = [helper.make_tensor_value_info("x", elem, [1, 8, 2, 2])]
    if ir_version < 4:  # then every initializer is also a graph input
        inputs += [helper.make_tensor_value_info(k, elem, list(v.shape)) for k, v in tensors.items()]
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["x"], ["f"], name="flatten"),
            helper.make_node("Gemm", ["f", "w1", "b1"], ["h"], name="fc1", transB=1),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], name="fc2", transB=1),
        ],
        "g", inputs, [helper.make_tensor_value_info("y", elem, [1, 4])],
        initializer=[numpy_helper.from_array(v, k) for k, v in tensors.items()],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    path = save(model, tmp_path, "model.onnx")
    result = convert_onnx(path, dense=True)
    assert result.ok, result.proof
    if ir_version < 4:  # an input may not change shape: the kernels are new initializers, listed as inputs
        assert {i.name for i in result.model.graph.input} == {"x", "b1", "w1_conv", "w2_conv", "b2_conv"}
    w1, b1, w2, b2 = (t64(tensors[k]) for k in ("w1", "b1", "w2", "b2"))
    x = np.random.default_rng(1).standard_normal((1, 8, 5, 4)).astype(dtype)
    dense = run(result.model, {"x": x})["y"]
    assert dense.shape == (1, 4, 4, 3)
    for i in range(4):
        for j in range(3):
            expected = torch.relu(t64(x)[:, :, i : i + 2, j : j + 2].flatten(1) @ w1.T + b1) @ w2.T + b2
            got, want = dense[:, :, i, j].astype(np.float64), expected.numpy()
            assert np.abs(got - want).max() <= rtol * np.abs(want).max()


def test_two_heads_on_one_map_and_a_shared_weight(tmp_path):
    """Two flattens of one map, each into its own Gemm, both Gemms reading the same stored weight."""
    rng = np.random.default_rng(0)
    w, b1, b2 = weights(rng, 6, 4 * 3 * 3), weights(rng, 6, 1)[:, 0], weights(rng, 6, 1)[:, 0]
    model = make_model(
        [
            helper.make_node("Relu", ["map"], ["m"], name="relu"),
            helper.make_node("Flatten", ["m"], ["fa"], name="flatten_a"),
            helper.make_node("Gemm", ["fa", "w", "b1"], ["out_a"], name="fc_a", transB=1),
            helper.make_node("Flatten", ["m"], ["fb"], name="flatten_b"),
            helper.make_node("Gemm", ["fb", "w", "b2"], ["out_b"], name="fc_b", transB=1, alpha=2.0),
        ],
        [helper.make_tensor_value_info("map", FLOAT, ["N", 4, 3, 3])],
        [
            helper.make_tensor_value_info("out_a", FLOAT, ["N", 6]),
            helper.make_tensor_value_info("out_b", FLOAT, ["N", 6]),
        ],
        {"w": w, "b1": b1, "b2": b2},
    )
    path = save(model, tmp_path, "two.onnx")
    result = convert_onnx(path, dense=True)
    assert result.ok and len(result.source.heads) == 2
    # "w" is read by both Gemms, so neither kernel may take its name.
    assert {"w_conv", "w_conv2"} <= {t.name for t in result.model.graph.initializer}
    x = np.random.default_rng(1).standard_normal((2, 4, 3, 3)).astype(np.float32)
    outputs = run(result.model, {"map": x})
    flat = torch.relu(t64(x)).flatten(1)
    assert_close(outputs["out_a"].reshape(2, 6), (flat @ t64(w).T + t64(b1)).numpy())
    assert_close(outputs["out_b"].reshape(2, 6), (2 * flat @ t64(w).T + t64(b2)).numpy())


# --- the command line ----------------------------------------------------------------------------


@pytest.fixture
def reshape_case(tmp_path) -> tuple[Case, Path]:
    """The Conv -> MaxPool -> Reshape -> MatMul + Add -> Gemm graph, saved as model.onnx."""
    case = trunk_reshape_matmul(np.random.default_rng(0))
    return case, save(case.model, tmp_path, "model.onnx")


def table_row(output: str, first_cell: str) -> str:
    """The table row whose first cell is ``first_cell``."""
    rows = [line.strip() for line in output.splitlines() if line.strip().startswith(first_cell + " ")]
    assert len(rows) == 1, output
    return rows[0]


def test_cli_convert_writes_model_conv_onnx(reshape_case):
    case, path = reshape_case
    result = run_cli("convert", path)
    assert result.exit_code == 0, result.output
    assert table_row(result.stdout, "dense1").split()[1:3] == ["Conv", "5x5"]
    assert table_row(result.stdout, "dense2").split()[1:3] == ["Conv", "1x1"]
    assert table_row(result.stdout, "(end to end)").split()[-1] == "ok"
    written = onnx.load(str(path.with_name("model.conv.onnx")))
    assert {"Gemm", "MatMul"}.isdisjoint(n.op_type for n in written.graph.node)
    x = np.random.default_rng(1).standard_normal(case.traced).astype(np.float32)
    assert_close(run(written, {"image": x})["out"], case.reference(x))


def test_cli_convert_dense_outputs_maps(reshape_case, tmp_path):
    case, path = reshape_case
    out = tmp_path / "dense.onnx"
    result = run_cli("convert", path, "--dense", "-o", out)
    assert result.exit_code == 0, result.output
    # The trunk is a valid 3x3 conv and a 2x2 max pool (stride 2): a 24x22 input gives an 11x10 map, and
    # a 5x5 kernel on it 7x6 positions. Position (i, j) reads the 12x12 input window at (2i, 2j), so the
    # original graph run on that crop is its reference.
    x = np.random.default_rng(2).standard_normal((1, 3, 24, 22)).astype(np.float32)
    scores = run(onnx.load(str(out)), {"image": x})["out"]
    assert scores.shape == (1, 10, 7, 6)
    for i, j in [(0, 0), (3, 2), (6, 5)]:
        crop = np.ascontiguousarray(x[:, :, 2 * i : 2 * i + 12, 2 * j : 2 * j + 12])
        assert_close(scores[:, :, i, j], run(case.model, {"image": crop})["out"])


def test_cli_convert_json(reshape_case, tmp_path):
    _, path = reshape_case
    result = run_cli("convert", path, "--dense", "--json", "-o", tmp_path / "dense.onnx")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["ok"] and payload["written"]
    layers = {layer["name"]: layer for layer in payload["layers"]}
    assert set(layers) == {"dense1", "dense2"}
    assert all(0 <= layer["max_abs_error"] < RTOL and layer["ok"] for layer in layers.values())
    end_to_end = payload["end_to_end"]
    assert end_to_end["ok"] and 0 <= end_to_end["max_rel_error"] < RTOL
    # The dense check runs a 24x24 input (twice the traced 12x12): an 11x11 map, 7x7 positions of a 5x5 kernel.
    assert end_to_end["dense_grid"] == [7, 7] and end_to_end["positions_checked"] > 0


def test_cli_verify_passes_and_a_tampered_kernel_fails(reshape_case, tmp_path):
    _, path = reshape_case
    converted = tmp_path / "model.conv.onnx"
    assert run_cli("convert", path, "-o", converted).exit_code == 0
    result = run_cli("verify", path, converted)
    assert result.exit_code == 0, result.output
    assert "PASS" in result.stdout
    model = onnx.load(str(converted))
    kernel = next(t for t in model.graph.initializer if t.name == "dense1.kernel")
    values = numpy_helper.to_array(kernel).copy()
    values[0, 0, 0, 0] += 1.0
    kernel.CopyFrom(numpy_helper.from_array(values, kernel.name))
    tampered = tmp_path / "tampered.onnx"
    onnx.save(model, str(tampered))
    result = run_cli("verify", path, tampered)
    assert result.exit_code == 1
    assert "dense1" in error_line(result)


def test_cli_inspect_lists_the_heads(reshape_case):
    _, path = reshape_case
    result = run_cli("inspect", path)
    assert result.exit_code == 0, result.output
    assert "dense1 (200 -> 32: Conv 5x5), dense2 (32 -> 10: Conv 1x1)" in result.stdout
    payload = json.loads(run_cli("inspect", path, "--json").stdout)
    assert [(c["name"], c["became"], c["new_shape"]) for c in payload["chain"]] == [
        ("dense1", "Conv 5x5", [32, 8, 5, 5]), ("dense2", "Conv 1x1", [10, 32, 1, 1])
    ]  # fmt: skip
    assert (payload["input_shape"], payload["flatten_order"]) == ([8, 5, 5], "chw")


@pytest.mark.parametrize("option", [("--flatten-order", "hwc"), ("--layers", "dense1")], ids=lambda o: o[0])
def test_cli_convert_refuses_checkpoint_options(option, reshape_case):
    _, path = reshape_case
    result = run_cli("convert", path, *option)
    assert result.exit_code == 2
    assert option[0] in error_line(result)
    assert not path.with_name("model.conv.onnx").exists()


@pytest.mark.parametrize(
    "command",
    [("inspect", "--flatten-order", "hwc"), ("inspect", "--layers", "dense1"), ("verify", "--flatten-order", "hwc")],
    ids=" ".join,
)
def test_cli_inspect_and_verify_refuse_checkpoint_options(command, reshape_case, tmp_path):
    _, path = reshape_case
    name, *option = command
    converted = []
    if name == "verify":
        converted = [tmp_path / "model.conv.onnx"]
        assert run_cli("convert", path, "-o", *converted).exit_code == 0
    assert run_cli(name, path, *converted, *option).exit_code == 2


def test_cli_dynamic_input_needs_input_shape(tmp_path):
    model, k, w = dynamic_input(np.random.default_rng(0))
    path = save(model, tmp_path, "dynamic.onnx")
    result = run_cli("convert", path)
    assert result.exit_code == 2
    line = error_line(result)
    assert "'image' is dynamic" in line and "--input-shape" in line
    result = run_cli("convert", path, "--input-shape", "3x8x8")
    assert result.exit_code == 0, result.output
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
    expected = (F.conv2d(t64(x), t64(k)).flatten(1) @ t64(w).T).numpy()
    assert_close(run(onnx.load(str(tmp_path / "dynamic.conv.onnx")), {"image": x})["out"], expected)
