"""`edgeshift-agent demo DIR`: the agent as an on-device pipeline, reacting to CPU stress.

Replays the portfolio's sample inputs at a steady rate, then loads every core with busy
processes for a while, then lets go: each switch prints with its reason, and a per-variant
latency table closes the run. The SLO is set from this machine's own measurements (a multiple
of the most accurate variant's bench p95), so the story is the same on a Pi and on a laptop.

With `fleet=True` the device also joins a fleet on a local broker (mosquitto, else amqtt):
the controller's `watch` table prints during the stress, and at the end a second release of
the portfolio is deployed over MQTT while the replay goes on.

The replay sends the portfolio's labelled evaluation inputs when it has them, and the demo ends by
serving the same schedule pinned to the dense variant (the model the user trained, deployed
alone): within-SLO share and effective accuracy side by side show what the portfolio and its
agent bought, and which variants the agent served. Whether switching beats every fixed choice of
variant, not just dense, is bench/adaptive.py's question: it serves the schedule pinned to each.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections import Counter, defaultdict
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from agent.adaptive.compare import dense_variant
from agent.adaptive.pressure import Phase
from agent.adaptive.score import RunScore, score, score_table
from agent.adaptive.serve import ServedRun, drive, serve_schedule
from agent.config import MqttConfig
from agent.fleet.cli import describe_result, watch_table
from agent.fleet.controller import BrokerOptions, Controller
from agent.fleet.deploy import PortfolioStore
from agent.fleet.local_broker import LocalBroker
from agent.fleet.member import FleetMember
from agent.fleet.serve import pack_portfolio
from agent.policy import PolicySettings
from agent.portfolio import Portfolio, PortfolioError, sha256_file
from agent.profiles import DeviceProfile, load_profile
from agent.service import Agent, Event
from agent.stats import percentile

DEMO_FLEET, DEMO_DEVICE = "demo", "demo-device"


def run_demo(portfolio_dir: Path, device: str = "x86", rate_hz: float = 200.0, calm_s: float = 10.0,
             stress_s: float = 25.0, after_s: float = 15.0, slo_factor: float = 2.0, cooldown_s: float = 8.0,
             fleet: bool = False, print_fn=print) -> dict[str, list[float]]:
    with ExitStack() as cleanup:
        return _run(cleanup, portfolio_dir, device, rate_hz, calm_s, stress_s, after_s, slo_factor, cooldown_s,
                    fleet, print_fn)


def _run(cleanup: ExitStack, portfolio_dir, device, rate_hz, calm_s, stress_s, after_s, slo_factor, cooldown_s,
         fleet, print_fn) -> dict[str, list[float]]:
    started = time.monotonic()
    clock = lambda: f"[{time.monotonic() - started:6.1f} s]"
    state_dir = store = None
    source_dir = Path(portfolio_dir)  # a fleet member's installed copy goes with the fleet at cleanup
    if fleet:
        state_dir = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="edgeshift-demo-")))
        store = PortfolioStore(state_dir)
        portfolio_dir = store.install_initial(Path(portfolio_dir))
    portfolio = Portfolio.open(portfolio_dir)
    agent = Agent(portfolio, load_profile(device), PolicySettings(latency_slo_ms=1e9), preload="all",
                  bench_runs=100, state_dir=state_dir)
    agent.listeners.append(lambda e: _print_event(e, clock, print_fn))
    agent.start()
    cleanup.callback(agent.close)
    controller = _join_fleet(cleanup, agent, state_dir, store, clock, print_fn) if fleet else None

    best = agent.policy.candidates[0]
    slo = slo_factor * best.bench_p95_ms
    agent.policy.update(latency_slo_ms=slo, cooldown_s=cooldown_s)
    print_fn(f"{clock()} {portfolio.manifest.name}: {len(agent.policy.candidates)} variants on {agent.backend.name}, "
             f"{agent.threads} threads; SLO {slo:.2f} ms = {slo_factor:g} x the bench p95 of {best.id}")
    print_fn(_bench_lines(agent))

    x, y, unlabelled = _replay_data(portfolio)
    schedule = [Phase("calm", "calm", calm_s), Phase("stress", "cpu", stress_s), Phase("after", "calm", after_s)]
    watch = (lambda: print_fn(_fleet_table(controller))) if controller else (lambda: None)
    say = {"calm": f"replaying {'evaluation inputs' if y is not None else 'samples'} at {rate_hz:g} Hz; "
                   f"calm for {calm_s:g} s",
           "stress": f"CPU stress on every core for {stress_s:g} s",
           "after": f"stress over; watching for {after_s:g} s (a step up waits {cooldown_s:g} s of calm)"}

    def on_phase(phase: Phase) -> None:
        print_fn(f"{clock()} {say[phase.name]}")
        if phase.name == "deploy":
            _deploy_second_release(controller, portfolio, state_dir, clock, print_fn)
            watch()

    if controller:  # the deploy happens while the replay goes on, outside the compared schedule
        say["deploy"] = "deploying a second release while serving"
        run = drive(agent, schedule + [Phase("deploy", "calm", 0.0)], None, x, y, rate_hz, on_phase, watch)
    else:
        run = drive(agent, schedule, None, x, y, rate_hz, on_phase, watch)
    profile, candidates = agent.profile, list(agent.policy.candidates)
    cleanup.close()  # leave the fleet (graceful offline), close the agent, stop the broker
    answered = [r for r in run.requests if r.outcome != "skipped"]
    failed = sum(r.outcome == "failed" for r in run.requests)
    skipped = len(run.requests) - len(answered)
    print_fn(f"{clock()} {len(answered)} requests, {failed} failed; "
             + (f"{skipped} slots skipped to keep pace; " if skipped else "") + f"{len(run.switches)} switches")
    for error in run.errors[:3]:
        print_fn(f"  {error}")
    latencies: dict[str, list[float]] = defaultdict(list)
    for r in run.requests:
        if r.outcome == "answered":
            latencies[r.variant].append(r.model_ms)
    print_fn(_latency_lines(latencies))
    if unlabelled:
        print_fn(f"{unlabelled}: no comparison with a pinned dense variant")
    else:
        dense = dense_variant(portfolio, candidates)
        _compare_with_dense(Portfolio.open(source_dir), profile, dense, schedule, run, x, y, rate_hz, slo, clock,
                            print_fn)
    return latencies


def _replay_data(portfolio: Portfolio) -> tuple[np.ndarray, np.ndarray | None, str | None]:
    """The labelled evaluation inputs, else the unlabelled samples and why."""
    try:
        x, y = portfolio.evaluation_data()
        return x, y, None
    except PortfolioError as error:
        return portfolio.samples().inputs[0], None, f"no labelled evaluation data ({error})"


def _compare_with_dense(portfolio: Portfolio, profile: DeviceProfile, dense: str, schedule: list[Phase],
                        adaptive: ServedRun, x: np.ndarray, y: np.ndarray, rate_hz: float, slo: float, clock,
                        print_fn) -> None:
    """Serve the same schedule pinned to dense, then both runs side by side and where the agent's answers came from."""
    print_fn(f"{clock()} the same {sum(p.seconds for p in schedule):g} s again, pinned to the dense variant, "
             f"{dense}, to see what the portfolio and its agent bought")
    with tempfile.TemporaryDirectory(prefix="edgeshift-demo-dense-") as scratch:
        pinned = serve_schedule(portfolio, profile, PolicySettings(latency_slo_ms=slo, pin=dense), schedule, x, y,
                                rate_hz, Path(scratch) / "sysfs", Path(scratch) / "state", bench_runs=10)
    compared = {p.name for p in schedule}
    rows = [score("adaptive (this run)", [r for r in adaptive.requests if r.phase in compared], slo,
                  len(adaptive.switches)),
            score(f"pinned {dense}", pinned.requests, slo, len(pinned.switches))]
    print_fn(score_table(rows))
    served = Counter(r.variant for r in adaptive.requests if r.phase in compared and r.outcome == "answered")
    print_fn(f"{clock()} {_bought(*rows)}; its answers came from " +
             ", ".join(f"{variant} ({count / sum(served.values()):.0%})" for variant, count in served.most_common()) +
             " (`python bench/adaptive.py` pins every variant in turn)")


