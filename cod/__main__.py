"""python -m cod: the `cod` command."""
import sys

from cod.cli import main

sys.exit(main())
