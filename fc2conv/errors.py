"""One exception type per kind of failure; each carries its exit code and, where there is one, a remedy.

Messages name files, layers and numbers, never command-line flags: the library is used from Python
too. Where a caller can fix the failure by asking differently (replace the output, give the shape,
trust the file), the exception's ``remedy`` says which; the CLI turns it into the flag to pass.
"""

from __future__ import annotations

from typing import Literal

__all__ = [
    "CheckpointError",
    "DependencyError",
    "Fc2ConvError",
    "ModelError",
    "OutputError",
    "PlanError",
    "Remedy",
    "ShapeError",
]

Remedy = Literal[
    "overwrite",  # an existing output would be replaced: allow it
    "choose_output",  # the output path cannot be used: name another one
    "input_shape",  # the feature map's geometry is needed
    "model_input_shape",  # the network's full input shape (C x H x W) is needed
    "trust_pickle",  # the file holds pickled objects: unpickle them only if the file is trusted
    "model",  # the model's code is needed (a factory building it)
    "inspect",  # look at what the checkpoint holds
    "weight_layout",  # an FC weight's layout, (out, in) or (in, out), cannot be told from the file
    "trust_shape",  # the given shape contradicts the channel count the checkpoint shows
]


class Fc2ConvError(Exception):
    """Base class of every error fc2conv reports to a user.

    The message is complete on its own (it names the file, layer and numbers involved), so the CLI
    prints ``Error: <message>`` (plus the flag that fixes it, from :attr:`remedy`) and exits with
    :attr:`exit_code`.
    """

    exit_code: int = 2

    def __init__(self, message: str, *, remedy: Remedy | None = None) -> None:
        super().__init__(message)
        self.remedy = remedy


class ShapeError(Fc2ConvError, ValueError):
    """An input shape that cannot be parsed or does not fit the layer it feeds."""


class PlanError(Fc2ConvError):
    """Nothing can be converted, the geometry cannot be decided, or a rewrite cannot be proven equal."""


class CheckpointError(Fc2ConvError):
    """A checkpoint that cannot be read: missing, unreadable, corrupt, or holding pickled code."""


class OutputError(Fc2ConvError):
    """The output cannot be written where it was asked to go."""


class ModelError(Fc2ConvError):
    """A model's code cannot be used: its factory does not import or build, or the weights do not fit it."""


class DependencyError(Fc2ConvError):
    """An optional dependency that the request needs is not installed; ``extra`` names fc2conv's extra."""

    def __init__(self, message: str, *, extra: str) -> None:
        super().__init__(message)
        self.extra = extra
