"""The commands as library calls: paths in, a result dataclass out (nothing printed here).

``convert`` (:mod:`fc2conv.jobs.convert`), ``inspect`` (:mod:`fc2conv.jobs.inspect`) and ``verify``
(:mod:`fc2conv.jobs.verify`) work on weights alone; :mod:`fc2conv.jobs.model` on a model's code too.
"""

from __future__ import annotations

from fc2conv.jobs.convert import convert_file
from fc2conv.jobs.inspect import inspect_file
from fc2conv.jobs.verify import verify_files

__all__ = ["convert_file", "inspect_file", "verify_files"]
