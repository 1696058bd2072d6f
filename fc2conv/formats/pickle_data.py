"""A data-only reader of the pickles in PyTorch checkpoints: torch's weights-only rules, nothing ever executed.

The reader knows the opcodes that torch's weights-only unpickler knows (protocol 2, as ``torch.save``
writes) and no others. It never imports or calls anything a pickle names: a ``GLOBAL`` is a name; a
call (``REDUCE``, ``NEWOBJ``) of a name it models (an ``OrderedDict``, ``torch._utils._rebuild_tensor_v2``,
a storage type, a dtype, ...) becomes plain data (a dict, a :class:`TensorRef` to bytes of the file);
a call of any other name becomes :class:`Opaque`, and the file is then left to torch's own weights-only
loader, which refuses what it refuses. Before that, the whole pickle is read here, and constructs that
would make torch allocate memory that the file does not hold are refused (:class:`Refused`): a
``bytearray`` of a declared size, a tensor built from sizes (``torch.Tensor(8192, 32768)``) or with no
storage, a storage larger than the bytes behind it. Every read is bounded by what is left of the
stream, so a declared length cannot make this reader allocate either.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

__all__ = [
    "MAX_PICKLE_BYTES",
    "BoundedReader",
    "Opaque",
    "PickleData",
    "Refused",
    "StorageRef",
    "TensorRef",
    "read_pickle",
]

# A checkpoint's pickle holds names and shapes, not weights: a few hundred bytes per tensor. Larger ones
# are refused rather than read (torch would hold the whole record in memory).
MAX_PICKLE_BYTES = 64 * 2**20
# A bytearray of a declared size is zeros that the file does not hold; tiny ones are harmless.
_MAX_BYTEARRAY = 2**16

# Storage types of torch.save, by the dtype of their elements (fc2conv's dtype names).
STORAGE_DTYPES = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16", "BFloat16Storage": "bfloat16",
    "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16", "CharStorage": "int8",
    "ByteStorage": "uint8", "BoolStorage": "bool", "ComplexFloatStorage": "complex64", "UntypedStorage": "uint8",
}  # fmt: skip
_DTYPE_NAMES = {
    "float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool", "complex64",
    "uint16", "uint32", "uint64", "float8_e4m3fn", "float8_e5m2",
}  # fmt: skip
_NO_DATA_REBUILDS = {"_rebuild_meta_tensor_no_storage", "_rebuild_wrapper_subclass"}
_NOT_DENSE_REBUILDS = {"_rebuild_sparse_tensor", "_rebuild_nested_tensor"}


class Refused(Exception):
    """The pickle would make torch allocate what the file does not hold; the message says what."""


class Truncated(Exception):
    """The stream ended, or an opcode is unknown: torch's reader stops here too."""


@dataclass(frozen=True)
class Opaque:
    """The result of something this reader does not model (torch decides about it)."""

    name: str


@dataclass(frozen=True, eq=False)
class StorageRef:
    """A storage named by a persistent id: ``('storage', type, key, location, numel)``."""

    key: str
    dtype: str
    numel: int


@dataclass(frozen=True, eq=False)
class TensorRef:
    """A dense tensor over a storage of the file: shape, strides and offset in elements of ``dtype``."""

    storage: StorageRef
    dtype: str
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def extent(self) -> int:
        """Elements of the storage the tensor reaches (offset + the furthest element + 1); 0 if empty."""
        if self.numel == 0:
            return 0
        return self.offset + 1 + sum((size - 1) * step for size, step in zip(self.shape, self.stride, strict=True))

    def is_contiguous(self) -> bool:
        expected = 1
        for size, step in reversed(list(zip(self.shape, self.stride, strict=True))):
            if size != 1 and step != expected:
                return False
            expected *= size
        return True


@dataclass
class PickleData:
    """What a pickle holds, as data: the object (with :class:`TensorRef` for tensors), and what was seen."""

    value: Any
    globals: list[str] = field(default_factory=list)
    opaque: list[str] = field(default_factory=list)  # names torch must decide about
    storages: dict[str, StorageRef] = field(default_factory=dict)

    @property
    def modelled(self) -> bool:
        """Whether everything in the pickle was understood here (torch is not needed to read it)."""
        return not self.opaque


