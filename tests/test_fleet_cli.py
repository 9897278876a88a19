"""edgeshift-fleet against a real mosquitto and a real agent that is a fleet member: list devices,
watch them, command them (MQTT 5 and 3.1.1), deploy and roll back, and refuse bad input."""
from __future__ import annotations

import shlex
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.config import MqttConfig
from agent.fleet.cli import main
from agent.fleet.deploy import PortfolioStore
from agent.fleet.member import FleetMember
from agent.policy import PolicySettings
from agent.portfolio import Portfolio
from agent.profiles import load_profile
from agent.service import Agent
from mqtt_broker import free_port, mosquitto_available
from test_fleet_link import wait_until
from test_fleet_member import archive

pytestmark = pytest.mark.skipif(not mosquitto_available(), reason="mosquitto is not installed")


@dataclass
class Device:
    name: str
    fleet: str
    port: int
    agent: Agent
    member: FleetMember

    def cli(self, *argv: str) -> int:
        """edgeshift-fleet with this device's broker and fleet."""
        return main(["--port", str(self.port), "--fleet", self.fleet, *argv])

    def stop(self) -> None:
        self.member.stop()
        self.agent.close()


def start_device(portfolio: Path, port: int, state: Path) -> Device:
    """A started agent serving `portfolio`, joined to a fleet of its own on the broker at `port`."""
    store = PortfolioStore(state, health_check=lambda portfolio: {})  # the agent runs the real health checks
    agent = Agent(Portfolio.open(store.install_initial(portfolio)), load_profile("x86"),
                  PolicySettings(latency_slo_ms=1000), backend="onnxruntime", threads=1, bench_runs=3, state_dir=state)
    agent.start()
    name, fleet = f"dev-{uuid.uuid4().hex[:8]}", f"fleet-{uuid.uuid4().hex[:8]}"
    member = FleetMember(agent, MqttConfig(port=port, fleet=fleet, device_id=name), state, store)
    member.start()
    wait_until(lambda: member.link.connected, what="the device to connect")
    return Device(name, fleet, port, agent, member)


@pytest.fixture(scope="module")
def device(small_portfolio, broker, tmp_path_factory):
    """Shared by the tests whose commands leave no trace (or that undo them)."""
    started = start_device(small_portfolio, broker.port, tmp_path_factory.mktemp("state"))
    yield started
    started.stop()


@pytest.fixture
def own_device(small_portfolio, broker, tmp_path):
    """A device for one test: it may be stopped or given a new portfolio."""
    started = start_device(small_portfolio, broker.port, tmp_path / "state")
    yield started
    started.stop()


def output_line(out: str, device: Device) -> str:
    return next(line for line in out.splitlines() if line.startswith(device.name))


def another_variant(device: Device) -> str:
    return next(v for v in device.agent.status()["variants"] if v != device.agent.active)


# ------------------------------------------------------------------ devices and watch


def test_devices_lists_the_device_online_then_offline_after_it_stops(own_device, capsys):
    assert own_device.cli("devices") == 0
    row = output_line(capsys.readouterr().out, own_device).split()
    assert row[:4] == [own_device.name, "online", "1", own_device.agent.active]
    assert own_device.agent.name in row

    own_device.member.stop()

    assert own_device.cli("devices") == 0
    assert output_line(capsys.readouterr().out, own_device).split()[:3] == [own_device.name, "offline", "1"]


def test_watch_prints_a_table_with_the_device_and_its_active_variant(device, capsys):
    assert device.cli("watch", "--count", "1", "--interval", "0.1") == 0
    out = capsys.readouterr().out
    assert "DEVICE" in out and "P95" in out and "LAST EVENT" in out
    assert output_line(out, device).split()[:3] == [device.name, "online", device.agent.active]


# ------------------------------------------------------------------ commands


def test_ping_answers_ok(device, capsys):
    assert device.cli("ping", device.name) == 0
    assert output_line(capsys.readouterr().out, device).split()[1:3] == ["ok", "pong"]


def test_ping_over_mqtt_3_matches_results_by_id(device, capsys):
    assert device.cli("--protocol", "3", "ping", device.name) == 0
    assert " ok " in output_line(capsys.readouterr().out, device)


