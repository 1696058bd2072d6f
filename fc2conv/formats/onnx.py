"""Read an ONNX model safely and find its FC heads: flatten (+ channels-last transpose) -> Gemm/MatMul chain."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fc2conv.errors import CheckpointError, DependencyError, OutputError, PlanError, ShapeError
from fc2conv.formats.base import Listing, ReadOptions, Source
from fc2conv.shapes import as_spec
from fc2conv.types import FlattenOrder, InputShape, ShapeLike, ShapeSpec, TensorInfo

if TYPE_CHECKING:
    import numpy as np
    import onnx
    import torch

# fc2conv's dtype spelling (torch's names) for ONNX element types.
_DTYPE_NAMES = {
    1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64", 8: "string",
    9: "bool", 10: "float16", 11: "float64", 12: "uint32", 13: "uint64", 14: "complex64", 15: "complex128",
    16: "bfloat16", 17: "float8_e4m3fn", 18: "float8_e4m3fnuz", 19: "float8_e5m2", 20: "float8_e5m2fnuz",
}  # fmt: skip
FLOAT_TYPES = {1: "tensor(float)", 10: "tensor(float16)", 11: "tensor(double)", 16: "tensor(bfloat16)"}

# Ops that act on each value alone: they give the same result on (N, F) and on (N, F, h, w) per position.
UNARY_OPS = frozenset(
    {
        "Abs", "Acos", "Acosh", "Asin", "Asinh", "Atan", "Atanh", "Cast", "Ceil", "Celu", "Clip", "Cos", "Cosh",
        "Elu", "Erf", "Exp", "Floor", "Gelu", "HardSigmoid", "HardSwish", "Identity", "IsInf", "IsNaN",
        "LeakyRelu", "Log", "Mish", "Neg", "Not", "Reciprocal", "Relu", "Round", "Selu", "Shrink", "Sigmoid",
        "Sign", "Sin", "Sinh", "Softplus", "Softsign", "Sqrt", "Tan", "Tanh", "ThresholdedRelu",
    }
)  # fmt: skip
# Elementwise ops with one constant operand: fine when it is a scalar, or a per-feature vector (reshaped to (F, 1, 1)).
BINARY_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "PRelu", "Max", "Min"})
_SOFTMAX_OPS = frozenset({"Softmax", "LogSoftmax", "Hardmax"})
_DEFAULT_DOMAINS = ("", "ai.onnx")
# Initializers with more values than this have no data in OnnxFile.inferred (their shapes suffice there).
HOLLOW_ABOVE = 4096
# What a flattened map may pass through on its way to an FC layer and still count as that layer's input
# (so that a flatten fc2conv cannot convert is refused, naming the node in the way, not skipped).
_TRANSPARENT_OPS = UNARY_OPS | BINARY_OPS | _SOFTMAX_OPS | {"Dropout", "Concat", "BatchNormalization"}


@dataclass(frozen=True)
class OnnxStep:
    """A node between (or after) FC layers that stays, and what the rewrite must do to it.

    ``kind`` is ``"unary"`` (elementwise, kept as it is), ``"scalar"`` (binary with a one-value constant,
    kept), ``"channel"`` (binary with a per-feature constant at input ``constant_slot``: the constant is
    reshaped to ``(F, 1, 1)``), ``"batchnorm"`` (BatchNormalization over the features: valid as it is on
    a map) or ``"softmax"`` (its axis is set to 1, the channel axis).
    """

    node: str  # label: the node's name, or "Op(output)" when the node is unnamed
    index: int  # position in the graph's node list (of the model as read)
    op: str
    kind: str
    constant_slot: int | None = None


@dataclass(frozen=True)
class OnnxLayer:
    """One Gemm (or MatMul [+ Add]) of a head, with its weight as PyTorch's ``(out, in)``."""

    node: str  # label of the Gemm/MatMul node (the Conv that replaces it gets this name)
    index: int
    op: str  # "Gemm" or "MatMul"
    weight: str  # initializer names
    bias: str | None
    add_node: str | None  # the Add absorbed as the bias of a MatMul
    add_index: int | None
    trans_b: int  # Gemm's transB (MatMul weights are stored (in, out), as transB=0)
    alpha: float
    beta: float
    shape: tuple[int, int]  # (out, in)
    dtype: str
    output: str  # tensor name of the layer's result (the Add's output for MatMul + Add)

    @property
    def out_features(self) -> int:
        return self.shape[0]


