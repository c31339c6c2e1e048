"""User-facing errors: every message names the bad value and what was expected."""

__all__ = [
    "RefinerError",
    "ConfigError",
    "CheckpointError",
    "UnsafeCheckpointError",
    "LayerError",
    "DataError",
    "DataLayoutError",
    "ExportValidationError",
    "DivergedError",
    "Interrupted",
]


class RefinerError(Exception):
    """Base class of every error refiner raises for bad input; each subclass says what was wrong in its message.

    Examples:
        >>> import refiner
        >>> try:
        ...     refiner.create_model("resnet81", 10)
        ... except refiner.RefinerError as e:
        ...     print(type(e).__name__)
        ConfigError
    """


class ConfigError(RefinerError, ValueError):
    """An option or argument has a value refiner cannot use."""


class CheckpointError(RefinerError, ValueError):
    """A checkpoint file is unreadable or does not match its architecture."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint needs arbitrary unpickling and the user did not opt in."""


class LayerError(RefinerError, ValueError):
    """A layer name does not exist in a model or is not a clean cut point."""


class DataError(RefinerError, ValueError):
    """Data do not fit the task (missing classes, empty splits, bad shapes)."""


class DataLayoutError(RefinerError, FileNotFoundError):
    """A dataset folder lacks a file or folder its standard layout requires."""


class ExportValidationError(RefinerError, ValueError):
    """An exported ONNX model does not reproduce the PyTorch model."""


class DivergedError(RefinerError, RuntimeError):
    """Training produced non-finite losses wherever it could have produced the result asked for."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGINT) stopped a long run; the message says what was kept and how to go on (still a KeyboardInterrupt)."""
