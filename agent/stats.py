"""Sliding-window latency statistics per variant, fed by live traffic."""
from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import islice


@dataclass(frozen=True)
class LatencySummary:
    count: int           # requests in the window
    p50: float | None    # milliseconds
    p95: float | None
    p99: float | None

    def to_dict(self) -> dict:
        return {"count": self.count, "p50": self.p50, "p95": self.p95, "p99": self.p99}


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (q in 0..100)."""
    rank = math.ceil(q / 100 * len(sorted_values))
    return sorted_values[min(max(rank, 1), len(sorted_values)) - 1]


class LatencyWindow:
    """The latencies of the last `horizon_s` seconds (at most `max_samples`), thread-safe.

    A sample holds the model call's time (what busy_share sums) and the request's time as answered:
    from its arrival where the caller stamped it, so queueing and preemption before and around the
    call count as a client sees them, else the call's time. Latencies and percentiles are the latter.
    """

    def __init__(self, horizon_s: float = 10.0, max_samples: int = 2048):
        self.horizon_s = horizon_s
        self._samples: deque[tuple[float, float, float]] = deque(maxlen=max_samples)
        self._lock = threading.Lock()
        self.total = 0
        self.errors = 0

    def add(self, latency_ms: float, now: float | None = None, answered_ms: float | None = None) -> None:
        """One request: its model call took latency_ms, its answer answered_ms after it arrived (default: the same)."""
        with self._lock:
            self._samples.append((time.monotonic() if now is None else now, latency_ms,
                                  latency_ms if answered_ms is None else answered_ms))
            self.total += 1

    def add_error(self) -> None:
        with self._lock:
            self.errors += 1

    def clear(self) -> None:
        with self._lock:
            self._samples.clear()

    def busy_share(self, now: float | None = None, since: float | None = None, min_span_s: float = 1.0) -> float | None:
        """Share of the window's time spent serving (None before min_span_s): near 1, a steady stream queues."""
        now = time.monotonic() if now is None else now
        oldest = now - self.horizon_s if since is None else max(now - self.horizon_s, since)
        if now - oldest < min_span_s:
            return None
        with self._lock:
            busy_ms = sum(ms for t, ms, _ in self._samples if t >= oldest)
        return busy_ms / 1000.0 / (now - oldest)

    def last(self, n: int, since: float | None = None) -> LatencySummary:
        """Percentiles of the last n requests (fewer when fewer came since `since`): evidence that
        reacts within a few requests at any rate, where a window of seconds lags by its span."""
        with self._lock:
            recent = [ms for t, _, ms in islice(reversed(self._samples), n) if since is None or t >= since]
        return summarize(recent)

    def summary(self, now: float | None = None, since: float | None = None) -> LatencySummary:
        """Percentiles over the window; `since` (monotonic time) drops older samples, e.g. before a switch."""
        return summarize(self.latencies(now, since))

    def latencies(self, now: float | None = None, since: float | None = None) -> tuple[float, ...]:
        """The window's latencies (ms), oldest first; `since` as in summary."""
        now = time.monotonic() if now is None else now
        oldest = now - self.horizon_s if since is None else max(now - self.horizon_s, since)
        with self._lock:
            return tuple(ms for t, _, ms in self._samples if t >= oldest)


def summarize(values: Sequence[float]) -> LatencySummary:
    """Count and percentiles of latencies in any order."""
    if not values:
        return LatencySummary(0, None, None, None)
    ordered = sorted(values)
    return LatencySummary(len(ordered), percentile(ordered, 50), percentile(ordered, 95), percentile(ordered, 99))