@dataclass(frozen=True)
class OnnxHead:
    """A flattened 4-D map read by a chain of FC layers.

    ``feature_tensor`` is the (N, C, H, W) map the first conv reads: the flatten's input, or the input
    of an absorbed ``Transpose(perm=[0, 2, 3, 1])`` (then ``flatten_order`` is ``"hwc"``).
    ``outputs`` are the graph outputs computed from the head's last layer; ``dense_problem`` says why
    the head cannot return a map of scores (``None`` when it can).
    """

    flatten: str
    flatten_index: int
    flatten_op: str  # "Flatten" or "Reshape"
    transpose: str | None
    transpose_index: int | None
    flatten_order: FlattenOrder
    feature_tensor: str
    feature_map: InputShape
    layers: tuple[OnnxLayer, ...]
    pre: tuple[OnnxStep, ...]  # elementwise nodes between the flatten and the first layer
    between: tuple[OnnxStep, ...]  # nodes between layers
    tail: tuple[OnnxStep, ...]  # nodes after the last layer on the way to the graph outputs
    outputs: tuple[str, ...]
    dense_problem: str | None

    @property
    def output(self) -> str:
        """The tensor the last converted layer produces: (N, K) in the original graph."""
        return self.layers[-1].output


@dataclass(frozen=True)
class GraphInput:
    """The image input of the graph: its name, declared dims and where height and width are."""

    name: str
    dims: tuple[int | str | None, ...]  # as declared: a size, a symbolic name, or unknown
    elem_type: int
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
        c, h, w = (3, 1, 2) if self.layout == "nhwc" else (1, 2, 3)
        return InputShape(int(self.traced[c]), int(self.traced[h]), int(self.traced[w]))  # type: ignore[arg-type]


@dataclass(frozen=True, eq=False)
class OnnxFile:
    """An ONNX model as read: the graph, its initializers, and the heads fc2conv can convert."""

    path: Path
    model: onnx.ModelProto  # external data loaded inline; the graph as stored
    inferred: onnx.ModelProto  # inferred shapes at the traced input size; initializers past HOLLOW_ABOVE have no data
    infos: tuple[TensorInfo, ...]
    tensors: Mapping[str, torch.Tensor]
    heads: tuple[OnnxHead, ...]
    opset: int
    image_input: GraphInput | None
    notes: tuple[str, ...] = field(default=())


# --- loading ------------------------------------------------------------------------------------


def _onnx() -> Any:
    try:
        import onnx
    except ImportError as exc:
        raise DependencyError(f"reading ONNX files needs the onnx extra ({exc.name} is missing)", extra="onnx") from exc
    return onnx


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)


def load_onnx_model(path: str | Path) -> onnx.ModelProto:
    """Load and validate an ONNX model; external data is read only from files inside the model's folder.

    Args:
        path: The ``.onnx`` file.

    Returns:
        The model, external tensors loaded inline, having passed ``onnx.checker.check_model``.

    Raises:
        CheckpointError: missing, corrupt or truncated file, invalid model, or external data that
            resolves outside the model's folder (the side file is named and not read).
    """
    onnx = _onnx()
    from google.protobuf.message import DecodeError

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty, not an ONNX model")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, UnicodeDecodeError, RuntimeError) as exc:
        raise CheckpointError(
            f"{path} is not a readable ONNX model (corrupt or truncated): {_first_line(exc)}"
        ) from exc
    total = _load_external_data(model, path)
    if total >= 2**31:
        raise PlanError(
            f"{path.name} holds {total / 2**30:.1f} GB with its external data: past protobuf's 2 GB limit, within "
            f"which the checker, shape inference and ONNX Runtime need the model"
        )
    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a valid ONNX model: {_first_line(exc)}") from exc
    if not model.graph.node:
        raise CheckpointError(f"{path} is not a valid ONNX model: its graph has no nodes (corrupt or truncated)")
    return model


def _load_external_data(model: onnx.ModelProto, path: Path) -> int:
    """Read external tensors, refusing any side file that does not resolve inside the model's folder.

    Returns the bytes of the model file and its side files (what the model will hold in memory).

    The initializers are checked here, with a message naming the file; onnx's own loader checks
    every tensor again (relative path, inside the folder, no symbolic link, a regular file).
    """
    from onnx import external_data_helper

    folder = path.resolve().parent
    side_files: set[Path] = set()
    for tensor in model.graph.initializer:
        if not external_data_helper.uses_external_data(tensor):
            continue
        location = external_data_helper.ExternalDataInfo(tensor).location
        target = (folder / location).resolve()
        if Path(location).is_absolute() or not target.is_relative_to(folder):
            raise CheckpointError(
                f"{path.name}: external data of tensor {tensor.name!r} is {location!r}, outside the model's "
                f"folder {folder}: refused (not read)"
            )
        if not target.is_file():
            raise CheckpointError(f"{path.name}: external data of tensor {tensor.name!r}, {target}, is missing")
        side_files.add(target)
    total = path.stat().st_size + sum(f.stat().st_size for f in side_files)
    if total >= 2**31:
        return total  # not read: the caller refuses a model this large
    try:
        external_data_helper.load_external_data_for_model(model, str(folder))
    except Exception as exc:  # onnx raises ValidationError, ValueError or OSError for bad side files
        raise CheckpointError(f"{path.name}: external data refused: {_first_line(exc)}") from exc
    return total