def test_switch_changes_the_active_variant(device, capsys):
    target = another_variant(device)
    assert device.cli("switch", device.name, target) == 0
    assert f"active={target}" in output_line(capsys.readouterr().out, device)
    assert device.agent.active == target


def test_switch_to_an_unknown_variant_fails_with_the_devices_error(device, capsys):
    assert device.cli("switch", device.name, "no-such-variant") == 1
    line = output_line(capsys.readouterr().out, device)
    assert " error " in line and "no-such-variant" in line


def test_pin_then_unpin(device, capsys):
    target = another_variant(device)
    assert device.cli("pin", device.name, target) == 0
    assert device.agent.policy.settings.pin == target and device.agent.active == target
    assert device.cli("unpin", device.name) == 0
    assert device.agent.policy.settings.pin is None
    assert capsys.readouterr().out.count(" ok ") == 2


def test_policy_sets_the_latency_slo(device, capsys):
    assert device.cli("policy", device.name, "--slo", "250") == 0
    assert "latency_slo_ms=250.0" in output_line(capsys.readouterr().out, device)
    assert device.agent.policy.settings.latency_slo_ms == 250
    assert device.cli("policy", device.name, "--slo", "1000") == 0


def test_bench_measures_every_variant(device, capsys):
    assert device.cli("bench", device.name, "--runs", "2") == 0
    line = output_line(capsys.readouterr().out, device)
    assert " ok " in line and all(variant in line for variant in device.agent.status()["variants"])


def test_all_reaches_every_online_device(device, capsys):
    assert device.cli("ping", "--all") == 0
    assert " ok " in output_line(capsys.readouterr().out, device)


def test_a_device_that_does_not_exist_times_out(device, capsys):
    started = time.monotonic()
    assert device.cli("ping", "no-such-device", "--timeout", "2") == 1
    assert time.monotonic() - started < 10
    assert "timeout  no answer within 2 s" in capsys.readouterr().out


# ------------------------------------------------------------------ deploy and rollback


def test_deploy_from_serve_portfolio_over_http(own_device, small_portfolio, tmp_path, capsys):
    archive(small_portfolio, tmp_path, "served")  # leaves the renamed copy in tmp_path/served
    http_port = free_port()
    server = threading.Thread(target=main, args=(["serve-portfolio", str(tmp_path / "served"),
                                                  "--port", str(http_port), "--once", "--seconds", "60"],))
    server.start()
    seen: list[str] = []

    def printed_so_far() -> str | None:
        seen.append(capsys.readouterr().out)
        return "".join(seen) if "edgeshift-fleet deploy" in "".join(seen) else None

    printed = wait_until(printed_so_far, what="serve-portfolio to print the deploy command")
    command = next(line for line in printed.splitlines() if "edgeshift-fleet deploy" in line)
    assert f"http://127.0.0.1:{http_port}/served.tar.gz" in printed and "sha256" in printed

    assert own_device.cli(*shlex.split(command)[1:]) == 0
    server.join(timeout=30)
    assert not server.is_alive()
    assert "portfolio=served" in output_line(capsys.readouterr().out, own_device)
    assert own_device.agent.name == "served"


def test_deploy_of_a_local_archive_then_rollback(own_device, small_portfolio, tmp_path, capsys):
    first = own_device.agent.name
    target, _ = archive(small_portfolio, tmp_path, "second")

    assert own_device.cli("deploy", own_device.name, str(target)) == 0  # sha256 computed here
    assert own_device.agent.name == "second"
    assert own_device.cli("rollback", own_device.name) == 0
    assert own_device.agent.name == first
    assert capsys.readouterr().out.count(" ok ") == 2


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("argv, message", [
    (["no-such-command"], "invalid choice: 'no-such-command'"),
    (["switch", "dev-1"], "switch: give DEVICE VARIANT or --all VARIANT"),
    (["--protocol", "4", "ping", "dev-1"], "argument --protocol: invalid choice: 4"),
    (["ping", "dev-1", "--all"], "not both"),
    (["policy", "dev-1"], "give at least one of --slo"),
    (["bench", "dev-1", "--runs", "0"], "--runs: must be a positive integer"),
    (["deploy", "dev-1", "http://example.invalid/p.tar.gz"], "--sha256 is required for a URL"),
    (["serve-portfolio", "/nonexistent"], "not a directory"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("edgeshift-fleet: error: ") and message in err and "\n" not in err
