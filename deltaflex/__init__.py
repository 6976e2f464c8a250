"""deltaflex: the DeltaNet delta rule, chunkwise-parallel, as compiled blocked PyTorch ops."""

from .api import chunk_delta_rule, delta_rule
from .layers import DeltaNet, DeltaNetCache
from .plan import Plan
from .recurrent import delta_rule_step

__version__ = "0.1.0"

__all__ = ["DeltaNet", "DeltaNetCache", "Plan", "__version__", "chunk_delta_rule", "delta_rule", "delta_rule_step"]
