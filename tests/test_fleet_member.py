"""A fleet member end to end over a real broker: deploy a portfolio, refuse bad ones, roll back."""
import json
import shutil
import tarfile
import uuid

import numpy as np
import pytest

from agent.config import MqttConfig
from agent.fleet.deploy import PortfolioStore
from agent.fleet.member import FleetMember
from agent.policy import PolicySettings
from agent.portfolio import Portfolio, sha256_file
from agent.profiles import load_profile
from agent.service import Agent
from mqtt_broker import Broker, free_port, mosquitto_available, plain_config
from test_fleet_link import Client, wait_until

pytestmark = pytest.mark.skipif(not mosquitto_available(), reason="mosquitto is not installed")
FLEET = "test"


def archive(portfolio_dir, tmp_path, name: str, corrupt_samples: bool = False):
    """A deployable .tar.gz of `portfolio_dir` renamed to `name`, and its sha256."""
    copy = shutil.copytree(portfolio_dir, tmp_path / name)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["name"] = name
    (copy / "manifest.json").write_text(json.dumps(manifest))
    if corrupt_samples:  # valid files, but no variant reproduces its expected outputs: health checks fail
        samples = dict(np.load(copy / "samples.npz"))
        np.savez(copy / "samples.npz", **{k: (v + 1.0 if k.startswith("y_") else v) for k, v in samples.items()})
    target = tmp_path / f"{name}.tar.gz"
    with tarfile.open(target, "w:gz") as tar:
        tar.add(copy, arcname=name)
    return target, sha256_file(target)


@pytest.fixture
def member(small_portfolio, tmp_path):
    directory = tmp_path / "broker"
    directory.mkdir()
    port = free_port()
    broker = Broker(plain_config(port, directory), directory, port).start()
    state = tmp_path / "state"
    store = PortfolioStore(state, health_check=lambda portfolio: {})  # the agent runs the real health checks
    current = store.install_initial(small_portfolio)
    agent = Agent(Portfolio.open(current), load_profile("x86"), PolicySettings(latency_slo_ms=1000),
                  backend="onnxruntime", threads=1, bench_runs=3, state_dir=state)
    agent.start()
    device = f"dev-{uuid.uuid4().hex[:8]}"
    member = FleetMember(agent, MqttConfig(host="127.0.0.1", port=port, fleet=FLEET, device_id=device), state, store)
    member.start()
    wait_until(lambda: member.link.connected, what="the link to connect")
    client = Client(port, [f"edgeshift/{FLEET}/{device}/#"])
    yield member, client, device
    client.close()
    member.stop()
    agent.close()
    broker.stop()


def command(client, device: str, name: str, args: dict) -> dict:
    request_id = uuid.uuid4().hex
    client.command(f"edgeshift/{FLEET}/{device}/cmd/{name}", {"id": request_id, "args": args})
    return client.wait_for(f"edgeshift/{FLEET}/{device}/cmd/{name}/result", lambda p: p.get("id") == request_id)[0]


def test_deploy_switches_the_agent_and_rollback_returns(member, small_portfolio, tmp_path):
    fleet_member, client, device = member
    first = fleet_member.agent.name
    target, digest = archive(small_portfolio, tmp_path, "second")

    deployed = command(client, device, "deploy", {"source": str(target), "sha256": digest})
    assert deployed["ok"], deployed
    assert fleet_member.agent.name == "second" and deployed["result"]["portfolio"] == "second"
    x = fleet_member.agent.portfolio.samples().inputs[0][:1]
    assert fleet_member.agent.infer(x).outputs[0].shape == (1, 10)

    rolled = command(client, device, "rollback", {})
    assert rolled["ok"], rolled
    assert fleet_member.agent.name == first
    assert fleet_member.store.current().name.startswith(first)


def test_bad_checksum_is_refused_and_nothing_changes(member, small_portfolio, tmp_path):
    fleet_member, client, device = member
    before = fleet_member.store.current()
    target, _ = archive(small_portfolio, tmp_path, "second")

    result = command(client, device, "deploy", {"source": str(target), "sha256": "0" * 64})

    assert not result["ok"] and "sha256" in result["error"]
    assert fleet_member.store.current() == before and fleet_member.agent.name != "second"
    events = client.wait_for(f"edgeshift/{FLEET}/{device}/events", lambda p: p.get("type") == "error")
    assert "deploy refused" in events[0]["reason"]


def test_portfolio_the_agent_refuses_is_rolled_back(member, small_portfolio, tmp_path):
    fleet_member, client, device = member
    before = fleet_member.store.current()
    target, digest = archive(small_portfolio, tmp_path, "broken", corrupt_samples=True)

    result = command(client, device, "deploy", {"source": str(target), "sha256": digest})

    assert not result["ok"] and "no variant passed its health check" in result["error"]
    assert fleet_member.store.current() == before and fleet_member.agent.name != "broken"


def test_deploy_arguments_are_checked(member):
    fleet_member, client, device = member
    result = command(client, device, "deploy", {"source": 42})
    assert not result["ok"] and "deploy takes" in result["error"]
