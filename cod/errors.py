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


class PrecisionError(CodError):
    """A decode precision that is unknown, or that this device cannot run (cod.precision)."""


class ModelDirError(CodError):
    """A model directory that is missing, incomplete, inconsistent or tampered with (message says what and how to
    fix it)."""


def is_out_of_memory(e: BaseException) -> bool:
    """MemoryError, or torch's RuntimeError for an allocation that failed (CPU or CUDA)."""
    if isinstance(e, MemoryError):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in text or "can't allocate" in text
                                            or "cannot allocate" in text)


def describe_error(e: BaseException) -> str:
    """One line for a failure: the message of a cod error, `path: reason` for an OSError, a hint for memory."""
    if is_out_of_memory(e):
        return ("out of memory: what this needed does not fit in this machine's memory (for images: lower "
                "--max-pixels or --batch-size; or use a machine with more memory)")
    if isinstance(e, OSError) and e.strerror:
        text = f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    else:
        text = str(e) or type(e).__name__
    # one line, and no control characters from a file name reach the terminal
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in " ".join(text.split()))
