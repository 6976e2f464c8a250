"""deltaflex: the DeltaNet delta rule, chunkwise-parallel, as compiled blocked PyTorch ops."""

from .api import chunk_delta_rule, delta_rule
from .plan import Plan

__version__ = "0.1.0"

__all__ = ["Plan", "__version__", "chunk_delta_rule", "delta_rule"]
