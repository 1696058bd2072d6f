"""JSON payloads and stderr warnings built from result dataclasses (no rich: --json stays light)."""

from __future__ import annotations

import math
from typing import Any

from fc2conv._version import __version__
from fc2conv.plan import Plan
from fc2conv.results import ConvertResult, Evidence, InspectResult, LayerCheck, ModuleCheck, VerifyResult

__all__ = ["convert_json", "inspect_json", "verify_json", "warnings_for"]


def _json_float(value: float) -> float | None:
    """JSON has no inf/nan: they become null (and the layer's ``ok`` is false)."""
    return value if math.isfinite(value) else None


def _plan_json(plan: Plan) -> dict[str, Any]:
    return {
        "mode": plan.mode,
        "input_shape": plan.input_shape.as_list() if plan.input_shape else None,
        "flatten_order": plan.flatten_order,
        "flatten_order_origin": plan.flatten_order_origin or None,
        "notes": list(plan.notes),
    }


def _check_json(check: LayerCheck) -> dict[str, Any]:
    return {
        "name": check.name,
        "became": check.became,
        "dtype": check.dtype,
        "old_shape": list(check.old_shape),
        "new_shape": list(check.new_shape),
        "parameters": check.parameters,
        "max_abs_error": _json_float(check.max_abs_error),
        "max_rel_error": _json_float(check.max_rel_error),
        "window_max_abs_error": _json_float(check.window_max_abs_error),
        "window_grid": list(check.window_grid),
        "rows_checked": check.rows_checked,
        "atol": check.tolerance.atol,
        "rtol": check.tolerance.rtol,
        "nonfinite": check.nonfinite,
        "exact": check.exact,
        "proves": check.proves,
        "problem": check.failure,
        "ok": check.ok,
    }


def convert_json(result: ConvertResult) -> dict[str, Any]:
    return {
        "ok": result.ok,
        "problem": "; ".join(result.failures) or None,
        "command": "convert",
        "version": __version__,
        "input": str(result.input),
        "output": str(result.output),
        "written": result.written,
        "output_bytes": result.output_bytes,
        "shards": result.shards,
        **_plan_json(result.plan),
        "load_notes": list(result.load_notes),
        "layers": [_check_json(c) for c in result.checks],
        "skipped_layers": _skipped_json(result.plan),
        "untouched": list(result.plan.untouched),
        "seconds": round(result.seconds, 4),
        "model_input_shape": result.model_input_shape.as_list() if result.model_input_shape else None,
        "end_to_end": _module_check_json(result.end_to_end),
        "evidence": _evidence_json(result.evidence),
        "exports": [
            {"kind": e.kind, "path": str(e.path), "max_abs_error": e.max_abs_error, "ok": e.ok} for e in result.exports
        ],
    }


def _skipped_json(plan: Plan | None) -> list[dict[str, Any]]:
    if plan is None:
        return []
    return [{"name": s.name, "shape": list(s.shape), "reason": s.reason} for s in plan.skipped]


def _module_check_json(check: ModuleCheck | None) -> dict[str, Any] | None:
    if check is None:
        return None
    return {
        "max_abs_error": _json_float(check.max_abs_error),
        "max_rel_error": _json_float(check.max_rel_error),
        "dense_max_abs_error": _json_float(check.dense_max_abs_error),
        "dense_max_rel_error": _json_float(check.dense_max_rel_error),
        "dense_grid": list(check.dense_grid),
        "positions_checked": check.positions_checked,
        "atol": check.tolerance.atol,
        "rtol": check.tolerance.rtol,
        "problem": check.failure,
        "how": check.how,
        "ok": check.ok,
    }


def warnings_for(result: ConvertResult | VerifyResult | InspectResult) -> list[str]:
    """Lines for stderr about what converts but deserves attention: non-finite weights, evidence against the order."""
    checks = getattr(result, "checks", ())
    nonfinite = [
        f"{c.name} has non-finite (NaN/Inf) weights or outputs; converted as they are" for c in checks if c.nonfinite
    ]
    return nonfinite + result.warnings


def _evidence_json(evidence: Evidence | None) -> dict[str, Any] | None:
    if evidence is None:
        return None
    order, geometry = evidence.order, evidence.geometry
    return {
        "layer": evidence.layer,
        "order_in_use": evidence.order_in_use,
        "map_in_use": evidence.map_in_use.as_list(),
        "order": {
            "strength": order.strength, "favoured": order.favoured, "leaning": order.leaning,
            "margin": _json_float(order.margin), "variance_margin": _json_float(order.variance_margin),
            "rows": order.rows, "explanation": order.explanation,
        },
        "geometry": None if geometry is None else {
            "strength": geometry.strength, "favoured": geometry.favoured.as_list() if geometry.favoured else None,
            "explanation": geometry.explanation,
        },
        "warnings": evidence.warnings,
    }  # fmt: skip


def inspect_json(result: InspectResult) -> dict[str, Any]:
    plan = result.plan
    return {
        "ok": True,
        "command": "inspect",
        "version": __version__,
        "path": str(result.path),
        "format": result.format,
        "notes": list(result.notes),
        "metadata": result.metadata,
        "layers": [
            {
                "name": layer.name,
                "kind": layer.kind,
                "parameters": layer.parameters,
                "tensors": [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype} for t in layer.tensors],
            }
            for layer in result.layers
        ],
        "chain": [
            {"name": c.name, "became": c.became, "old_shape": list(c.old_shape), "new_shape": list(c.new_shape)}
            for c in plan.layers
        ]
        if plan
        else [],
        "input_shape": plan.input_shape.as_list() if plan and plan.input_shape else None,
        "flatten_order": plan.flatten_order if plan else None,
        "plan_notes": list(plan.notes) if plan else [],
        "skipped_layers": _skipped_json(plan),
        "plan_problem": result.plan_problem,
        "evidence": _evidence_json(result.evidence),
        "totals": {"tensors": len(result.infos), "parameters": result.parameters, "bytes": result.nbytes},
    }


def verify_json(result: VerifyResult) -> dict[str, Any]:
    return {
        "ok": result.ok,
        "problem": "; ".join(result.failures) or None,
        "command": "verify",
        "version": __version__,
        "original": str(result.original),
        "converted": str(result.converted),
        "input_shape": result.input_shape.as_list() if result.input_shape else None,
        "flatten_order": result.flatten_order,
        "layers": [_check_json(c) for c in result.checks],
        "identical_tensors": result.identical,
        "mismatches": [{"name": m.name, "reason": m.reason} for m in result.mismatches],
        "notes": list(result.notes),
        "evidence": _evidence_json(result.evidence),
        "end_to_end": _module_check_json(result.end_to_end),
    }
