"""The commands as library calls: paths in, a result dataclass out (nothing printed here).

``convert`` (:mod:`fc2conv.jobs.convert`), ``inspect`` (:mod:`fc2conv.jobs.inspect`) and ``verify``
(:mod:`fc2conv.jobs.verify`) work on weights alone; :mod:`fc2conv.jobs.model` on a model's code too.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fc2conv.jobs.convert import convert_file
    from fc2conv.jobs.inspect import inspect_file
    from fc2conv.jobs.verify import verify_files

__all__ = ["convert_file", "inspect_file", "verify_files"]


def __getattr__(name: str) -> Any:
    """The commands, each imported when first used (the command line imports only the one it runs)."""
    if name not in __all__:
        raise AttributeError(f"module 'fc2conv.jobs' has no attribute {name!r}")
    return getattr(importlib.import_module(f"fc2conv.jobs.{name.removesuffix('_file').removesuffix('_files')}"), name)
