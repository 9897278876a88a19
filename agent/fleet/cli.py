"""edgeshift-fleet: the fleet's devices, a live view of them, and commands to them over MQTT.

    edgeshift-fleet devices                       retained status of every device
    edgeshift-fleet watch [--interval S] [--count N]
    edgeshift-fleet switch DEVICE|--all VARIANT   (and pin, unpin, policy, deploy, rollback, bench, ping, status)
    edgeshift-fleet serve-portfolio DIR           serve a portfolio archive for `deploy`

A command goes to each device on its own `cmd/<name>` topic. `--all` means every device whose
retained status says online, each addressed individually so that every result is counted; if
none is online, nothing is sent and the exit status is 1. Exit 0 when every device answered ok,
1 when any failed or did not answer within --timeout (or the broker is unreachable), 2 for bad input.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any

from agent.fleet.controller import BrokerOptions, CommandResult, Controller, ControllerError, DeviceStatus
from agent.fleet.topics import check_id
from agent.portfolio import PortfolioError, sha256_file

PROG = "edgeshift-fleet"
PASSWORD_ENV = "EDGESHIFT_MQTT_PASSWORD"
DEFAULT_TIMEOUT_S = 30.0
DEPLOY_TIMEOUT_S = 120.0
CLEAR_SCREEN = "\x1b[H\x1b[2J"
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")


class UsageError(Exception):
    """Bad input: reported on one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse would print the usage too, and exit itself
        raise UsageError(message)


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        return args.run(args)
    except UsageError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except ControllerError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 1
    except SystemExit as done:  # --help, --version
        return done.code if isinstance(done.code, int) else 0
    except KeyboardInterrupt:
        return 130