# --- tensors ------------------------------------------------------------------------------------


def dtype_name_of(elem_type: int) -> str:
    """ONNX element type -> fc2conv's dtype spelling (``1`` -> ``"float32"``)."""
    return _DTYPE_NAMES.get(elem_type, f"onnx_type_{elem_type}")


def to_torch(proto: onnx.TensorProto) -> torch.Tensor:
    """An initializer as a torch tensor, through ``onnx.numpy_helper`` (bfloat16 and float8 by bit view)."""
    import numpy as np
    import torch
    from onnx import numpy_helper

    array = numpy_helper.to_array(proto)  # a fresh array, read-only when made from the raw bytes
    special = {"bfloat16": (np.uint16, torch.bfloat16), "float8_e4m3fn": (np.uint8, torch.float8_e4m3fn),
               "float8_e5m2": (np.uint8, torch.float8_e5m2)}  # fmt: skip
    if array.dtype.name in special:
        bits, dtype = special[array.dtype.name]
        return torch.from_numpy(np.ascontiguousarray(array).view(bits)).view(dtype)
    try:
        with warnings.catch_warnings():
            # Nothing in fc2conv writes to a tensor it reads: no second copy just to make it writable.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return torch.from_numpy(array)
    except TypeError as exc:
        raise PlanError(f"tensor {proto.name!r} ({array.dtype}) cannot be read as a torch tensor") from exc


def to_proto(tensor: torch.Tensor, name: str) -> onnx.TensorProto:
    """A torch tensor as an initializer named ``name``, through ``onnx.numpy_helper``."""
    import torch
    from onnx import numpy_helper

    tensor = tensor.detach().contiguous()
    if tensor.dtype == torch.bfloat16:
        import ml_dtypes

        array = tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    else:
        array = tensor.numpy()
    return numpy_helper.from_array(array, name)


class OnnxTensors(Mapping[str, "torch.Tensor"]):
    """Initializer name -> torch tensor, converted when asked for (nothing is copied up front)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self._protos = {t.name: t for t in model.graph.initializer}

    def __getitem__(self, name: str) -> torch.Tensor:
        return to_torch(self._protos[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._protos)

    def __len__(self) -> int:
        return len(self._protos)


def initializer_infos(model: onnx.ModelProto) -> tuple[TensorInfo, ...]:
    """Every initializer as a :class:`TensorInfo` (names as in the graph)."""
    return tuple(
        TensorInfo(t.name, tuple(int(d) for d in t.dims), dtype_name_of(t.data_type)) for t in model.graph.initializer
    )


# --- writing ------------------------------------------------------------------------------------


def onnx_bytes(model: onnx.ModelProto) -> bytes:
    """The serialised model, refusing one past protobuf's 2 GB limit (it would need external data)."""
    try:
        data = model.SerializeToString()
    except ValueError as exc:  # protobuf refuses to serialise a message past 2 GB
        raise OutputError(f"the converted model is past the 2 GB limit of one ONNX file: {_first_line(exc)}") from exc
    if len(data) >= 2**31:
        raise OutputError(f"the converted model is {len(data) / 2**30:.1f} GB, past the 2 GB limit of one ONNX file")
    return data


def write_onnx(model: onnx.ModelProto, path: str | Path) -> int:
    """Write ``model`` to ``path`` (a temporary file the caller publishes), re-read it and check it.

    Returns:
        The number of bytes written.

    Raises:
        OutputError: the model is too large for one file, or the file does not read back the same.
    """
    onnx = _onnx()
    data = onnx_bytes(model)
    path = Path(path)
    with open(path, "wb") as f:
        f.write(data)
    reread = path.read_bytes()
    if reread != data:
        raise OutputError(f"{path} does not read back as written")
    try:
        onnx.checker.check_model(onnx.load_model_from_string(reread))
    except Exception as exc:
        raise OutputError(f"{path} does not read back as a valid ONNX model: {_first_line(exc)}") from exc
    return len(data)


# --- the graph ----------------------------------------------------------------------------------


def node_label(node: onnx.NodeProto) -> str:
    """A node's name, or ``Op(first output)`` for an unnamed node (names are optional in ONNX)."""
    return node.name or f"{node.op_type}({node.output[0] if node.output else ''})"


Dims = tuple[int | str | None, ...]


def _dims(type_proto: onnx.TypeProto) -> Dims | None:
    if not type_proto.HasField("tensor_type") or not type_proto.tensor_type.HasField("shape"):
        return None
    dims: list[int | str | None] = []
    for d in type_proto.tensor_type.shape.dim:
        kind = d.WhichOneof("value")
        dims.append(d.dim_value if kind == "dim_value" else d.dim_param if kind == "dim_param" else None)
    return tuple(dims)


