"""Fleet commands: validate a `cmd/<name>` message, run it on the Agent once, answer with a result.

A message is `{"id": "...", "args": {...}}` (`ts` and `schema` may ride along). The answer is always
`{"id", "ok": true, "result": {...}}` or `{"id", "ok": false, "error": "..."}`: whatever arrives (bytes
that are not JSON, unknown commands, wrong arguments, a command that fails), `handle` never raises,
and the agent keeps serving. A repeated id is answered with the first result, marked `replayed`,
so a controller may retry after an outage without running a switch or a deploy twice.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Callable  # typing's: the aliases below are evaluated (Python 3.8)

from agent.bench import bench_variants
from agent.fleet.topics import decode, encode

if TYPE_CHECKING:
    from agent.service import Agent

log = logging.getLogger("edgeshift.fleet.commands")

CommandFunction = Callable[[dict], dict]
Check = Callable[[Any], "str | None"]  # what is wrong with a value, or None

MAX_ID_CHARS = 128
ENVELOPE_FIELDS = ("id", "args", "ts", "schema")
BENCH_MAX_RUNS = 200


class CommandError(Exception):
    """A command that cannot run as asked; its message is the error result."""


@dataclass(frozen=True)
class Arg:
    check: Check
    required: bool = False


# ------------------------------------------------------------------ argument checks


def _string(value: Any) -> str | None:
    return None if isinstance(value, str) and value else f"must be a non-empty string, got {_show(value)}"


def _number(low: float, *, above: bool = False, high: float | None = None, nullable: bool = False) -> Check:
    bounds = f"{'>' if above else '>='} {low:g}" + (f" and <= {high:g}" if high is not None else "")

    def check(value: Any) -> str | None:
        if value is None and nullable:
            return None
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not is_number or value < low or (above and value == low) or (high is not None and value > high):
            return f"must be a number {bounds}{' or null' if nullable else ''}, got {_show(value)}"
        return None
    return check


def _integer(low: int, high: int) -> Check:
    def check(value: Any) -> str | None:
        if isinstance(value, int) and not isinstance(value, bool) and low <= value <= high:
            return None
        return f"must be an integer from {low} to {high}, got {_show(value)}"
    return check


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# ------------------------------------------------------------------ the handler


class CommandHandler:
    """Runs fleet commands on an Agent. `handlers` adds or replaces commands (deploy, rollback, ...):
    each gets the message's `args` object as given and returns a JSON object; raising CommandError,
    ValueError or KeyError makes an error result with that message."""

    def __init__(self, agent: Agent, max_payload_bytes: int = 64 << 10,
                 handlers: dict[str, CommandFunction] | None = None, remember: int = 1024):
        self.agent = agent
        self.max_payload_bytes = max_payload_bytes
        self.remember = remember
        self._commands: dict[str, tuple[dict[str, Arg] | None, CommandFunction]] = {
            "ping": ({}, self._ping),
            "status": ({}, lambda _: agent.status()),
            "switch": ({"variant": Arg(_string, required=True)}, self._switch),
            "pin": ({"variant": Arg(_string, required=True)}, self._pin),
            "unpin": ({}, self._unpin),
            "set_policy": ({"latency_slo_ms": Arg(_number(0, above=True)),
                            "memory_budget_mb": Arg(_number(0, above=True, nullable=True)),
                            "cooldown_s": Arg(_number(0)),
                            "headroom": Arg(_number(0, above=True, high=1))}, self._set_policy),
            "bench": ({"runs": Arg(_integer(1, BENCH_MAX_RUNS))}, self._bench),
            "deploy": (None, _unavailable("deploy")),
            "rollback": (None, _unavailable("rollback")),
        }
        for name, function in (handlers or {}).items():
            self._commands[name] = (None, function)  # they check their own arguments
        self._results: OrderedDict[str, dict] = OrderedDict()  # id -> first result, oldest first
        self._running: set[str] = set()
        self._lock = threading.Lock()

    @property
    def names(self) -> list[str]:
        return sorted(self._commands)

    def handle(self, name: str, payload: bytes) -> dict:
        """The result of one command message; never raises."""
        try:
            message = self._parse(payload)
        except CommandError as error:
            return _failure(None, str(error))
        command_id = message["id"]
        with self._lock:
            first = self._results.get(command_id)
            if first is not None:
                return {**first, "replayed": True}
            if command_id in self._running:
                return _failure(command_id, f"command id '{command_id}' is already running; not run twice")
            self._running.add(command_id)
        try:
            result = self._run(command_id, name, message)
        finally:
            with self._lock:
                self._running.discard(command_id)
        with self._lock:
            self._results[command_id] = result
            while len(self._results) > self.remember:
                self._results.popitem(last=False)
        return result

    def _parse(self, payload: bytes) -> dict:
        if not isinstance(payload, (bytes, bytearray)):
            raise CommandError(f"payload must be bytes, got {type(payload).__name__}")
        if len(payload) > self.max_payload_bytes:
            raise CommandError(f"payload of {len(payload)} bytes exceeds the limit of {self.max_payload_bytes} bytes")
        try:
            message = decode(bytes(payload))
        except UnicodeDecodeError:
            raise CommandError("payload is not UTF-8 text") from None
        except RecursionError:
            raise CommandError("payload is nested too deeply") from None
        except ValueError as error:
            raise CommandError(f"payload is not valid JSON: {error}") from None
        if not isinstance(message, dict):
            raise CommandError(f'payload must be a JSON object like {{"id": "...", "args": {{}}}}, '
                               f"got {type(message).__name__}")
        command_id = message.get("id")
        if not isinstance(command_id, str) or not 0 < len(command_id) <= MAX_ID_CHARS:
            if "id" not in message:
                raise CommandError("command 'id' missing")
            raise CommandError(f"command 'id' must be a string of 1 to {MAX_ID_CHARS} characters, "
                               f"got {_show(command_id)}")
        return message

    def _run(self, command_id: str, name: str, message: dict) -> dict:
        unknown_fields = sorted(set(message) - set(ENVELOPE_FIELDS))
        if unknown_fields:
            return _failure(command_id, f"unknown field {_show(unknown_fields[0])} in the message "
                                        f"(known: {', '.join(ENVELOPE_FIELDS)})")
        if name not in self._commands:
            return _failure(command_id, f"unknown command {_show(name)}; known: {', '.join(self.names)}")
        schema, function = self._commands[name]
        args = message.get("args", {})
        if not isinstance(args, dict):
            return _failure(command_id, f"'args' must be a JSON object, got {_show(args)}")
        if schema is not None and (problem := _check_args(name, schema, args)):
            return _failure(command_id, problem)
        log.info("command %s (%s)", name, command_id)
        try:
            result = function(args)
            if not isinstance(result, dict):
                raise CommandError(f"{name} returned {type(result).__name__}, not a JSON object")
            encode(result)  # must travel as JSON
        except CommandError as error:
            return _failure(command_id, str(error))
        except (ValueError, TypeError) as error:
            return _failure(command_id, f"{name} failed: {error}")
        except KeyError as error:  # its message is the first argument; str() would add quotes
            return _failure(command_id, f"{name} failed: {error.args[0] if error.args else error}")
        except Exception as error:  # a broken command must not take the link down
            log.exception("command %s (%s) crashed", name, command_id)
            return _failure(command_id, f"{name} failed: {type(error).__name__}: {error}")
        return {"id": command_id, "ok": True, "result": result}

    # ------------------------------------------------------------------ commands

    def _ping(self, args: dict) -> dict:
        return {"pong": True, "ts": time.time()}

    def _switch(self, args: dict) -> dict:
        variant, pinned = args["variant"], self.agent.policy.settings.pin
        if pinned is not None and pinned != variant:
            raise CommandError(f"pinned to {pinned}; unpin first, or pin {variant}")
        self.agent.switch(variant, "operator command", kind="manual")
        return {"active": self.agent.active}

    def _pin(self, args: dict) -> dict:
        self.agent.pin(args["variant"], "fleet command")
        return {"pin": args["variant"], "active": self.agent.active}

    def _unpin(self, args: dict) -> dict:
        self.agent.pin(None, "fleet command")
        return {"pin": None, "active": self.agent.active}

    def _set_policy(self, args: dict) -> dict:
        if not args:
            raise CommandError("give at least one of latency_slo_ms, memory_budget_mb, cooldown_s, headroom")
        self.agent.policy.update(**{k: float(v) if v is not None else None for k, v in args.items()})
        return {"settings": asdict(self.agent.policy.settings)}

    def _bench(self, args: dict) -> dict:
        """Latency of every healthy variant, measured side by side now (while serving goes on)."""
        runs = args.get("runs", 10)
        agent = self.agent
        runtime = agent.runtime
        if runtime is None:
            raise CommandError("the agent has not started")
        results = bench_variants(runtime, agent.status()["variants"], agent.canary, runs=runs, warmup=2)
        return {"backend": agent.backend.name, "threads": agent.threads, "runs": runs,
                "variants": [{"id": vid, "provider": runtime.providers.get(vid), **summary.to_dict()}
                             for vid, summary in results.items()]}


def _check_args(name: str, schema: dict[str, Arg], args: dict) -> str | None:
    for key in args:
        if key not in schema:
            known = ", ".join(schema) or "none"
            return f"{name}: unknown argument {_show(key)} (known: {known})"
    for key, arg in schema.items():
        if key not in args:
            if arg.required:
                return f"{name}: argument '{key}' is required"
            continue
        if problem := arg.check(args[key]):
            return f"{name}: argument '{key}' {problem}"
    return None


def _unavailable(name: str) -> CommandFunction:
    def refuse(args: dict) -> dict:
        raise CommandError(f"{name} is not available on this agent")
    return refuse


def _failure(command_id: str | None, error: str) -> dict:
    return {"id": command_id, "ok": False, "error": error}
