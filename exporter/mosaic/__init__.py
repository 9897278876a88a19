"""Mosaic: composite projection pruning for LLaMA-style causal LMs."""
