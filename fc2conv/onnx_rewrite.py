"""Rewrite the FC heads of an ONNX graph as Conv nodes whose kernels fc2conv's reshape rule makes."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from fc2conv._version import __version__
from fc2conv.convert import fc_to_conv_weight
from fc2conv.errors import PlanError
from fc2conv.formats.onnx import OnnxFile, OnnxHead, OnnxLayer, OnnxStep
from fc2conv.formats.onnx_io import first_line, to_proto
from fc2conv.plan import LayerChange
from fc2conv.record import METADATA_PREFIX
from fc2conv.types import InputShape

if TYPE_CHECKING:
    import onnx
    import torch

__all__ = ["fc_weight_and_bias", "head_changes", "onnx_changes", "rewrite_onnx"]


def head_changes(head: OnnxHead) -> tuple[LayerChange, ...]:
    """One :class:`LayerChange` per layer of a head: the first reads the map, the later ones are 1x1."""
    changes = []
    in_map = head.feature_map
    for position, layer in enumerate(head.layers):
        changes.append(
            LayerChange(
                name=layer.node,
                weight=layer.weight,
                bias=layer.bias,
                dtype=layer.dtype,
                old_shape=layer.shape,
                in_map=in_map,
                flatten_order=head.flatten_order if position == 0 else "chw",
            )
        )
        in_map = InputShape(layer.out_features, 1, 1)
    return tuple(changes)


def onnx_changes(onnx_file: OnnxFile) -> tuple[LayerChange, ...]:
    """Every layer change of every head of the graph."""
    return tuple(change for head in onnx_file.heads for change in head_changes(head))


def fc_weight_and_bias(
    onnx_file: OnnxFile, layer: OnnxLayer, *, reference: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The function a Gemm/MatMul layer computes, as PyTorch's ``Linear``: ``x @ weight.T + bias``.

    ``transB`` (and MatMul's ``(in, out)`` storage) is undone, ``alpha`` folded into the weight and
    ``beta`` into the bias, which is broadcast to ``(out,)``. A factor of 1 is not applied at all, so
    the kernel then holds the stored values bit for bit.

    Args:
        onnx_file: The model as read.
        layer: One layer of one of its heads.
        reference: For the checks: a fold is done in float64, exactly, and the weight is otherwise
            returned as stored (a transposed view, not a copy: ``check_layer`` widens it a few rows at a
            time); the bias is float64. Otherwise everything is in the layer's dtype (one rounding
            per folded value) and contiguous.

    Returns:
        ``(weight (out, in), bias (out,) or None)``.
    """
    import torch

    stored = onnx_file.tensors[layer.weight]
    dtype = torch.float64 if reference else stored.dtype
    weight = stored if layer.op == "Gemm" and layer.trans_b else stored.t()
    if layer.alpha != 1.0:
        weight = (weight.double() * layer.alpha).to(dtype)
    elif not reference:
        weight = weight.contiguous()
    bias = None
    if layer.bias is not None:
        stored_bias = onnx_file.tensors[layer.bias].reshape(-1)
        stored_bias = stored_bias.expand(layer.out_features) if stored_bias.numel() == 1 else stored_bias
        scaled = stored_bias.double() * layer.beta if layer.beta != 1.0 else stored_bias
        bias = scaled.to(dtype).contiguous()
    return weight, bias