def _bought(adaptive: RunScore, pinned: RunScore) -> str:
    return (f"the agent answered {adaptive.within_slo:.1%} of requests within the SLO vs {pinned.within_slo:.1%} "
            f"{pinned.mode}; effective accuracy {adaptive.effective_accuracy:.1%} vs {pinned.effective_accuracy:.1%}")


def _join_fleet(cleanup: ExitStack, agent: Agent, state_dir: Path, store: PortfolioStore, clock, print_fn):
    broker = cleanup.enter_context(LocalBroker())
    config = MqttConfig(host="127.0.0.1", port=broker.port, fleet=DEMO_FLEET, device_id=DEMO_DEVICE,
                        protocol=broker.protocol, telemetry_interval_s=2.0)
    member = FleetMember(agent, config, state_dir, store)
    member.start()
    cleanup.callback(member.stop)
    controller = Controller(BrokerOptions(port=broker.port, fleet=DEMO_FLEET, protocol=broker.protocol),
                            follow_telemetry=True).connect()
    cleanup.callback(controller.close)
    print_fn(f"{clock()} {DEMO_DEVICE} joined fleet '{DEMO_FLEET}' on a local {broker.kind} broker "
             f"(127.0.0.1:{broker.port}, MQTT {'5' if broker.protocol == 5 else '3.1.1'})")
    return controller


