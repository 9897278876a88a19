"""The portfolio keeps the variants on or near the accuracy/latency front, and says what beat the others."""
from agent.portfolio import Variant
from exporter.selection import dominates, select_front


def variant(variant_id: str, accuracy: float, p50_ms: float, parent: str | None = "dense") -> Variant:
    return Variant(id=variant_id, method="dense" if parent is None else "pai-structured", parent=parent, density=1.0,
                   params=1, params_nonzero=1, macs=1, metrics={"accuracy": accuracy}, files={},
                   host_latency_ms={"p50": p50_ms, "p95": p50_ms * 1.2})


def test_slower_and_less_accurate_is_dominated_but_a_trade_off_is_not():
    dense = variant("dense", 0.98, 2.0, parent=None)
    cheap = variant("cheap", 0.95, 0.5)
    worse = variant("worse", 0.94, 0.9)

    assert dominates(cheap, worse)
    assert not dominates(dense, cheap) and not dominates(cheap, dense)


def test_latencies_within_noise_count_as_equal_so_the_more_accurate_one_wins():
    a = variant("a", 0.97, 1.00)
    b = variant("b", 0.96, 0.95)   # 5% faster: noise, not a real saving

    assert dominates(a, b)
    assert not dominates(b, a)


def test_equal_variants_do_not_knock_each_other_out():
    a, b = variant("a", 0.97, 1.0), variant("b", 0.97, 1.02)

    assert not dominates(a, b) and not dominates(b, a)


def test_front_keeps_dense_always_and_names_what_beat_each_dropped_variant():
    dense = variant("dense", 0.95, 2.0, parent=None)
    better = variant("better", 0.97, 1.0)
    slow = variant("slow", 0.96, 1.5)

    selection = select_front([dense, better, slow], always={"dense"})

    assert [v.id for v in selection.kept] == ["dense", "better"]
    assert selection.dropped == {"slow": "better"}


def test_a_kept_twin_of_a_dropped_variant_points_at_the_nearest_kept_ancestor():
    dense = variant("dense", 0.98, 2.0, parent=None)
    sparse = variant("sparse", 0.97, 2.0)                   # as slow as dense, less accurate
    twin = variant("sparse-int8", 0.97, 0.6, parent="sparse")

    selection = select_front([dense, sparse, twin], always={"dense"})

    assert [v.id for v in selection.kept] == ["dense", "sparse-int8"]
    assert twin.parent == "dense" and twin.details["derived_from"] == "sparse"
