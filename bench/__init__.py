"""Benchmarks printing side-by-side ratios; a package so that `--model bench.models:resnet18` imports."""
