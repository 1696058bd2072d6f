"""fc2conv: turn a network's fully connected layers into convolutions, with the error measured.

The library is pure: state dict in, state dict out. Importing it does not import torch; the
functions that need torch import it when called.
"""

import os as _os
import sys as _sys

# `python -m fc2conv` puts the current folder first on the module path, so a rich.py, typing.py or
# torch.py there would be imported (and run) in place of the real module. This package is imported by
# then, before anything else of it: drop that entry before any other import (os and sys are loaded at
# start-up). Only under -m: a script keeps its path.
if _sys.argv[:1] == ["-m"] and _sys.path and _sys.path[0] in ("", _os.getcwd()):
    del _sys.path[0]

import importlib  # noqa: E402 - after the module path is made safe
from typing import TYPE_CHECKING, Any  # noqa: E402

from fc2conv._version import __version__

# The public API, imported when first used (PEP 562): `import fc2conv` and the command line's start-up
# stay fast, and what is not used is never loaded.
_LAZY = {
    "CheckpointError": "fc2conv.errors",
    "ConvertResult": "fc2conv.results",
    "DEFAULT_TOLERANCES": "fc2conv.check",
    "DependencyError": "fc2conv.errors",
    "Fc2ConvError": "fc2conv.errors",
    "InputShape": "fc2conv.types",
    "InspectResult": "fc2conv.results",
    "LayerChange": "fc2conv.plan",
    "LayerCheck": "fc2conv.results",
    "Listing": "fc2conv.formats",
    "ModelError": "fc2conv.errors",
    "ModuleCheck": "fc2conv.results",
    "ModuleConversion": "fc2conv.results",
    "OutputError": "fc2conv.errors",
    "Plan": "fc2conv.plan",
    "PlanError": "fc2conv.errors",
    "ShapeError": "fc2conv.errors",
    "ShapeSpec": "fc2conv.types",
    "Source": "fc2conv.formats",
    "TensorInfo": "fc2conv.types",
    "Tolerance": "fc2conv.results",
    "VerifyResult": "fc2conv.results",
    "apply_plan": "fc2conv.convert",
    "check_changes": "fc2conv.check",
    "check_layer": "fc2conv.check",
    "check_module": "fc2conv.graph",
    "conversion_of": "fc2conv.graph",
    "convert_file": "fc2conv.jobs",
    "convert_module": "fc2conv.graph",
    "convert_state_dict": "fc2conv.convert",
    "export_onnx": "fc2conv.graph",
    "export_program": "fc2conv.graph",
    "fc_to_conv_weight": "fc2conv.convert",
    "inspect_file": "fc2conv.jobs",
    "open_source": "fc2conv.formats",
    "parse_shape": "fc2conv.shapes",
    "plan_conversion": "fc2conv.plan",
    "plan_pointwise": "fc2conv.plan",
    "read_listing": "fc2conv.formats",
    "save_safetensors": "fc2conv.publish",
    "tensor_infos": "fc2conv.types",
    "verify_files": "fc2conv.jobs",
}

if TYPE_CHECKING:  # for type checkers and editors: the names as they are
    from fc2conv.check import DEFAULT_TOLERANCES, check_changes, check_layer
    from fc2conv.convert import apply_plan, convert_state_dict, fc_to_conv_weight
    from fc2conv.errors import (
        CheckpointError,
        DependencyError,
        Fc2ConvError,
        ModelError,
        OutputError,
        PlanError,
        ShapeError,
    )
    from fc2conv.formats import Listing, Source, open_source, read_listing
    from fc2conv.graph import check_module, conversion_of, convert_module, export_onnx, export_program
    from fc2conv.jobs import convert_file, inspect_file, verify_files
    from fc2conv.plan import LayerChange, Plan, plan_conversion, plan_pointwise
    from fc2conv.publish import save_safetensors
    from fc2conv.results import (
        ConvertResult,
        InspectResult,
        LayerCheck,
        ModuleCheck,
        ModuleConversion,
        Tolerance,
        VerifyResult,
    )
    from fc2conv.shapes import parse_shape
    from fc2conv.types import InputShape, ShapeSpec, TensorInfo, tensor_infos

__all__ = [
    "DEFAULT_TOLERANCES",
    "CheckpointError",
    "ConvertResult",
    "DependencyError",
    "Fc2ConvError",
    "InputShape",
    "InspectResult",
    "LayerCheck",
    "LayerChange",
    "Listing",
    "ModelError",
    "ModuleCheck",
    "ModuleConversion",
    "OutputError",
    "Plan",
    "PlanError",
    "ShapeError",
    "ShapeSpec",
    "Source",
    "TensorInfo",
    "Tolerance",
    "VerifyResult",
    "__version__",
    "apply_plan",
    "check_changes",
    "check_layer",
    "check_module",
    "conversion_of",
    "convert_file",
    "convert_module",
    "convert_state_dict",
    "export_onnx",
    "export_program",
    "fc_to_conv_weight",
    "inspect_file",
    "open_source",
    "parse_shape",
    "plan_conversion",
    "plan_pointwise",
    "read_listing",
    "save_safetensors",
    "tensor_infos",
    "verify_files",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fc2conv' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups do not come back here
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
