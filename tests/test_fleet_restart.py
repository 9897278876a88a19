"""The real `edgeshift-agent run` in the fleet: deploy and switch over MQTT, kill -9, restart, resume."""
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import uuid

import pytest

from agent.portfolio import sha256_file
from mqtt_broker import Broker, free_port, mosquitto_available, plain_config
from test_fleet_link import Client

pytestmark = pytest.mark.skipif(not mosquitto_available(), reason="mosquitto is not installed")
FLEET = "restart"


def release(portfolio_dir, tmp_path, name: str):
    copy = shutil.copytree(portfolio_dir, tmp_path / name)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["name"] = name
    (copy / "manifest.json").write_text(json.dumps(manifest))
    target = tmp_path / f"{name}.tar.gz"
    with tarfile.open(target, "w:gz") as tar:
        tar.add(copy, arcname=name)
    return target


def start_agent(config_path, log_path) -> subprocess.Popen:
    log = open(log_path, "ab")
    return subprocess.Popen([sys.executable, "-m", "agent.cli", "--log-level", "warning", "run", "--config",
                             str(config_path)], stdout=log, stderr=log)


def test_a_killed_agent_resumes_its_deployed_portfolio_and_variant(small_portfolio, tmp_path):
    directory = tmp_path / "broker"
    directory.mkdir()
    port = free_port()
    device = f"dev-{uuid.uuid4().hex[:8]}"
    config = tmp_path / "agent.toml"
    config.write_text(f"""
device = "x86"
portfolio = "{small_portfolio}"
state_dir = "{tmp_path / 'state'}"
backend = "onnxruntime"
threads = 1
[http]
listen = ""
[policy]
latency_slo_ms = 1000.0
cooldown_s = 600.0
[mqtt]
host = "127.0.0.1"
port = {port}
fleet = "{FLEET}"
device_id = "{device}"
telemetry_interval_s = 1.0
""")
    prefix = f"edgeshift/{FLEET}/{device}/"
    archive = release(small_portfolio, tmp_path, "second")
    with Broker(plain_config(port, directory), directory, port):
        watcher = Client(port, [prefix + "#"])
        process = start_agent(config, tmp_path / "agent.log")
        try:
            watcher.wait_for(prefix + "status", lambda p: p.get("state") == "online" and p["session"] == 1)
            for name, args in [("deploy", {"source": str(archive), "sha256": sha256_file(archive)}),
                               ("switch", {"variant": "imp-l01-sparse"})]:
                request_id = uuid.uuid4().hex
                watcher.command(prefix + f"cmd/{name}", {"id": request_id, "args": args})
                answer = watcher.wait_for(prefix + f"cmd/{name}/result", lambda p: p.get("id") == request_id)[0]
                assert answer["ok"], (answer, (tmp_path / "agent.log").read_text())

            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
            will = watcher.wait_for(prefix + "status", lambda p: p.get("state") == "offline")[0]
            assert will["session"] == 1

            process = start_agent(config, tmp_path / "agent.log")
            birth = watcher.wait_for(prefix + "status", lambda p: p.get("state") == "online" and p["session"] == 2)[0]
            assert birth["portfolio"]["name"] == "second"
            assert birth["active"] == "imp-l01-sparse"
        finally:
            process.terminate()
            process.wait(timeout=20)
            watcher.close()
    offline = [p for p in watcher.payloads(prefix + "status") if p.get("state") == "offline"]
    assert offline[-1]["session"] == 2  # the graceful stop said goodbye with its own session
