"""The fused chunkwise delta rule (plan="fused"): its launches, in order, are in chunk.py; the
autograd.Function delta_rule runs is in function.py; docs/design-fused.md is the design."""