class BoundedReader:
    """A stream that gives at most ``limit`` bytes, so no declared length can make a read allocate more."""

    def __init__(self, raw: IO[bytes], limit: int) -> None:
        self._raw = raw
        self.left = limit

    def read(self, size: int = -1) -> bytes:
        size = self.left if size is None or size < 0 else min(size, self.left)
        data = self._raw.read(size) if size else b""
        self.left -= len(data)
        return data

    def readline(self, size: int = -1) -> bytes:
        size = self.left if size is None or size < 0 else min(size, self.left)
        data = self._raw.readline(size) if size else b""
        self.left -= len(data)
        return data

    def exact(self, size: int) -> bytes:
        data = self.read(size)
        if len(data) != size:
            raise Truncated(f"the pickle ends {size - len(data)} bytes early")
        return data


def read_pickle(stream: BoundedReader, persistent: Callable[[tuple[Any, ...]], Any]) -> PickleData:
    """Read one pickle (up to its STOP) from ``stream`` as data; ``persistent`` resolves persistent ids.

    Raises:
        Refused: a construct that would make torch allocate memory the file does not hold.
        Truncated: the stream ended early, or holds an opcode torch's weights-only reader does not know.
    """
    return _Machine(stream, persistent).run()


@dataclass(frozen=True)
class _Global:
    name: str


class _Mark:
    pass


_MARK = _Mark()


