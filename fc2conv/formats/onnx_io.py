"""ONNX files in and out: a model loaded and validated, its initializers as torch tensors and back, a model written.

External data is read only from files inside the model's folder; a model past protobuf's 2 GB limit is
refused whole, since the checker, shape inference and ONNX Runtime all need it in one message.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fc2conv.errors import CheckpointError, DependencyError, OutputError, PlanError
from fc2conv.types import TensorInfo

if TYPE_CHECKING:
    import onnx
    import torch

__all__ = [
    "MAX_MODEL_BYTES",
    "OnnxTensors",
    "dtype_name_of",
    "first_line",
    "import_onnx",
    "initializer_infos",
    "load_onnx_model",
    "onnx_bytes",
    "to_proto",
    "to_torch",
    "write_onnx",
]

# protobuf refuses a message of 2 GB or more: a model this large would need its weights as external data.
MAX_MODEL_BYTES = 2**31

# fc2conv's dtype spelling (torch's names) for ONNX element types.
_DTYPE_NAMES = {
    1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64", 8: "string",
    9: "bool", 10: "float16", 11: "float64", 12: "uint32", 13: "uint64", 14: "complex64", 15: "complex128",
    16: "bfloat16", 17: "float8_e4m3fn", 18: "float8_e4m3fnuz", 19: "float8_e5m2", 20: "float8_e5m2fnuz",
}  # fmt: skip


def import_onnx() -> Any:
    """The ``onnx`` package, or a :class:`DependencyError` naming the extra that installs it."""
    try:
        import onnx
    except ImportError as exc:
        raise DependencyError(f"reading ONNX files needs the onnx extra ({exc.name} is missing)", extra="onnx") from exc
    return onnx


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (onnx's are often pages long), else its type."""
    text = str(exc).strip()
    return next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)


# --- loading ------------------------------------------------------------------------------------


def load_onnx_model(path: str | Path) -> onnx.ModelProto:
    """Load and validate an ONNX model; external data is read only from files inside the model's folder.

    Args:
        path: The ``.onnx`` file.

    Returns:
        The model, external tensors loaded inline, having passed ``onnx.checker.check_model``.

    Raises:
        CheckpointError: missing, corrupt or truncated file, invalid model, or external data that
            resolves outside the model's folder (the side file is named and not read).
        PlanError: the model and its external data are past protobuf's 2 GB limit.
    """
    onnx = import_onnx()
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty, not an ONNX model")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (_protobuf_decode_error(), ValueError, UnicodeDecodeError, RuntimeError) as exc:
        raise CheckpointError(f"{path} is not a readable ONNX model (corrupt or truncated): {first_line(exc)}") from exc
    total = path.stat().st_size + sum(f.stat().st_size for f in _side_files(model, path))
    if total >= MAX_MODEL_BYTES:
        raise PlanError(
            f"{path.name} holds {total / 2**30:.1f} GB with its external data: past protobuf's 2 GB limit, within "
            f"which the checker, shape inference and ONNX Runtime need the model"
        )
    _load_external_data(model, path)
    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a valid ONNX model: {first_line(exc)}") from exc
    if not model.graph.node:
        raise CheckpointError(f"{path} is not a valid ONNX model: its graph has no nodes (corrupt or truncated)")
    return model


def _protobuf_decode_error() -> type[Exception]:
    """protobuf's ``DecodeError`` (what a corrupt file raises), imported by name: protobuf ships no type stubs."""
    decode_error: type[Exception] = importlib.import_module("google.protobuf.message").DecodeError
    return decode_error


def _side_files(model: onnx.ModelProto, path: Path) -> set[Path]:
    """The external data files of the initializers, refusing any that does not resolve inside the model's folder.

    The initializers are checked here, with a message naming the file; onnx's own loader checks
    every tensor again (relative path, inside the folder, no symbolic link, a regular file).
    """
    from onnx import external_data_helper

    folder = path.resolve().parent
    side_files: set[Path] = set()
    for tensor in model.graph.initializer:
        if not external_data_helper.uses_external_data(tensor):
            continue
        location = external_data_helper.ExternalDataInfo(tensor).location
        target = (folder / location).resolve()
        if Path(location).is_absolute() or not target.is_relative_to(folder):
            raise CheckpointError(
                f"{path.name}: external data of tensor {tensor.name!r} is {location!r}, outside the model's "
                f"folder {folder}: refused (not read)"
            )
        if not target.is_file():
            raise CheckpointError(f"{path.name}: external data of tensor {tensor.name!r}, {target}, is missing")
        side_files.add(target)
    return side_files


