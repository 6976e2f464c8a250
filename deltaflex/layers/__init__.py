"""Layers built on the delta rule."""

from .deltanet import DeltaNet, DeltaNetCache

__all__ = ["DeltaNet", "DeltaNetCache"]
