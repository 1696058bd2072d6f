"""The torch.fx pass that makes a module's FC head fully convolutional (``convert_module``)."""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fc2conv.convert import fc_to_conv_weight
from fc2conv.errors import PlanError
from fc2conv.plan import LayerChange
from fc2conv.results import ModuleConversion
from fc2conv.shapes import as_spec
from fc2conv.types import InputShape, ShapeLike, dtype_name

if TYPE_CHECKING:
    import torch
    from torch import fx, nn

__all__ = ["CONVERSION_KEY", "conversion_of", "convert_module", "param_dtype", "trace"]

# The converted GraphModule carries the record of its conversion in its ``meta`` dict under this key
# (GraphModule copies ``meta`` on deepcopy, unlike ad-hoc attributes).
CONVERSION_KEY = "fc2conv"


def conversion_of(module: nn.Module) -> ModuleConversion:
    """The :class:`ModuleConversion` of a module returned by :func:`convert_module`."""
    record = getattr(module, "meta", {}).get(CONVERSION_KEY)
    if not isinstance(record, ModuleConversion):
        raise PlanError(f"{type(module).__name__} was not made by fc2conv.convert_module")
    return record


def convert_module(
    model: nn.Module,
    input_shape: ShapeLike,
    *,
    fold_batchnorm: bool = False,
    squeeze_output: bool = False,
) -> fx.GraphModule:
    """Rewrite ``model`` so that its FC head is convolutional and it runs on inputs of any size.

    The model is traced with torch.fx and shapes are propagated at ``input_shape`` (the network's
    input, e.g. ``3x224x224``). Then the flatten (``nn.Flatten``, ``torch.flatten(x, 1)``,
    ``x.view(x.size(0), -1)``, ``x.reshape(N, -1)``) disappears; the first Linear after it becomes a
    Conv2d whose kernel is the map's H x W and every later Linear a 1x1 Conv2d, with weights exactly
    as :func:`fc2conv.fc_to_conv_weight` makes them (so the parameter names and shapes match a file
    written by ``fc2conv convert``); BatchNorm1d becomes BatchNorm2d with the same tensors (or is
    folded into the conv with ``fold_batchnorm``, eval mode only); elementwise modules stay; an
    adaptive pool that is the identity at the traced size is removed so that larger inputs give
    larger maps. Anything the pass cannot prove equal is a :class:`PlanError` naming the node.

    Args:
        model: The network (its parameters are copied, the model itself is not changed).
        input_shape: C x H x W of one network input.
        fold_batchnorm: Fold a BatchNorm1d that follows a Linear into the conv (model must be in eval mode).
        squeeze_output: Return (N, K) instead of (N, K, 1, 1) at the traced size (larger inputs still
            give (N, K, H', W')).

    Returns:
        The converted module (an ``fx.GraphModule``, with the same parameter names); what changed is
        in :func:`conversion_of` (``module.meta["fc2conv"]``).

    Example:
        >>> converted = convert_module(vgg, "3x224x224")  # doctest: +SKIP
        >>> converted(torch.randn(1, 3, 448, 448)).shape  # doctest: +SKIP
        torch.Size([1, 1000, 8, 8])
    """
    spec = as_spec(input_shape)
    if spec is None or spec.channels is None or spec.height is None or spec.width is None:
        raise PlanError(
            f"convert_module needs the full network input shape CxHxW, got {input_shape!r}",
            remedy="model_input_shape",
        )
    shape = InputShape(spec.channels, spec.height, spec.width)
    gm = _trace_with_shapes(model, shape)
    record = _Rewriter(gm, fold_batchnorm).run(shape)
    if squeeze_output:
        _squeeze_output(gm)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    gm.meta[CONVERSION_KEY] = record
    return gm