class GraphIndex:
    """Producers, consumers, constants and inferred shapes of one graph: what the head search reads."""

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
        self.types: dict[str, int] = {}
        g = inferred.graph
        for info in list(g.input) + list(g.value_info) + list(g.output):
            self.shapes[info.name] = _dims(info.type)
            self.types[info.name] = info.type.tensor_type.elem_type
        for t in graph.initializer:
            self.shapes[t.name] = tuple(int(d) for d in t.dims)
            self.types[t.name] = t.data_type

    def readers(self, tensor: str) -> list[tuple[int, int]]:
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


def opset_of(model: onnx.ModelProto) -> int:
    """The default-domain opset the model imports."""
    return next((o.version for o in model.opset_import if o.domain in _DEFAULT_DOMAINS), 1)


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    from onnx import helper

    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def _describe(dims: Dims | None) -> str:
    if dims is None:
        return "of unknown shape"
    # Symbols shape inference makes up for unknown sizes ("unk__0") say no more than "?".
    shown = ["?" if d is None or (isinstance(d, str) and d.startswith("unk__")) else str(d) for d in dims]
    return "(" + ", ".join(shown) + ")"


# --- the image input and the traced size --------------------------------------------------------


def _image_input(model: onnx.ModelProto, g: GraphIndex, spec: ShapeSpec | None) -> GraphInput | None:
    """The graph's 4-D floating input, with the size to trace at (the declared one, or ``spec``)."""
    initializers = set(g.initializers)
    candidates = [i for i in model.graph.input if i.name not in initializers]
    four_d = [i for i in candidates if (_dims(i.type) or ()) and len(_dims(i.type) or ()) == 4]
    if not four_d:
        if spec is not None:
            names = ", ".join(i.name for i in candidates) or "none"
            raise ShapeError(f"an input size {spec} was given, but the graph has no 4-D input (inputs: {names})")
        return None
    if len(four_d) > 1:
        dynamic = [i.name for i in four_d if not _static(_dims(i.type), range(1, 4))]
        if spec is not None or dynamic:
            names = ", ".join(i.name for i in four_d)
            raise PlanError(f"the graph has several 4-D inputs ({names}); fc2conv handles graphs with one image input")
        return None
    info = four_d[0]
    dims = _dims(info.type) or ()
    readers = g.readers(info.name)
    nhwc = bool(readers) and all(
        g.nodes[i].op_type == "Transpose" and list(_attr(g.nodes[i], "perm", [])) == [0, 3, 1, 2] for i, _ in readers
    )
    layout = "nhwc" if nhwc else "nchw"
    axes = (3, 1, 2) if nhwc else (1, 2, 3)  # where C, H, W are
    batch = dims[0] if isinstance(dims[0], int) and dims[0] > 0 else None
    declared = [dims[a] if isinstance(dims[a], int) and dims[a] > 0 else None for a in axes]
    if spec is None:
        traced = (batch, *declared) if None not in declared else None
        chw = tuple(declared)
    else:
        channels = spec.channels if spec.channels is not None else declared[0]
        if channels is None or spec.height is None or spec.width is None:
            raise ShapeError(
                f"the graph's input {info.name!r} is {_describe(dims)}: its size must be given as C x H x W, got {spec}"
            )
        chw = (channels, spec.height, spec.width)
        for part, want, have in zip(("channels", "height", "width"), chw, declared, strict=True):
            if have is not None and have != want:
                raise ShapeError(
                    f"the graph's input {info.name!r} is {_describe(dims)} ({layout}): its {part} is {have}, not {want}"
                )
        traced = (batch, *chw)
    if traced is not None and layout == "nhwc":
        traced = (traced[0], chw[1], chw[2], chw[0])
    return GraphInput(info.name, tuple(dims), info.type.tensor_type.elem_type, layout, traced, spec is not None)


def _static(dims: Dims | None, axes: range) -> bool:
    return dims is not None and all(isinstance(dims[a], int) and dims[a] > 0 for a in axes)


def _infer(model: onnx.ModelProto, image: GraphInput | None, path: Path) -> onnx.ModelProto:
    """Shape inference (strict, with data propagation) at the traced input size."""
    onnx = _onnx()
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
    # Inference reads the values of small constants only (shape targets); large ones keep their shapes
    # and lose their data, so that the inferred copy costs no second copy of the weights.
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
        raise PlanError(f"{path.name}: shape inference fails{where}: {_first_line(exc)}") from exc


# --- the head search ----------------------------------------------------------------------------


def _is_fc(node: onnx.NodeProto) -> bool:
    return node.op_type in ("Gemm", "MatMul") and node.domain in _DEFAULT_DOMAINS


