"""The demo scenario end to end at short durations: it serves throughout and reports what it did."""
from agent.demo import run_demo


def test_demo_serves_through_stress_and_reports(small_portfolio):
    lines = []
    latencies = run_demo(small_portfolio, rate_hz=100, calm_s=0.5, stress_s=1.0, after_s=0.5, print_fn=lines.append)

    text = "\n".join(lines)
    assert sum(len(v) for v in latencies.values()) > 50
    assert "CPU stress on every core" in text and ", 0 failed;" in text
    assert "served by" in text and "p95 ms" in text


def test_fleet_demo_watches_the_device_and_deploys_a_second_release(small_portfolio):
    lines = []
    run_demo(small_portfolio, rate_hz=100, calm_s=0.5, stress_s=3.0, after_s=0.5, fleet=True, print_fn=lines.append)

    text = "\n".join(lines)
    assert "joined fleet 'demo' on a local" in text
    assert "edgeshift-fleet watch" in text and "demo-device" in text
    assert "edgeshift-fleet deploy demo-device" in text
    assert "deploy: the agent refused" not in text and ", 0 failed;" in text
    assert any(" ok " in line and "portfolio=" in line and "-v2" in line for line in lines), text
