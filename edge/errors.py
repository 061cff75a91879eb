"""The few exceptions the library raises.

Their messages are shown to the user as they are: one line naming what was wrong and what to
do. The CLI, the bridge and the server translate them into exit codes, protocol error codes or
HTTP statuses at their edge; nothing inside the library prints.
"""

from __future__ import annotations


class EdgeError(Exception):
    """Base class. ``exit_code`` is the CLI's exit status for this kind of failure."""

    exit_code = 1
    code = "internal"  # bridge protocol error code


class UsageError(EdgeError):
    """The request itself is wrong: an unknown model name, a bad option, an output that exists."""

    exit_code = 2
    code = "invalid_request"


class InputError(EdgeError):
    """A file the user gave is unusable: a bundle, a checkpoint, an image, a model file."""

    exit_code = 3
    code = "invalid_request"


class IntegrityError(InputError):
    """A file does not match what its manifest says (hash, size, header). Names the file."""


class ResourceError(EdgeError):
    """The device can't do it within its limits: memory, disk, context length, image size."""

    exit_code = 4
    code = "out_of_memory"


class TooLargeError(InputError):
    """An input exceeds a configured limit (image pixels, file or request size). Exit 3."""

    code = "too_large"


class ContextOverflow(ResourceError):
    """A prompt (with its images) needs more tokens than the context holds. Exit 4."""

    code = "too_large"


class NotFoundError(InputError):
    """A study, instance, report or other stored record that does not exist. Exit 3."""

    code = "not_found"


class ConflictError(EdgeError):
    """The request contradicts the stored state: changing a signed report, signing twice. Exit 3."""

    exit_code = 3
    code = "conflict"


class Busy(EdgeError):
    """The model is serving another request and the caller asked not to wait."""

    exit_code = 4
    code = "busy"


class Cancelled(EdgeError):
    """The caller cancelled the work."""

    exit_code = 130
    code = "cancelled"


class MissingDependency(EdgeError):
    """An optional extra is not installed; the message says which one to install."""

    exit_code = 2
    code = "internal"


def require(module: str, extra: str):
    """Import ``module`` or raise MissingDependency naming the extra that provides it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependency(
            f"this needs '{module}', which is not installed: pip install 'medgemma-edge[{extra}]'"
        ) from exc
