"""The demo's throwaway broker: mosquitto when installed, else the embedded amqtt (MQTT 3.1.1)."""
import threading

import paho.mqtt.client as mqtt
import pytest

import agent.fleet.local_broker as local_broker
from agent.fleet.local_broker import LocalBroker


def round_trip(broker: LocalBroker) -> bool:
    received, subscribed = threading.Event(), threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                         protocol=mqtt.MQTTv5 if broker.protocol == 5 else mqtt.MQTTv311)
    client.on_connect = lambda c, *_: c.subscribe("demo/#", 1)
    client.on_subscribe = lambda *_: subscribed.set()
    client.on_message = lambda *_: received.set()
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    try:
        assert subscribed.wait(5)
        client.publish("demo/x", b"hello", qos=1)
        return received.wait(5)
    finally:
        client.loop_stop()
        client.disconnect()


@pytest.mark.skipif(local_broker._mosquitto() is None, reason="mosquitto is not installed")
def test_mosquitto_broker_carries_messages_over_mqtt5():
    with LocalBroker() as broker:
        assert broker.kind == "mosquitto" and broker.protocol == 5
        assert round_trip(broker)


def test_embedded_amqtt_broker_when_mosquitto_is_absent(monkeypatch):
    pytest.importorskip("amqtt", reason="amqtt 0.11 needs Python 3.10+ (the dev extra skips it on older ones)")
    monkeypatch.setattr(local_broker, "_mosquitto", lambda: None)
    with LocalBroker() as broker:
        assert broker.kind == "amqtt" and broker.protocol == 3
        assert round_trip(broker)
