"""`cod compress / decompress / evaluate` (the codec product). Registered into cod/cli.py."""
from __future__ import annotations


def register(sub) -> None:
    """Add this module's subcommands to the `cod` parser's subparsers."""
