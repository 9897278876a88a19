"""The demo scenario end to end at short durations: it serves throughout and reports what it did."""
import json
import shutil

from agent.demo import run_demo


def test_demo_serves_through_stress_and_reports_what_switching_bought(small_portfolio):
    lines = []
    latencies = run_demo(small_portfolio, rate_hz=100, calm_s=0.5, stress_s=1.0, after_s=0.5, print_fn=lines.append)

    text = "\n".join(lines)
    assert sum(len(v) for v in latencies.values()) > 50
    assert "replaying evaluation inputs" in text
    assert "CPU stress on every core" in text and ", 0 failed;" in text
    assert "served by" in text and "p95 ms" in text
    # It ends with the same schedule pinned to the dense variant, both runs side by side, and what the agent served.
    manifest = json.loads((small_portfolio / "manifest.json").read_text())
    dense = next(variant["id"] for variant in manifest["variants"] if variant["method"] == "dense")
    assert f"again, pinned to the dense variant, {dense}, to see what the portfolio and its agent bought" in text
    assert "\nadaptive (this run) " in text and f"\npinned {dense} " in text
    assert "of requests within the SLO vs" in lines[-1] and f"pinned {dense}; effective accuracy" in lines[-1]
    served = lines[-1].split("its answers came from ", 1)[1].split(" (`python bench/adaptive.py`", 1)[0]
    assert all(name.rsplit(" (", 1)[0] in {v["id"] for v in manifest["variants"]} for name in served.split(", "))

def test_a_portfolio_without_evaluation_data_skips_the_comparison_in_one_line(small_portfolio, tmp_path):
    portfolio = shutil.copytree(small_portfolio, tmp_path / "portfolio")
    manifest = json.loads((portfolio / "manifest.json").read_text())
    manifest["evaluation"] = None
    (portfolio / "manifest.json").write_text(json.dumps(manifest))
    lines = []
    run_demo(portfolio, rate_hz=100, calm_s=0.3, stress_s=0.5, after_s=0.3, print_fn=lines.append)

    assert "replaying samples" in "\n".join(lines)
    assert lines[-1].startswith("no labelled evaluation data") and "no comparison" in lines[-1]
    assert not any("within the SLO vs" in line for line in lines)


def test_fleet_demo_watches_the_device_and_deploys_a_second_release(small_portfolio):
    lines = []
    run_demo(small_portfolio, rate_hz=100, calm_s=0.5, stress_s=3.0, after_s=0.5, fleet=True, print_fn=lines.append)

    text = "\n".join(lines)
    assert "joined fleet 'demo' on a local" in text
    assert "edgeshift-fleet watch" in text and "demo-device" in text
    assert "edgeshift-fleet deploy demo-device" in text
    assert "deploy: the agent refused" not in text and ", 0 failed;" in text
    assert any(" ok " in line and "portfolio=" in line and "-v2" in line for line in lines), text
