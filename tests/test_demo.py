"""The demo scenario end to end at short durations: it serves throughout and reports what it did."""
from agent.demo import run_demo


def test_demo_serves_through_stress_and_reports(small_portfolio):
    lines = []
    latencies = run_demo(small_portfolio, rate_hz=100, calm_s=0.5, stress_s=1.0, after_s=0.5, print_fn=lines.append)

    text = "\n".join(lines)
    assert sum(len(v) for v in latencies.values()) > 50
    assert "CPU stress on every core" in text and ", 0 failed;" in text
    assert "served by" in text and "p95 ms" in text
