"""Prove an ONNX rewrite: each layer with check_layer, the whole model in ONNX Runtime, and the dense map."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fc2conv.check import check_layer, tolerance_for
from fc2conv.errors import DependencyError
from fc2conv.formats.onnx import OnnxFile, OnnxHead, read_onnx
from fc2conv.formats.onnx_io import OnnxTensors, dtype_name_of, first_line, load_onnx_model, onnx_bytes
from fc2conv.onnx_rewrite import fc_weight_and_bias, head_changes, rewrite_onnx
from fc2conv.plan import LayerChange
from fc2conv.record import METADATA_PREFIX
from fc2conv.results import LayerCheck, Tolerance
from fc2conv.types import ShapeLike

if TYPE_CHECKING:
    import numpy as np
    import onnx

__all__ = [
    "DenseCheck",
    "Measured",
    "OnnxConversion",
    "OnnxProof",
    "OnnxVerification",
    "RuntimeCheck",
    "check_onnx_dense",
    "check_onnx_layers",
    "check_onnx_runtime",
    "convert_onnx",
    "prove_onnx",
    "returns_maps",
    "verify_onnx",
]

# Windows compared in the dense check: every position up to this many, else a seeded sample with the corners.
MAX_POSITIONS = 25
# The dense check's input is the traced input grown by this factor in height and width.
DENSE_GROWTH = 2
# Inputs drawn for the end-to-end check when the graph's batch size is dynamic.
SAMPLES = 2


@dataclass(frozen=True, kw_only=True)
class Measured:
    """Largest difference from a reference; passes when ``max_abs_error <= atol + rtol * reference_scale``.

    ``problem`` says why a check could not run or cannot pass (then the errors are infinite).
    """

    max_abs_error: float
    max_rel_error: float  # max_abs_error / reference_scale
    reference_scale: float  # the largest |reference value|
    tolerance: Tolerance
    problem: str | None = None

    @property
    def ok(self) -> bool:
        """Measured, and within tolerance."""
        if self.problem is not None:
            return False
        return self.max_abs_error <= self.tolerance.atol + self.tolerance.rtol * self.reference_scale


@dataclass(frozen=True, kw_only=True)
class RuntimeCheck(Measured):
    """Original vs converted model, both in ONNX Runtime, on the same seeded inputs at the traced size.

    Every graph output is compared by name; a dense model's (N, K, 1, 1) counts as the original's
    (N, K). ``max_rel_error`` is relative to the largest output of the original.
    """

    input_shape: tuple[int, ...]
    outputs: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class DenseCheck(Measured):
    """Each position of the converted model's map of scores on a larger input, against the original.

    The reference for position ``(i, j)`` of a head is the *original* graph from the head's feature
    map to its outputs (flatten, Gemm/MatMul, ...: extracted with ``onnx.utils.Extractor``), run in
    ONNX Runtime on the window ``map[:, :, i:i+H, j:j+W]`` of the feature map the converted model
    computes for the larger input (its trunk is the original's, node for node).
    """

    input_shape: tuple[int, ...]
    grids: tuple[tuple[int, int], ...] = ()  # output positions per head (H' - H + 1, W' - W + 1)
    positions_checked: int = 0


def _measured(abs_error: float, scale: float, tolerance: Tolerance) -> dict[str, Any]:
    rel = abs_error / scale if scale else (0.0 if abs_error == 0 else math.inf)
    return {"max_abs_error": abs_error, "max_rel_error": rel, "reference_scale": scale, "tolerance": tolerance}


def _unmeasured(problem: str, tolerance: Tolerance) -> dict[str, Any]:
    return {**_measured(math.inf, 0.0, tolerance), "problem": problem}


@dataclass(frozen=True)
class OnnxProof:
    """All the measurements of one converted model: per layer, end to end, and per position if dense."""

    layers: tuple[LayerCheck, ...]
    runtime: RuntimeCheck
    dense: DenseCheck | None = None

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.layers) and self.runtime.ok and (self.dense is None or self.dense.ok)


@dataclass(frozen=True, eq=False)
class OnnxConversion:
    """What :func:`convert_onnx` made: the model (not yet written) and its proof."""

    source: OnnxFile
    model: onnx.ModelProto
    dense: bool
    proof: OnnxProof
    notes: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return self.proof.ok


@dataclass(frozen=True, eq=False)
class OnnxVerification:
    """What :func:`verify_onnx` measured: a converted file against its original."""

    source: OnnxFile
    converted_path: Path
    converted: onnx.ModelProto
    dense: bool
    proof: OnnxProof

    @property
    def ok(self) -> bool:
        return self.proof.ok


# --- per layer ----------------------------------------------------------------------------------


def check_onnx_layers(
    original: OnnxFile,
    converted: onnx.ModelProto,
    *,
    atol: float | None = None,
    rtol: float | None = None,
    seed: int = 0,
) -> tuple[LayerCheck, ...]:
    """:func:`fc2conv.check.check_layer` for every converted layer.

    The reference is the original layer as PyTorch's ``Linear`` in float64, with ``transB`` undone
    and ``alpha``/``beta`` folded exactly (:func:`fc2conv.onnx_rewrite.fc_weight_and_bias`); the
    candidate is the kernel and bias of the Conv node of the same name in ``converted``, run in its
    own dtype. A Conv with strides, padding, dilation or groups fails (the kernel alone would pass).
    """
    convs = {n.name: n for n in converted.graph.node if n.op_type == "Conv"}
    tensors = OnnxTensors(converted)
    results = []
    for head in original.heads:
        for layer, change in zip(head.layers, head_changes(head), strict=True):
            weight, bias = fc_weight_and_bias(original, layer, reference=True)
            node = convs.get(layer.node)
            if node is None or node.input[1] not in tensors:
                what = "no Conv node" if node is None else "a Conv node without a stored kernel"
                results.append(_failed(change, weight, f"{what} named {layer.node!r} in the converted model"))
                continue
            kernel = tensors[node.input[1]]
            kernel_bias = tensors[node.input[2]] if len(node.input) > 2 and node.input[2] in tensors else None
            tolerance = tolerance_for(str(kernel.dtype).removeprefix("torch."), atol, rtol, terms=weight.shape[1])
            result = check_layer(change, weight, kernel, bias, kernel_bias, tolerance=tolerance, seed=seed)
            problem = _conv_attribute_problem(node)
            results.append(replace(result, problem=result.problem or problem))
    return tuple(results)


def _conv_attribute_problem(node: onnx.NodeProto) -> str | None:
    """Why a Conv is not the plain convolution its kernel was checked as (strides, padding, ...); None if it is."""
    from onnx import helper

    plain = {"strides": 1, "dilations": 1, "pads": 0, "group": 1}
    for attr in node.attribute:
        value = helper.get_attribute_value(attr)
        if attr.name in plain and any(v != plain[attr.name] for v in (value if isinstance(value, list) else [value])):
            return f"Conv {node.name!r} has {attr.name}={value}"
        if attr.name == "auto_pad" and value not in (b"NOTSET", b"VALID"):
            return f"Conv {node.name!r} has auto_pad={value.decode()}"
    return None


def _failed(change: LayerChange, weight: Any, problem: str) -> LayerCheck:
    """The check of a layer whose Conv cannot be found in the converted model: failed, with infinite errors."""
    return LayerCheck(
        name=change.name, became=change.became, dtype=change.dtype, old_shape=tuple(weight.shape),
        new_shape=change.new_shape, parameters=change.parameters, max_abs_error=math.inf, max_rel_error=math.inf,
        window_max_abs_error=math.inf, window_grid=(0, 0), reference_scale=0.0, tolerance=tolerance_for(change.dtype),
        problem=problem,
    )  # fmt: skip


# --- ONNX Runtime -------------------------------------------------------------------------------


class _RuntimeProblem(Exception):
    """A check that could not run: reported as the check's ``problem``, not raised to the caller."""


def _session(model: onnx.ModelProto, what: str) -> Any:
    """An ONNX Runtime session on the CPU (``what``: the model's role, for the message if it cannot load)."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise DependencyError(f"the end-to-end check needs onnxruntime ({exc.name} is missing)", extra="onnx") from exc
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: ORT warns about unused initializers and the like
    try:
        return onnxruntime.InferenceSession(onnx_bytes(model), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise _RuntimeProblem(f"ONNX Runtime cannot load the {what} model: {first_line(exc)}") from exc


def _run(session: Any, feeds: dict[str, np.ndarray], what: str) -> dict[str, np.ndarray]:
    """Every output of one run, by name."""
    try:
        values = session.run(None, feeds)
    except Exception as exc:
        raise _RuntimeProblem(f"ONNX Runtime cannot run the {what} model: {first_line(exc)}") from exc
    return {o.name: v for o, v in zip(session.get_outputs(), values, strict=True)}


def _sample_inputs(original: OnnxFile, generator: np.random.Generator, batch: int | None) -> dict[str, np.ndarray]:
    """Seeded standard-normal values for every graph input, at the traced size."""
    from onnx import helper

    initializers = {t.name for t in original.model.graph.initializer}
    feeds = {}
    for info in original.inferred.graph.input:
        if info.name in initializers:
            continue
        dims = []
        for axis, d in enumerate(info.type.tensor_type.shape.dim):
            if d.WhichOneof("value") == "dim_value":
                dims.append(d.dim_value)
            elif axis == 0:
                dims.append(batch or SAMPLES)
            else:
                raise _RuntimeProblem(f"input {info.name!r} has a dynamic size on axis {axis}: no sample can be drawn")
        elem = info.type.tensor_type.elem_type
        np_dtype = helper.tensor_dtype_to_np_dtype(elem)
        if dtype_name_of(elem) not in ("float16", "float32", "float64"):
            raise _RuntimeProblem(f"input {info.name!r} is {dtype_name_of(elem)}: only floating inputs are drawn")
        feeds[info.name] = generator.standard_normal(dims).astype(np_dtype)
    return feeds


def _output_tolerance(original: OnnxFile, atol: float | None = None, rtol: float | None = None) -> Tolerance:
    """fc2conv's tolerance for the dtype of the model's first floating output (float32 if none) and its
    widest converted layer, overridable."""
    elems = [o.type.tensor_type.elem_type for o in original.model.graph.output]
    dtypes = [dtype_name_of(e) for e in elems if dtype_name_of(e) in ("float16", "bfloat16", "float32", "float64")]
    terms = max((c.in_map.features for head in original.heads for c in head_changes(head)), default=1)
    return tolerance_for(dtypes[0] if dtypes else "float32", atol, rtol, terms=terms)


def _compare(expected: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    """Max abs difference (NaN/Inf where both agree count as equal) and the reference's scale."""
    import numpy as np

    expected64, got64 = expected.astype(np.float64), got.astype(np.float64)
    finite = np.isfinite(expected64)
    if not np.array_equal(finite, np.isfinite(got64)) or not np.array_equal(
        expected64[~finite], got64[~finite], equal_nan=True
    ):
        return math.inf, 0.0
    if not finite.any():
        return 0.0, 0.0
    diff = np.abs(expected64[finite] - got64[finite])
    return float(diff.max()), float(np.abs(expected64[finite]).max())


def check_onnx_runtime(
    original: OnnxFile, converted: onnx.ModelProto, *, seed: int = 0, tolerance: Tolerance | None = None
) -> RuntimeCheck:
    """Run both models in ONNX Runtime at the traced size on the same seeded inputs; compare every output."""
    import numpy as np

    tolerance = tolerance or _output_tolerance(original)
    names = tuple(o.name for o in original.model.graph.output)
    image = original.image_input
    shape: tuple[int, ...] = ()
    try:
        if image is not None and image.traced is None:
            raise _RuntimeProblem(
                f"the graph's input {image.name!r} is dynamic: the end-to-end check needs its size C x H x W"
            )
        feeds = _sample_inputs(original, np.random.default_rng(seed), None)
        if image is not None:
            shape = tuple(int(d) for d in feeds[image.name].shape)
        expected = _run(_session(original.model, "original"), feeds, "original")
        got = _run(_session(converted, "converted"), feeds, "converted")
        abs_error, scale = 0.0, 0.0
        for name in names:
            err, ref = _compare_output(name, expected[name], got.get(name))
            abs_error, scale = max(abs_error, err), max(scale, ref)
    except _RuntimeProblem as problem:
        return RuntimeCheck(input_shape=shape, outputs=names, **_unmeasured(str(problem), tolerance))
    return RuntimeCheck(input_shape=shape, outputs=names, **_measured(abs_error, scale, tolerance))


def _compare_output(name: str, want: np.ndarray, have: np.ndarray | None) -> tuple[float, float]:
    """One graph output, original vs converted: :func:`_compare`'s figures, or a problem if they cannot match.

    A dense model at the traced size returns (N, K, 1, 1) for the original's (N, K): the same values.
    Outputs that are not floating point (an ArgMax's labels) must be equal.
    """
    import numpy as np

    if have is None:
        raise _RuntimeProblem(f"the converted model has no output {name!r}")
    if have.shape != want.shape and have.shape == (*want.shape, 1, 1):
        have = have.reshape(want.shape)
    if have.shape != want.shape:
        raise _RuntimeProblem(f"output {name!r} is {have.shape}, the original's is {want.shape}")
    if want.dtype.kind in "fc":
        return _compare(want, have)
    if not np.array_equal(want, have):
        raise _RuntimeProblem(
            f"output {name!r} ({want.dtype}) differs in {int((want != have).sum())} of {want.size} values"
        )
    return 0.0, 0.0


# --- dense ----------------------------------------------------------------------------------------


def _positions(grid: tuple[int, int], generator: np.random.Generator) -> list[tuple[int, int]]:
    """The output positions to compare: all, or :data:`MAX_POSITIONS` of them, the four corners always among them.

    The corners are where a wrong padding or offset shows first; the rest are a seeded sample.
    (``fc2conv.graph.model_check`` draws its positions the same way with torch's generator: their shared
    home would be :mod:`fc2conv.check`, above both.)
    """
    every = [(i, j) for i in range(grid[0]) for j in range(grid[1])]
    if len(every) <= MAX_POSITIONS:
        return every
    corners = {(0, 0), (0, grid[1] - 1), (grid[0] - 1, 0), (grid[0] - 1, grid[1] - 1)}
    rest = [p for p in every if p not in corners]
    picked = generator.choice(len(rest), size=MAX_POSITIONS - len(corners), replace=False)
    return sorted(corners | {rest[int(k)] for k in picked})


def _with_outputs(model: onnx.ModelProto, original: OnnxFile, names: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also returns the tensors ``names`` (the heads' feature maps)."""
    import onnx

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    present = {o.name for o in probe.graph.output}
    known = {v.name: v.type.tensor_type for v in [*original.inferred.graph.value_info, *original.inferred.graph.input]}
    for name in names:
        if name not in present:
            rank = len(known[name].shape.dim) if name in known else 4
            elem = known[name].elem_type if name in known else onnx.TensorProto.FLOAT
            probe.graph.output.append(onnx.helper.make_tensor_value_info(name, elem, [None] * rank))
    return probe


def _head_model(original: OnnxFile, head: OnnxHead) -> onnx.ModelProto:
    """The original graph from the head's feature map to its outputs (what each window is fed to)."""
    from onnx.utils import Extractor

    try:
        extracted = Extractor(original.inferred).extract_model([head.feature_tensor], list(head.outputs))
    except Exception as exc:
        raise _RuntimeProblem(f"the original head after {head.flatten} cannot be extracted: {first_line(exc)}") from exc
    stored = {t.name: t for t in original.model.graph.initializer}
    for tensor in extracted.graph.initializer:  # the inferred copy holds the shapes of large tensors only
        tensor.CopyFrom(stored[tensor.name])
    return extracted


def check_onnx_dense(
    original: OnnxFile, converted: onnx.ModelProto, *, seed: int = 0, tolerance: Tolerance | None = None
) -> DenseCheck:
    """Check a dense model position by position on an input :data:`DENSE_GROWTH` times the traced size.

    Why this is a proof: the converted trunk is the original trunk, node for node, so the feature
    map it returns for the larger input is the original trunk's; the reference for output position
    ``(i, j)`` is the original head run on that map's window at ``(i, j)``: the definition of the
    original network applied densely (OverFeat/FCN). Comparing with the original model run on *input*
    windows would be exact only for a trunk without padding whose stride divides the offsets; with
    padding the border windows differ, so the feature-map windows are the reference.
    """
    import numpy as np

    tolerance = tolerance or _output_tolerance(original)
    image = original.image_input
    if image is None or image.traced is None:
        problem = "the dense check needs the graph's image input at a known size"
        return DenseCheck(input_shape=(), **_unmeasured(problem, tolerance))
    generator = np.random.default_rng(seed)
    shape = image.traced_at(batch=image.traced[0] or 1, growth=DENSE_GROWTH)
    try:
        feeds = _sample_inputs(original, generator, shape[0])
        feeds[image.name] = generator.standard_normal(shape).astype(feeds[image.name].dtype)
        features = list(dict.fromkeys(h.feature_tensor for h in original.heads))
        got = _run(_session(_with_outputs(converted, original, features), "converted"), feeds, "converted")
        tallies = [_dense_head(original, head, got, generator, shape) for head in original.heads]
    except _RuntimeProblem as problem:
        return DenseCheck(input_shape=shape, **_unmeasured(str(problem), tolerance))
    abs_error, scale = max((t.abs_error for t in tallies), default=0.0), max((t.scale for t in tallies), default=0.0)
    return DenseCheck(
        input_shape=shape, grids=tuple(t.grid for t in tallies), positions_checked=sum(t.positions for t in tallies),
        **_measured(abs_error, scale, tolerance),
    )  # fmt: skip


@dataclass(frozen=True)
class _HeadTally:
    """One head's part of the dense check: its grid of output positions, how many were compared, the figures."""

    grid: tuple[int, int]
    positions: int
    abs_error: float
    scale: float


def _dense_head(
    original: OnnxFile,
    head: OnnxHead,
    got: dict[str, np.ndarray],
    generator: np.random.Generator,
    shape: tuple[int, ...],
) -> _HeadTally:
    """The converted model's map of scores for ``head`` (in ``got``) against the original head on each window."""
    import numpy as np

    fmap = got[head.feature_tensor]
    m = head.feature_map
    grid = (fmap.shape[2] - m.height + 1, fmap.shape[3] - m.width + 1)
    if min(grid) < 1:
        raise _RuntimeProblem(f"the map before {head.flatten} is {fmap.shape[2:]} on a {shape} input")
    session = _session(_head_model(original, head), "original head")
    positions = _positions(grid, generator)
    abs_error, scale = 0.0, 0.0
    for i, j in positions:
        window = np.ascontiguousarray(fmap[:, :, i : i + m.height, j : j + m.width])
        expected = _run(session, {head.feature_tensor: window}, "original head")
        for name in head.outputs:
            err, ref = _compare(expected[name], got[name][:, :, i, j])
            abs_error, scale = max(abs_error, err), max(scale, ref)
    return _HeadTally(grid, len(positions), abs_error, scale)


# --- the whole proof ----------------------------------------------------------------------------


def returns_maps(original: OnnxFile, converted: onnx.ModelProto) -> bool:
    """Whether ``converted`` is a dense rewrite: its head outputs are declared 4-D, or its metadata says so."""
    head_outputs = {o for head in original.heads for o in head.outputs}
    for output in converted.graph.output:
        if output.name in head_outputs and len(output.type.tensor_type.shape.dim) == 4:
            return True
    return any(p.key == f"{METADATA_PREFIX}dense" and p.value == "true" for p in converted.metadata_props)


def prove_onnx(
    original: OnnxFile,
    converted: onnx.ModelProto,
    *,
    seed: int = 0,
    atol: float | None = None,
    rtol: float | None = None,
) -> OnnxProof:
    """Every check of ``converted`` against ``original``: per layer, end to end, and per position if dense.

    ``atol`` and ``rtol`` override the dtype's tolerances, for every one of them.
    """
    layers = check_onnx_layers(original, converted, seed=seed, atol=atol, rtol=rtol)
    tolerance = _output_tolerance(original, atol, rtol)
    runtime = check_onnx_runtime(original, converted, seed=seed, tolerance=tolerance)
    dense = None
    if returns_maps(original, converted):
        dense = check_onnx_dense(original, converted, seed=seed, tolerance=tolerance)
    return OnnxProof(layers, runtime, dense)


def convert_onnx(
    path: str | Path,
    *,
    input_shape: ShapeLike | None = None,
    dense: bool = False,
    seed: int = 0,
) -> OnnxConversion:
    """Read an ONNX model, rewrite its heads as convolutions and prove the result; nothing is written.

    Args:
        path: The ``.onnx`` file.
        input_shape: C x H x W of one network input, when the graph's input is dynamic.
        dense: Return a map of scores on inputs larger than the traced size.
        seed: Seed of every random input.

    Returns:
        An :class:`OnnxConversion`; write ``result.model`` with
        :func:`fc2conv.formats.onnx.write_onnx` when ``result.ok``.

    Example:
        >>> result = convert_onnx("model.onnx", dense=True)  # doctest: +SKIP
        >>> result.ok, [c.max_rel_error for c in result.proof.layers]  # doctest: +SKIP
    """
    source = read_onnx(path, input_shape)
    model = rewrite_onnx(source, dense=dense)
    proof = prove_onnx(source, model, seed=seed)
    notes = list(source.notes)
    if proof.dense is not None:
        for head, grid in zip(source.heads, proof.dense.grids, strict=False):
            if grid == (1, 1):
                notes.append(
                    f"the map {head.flatten} flattens stays {head.feature_map.height}x{head.feature_map.width} on a "
                    f"larger input (a global or adaptive pool before it?): the dense output has one position"
                )
    return OnnxConversion(source, model, dense, proof, tuple(notes))


def verify_onnx(
    original_path: str | Path,
    converted_path: str | Path,
    *,
    input_shape: ShapeLike | None = None,
    seed: int = 0,
) -> OnnxVerification:
    """Measure a converted ONNX file against its original (layers by node name, end to end, dense map)."""
    source = read_onnx(original_path, input_shape)
    converted = load_onnx_model(converted_path)
    dense = returns_maps(source, converted)
    return OnnxVerification(source, Path(converted_path), converted, dense, prove_onnx(source, converted, seed=seed))
