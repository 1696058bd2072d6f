"""What the commands and proofs return: plain frozen dataclasses, shared by the library and the renderers."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from fc2conv.layers import Layer
from fc2conv.plan import LayerChange, Plan
from fc2conv.types import FlattenOrder, InputShape, TensorInfo, dtype_itemsize

if TYPE_CHECKING:
    from fc2conv.evidence import GeometryEvidence, OrderEvidence

__all__ = [
    "ConvertResult",
    "Export",
    "InspectResult",
    "LayerCheck",
    "ModuleCheck",
    "ModuleConversion",
    "TensorMismatch",
    "Tolerance",
    "VerifyResult",
]


@dataclass(frozen=True)
class Tolerance:
    """A layer passes when ``max_abs_error <= atol + rtol * max|reference|``."""

    atol: float
    rtol: float


@dataclass(frozen=True)
class LayerCheck:
    """The measured difference between an FC layer and its conv, on the same seeded inputs.

    ``max_abs_error`` covers both the traced-size maps and the sliding-window map;
    ``max_rel_error`` is it divided by the largest reference output (the output's scale).
    """

    name: str
    became: str
    dtype: str
    old_shape: tuple[int, ...]
    new_shape: tuple[int, ...]
    parameters: int
    max_abs_error: float
    max_rel_error: float
    window_max_abs_error: float
    window_grid: tuple[int, int]
    reference_scale: float
    tolerance: Tolerance
    rows_checked: int = 0
    nonfinite: bool = False
    exact: bool | None = None
    problem: str | None = None
    strict: bool = False
    flatten_order: FlattenOrder = "chw"
    pointwise: bool = False
    # What computed the conv: torch's conv2d, or its definition in numpy from the files' bytes (a kernel
    # proven to be its weight's bytes: fc2conv.array_check).
    engine: Literal["torch", "numpy"] = "torch"

    @property
    def ok(self) -> bool:
        """Within tolerance. Non-finite outputs pass where FC and conv agree on them, unless ``strict``."""
        if self.problem is not None or (self.strict and self.nonfinite):
            return False
        return self.max_abs_error <= self.bound

    @property
    def bound(self) -> float:
        """The largest error that passes: ``atol + rtol * max|reference output|``."""
        return self.tolerance.atol + self.tolerance.rtol * self.reference_scale

    @property
    def failure(self) -> str | None:
        """Why the layer failed, in one phrase naming the numbers; None when it passed."""
        if self.problem is not None:
            return self.problem
        if self.strict and self.nonfinite:
            return "non-finite (NaN/Inf) weights or outputs, refused as strict"
        if not self.ok:
            return (
                f"max abs error {self.max_abs_error:.3g} > {self.bound:.3g} allowed ({self.dtype}: atol "
                f"{self.tolerance.atol:g} + rtol {self.tolerance.rtol:g} x max|output| {self.reference_scale:.3g})"
            )
        return None

    @property
    def proves(self) -> str:
        """What a pass proves, exactly: the conv computes the FC on inputs flattened in this order."""
        conv = f"conv ({self.dtype}{', numpy' if self.engine == 'numpy' else ''})"
        if self.pointwise:
            return f"1x1 {conv} = Linear (float64) on each of {self.window_grid[1]} positions"
        grid = "x".join(map(str, self.window_grid))
        on = "" if self.new_shape[2:] == (1, 1) else f" on the map flattened {self.flatten_order}"
        return f"{conv} = FC (float64){on}, traced size + {grid} sliding positions"


@dataclass(frozen=True)
class ModuleConversion:
    """What :func:`fc2conv.convert_module` changed: the flatten it removed and each Linear it replaced."""

    input_shape: InputShape  # one network input (C, H, W) the model was traced at
    feature_shape: InputShape  # the map that was flattened (C, H, W) at the traced input size
    feature_node: str  # the graph node whose output is that map (the head reads it)
    changes: tuple[LayerChange, ...]
    folded: tuple[str, ...]  # Linear layers whose following BatchNorm was folded into them
    removed: tuple[str, ...]  # nodes removed: the flatten, identity adaptive pools, folded BatchNorms
    notes: tuple[str, ...]


@dataclass(frozen=True)
class ModuleCheck:
    """Original model vs converted model, both as float64 copies, on the same seeded inputs.

    ``max_abs_error`` is at the traced input size (the converted output is (N, K, 1, 1));
    ``dense_max_abs_error`` is on a larger input, where each output position must equal the
    original head on its window of the feature map.
    """

    max_abs_error: float
    max_rel_error: float
    dense_max_abs_error: float
    dense_max_rel_error: float
    dense_grid: tuple[int, int]
    positions_checked: int
    tolerance: Tolerance
    reference_scale: float = 0.0  # the largest original output at the traced size
    dense_reference_scale: float = 0.0  # the largest original head output on the windows checked
    problem: str | None = None  # why the check could not run (then it fails)
    how: str = ""  # what was run against what, in a sentence
    dtype: str = "float64"  # what the models ran in

    @property
    def ok(self) -> bool:
        """Both errors within ``atol + rtol * max|output|`` (the outputs' scale where each was measured)."""
        return self.failure is None

    @property
    def failure(self) -> str | None:
        """Why the end-to-end check failed, naming the numbers; None when it passed."""
        if self.problem is not None:
            return self.problem
        atol, rtol = self.tolerance.atol, self.tolerance.rtol
        for what, error, scale in (
            ("at the traced size", self.max_abs_error, self.reference_scale),
            ("densely", self.dense_max_abs_error, self.dense_reference_scale),
        ):
            if not error <= atol + rtol * scale:
                return (
                    f"max abs error {what} {error:.3g} > {atol + rtol * scale:.3g} allowed "
                    f"(atol {atol:g} + rtol {rtol:g} x max|output| {scale:.3g})"
                )
        return None


ExportKind = Literal["torch.export", "onnx", "keras"]


@dataclass(frozen=True)
class Export:
    """A model file written by an export (torch.export or ONNX), with its measured error if it was run."""

    kind: ExportKind
    path: Path
    max_abs_error: float | None  # vs the converted model (or the original, for keras); None if not run
    tolerance: float = 1e-4
    written: bool = True  # an export that fails its check before it is renamed into place is not written

    @property
    def ok(self) -> bool:
        return self.max_abs_error is None or self.max_abs_error <= self.tolerance

    @property
    def failure(self) -> str | None:
        if self.ok:
            return None
        error = f"{self.max_abs_error:.3g} > {self.tolerance:.3g}"
        against = "the original in Keras" if self.kind == "keras" else "torch"
        kept = "" if self.written else "; not written"
        return f"{self.kind} file {self.path.name}: max abs error {error} against {against}{kept}"


@dataclass(frozen=True)
class Evidence:
    """What a head's first FC weight says of the map it reads: the order in use, and the map if inferred.

    Evidence, not proof (see :mod:`fc2conv.evidence`): only a "clear" verdict against what is in use
    gives a warning.
    """

    layer: str
    order_in_use: FlattenOrder
    map_in_use: InputShape
    order: OrderEvidence
    geometry: GeometryEvidence | None = None  # measured when the map was inferred, not given

    @property
    def warnings(self) -> list[str]:
        from fc2conv.evidence import order_warning

        found = []
        order = order_warning(self.order, self.order_in_use)
        if order is not None:
            found.append(f"{self.layer}: {order}")
        favoured = self.geometry.favoured if self.geometry is not None else None
        if self.geometry is not None and favoured is not None and favoured != self.map_in_use:
            found.append(
                f"{self.layer}: the inferred map {self.map_in_use} is in use, but {self.geometry.explanation}; "
                f"give the map's shape if it is {favoured}"
            )
        return found


@dataclass(frozen=True)
class ConvertResult:
    """What ``convert`` did: the plan, the measured checks, and where the output went."""

    input: Path
    output: Path
    plan: Plan
    checks: tuple[LayerCheck, ...]
    load_notes: tuple[str, ...]
    output_bytes: int
    written: bool
    seconds: float
    shards: int = 0  # number of shard files written (0: a single file)
    end_to_end: ModuleCheck | None = None  # with a model: original model vs converted model
    exports: tuple[Export, ...] = ()  # exported programs / ONNX files written
    model_input_shape: InputShape | None = None  # with a model: the network input it was traced at
    evidence: Evidence | None = None  # with weights alone: what they say of the flatten order and map
    strict: bool = False  # evidence against the order or map in use fails the conversion

    @property
    def ok(self) -> bool:
        checks_ok = all(c.ok for c in self.checks) and (self.end_to_end is None or self.end_to_end.ok)
        refused = self.strict and self.warnings
        return self.written and checks_ok and all(e.ok for e in self.exports) and not refused

    @property
    def warnings(self) -> list[str]:
        """The evidence against the flatten order or the map in use, one line each."""
        return self.evidence.warnings if self.evidence is not None else []

    @property
    def failures(self) -> list[str]:
        """Each failed check as ``"<layer>: <why>"``."""
        found = [f"{c.name}: {c.failure}" for c in self.checks if c.failure]
        if self.end_to_end is not None and self.end_to_end.failure:
            found.append(f"end to end: {self.end_to_end.failure}")
        if self.strict:
            found += [f"evidence (strict): {w}" for w in self.warnings]
        return found + [e.failure for e in self.exports if e.failure]


@dataclass(frozen=True)
class InspectResult:
    """What a checkpoint holds, and what ``convert`` would do with it."""

    path: Path
    format: str
    layers: tuple[Layer, ...]
    infos: tuple[TensorInfo, ...]
    notes: tuple[str, ...]
    metadata: dict[str, str]
    plan: Plan | None
    plan_problem: str | None
    evidence: Evidence | None = None  # asked for: what the first head's weights say of its map

    @property
    def warnings(self) -> list[str]:
        return self.evidence.warnings if self.evidence is not None else []

    @property
    def parameters(self) -> int:
        return sum(t.numel for t in self.infos)

    @property
    def nbytes(self) -> int:
        return sum(t.numel * dtype_itemsize(t.dtype) for t in self.infos)


@dataclass(frozen=True)
class TensorMismatch:
    """A tensor that should be identical in both files but is not, or is only in one."""

    name: str
    reason: str


@dataclass(frozen=True)
class VerifyResult:
    """Per-layer numeric checks plus the bit-for-bit comparison of every other tensor."""

    original: Path
    converted: Path
    input_shape: InputShape | None
    flatten_order: FlattenOrder
    checks: tuple[LayerCheck, ...]
    identical: int
    mismatches: tuple[TensorMismatch, ...]
    notes: tuple[str, ...] = field(default=())
    end_to_end: ModuleCheck | None = None  # with a model: original model vs converted model
    evidence: Evidence | None = None  # with weights alone: what they say of the recorded flatten order
    strict: bool = False

    @property
    def warnings(self) -> list[str]:
        """The evidence against the recorded flatten order, one line each."""
        return self.evidence.warnings if self.evidence is not None else []

    @property
    def ok(self) -> bool:
        if self.strict and self.warnings:
            return False
        if self.end_to_end is not None and not self.checks and not self.mismatches:
            return self.end_to_end.ok  # checked end to end only (see notes)
        end_to_end_ok = self.end_to_end is None or self.end_to_end.ok
        return bool(self.checks) and not self.mismatches and all(c.ok for c in self.checks) and end_to_end_ok

    @property
    def failures(self) -> list[str]:
        """Each failed check as ``"<layer or tensor>: <why>"``."""
        found = [f"{c.name}: {c.failure}" for c in self.checks if c.failure]
        found += [f"{m.name}: {m.reason}" for m in self.mismatches]
        if self.end_to_end is not None and self.end_to_end.failure:
            found.append(f"end to end: {self.end_to_end.failure}")
        if not self.checks and self.end_to_end is None:
            found.append("no converted layer found in the converted file")
        if self.strict:
            found += [f"evidence (strict): {w}" for w in self.warnings]
        return found
