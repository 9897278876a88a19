"""Host side of edgeshift: builds a portfolio of pruned variants of a model (needs torch)."""