class _Machine:
    """The pickle stack machine, restricted to torch's weights-only opcodes, building data only."""

    def __init__(self, stream: BoundedReader, persistent: Callable[[tuple[Any, ...]], Any]) -> None:
        self.stream = stream
        self.persistent = persistent
        self.stack: list[Any] = []
        self.memo: dict[int, Any] = {}
        self.data = PickleData(None)
        self.ops: dict[int, Callable[[], None]] = {
            0x80: lambda: None if self.stream.exact(1) else None, 0x63: self.op_global, 0x81: self.op_newobj,
            0x52: self.op_reduce,
            0x62: self.op_build, 0x61: self.op_append, 0x65: self.op_appends, 0x73: self.op_setitem,
            0x75: self.op_setitems, 0x28: lambda: self.stack.append(_MARK), 0x74: self.op_tuple,
            0x85: lambda: self.op_tuple_n(1), 0x86: lambda: self.op_tuple_n(2), 0x87: lambda: self.op_tuple_n(3),
            0x4E: lambda: self.stack.append(None), 0x89: lambda: self.stack.append(False),
            0x88: lambda: self.stack.append(True), 0x29: lambda: self.stack.append(()),
            0x5D: lambda: self.stack.append([]), 0x7D: lambda: self.stack.append({}),
            0x8F: lambda: self.stack.append(set()),
            0x4A: lambda: self.stack.append(struct.unpack("<i", self.stream.exact(4))[0]),
            0x4B: lambda: self.stack.append(self.stream.exact(1)[0]),
            0x4D: lambda: self.stack.append(struct.unpack("<H", self.stream.exact(2))[0]),
            0x47: lambda: self.stack.append(struct.unpack(">d", self.stream.exact(8))[0]),
            0x58: self.op_binunicode, 0x55: lambda: self.stack.append(self.stream.exact(self.stream.exact(1)[0])),
            0x51: self.op_binpersid, 0x68: lambda: self.op_get(1), 0x6A: lambda: self.op_get(4),
            0x71: lambda: self.op_put(1), 0x72: lambda: self.op_put(4), 0x8A: self.op_long1,
        }  # fmt: skip

    def run(self) -> PickleData:
        while True:
            key = self.stream.read(1)
            if not key:
                raise Truncated("the pickle ends before its STOP")
            if key[0] == 0x2E:  # STOP
                self.data.value = self.pop()
                return self.data
            op = self.ops.get(key[0])
            if op is None:
                raise Truncated(f"Unsupported operand {key[0]}")
            op()

    def pop(self) -> Any:
        if not self.stack:
            raise Truncated("the pickle pops an empty stack")
        return self.stack.pop()

    def pop_mark(self) -> list[Any]:
        for index in range(len(self.stack) - 1, -1, -1):
            if self.stack[index] is _MARK:
                items = self.stack[index + 1 :]
                del self.stack[index:]
                return items
        raise Truncated("the pickle has no MARK to pop to")

    def op_global(self) -> None:
        module = self.stream.readline()[:-1].decode("utf-8", "replace")
        name = self.stream.readline()[:-1].decode("utf-8", "replace")
        full = f"{module}.{name}"
        self.data.globals.append(full)
        self.stack.append(_Global(full))

    def op_binunicode(self) -> None:
        (length,) = struct.unpack("<I", self.stream.exact(4))
        try:
            self.stack.append(str(self.stream.exact(length), "utf-8", "surrogatepass"))
        except UnicodeDecodeError as exc:  # pickle's own reader fails here too
            raise Truncated(f"a string that is not UTF-8 ({exc.reason})") from None

    def op_long1(self) -> None:
        size = self.stream.exact(1)[0]
        self.stack.append(int.from_bytes(self.stream.exact(size), "little", signed=True))

    def op_get(self, width: int) -> None:
        index = self.stream.exact(1)[0] if width == 1 else struct.unpack("<I", self.stream.exact(4))[0]
        if index not in self.memo:
            raise Truncated(f"the pickle reads memo {index}, which was never stored")
        self.stack.append(self.memo[index])

    def op_put(self, width: int) -> None:
        index = self.stream.exact(1)[0] if width == 1 else struct.unpack("<I", self.stream.exact(4))[0]
        if not self.stack:
            raise Truncated("the pickle stores an empty stack")
        self.memo[index] = self.stack[-1]

    def op_tuple(self) -> None:
        self.stack.append(tuple(self.pop_mark()))

    def op_tuple_n(self, count: int) -> None:
        if len(self.stack) < count:
            raise Truncated("the pickle builds a tuple from an empty stack")
        items = tuple(self.stack[-count:])
        del self.stack[-count:]
        self.stack.append(items)

    def op_append(self) -> None:
        item = self.pop()
        if self.stack and isinstance(self.stack[-1], list):
            self.stack[-1].append(item)

    def op_appends(self) -> None:
        items = self.pop_mark()
        if self.stack and isinstance(self.stack[-1], list):
            self.stack[-1].extend(items)

    def op_setitem(self) -> None:
        value, key = self.pop(), self.pop()
        self._set_items([key, value])

    def op_setitems(self) -> None:
        self._set_items(self.pop_mark())

    def _set_items(self, items: list[Any]) -> None:
        target = self.stack[-1] if self.stack else None
        if not isinstance(target, dict):
            self.data.opaque.append("SETITEM on a non-dict")
            return
        for index in range(0, len(items) - 1, 2):
            try:
                target[items[index]] = items[index + 1]
            except TypeError:  # an unhashable key: torch's reader fails here too
                self.data.opaque.append("an unhashable dict key")

    def op_build(self) -> None:
        self.pop()  # the state: attributes (an OrderedDict's _metadata), which no tensor depends on
        if not self.stack:
            raise Truncated("the pickle builds on an empty stack")
        if not isinstance(self.stack[-1], dict):
            self.data.opaque.append("BUILD")

    def op_binpersid(self) -> None:
        pid = self.pop()
        if not isinstance(pid, tuple):
            self.data.opaque.append("a persistent id that is not a tuple")
            self.stack.append(Opaque("persistent id"))
            return
        resolved = self.persistent(pid)
        if isinstance(resolved, Opaque):
            self.data.opaque.append(resolved.name)
        elif isinstance(resolved, StorageRef):
            self.data.storages[resolved.key] = resolved
        self.stack.append(resolved)

    def op_reduce(self) -> None:
        args = self.pop()
        func = self.pop()
        self.stack.append(self.call(func, args if isinstance(args, tuple) else (args,)))

    def op_newobj(self) -> None:
        args = self.pop()
        cls = self.pop()
        self.stack.append(self.call(cls, args if isinstance(args, tuple) else (args,)))

    def call(self, func: Any, args: tuple[Any, ...]) -> Any:
        if not isinstance(func, _Global):
            self.data.opaque.append("a call of something that is not a global")
            return Opaque("call")
        _check_allocation(func.name, args)
        result = _call(func.name, args)
        if isinstance(result, Opaque):
            self.data.opaque.append(func.name)
        return result


def _is_tensor_class(name: str) -> bool:
    module, _, leaf = name.rpartition(".")
    return name in ("torch.Tensor", "torch._tensor.Tensor", "torch.nn.parameter.Parameter", "torch.nn.Parameter") or (
        module in ("torch", "torch.cuda", "torch.sparse", "torch.cuda.sparse") and leaf.endswith("Tensor")
    )


