"""One ONNX graph as the head search reads it: producers, readers, constants, and shapes inferred at a traced size.

The traced size is the graph's image input as declared, or as the caller gives it where the graph
leaves height and width open: heads are found, and kernels sized, at that size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fc2conv.errors import PlanError, ShapeError
from fc2conv.formats.onnx_io import first_line, import_onnx
from fc2conv.types import InputShape, ShapeSpec

if TYPE_CHECKING:
    import numpy as np
    import onnx

__all__ = [
    "DEFAULT_DOMAINS",
    "HOLLOW_ABOVE",
    "Dims",
    "GraphIndex",
    "GraphInput",
    "attribute",
    "describe_dims",
    "find_image_input",
    "infer_shapes",
    "is_transpose",
    "known_sizes",
    "node_label",
    "opset_of",
    "static_size",
]

# The domain names of the standard operators (the empty string is the usual spelling).
DEFAULT_DOMAINS = ("", "ai.onnx")
# Initializers with more values than this have no data in the inferred copy of a model (their shapes suffice there).
HOLLOW_ABOVE = 4096

# A tensor's dims as declared or inferred: a size, a symbolic name, or unknown.
Dims = tuple[int | str | None, ...]


def node_label(node: onnx.NodeProto) -> str:
    """A node's name, or ``Op(first output)`` for an unnamed node (names are optional in ONNX)."""
    return node.name or f"{node.op_type}({node.output[0] if node.output else ''})"


def attribute(node: onnx.NodeProto, name: str, default: Any) -> Any:
    """The value of a node's attribute ``name``, or ``default`` when the node does not set it."""
    from onnx import helper

    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def is_transpose(node: onnx.NodeProto, perm: list[int]) -> bool:
    """Whether ``node`` is a standard Transpose with the permutation ``perm``."""
    return node.op_type == "Transpose" and node.domain in DEFAULT_DOMAINS and list(attribute(node, "perm", [])) == perm


def opset_of(model: onnx.ModelProto) -> int:
    """The default-domain opset the model imports."""
    return next((o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS), 1)


def static_size(dim: int | str | None) -> int | None:
    """A dim as a known size: a positive integer, else None (symbolic, unknown, or 0 for "unknown" in old files)."""
    return dim if isinstance(dim, int) and dim > 0 else None


def describe_dims(dims: Dims | None) -> str:
    """Dims for a message: ``(N, 256, ?, ?)``."""
    if dims is None:
        return "of unknown shape"
    # Symbols shape inference makes up for unknown sizes ("unk__0") say no more than "?".
    shown = ["?" if d is None or (isinstance(d, str) and d.startswith("unk__")) else str(d) for d in dims]
    return "(" + ", ".join(shown) + ")"


def _dims(type_proto: onnx.TypeProto) -> Dims | None:
    if not type_proto.HasField("tensor_type") or not type_proto.tensor_type.HasField("shape"):
        return None
    dims: list[int | str | None] = []
    for d in type_proto.tensor_type.shape.dim:
        kind = d.WhichOneof("value")
        dims.append(d.dim_value if kind == "dim_value" else d.dim_param if kind == "dim_param" else None)
    return tuple(dims)


