"""Write the trained digits CNN as an ONNX graph: ``sample_models/digits_cnn.onnx``.

    pip install -e ".[onnx]"
    python sample_models/export_digits_onnx.py

The graph is built with ``onnx.helper`` from the committed weights (``digits_cnn.pt``), node by node as a
PyTorch export lays it out: Conv -> Relu -> Conv -> Relu -> Flatten -> Gemm (transB=1) -> Relu -> Gemm,
input ``image`` (N, 1, 8, 8), output ``scores`` (N, 10). Its bytes depend on the weights alone (no
arithmetic), so a rerun gives the same file on any machine.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def build_digits_onnx(weights: dict[str, torch.Tensor]):  # noqa: ANN201 - an onnx.ModelProto
    """The digits CNN as an ONNX graph (opset 17) holding ``weights`` as its initializers."""
    from onnx import TensorProto, helper, numpy_helper

    def init(name: str) -> object:
        return numpy_helper.from_array(weights[name].numpy(), name)

    nodes = [
        helper.make_node("Conv", ["image", "features.0.weight", "features.0.bias"], ["c1"], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "features.2.weight", "features.2.bias"], ["c2"], name="conv2"),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Flatten", ["r2"], ["flat"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat", "classifier.1.weight", "classifier.1.bias"], ["h"], name="fc1", transB=1),
        helper.make_node("Relu", ["h"], ["hr"], name="relu3"),
        helper.make_node("Gemm", ["hr", "classifier.3.weight", "classifier.3.bias"], ["scores"], name="fc2", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "digits_cnn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 10])],
        [init(name) for name in weights],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="fc2conv samples")
    model.ir_version = 8
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="folder to write into")
    args = parser.parse_args(argv)
    import onnx

    weights = torch.load(HERE / "digits_cnn.pt", weights_only=True)
    model = build_digits_onnx(weights)
    onnx.checker.check_model(model, full_check=True)
    path = args.out / "digits_cnn.onnx"
    path.write_bytes(model.SerializeToString())
    print(f"wrote {path} ({path.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