def _check_allocation(name: str, args: tuple[Any, ...]) -> None:
    """Refuse a call that would make torch allocate memory the file does not hold."""
    leaf = name.rpartition(".")[2]
    if name == "builtins.bytearray" and args:
        size = args[0]
        if not isinstance(size, (bytes, str, list, tuple)) and not (isinstance(size, int) and size <= _MAX_BYTEARRAY):
            raise Refused(f"builds a bytearray of {size if isinstance(size, int) else 'an unknown'} bytes")
    elif _is_tensor_class(name) and args and not (isinstance(args[0], TensorRef) and len(args) <= 2):
        raise Refused(f"builds a tensor with {name}(...) that is not backed by bytes of the file")
    elif name.startswith("torch._utils.") and leaf in _NO_DATA_REBUILDS:
        raise Refused(f"builds a tensor with no data in the file ({name})")
    elif name.startswith("torch._utils.") and leaf in _NOT_DENSE_REBUILDS:
        raise Refused(f"holds a sparse or nested tensor ({name}), which cannot be written as safetensors")


def _call(name: str, args: tuple[Any, ...]) -> Any:
    """The data a modelled call stands for (never a call), or :class:`Opaque`."""
    handler = _HANDLERS.get(name)
    if handler is None:
        return Opaque(name)
    try:
        return handler(args)
    except (TypeError, ValueError, IndexError):
        return Opaque(name)  # arguments of an unexpected form: let torch judge them


def _ordered_dict(args: tuple[Any, ...]) -> dict[Any, Any]:
    return dict(args[0]) if args else {}


def _rebuild_tensor(args: tuple[Any, ...], dtype: str | None = None) -> Any:
    storage, offset, shape, stride = args[:4]
    if not isinstance(storage, StorageRef) or type(offset) is not int:
        raise TypeError("not a storage")
    if not _int_tuple(shape) or not _int_tuple(stride) or len(shape) != len(stride):
        raise TypeError("not a shape")
    ref = TensorRef(storage, dtype or storage.dtype, offset, tuple(shape), tuple(stride))
    if ref.offset < 0 or any(s < 0 for s in ref.shape) or any(s < 0 for s in ref.stride):
        raise ValueError("negative size")
    return ref


def _rebuild_tensor_v3(args: tuple[Any, ...]) -> Any:
    dtype = args[6]
    if not isinstance(dtype, _Global) or not dtype.name.startswith("torch."):
        raise TypeError("not a dtype")
    leaf = dtype.name.removeprefix("torch.")
    if leaf not in _DTYPE_NAMES:
        raise TypeError("a dtype fc2conv does not size")
    return _rebuild_tensor(args, leaf)


def _int_tuple(value: Any) -> bool:
    return isinstance(value, tuple) and all(type(v) is int for v in value)


def _parameter(args: tuple[Any, ...]) -> Any:
    if not isinstance(args[0], TensorRef):
        raise TypeError("not a tensor")
    return args[0]


def _from_type(args: tuple[Any, ...]) -> Any:
    func, new_type, inner = args[0], args[1], args[2]
    plain = ("torch.Tensor", "torch._tensor.Tensor", "torch.nn.parameter.Parameter")
    if not isinstance(func, _Global) or not isinstance(new_type, _Global) or new_type.name not in plain:
        raise TypeError("a tensor subclass")
    _check_allocation(func.name, tuple(inner))
    return _call(func.name, tuple(inner))


_HANDLERS: dict[str, Callable[[tuple[Any, ...]], Any]] = {
    "collections.OrderedDict": _ordered_dict,
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor,
    "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
    "torch._utils._rebuild_parameter": _parameter,
    "torch._utils._rebuild_parameter_with_state": _parameter,
    "torch.nn.parameter.Parameter": _parameter,
    "torch._tensor._rebuild_from_type_v2": _from_type,
    "torch.Size": lambda args: tuple(args[0]) if args else (),
    "torch.device": lambda args: str(args[0]),
    "_codecs.encode": lambda args: str(args[0]).encode("latin-1"),
    "builtins.bytearray": lambda args: bytes(args[0]) if args else b"",
    "builtins.set": lambda args: list(args[0]) if args else [],
    "builtins.complex": lambda args: complex(*args),
}


def storage_ref(pid: tuple[Any, ...], check: Callable[[StorageRef], None]) -> Any:
    """A :class:`StorageRef` from a ``torch.save`` persistent id, checked by ``check``; else Opaque."""
    if len(pid) < 5 or pid[0] not in ("storage", b"storage"):
        return Opaque("persistent id")
    kind, key, numel = pid[1], pid[2], pid[4]
    leaf = kind.name.rpartition(".")[2] if isinstance(kind, _Global) else ""
    if leaf not in STORAGE_DTYPES or not isinstance(key, str) or type(numel) is not int or numel < 0:
        return Opaque("persistent id")
    ref = StorageRef(key, STORAGE_DTYPES[leaf], numel)
    check(ref)
    return ref