def rewrite_onnx(onnx_file: OnnxFile, *, dense: bool = False) -> onnx.ModelProto:
    """Turn every head of ``onnx_file`` into Conv nodes; the rest of the graph is kept as it is.

    The first layer of a head becomes a Conv with the map's H x W kernel (read in the head's flatten
    order), each later layer a 1x1 Conv; the flatten (and an absorbed channels-last Transpose) goes.
    Without ``dense`` a ``Flatten(axis=1)`` follows the last Conv, so that at the traced size every
    graph output keeps its name and shape (N, K). With ``dense`` there is no flatten: height and width
    of the graph's input become dynamic and the head returns (N, K, H', W') on larger inputs.

    Names: each Conv takes its layer's node name; its kernel replaces the FC weight under the same
    initializer name when that layer was the weight's only reader (else it is stored as
    ``<weight>_conv``); a bias needing no change keeps its initializer, a folded one (``beta``, a
    (1, out) or one-value bias) follows the weight's rule. Graph inputs and outputs, opset, IR version,
    doc strings and metadata are kept; ``fc2conv.*`` metadata entries record the conversion.

    Args:
        onnx_file: The model as read by :func:`fc2conv.formats.onnx.read_onnx`.
        dense: Drop the flatten and make the input's height and width dynamic.

    Returns:
        The new model; it passes ``onnx.checker.check_model(full_check=True)``.

    Raises:
        PlanError: ``dense`` but a head's output goes through a node that is not elementwise, or the
            graph has no single image input to make dynamic.
    """
    import onnx

    model = onnx.ModelProto()
    model.CopyFrom(onnx_file.model)
    rewriter = _Rewriter(onnx_file, model, dense)
    for head in onnx_file.heads:
        rewriter.head(head)
    rewriter.finish()
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:  # ValidationError, InferenceError
        raise PlanError(
            f"the rewritten graph of {onnx_file.path.name} fails the ONNX checker: {first_line(exc)}"
        ) from exc
    return model


