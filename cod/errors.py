"""The failures a user sees. Each one's message is the whole story: what was wrong, naming the user's own path or
option (never a temporary file), and what to do about it. The CLI prints it as one `cod: error:` line and exits
with status 1 (docs/robustness.md lists the exit codes).

All of them are ValueErrors, so code that catches ValueError around a cod call keeps working.
"""
from __future__ import annotations


class CodError(ValueError):
    """A user-facing failure (bad input, a limit, an existing output, a broken model directory)."""


class InputError(CodError):
    """An input file or option that cod refuses: unreadable, not a regular file, malformed, out of range."""


class LimitError(CodError):
    """An input over a resource limit (pixels, decode work, file size); the message says how to raise it."""


class OutputExistsError(CodError):
    """An output that exists already (cod never replaces a file unless asked to with --overwrite)."""


class ModelDirError(CodError):
    """A model directory that is missing, incomplete, inconsistent or tampered with (message says what and how to
    fix it)."""
