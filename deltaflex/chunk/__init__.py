"""The chunkwise-parallel delta rule as blocked PyTorch ops: one module per stage, forward and backward."""

from .function import ChunkDeltaRuleFunction, chunk_delta_rule_bwd, chunk_delta_rule_fwd

__all__ = ["ChunkDeltaRuleFunction", "chunk_delta_rule_fwd", "chunk_delta_rule_bwd"]