def _load_external_data(model: onnx.ModelProto, path: Path) -> None:
    """Read the external tensors into ``model`` (their files checked by :func:`_side_files`)."""
    from onnx import external_data_helper

    try:
        external_data_helper.load_external_data_for_model(model, str(path.resolve().parent))
    except Exception as exc:  # onnx raises ValidationError, ValueError or OSError for bad side files
        raise CheckpointError(f"{path.name}: external data refused: {first_line(exc)}") from exc


# --- tensors ------------------------------------------------------------------------------------


def dtype_name_of(elem_type: int) -> str:
    """ONNX element type -> fc2conv's dtype spelling (``1`` -> ``"float32"``)."""
    return _DTYPE_NAMES.get(elem_type, f"onnx_type_{elem_type}")


def to_torch(proto: onnx.TensorProto) -> torch.Tensor:
    """An initializer as a torch tensor, through ``onnx.numpy_helper`` (bfloat16 and float8 by bit view)."""
    import numpy as np
    import torch
    from onnx import numpy_helper

    array = numpy_helper.to_array(proto)  # a fresh array, read-only when made from the raw bytes
    special = {"bfloat16": (np.uint16, torch.bfloat16), "float8_e4m3fn": (np.uint8, torch.float8_e4m3fn),
               "float8_e5m2": (np.uint8, torch.float8_e5m2)}  # fmt: skip
    if array.dtype.name in special:
        bits, dtype = special[array.dtype.name]
        return torch.from_numpy(np.ascontiguousarray(array).view(bits)).view(dtype)
    try:
        with warnings.catch_warnings():
            # Nothing in fc2conv writes to a tensor it reads: no second copy just to make it writable.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return torch.from_numpy(array)
    except TypeError as exc:
        raise PlanError(f"tensor {proto.name!r} ({array.dtype}) cannot be read as a torch tensor") from exc


def to_proto(tensor: torch.Tensor, name: str) -> onnx.TensorProto:
    """A torch tensor as an initializer named ``name``, through ``onnx.numpy_helper``."""
    import torch
    from onnx import numpy_helper

    tensor = tensor.detach().contiguous()
    if tensor.dtype == torch.bfloat16:
        import ml_dtypes

        array = tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    else:
        array = tensor.numpy()
    return numpy_helper.from_array(array, name)


class OnnxTensors(Mapping[str, "torch.Tensor"]):
    """Initializer name -> torch tensor, converted when asked for (nothing is copied up front)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self._protos = {t.name: t for t in model.graph.initializer}

    def __getitem__(self, name: str) -> torch.Tensor:
        return to_torch(self._protos[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._protos)

    def __len__(self) -> int:
        return len(self._protos)


def initializer_infos(model: onnx.ModelProto) -> tuple[TensorInfo, ...]:
    """Every initializer as a :class:`TensorInfo` (names as in the graph)."""
    return tuple(
        TensorInfo(t.name, tuple(int(d) for d in t.dims), dtype_name_of(t.data_type)) for t in model.graph.initializer
    )


# --- writing ------------------------------------------------------------------------------------


def onnx_bytes(model: onnx.ModelProto) -> bytes:
    """The serialised model, refusing one past protobuf's 2 GB limit (it would need external data)."""
    try:
        data = model.SerializeToString()
    except ValueError as exc:  # protobuf refuses to serialise a message past 2 GB
        raise OutputError(f"the converted model is past the 2 GB limit of one ONNX file: {first_line(exc)}") from exc
    if len(data) >= MAX_MODEL_BYTES:
        raise OutputError(f"the converted model is {len(data) / 2**30:.1f} GB, past the 2 GB limit of one ONNX file")
    return data


def write_onnx(model: onnx.ModelProto, path: str | Path) -> int:
    """Write ``model`` to ``path`` (a temporary file the caller publishes), re-read it and check it.

    Returns:
        The number of bytes written.

    Raises:
        OutputError: the model is too large for one file, or the file does not read back the same.
    """
    onnx = import_onnx()
    data = onnx_bytes(model)
    path = Path(path)
    with open(path, "wb") as f:
        f.write(data)
    reread = path.read_bytes()
    if reread != data:
        raise OutputError(f"{path} does not read back as written")
    try:
        onnx.checker.check_model(onnx.load_model_from_string(reread))
    except Exception as exc:
        raise OutputError(f"{path} does not read back as a valid ONNX model: {first_line(exc)}") from exc
    return len(data)
