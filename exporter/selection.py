"""Which variants a portfolio keeps: those on or near the accuracy/latency front.

Latencies measured side by side still carry noise, so two variants whose p50s are within
`LATENCY_NOISE` of each other cost the same here. A variant is dropped when another one is at
least as accurate and clearly faster, or more accurate and no slower. Dense always stays: it
is every variant's reference, and what a fixed deployment would serve.
"""
from __future__ import annotations

from dataclasses import dataclass

from agent.portfolio import Variant

LATENCY_NOISE = 0.10   # relative p50 difference below which two variants cost the same


@dataclass
class Selection:
    kept: list[Variant]
    dropped: dict[str, str]   # dropped variant id -> the id of a variant that beats it


def dominates(a: Variant, b: Variant, noise: float = LATENCY_NOISE) -> bool:
    """a is at least as accurate as b and clearly faster, or more accurate and not slower."""
    accuracy_a, accuracy_b = a.metrics["accuracy"], b.metrics["accuracy"]
    latency_a, latency_b = a.host_latency_ms["p50"], b.host_latency_ms["p50"]
    clearly_faster = latency_a * (1 + noise) < latency_b
    not_slower = latency_a <= latency_b * (1 + noise)
    return (accuracy_a >= accuracy_b and clearly_faster) or (accuracy_a > accuracy_b and not_slower)


def select_front(variants: list[Variant], always: set[str], noise: float = LATENCY_NOISE) -> Selection:
    """Keep `always` and every variant no other one dominates; re-point parents past dropped variants."""
    dropped: dict[str, str] = {}
    for variant in variants:
        if variant.id in always:
            continue
        better = next((other for other in variants if other is not variant and dominates(other, variant, noise)), None)
        if better is not None:
            dropped[variant.id] = better.id
    kept = [v for v in variants if v.id not in dropped]
    by_id = {v.id: v for v in variants}
    for variant in kept:
        original = variant.parent
        while variant.parent in dropped:
            variant.parent = by_id[variant.parent].parent
        if variant.parent != original:
            variant.details["derived_from"] = original  # the float or sparse step in between was dropped
    return Selection(kept, dropped)
