"""Workloads for the agent on a device: a paced stream of requests, and CPU stress to react to.

`ReplaySource` plays recorded inputs into an inference callable at a steady rate, as a camera or
sensor pipeline would. `CpuStress` busy-loops other processes so that the agent sees its latency
rise and the CPU fill up, and its policy has something to react to.
"""

from __future__ import annotations

import atexit
import math
import multiprocessing
import multiprocessing.synchronize
import os
import threading
import time
import zipfile
from collections import deque
from collections.abc import Callable
from pathlib import Path

import numpy as np

_ERRORS_KEPT = 10
_MAX_CATCH_UP = 2  # calls sent back to back when behind; older missed slots are skipped
_WORKER_START_TIMEOUT_S = 30.0  # spawning on a busy Raspberry Pi can take seconds
_STOP_GRACE_S = 2.0


class WorkloadError(ValueError):
    """A workload that cannot be set up; the message names what and why."""


class ReplaySource:
    """Feeds the inputs of an .npz (key "x", or the first array) to a callable at a given rate, in a
    background thread, cycling through them.

    Calls follow an absolute schedule (start + k / rate), so slow calls do not accumulate drift;
    when behind, at most a couple of calls go back to back and the missed slots are skipped.
    `sent` counts every call, `failed` those that raised; an exception never stops the thread.
    """

    def __init__(
        self,
        npz_path: Path,
        infer: Callable[[np.ndarray], object],
        rate_hz: float,
        batch_size: int = 1,
        duration_s: float | None = None,
    ) -> None:
        if not rate_hz > 0:
            raise WorkloadError(f"rate must be above 0 Hz, got {rate_hz}")
        if batch_size < 1:
            raise WorkloadError(f"batch size must be at least 1, got {batch_size}")
        if duration_s is not None and duration_s < 0:
            raise WorkloadError(f"duration must be at least 0 s, got {duration_s}")
        self.inputs = _load_inputs(Path(npz_path))
        self.infer = infer
        self.rate_hz = rate_hz
        self.batch_size = batch_size
        self.duration_s = duration_s
        self.sent = 0
        self.failed = 0
        self.skipped = 0  # schedule slots dropped because the calls could not keep up
        self._errors: deque[str] = deque(maxlen=_ERRORS_KEPT)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def errors(self) -> list[str]:
        """The last few exceptions raised by infer, as "Type: message"."""
        return list(self._errors)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("this ReplaySource was already started; make a new one")
        self._thread = threading.Thread(target=self._replay, name="edgeshift-replay", daemon=True)
        self._thread.start()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for a source with a duration to finish; True when it has."""
        if self._thread is not None:
            self._thread.join(timeout)
        return not self.running

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> ReplaySource:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _replay(self) -> None:
        pace(self.rate_hz, self._stop, lambda slot, due: self._call(self._batch(slot)), self._skip, self.duration_s)

    def _skip(self, slot: int, due: float) -> None:
        self.skipped += 1

    def _batch(self, slot: int) -> np.ndarray:
        rows = np.arange(slot * self.batch_size, (slot + 1) * self.batch_size) % len(self.inputs)
        return self.inputs[rows]

    def _call(self, batch: np.ndarray) -> None:
        self.sent += 1
        try:
            self.infer(batch)
        except Exception as error:
            self.failed += 1
            self._errors.append(f"{type(error).__name__}: {error}")


def pace(rate_hz: float, stop: threading.Event, send: Callable[[int, float], None],
         skip: Callable[[int, float], None], duration_s: float | None = None) -> None:
    """Call send(slot, due) on the absolute schedule due = start + slot / rate_hz until `stop` is set.

    Slow calls do not accumulate drift: when behind, at most a couple of calls go back to back and
    each older missed slot is passed to skip(slot, due) instead.
    """
    period = 1.0 / rate_hz
    start = time.monotonic()
    end = math.inf if duration_s is None else start + duration_s
    slot = 0
    while True:
        due = start + slot * period
        if due >= end or stop.wait(max(0.0, due - time.monotonic())):
            return
        send(slot, due)
        slot += 1
        behind = math.floor((time.monotonic() - start) / period) + 1 - slot
        for missed in range(slot, slot + max(0, behind - _MAX_CATCH_UP)):
            skip(missed, start + missed * period)
        slot += max(0, behind - _MAX_CATCH_UP)


def _load_inputs(path: Path) -> np.ndarray:
    if not path.is_file():
        raise WorkloadError(f"{path}: no such file; give an .npz holding the inputs under key 'x'")
    if not zipfile.is_zipfile(path):  # np.load would try anything else as a pickle
        raise WorkloadError(f"{path}: not an .npz archive")
    try:
        with np.load(path, allow_pickle=False) as archive:
            keys = archive.files
            inputs = archive["x" if "x" in keys else keys[0]] if keys else None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise WorkloadError(f"{path}: unreadable ({error})") from None
    if inputs is None:
        raise WorkloadError(f"{path}: the archive holds no arrays")
    if inputs.ndim < 1 or len(inputs) == 0:
        raise WorkloadError(f"{path}: the inputs array is empty; it needs at least one sample along axis 0")
    return inputs


class CpuStress:
    """Busy-loops on N worker processes for a duration or until stopped.

    Workers are spawned (never forked: the agent has threads), start() returns once they all burn,
    and they are always cleaned up: by stop(), by the context manager, by an exit hook, and by
    themselves if this process disappears.
    """

    def __init__(self, workers: int | None = None, duration_s: float | None = None) -> None:
        self.workers = workers if workers is not None else (os.cpu_count() or 1)
        if self.workers < 1:
            raise WorkloadError(f"CPU stress needs at least 1 worker, got {self.workers}")
        self.duration_s = duration_s
        self._context = multiprocessing.get_context("spawn")
        self._processes: list[multiprocessing.process.BaseProcess] = []
        self._stop_event: multiprocessing.synchronize.Event | None = None

    @property
    def running(self) -> bool:
        return any(process.is_alive() for process in self._processes)

    def start(self) -> None:
        if self._processes:
            raise RuntimeError("this CpuStress was already started; make a new one")
        self._stop_event = self._context.Event()
        started = self._context.Semaphore(0)
        atexit.register(self.stop)
        try:
            for number in range(self.workers):
                process = self._context.Process(
                    target=_burn,
                    args=(self._stop_event, started, self.duration_s, os.getpid()),
                    name=f"edgeshift-cpu-stress-{number}",
                    daemon=True,
                )
                process.start()
                self._processes.append(process)
            self._wait_until_burning(started)
        except BaseException:  # including Ctrl-C while waiting: never leave half the workers behind
            self.stop()
            raise

    def _wait_until_burning(self, started: multiprocessing.synchronize.Semaphore) -> None:
        deadline = time.monotonic() + _WORKER_START_TIMEOUT_S
        burning = 0
        while burning < len(self._processes):
            if started.acquire(timeout=0.1):
                burning += 1
                continue
            for process in self._processes:
                if process.exitcode not in (None, 0):  # 0 is a worker whose duration already ended
                    raise WorkloadError(
                        f"CPU stress worker {process.name} exited with code {process.exitcode} before starting "
                        "(its traceback is above); a script starting workers needs `if __name__ == \"__main__\":`"
                    )
            if time.monotonic() > deadline:
                raise WorkloadError(f"CPU stress workers did not start within {_WORKER_START_TIMEOUT_S:.0f} s")

    def stop(self) -> None:
        """Stop and reap every worker; safe to call more than once."""
        if self._stop_event is not None:
            self._stop_event.set()
        for process in self._processes:
            process.join(_STOP_GRACE_S)
            if process.is_alive():
                process.terminate()
                process.join(_STOP_GRACE_S)
            if process.is_alive():
                process.kill()
                process.join()
        atexit.unregister(self.stop)

    def __enter__(self) -> CpuStress:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _burn(
    stop_event: multiprocessing.synchronize.Event,
    started: multiprocessing.synchronize.Semaphore,
    duration_s: float | None,
    parent_pid: int,
) -> None:
    """A worker: spin until told to stop, the duration ends, or the parent is gone."""
    started.release()
    end = math.inf if duration_s is None else time.monotonic() + duration_s
    while not stop_event.is_set() and time.monotonic() < end and os.getppid() == parent_pid:
        deadline = time.monotonic() + 0.05  # check the stop conditions 20 times a second
        while time.monotonic() < deadline:
            pass
