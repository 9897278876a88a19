"""The policy on scripted resource traces: step down at once, step up after a cooldown, never flap."""
from __future__ import annotations

import pytest

from agent.policy import Candidate, Observation, Policy, PolicySettings
from agent.stats import LatencySummary, LatencyWindow

# A portfolio as the exporter makes it: the dense model, a structured twin of each sparse level.
PORTFOLIO = [
    Candidate("dense", quality=0.980, bench_p95_ms=20.0, memory_mb=40),
    Candidate("imp-l03-sparse", quality=0.982, bench_p95_ms=20.0, memory_mb=40),
    Candidate("imp-l03-structured", quality=0.982, bench_p95_ms=16.0, memory_mb=30),
    Candidate("imp-l09-structured", quality=0.960, bench_p95_ms=8.0, memory_mb=12),
    Candidate("imp-l15-structured", quality=0.900, bench_p95_ms=3.0, memory_mb=4),
]


def live(p95: float | None, count: int = 100) -> LatencySummary:
    return LatencySummary(count if p95 is not None else 0, p95, p95, p95)


def observe(now: float, active: str, p95: float | None = None, **kwargs) -> Observation:
    return Observation(now=now, active=active, live=live(p95), **kwargs)


def run_trace(policy: Policy, trace: list[tuple[float, float | None, dict]], start: str) -> list[tuple[str, str]]:
    """Feed (time, live p95, extra observation fields) rounds; return each (active variant, decision kind)."""
    active, seen = start, []
    for now, p95, extra in trace:
        decision = policy.decide(observe(now, active, p95, **extra))
        if decision.changed:
            policy.note_switch(now)
            active = decision.variant
        seen.append((active, decision.kind))
    return seen


def test_picks_the_most_accurate_variant_that_meets_the_slo_and_prefers_the_structured_twin():
    policy = Policy(PORTFOLIO, PolicySettings(latency_slo_ms=50))
    assert policy.candidates[0].id == "imp-l03-structured"
    decision = policy.decide(observe(0, "dense"))
    assert decision.variant == "imp-l03-structured" and decision.kind == "step-up"


def test_violation_steps_down_at_once_to_what_fits_under_the_measured_slowdown():
    policy = Policy(PORTFOLIO, PolicySettings(latency_slo_ms=25))
    # CPU contention: the active variant (bench 16 ms) now runs at 40 ms, 2.5x slower.
    decision = policy.decide(observe(100, "imp-l03-structured", p95=40.0))
    assert decision.kind == "step-down"
    assert decision.variant == "imp-l09-structured"  # 8 ms * 2.5 = 20 ms <= 25 ms
    assert "p95 40.0 ms > SLO 25.0 ms" in decision.reason


def test_the_last_answers_late_step_down_before_the_window_p95_shows_it():
    policy = Policy(PORTFOLIO, PolicySettings(latency_slo_ms=25))
    # Contention began a moment ago: 6 of the last 8 answers are late, the 10 s window's p95 is still calm.
    onset = LatencySummary(8, 55.0, 60.0, 60.0)
    decision = policy.decide(Observation(100, "imp-l03-structured", live(17.0), recent=onset))
    assert decision.kind == "step-down"
    assert decision.variant == "imp-l15-structured"  # slowdown from the recent median: 8 ms * 55/16 > 25 ms
    assert "the last 8 answers' median 55.0 ms > SLO 25.0 ms" in decision.reason


def test_one_late_answer_among_the_last_is_noise_not_a_violation():
    policy = Policy(PORTFOLIO, PolicySettings(latency_slo_ms=25))
    policy.note_switch(99)
    one_late = LatencySummary(8, 16.5, 60.0, 60.0)
    assert policy.decide(Observation(100, "imp-l03-structured", live(17.0), recent=one_late)).kind == "hold"
    too_few = LatencySummary(3, 40.0, 40.0, 40.0)  # fewer answers than trip_samples since the switch
    assert policy.decide(Observation(100, "imp-l03-structured", live(17.0), recent=too_few)).kind == "hold"


