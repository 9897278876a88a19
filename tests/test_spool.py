"""The durable spool: events and command results wait here, in order, until the broker has them."""
import threading
import time

import pytest

from agent.fleet.spool import Spool


def test_messages_come_back_oldest_first_until_acknowledged(tmp_path):
    spool = Spool(tmp_path / "spool.db")
    first = spool.put("edgeshift/default/pi/events", b'{"seq": 1}')
    second = spool.put("edgeshift/default/pi/cmd/ping/result", b'{"seq": 2}', qos=0)
    assert len(spool) == 2

    pending = spool.pending()
    assert [(m.id, m.topic, m.payload, m.qos) for m in pending] == [
        (first, "edgeshift/default/pi/events", b'{"seq": 1}', 1),
        (second, "edgeshift/default/pi/cmd/ping/result", b'{"seq": 2}', 0),
    ]
    spool.ack(first)
    assert [m.id for m in spool.pending()] == [second]
    spool.ack(first)  # a repeated ack is harmless
    assert len(spool) == 1
    spool.close()


def test_pending_messages_survive_a_restart(tmp_path):
    spool = Spool(tmp_path / "spool.db")
    for seq in range(5):
        spool.put("events", f"event {seq}".encode())
    spool.ack(spool.pending(limit=1)[0].id)
    spool.close()

    reopened = Spool(tmp_path / "spool.db")
    assert [m.payload for m in reopened.pending()] == [b"event 1", b"event 2", b"event 3", b"event 4"]
    assert len(reopened) == 4
    reopened.close()


def test_the_count_bound_drops_the_oldest_and_remembers_how_many(tmp_path):
    spool = Spool(tmp_path / "spool.db", max_messages=3)
    for seq in range(5):
        spool.put("events", str(seq).encode())
    assert [m.payload for m in spool.pending()] == [b"2", b"3", b"4"]
    assert spool.dropped() == 2
    spool.close()

    with Spool(tmp_path / "spool.db", max_messages=3) as reopened:
        assert reopened.dropped() == 2


def test_the_byte_bound_drops_the_oldest(tmp_path):
    with Spool(tmp_path / "spool.db", max_bytes=100) as spool:
        for seq in range(3):
            spool.put("events", bytes([seq]) * 40)
        assert [m.payload[0] for m in spool.pending()] == [1, 2]
        assert spool.dropped() == 1


def test_the_age_bound_drops_stale_messages(tmp_path):
    with Spool(tmp_path / "spool.db", max_age_s=0.2) as spool:
        spool.put("events", b"old")
        time.sleep(0.3)
        spool.put("events", b"fresh")
        assert [m.payload for m in spool.pending()] == [b"fresh"]
        assert spool.dropped() == 1


def test_messages_that_aged_while_the_agent_was_down_are_dropped_on_open(tmp_path):
    with Spool(tmp_path / "spool.db") as spool:
        spool.put("events", b"old")
    time.sleep(0.2)
    with Spool(tmp_path / "spool.db", max_age_s=0.1) as reopened:
        assert len(reopened) == 0
        assert reopened.dropped() == 1


def test_a_corrupt_file_is_moved_aside_and_a_fresh_spool_starts(tmp_path):
    path = tmp_path / "spool.db"
    path.write_bytes(b"this is not an sqlite database\n" * 100)

    with Spool(path) as spool:
        assert spool.recovered_from is not None
        assert spool.recovered_from.name.startswith("spool.db.corrupt-")
        assert spool.recovered_from.read_bytes().startswith(b"this is not an sqlite database")
        assert len(spool) == 0
        spool.put("events", b"after recovery")
        assert [m.payload for m in spool.pending()] == [b"after recovery"]

    with Spool(path) as healthy:
        assert healthy.recovered_from is None


def test_bad_messages_are_refused_and_lose_nothing(tmp_path):
    with Spool(tmp_path / "spool.db", max_bytes=100) as spool:
        spool.put("events", b"kept")
        with pytest.raises(ValueError, match="qos must be 0, 1 or 2"):
            spool.put("events", b"x", qos=3)
        with pytest.raises(ValueError, match="can never fit"):
            spool.put("events", b"x" * 101)
        with pytest.raises(TypeError, match="payload must be bytes"):
            spool.put("events", "text")
        assert [m.payload for m in spool.pending()] == [b"kept"]
        assert spool.dropped() == 0


def test_concurrent_puts_lose_nothing(tmp_path):
    spool = Spool(tmp_path / "spool.db")

    def put_many(thread: int) -> None:
        for seq in range(100):
            spool.put(f"events/{thread}", str(seq).encode())

    threads = [threading.Thread(target=put_many, args=(thread,)) for thread in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    pending = spool.pending(limit=1000)
    assert len(spool) == len(pending) == 800
    for thread in range(8):  # each thread's messages in the order it put them
        assert [int(m.payload) for m in pending if m.topic == f"events/{thread}"] == list(range(100))
    spool.close()


def test_a_thousand_puts_are_quick(tmp_path):
    with Spool(tmp_path / "spool.db") as spool:
        started = time.perf_counter()
        for seq in range(1000):
            spool.put("edgeshift/default/pi/events", b'{"type": "switch", "seq": %d}' % seq)
        elapsed = time.perf_counter() - started
    assert elapsed < 5.0, f"1000 puts took {elapsed:.2f} s"


def test_spool_reports_its_length_and_drops_for_telemetry(tmp_path):
    spool = Spool(tmp_path / "spool.sqlite", max_messages=2)
    for n in range(3):
        spool.put("t", b"x")
    assert len(spool) == 2 and spool.dropped() == 1
    spool.close()
