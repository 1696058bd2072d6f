"""The package version, in one place (read by pyproject and by ``fc2conv --version``)."""

__version__ = "1.1.0"