def test_variants_whose_measured_latencies_overlap_cost_the_same_so_a_violation_does_not_switch_between_them():
    # Three variants of the same architecture: bench ranges (p50 to p95) overlap, the p95 order is noise.
    same_cost = [
        Candidate("dense", quality=0.95, bench_p95_ms=2.5, memory_mb=10, bench_p50_ms=2.1),
        Candidate("sparse", quality=0.94, bench_p95_ms=2.3, memory_mb=10, bench_p50_ms=2.0),
        Candidate("sparse-more", quality=0.93, bench_p95_ms=2.4, memory_mb=10, bench_p50_ms=2.2),
    ]
    policy = Policy(same_cost, PolicySettings(latency_slo_ms=1.1))
    decision = policy.decide(observe(100, "dense", p95=2.6))
    assert decision.kind == "hold" and not decision.changed
    assert "no variant is cheaper beyond noise" in decision.reason
    # Nor from the variant with the lowest bench p95 of the three: the others are not cheaper either.
    assert policy.decide(observe(200, "sparse", p95=2.6)).variant == "sparse"


# The default digits portfolio as measured: accuracies on 450 test images, their standard errors.
DIGITS = [
    Candidate("dense-int8", quality=0.991, bench_p95_ms=2.4, memory_mb=20, bench_p50_ms=2.3, quality_error=0.0047),
    Candidate("x256-structured", quality=0.989, bench_p95_ms=0.9, memory_mb=3, bench_p50_ms=0.8, quality_error=0.0051),
    Candidate("x256-int8", quality=0.987, bench_p95_ms=0.6, memory_mb=1, bench_p50_ms=0.5, quality_error=0.0056),
    Candidate("x4096-int8", quality=0.930, bench_p95_ms=0.3, memory_mb=1, bench_p50_ms=0.2, quality_error=0.0120),
]


def test_accuracies_within_their_sampling_error_are_equal_so_the_cheapest_of_them_serves_at_rest():
    policy = Policy(DIGITS, PolicySettings(latency_slo_ms=5.0))
    decision = policy.decide(observe(0, "dense-int8", p95=2.4))
    assert decision.variant == "x256-int8" and decision.kind == "step-down"
    assert "as accurate within noise (0.987 ± 0.006 vs 0.991 ± 0.005)" in decision.reason
    # From there nothing is better beyond noise: it holds, and never steps up to a variant 0.4 points "better".
    assert policy.decide(observe(100, "x256-int8", p95=0.6)).kind == "hold"
    # A variant really less accurate is not equal: it serves only when nothing better fits.
    pressed = policy.decide(observe(200, "x256-int8", p95=6.0))
    assert pressed.variant == "x4096-int8" and pressed.kind == "step-down"
    back = policy.decide(observe(300, "x4096-int8", p95=0.3))
    assert back.variant == "x256-int8" and back.kind == "step-up"


def test_exact_qualities_keep_every_point_of_accuracy():
    exact = [Candidate(c.id, c.quality, c.bench_p95_ms, c.memory_mb, c.bench_p50_ms) for c in DIGITS]
    policy = Policy(exact, PolicySettings(latency_slo_ms=5.0))
    assert policy.decide(observe(0, "x256-int8", p95=0.6)).variant == "dense-int8"


def test_a_step_down_goes_only_to_a_variant_cheaper_beyond_noise():
    portfolio = [
        Candidate("dense", quality=0.95, bench_p95_ms=4.0, memory_mb=10, bench_p50_ms=3.6),
        Candidate("sparse", quality=0.94, bench_p95_ms=3.8, memory_mb=10, bench_p50_ms=3.5),  # same cost as dense
        Candidate("structured", quality=0.90, bench_p95_ms=1.5, memory_mb=3, bench_p50_ms=1.3),
    ]
    policy = Policy(portfolio, PolicySettings(latency_slo_ms=5.0))
    # 6 ms on a 4 ms bench: 1.5x slower, so sparse is "expected" at 5.7 ms and structured at 2.25 ms.
    decision = policy.decide(observe(100, "dense", p95=6.0))
    assert decision.kind == "step-down" and decision.variant == "structured"
    assert "p95 6.0 ms > SLO 5.0 ms: structured expected at 2.2 ms" in decision.reason