def trace(model: nn.Module) -> fx.GraphModule:
    """``model`` traced by torch.fx, with every ``nn.Linear`` (subclasses too) and BatchNorm a leaf.

    Subclasses of ``nn.Linear`` defined outside torch (timm's ``Linear``) would otherwise be traced
    through to ``F.linear`` calls; as leaves they are converted like any Linear, and the end-to-end
    check proves that right for each model.
    """
    from torch import fx, nn

    class Tracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
            return isinstance(m, (nn.Linear, nn.BatchNorm1d)) or super().is_leaf_module(m, module_qualified_name)

    try:
        graph = Tracer().trace(model)
    except Exception as exc:  # torch.fx raises TraceError and others for data-dependent code
        raise PlanError(f"cannot trace {type(model).__name__} with torch.fx: {_first_line(exc)}") from exc
    return fx.GraphModule(model, graph, type(model).__name__)


def _trace_with_shapes(model: nn.Module, shape: InputShape) -> fx.GraphModule:
    """A traced copy of ``model`` whose nodes carry their output shapes at a batch of 2 ``shape`` inputs."""
    import copy

    import torch

    gm = trace(copy.deepcopy(model))
    example = torch.zeros(2, shape.channels, shape.height, shape.width, dtype=param_dtype(model))
    modes = {name: m.training for name, m in gm.named_modules()}
    gm.eval()  # shapes only: a training-mode forward would update BatchNorm statistics
    try:
        with torch.no_grad():
            _record_shapes(gm, example)
    except _NodeFailed as exc:
        raise PlanError(
            f"{type(model).__name__} does not run on a {shape} input (the network's input, not the map its head "
            f"reads): at {exc.where}: {_first_line(exc)}"
        ) from exc
    finally:
        for name, m in gm.named_modules():
            m.training = modes[name]
    return gm


class _NodeFailed(Exception):
    """A node of the traced model raised: ``where`` names its module (or function), not the fx node."""

    def __init__(self, where: str) -> None:
        super().__init__(where)
        self.where = where


def _record_shapes(gm: fx.GraphModule, example: torch.Tensor) -> None:
    """Run ``gm`` once, recording each node's output shape; a failure names the module where it happened.

    (torch's ShapeProp prints a traceback to stderr when a node fails; this stays quiet.)
    """
    from torch import Tensor, fx

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            try:
                result = super().run_node(n)
            except Exception as exc:
                raise _NodeFailed(_where(gm, n)) from exc
            if isinstance(result, Tensor):
                n.meta[_SHAPE_KEY] = tuple(result.shape)
            return result

    Recorder(gm).run(example)


_SHAPE_KEY = "fc2conv_shape"


