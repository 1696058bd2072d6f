"""Converting a model, not only its weights: the torch.fx rewrite, its end-to-end proof, and the exports."""

from __future__ import annotations

from fc2conv.graph.export import export_onnx, export_program, onnx_error, program_error
from fc2conv.graph.model_check import check_module
from fc2conv.graph.rewrite import conversion_of, convert_module

__all__ = ["check_module", "conversion_of", "convert_module", "export_onnx", "export_program", "onnx_error",
           "program_error"]  # fmt: skip
