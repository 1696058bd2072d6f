"""Import torch on a background thread, so that its start-up (most of a second) overlaps the disk work.

Reading headers, copying tensor bytes in the kernel and comparing mapped ranges need no torch; the
numeric check does. ``convert`` and ``verify`` start the import first and only wait for it when a
tensor is needed. The import itself is the ordinary one (the same module object, the same import lock).
"""

from __future__ import annotations

import sys
import threading

__all__ = ["preload_numpy", "preload_torch", "wait_for_torch"]

# Formats read without torch (headers, or a torch.save zip read as data), whose checks need torch later.
# Others (Keras, ONNX) import libraries that may import torch themselves: two threads importing torch
# at once can initialise its extension twice, so those never start a background import.
_READ_WITHOUT_TORCH = ("torch", "safetensors", "sharded safetensors")

_thread: threading.Thread | None = None


def preload_torch(*formats: str) -> None:
    """Start importing torch in the background, if every format given is read without torch.

    Nothing happens if torch is imported (or being imported) already. The caller must call
    :func:`wait_for_torch` before anything that imports torch (directly or through another library).
    """
    global _thread
    if "torch" in sys.modules or _thread is not None or not all(f in _READ_WITHOUT_TORCH for f in formats):
        return
    # A daemon thread: an interrupted run exits without waiting for the import (see wait_for_torch).
    _thread = threading.Thread(target=_import_torch, name="fc2conv-import-torch", daemon=True)
    _thread.start()


def preload_numpy() -> None:
    """Start importing numpy in the background (a tenth of a second) for the proofs computed with it.

    numpy's import is the ordinary one: a thread that needs numpy meanwhile waits on the import lock.
    """
    if "numpy" not in sys.modules:
        threading.Thread(target=_import_numpy, name="fc2conv-import-numpy", daemon=True).start()


def _import_numpy() -> None:
    try:
        import numpy  # noqa: F401
    except BaseException:  # noqa: BLE001 - the import is retried, and its error raised, where numpy is needed
        pass


def _import_torch() -> None:
    try:
        import torch  # noqa: F401
    except BaseException:  # noqa: BLE001 - the import is retried, and its error raised, where torch is needed
        pass


def wait_for_torch() -> None:
    """Wait for a background import of torch to finish (a no-op if none was started)."""
    if _thread is not None and _thread.is_alive():
        _thread.join()
