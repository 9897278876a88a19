"""Reserved ids: `all` and `controller` are refused as a device id or fleet name by the agent's
configuration and by edgeshift-fleet (exit 2, one line), and the shipped ACL (fleet/acl) keeps a
device inside its own subtree on a real mosquitto with a mosquitto_passwd password file."""
from __future__ import annotations

import json
import shutil
import threading
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from agent.cli import main as agent_main
from agent.config import ConfigError, parse_config
from agent.fleet.cli import main as fleet_main
from agent.fleet.controller import BrokerOptions, Controller
from agent.fleet.topics import RESERVED_IDS, Topics
from mqtt_broker import Broker, free_port, mosquitto_available, plain_config, write_password_file

REPO = Path(__file__).resolve().parents[1]
BASE = {"device": "x86", "portfolio": "/p", "state_dir": "/s"}
WAIT_S = 20.0


@pytest.mark.parametrize("key", ["device_id", "fleet"])
@pytest.mark.parametrize("name", RESERVED_IDS)
def test_the_agent_config_refuses_reserved_ids(key, name):
    with pytest.raises(ConfigError, match=rf"mqtt.{key}: .*'{name}' is reserved"):
        parse_config({**BASE, "mqtt": {key: name}})
    with pytest.raises(ValueError, match="is reserved"):
        Topics(name, "pi1") if key == "fleet" else Topics("default", name)


def test_similar_ids_are_fine():
    config = parse_config({**BASE, "mqtt": {"fleet": "all-devices", "device_id": "controller-2"}})
    assert config.mqtt.device_id == "controller-2"


@pytest.mark.parametrize("name", RESERVED_IDS)
def test_edgeshift_agent_run_exits_2_with_one_line(tmp_path, capsys, name):
    config = tmp_path / "agent.toml"
    config.write_text(f'device = "x86"\nportfolio = "{tmp_path}/p"\nstate_dir = "{tmp_path}/s"\n'
                      f'[mqtt]\ndevice_id = "{name}"\n')
    assert agent_main(["run", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"'{name}' is reserved" in err


@pytest.mark.parametrize("argv", [["--fleet", "all", "devices"], ["--fleet", "controller", "ping", "pi1"],
                                  ["ping", "all"], ["pin", "controller", "dense"]])
def test_edgeshift_fleet_refuses_reserved_ids_before_connecting(capsys, argv):
    # No broker listens on this port: the refusal must come before any connection attempt.
    assert fleet_main(["--port", str(free_port()), "--timeout", "1", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "is reserved" in err
    with pytest.raises(ValueError, match="is reserved"):
        Controller(BrokerOptions(fleet="all"))


# ------------------------------------------------------------------ the shipped ACL on a real broker


USERS = {"controller": "boss", "pi1": "one", "pi2": "two", "all": "sneaky", "homeassistant": "ha"}


@pytest.fixture(scope="module")
def acl_broker(tmp_path_factory):
    if not mosquitto_available() or shutil.which("mosquitto_passwd") is None:
        pytest.skip("needs mosquitto and mosquitto_passwd")
    directory = tmp_path_factory.mktemp("mosquitto-acl")
    passwords = write_password_file(directory / "passwd", USERS)  # made with mosquitto_passwd
    acl = shutil.copy(REPO / "fleet" / "acl", directory / "acl")
    port = free_port()
    config = plain_config(port, directory).replace(
        "allow_anonymous true", f"allow_anonymous false\npassword_file {passwords}\nacl_file {acl}")
    with Broker(config, directory, port) as running:
        yield running


class Recorder:
    def __init__(self, port: int, user: str, subscriptions: list[str]):
        self.messages: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"t-{user}-{uuid.uuid4().hex[:8]}",
                                  protocol=mqtt.MQTTv5)
        self.client.username_pw_set(user, USERS[user])
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe([(t, 1) for t in subscriptions]) if subscriptions \
            else self._subscribed.set()
        self.client.on_subscribe = lambda *args: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self._subscribed.wait(WAIT_S), f"{user} could not connect"

    def _on_message(self, client, userdata, message):
        with self._lock:
            self.messages.append((message.topic, message.payload))

    def topics(self) -> list[str]:
        with self._lock:
            return [topic for topic, _ in self.messages]

    def publish(self, topic: str, payload: bytes = b'{"id": "x"}') -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(WAIT_S)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _wait_for(recorder: Recorder, topic: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while topic not in recorder.topics():
        assert time.monotonic() < deadline, f"{topic} never arrived"
        time.sleep(0.02)


def test_a_device_cannot_publish_outside_its_own_subtree(acl_broker):
    controller = Recorder(acl_broker.port, "controller", ["edgeshift/#"])
    ha = Recorder(acl_broker.port, "homeassistant", ["homeassistant/#"])
    pi1 = Recorder(acl_broker.port, "pi1", [])
    sneaky = Recorder(acl_broker.port, "all", [])
    try:
        forbidden = ["edgeshift/default/all/cmd/switch", "edgeshift/default/pi2/cmd/pin",
                     "edgeshift/default/pi2/status", "edgeshift/default/controller/status",
                     "edgeshift/other/pi1/status"]
        for topic in forbidden:
            pi1.publish(topic)
        pi1.publish("homeassistant/select/pi2/pin/config", b"{}")  # another device's discovery
        sneaky.publish("edgeshift/default/all/cmd/switch")  # a login named "all": denied by the ACL's deny block
        pi1.publish("homeassistant/select/pi1/pin/config", b"{}")  # its own discovery: allowed
        pi1.publish("edgeshift/default/pi1/status")  # its own subtree: allowed, and published last
        _wait_for(controller, "edgeshift/default/pi1/status")
        _wait_for(ha, "homeassistant/select/pi1/pin/config")
        assert controller.topics() == ["edgeshift/default/pi1/status"]
        assert ha.topics() == ["homeassistant/select/pi1/pin/config"]
        # The controller itself may command the fleet, and pi1 reads the broadcast.
        listener = Recorder(acl_broker.port, "pi1", ["edgeshift/default/all/cmd/+"])
        try:
            controller.publish("edgeshift/default/all/cmd/ping", json.dumps({"id": "c1"}).encode())
            _wait_for(listener, "edgeshift/default/all/cmd/ping")
        finally:
            listener.close()
    finally:
        for client in (controller, ha, pi1, sneaky):
            client.close()
