"""dist_hooks: distributed, stream-async recording hooks for batched atomistic simulation."""
from __future__ import annotations

__version__ = "0.1.0"

from .stages import Stage

__all__ = ["Stage", "__version__"]
