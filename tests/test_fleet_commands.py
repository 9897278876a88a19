"""Fleet commands: each command on a real Agent, every way a message can be wrong, and a fuzz."""
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.fleet.commands import CommandHandler
from agent.policy import PolicySettings
from agent.portfolio import Portfolio
from agent.profiles import load_profile
from agent.service import Agent


@pytest.fixture(scope="module")
def agent(small_portfolio):
    agent = Agent(Portfolio.open(small_portfolio), load_profile("x86"), PolicySettings(latency_slo_ms=1000),
                  backend="onnxruntime", threads=1, bench_runs=3)
    agent.start()
    yield agent
    agent.close()


@pytest.fixture
def handler(agent):
    yield CommandHandler(agent)
    agent.pin(None)


def send(handler, name, args=None, command_id="c-1", **extra) -> dict:
    message = {"id": command_id, **({"args": args} if args is not None else {}), **extra}
    return handler.handle(name, json.dumps(message).encode())


def assert_well_formed(result: dict) -> None:
    assert set(result) in ({"id", "ok", "result"}, {"id", "ok", "error"},
                           {"id", "ok", "result", "replayed"}, {"id", "ok", "error", "replayed"}), result
    assert result["id"] is None or isinstance(result["id"], str)
    assert isinstance(result["ok"], bool)
    assert isinstance(result["result"], dict) if result["ok"] else isinstance(result["error"], str)
    json.dumps(result)


def test_ping_and_status(handler, agent):
    ping = send(handler, "ping", command_id="p-1")
    assert ping["id"] == "p-1" and ping["ok"] and ping["result"]["pong"] is True and ping["result"]["ts"] > 0
    status = send(handler, "status", command_id="s-1")
    assert status["ok"] and status["result"]["active"] == agent.active
    assert status["result"]["variants"] == agent.status()["variants"]


def test_switch_pin_and_unpin(handler, agent):
    variants = agent.status()["variants"]
    other = next(v for v in variants if v != agent.active)
    assert send(handler, "switch", {"variant": other}, "sw-1")["result"] == {"active": other}
    assert agent.active == other and agent.events[-1].type == "switch"

    pinned = send(handler, "pin", {"variant": variants[0]}, "pin-1")
    assert pinned["result"] == {"pin": variants[0], "active": variants[0]}
    refused = send(handler, "switch", {"variant": variants[1]}, "sw-2")
    assert not refused["ok"] and f"pinned to {variants[0]}" in refused["error"]

    assert send(handler, "unpin", {}, "unpin-1")["result"] == {"pin": None, "active": variants[0]}
    assert agent.policy.settings.pin is None


def test_switch_or_pin_to_an_unknown_variant_is_an_error(handler, agent):
    active = agent.active
    result = send(handler, "switch", {"variant": "nope"}, "sw-x")
    assert result == {"id": "sw-x", "ok": False, "error": result["error"]}
    assert "unknown or unhealthy variant 'nope'" in result["error"]
    assert "unknown variant 'nope'" in send(handler, "pin", {"variant": "nope"}, "pin-x")["error"]
    assert agent.active == active


def test_set_policy_checks_names_and_types(handler, agent):
    result = send(handler, "set_policy", {"latency_slo_ms": 250, "headroom": 0.5, "memory_budget_mb": None}, "pol-1")
    assert result["ok"] and agent.policy.settings.latency_slo_ms == 250.0 and agent.policy.settings.headroom == 0.5
    assert result["result"]["settings"]["memory_budget_mb"] is None
    cases = {
        "pol-2": ({"latency_slo_ms": "fast"}, "argument 'latency_slo_ms' must be a number > 0, got 'fast'"),
        "pol-3": ({"latency_slo_ms": True}, "argument 'latency_slo_ms' must be a number"),
        "pol-4": ({"headroom": 1.5}, "argument 'headroom' must be a number > 0 and <= 1"),
        "pol-5": ({"cooldown_s": -1}, "argument 'cooldown_s' must be a number >= 0"),
        "pol-6": ({"pin": "dense"}, "unknown argument 'pin'"),
        "pol-7": ({}, "at least one of"),
    }
    for command_id, (args, message) in cases.items():
        result = send(handler, "set_policy", args, command_id)
        assert not result["ok"] and message in result["error"], result
    assert agent.policy.settings.latency_slo_ms == 250.0
    agent.policy.update(latency_slo_ms=1000.0, headroom=0.7)


def test_bench_returns_the_table_as_data(handler, agent):
    result = send(handler, "bench", {"runs": 3}, "b-1")
    assert result["ok"], result
    table = result["result"]
    assert table["runs"] == 3 and table["backend"] == "onnxruntime"
    assert [row["id"] for row in table["variants"]] == agent.status()["variants"]
    assert all(row["count"] == 3 and 0 < row["p50"] <= row["p95"] <= row["p99"] for row in table["variants"])
    assert {row["provider"] for row in table["variants"]} == {"CPUExecutionProvider"}
    assert "integer from 1 to 200" in send(handler, "bench", {"runs": 0}, "b-2")["error"]


def test_deploy_and_rollback_need_a_handler(agent):
    plain = CommandHandler(agent)
    assert send(plain, "deploy", {"url": "x"}, "d-1") == {"id": "d-1", "ok": False,
                                                         "error": "deploy is not available on this agent"}
    assert send(plain, "rollback", {}, "r-1")["error"] == "rollback is not available on this agent"

    def deploy(args: dict) -> dict:
        if "portfolio" not in args:
            raise ValueError("deploy needs 'portfolio'")
        return {"deployed": args["portfolio"]}
    wired = CommandHandler(agent, handlers={"deploy": deploy})
    assert send(wired, "deploy", {"portfolio": "v2"}, "d-2") == {"id": "d-2", "ok": True, "result": {"deployed": "v2"}}
    assert send(wired, "deploy", {}, "d-3")["error"] == "deploy failed: deploy needs 'portfolio'"