class _HeadFinder:
    def __init__(self, g: GraphIndex, image: GraphInput | None, path: Path) -> None:
        self.g = g
        self.image = image
        self.path = path
        self.notes: list[str] = []

    # Elementwise classification -----------------------------------------------------------------

    def step(self, index: int, tensor: str, width: int | None, *, before_fc: bool = False) -> OnnxStep | None:
        """How node ``index``, reading ``tensor`` of (N, width) values, can stay in a convolutional head.

        ``None`` when it cannot (it mixes positions, or depends on the 2-D layout). ``before_fc``:
        the node reads a flattened map, where a per-feature constant would be per-position.
        """
        g = self.g
        node = g.nodes[index]
        if node.domain not in _DEFAULT_DOMAINS:
            return None
        op, label = node.op_type, g.label(index)
        if any(g.readers(o) or g.is_output(o) for o in node.output[1:] if o):
            return None  # extra outputs (Dropout's mask, BatchNorm's statistics) must be unused
        if op in BINARY_OPS and len(node.input) == 2:
            return self._binary(index, tensor, width, before_fc)
        if node.input[0] != tensor or any(name == tensor for name in node.input[1:]):
            return None  # the head tensor must be the data input, and only that
        if op in UNARY_OPS:
            if op == "Clip" and any(n and g.constant(n) is None for n in node.input[1:]):
                return None
            return OnnxStep(label, index, op, "unary")
        if op == "Dropout":
            mode = node.input[2] if len(node.input) > 2 else ""
            if mode:
                value = g.constant(mode)
                if value is None or bool(value.reshape(-1)[0]):
                    return None  # training mode: random, not the function of an exported model
            return OnnxStep(label, index, op, "unary")
        if before_fc or width is None:
            return None
        if op == "BatchNormalization":
            training = _attr(node, "training_mode", 0) or not _attr(node, "is_test", 1)
            constants = all(g.constant(n) is not None and g.constant(n).size == width for n in node.input[1:5])
            if training or not constants:
                return None
            return OnnxStep(label, index, op, "batchnorm")
        if op in _SOFTMAX_OPS:
            default = -1 if g.opset >= 13 else 1
            axis = _attr(node, "axis", default)
            return OnnxStep(label, index, op, "softmax") if axis in (1, -1) else None
        return None

    def _binary(self, index: int, tensor: str, width: int | None, before_fc: bool) -> OnnxStep | None:
        g = self.g
        node = g.nodes[index]
        slots = [s for s, name in enumerate(node.input) if name != tensor]
        if len(slots) != 1 or (node.op_type in ("Pow", "PRelu") and slots[0] != 1):
            return None
        slot = slots[0]
        value = g.constant(node.input[slot])
        if value is None:
            return None
        label = g.label(index)
        if value.size == 1 and value.ndim <= 2:
            return OnnxStep(label, index, node.op_type, "scalar")
        if not before_fc and width is not None and value.shape in ((width,), (1, width)):
            return OnnxStep(label, index, node.op_type, "channel", slot)
        return None

    # Flatten-like nodes -------------------------------------------------------------------------

    def find(self) -> list[OnnxHead]:
        heads = []
        for index, node in enumerate(self.g.nodes):
            if node.domain not in _DEFAULT_DOMAINS or node.op_type not in ("Flatten", "Reshape"):
                continue
            if self.g.rank(node.input[0]) != 4:
                if node.op_type == "Flatten" and self._fc_reached(node.output[0]):
                    rank = self.g.rank(node.input[0])
                    self.notes.append(
                        f"{self.g.label(index)} flattens a tensor of rank {rank if rank is not None else '?'}, "
                        f"not a 4-D map: left as it is"
                    )
                continue
            reached = self._fc_reached(node.output[0])
            if reached is None:
                if node.op_type == "Flatten":
                    self.notes.append(f"{self.g.label(index)} flattens a map that no FC layer reads: left as it is")
                continue
            heads.append(self._head(index, reached))
        return heads

    def _fc_reached(self, tensor: str) -> tuple[int, list[int]] | None:
        """The first FC node reached from ``tensor`` through elementwise ops and Concat, with the path."""
        g = self.g
        seen: set[str] = set()
        queue: list[tuple[str, list[int]]] = [(tensor, [])]
        while queue:
            name, path = queue.pop(0)
            if name in seen:
                continue
            seen.add(name)
            for index, _ in g.readers(name):
                node = g.nodes[index]
                if _is_fc(node):
                    return index, path
                transparent = node.op_type in _TRANSPARENT_OPS
                if transparent and node.domain in _DEFAULT_DOMAINS and node.output:
                    queue.append((node.output[0], [*path, index]))
        return None

    def _head(self, flatten_index: int, reached: tuple[int, list[int]]) -> OnnxHead:
        g = self.g
        node = g.nodes[flatten_index]
        label = g.label(flatten_index)
        data, flat = node.input[0], node.output[0]
        dims = g.shapes.get(data)
        fc_index, path = reached
        fc_label = f"{g.label(fc_index)} ({g.nodes[fc_index].op_type})"
        joins = [i for i in path if g.nodes[i].op_type == "Concat"]
        if joins:
            raise PlanError(
                f"{fc_label} reads several tensors joined by {g.label(joins[0])} (Concat), {label} among them: "
                f"an FC layer on several flattened maps is not one convolution"
            )
        if not _static(dims, range(1, 4)):
            raise PlanError(self._unknown_map(label, data, dims))
        assert dims is not None
        if node.op_type == "Flatten":
            axis = _attr(node, "axis", 1)
            if axis not in (1, -3):
                raise PlanError(
                    f"{label} (Flatten, axis {axis}) feeds {fc_label}: only a flatten on axis 1 keeps the batch "
                    f"axis and the whole map together"
                )
        else:
            self._check_reshape(flatten_index, dims, fc_label)
        transpose, transpose_index, order, feature = None, None, "chw", data
        c, h, w = (int(d) for d in dims[1:])  # type: ignore[arg-type]
        producer = g.producer.get(data)
        if producer is not None:
            t = g.nodes[producer]
            if t.op_type == "Transpose" and t.domain in _DEFAULT_DOMAINS and list(_attr(t, "perm", [])) == [0, 2, 3, 1]:
                # The flatten reads (N, H, W, C): the kernel reads the transpose's (N, C, H, W) input in hwc order.
                transpose, transpose_index, order, feature = g.label(producer), producer, "hwc", t.input[0]
                h, w, c = (int(d) for d in dims[1:])  # type: ignore[arg-type]
                self.notes.append(f"{transpose} (Transpose to channels-last) absorbed: flatten order hwc")
        feature_map = InputShape(c, h, w)
        readers = g.readers(flat)
        if g.is_output(flat) or len(readers) != 1:
            names = [g.label(i) for i, _ in readers] + (["a graph output"] if g.is_output(flat) else [])
            raise PlanError(
                f"{label}'s output feeds {len(names)} consumers ({', '.join(names)}): only one chain of FC layers "
                f"may read a flattened map"
            )
        pre: list[OnnxStep] = []
        tensor = flat
        index = readers[0][0]
        while not _is_fc(g.nodes[index]):
            step = self.step(index, tensor, None, before_fc=True)
            if step is None:
                raise PlanError(
                    f"{label} feeds {g.label(index)} ({g.nodes[index].op_type}) before {fc_label}: only elementwise "
                    f"operations without per-feature constants may stand between a flatten and its FC layer"
                )
            pre.append(step)
            tensor = g.nodes[index].output[0]
            readers = g.readers(tensor)
            if g.is_output(tensor) or len(readers) != 1:
                raise PlanError(f"{g.label(index)}'s output is read by more than the FC chain after {label}")
            index = readers[0][0]
        layers = [self._layer(index, tensor, feature_map.features)]
        between: list[OnnxStep] = []
        while True:
            pending, tensor, following = self._walk_to_next_fc(layers[-1])
            if following is None:
                break
            between.extend(pending)
            layers.append(self._layer(following, tensor, layers[-1].out_features))
        tail, outputs, dense_problem = self._tail(layers[-1])
        if g.opset < 13:
            softmax = next((s for s in between if s.kind == "softmax"), None)
            if softmax is not None:
                dense_problem = f"{softmax.node} ({softmax.op}) in opset {g.opset} normalises over C*H*W of a map"
        return OnnxHead(
            flatten=label, flatten_index=flatten_index, flatten_op=node.op_type, transpose=transpose,
            transpose_index=transpose_index, flatten_order=order, feature_tensor=feature, feature_map=feature_map,
            layers=tuple(layers), pre=tuple(pre), between=tuple(between), tail=tuple(tail), outputs=tuple(outputs),
            dense_problem=dense_problem,
        )  # fmt: skip

    def _unknown_map(self, label: str, data: str, dims: Dims | None) -> str:
        image = self.image
        if image is not None and image.traced is None:
            return (
                f"the graph's input {image.name!r} is dynamic {_describe(image.dims)}: the size C x H x W of one "
                f"input is needed to know the map {label} flattens"
            )
        return (
            f"{label} flattens {data!r} {_describe(dims)}: its size is not known from the graph "
            f"(data-dependent shape), so no convolution kernel size can be chosen"
        )

    def _check_reshape(self, index: int, dims: Dims, fc_label: str) -> None:
        """A Reshape is a flatten on axis 1 when it gives (N, C*H*W) with the input's own N."""
        g = self.g
        node = g.nodes[index]
        label = g.label(index)
        out = g.shapes.get(node.output[0])
        if out is not None and len(out) == 2 and out[0] is not None and out[0] == dims[0]:
            return  # same batch size (or the same symbolic batch): the rest is C*H*W by element count
        if out is not None and len(out) == 2 and all(isinstance(d, int) for d in out) and isinstance(dims[0], int):
            raise PlanError(
                f"{label} (Reshape) turns {_describe(dims)} into {_describe(out)} before {fc_label}: not a flatten "
                f"on axis 1"
            )
        target = g.constant(node.input[1]) if len(node.input) > 1 else None
        features = math.prod(int(d) for d in dims[1:])  # type: ignore[arg-type]
        if target is not None and target.size == 2:
            first, second = (int(v) for v in target.reshape(-1))
            # 0 copies the input's batch size unless allowzero; -1 takes what is left.
            keeps_batch = (first == 0 and not _attr(node, "allowzero", 0)) or (
                isinstance(dims[0], int) and first == dims[0] > 0
            )
            if (second == features and (keeps_batch or first == -1)) or (second == -1 and keeps_batch):
                return
        if target is None:
            raise PlanError(
                f"{label} (Reshape) before {fc_label} takes its target shape from the graph (data-dependent shape): "
                f"that it keeps the batch axis cannot be proven"
            )
        raise PlanError(
            f"{label} (Reshape to {[int(v) for v in target.reshape(-1)]}) turns {_describe(dims)} into "
            f"{_describe(out)} before {fc_label}: not a flatten on axis 1"
        )

    def _layer(self, index: int, tensor: str, in_features: int) -> OnnxLayer:
        g = self.g
        node = g.nodes[index]
        label, op = g.label(index), node.op_type
        if node.input[0] != tensor:
            raise PlanError(f"{label} ({op}) reads the flattened map as its second operand: it is not an FC layer")
        weight = node.input[1]
        if not g.is_initializer(weight):
            raise PlanError(
                f"{label} ({op}): its weight {weight!r} is not an initializer (computed or a graph input), "
                f"so there is no stored weight to turn into a kernel"
            )
        stored = g.initializers[weight]
        dtype = stored.data_type
        shape = tuple(int(d) for d in stored.dims)
        if dtype not in FLOAT_TYPES:
            raise PlanError(f"{label} ({op}): its weight {weight!r} is {dtype_name_of(dtype)}, not floating point")
        from onnx import defs

        conv_types = defs.get_schema("Conv", g.opset, "").type_constraints[0].allowed_type_strs
        if FLOAT_TYPES[dtype] not in conv_types:
            raise PlanError(f"{label} ({op}): Conv in opset {g.opset} has no {dtype_name_of(dtype)} version")
        if len(shape) != 2:
            raise PlanError(f"{label} ({op}): its weight {weight!r} has shape {shape}, not a 2-D matrix")
        bias, add_node, add_index, output = None, None, None, node.output[0]
        if op == "Gemm":
            if _attr(node, "transA", 0):
                raise PlanError(f"{label} (Gemm) has transA=1: it transposes the flattened batch, not an FC layer")
            trans_b = int(_attr(node, "transB", 0))
            alpha, beta = float(_attr(node, "alpha", 1.0)), float(_attr(node, "beta", 1.0))
            out, inp = shape if trans_b else shape[::-1]
            if len(node.input) > 2 and node.input[2]:
                bias = node.input[2]
                if not g.is_initializer(bias):
                    raise PlanError(f"{label} (Gemm): its bias {bias!r} is not an initializer")
                bias_shape = tuple(int(d) for d in g.initializers[bias].dims)
                if math.prod(bias_shape) != 1 and bias_shape not in ((out,), (1, out)):
                    raise PlanError(
                        f"{label} (Gemm): its bias {bias!r} has shape {bias_shape}, not one value per output: "
                        f"it differs per sample"
                    )
        else:
            trans_b, alpha, beta = 0, 1.0, 1.0
            inp, out = shape
            add = self._bias_add(index, out)
            if add is not None:
                add_index, bias = add
                add_node, output = g.label(add_index), g.nodes[add_index].output[0]
        if inp != in_features:
            raise PlanError(f"{label} ({op}) takes {inp} inputs, but the map before it has {in_features} values")
        return OnnxLayer(
            node=label, index=index, op=op, weight=weight, bias=bias, add_node=add_node, add_index=add_index,
            trans_b=trans_b, alpha=alpha, beta=beta, shape=(out, inp), dtype=dtype_name_of(dtype), output=output,
        )  # fmt: skip

    def _bias_add(self, index: int, out: int) -> tuple[int, str] | None:
        """The Add that gives a MatMul its bias: sole reader, other operand a stored (out,) vector."""
        g = self.g
        result = g.nodes[index].output[0]
        readers = g.readers(result)
        if g.is_output(result) or len(readers) != 1:
            return None
        add_index = readers[0][0]
        add = g.nodes[add_index]
        if add.op_type != "Add" or add.domain not in _DEFAULT_DOMAINS or len(add.input) != 2:
            return None
        other = add.input[1] if add.input[0] == result else add.input[0]
        if other == result or not g.is_initializer(other):
            return None
        if tuple(int(d) for d in g.initializers[other].dims) not in ((out,), (1, out)):
            return None
        if g.initializers[other].data_type != g.initializers[g.nodes[index].input[1]].data_type:
            return None
        return add_index, other

    def _walk_to_next_fc(self, layer: OnnxLayer) -> tuple[list[OnnxStep], str, int | None]:
        """Elementwise steps after ``layer`` up to the next FC layer (``None`` when the chain ends)."""
        g = self.g
        steps: list[OnnxStep] = []
        tensor = layer.output
        while True:
            readers = g.readers(tensor)
            if g.is_output(tensor) or len(readers) != 1:
                return steps, tensor, None
            index = readers[0][0]
            if _is_fc(g.nodes[index]):
                return steps, tensor, index
            step = self.step(index, tensor, layer.out_features)
            if step is None:
                return steps, tensor, None
            steps.append(step)
            tensor = g.nodes[index].output[0]

    def _tail(self, last: OnnxLayer) -> tuple[list[OnnxStep], list[str], str | None]:
        """Every node computed from the last layer, and whether they all work position by position."""
        g = self.g
        steps: list[OnnxStep] = []
        outputs: list[str] = []
        problem = None
        queue, seen = [last.output], set()
        while queue:
            tensor = queue.pop(0)
            if tensor in seen:
                continue
            seen.add(tensor)
            if g.is_output(tensor):
                outputs.append(tensor)
            for index, _ in g.readers(tensor):
                step = self.step(index, tensor, last.out_features)
                node = g.nodes[index]
                if step is None:
                    problem = problem or (
                        f"{g.label(index)} ({node.op_type}) reads the output of {last.node}: a map of scores "
                        f"needs only elementwise operations after the last FC layer"
                    )
                    continue
                if step.kind == "softmax" and g.opset < 13:
                    problem = problem or (
                        f"{step.node} ({step.op}) in opset {g.opset} normalises over C*H*W of a map, not per position"
                    )
                steps.append(step)
                queue.append(node.output[0])
        if not outputs:
            problem = problem or f"the output of {last.node} reaches no graph output"
        return steps, outputs, problem


