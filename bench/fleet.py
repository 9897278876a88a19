"""The fleet link on loopback: command round trip, event throughput, and spool replay after an outage.

Its own mosquitto on a free port (tests/mqtt_broker.py), a real agent serving the default portfolio,
and a FleetLink with the durable SQLite spool as its outbox (as the daemon's FleetMember has):

  round trip   `ping` from agent.fleet.controller.Controller to the agent and back (MQTT 5, response
               topic + correlation data), one at a time; p50/p99 over N
  events       publish_event in a tight loop for a few seconds; a subscriber (QoS 1) counts them and
               checks that the sequence numbers are continuous; rate = events delivered / time from the
               first publish to the last arrival (everything put must arrive: no loss)
  replay       stop the broker, publish K events (they wait in the spool), restart the broker, time
               until all K arrived at a subscriber with a persistent session

Round trips on loopback are dominated by Nagle's algorithm meeting delayed ACKs (~40 ms a hop
whose sender has not set TCP_NODELAY): the controller sets it; the device link and mosquitto
(`set_tcp_nodelay true`) decide the rest.

    python bench/fleet.py                    # ~30 s on 2 cores
    python bench/fleet.py --broker-nodelay   # the same with mosquitto's set_tcp_nodelay
    python bench/fleet.py --pings 50 --events-seconds 1 --replay 500   # a quick look
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from agent.config import MqttConfig  # noqa: E402
from agent.fleet.controller import BrokerOptions, Controller  # noqa: E402
from agent.fleet.link import FleetLink  # noqa: E402
from agent.fleet.spool import Spool  # noqa: E402
from bench._portfolio import default_portfolio, start_agent  # noqa: E402
from mqtt_broker import Broker, free_port, mosquitto_available, plain_config  # noqa: E402

FLEET, DEVICE = "bench", "bench-device"
WAIT_S = 60.0


class EventCounter:
    """Subscribes to the device's events (QoS 1) and records each one's seq and arrival time."""

    def __init__(self, port: int, topic: str, persistent: bool = False):
        self.seqs: list[int] = []
        self.arrivals: list[float] = []
        self.topic = topic
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-counter-{persistent}",
                                  protocol=mqtt.MQTTv5)
        self.client.reconnect_delay_set(1, 1)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *args: self._subscribed.set()
        self.client.on_message = self._on_message
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = 3600 if persistent else 0
        self.client.connect("127.0.0.1", port, clean_start=not persistent, properties=properties)
        self.client.loop_start()
        if not self._subscribed.wait(WAIT_S):
            raise RuntimeError("the counter could not subscribe")

    def _on_message(self, client, userdata, message) -> None:
        seq = json.loads(message.payload)["seq"]
        with self._lock:
            self.seqs.append(seq)
            self.arrivals.append(time.perf_counter())

    def wait_for(self, count: int, timeout_s: float = WAIT_S) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.seqs) >= count:
                    return True
            time.sleep(0.005)
        return False

    def gaps(self) -> int:
        """Missing or out-of-order sequence numbers between the first and the last seen."""
        with self._lock:
            seqs = self.seqs
            return sum(1 for a, b in zip(seqs, seqs[1:]) if b != a + 1)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def wait_until(condition, what: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.01)


def round_trip(port: int, pings: int) -> None:
    with Controller(BrokerOptions(port=port, fleet=FLEET)) as controller:
        controller.send([DEVICE], "ping", {}, 10)  # warm-up
        times = []
        for _ in range(pings):
            result = controller.send([DEVICE], "ping", {}, 10)[0]
            if not result.ok:
                raise RuntimeError(f"ping failed: {result.error}")
            times.append(result.elapsed_s * 1000)
    p50, p99 = np.percentile(times, [50, 99])
    print(f"command round trip (ping, MQTT 5, N={pings}): p50 {p50:.2f} ms, p99 {p99:.2f} ms, max {max(times):.2f} ms")


def event_rate(link: FleetLink, port: int, seconds: float) -> None:
    counter = EventCounter(port, link.topics.events)
    started = time.perf_counter()
    published = 0
    while time.perf_counter() - started < seconds:
        link.publish_event("bench", "throughput", {"n": published})
        published += 1
    put_s = time.perf_counter() - started
    arrived = counter.wait_for(published)
    delivered = len(counter.seqs)
    last = counter.arrivals[-1] if counter.arrivals else started
    counter.close()
    print(f"events: {published} published in {put_s:.1f} s ({published / put_s:.0f}/s into the spool), "
          f"{delivered} delivered, {counter.gaps()} seq gaps, {'no loss' if arrived else 'LOSS'}; "
          f"sustained {delivered / (last - started):.0f} events/s end to end")


def replay_rate(link: FleetLink, broker: Broker, spool: Spool, count: int) -> None:
    counter = EventCounter(broker.port, link.topics.events, persistent=True)
    broker.stop()
    wait_until(lambda: not link.connected, "the link to notice the outage")
    for n in range(count):
        link.publish_event("bench", "during the outage", {"n": n})
    spooled = len(spool.pending(count + 10))
    restarted = time.perf_counter()
    broker.start()
    arrived = counter.wait_for(count)
    connected_at = None
    if counter.arrivals:
        connected_at = counter.arrivals[0]
    elapsed = counter.arrivals[-1] - restarted if counter.arrivals else float("nan")
    span = counter.arrivals[-1] - connected_at if connected_at else float("nan")
    gaps = counter.gaps()
    counter.close()
    print(f"spool replay: {spooled} events spooled during the outage; {len(counter.seqs)} arrived "
          f"({'all' if arrived else 'NOT ALL'}, {gaps} seq gaps) {elapsed:.2f} s after the broker restarted "
          f"(reconnect back-off 1 s included): {count / elapsed:.0f} msg/s; "
          f"first to last arrival {span:.2f} s: {count / span:.0f} msg/s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pings", type=int, default=200)
    parser.add_argument("--events-seconds", type=float, default=3.0)
    parser.add_argument("--replay", type=int, default=5000, help="events generated during the outage")
    parser.add_argument("--broker-nodelay", action="store_true",
                        help="mosquitto's set_tcp_nodelay (the controller always sets TCP_NODELAY itself)")
    args = parser.parse_args()
    logging.getLogger("edgeshift").setLevel(logging.ERROR)  # the outage is on purpose: no reconnect warnings
    logging.getLogger("edgeshift.fleet.paho").setLevel(logging.CRITICAL)
    if not mosquitto_available():
        raise SystemExit("mosquitto is not installed")
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as work:
        work = Path(work)
        port = free_port()
        broker_dir = work / "broker"
        broker_dir.mkdir()
        # The persistent counter must get every replayed event: no limit on its queue while it is away.
        config = plain_config(port, broker_dir) + "max_queued_messages 0\n"
        if args.broker_nodelay:
            config += "set_tcp_nodelay true\n"
        broker = Broker(config, broker_dir, port).start()
        agent = start_agent(default_portfolio(), preload="lazy", threads=1)
        spool = Spool(work / "state" / "spool.sqlite")
        link = FleetLink(agent, MqttConfig(port=port, fleet=FLEET, device_id=DEVICE, telemetry_interval_s=60),
                         work / "state", outbox=spool, reconnect_delay_s=(1, 1))
        try:
            link.start()
            wait_until(lambda: link.connected, "the link to connect")
            print(f"loopback, mosquitto on port {port}{' (set_tcp_nodelay true)' if args.broker_nodelay else ''}, "
                  f"agent serving {agent.name}; spool outbox (SQLite)")
            round_trip(port, args.pings)
            event_rate(link, port, args.events_seconds)
            replay_rate(link, broker, spool, args.replay)
        finally:
            link.stop()
            spool.close()
            agent.close()
            broker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
