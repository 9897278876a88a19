"""The daemon under systemd: READY after warm-up, STATUS with the reason, WATCHDOG only while inference works."""
from __future__ import annotations

import socket
import threading
import time

import pytest

from agent.config import parse_config
from agent.daemon import Daemon, build_agent
from agent.sdnotify import Notifier


@pytest.fixture
def notify_socket(tmp_path):
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.2)
    yield path, sock
    sock.close()


def received(sock) -> list[str]:
    messages = []
    while True:
        try:
            messages.append(sock.recv(4096).decode())
        except socket.timeout:
            return messages


def daemon_for(portfolio, tmp_path, socket_path) -> Daemon:
    config = parse_config({"device": "x86", "portfolio": str(portfolio), "state_dir": str(tmp_path / "state"),
                           "backend": "onnxruntime", "threads": 1, "http": {"listen": "127.0.0.1:0"},
                           "policy": {"latency_slo_ms": 1000.0, "interval_s": 0.1}})
    agent = build_agent(config)
    agent.bench_runs = 3
    return Daemon(agent, config, Notifier(str(socket_path)))


def run_for(daemon: Daemon, seconds: float) -> None:
    loop = threading.Thread(target=daemon.run)
    loop.start()
    time.sleep(seconds)
    daemon.stop()
    loop.join(timeout=10)


def test_ready_status_watchdog_and_stopping(small_portfolio, tmp_path, notify_socket, monkeypatch):
    path, sock = notify_socket
    monkeypatch.setenv("WATCHDOG_USEC", "400000")
    daemon = daemon_for(small_portfolio, tmp_path, path)

    daemon.start()
    ready = received(sock)
    run_for(daemon, 1.0)
    daemon.shutdown()
    later = received(sock)

    assert any(m.startswith("READY=1\nSTATUS=serving ") for m in ready)
    assert "WATCHDOG=1" in later
    assert later[-1] == "STOPPING=1"
    assert daemon.server is not None and daemon.server.port > 0


def test_watchdog_is_withheld_when_inference_makes_no_progress(small_portfolio, tmp_path, notify_socket, monkeypatch):
    path, sock = notify_socket
    monkeypatch.setenv("WATCHDOG_USEC", "400000")
    daemon = daemon_for(small_portfolio, tmp_path, path)
    daemon.start()
    received(sock)

    def stuck(*_args, **_kwargs):
        raise RuntimeError("the inference runtime is wedged")
    monkeypatch.setattr(daemon.agent, "infer", stuck)
    daemon.agent._progress_at = time.monotonic() - 60
    run_for(daemon, 1.0)
    daemon.shutdown()

    assert "WATCHDOG=1" not in received(sock)


def test_restart_resumes_the_last_active_variant(small_portfolio, tmp_path, notify_socket):
    path, _ = notify_socket
    daemon = daemon_for(small_portfolio, tmp_path, path)
    daemon.start()
    daemon.agent.switch("imp-l01-sparse", "operator")
    run_for(daemon, 0.5)  # policy rounds: within its cooldown, the policy holds
    last_active = daemon.agent.active
    daemon.shutdown()

    again = daemon_for(small_portfolio, tmp_path, path)
    again.start()
    assert last_active == "imp-l01-sparse"
    assert again.agent.active == last_active
    again.shutdown()


def test_a_late_answer_calls_the_next_policy_round_at_once(small_portfolio, tmp_path, notify_socket):
    daemon = daemon_for(small_portfolio, tmp_path, notify_socket[0])
    daemon.agent.start()
    try:
        stop = threading.Event()
        started = time.monotonic()
        daemon.agent.infer(daemon.agent.canary[0])  # within the 1 s SLO: no hurry
        assert daemon.agent.wait_for_round(0.5, stop) and time.monotonic() - started >= 0.5
        daemon.agent.policy.update(latency_slo_ms=1e-6)  # now every answer is late
        daemon.agent.infer(daemon.agent.canary[0])
        started = time.monotonic()
        assert daemon.agent.wait_for_round(60.0, stop) and time.monotonic() - started < 5.0
        stop.set()
        assert not daemon.agent.wait_for_round(60.0, stop)
    finally:
        daemon.agent.close()


def test_an_answer_late_only_from_waiting_counts_as_late(small_portfolio, tmp_path, notify_socket):
    daemon = daemon_for(small_portfolio, tmp_path, notify_socket[0])
    daemon.agent.start()
    try:
        stop = threading.Event()
        daemon.agent.infer(daemon.agent.canary[0])
        daemon.agent.wait_for_round(0.0, stop)  # clear a round the start may have asked for
        result = daemon.agent.infer(daemon.agent.canary[0], arrived=time.monotonic() - 5.0)  # queued 5 s
        assert result.latency_ms < 1000  # the model call itself is quick
        started = time.monotonic()
        assert daemon.agent.wait_for_round(60.0, stop) and time.monotonic() - started < 5.0
        window = daemon.agent.runtime.windows[result.variant]
        assert max(window.latencies()) >= 5000.0 and window.busy_share(min_span_s=0.0) < 0.5
    finally:
        daemon.agent.close()
