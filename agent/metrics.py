"""The agent's state in Prometheus text exposition format (version 0.0.4)."""
from __future__ import annotations


def render_metrics(agent) -> str:
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[dict, float | None]]) -> None:
        known = [(labels, value) for labels, value in samples if value is not None]
        if not known:
            return
        lines.append(f"# HELP edgeshift_{name} {help_text}")
        lines.append(f"# TYPE edgeshift_{name} {kind}")
        for labels, value in known:
            text = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
            lines.append(f"edgeshift_{name}{{{text}}} {float(value):g}" if text else f"edgeshift_{name} {float(value):g}")

    metric("ready", "gauge", "1 once the portfolio is verified, measured and warm.", [({}, float(agent.ready))])
    runtime = agent.runtime
    if runtime is not None:
        active = runtime.active
        windows = runtime.windows
        metric("active_variant", "gauge", "1 for the variant serving now.",
               [({"variant": vid}, float(vid == active)) for vid in windows])
        metric("requests_total", "counter", "Inference requests served, by variant.",
               [({"variant": vid}, w.total) for vid, w in windows.items()])
        metric("request_errors_total", "counter", "Inference requests that failed in the runtime, by variant.",
               [({"variant": vid}, w.errors) for vid, w in windows.items()])
        quantiles = []
        for vid, window in windows.items():
            summary = window.summary()
            for q, value in (("0.5", summary.p50), ("0.95", summary.p95), ("0.99", summary.p99)):
                quantiles.append(({"variant": vid, "quantile": q}, value))
        metric("latency_ms", "gauge", "Inference latency over the last seconds, by variant and quantile.", quantiles)
    switches = sum(1 for e in agent.events if e.type == "switch")
    metric("switches_total", "counter", "Variant switches since start (within the event log).", [({}, switches)])

    snapshot = agent.last_snapshot
    if snapshot is not None:
        metric("cpu_percent", "gauge", "System CPU use.", [({}, snapshot.cpu_percent)])
        metric("memory_available_mb", "gauge", "Memory available to new allocations.", [({}, snapshot.mem_available_mb)])
        metric("rss_mb", "gauge", "The agent's resident memory.", [({}, snapshot.rss_mb)])
        metric("temperature_celsius", "gauge", "Hottest board temperature.", [({}, snapshot.temperature_c)])
        throttling = snapshot.throttling
        metric("throttled", "gauge", "1 while the board reports throttling now.",
               [({}, float(throttling.active) if throttling is not None else None)])
    return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
