"""Reconvene: structured pruning at initialization (scorers, per-layer sensitivity, shrinking)."""