def _where(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return f"{node.target} ({type(gm.get_submodule(str(node.target))).__name__})"
    if node.op == "call_function":
        return f"{getattr(node.target, '__name__', node.target)}()"
    return f"{node.target}"


def _first_line(exc: BaseException) -> str:
    """The innermost cause's first line: torch.fx wraps the real error in its own."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def param_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating parameter (float32 if it has none)."""
    import torch

    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    shape = node.meta.get(_SHAPE_KEY)
    return tuple(shape) if shape is not None else None


def _known_shape(node: fx.Node) -> tuple[int, ...]:
    shape = _shape(node)
    if shape is None:
        raise PlanError(f"node {node.name} ({node.op} {node.target}) has no known tensor shape")
    return shape


def _first_input(node: fx.Node) -> fx.Node:
    """The tensor a node reads first (a head node's producer)."""
    from torch import fx

    if not node.args or not isinstance(node.args[0], fx.Node):
        raise PlanError(f"node {node.name} ({node.op} {node.target}) does not read a tensor first")
    return node.args[0]


# Modules and functions that act on each value (or each channel, for a 4-D input) the same way
# whether the activations are (N, C) or (N, C, H, W): they stay as they are in the head.
_ELEMENTWISE_MODULES = (
    "ReLU", "ReLU6", "LeakyReLU", "PReLU", "ELU", "SELU", "CELU", "GELU", "SiLU", "Mish", "Sigmoid", "Tanh",
    "Hardswish", "Hardsigmoid", "Hardtanh", "Softplus", "Softsign", "Tanhshrink", "Dropout", "AlphaDropout",
    "Identity",
)  # fmt: skip


def _elementwise_functions() -> set[Callable[..., Any]]:
    import torch
    import torch.nn.functional as F

    return {
        torch.relu, F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.gelu, F.silu, F.mish, torch.sigmoid,
        F.sigmoid, torch.tanh, F.tanh, F.hardswish, F.hardsigmoid, F.hardtanh, F.softplus, F.dropout,
        operator.mul, operator.add, operator.sub, operator.truediv, torch.mul, torch.add,
    }  # fmt: skip


_ELEMENTWISE_METHODS = {"relu", "sigmoid", "tanh", "mul", "add", "sub", "div", "clamp", "contiguous"}


class _Rewriter:
    """One pass over the traced graph: find the flatten, rewrite the head after it."""

    def __init__(self, gm: fx.GraphModule, fold_batchnorm: bool) -> None:
        self.gm = gm
        self.fold_batchnorm = fold_batchnorm
        self.modules = dict(gm.named_modules())
        self.elementwise = _elementwise_functions()
        self.changes: list[LayerChange] = []
        self.removed: list[str] = []
        self.notes: list[str] = []
        self.folded: list[str] = []

    # -- classification of nodes ---------------------------------------------------------------
    def _module(self, node: fx.Node) -> nn.Module | None:
        return self.modules.get(str(node.target)) if node.op == "call_module" else None

    def _is_flatten(self, node: fx.Node) -> bool:
        """A node that turns (N, C, H, W) into (N, C*H*W), whatever form it takes."""
        import torch
        from torch import nn

        if node.op == "call_module":
            module = self._module(node)
            is_candidate = isinstance(module, nn.Flatten)
        elif node.op == "call_function":
            is_candidate = node.target in (torch.flatten, torch.reshape)
        elif node.op == "call_method":
            is_candidate = node.target in ("flatten", "view", "reshape")
        else:
            return False
        if not is_candidate or not node.args or not isinstance(node.args[0], torch.fx.Node):
            return False
        before, after = _shape(node.args[0]), _shape(node)
        return (
            before is not None
            and after is not None
            and len(before) == 4
            and len(after) == 2
            and after[0] == before[0]
            and after[1] == before[1] * before[2] * before[3]
        )

    def _is_elementwise(self, node: fx.Node) -> bool:
        module = self._module(node)
        if module is not None:
            return type(module).__name__ in _ELEMENTWISE_MODULES
        if node.op == "call_function":
            if node.target not in self.elementwise:
                return False
            # binary ops only with a scalar: a tensor operand could be a (N, K) tensor from elsewhere
            tensors = [a for a in node.args if hasattr(a, "op")]
            return len(tensors) == 1
        if node.op == "call_method":
            tensors = [a for a in node.args if hasattr(a, "op")]
            return node.target in _ELEMENTWISE_METHODS and len(tensors) == 1
        return False

    # -- the pass ----------------------------------------------------------------------------------
    def run(self, input_shape: InputShape) -> ModuleConversion:
        graph = self.gm.graph
        flattens = [n for n in graph.nodes if self._is_flatten(n)]
        if not flattens:
            raise PlanError(
                "no flatten of a (N, C, H, W) map into (N, C*H*W) found in the traced model; "
                "nothing to make convolutional"
            )
        if len(flattens) > 1:
            names = ", ".join(n.name for n in flattens)
            raise PlanError(f"the model flattens more than one map ({names}); fc2conv converts one head")
        flatten = flattens[0]
        _, channels, height, width = _known_shape(_first_input(flatten))
        feature_shape = InputShape(channels, height, width)
        self._drop_identity_pools(_first_input(flatten))
        self._rewrite_head(flatten, feature_shape)
        feature_node = _first_input(flatten)
        flatten.replace_all_uses_with(feature_node)
        graph.erase_node(flatten)
        self.removed.append(flatten.name)
        return ModuleConversion(
            input_shape, feature_shape, feature_node.name, tuple(self.changes), tuple(self.folded),
            tuple(self.removed), tuple(self.notes),
        )  # fmt: skip

    def _drop_identity_pools(self, node: fx.Node) -> None:
        """Remove adaptive pools before the flatten that do nothing at the traced size (VGG, AlexNet)."""
        import torch.nn.functional as F
        from torch import nn

        while True:
            module = self._module(node)
            is_pool = isinstance(module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)) or (
                node.op == "call_function" and node.target in (F.adaptive_avg_pool2d, F.adaptive_max_pool2d)
            )
            if is_pool:
                previous = _first_input(node)
                before, after = _known_shape(previous), _known_shape(node)
                if before != after:
                    self.notes.append(
                        f"{node.name} pools {before[2]}x{before[3]} to {after[2]}x{after[3]} and stays: "
                        "larger inputs are pooled to the same map (a global pool gives a 1x1 head)"
                    )
                    return
                self.notes.append(f"{node.name} is the identity at the traced size: removed for dense output")
                node.replace_all_uses_with(previous)
                self.gm.graph.erase_node(node)
                self.removed.append(node.name)
                node = previous
                continue
            if self._is_elementwise(node) and len(node.users) == 1:
                node = _first_input(node)
                continue
            return

    def _rewrite_head(self, flatten: fx.Node, feature_shape: InputShape) -> None:
        """Replace every Linear downstream of the flatten; refuse anything that is not provably equal.

        Each head node carries the map it holds as a conv activation: the flatten holds the feature
        map (C, H, W); an elementwise op or a BatchNorm holds its input's; a Linear holds (out, 1, 1).
        A Linear reading the feature map becomes an H x W conv, one reading (in, 1, 1) a 1x1 conv.
        """
        from torch import nn

        maps: dict[fx.Node, InputShape] = {flatten: feature_shape}
        frontier = list(flatten.users)
        visited: set[fx.Node] = set()
        order = {node: i for i, node in enumerate(self.gm.graph.nodes)}
        while frontier:
            frontier.sort(key=lambda n: order[n])
            node = frontier.pop(0)
            if node in visited:
                continue
            visited.add(node)
            if node.op == "output":
                continue
            module = self._module(node)
            held = next(maps[a] for a in node.all_input_nodes if a in maps)
            if isinstance(module, nn.Linear):
                if self._calls(str(node.target)) > 1:
                    raise PlanError(f"{node.target} (node {node.name}) is used more than once; cannot convert it")
                self._replace_linear(node, module, held)
                held = InputShape(module.out_features, 1, 1)
            elif isinstance(module, nn.BatchNorm1d):
                node = self._replace_batchnorm(node, module)  # the producer, if folded away
            elif isinstance(module, (nn.Softmax, nn.LogSoftmax)) and module.dim in (1, -1):
                module.dim = 1  # the class axis of (N, K, H, W)
            elif not self._is_elementwise(node):
                what = f"{node.op} {node.target}"
                raise PlanError(
                    f"node {node.name} ({what}) uses the flattened features but is not a Linear, BatchNorm1d "
                    "or elementwise op; fc2conv cannot prove the convolutional version equal"
                )
            maps[node] = held
            frontier.extend(node.users)
        if not self.changes:
            raise PlanError(f"the flatten {flatten.name} does not feed a Linear layer")

    def _calls(self, target: str) -> int:
        return sum(1 for n in self.gm.graph.nodes if n.op == "call_module" and str(n.target) == target)

    def _replace_linear(self, node: fx.Node, linear: nn.Linear, in_map: InputShape) -> None:
        import torch
        from torch import nn

        if linear.in_features != in_map.features:
            raise PlanError(
                f"{node.target} takes {linear.in_features} inputs; the map before it is {in_map} = {in_map.features}"
            )
        change = LayerChange(
            name=str(node.target),
            weight=f"{node.target}.weight",
            bias=f"{node.target}.bias" if linear.bias is not None else None,
            dtype=dtype_name(linear.weight.dtype),
            old_shape=(linear.out_features, linear.in_features),
            in_map=in_map,
            flatten_order="chw",
        )
        conv = nn.Conv2d(
            in_map.channels, linear.out_features, (in_map.height, in_map.width), bias=linear.bias is not None,
            device=linear.weight.device, dtype=linear.weight.dtype,
        )  # fmt: skip
        with torch.no_grad():
            conv.weight.copy_(fc_to_conv_weight(linear.weight.detach(), change))
            if linear.bias is not None and conv.bias is not None:
                conv.bias.copy_(linear.bias.detach())
        conv.train(linear.training)
        self._set_module(str(node.target), conv)
        self.changes.append(change)

    def _replace_batchnorm(self, node: fx.Node, bn: nn.BatchNorm1d) -> fx.Node:
        """BatchNorm1d -> BatchNorm2d, or folded into the conv before it; returns the node that remains."""
        from torch import nn

        producer = _first_input(node)
        conv = self._module(producer)
        if self.fold_batchnorm and isinstance(conv, nn.Conv2d) and len(producer.users) == 1:
            _fold_into(conv, bn, str(node.target))
            node.replace_all_uses_with(producer)
            self.gm.graph.erase_node(node)
            self.removed.append(node.name)
            self.folded.append(str(producer.target))
            self.notes.append(f"{node.target} folded into {producer.target}")
            return producer
        bn2d = nn.BatchNorm2d(
            bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
            device=bn.running_mean.device if bn.running_mean is not None else None,
            dtype=bn.weight.dtype if bn.weight is not None else None,
        )  # fmt: skip
        bn2d.load_state_dict(bn.state_dict())
        bn2d.train(bn.training)
        self._set_module(str(node.target), bn2d)
        self.notes.append(f"{node.target}: BatchNorm1d -> BatchNorm2d with the same tensors")
        return node

    def _set_module(self, target: str, module: nn.Module) -> None:
        parent_name, _, leaf = target.rpartition(".")
        parent = self.gm.get_submodule(parent_name) if parent_name else self.gm
        setattr(parent, leaf, module)
        self.modules[target] = module


