"""fc2conv: turn a network's fully connected layers into convolutions, with the error measured.

The library is pure: state dict in, state dict out. Importing it does not import torch; the
functions that need torch import it when called.
"""

from fc2conv._version import __version__
from fc2conv.check import DEFAULT_TOLERANCES, LayerCheck, Tolerance, check_changes, check_layer
from fc2conv.convert import apply_plan, convert_state_dict, fc_to_conv_weight, tensor_infos
from fc2conv.errors import (
    CheckFailedError,
    CheckpointError,
    Fc2ConvError,
    OutputError,
    PlanError,
    ShapeError,
)
from fc2conv.io import load_checkpoint, read_tensor_infos, save_safetensors
from fc2conv.jobs import convert_file, inspect_file, verify_files
from fc2conv.module import (
    ModuleCheck,
    ModuleConversion,
    check_module,
    conversion_of,
    convert_module,
    export_onnx,
    export_program,
)
from fc2conv.plan import LayerChange, Plan, TensorInfo, plan_conversion, plan_pointwise
from fc2conv.shapes import InputShape, ShapeSpec, parse_shape

__all__ = [
    "DEFAULT_TOLERANCES",
    "CheckFailedError",
    "CheckpointError",
    "Fc2ConvError",
    "InputShape",
    "LayerCheck",
    "LayerChange",
    "ModuleCheck",
    "ModuleConversion",
    "OutputError",
    "Plan",
    "PlanError",
    "ShapeError",
    "ShapeSpec",
    "TensorInfo",
    "Tolerance",
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
    "load_checkpoint",
    "parse_shape",
    "plan_conversion",
    "plan_pointwise",
    "read_tensor_infos",
    "save_safetensors",
    "tensor_infos",
    "verify_files",
]
