"""Which Flatten/Reshape -> Gemm/MatMul chains of an ONNX graph are FC heads, and what the rewrite must do around them.

A head is a flatten on axis 1 of a 4-D map (``Flatten``, or a ``Reshape`` to ``(N, C*H*W)``), optionally
after ``Transpose(perm=[0, 2, 3, 1])`` (tf2onnx's channels-last flatten: order ``hwc``), read by ``Gemm``
(``transA=0``) or ``MatMul`` [+ ``Add``] with stored weights, then elementwise operations,
``BatchNormalization`` or ``Dropout`` before each further FC layer. A flatten that feeds an FC layer
in any other way is refused with a message naming the node in the way: never skipped silently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fc2conv.errors import PlanError
from fc2conv.formats.onnx_graph import (
    DEFAULT_DOMAINS,
    Dims,
    GraphIndex,
    GraphInput,
    attribute,
    describe_dims,
    is_transpose,
    known_sizes,
)
from fc2conv.formats.onnx_io import dtype_name_of
from fc2conv.types import FlattenOrder, InputShape

if TYPE_CHECKING:
    import onnx

__all__ = ["BINARY_OPS", "FLOAT_TYPES", "UNARY_OPS", "OnnxHead", "OnnxLayer", "OnnxStep", "find_heads", "is_fc"]

# ONNX element type -> the type string operator schemas use, for the floating types a Conv may hold.
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
    add_index: int | None  # the Add absorbed as the bias of a MatMul
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


def is_fc(node: onnx.NodeProto) -> bool:
    """A Gemm or MatMul of the standard domain: what an FC layer exports as."""
    return node.op_type in ("Gemm", "MatMul") and node.domain in DEFAULT_DOMAINS


def find_heads(g: GraphIndex, image: GraphInput | None) -> tuple[tuple[OnnxHead, ...], tuple[str, ...]]:
    """Every FC head of the graph, and notes on the flattens and FC layers left as they are.

    Raises:
        PlanError: a flatten of a 4-D map feeds FC layers in a way fc2conv cannot prove equal to a
            convolution (the message names the node).
    """
    finder = _HeadFinder(g, image)
    heads = finder.find()
    used = {layer.index for head in heads for layer in head.layers}
    for index, node in enumerate(g.nodes):
        if is_fc(node) and index not in used:
            finder.notes.append(f"{g.label(index)} ({node.op_type}) reads no flattened map: left as it is")
    return tuple(heads), tuple(finder.notes)


class _HeadFinder:
    """The head search over one graph; ``notes`` collects what it leaves as it is, and why."""

    def __init__(self, g: GraphIndex, image: GraphInput | None) -> None:
        self.g = g
        self.image = image
        self.notes: list[str] = []

    # Nodes that may stay between and after the layers -------------------------------------------

    def step(self, index: int, tensor: str, width: int | None, *, before_fc: bool = False) -> OnnxStep | None:
        """How node ``index``, reading ``tensor`` of (N, width) values, can stay in a convolutional head.

        ``None`` when it cannot (it mixes positions, or depends on the 2-D layout). ``before_fc``:
        the node reads a flattened map, where a per-feature constant would be per-position.
        """
        g = self.g
        node = g.nodes[index]
        if node.domain not in DEFAULT_DOMAINS:
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
            return OnnxStep(label, index, op, "unary") if self._dropout_is_inference(node) else None
        if before_fc or width is None:
            return None
        if op == "BatchNormalization":
            training = attribute(node, "training_mode", 0) or not attribute(node, "is_test", 1)
            per_feature = all(self._constant_size(n) == width for n in node.input[1:5])
            return OnnxStep(label, index, op, "batchnorm") if per_feature and not training else None
        if op in _SOFTMAX_OPS:
            default = -1 if g.opset >= 13 else 1
            axis = attribute(node, "axis", default)
            return OnnxStep(label, index, op, "softmax") if axis in (1, -1) else None
        return None

    def _dropout_is_inference(self, node: onnx.NodeProto) -> bool:
        """A Dropout without a training-mode input, or with a constant False one (training mode is random)."""
        mode = node.input[2] if len(node.input) > 2 else ""
        if not mode:
            return True
        value = self.g.constant(mode)
        return value is not None and not bool(value.reshape(-1)[0])

    def _constant_size(self, name: str) -> int | None:
        value = self.g.constant(name)
        return None if value is None else int(value.size)

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
        """A head for every flatten of a 4-D map that an FC layer reads; notes on the other flattens."""
        heads = []
        g = self.g
        for index, node in enumerate(g.nodes):
            if node.domain not in DEFAULT_DOMAINS or node.op_type not in ("Flatten", "Reshape"):
                continue
            rank = g.rank(node.input[0])
            if rank != 4:
                # Only a Flatten is worth a note: Reshapes of other ranks are everywhere in a graph.
                if node.op_type == "Flatten" and self._fc_reached(node.output[0]) is not None:
                    shown = rank if rank is not None else "?"
                    self.notes.append(
                        f"{g.label(index)} flattens a tensor of rank {shown}, not a 4-D map: left as it is"
                    )
                continue
            reached = self._fc_reached(node.output[0])
            if reached is not None:
                heads.append(self._head(index, reached))
            elif node.op_type == "Flatten":
                self.notes.append(f"{g.label(index)} flattens a map that no FC layer reads: left as it is")
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
                if is_fc(node):
                    return index, path
                transparent = node.op_type in _TRANSPARENT_OPS
                if transparent and node.domain in DEFAULT_DOMAINS and node.output:
                    queue.append((node.output[0], [*path, index]))
        return None

    def _head(self, flatten_index: int, reached: tuple[int, list[int]]) -> OnnxHead:
        """The head that starts at the flatten ``flatten_index``; ``reached``: its first FC and the path there."""
        g = self.g
        node = g.nodes[flatten_index]
        label = g.label(flatten_index)
        fc_index, path = reached
        fc_label = f"{g.label(fc_index)} ({g.nodes[fc_index].op_type})"
        joins = [i for i in path if g.nodes[i].op_type == "Concat"]
        if joins:
            raise PlanError(
                f"{fc_label} reads several tensors joined by {g.label(joins[0])} (Concat), {label} among them: "
                f"an FC layer on several flattened maps is not one convolution"
            )
        sizes = self._flattened_sizes(flatten_index, fc_label)
        transpose, order, feature_tensor, feature_map = self._feature_map(node.input[0], sizes)
        pre, tensor, first_fc = self._steps_to_fc(flatten_index, fc_label)
        layers, between = self._chain(first_fc, tensor, feature_map.features)
        tail, outputs, tail_problem = self._tail(layers[-1])
        return OnnxHead(
            flatten=label, flatten_index=flatten_index, flatten_op=node.op_type, transpose=transpose,
            flatten_order=order, feature_tensor=feature_tensor, feature_map=feature_map, layers=tuple(layers),
            pre=tuple(pre), between=tuple(between), tail=tuple(tail), outputs=tuple(outputs),
            dense_problem=self._softmax_problem(between) or tail_problem,
        )  # fmt: skip

    def _flattened_sizes(self, flatten_index: int, fc_label: str) -> tuple[int, ...]:
        """The three sizes after the batch of the map a flatten reads, once it is proven a flatten on axis 1."""
        g = self.g
        node = g.nodes[flatten_index]
        label, data = g.label(flatten_index), node.input[0]
        dims = g.shapes.get(data)
        sizes = known_sizes(dims, range(1, 4))
        if dims is None or sizes is None:
            raise self._unknown_map(label, data, dims)
        if node.op_type == "Flatten":
            axis = attribute(node, "axis", 1)
            if axis not in (1, -3):
                raise PlanError(
                    f"{label} (Flatten, axis {axis}) feeds {fc_label}: only a flatten on axis 1 keeps the batch "
                    f"axis and the whole map together"
                )
        else:
            self._check_reshape(flatten_index, dims, math.prod(sizes), fc_label)
        return sizes

    def _unknown_map(self, label: str, data: str, dims: Dims | None) -> PlanError:
        """Why the map a flatten reads has no known size: the graph's input is dynamic, or the shape is computed."""
        image = self.image
        if image is not None and image.traced is None:
            return PlanError(
                f"the graph's input {image.name!r} is dynamic {describe_dims(image.dims)}: the size C x H x W of one "
                f"input is needed to know the map {label} flattens",
                remedy="model_input_shape",
            )
        return PlanError(
            f"{label} flattens {data!r} {describe_dims(dims)}: its size is not known from the graph "
            f"(data-dependent shape), so no convolution kernel size can be chosen"
        )

    def _check_reshape(self, index: int, dims: Dims, features: int, fc_label: str) -> None:
        """A Reshape is a flatten on axis 1 when it gives (N, C*H*W) with the input's own N."""
        g = self.g
        node = g.nodes[index]
        label = g.label(index)
        out = g.shapes.get(node.output[0])
        if out is not None and len(out) == 2 and out[0] is not None and out[0] == dims[0]:
            return  # same batch size (or the same symbolic batch): the rest is C*H*W by element count
        if out is not None and len(out) == 2 and all(isinstance(d, int) for d in out) and isinstance(dims[0], int):
            raise PlanError(
                f"{label} (Reshape) turns {describe_dims(dims)} into {describe_dims(out)} before {fc_label}: not a "
                f"flatten on axis 1"
            )
        target = g.constant(node.input[1]) if len(node.input) > 1 else None
        if target is None:
            raise PlanError(
                f"{label} (Reshape) before {fc_label} takes its target shape from the graph (data-dependent shape): "
                f"that it keeps the batch axis cannot be proven"
            )
        if target.size == 2:
            first, second = (int(v) for v in target.reshape(-1))
            # 0 copies the input's batch size unless allowzero; -1 takes what is left.
            keeps_batch = (first == 0 and not attribute(node, "allowzero", 0)) or (
                isinstance(dims[0], int) and first == dims[0] > 0
            )
            if (second == features and (keeps_batch or first == -1)) or (second == -1 and keeps_batch):
                return
        raise PlanError(
            f"{label} (Reshape to {[int(v) for v in target.reshape(-1)]}) turns {describe_dims(dims)} into "
            f"{describe_dims(out)} before {fc_label}: not a flatten on axis 1"
        )

    def _feature_map(self, data: str, sizes: tuple[int, ...]) -> tuple[str | None, FlattenOrder, str, InputShape]:
        """The map the first kernel reads: ``data``, or the input of a channels-last Transpose before it (absorbed).

        Returns the absorbed Transpose's label (or None), the flatten order, the map's tensor and its C x H x W.
        """
        g = self.g
        producer = g.producer.get(data)
        if producer is not None:
            t = g.nodes[producer]
            if is_transpose(t, [0, 2, 3, 1]):
                # The flatten reads (N, H, W, C): the kernel reads the transpose's (N, C, H, W) input in hwc order.
                transpose = g.label(producer)
                self.notes.append(f"{transpose} (Transpose to channels-last) absorbed: flatten order hwc")
                h, w, c = sizes
                return transpose, "hwc", t.input[0], InputShape(c, h, w)
        c, h, w = sizes
        return None, "chw", data, InputShape(c, h, w)

    def _steps_to_fc(self, flatten_index: int, fc_label: str) -> tuple[list[OnnxStep], str, int]:
        """The elementwise steps from a flatten to its FC layer, the tensor that layer reads, and the layer's index.

        The flattened map must have one reader, and each step too: the FC chain is its only use.
        """
        g = self.g
        label = g.label(flatten_index)
        tensor = g.nodes[flatten_index].output[0]
        readers = g.readers(tensor)
        if g.is_output(tensor) or len(readers) != 1:
            names = [g.label(i) for i, _ in readers] + (["a graph output"] if g.is_output(tensor) else [])
            raise PlanError(
                f"{label}'s output feeds {len(names)} consumers ({', '.join(names)}): only one chain of FC layers "
                f"may read a flattened map"
            )
        steps: list[OnnxStep] = []
        index = readers[0][0]
        while not is_fc(g.nodes[index]):
            step = self.step(index, tensor, None, before_fc=True)
            if step is None:
                raise PlanError(
                    f"{label} feeds {g.label(index)} ({g.nodes[index].op_type}) before {fc_label}: only elementwise "
                    f"operations without per-feature constants may stand between a flatten and its FC layer"
                )
            steps.append(step)
            tensor = g.nodes[index].output[0]
            readers = g.readers(tensor)
            if g.is_output(tensor) or len(readers) != 1:
                raise PlanError(f"{g.label(index)}'s output is read by more than the FC chain after {label}")
            index = readers[0][0]
        return steps, tensor, index

    # The FC layers ------------------------------------------------------------------------------

    def _chain(self, index: int, tensor: str, in_features: int) -> tuple[list[OnnxLayer], list[OnnxStep]]:
        """The FC layers from node ``index`` (reading ``tensor``) on, and the steps between them."""
        layers = [self._layer(index, tensor, in_features)]
        between: list[OnnxStep] = []
        while True:
            steps, tensor, following = self._walk_to_next_fc(layers[-1])
            if following is None:
                return layers, between
            between.extend(steps)
            layers.append(self._layer(following, tensor, layers[-1].out_features))

    def _layer(self, index: int, tensor: str, in_features: int) -> OnnxLayer:
        """Node ``index`` as an FC layer reading ``tensor`` of ``in_features`` values, or a PlanError saying why not."""
        g = self.g
        node = g.nodes[index]
        label, op = g.label(index), node.op_type
        if node.input[0] != tensor:
            raise PlanError(f"{label} ({op}) reads the flattened map as its second operand: it is not an FC layer")
        weight, shape, dtype = self._stored_weight(index)
        bias, add_index, output = None, None, node.output[0]
        if op == "Gemm":
            if attribute(node, "transA", 0):
                raise PlanError(f"{label} (Gemm) has transA=1: it transposes the flattened batch, not an FC layer")
            trans_b = int(attribute(node, "transB", 0))
            alpha, beta = float(attribute(node, "alpha", 1.0)), float(attribute(node, "beta", 1.0))
            out, inp = shape if trans_b else shape[::-1]
            bias = self._gemm_bias(index, out)
        else:
            trans_b, alpha, beta = 0, 1.0, 1.0
            inp, out = shape
            add = self._bias_add(index, out)
            if add is not None:
                add_index, bias = add
                output = g.nodes[add_index].output[0]
        if inp != in_features:
            raise PlanError(f"{label} ({op}) takes {inp} inputs, but the map before it has {in_features} values")
        return OnnxLayer(
            node=label, index=index, op=op, weight=weight, bias=bias, add_index=add_index, trans_b=trans_b,
            alpha=alpha, beta=beta, shape=(out, inp), dtype=dtype_name_of(dtype), output=output,
        )  # fmt: skip

    def _stored_weight(self, index: int) -> tuple[str, tuple[int, int], int]:
        """Name, stored 2-D shape and element type of an FC node's weight: a floating initializer a Conv can hold."""
        g = self.g
        node = g.nodes[index]
        label, op, weight = g.label(index), node.op_type, node.input[1]
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
        return weight, (shape[0], shape[1]), dtype

    def _gemm_bias(self, index: int, out: int) -> str | None:
        """A Gemm's bias (its C input): a stored constant with one value, or one per output."""
        g = self.g
        node = g.nodes[index]
        label = g.label(index)
        if len(node.input) <= 2 or not node.input[2]:
            return None
        bias = node.input[2]
        if not g.is_initializer(bias):
            raise PlanError(f"{label} (Gemm): its bias {bias!r} is not an initializer")
        bias_shape = tuple(int(d) for d in g.initializers[bias].dims)
        if math.prod(bias_shape) != 1 and bias_shape not in ((out,), (1, out)):
            raise PlanError(
                f"{label} (Gemm): its bias {bias!r} has shape {bias_shape}, not one value per output: "
                f"it differs per sample"
            )
        return bias

    def _bias_add(self, index: int, out: int) -> tuple[int, str] | None:
        """The Add that gives a MatMul its bias: sole reader, other operand a stored (out,) vector."""
        g = self.g
        result = g.nodes[index].output[0]
        readers = g.readers(result)
        if g.is_output(result) or len(readers) != 1:
            return None
        add_index = readers[0][0]
        add = g.nodes[add_index]
        if add.op_type != "Add" or add.domain not in DEFAULT_DOMAINS or len(add.input) != 2:
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
            if is_fc(g.nodes[index]):
                return steps, tensor, index
            step = self.step(index, tensor, layer.out_features)
            if step is None:
                return steps, tensor, None
            steps.append(step)
            tensor = g.nodes[index].output[0]

    # After the last layer -----------------------------------------------------------------------

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
                problem = problem or self._softmax_problem([step])
                steps.append(step)
                queue.append(node.output[0])
        if not outputs:
            problem = problem or f"the output of {last.node} reaches no graph output"
        return steps, outputs, problem

    def _softmax_problem(self, steps: list[OnnxStep]) -> str | None:
        """Why a softmax among ``steps`` cannot run per position: before opset 13 it normalises over C*H*W."""
        if self.g.opset >= 13:
            return None
        softmax = next((s for s in steps if s.kind == "softmax"), None)
        if softmax is None:
            return None
        return f"{softmax.node} ({softmax.op}) in opset {self.g.opset} normalises over C*H*W of a map, not per position"