def _fold_into(conv: nn.Conv2d, bn: nn.BatchNorm1d, name: str) -> None:
    """Fold an eval-mode BatchNorm into the conv before it: ``w * g / sqrt(var + eps)``, shifted bias."""
    import torch
    from torch import nn

    mean, var = bn.running_mean, bn.running_var
    if bn.training or mean is None or var is None:
        raise PlanError(f"{name}: folding a BatchNorm needs eval mode and running statistics")
    with torch.no_grad():
        scale = 1 / torch.sqrt(var + bn.eps)
        shift = torch.zeros_like(mean)
        if bn.affine:
            scale, shift = bn.weight * scale, bn.bias
        bias = conv.bias if conv.bias is not None else torch.zeros_like(mean)
        conv.weight.mul_(scale.reshape(-1, 1, 1, 1))
        new_bias = (bias - mean) * scale + shift
        if conv.bias is None:
            conv.bias = nn.Parameter(new_bias)
        else:
            conv.bias.copy_(new_bias)


def _squeeze_output(gm: fx.GraphModule) -> None:
    """(N, K, 1, 1) -> (N, K) at the traced size, for each output (one, or a tuple/list/dict of heads)."""
    from torch.fx.node import map_arg

    output = next(n for n in gm.graph.nodes if n.op == "output")

    def squeeze(node: fx.Node) -> fx.Node:
        with gm.graph.inserting_before(output):
            return gm.graph.call_method("squeeze", (gm.graph.call_method("squeeze", (node, -1)), -1))

    output.args = (map_arg(output.args[0], squeeze),)
