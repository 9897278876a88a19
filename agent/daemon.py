"""`edgeshift-agent run`: the long-running process (HTTP front, policy loop, systemd integration)."""
from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path

from agent.config import AgentConfig, parse_listen
from agent.fleet.deploy import PortfolioStore
from agent.fleet.member import FleetMember
from agent.http_api import InferenceServer
from agent.policy import PolicySettings
from agent.portfolio import Portfolio
from agent.profiles import load_profile
from agent.sdnotify import Notifier, watchdog_interval_s
from agent.service import Agent, Event
from agent.signing import verify_manifest_signature

log = logging.getLogger("edgeshift.daemon")


def build_agent(config: AgentConfig, portfolio_dir: Path | None = None) -> Agent:
    """Everything the config names, verified: profile, portfolio (and signature), policy."""
    profile = load_profile(config.device)
    portfolio_dir = Path(portfolio_dir or config.portfolio)
    if config.public_key is not None:
        verify_manifest_signature(portfolio_dir, config.public_key)
    portfolio = Portfolio.open(portfolio_dir)
    p = config.policy
    settings = PolicySettings(latency_slo_ms=p.latency_slo_ms or profile.latency_slo_ms,
                              memory_budget_mb=p.memory_budget_mb or profile.memory_budget_mb,
                              cooldown_s=p.cooldown_s, headroom=p.headroom, pin=p.pin)
    return Agent(portfolio, profile, settings, backend=config.backend, threads=config.threads,
                 preload=config.preload, state_dir=config.state_dir, max_batch=config.max_batch,
                 providers=config.providers)


class Daemon:
    """Runs an Agent until stopped: policy rounds, HTTP, sd_notify READY / STATUS / WATCHDOG."""

    def __init__(self, agent: Agent, config: AgentConfig, notifier: Notifier | None = None,
                 store: PortfolioStore | None = None):
        self.agent = agent
        self.config = config
        self.notifier = notifier or Notifier()
        self.store = store
        self.stop_event = threading.Event()
        self.server: InferenceServer | None = None
        self.member: FleetMember | None = None
        agent.listeners.append(self._on_event)

    def start(self) -> None:
        self.agent.start()
        if self.config.http.listen:
            host, port = parse_listen(self.config.http.listen)
            self.server = InferenceServer(self.agent, host, port, int(self.config.http.max_body_mb * 2**20)).start()
            log.info("serving %s on http://%s:%d", self.agent.name, self.server.host, self.server.port)
        if self.config.mqtt is not None:
            store = self.store or PortfolioStore(self.config.state_dir, public_key=self.config.public_key)
            self.member = FleetMember(self.agent, self.config.mqtt, self.config.state_dir, store)
            self.member.start()
        self.notifier.ready(self._status_line())

    def run(self) -> None:
        """Policy rounds until stop(); the watchdog is fed only while inference makes progress."""
        interval = self.config.policy.interval_s
        watchdog = watchdog_interval_s()
        while self.agent.wait_for_round(interval, self.stop_event):
            try:
                self.agent.step()
            except Exception:  # one bad round (a sensor, a failed switch) must not end the agent
                log.exception("policy round failed")
            if watchdog is not None and self._inference_alive(max(watchdog, interval)):
                self.notifier.watchdog()

    def stop(self, *_: object) -> None:
        self.stop_event.set()
        self.agent.request_round()

    def shutdown(self) -> None:
        self.notifier.stopping()
        if self.member is not None:
            self.member.stop()  # publishes the graceful offline before disconnecting
        if self.server is not None:
            self.server.stop()
        self.agent.close()

    def _inference_alive(self, window_s: float) -> bool:
        """Progress means a request finished recently; when idle, a canary request must finish now."""
        if self.agent.made_progress_within(window_s):
            return True
        try:
            self.agent.infer(self.agent.canary)
            return True
        except Exception:
            log.exception("canary inference failed; withholding the watchdog")
            return False

    def _on_event(self, event: Event) -> None:
        if event.type in ("switch", "start", "policy"):
            self.notifier.status(self._status_line())

    def _status_line(self) -> str:
        decision = self.agent.last_decision
        why = decision.reason if decision else "starting"
        return f"serving {self.agent.active} ({why})" if self.agent.runtime else "starting"


def run_daemon(config: AgentConfig) -> None:
    store, portfolio_dir = None, Path(config.portfolio)
    if config.mqtt is not None:  # a fleet member serves the store's `current`, which deploys move
        store = PortfolioStore(config.state_dir, public_key=config.public_key)
        if store.current() is None:
            store.install_initial(portfolio_dir)
        portfolio_dir = store.current()
    daemon = Daemon(build_agent(config, portfolio_dir), config, store=store)
    signal.signal(signal.SIGTERM, daemon.stop)
    signal.signal(signal.SIGINT, daemon.stop)
    started = time.monotonic()
    daemon.start()
    log.info("ready in %.1f s", time.monotonic() - started)
    try:
        daemon.run()
    finally:
        daemon.shutdown()
