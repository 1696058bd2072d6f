"""Exception types: one per kind of failure, each carrying the message a user sees and its exit code."""

from __future__ import annotations


class Fc2ConvError(Exception):
    """Base class of every error fc2conv reports to a user.

    The message is complete on its own (it names the file, layer and numbers involved), so the CLI
    prints ``Error: <message>`` and exits with :attr:`exit_code`.
    """

    exit_code: int = 2


class ShapeError(Fc2ConvError, ValueError):
    """An input shape that cannot be parsed or does not fit the layer it feeds."""


class PlanError(Fc2ConvError):
    """The checkpoint holds nothing that can be converted, or the geometry cannot be decided."""


class CheckpointError(Fc2ConvError):
    """A checkpoint that cannot be read: missing, unreadable, corrupt, or holding pickled code."""


class OutputError(Fc2ConvError):
    """The output cannot be written where it was asked to go."""


class CheckFailedError(Fc2ConvError):
    """A numeric check failed: the converted layers do not compute what the originals do."""

    exit_code = 1
