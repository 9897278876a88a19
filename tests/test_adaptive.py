"""The adaptive benchmark's machinery at tiny phases: every mode gets a row whose numbers add up, and
the fake board's warming and throttling reach the agent. How much switching pays is in the README."""
import pytest

from agent.adaptive.compare import ADAPTIVE, compare, running_order
from agent.adaptive.pressure import Phase, standard_schedule
from agent.adaptive.replay import Request
from agent.adaptive.score import score, score_table
from agent.adaptive.thermal import FakeThermalSensors
from agent.monitor import ResourceMonitor, thermal_state
from agent.profiles import load_profile

TINY = standard_schedule(calm_s=0.3, cpu_s=0.6, recover_s=0.3, warm_s=1.1, throttle_s=1.1)


@pytest.fixture(scope="module")
def comparison(small_portfolio):
    return compare(small_portfolio, load_profile("rpi5"), TINY, rate_hz=60, bench_runs=5)


def test_every_variant_pinned_and_the_free_policy_serve_the_same_schedule(comparison):
    variants = [c.id for c in comparison.candidates]
    first, second = comparison.rounds
    assert list(first) == [ADAPTIVE, *variants] and list(second) == [*variants[::-1], ADAPTIVE]
    assert [row.mode.split(" (")[0] for row in comparison.headline] == [
        "pinned dense", "pinned fastest", "pinned best in hindsight", "adaptive"]
    for run in comparison.rounds:
        for mode, served in run.items():
            served_by = {r.variant for r in served.requests if r.outcome == "answered"}
            assert served_by == {mode} if mode in variants else served_by <= set(variants)
            assert {r.phase for r in served.requests} == {phase.name for phase in TINY}


def test_the_running_order_reverses_every_round():
    assert running_order(["a", "b"], 0) == [ADAPTIVE, "a", "b"]
    assert running_order(["a", "b"], 1) == ["b", "a", ADAPTIVE]
    assert running_order(["a", "b"], 2) == [ADAPTIVE, "a", "b"]


def test_each_row_counts_every_request_and_effective_accuracy_never_exceeds_accuracy(comparison):
    per_round = [row for mode in [ADAPTIVE, *comparison.pinned] for row in comparison.by_round(mode)]
    for row in [*comparison.pinned.values(), comparison.adaptive, *comparison.headline, *per_round]:
        assert row.requests == row.answered + row.failed + row.skipped > 0
        assert row.failed == 0
        assert 0.0 <= row.within_slo <= 1.0
        assert 0.0 <= row.effective_accuracy <= row.accuracy <= 1.0
        assert row.p50_ms <= row.p95_ms <= row.p99_ms
    hindsight = comparison.headline[2]
    assert hindsight.effective_accuracy == max(row.effective_accuracy for row in comparison.pinned.values())
    assert comparison.best_pinned in hindsight.mode
    rounds = comparison.by_round(ADAPTIVE)
    assert comparison.adaptive.requests == sum(row.requests for row in rounds)  # both rounds, scored together
    assert min(r.effective_accuracy for r in rounds) <= comparison.adaptive.effective_accuracy <= max(
        r.effective_accuracy for r in rounds)
    table = score_table(comparison.headline)
    assert "eff. acc" in table and "pinned best in hindsight" in table and ADAPTIVE in table


def test_the_thermal_trace_reaches_the_agent_as_warm_then_throttle(comparison):
    seen = comparison.rounds[-1][ADAPTIVE].thermal_seen
    assert all(seen.get(phase, set()) <= {"ok"} for phase in ("calm", "cpu", "recover"))
    assert "warm" in seen["warm"] and "throttle" in seen["throttle"]


def test_fake_sensors_write_what_the_profile_reads(tmp_path):
    profile = load_profile("rpi5")
    sensors = FakeThermalSensors(profile, tmp_path)
    monitor = ResourceMonitor(profile, root=tmp_path)
    sensors.throttle()
    snapshot = monitor.snapshot()
    assert thermal_state(snapshot.temperature_c, profile.thermal) == "throttle"
    assert snapshot.throttling.throttled and snapshot.throttling.freq_capped
    sensors.cool()
    snapshot = monitor.snapshot()
    assert thermal_state(snapshot.temperature_c, profile.thermal) == "ok" and not snapshot.throttling.active


def test_a_late_right_answer_counts_as_accurate_but_not_effective():
    requests = [
        Request("calm", due=0.0, latency_ms=5.0, variant="dense", correct=True),
        Request("calm", due=0.1, latency_ms=50.0, variant="dense", correct=True),   # late
        Request("calm", due=0.2, latency_ms=5.0, variant="dense", correct=False),
        Request("calm", due=0.3, outcome="skipped"),
    ]
    row = score("pinned dense", requests, slo_ms=10.0, switches=0)
    assert (row.requests, row.answered, row.skipped) == (4, 3, 1)
    assert row.within_slo == 0.5
    assert row.accuracy == pytest.approx(2 / 3)
    assert row.effective_accuracy == 0.25


def test_thermal_phases_need_fake_sensors():
    from agent.adaptive.pressure import play
    with pytest.raises(ValueError, match="thermal phases need fake sensors"):
        play([Phase("warm", "warm", 0.1)], None, lambda phase: None)
