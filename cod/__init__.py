"""cod: CoD, the compression-oriented diffusion foundation model for image compression."""
from __future__ import annotations

__version__ = "0.1.0"

from cod.model import CoDModel, OneStepModel, load, new_model  # noqa: E402

__all__ = ["CoDModel", "OneStepModel", "load", "new_model", "__version__"]