# ------------------------------------------------------------------ arguments


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Watch and command a fleet of edgeshift agents over MQTT.")
    _connection_options(parser, defaults=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _command(commands, "devices", "list the devices from their retained status", _devices)
    watch = _command(commands, "watch", "a live table of the devices' telemetry and events", _watch)
    watch.add_argument("--interval", type=_positive(float), default=2.0, metavar="S", help="seconds between refreshes")
    watch.add_argument("--count", type=_positive(int), default=None, metavar="N", help="stop after N refreshes")

    for name, help_text in (("switch", "switch to VARIANT"), ("pin", "pin VARIANT (the policy stops steering)")):
        command = _targeted(commands, name, help_text, name)
        command.add_argument("variant", metavar="VARIANT")
    _targeted(commands, "unpin", "let the policy steer again", "unpin")
    _targeted(commands, "rollback", "return to the previous portfolio", "rollback")
    _targeted(commands, "ping", "check that devices answer", "ping")
    _targeted(commands, "status", "the agent's full status", "status")
    policy = _targeted(commands, "policy", "change policy settings", "set_policy")
    policy.add_argument("--slo", type=_positive(float), metavar="MS", help="latency SLO (p95, ms)")
    policy.add_argument("--memory-budget", type=_positive(float), metavar="MB", help="memory budget (MB)")
    policy.add_argument("--cooldown", type=_at_least_zero(float), metavar="S", help="seconds between switches")
    policy.add_argument("--headroom", type=_fraction, metavar="F", help="fraction of the SLO to aim for (0..1]")
    bench = _targeted(commands, "bench", "benchmark every variant on the devices", "bench")
    bench.add_argument("--runs", type=_positive(int), metavar="N", help="timed runs per variant (default 10)")
    deploy = _targeted(commands, "deploy", "deploy a portfolio archive (.tar.gz)", "deploy",
                       default_timeout=DEPLOY_TIMEOUT_S)
    deploy.add_argument("source", metavar="ARCHIVE_OR_URL", help="http(s) URL, or a path on the devices")
    deploy.add_argument("--sha256", metavar="HEX", help="of the archive (computed when SOURCE is a local file)")
    deploy.add_argument("--signature", metavar="S", help="ed25519 signature of manifest.json (hex or base64)")

    serve = commands.add_parser("serve-portfolio", help="pack a portfolio directory and serve it over HTTP")
    serve.add_argument("directory", metavar="DIR", type=Path)
    serve.add_argument("--port", type=_port, default=8000, help="HTTP port (0: any free one; default 8000)")
    serve.add_argument("--bind", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--once", action="store_true", help="stop after the archive was downloaded once")
    serve.add_argument("--seconds", type=_positive(float), metavar="S", help="stop after S seconds")
    serve.set_defaults(run=_serve_portfolio)
    return parser


def _connection_options(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """On the main parser with defaults; again on each command (SUPPRESS: only what is given there
    overrides), so the options work before and after the command name."""
    def default(value: Any) -> Any:
        return value if defaults else argparse.SUPPRESS

    group = parser.add_argument_group("broker")
    group.add_argument("--host", default=default("127.0.0.1"), help="MQTT broker (default 127.0.0.1)")
    group.add_argument("--port", type=_port, default=default(1883), help="MQTT port (default 1883)")
    group.add_argument("--fleet", default=default("default"), help="fleet name (default 'default')")
    group.add_argument("--username", default=default(None))
    group.add_argument("--password", default=default(None), help=f"(default: ${PASSWORD_ENV})")
    group.add_argument("--tls-ca", default=default(None), metavar="FILE")
    group.add_argument("--tls-cert", default=default(None), metavar="FILE")
    group.add_argument("--tls-key", default=default(None), metavar="FILE")
    group.add_argument("--protocol", type=int, choices=(5, 3), default=default(5), help="MQTT 5 or 3 (3.1.1)")
    group.add_argument("--timeout", type=_positive(float), default=default(None), metavar="S",
                       help=f"seconds to wait for results (default {DEFAULT_TIMEOUT_S:g}; deploy {DEPLOY_TIMEOUT_S:g})")


def _command(commands: Any, name: str, help_text: str, run: Any) -> argparse.ArgumentParser:
    parser = commands.add_parser(name, help=help_text, description=help_text)
    _connection_options(parser, defaults=False)
    parser.set_defaults(run=run)
    return parser


def _targeted(commands: Any, name: str, help_text: str, command_name: str,
              default_timeout: float = DEFAULT_TIMEOUT_S) -> argparse.ArgumentParser:
    parser = _command(commands, name, help_text, _send)
    parser.add_argument("device", nargs="?", metavar="DEVICE", help="the device id")
    parser.add_argument("--all", action="store_true", help="every device that is online")
    parser.set_defaults(command_name=command_name, default_timeout=default_timeout)
    return parser


def _number(kind: type, accept: Any, what: str) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if value != value or not accept(value):  # NaN included
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value
    parse.__name__ = kind.__name__
    return parse


def _positive(kind: type) -> Any:
    return _number(kind, lambda v: 0 < v < float("inf"), f"a positive {'integer' if kind is int else 'number'}")


def _at_least_zero(kind: type) -> Any:
    return _number(kind, lambda v: 0 <= v < float("inf"), "a number >= 0")


_fraction = _number(float, lambda v: 0 < v <= 1, "a number in (0, 1]")
_port = _number(int, lambda v: 0 <= v <= 65535, "a port number from 0 to 65535")


def _broker_options(args: argparse.Namespace) -> BrokerOptions:
    return BrokerOptions(host=args.host, port=args.port, fleet=args.fleet, username=args.username,
                         password=args.password if args.password is not None else os.environ.get(PASSWORD_ENV),
                         tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key, protocol=args.protocol)


def _controller(args: argparse.Namespace, follow_telemetry: bool = False) -> Controller:
    for path in (args.tls_ca, args.tls_cert, args.tls_key):
        if path is not None and not os.access(path, os.R_OK):
            raise UsageError(f"cannot read {path}")
    try:
        return Controller(_broker_options(args), follow_telemetry=follow_telemetry)
    except ValueError as error:
        raise UsageError(str(error)) from None


# ------------------------------------------------------------------ devices and watch


def _devices(args: argparse.Namespace) -> int:
    with _controller(args) as controller:
        statuses = controller.statuses()
    if not statuses:
        print(f"no device has reported in fleet '{args.fleet}'")
        return 0
    now = time.time()
    rows = [[s.device, s.state, _text(s.session), _text(s.active), _text(s.portfolio), _text(s.agent_version),
             _age(s.age_s(now))] for s in statuses.values()]
    print(format_table(["DEVICE", "STATE", "SESSION", "ACTIVE", "PORTFOLIO", "VERSION", "AGE"], rows))
    return 0


def _watch(args: argparse.Namespace) -> int:
    redraw = sys.stdout.isatty()
    with _controller(args, follow_telemetry=True) as controller:
        controller.announce()  # the devices publish their birth again: fresh status for the table
        shown = 0
        while True:
            table = watch_table(controller.statuses(), controller.telemetry(), controller.last_events())
            print(f"{CLEAR_SCREEN if redraw else ''}fleet '{args.fleet}' at {time.strftime('%H:%M:%S')}\n{table}",
                  flush=True)
            shown += 1
            if args.count is not None and shown >= args.count:
                return 0
            time.sleep(args.interval)
            if not redraw:
                print()


def watch_table(statuses: dict[str, DeviceStatus], telemetry: dict[str, dict], events: dict[str, dict]) -> str:
    """One row per device: active variant, temperature, CPU %, p95 of the active variant, last event."""
    rows = []
    for device in sorted(set(statuses) | set(telemetry)):
        status, sample = statuses.get(device), telemetry.get(device, {})
        resources = sample.get("resources") or {}
        active = sample.get("active") or (status.active if status else None)
        latency = (sample.get("latency") or {}).get(active) or {}
        event = events.get(device)
        last_event = f"{event.get('type')}: {event.get('reason')}" if event else None
        rows.append([device, status.state if status else "?", _text(active),
                     _number_text(resources.get("temperature_c"), "{:.0f} C"),
                     _number_text(resources.get("cpu_percent"), "{:.0f}%"),
                     _number_text(latency.get("p95"), "{:.1f} ms"), _truncate(_text(last_event), 48)])
    if not rows:
        return "(no devices yet)"
    return format_table(["DEVICE", "STATE", "ACTIVE", "TEMP", "CPU", "P95", "LAST EVENT"], rows)


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip()
             for row in (headers, *rows)]
    return "\n".join(lines)


def _text(value: object) -> str:
    return "-" if value is None else str(value)


def _number_text(value: object, template: str) -> str:
    return template.format(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


# ------------------------------------------------------------------ commands


def _send(args: argparse.Namespace) -> int:
    if (args.device is None) == (not args.all):
        rest = {"switch": " VARIANT", "pin": " VARIANT", "deploy": " ARCHIVE_OR_URL"}.get(args.command, "")
        raise UsageError(f"{args.command}: give DEVICE{rest} or --all{rest}" + (", not both" if args.all else ""))
    if args.device is not None:
        try:
            check_id(args.device, "device id")  # before connecting: `all` is --all, `controller` no device
        except ValueError as error:
            raise UsageError(str(error)) from None
    command_args = _command_args(args)
    timeout = args.timeout if args.timeout is not None else args.default_timeout
    with _controller(args) as controller:
        devices = [args.device] if args.device is not None else controller.online_devices()
        if not devices:
            print(f"{PROG}: no device is online in fleet '{args.fleet}'; nothing sent", file=sys.stderr)
            return 1
        try:
            results = controller.send(devices, args.command_name, command_args, timeout)
        except ValueError as error:  # a device id that is no topic level
            raise UsageError(str(error)) from None
    width = max(len(result.device) for result in results)
    for result in results:
        print(f"{result.device.ljust(width)}  {describe_result(args.command_name, result)}")
    return 0 if all(result.ok for result in results) else 1


def _command_args(args: argparse.Namespace) -> dict[str, Any]:
    name = args.command_name
    if name in ("switch", "pin"):
        return {"variant": args.variant}
    if name == "set_policy":
        given = {"latency_slo_ms": args.slo, "memory_budget_mb": args.memory_budget, "cooldown_s": args.cooldown,
                 "headroom": args.headroom}
        chosen = {key: value for key, value in given.items() if value is not None}
        if not chosen:
            raise UsageError("policy: give at least one of --slo, --memory-budget, --cooldown, --headroom")
        return chosen
    if name == "bench":
        return {} if args.runs is None else {"runs": args.runs}
    if name == "deploy":
        return _deploy_args(args.source, args.sha256, args.signature)
    return {}


def _deploy_args(source: str, sha256: str | None, signature: str | None) -> dict[str, Any]:
    """A URL goes as it is; a local path goes absolute (the device resolves it, not our directory)."""
    is_url = urllib.parse.urlsplit(source).scheme in ("http", "https", "file")
    if not is_url:
        path = Path(source).expanduser()
        if sha256 is None:
            if not path.is_file():
                raise UsageError(f"deploy: {source} is no local file; give --sha256 for a path on the devices")
            sha256 = sha256_file(path)
        source = str(path.resolve()) if path.exists() else source
    if sha256 is None:
        raise UsageError("deploy: --sha256 is required for a URL")
    if not _SHA256.fullmatch(sha256):
        raise UsageError(f"deploy: --sha256 must be 64 hex digits, got {sha256!r}")
    return {"source": source, "sha256": sha256.lower(), **({"signature": signature} if signature else {})}


def describe_result(command: str, result: CommandResult) -> str:
    """`ok  <short result>`, `error  <message>` or `timeout  <message>`."""
    if result.timed_out:
        return f"timeout  {result.error}"
    if not result.ok:
        return f"error    {result.error}"
    r = result.result or {}
    took = f" ({result.elapsed_s * 1000:.0f} ms)" if result.elapsed_s is not None else ""
    if command == "ping":
        summary = "pong"
    elif command == "bench":
        summary = ", ".join(f"{v.get('id')} p50 {_number_text(v.get('p50'), '{:.2f}')} ms"
                            for v in r.get("variants", []))
    elif command == "set_policy":
        summary = " ".join(f"{k}={v}" for k, v in (r.get("settings") or {}).items() if v is not None)
    elif command == "status":
        summary = f"active={r.get('active')} variants={','.join(r.get('variants') or [])}"
    else:
        summary = " ".join(f"{k}={v}" for k, v in r.items() if not isinstance(v, (dict, list)))
    return f"ok       {_truncate(summary, 160)}{took}"


# ------------------------------------------------------------------ serve-portfolio


def _serve_portfolio(args: argparse.Namespace) -> int:
    from agent.fleet.serve import PortfolioServer, pack_portfolio

    with tempfile.TemporaryDirectory(prefix="edgeshift-serve-") as work:
        try:
            archive = pack_portfolio(args.directory, Path(work))
        except PortfolioError as error:
            raise UsageError(str(error)) from None
        try:
            server = PortfolioServer(archive, args.bind, args.port)
        except OSError as error:
            raise UsageError(f"cannot listen on {args.bind}:{args.port}: {error.strerror or error}") from None
        server.start()
        try:
            print(f"serving {archive.name} at {server.url}")
            print(f"sha256 {server.sha256}")
            print(f"deploy it to every online device (or name one DEVICE instead of --all):\n"
                  f"  {PROG} deploy --all {server.url} --sha256 {server.sha256}", flush=True)
            if args.once:
                server.wait_for_download(args.seconds)
            elif args.seconds:
                time.sleep(args.seconds)
            else:
                while True:
                    time.sleep(3600)
        finally:
            server.close()
    print(f"served {server.downloads} download(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
