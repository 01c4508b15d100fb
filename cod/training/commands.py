"""`cod fit / validate / test / predict` (LightningCLI) and `cod demo`. Registered into cod/cli.py."""
from __future__ import annotations


def register(sub) -> None:
    """Add this module's argparse subcommands (not the LightningCLI ones) to the `cod` parser."""


def lightning_main(argv: list[str]) -> int:
    raise SystemExit("cod: error: training commands are not available yet")