class GraphIndex:
    """Producers, readers, constants and inferred shapes of one graph: what the head search reads.

    ``model`` gives the nodes and initializers, ``inferred`` (the model after shape inference) the
    shapes of the tensors between them.
    """

    def __init__(self, model: onnx.ModelProto, inferred: onnx.ModelProto) -> None:
        graph = model.graph
        self.nodes = list(graph.node)
        self.opset = opset_of(model)
        self.ir_version = model.ir_version
        self.initializers = {t.name: t for t in graph.initializer}
        self.input_names = {i.name for i in graph.input}
        self.outputs = [o.name for o in graph.output]
        self.producer: dict[str, int] = {}
        self.users: dict[str, list[tuple[int, int]]] = {}
        for index, node in enumerate(self.nodes):
            for out in node.output:
                if out:
                    self.producer[out] = index
            for slot, name in enumerate(node.input):
                if name:
                    self.users.setdefault(name, []).append((index, slot))
        self.shapes: dict[str, Dims | None] = {}
        g = inferred.graph
        for info in list(g.input) + list(g.value_info) + list(g.output):
            self.shapes[info.name] = _dims(info.type)
        for t in graph.initializer:
            self.shapes[t.name] = tuple(int(d) for d in t.dims)

    def readers(self, tensor: str) -> list[tuple[int, int]]:
        """``(node index, input slot)`` of every node that reads ``tensor``."""
        return self.users.get(tensor, [])

    def is_output(self, tensor: str) -> bool:
        return tensor in self.outputs

    def label(self, index: int) -> str:
        return node_label(self.nodes[index])

    def is_initializer(self, name: str) -> bool:
        """A stored constant: an initializer that is not also a graph input (which a caller could override).

        Before IR version 4 every initializer had to be listed as an input too: there, they count as stored.
        """
        return name in self.initializers and (self.ir_version < 4 or name not in self.input_names)

    def constant(self, name: str) -> np.ndarray | None:
        """The value of an initializer or of a Constant node's output; None if computed or an input."""
        from onnx import helper, numpy_helper

        if self.is_initializer(name):
            return numpy_helper.to_array(self.initializers[name])
        index = self.producer.get(name)
        if index is None or self.nodes[index].op_type != "Constant":
            return None
        import numpy as np

        for attr in self.nodes[index].attribute:
            value = helper.get_attribute_value(attr)
            if attr.name == "value":
                return numpy_helper.to_array(value)
            if attr.name in ("value_float", "value_floats"):
                return np.asarray(value, dtype=np.float32)
            if attr.name in ("value_int", "value_ints"):
                return np.asarray(value, dtype=np.int64)
        return None

    def rank(self, tensor: str) -> int | None:
        dims = self.shapes.get(tensor)
        return None if dims is None else len(dims)


# --- the image input and the traced size --------------------------------------------------------


@dataclass(frozen=True)
class GraphInput:
    """The image input of the graph: its name, declared dims and where height and width are."""

    name: str
    dims: Dims  # as declared
    layout: str  # "nchw", or "nhwc" when every reader is Transpose(perm=[0, 3, 1, 2]) (tf2onnx)
    traced: tuple[int | None, ...] | None  # the size heads were found at (batch None when dynamic)
    given: bool  # the traced size came from the input_shape argument

    @property
    def spatial_axes(self) -> tuple[int, int]:
        return (1, 2) if self.layout == "nhwc" else (2, 3)

    @property
    def size(self) -> InputShape | None:
        """C x H x W of one input at the traced size, whatever the layout."""
        if self.traced is None:
            return None
        c, h, w = (self.traced[a] for a in self.chw_axes)
        assert c is not None and h is not None and w is not None  # only the batch may be open when traced
        return InputShape(c, h, w)

    def traced_at(self, batch: int, growth: int = 1) -> tuple[int, ...]:
        """The traced dims with the batch size ``batch`` and height and width times ``growth``."""
        size = self.size
        assert size is not None, "the input has no traced size"
        c, h, w = size.channels, size.height * growth, size.width * growth
        return (batch, h, w, c) if self.layout == "nhwc" else (batch, c, h, w)

    @property
    def chw_axes(self) -> tuple[int, int, int]:
        return (3, 1, 2) if self.layout == "nhwc" else (1, 2, 3)