def test_a_replayed_id_returns_the_first_result_without_running_again(agent):
    runs = []

    def count(args: dict) -> dict:
        runs.append(args)
        return {"run": len(runs)}
    handler = CommandHandler(agent, handlers={"count": count}, remember=2)
    first = send(handler, "count", {}, "once")
    assert first == {"id": "once", "ok": True, "result": {"run": 1}}
    assert send(handler, "count", {}, "once") == {**first, "replayed": True}
    assert len(runs) == 1
    send(handler, "count", {}, "two")
    send(handler, "count", {}, "three")  # only the last 2 ids are remembered
    assert send(handler, "count", {}, "once")["result"] == {"run": 4}


@pytest.mark.parametrize("payload, message", [
    (b"{not json", "payload is not valid JSON"),
    (b"\xff\xfe", "payload is not UTF-8 text"),
    (b"[1, 2]", "payload must be a JSON object"),
    (b'{"args": {}}', "command 'id' missing"),
    (b'{"id": 7}', "command 'id' must be a string of 1 to 128 characters, got 7"),
    (b'{"id": ""}', "command 'id' must be a string"),
    (b"[" * 5000 + b"]" * 5000, "nested too deeply"),
    (b" " * (64 << 10) + b"{}", "exceeds the limit of 65536 bytes"),
])
def test_malformed_messages_are_error_results(handler, payload, message):
    result = handler.handle("ping", payload)
    assert result["id"] is None and result["ok"] is False and message in result["error"], result


def test_unknown_commands_fields_and_arguments_are_error_results(handler):
    unknown = send(handler, "reboot", {}, "u-1")
    assert unknown["id"] == "u-1"
    assert "unknown command 'reboot'; known: bench, deploy, pin, ping, rollback" in unknown["error"]
    assert "unknown field 'reply'" in send(handler, "ping", {}, "u-2", reply="x")["error"]
    assert "'args' must be a JSON object, got [1]" in send(handler, "ping", [1], "u-3")["error"]
    assert "ping: unknown argument 'loud' (known: none)" in send(handler, "ping", {"loud": True}, "u-4")["error"]
    assert "switch: argument 'variant' is required" in send(handler, "switch", {}, "u-5")["error"]
    assert "must be a non-empty string, got 3" in send(handler, "switch", {"variant": 3}, "u-6")["error"]
    assert send(handler, "ping", {}, "u-7", ts=1.0, schema="edgeshift.cmd/1")["ok"]


def test_a_crashing_or_misbehaving_handler_is_an_error_result(agent):
    handler = CommandHandler(agent, handlers={"crash": lambda args: 1 / 0, "odd": lambda args: ["not", "a", "dict"],
                                              "opaque": lambda args: {"x": object()}})
    assert send(handler, "crash", {}, "x-1")["error"] == "crash failed: ZeroDivisionError: division by zero"
    assert send(handler, "odd", {}, "x-2")["error"] == "odd returned list, not a JSON object"
    assert send(handler, "opaque", {}, "x-3")["ok"]  # odd values travel as text rather than being lost


COMMAND_NAMES = ["ping", "status", "switch", "pin", "unpin", "set_policy", "bench", "deploy", "rollback"]
VARIANTS = ["dense", "imp-l01-sparse", "dense-int8"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8)
arg_names = st.sampled_from(["variant", "latency_slo_ms", "memory_budget_mb", "cooldown_s", "headroom", "runs"])
arg_values = st.sampled_from([*VARIANTS, 0, 1, 2, 0.5, -1, 1e9]) | json_values
valid_args = st.sampled_from([{}, *({"variant": v} for v in VARIANTS), {"latency_slo_ms": 500}, {"headroom": 0.5},
                              {"cooldown_s": 0}])
any_args = valid_args | st.dictionaries(arg_names | st.text(max_size=6), arg_values, max_size=3) | json_values
# Anything at all, then messages that look right with arguments that may not be.
messages = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda value: json.dumps(value).encode()),
    st.fixed_dictionaries({"id": st.text(min_size=1, max_size=6) | json_values},
                          optional={"args": any_args, "extra": json_values}).map(lambda m: json.dumps(m).encode()),
)
well_formed = st.builds(lambda command_id, args: json.dumps({"id": command_id, "args": args}).encode(),
                        st.text(min_size=1, max_size=6), any_args)
commands = (st.tuples(st.sampled_from(COMMAND_NAMES) | st.text(max_size=10), messages)
            | st.tuples(st.sampled_from(COMMAND_NAMES), well_formed))


def test_fuzzed_messages_always_get_a_well_formed_result_and_the_agent_keeps_serving(agent):
    handler = CommandHandler(agent, max_payload_bytes=150)
    handled = []

    @settings(max_examples=1000, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(command=commands)
    def fuzz(command):
        name, payload = command
        if name == "bench":  # keep every bench short: a fuzzed one runs 10 rounds at most
            payload = payload.replace(b'"runs"', b'"r"')
        result = handler.handle(name, payload)
        assert_well_formed(result)
        handled.append((name, result["ok"]))

    fuzz()
    agent.pin(None)
    agent.policy.update(latency_slo_ms=1000.0, memory_budget_mb=None, cooldown_s=30.0, headroom=0.7)
    assert len(handled) >= 1000
    succeeded = {name for name, ok in handled if ok}
    assert {"ping", "status", "switch", "pin", "unpin", "set_policy", "bench"} <= succeeded  # real commands ran
    sample = agent.portfolio.samples().inputs[0][:1]
    assert agent.infer(sample).outputs[0].shape == (1, 10)
