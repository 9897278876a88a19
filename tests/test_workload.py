from __future__ import annotations

import threading
import time

import numpy as np
import psutil
import pytest

from agent.workload import CpuStress, ReplaySource, WorkloadError


@pytest.fixture
def inputs_npz(tmp_path):
    path = tmp_path / "inputs.npz"
    np.savez(path, x=np.arange(5 * 3, dtype=np.float32).reshape(5, 3))
    return path


def test_replay_calls_infer_at_the_given_rate(inputs_npz):
    batches: list[np.ndarray] = []
    source = ReplaySource(inputs_npz, batches.append, rate_hz=50, duration_s=0.5)
    source.start()
    assert source.wait(timeout=5)
    source.stop()
    assert 15 <= source.sent <= 30
    assert source.sent == len(batches) and source.failed == 0
    assert batches[0].shape == (1, 3)


def test_replay_cycles_through_the_inputs_in_batches(inputs_npz):
    batches: list[np.ndarray] = []
    with ReplaySource(inputs_npz, batches.append, rate_hz=200, batch_size=2, duration_s=0.05) as source:
        source.wait(timeout=5)
    first_rows = [int(batch[0, 0]) // 3 for batch in batches[:4]]
    assert first_rows == [0, 2, 4, 1]  # rows wrap around: [4, 0] then [1, 2]
    assert all(batch.shape == (2, 3) for batch in batches)


def test_replay_counts_failures_and_keeps_going(inputs_npz):
    def broken(batch: np.ndarray) -> None:
        raise ValueError("model not loaded")

    source = ReplaySource(inputs_npz, broken, rate_hz=100, duration_s=0.2)
    source.start()
    source.wait(timeout=5)
    assert source.failed == source.sent >= 10
    assert source.errors[-1] == "ValueError: model not loaded"
    assert len(source.errors) <= 10


def test_replay_stops_when_asked(inputs_npz):
    called = threading.Event()
    source = ReplaySource(inputs_npz, lambda batch: called.set(), rate_hz=20)
    source.start()
    assert called.wait(timeout=5)
    source.stop()
    assert not source.running
    sent = source.sent
    time.sleep(0.1)
    assert source.sent == sent


def test_replay_does_not_burst_to_catch_up_after_a_slow_call(inputs_npz):
    call_times: list[float] = []

    def slow_once(batch: np.ndarray) -> None:
        call_times.append(time.monotonic())
        if len(call_times) == 1:
            time.sleep(0.3)  # 30 slots at 100 Hz

    source = ReplaySource(inputs_npz, slow_once, rate_hz=100, duration_s=0.5)
    source.start()
    source.wait(timeout=5)
    quick_followers = sum(1 for gap in np.diff(call_times[1:8]) if gap < 0.002)
    assert quick_followers <= 2
    assert source.skipped >= 20


def test_replay_reads_the_first_array_when_there_is_no_x(tmp_path):
    path = tmp_path / "other.npz"
    np.savez(path, images=np.ones((2, 4), np.float32))
    source = ReplaySource(path, lambda batch: None, rate_hz=1)
    assert source.inputs.shape == (2, 4)


@pytest.mark.parametrize("content", [None, b"not a zip", "empty"])
def test_a_bad_npz_is_a_clear_error_at_construction(tmp_path, content):
    path = tmp_path / "inputs.npz"
    if content == "empty":
        np.savez(path, x=np.zeros((0, 3)))
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(WorkloadError, match="inputs.npz"):
        ReplaySource(path, lambda batch: None, rate_hz=10)


def test_a_bad_rate_is_a_clear_error(inputs_npz):
    with pytest.raises(WorkloadError, match="rate"):
        ReplaySource(inputs_npz, lambda batch: None, rate_hz=0)


def stress_workers() -> list[psutil.Process]:
    """This process's children, less multiprocessing's resource tracker: a helper that the first spawned
    child starts, shared by all multiprocessing users, living until this process exits."""
    return [child for child in psutil.Process().children() if "resource_tracker" not in " ".join(child.cmdline())]


def test_cpu_stress_raises_cpu_use_and_leaves_no_process_behind():
    psutil.cpu_percent()
    time.sleep(0.5)
    before = psutil.cpu_percent()
    with CpuStress(workers=1) as stress:
        assert stress.running
        [worker] = stress_workers()
        worker_cpu_before = sum(worker.cpu_times()[:2])
        psutil.cpu_percent()
        deadline = time.monotonic() + 3.0  # a busy machine gives the worker its core's share more slowly
        time.sleep(0.5)
        while sum(worker.cpu_times()[:2]) - worker_cpu_before < 0.2 and time.monotonic() < deadline:
            time.sleep(0.1)
        during = psutil.cpu_percent()
        worker_cpu = sum(worker.cpu_times()[:2]) - worker_cpu_before
    # The worker burns a core's worth (shared with whatever else this machine runs), and the
    # system's CPU reading rises unless something else already fills every core.
    assert worker_cpu >= 0.2
    assert during >= min(before + 15, 90)
    assert not stress.running
    assert stress_workers() == []


def test_cpu_stress_ends_by_itself_after_its_duration():
    stress = CpuStress(workers=1, duration_s=0.2)
    stress.start()
    deadline = time.monotonic() + 5
    while stress.running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not stress.running
    stress.stop()
    assert stress_workers() == []