def test_a_reason_that_names_a_variants_cost_names_the_provider_it_was_measured_on():
    portfolio = [
        Candidate("dense", quality=0.95, bench_p95_ms=4.0, memory_mb=10, provider="CUDAExecutionProvider"),
        Candidate("structured", quality=0.90, bench_p95_ms=1.5, memory_mb=3, provider="CPUExecutionProvider"),
    ]
    policy = Policy(portfolio, PolicySettings(latency_slo_ms=5.0))
    decision = policy.decide(observe(100, "dense", p95=6.0))
    assert "structured on CPU expected at 2.2 ms" in decision.reason


def test_when_nothing_fits_the_step_down_takes_the_most_accurate_of_the_cheapest():
    portfolio = [
        Candidate("dense", quality=0.95, bench_p95_ms=4.0, memory_mb=10, bench_p50_ms=3.6),
        Candidate("structured", quality=0.90, bench_p95_ms=1.5, memory_mb=3, bench_p50_ms=1.2),
        Candidate("structured-int8", quality=0.89, bench_p95_ms=1.4, memory_mb=1, bench_p50_ms=1.1),
    ]
    policy = Policy(portfolio, PolicySettings(latency_slo_ms=1.0))
    decision = policy.decide(observe(100, "dense", p95=8.0))  # 2x slower: even the cheapest expects 2.8 ms
    assert decision.variant == "structured" and "the cheapest; nothing fits" in decision.reason
    assert policy.decide(observe(101, "structured", p95=3.0)).kind == "hold"


def test_a_variant_busy_nearly_all_the_time_steps_down_before_its_queue_shows_in_latency():
    portfolio = [
        Candidate("dense", quality=0.95, bench_p95_ms=4.0, memory_mb=10, bench_p50_ms=3.0),
        Candidate("structured", quality=0.93, bench_p95_ms=2.4, memory_mb=4, bench_p50_ms=1.5),
        Candidate("tiny", quality=0.80, bench_p95_ms=1.0, memory_mb=1, bench_p50_ms=0.5),
    ]
    policy = Policy(portfolio, PolicySettings(latency_slo_ms=20.0, max_busy=0.8))
    # Each answer takes 6 ms, well within 20 ms, but serving takes 95% of the time: requests queue.
    decision = policy.decide(observe(100, "dense", p95=6.0, busy=0.95))
    assert decision.kind == "step-down" and decision.variant == "structured"  # half the cost: ~48% busy
    assert "busy 95% of the time > 80%" in decision.reason
    assert policy.decide(observe(100, "dense", p95=6.0, busy=0.5)).kind == "hold"


def test_too_few_samples_are_not_evidence_of_a_violation():
    policy = Policy(PORTFOLIO, PolicySettings(latency_slo_ms=25, min_samples=20))
    decision = policy.decide(Observation(100, "imp-l03-structured", LatencySummary(5, 40.0, 40.0, 40.0)))
    assert decision.kind == "hold"


def test_step_up_waits_for_the_cooldown_and_needs_headroom():
    policy = Policy(PORTFOLIO, PolicySettings(latency_slo_ms=25, cooldown_s=30, headroom=0.7))
    trace = [
        (0, 40.0, {}),    # contention: step down
        (5, 8.0, {}),     # contention gone, but the cooldown has not passed
        (20, 8.0, {}),
        (31, 8.0, {}),    # cooldown over: 16 ms fits under 70% of 25 ms? no (17.5 >= 16 yes) -> step up
        (40, 16.0, {}),
    ]
    seen = run_trace(policy, trace, start="imp-l03-structured")
    assert seen == [("imp-l09-structured", "step-down"), ("imp-l09-structured", "hold"),
                    ("imp-l09-structured", "hold"), ("imp-l03-structured", "step-up"),
                    ("imp-l03-structured", "hold")]