class _Rewriter:
    """One rewrite of a copy of the model: nodes replaced by index, new initializers, then the graph reassembled.

    Node indices are those of the model as read (the heads' ``index`` fields): replacements are
    collected per index and applied once, in :meth:`finish`, so no index moves while heads are rewritten.
    """

    def __init__(self, onnx_file: OnnxFile, model: onnx.ModelProto, dense: bool) -> None:
        self.file = onnx_file
        self.model = model
        self.dense = dense
        self.g = onnx_file.index()
        self.replacements: dict[int, list[onnx.NodeProto]] = {}
        self.changed: set[str] = set()  # tensors whose shape changes (their value_info goes)
        self.new_initializers: dict[str, onnx.TensorProto] = {}
        graph = model.graph
        self.taken = (
            {t.name for t in graph.initializer}
            | {i.name for i in graph.input}
            | {o for n in graph.node for o in n.output}
        )
        # An initializer may be read from inside a subgraph too: with subgraphs, never reuse a name.
        self.has_subgraphs = any(a.type in (a.GRAPH, a.GRAPHS) for n in graph.node for a in n.attribute)
        self.records: list[dict[str, object]] = []
        # What the graph read before any change: a node the rewrite leaves unread goes, one unread before stays.
        self.before_used = _used_names(graph)

    # Names ------------------------------------------------------------------------------------

    def _fresh(self, base: str) -> str:
        """A tensor name not yet used in the graph: ``base``, else ``base2``, ``base3``, ..."""
        name, count = base, 1
        while name in self.taken:
            count += 1
            name = f"{base}{count}"
        self.taken.add(name)
        return name

    def _store(self, name: str, tensor: torch.Tensor, owners: set[int]) -> str:
        """Store ``tensor`` under ``name`` when only ``owners`` read that initializer, else under a new name."""
        readers = {i for i, _ in self.g.readers(name)}
        listed = name in self.g.input_names  # IR < 4: the input would keep the old shape
        sole = self.g.is_initializer(name) and readers <= owners and not self.has_subgraphs and not listed
        target = name if sole else self._fresh(f"{name}_conv")
        self.new_initializers[target] = to_proto(tensor, target)
        return target

    # Heads ------------------------------------------------------------------------------------

    def head(self, head: OnnxHead) -> None:
        """Replace one head: its flatten goes (the first node after it reads the map), each layer becomes a Conv."""
        if self.dense and head.dense_problem:
            raise PlanError(f"the head after {head.flatten} cannot return a map of scores: {head.dense_problem}")
        nodes = self.model.graph.node
        flat = self.g.nodes[head.flatten_index].output[0]
        self.replacements[head.flatten_index] = []
        first_reader = head.pre[0].index if head.pre else head.layers[0].index
        _rename_input(nodes[first_reader], flat, head.feature_tensor)
        self.changed.update(nodes[s.index].output[0] for s in head.pre)
        for step in head.between:
            self._step(step)
        if self.dense:
            for step in head.tail:
                self._step(step)
        for position, (layer, change) in enumerate(zip(head.layers, head_changes(head), strict=True)):
            last = position == len(head.layers) - 1
            self._layer(head, layer, change, nodes[layer.index].input[0], last)

    def _step(self, step: OnnxStep) -> None:
        """Keep a node between or after the layers valid on a map: per-feature constants become (F, 1, 1)."""
        import onnx
        import torch

        node = self.model.graph.node[step.index]
        self.changed.update(o for o in node.output if o)
        if step.kind == "channel":
            assert step.constant_slot is not None
            name = node.input[step.constant_slot]
            value = self.g.constant(name)
            assert value is not None
            reshaped = torch.from_numpy(value.copy()).reshape(-1, 1, 1)
            node.input[step.constant_slot] = self._store(name, reshaped, {step.index})
        elif step.kind == "softmax":
            kept = [a for a in node.attribute if a.name != "axis"]
            del node.attribute[:]
            node.attribute.extend(kept)
            node.attribute.append(onnx.helper.make_attribute("axis", 1))

    def _layer(self, head: OnnxHead, layer: OnnxLayer, change: LayerChange, data: str, last: bool) -> None:
        """The Conv that replaces ``layer`` (and its bias Add), reading ``data``; the Flatten after the last."""
        import onnx

        weight, bias = fc_weight_and_bias(self.file, layer)
        kernel = fc_to_conv_weight(weight, change)
        owners = {layer.index} | ({layer.add_index} if layer.add_index is not None else set())
        kernel_name = self._store(layer.weight, kernel, owners)
        inputs = [data, kernel_name]
        if layer.bias is not None and bias is not None:
            unchanged = layer.beta == 1.0 and self.g.shapes[layer.bias] == (layer.out_features,)
            inputs.append(layer.bias if unchanged else self._store(layer.bias, bias, owners))
        result = layer.output
        if last and not self.dense:
            result = self._fresh(f"{layer.output}_map")
        original = self.g.nodes[layer.index]
        conv = onnx.helper.make_node(
            "Conv", inputs, [result], name=layer.node, kernel_shape=list(kernel.shape[2:]), strides=[1, 1],
            pads=[0, 0, 0, 0], dilations=[1, 1], group=1, doc_string=original.doc_string or None,
        )  # fmt: skip
        conv.metadata_props.extend(original.metadata_props)
        new_nodes = [conv]
        if last and not self.dense:
            flatten = self.g.nodes[head.flatten_index]
            name = flatten.name or None
            new_nodes.append(onnx.helper.make_node("Flatten", [result], [layer.output], name=name, axis=1))
        self.replacements[layer.index] = new_nodes
        if layer.add_index is not None:
            self.replacements[layer.add_index] = []
        if not last or self.dense:
            self.changed.add(layer.output)  # (N, F, 1, 1) or (N, K, H', W') now
        self.records.append(
            {
                "name": layer.node,
                "weight": kernel_name,
                "old_shape": list(layer.shape),
                "new_shape": list(kernel.shape),
                "flatten_order": change.flatten_order,
            }
        )

    # The graph --------------------------------------------------------------------------------

    def finish(self) -> None:
        """Apply the replacements, drop what they left unread, and make shapes and metadata say what the graph is."""
        graph = self.model.graph
        before_used = self.before_used
        nodes = []
        for index, node in enumerate(graph.node):
            nodes.extend(self.replacements.get(index, [node]))
        del graph.node[:]
        graph.node.extend(_drop_new_dead(nodes, graph, before_used))
        self._initializers(before_used)
        if self.dense:
            del graph.value_info[:]
            self._dense_io()
        else:
            existing = _used_names(graph) | {o for n in graph.node for o in n.output}
            kept = [v for v in graph.value_info if v.name not in self.changed and v.name in existing]
            del graph.value_info[:]
            graph.value_info.extend(kept)
        self._metadata()

    def _initializers(self, before_used: set[str]) -> None:
        """Kernels in place of the weights they replace (new names at the end); weights nothing reads any more go."""
        import onnx

        graph = self.model.graph
        used = _used_names(graph)
        merged = []
        for t in graph.initializer:
            if t.name in self.new_initializers:
                merged.append(self.new_initializers.pop(t.name))
            elif t.name in used or t.name not in before_used:
                merged.append(t)
        merged.extend(self.new_initializers.values())
        dropped = {t.name for t in graph.initializer} - {t.name for t in merged}
        del graph.initializer[:]
        graph.initializer.extend(merged)
        # IR < 4 lists every initializer as a graph input too: dropped ones go from there, new ones come.
        inputs = [i for i in graph.input if i.name not in dropped]
        if self.model.ir_version < 4:
            listed = {i.name for i in inputs}
            inputs += [
                onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                for t in merged
                if t.name not in listed
            ]
        del graph.input[:]
        graph.input.extend(inputs)
        stale = {t.name for t in merged} & {v.name for v in graph.value_info}
        kept = [v for v in graph.value_info if v.name not in stale]
        del graph.value_info[:]
        graph.value_info.extend(kept)

    def _dense_io(self) -> None:
        """Open the input's height and width, and declare the heads' outputs as (N, K, H', W') maps."""
        image = self.file.image_input
        if image is None:
            raise PlanError(f"{self.file.path.name} has no single 4-D image input whose height and width could grow")
        graph = self.model.graph
        target = next(i for i in graph.input if i.name == image.name)
        dims = target.type.tensor_type.shape.dim
        for axis, name in zip(image.spatial_axes, ("height", "width"), strict=True):
            if dims[axis].WhichOneof("value") != "dim_param":
                dims[axis].Clear()
                dims[axis].dim_param = name
        head_outputs = {o for head in self.file.heads for o in head.outputs}
        for output in graph.output:
            shape = output.type.tensor_type.shape
            if output.name in head_outputs and len(shape.dim) == 2:
                shape.dim.add()
                shape.dim.add()  # (N, K, unknown height, unknown width)
            else:
                for dim in shape.dim:
                    dim.Clear()  # may depend on the input size now (the rank stays: the checker needs a shape)

    def _metadata(self) -> None:
        """Record the conversion in ``fc2conv.*`` metadata entries (what verify and people can read back)."""
        import onnx

        entries = {
            f"{METADATA_PREFIX}version": __version__,
            f"{METADATA_PREFIX}dense": "true" if self.dense else "false",
            f"{METADATA_PREFIX}layers": json.dumps(self.records, separators=(",", ":")),
        }
        image = self.file.image_input
        if image is not None and image.size is not None:
            entries[f"{METADATA_PREFIX}input_shape"] = str(image.size)
        props = {p.key: p.value for p in self.model.metadata_props}  # the model's own entries stay
        onnx.helper.set_model_props(self.model, {**props, **entries})


def _rename_input(node: onnx.NodeProto, old: str, new: str) -> None:
    """Make ``node`` read ``new`` wherever it read ``old``."""
    for slot, name in enumerate(node.input):
        if name == old:
            node.input[slot] = new


def _used_names(graph: onnx.GraphProto) -> set[str]:
    """Tensors read by a node or returned by the graph."""
    used = {o.name for o in graph.output}
    for node in graph.node:
        used.update(n for n in node.input if n)
    return used


def _drop_new_dead(nodes: list[onnx.NodeProto], graph: onnx.GraphProto, before_used: set[str]) -> list[onnx.NodeProto]:
    """Remove the nodes the rewrite left without readers (the flatten's shape computation, a Transpose).

    Nodes whose outputs nobody read before the rewrite are kept: they are the model's business.
    """
    outputs = {o.name for o in graph.output}
    while True:
        used = set(outputs)
        for node in nodes:
            used.update(n for n in node.input if n)
        dead = [
            n for n in nodes
            if n.output and not any(o in used for o in n.output if o) and any(o in before_used for o in n.output if o)
        ]  # fmt: skip
        if not dead:
            return nodes
        nodes = [n for n in nodes if not any(n is d for d in dead)]