# --- the reader ---------------------------------------------------------------------------------


def read_onnx(path: str | Path, input_shape: ShapeLike | None = None) -> OnnxFile:
    """Read an ONNX model and find every FC head it holds.

    A head is a flatten on axis 1 of a 4-D map (``Flatten``, or a ``Reshape`` to ``(N, C*H*W)``),
    optionally after ``Transpose(perm=[0, 2, 3, 1])`` (tf2onnx's channels-last flatten: order
    ``hwc``), read by ``Gemm`` (``transA=0``) or ``MatMul`` [+ ``Add``] with stored weights, then
    elementwise operations, ``BatchNormalization`` or ``Dropout`` before each further FC layer.

    Args:
        path: The ``.onnx`` file.
        input_shape: C x H x W of one network input (``"3x32x32"``), needed only when the graph's
            input has dynamic height or width; ``H x W`` takes C from the graph.

    Returns:
        An :class:`OnnxFile`.

    Raises:
        CheckpointError: the file cannot be read (see :func:`load_onnx_model`).
        PlanError: a flatten of a 4-D map feeds FC layers in a way fc2conv cannot prove equal to a
            convolution (the message names the node).
        ShapeError: ``input_shape`` does not fit the graph's input.
    """
    path = Path(path)
    model = load_onnx_model(path)
    spec = as_spec(input_shape)
    bare = GraphIndex(model, model)
    image = _image_input(model, bare, spec)
    inferred = _infer(model, image, path)
    g = GraphIndex(model, inferred)
    finder = _HeadFinder(g, image, path)
    heads = finder.find()
    notes = list(finder.notes)
    if image is not None and image.given:
        notes.insert(0, f"input {image.name!r} traced at {image.size} (given)")
    used = {layer.index for head in heads for layer in head.layers}
    for index, node in enumerate(g.nodes):
        if _is_fc(node) and index not in used:
            notes.append(f"{g.label(index)} ({node.op_type}) reads no flattened map: left as it is")
    if not heads:
        why = f" ({'; '.join(notes)})" if notes else ""
        raise PlanError(f"{path.name}: no flatten of a 4-D map feeding Gemm/MatMul layers was found{why}")
    return OnnxFile(
        path=path,
        model=model,
        inferred=inferred,
        infos=initializer_infos(model),
        tensors=OnnxTensors(model),
        heads=tuple(heads),
        opset=g.opset,
        image_input=image,
        notes=tuple(notes),
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
