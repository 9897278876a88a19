"""Labelled inputs sent open loop at a fixed rate, each request recorded as a client sees it.

On agent.workload's pace, as ReplaySource: calls follow an absolute schedule (start + k / rate)
from one thread, at most a couple back to back when behind, older missed slots skipped. A request's
latency runs from its scheduled send time to its answer, so time spent queued behind slow
answers counts; a skipped slot is a request that was never answered.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from agent.runtime import InferResult
from agent.workload import pace


@dataclass(frozen=True)
class Request:
    phase: str
    due: float                       # scheduled send time, time.monotonic()
    latency_ms: float | None = None  # due to answer; None: skipped or failed
    model_ms: float | None = None    # the variant's own run time
    variant: str | None = None
    correct: bool | None = None      # None: skipped, failed, or no label
    outcome: str = "answered"        # answered | failed | skipped


class LabelledReplay:
    """Sends x[i] (batch 1, cycling) to `infer` at `rate_hz`; `phase` tags the requests sent meanwhile."""

    def __init__(self, infer: Callable[[np.ndarray, float], InferResult], x: np.ndarray, y: np.ndarray | None,
                 rate_hz: float):
        if not rate_hz > 0:
            raise ValueError(f"rate must be above 0 Hz, got {rate_hz}")
        if len(x) == 0 or (y is not None and len(y) != len(x)):
            raise ValueError(f"need at least one input and one label per input, got {len(x)} and "
                             f"{None if y is None else len(y)}")
        self.infer, self.x, self.y, self.rate_hz = infer, x, y, rate_hz
        self.phase = "start"
        self.requests: list[Request] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._replay, name="edgeshift-labelled-replay", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _replay(self) -> None:
        pace(self.rate_hz, self._stop, lambda slot, due: self.requests.append(self._send(slot, due)),
             lambda slot, due: self.requests.append(Request(self.phase, due, outcome="skipped")))

    def _send(self, slot: int, due: float) -> Request:
        i = slot % len(self.x)
        try:
            result = self.infer(self.x[i:i + 1], due)  # arrived when due: a late send counts, as for the client
        except Exception as error:  # a failed request is scored, never stops the replay
            if len(self.errors) < 10:
                self.errors.append(f"{type(error).__name__}: {error}")
            return Request(self.phase, due, outcome="failed")
        latency_ms = (time.monotonic() - due) * 1000
        correct = None if self.y is None else bool(int(np.argmax(result.outputs[0][0])) == int(self.y[i]))
        return Request(self.phase, due, latency_ms, result.latency_ms, result.variant, correct)