def test_oscillating_load_does_not_flap():
    policy = Policy(PORTFOLIO, PolicySettings(latency_slo_ms=25, cooldown_s=30))
    # Load comes and goes every 2 s for a minute: one step down, then at most one step up per cooldown.
    trace = [(t, 40.0 if (t // 2) % 2 == 0 else 14.0, {}) for t in range(0, 60)]
    switches = sum(kind in ("step-down", "step-up") for _, kind in run_trace(policy, trace, "imp-l03-structured"))
    assert switches <= 4


def test_a_step_up_that_pressure_undoes_is_not_retried_at_that_pressure_for_eight_cooldowns():
    policy = Policy(PORTFOLIO, PolicySettings(latency_slo_ms=25, cooldown_s=5, headroom=0.7))
    # Contention that hurts the costlier variant more than its cost says: the cheap one runs at its bench
    # latency (so the estimate allows a step up), the costlier one at 40 ms (so each step up fails).
    active, step_ups = "imp-l03-structured", []
    for now in range(0, 100):
        decision = policy.decide(observe(now, active, 40.0 if active == "imp-l03-structured" else 8.0))
        if decision.changed:
            policy.note_switch(now)
            active = decision.variant
            if decision.kind == "step-up":
                step_ups.append((now, decision.reason))
    assert [now for now, _ in step_ups] == [5, 46, 87]  # each failure: 8 cooldowns (40 s) before the next try
    assert "recent step ups failed" not in step_ups[0][1]
    assert "(after 10 s: recent step ups failed)" in step_ups[1][1]  # and the wait after a switch doubles


def test_a_failed_step_up_goes_again_once_the_pressure_eases_and_one_that_holds_resets_the_backoff():
    policy = Policy(PORTFOLIO, PolicySettings(latency_slo_ms=40, cooldown_s=5, headroom=0.7))
    trace = [(0, 60.0, {}),                  # contention: step down to imp-l09 (8 ms at rest)
             (5, 12.0, {}), (6, 60.0, {}),   # imp-l09 1.5x slower than at rest: up (16 x 1.5 <= 28), undone at once
             (16, 12.0, {}),                 # the wait (10 s) is over, but the pressure is what the step up failed at
             (17, 8.0, {}),                  # the pressure eased: up again, and it holds
             (60, 16.0, {}),
             (61, 60.0, {}), (66, 8.0, {})]  # a new episode: down, and up after one cooldown
    seen = run_trace(policy, trace, start="imp-l03-structured")
    assert [kind for _, kind in seen] == ["step-down", "step-up", "step-down", "hold", "step-up", "hold",
                                          "step-down", "step-up"]


def test_a_hold_for_a_failed_step_up_says_which_and_at_what_pressure():
    policy = Policy(PORTFOLIO, PolicySettings(latency_slo_ms=40, cooldown_s=5, headroom=0.7))
    run_trace(policy, [(0, 60.0, {}), (5, 12.0, {}), (6, 60.0, {})], start="imp-l03-structured")

    decision = policy.decide(observe(16, "imp-l09-structured", 12.0))

    assert decision.kind == "hold" and not decision.changed
    assert decision.reason == ("holding imp-l09-structured: a step up to imp-l03-structured failed 10 s ago with "
                               "imp-l09-structured at 1.5x its cost, now 1.5x")


# A classifier portfolio with a real trade-off: the cheapest variant is far less accurate.
TRADE_OFF = [
    Candidate("x64-int8", quality=0.989, bench_p95_ms=1.6, memory_mb=2, bench_p50_ms=1.4),
    Candidate("x256-int8", quality=0.967, bench_p95_ms=1.0, memory_mb=1, bench_p50_ms=0.9),
    Candidate("x1024-int8", quality=0.678, bench_p95_ms=0.7, memory_mb=1, bench_p50_ms=0.45),
]


def test_a_step_down_never_goes_to_a_variant_that_cannot_answer_more_right_in_time():
    policy = Policy(TRADE_OFF, PolicySettings(latency_slo_ms=3.0))
    # Contention: 70% of x64-int8's answers in time, so 0.989 x 0.70 = 0.69 right in time. x256 saves 0.5 ms of
    # cost, 0.7 ms at the median's 1.4x slowdown: all in time (0.967); x1024 at 0.678 cannot beat 0.69 at all.
    late = (2.0,) * 70 + (3.5,) * 30
    decision = policy.decide(Observation(100, "x64-int8", live(3.5), latencies=late))
    assert decision.kind == "step-down" and decision.variant == "x256-int8"


def test_with_only_such_variants_cheaper_the_policy_holds_and_says_why():
    policy = Policy(TRADE_OFF, PolicySettings(latency_slo_ms=3.0))
    late = (2.0,) * 79 + (6.0,) * 21
    decision = policy.decide(Observation(100, "x256-int8", live(6.0), latencies=late))
    assert decision.kind == "hold" and not decision.changed
    assert decision.reason == ("holding x256-int8: p95 6.0 ms, SLO 3.0 ms; 0.967 accurate with 79% of answers in "
                               "time, more right in time than x1024-int8 (0.678) is expected to answer")


def test_a_step_down_that_would_not_bring_enough_answers_in_time_to_pay_for_its_accuracy_is_not_taken():
    policy = Policy(TRADE_OFF, PolicySettings(latency_slo_ms=3.0))
    # x64-int8 at 60% in time (0.59 right in time); its late answers wait out preemptions, 4 ms beyond its
    # cost, that a cheaper variant would wait out too: x256 and x1024 would answer no more in time.
    late = (2.0,) * 60 + (6.0,) * 40
    assert policy.decide(Observation(100, "x64-int8", live(6.0), latencies=late)).kind == "hold"


def test_when_the_best_step_up_failed_at_this_pressure_the_next_best_may_serve():
    policy = Policy(PORTFOLIO, PolicySettings(latency_slo_ms=40, cooldown_s=5, headroom=0.7))
    run_trace(policy, [(0, 60.0, {}), (5, 12.0, {}), (6, 60.0, {})], start="imp-l03-structured")
    assert policy.decide(observe(16, "imp-l09-structured", 12.0)).kind == "hold"  # l03 failed; dense costs as much
    policy.update(latency_slo_ms=60)  # a looser target: l03 would fit on the estimate, but it failed at 1.5x
    decision = policy.decide(observe(17, "imp-l09-structured", 12.0))
    assert decision.reason.startswith("holding imp-l09-structured: a step up to imp-l03-structured failed")
    cheaper_middle = PORTFOLIO + [Candidate("imp-l06-structured", quality=0.975, bench_p95_ms=11.0, memory_mb=20)]
    policy = Policy(cheaper_middle, PolicySettings(latency_slo_ms=40, cooldown_s=5, headroom=0.7))
    run_trace(policy, [(0, 60.0, {}), (5, 12.0, {}), (6, 60.0, {})], start="imp-l03-structured")
    decision = policy.decide(observe(16, "imp-l09-structured", 12.0))
    assert decision.kind == "step-up" and decision.variant == "imp-l06-structured"  # 11 x 1.5 <= 28 ms


def test_warm_and_throttling_board_tightens_the_slo():
    policy = Policy(PORTFOLIO, PolicySettings(latency_slo_ms=20))
    ok = policy.decide(observe(0, "imp-l03-structured", thermal="ok", temperature_c=55.0))
    throttling = policy.decide(observe(0, "imp-l03-structured", thermal="throttle", temperature_c=82.0))
    assert ok.kind == "hold"
    assert throttling.kind == "step-down" and throttling.variant == "imp-l09-structured"
    assert "throttle 82.0 °C" in throttling.reason


def test_a_throttling_board_never_steps_up_even_with_headroom():
    policy = Policy(PORTFOLIO, PolicySettings(latency_slo_ms=40, cooldown_s=5))
    calm = policy.decide(observe(60, "imp-l09-structured", 8.0, thermal="ok"))
    throttling = policy.decide(observe(60, "imp-l09-structured", 8.0, thermal="throttle", temperature_c=82.0))
    assert calm.kind == "step-up"
    assert throttling.kind == "hold" and "throttles 82.0 °C; no step up" in throttling.reason


def test_critical_temperature_takes_the_fastest_variant():
    policy = Policy(PORTFOLIO, PolicySettings(latency_slo_ms=50))
    decision = policy.decide(observe(0, "dense", thermal="critical", temperature_c=86.0))
    assert decision.variant == "imp-l15-structured" and decision.kind == "thermal"


def test_memory_budget_and_free_memory_rule_out_large_variants():
    policy = Policy(PORTFOLIO, PolicySettings(latency_slo_ms=50, memory_budget_mb=20))
    assert policy.decide(observe(0, "imp-l09-structured")).kind == "hold"
    assert policy.decide(observe(0, "dense")).variant == "imp-l09-structured"
    squeezed = Policy(PORTFOLIO, PolicySettings(latency_slo_ms=50))
    assert squeezed.decide(observe(0, "imp-l15-structured", mem_available_mb=10)).variant == "imp-l15-structured"


def test_pin_overrides_everything_until_unpinned():
    policy = Policy(PORTFOLIO, PolicySettings(latency_slo_ms=25))
    policy.pin("dense")
    pinned = policy.decide(observe(0, "imp-l03-structured", p95=400.0, thermal="critical"))
    assert pinned.variant == "dense" and pinned.kind == "pin" and "operator" in pinned.reason
    policy.pin(None)
    assert policy.decide(observe(100, "dense", p95=400.0)).kind == "step-down"


def test_pinning_an_unknown_variant_is_refused():
    policy = Policy(PORTFOLIO, PolicySettings(latency_slo_ms=25))
    with pytest.raises(KeyError, match="unknown variant 'nope'"):
        policy.pin("nope")


def test_latency_window_percentiles_and_horizon():
    window = LatencyWindow(horizon_s=10)
    for i in range(100):
        window.add(float(i + 1), now=1000.0 + i * 0.01)
    summary = window.summary(now=1001.0)
    assert (summary.count, summary.p50, summary.p95, summary.p99) == (100, 50.0, 95.0, 99.0)
    assert window.summary(now=1020.0).count == 0
    assert window.summary(now=1001.0, since=1000.5).count == 50
    last = window.last(8)
    assert (last.count, last.p50, last.p95) == (8, 96.0, 100.0)
    assert window.last(8, since=1000.965).count == 3


def test_the_window_judges_latency_as_answered_and_busy_share_as_served():
    window = LatencyWindow(horizon_s=10)
    for i in range(100):
        window.add(50.0, now=1000.0 + i * 0.1, answered_ms=80.0)  # 50 ms of work after 30 ms in a queue
    assert window.summary(now=1010.0).p50 == 80.0 and window.last(8).p95 == 80.0
    assert window.busy_share(now=1010.0) == pytest.approx(0.5)


def test_busy_share_is_the_time_spent_serving_over_the_window():
    window = LatencyWindow(horizon_s=10)
    for i in range(100):
        window.add(50.0, now=1000.0 + i * 0.1)   # 50 ms of work every 100 ms
    assert window.busy_share(now=1010.0) == pytest.approx(0.5)
    assert window.busy_share(now=1010.0, since=1009.5) is None  # too short a span to say