def find_image_input(model: onnx.ModelProto, g: GraphIndex, spec: ShapeSpec | None) -> GraphInput | None:
    """The graph's one 4-D floating input, with the size to trace at (the declared one, or ``spec``).

    Raises:
        ShapeError: ``spec`` is given but the graph has no 4-D input, or it contradicts the declared size.
        PlanError: several 4-D inputs, where a size is given or one of them is dynamic.
    """
    candidates = [i for i in model.graph.input if i.name not in g.initializers]
    four_d = [i for i in candidates if len(_dims(i.type) or ()) == 4]
    if not four_d:
        if spec is not None:
            names = ", ".join(i.name for i in candidates) or "none"
            raise ShapeError(f"an input size {spec} was given, but the graph has no 4-D input (inputs: {names})")
        return None
    if len(four_d) > 1:
        dynamic = [i.name for i in four_d if known_sizes(_dims(i.type), range(1, 4)) is None]
        if spec is not None or dynamic:
            names = ", ".join(i.name for i in four_d)
            raise PlanError(f"the graph has several 4-D inputs ({names}); fc2conv handles graphs with one image input")
        return None
    info = four_d[0]
    dims = _dims(info.type) or ()
    readers = g.readers(info.name)
    nhwc = bool(readers) and all(is_transpose(g.nodes[i], [0, 3, 1, 2]) for i, _ in readers)
    image = GraphInput(info.name, dims, "nhwc" if nhwc else "nchw", None, spec is not None)
    chw = _traced_chw(image, spec)
    if chw is None:
        return image
    traced = (static_size(dims[0]), *chw) if image.layout == "nchw" else (static_size(dims[0]), *chw[1:], chw[0])
    return GraphInput(image.name, dims, image.layout, traced, image.given)


def _traced_chw(image: GraphInput, spec: ShapeSpec | None) -> tuple[int, int, int] | None:
    """C, H, W to trace at: as declared (None if any is open), or ``spec`` checked against what is declared."""
    declared = [static_size(image.dims[a]) for a in image.chw_axes]
    if spec is None:
        c, h, w = declared
        return (c, h, w) if c is not None and h is not None and w is not None else None
    channels = spec.channels if spec.channels is not None else declared[0]
    if channels is None or spec.height is None or spec.width is None:
        raise ShapeError(
            f"the graph's input {image.name!r} is {describe_dims(image.dims)}: its size must be given as C x H x W, "
            f"got {spec}"
        )
    chw = (channels, spec.height, spec.width)
    for part, want, have in zip(("channels", "height", "width"), chw, declared, strict=True):
        if have is not None and have != want:
            raise ShapeError(
                f"the graph's input {image.name!r} is {describe_dims(image.dims)} ({image.layout}): its {part} is "
                f"{have}, not {want}"
            )
    return chw


def known_sizes(dims: Dims | None, axes: range) -> tuple[int, ...] | None:
    """The sizes of ``dims`` on ``axes`` when every one is known, else None."""
    if dims is None:
        return None
    sizes = [static_size(dims[a]) for a in axes]
    return tuple(s for s in sizes if s is not None) if None not in sizes else None


def infer_shapes(model: onnx.ModelProto, image: GraphInput | None, path: Path) -> onnx.ModelProto:
    """Shape inference (strict, with data propagation) at the traced input size.

    Returns a copy of ``model``: the image input pinned to its traced size, every initializer of more
    than :data:`HOLLOW_ABOVE` values reduced to its shape (so the copy costs no second copy of the weights).

    Raises:
        PlanError: inference fails at that size (the graph does not run there).
    """
    onnx = import_onnx()
    from onnx import shape_inference

    pinned = onnx.ModelProto()
    pinned.CopyFrom(model)
    if image is not None and image.traced is not None:
        target = next(i for i in pinned.graph.input if i.name == image.name)
        for axis, size in enumerate(image.traced):
            if size is not None:
                dim = target.type.tensor_type.shape.dim[axis]
                dim.Clear()
                dim.dim_value = size
    # Stale intermediate shapes would be merged with (and could contradict) the pinned input's.
    del pinned.graph.value_info[:]
    # Inference reads the values of small constants only (shape targets).
    for tensor in pinned.graph.initializer:
        if math.prod(tensor.dims) > HOLLOW_ABOVE:
            name, data_type, dims = tensor.name, tensor.data_type, list(tensor.dims)
            tensor.Clear()
            tensor.name, tensor.data_type = name, data_type
            tensor.dims.extend(dims)
    try:
        return shape_inference.infer_shapes(pinned, check_type=True, strict_mode=True, data_prop=True)
    except Exception as exc:  # onnx raises InferenceError, ValidationError or RuntimeError
        where = f" at input size {image.traced}" if image is not None and image.traced else ""
        raise PlanError(f"{path.name}: shape inference fails{where}: {first_line(exc)}") from exc