def _fleet_table(controller: Controller) -> str:
    return "edgeshift-fleet watch\n" + watch_table(controller.statuses(), controller.telemetry(), controller.last_events())


def _deploy_second_release(controller: Controller, portfolio: Portfolio, state_dir: Path, clock, print_fn) -> None:
    """Re-release the same variants under a new name and deploy it over MQTT, as an operator would."""
    release = Path(shutil.copytree(portfolio.root, state_dir / "release" / "portfolio"))
    manifest = json.loads((release / "manifest.json").read_text())
    manifest["name"] = f"{portfolio.manifest.name}-v2"
    (release / "manifest.json").write_text(json.dumps(manifest, indent=2))
    archive = pack_portfolio(release, state_dir / "release")
    print_fn(f"{clock()} edgeshift-fleet deploy {DEMO_DEVICE} {archive.name} (sha256 {sha256_file(archive)[:12]}...)")
    result = controller.send([DEMO_DEVICE], "deploy", {"source": str(archive), "sha256": sha256_file(archive)},
                             timeout_s=120)[0]
    print_fn(f"{clock()} {describe_result('deploy', result)}")


def _print_event(event: Event, clock, print_fn) -> None:
    if event.type == "switch":
        print_fn(f"{clock()} switch {event.details['from']} -> {event.details['to']} "
                 f"({event.details['switch_ms']:.2f} ms): {event.reason}")
    elif event.type in ("health", "error"):
        print_fn(f"{clock()} {event.type}: {event.reason}")


def _bench_lines(agent: Agent) -> str:
    width = max(30, *(len(c.id) for c in agent.policy.candidates))
    lines = [f"{'variant (most accurate first)':<{width}} {'accuracy':>8} {'bench p50 ms':>12} {'bench p95 ms':>12}"]
    for c in agent.policy.candidates:
        p50 = f"{c.bench_p50_ms:>12.3f}" if c.bench_p50_ms is not None else f"{'-':>12}"
        lines.append(f"{c.id:<{width}} {c.quality:>8.3f} {p50} {c.bench_p95_ms:>12.3f}")
    return "\n".join(lines)


def _latency_lines(latencies: dict[str, list[float]]) -> str:
    width = max(30, *(len(vid) for vid in latencies)) if latencies else 30
    lines = [f"{'served by':<{width}} {'requests':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}"]
    for vid, values in sorted(latencies.items(), key=lambda item: -len(item[1])):
        values = sorted(values)
        lines.append(f"{vid:<{width}} {len(values):>8} {percentile(values, 50):>8.3f} {percentile(values, 95):>8.3f} "
                     f"{percentile(values, 99):>8.3f}")
    return "\n".join(lines)
