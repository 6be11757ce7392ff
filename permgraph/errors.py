"""The library's errors and their exit codes.

Every error permgraph raises on purpose is a ``PermgraphError``. ``InputError``
(also a ``ValueError``) means the user's input is wrong and says how to fix it:
the command line maps it to exit code 2. ``InternalError`` is a bug in permgraph
(exit code 3, with a request to report it).
"""
from __future__ import annotations

EXIT_OK, EXIT_VERIFY_FAILED, EXIT_BAD_INPUT, EXIT_INTERNAL = 0, 1, 2, 3


class PermgraphError(Exception):
    """Base of every error permgraph raises on purpose."""

    exit_code = EXIT_INTERNAL


class InputError(PermgraphError, ValueError):
    """Bad input: missing or corrupt files, mismatched models, invalid options."""

    exit_code = EXIT_BAD_INPUT


class ModelLoadError(InputError):
    """A model reference could not be resolved or loaded."""


class FormatError(InputError):
    """A spec, alignment or permutation file (or object) is malformed."""


class OutputError(InputError):
    """The output path is refused: it exists, overlaps an input, or cannot be written."""


class TraceError(InputError):
    """The model could not be traced; the message says what failed and what to try."""


class InternalError(PermgraphError, RuntimeError):
    """A bug in permgraph; ``node`` names the graph node where it happened, if any."""

    exit_code = EXIT_INTERNAL

    def __init__(self, message: str, node: str | None = None) -> None:
        super().__init__(f"{message} (at graph node {node})" if node else message)
        self.node = node


class PermgraphWarning(UserWarning):
    """Something looks wrong but is not provably an error (e.g. a fine-tune closer to B than to A)."""
