"""The ``.onnx`` reader: a graph loaded safely, its shapes inferred at the traced size, and its FC heads found.

What a caller of the reader needs is importable from here: the model read and written
(:mod:`~fc2conv.formats.onnx_io`), and the dataclasses an :class:`OnnxFile` holds
(:mod:`~fc2conv.formats.onnx_graph`, :mod:`~fc2conv.formats.onnx_heads`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from fc2conv.errors import PlanError
from fc2conv.formats.base import Listing, ReadOptions, Source
from fc2conv.formats.onnx_graph import GraphIndex, GraphInput, find_image_input, infer_shapes
from fc2conv.formats.onnx_heads import OnnxHead, OnnxLayer, OnnxStep, find_heads
from fc2conv.formats.onnx_io import OnnxTensors, initializer_infos, load_onnx_model, write_onnx
from fc2conv.shapes import as_spec
from fc2conv.types import ShapeLike, TensorInfo

if TYPE_CHECKING:
    import onnx
    import torch

__all__ = [
    "READER",
    "GraphInput",
    "OnnxFile",
    "OnnxHead",
    "OnnxLayer",
    "OnnxStep",
    "OnnxTensors",
    "load_onnx_model",
    "read_onnx",
    "write_onnx",
]


@dataclass(frozen=True, eq=False)
class OnnxFile:
    """An ONNX model as read: the graph, its initializers, and the heads fc2conv can convert."""

    path: Path
    model: onnx.ModelProto  # external data loaded inline; the graph as stored
    inferred: onnx.ModelProto  # inferred shapes at the traced input size; large initializers have no data
    infos: tuple[TensorInfo, ...]
    tensors: Mapping[str, torch.Tensor]
    heads: tuple[OnnxHead, ...]
    opset: int
    image_input: GraphInput | None
    notes: tuple[str, ...] = field(default=())

    def index(self) -> GraphIndex:
        """The graph's index (nodes, readers, constants) with the shapes inferred at the traced size."""
        return GraphIndex(self.model, self.inferred)


def read_onnx(path: str | Path, input_shape: ShapeLike | None = None) -> OnnxFile:
    """Read an ONNX model and find every FC head it holds (see :mod:`fc2conv.formats.onnx_heads`).

    Args:
        path: The ``.onnx`` file.
        input_shape: C x H x W of one network input (``"3x32x32"``), needed only when the graph's
            input has dynamic height or width; ``H x W`` takes C from the graph.

    Returns:
        An :class:`OnnxFile`.

    Raises:
        CheckpointError: the file cannot be read (see :func:`load_onnx_model`).
        PlanError: no head, or a flatten of a 4-D map feeds FC layers in a way fc2conv cannot prove
            equal to a convolution (the message names the node).
        ShapeError: ``input_shape`` does not fit the graph's input.
    """
    path = Path(path)
    model = load_onnx_model(path)
    # The image input is found on the graph as stored, before inference (which needs its size).
    image = find_image_input(model, GraphIndex(model, model), as_spec(input_shape))
    inferred = infer_shapes(model, image, path)
    g = GraphIndex(model, inferred)
    heads, head_notes = find_heads(g, image)
    given = [f"input {image.name!r} traced at {image.size} (given)"] if image is not None and image.given else []
    notes = (*given, *head_notes)
    if not heads:
        why = f" ({'; '.join(notes)})" if notes else ""
        raise PlanError(f"{path.name}: no flatten of a 4-D map feeding Gemm/MatMul layers was found{why}")
    return OnnxFile(
        path=path,
        model=model,
        inferred=inferred,
        infos=initializer_infos(model),
        tensors=OnnxTensors(model),
        heads=heads,
        opset=g.opset,
        image_input=image,
        notes=notes,
    )


class _OnnxReader:
    """Reader for ``*.onnx`` graphs: initializers as tensors, and the heads the graph holds."""

    format = "onnx"

    def claims(self, path: Path) -> bool:
        return path.suffix == ".onnx"

    def listing(self, path: Path, options: ReadOptions) -> Listing:
        return self.open(path, options)

    def open(self, path: Path, options: ReadOptions) -> Source:
        onnx_file = read_onnx(path, options.input_shape)
        return Source(
            path=path, format="onnx", infos=list(onnx_file.infos), notes=list(onnx_file.notes), module_order=True,
            tensors=onnx_file.tensors, native=onnx_file,
        )  # fmt: skip


READER = _OnnxReader()
