"""fc2conv: turn a network's fully connected layers into convolutions, with the error measured.

The library is pure: state dict in, state dict out. Importing it does not import torch; the
functions that need torch import it when called.
"""

import os as _os
import sys as _sys

# `python -m fc2conv` puts the current folder first on the module path, so a rich.py, json.py or
# torch.py there would be imported (and run) in place of the real module. This package is imported by
# then, before anything else of it: drop that entry first. (Only under -m: a script keeps its path.)
if _sys.argv[:1] == ["-m"] and _sys.path and _sys.path[0] in ("", _os.getcwd()):
    del _sys.path[0]

from fc2conv._version import __version__
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
