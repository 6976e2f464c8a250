"""deltaflex: the DeltaNet delta rule, chunkwise-parallel, as compiled blocked PyTorch ops."""

from .api import chunk_delta_rule, delta_rule

__version__ = "0.1.0"

__all__ = ["__version__", "chunk_delta_rule", "delta_rule"]
