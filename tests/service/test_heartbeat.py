"""One heartbeat thread keeps an audit's or a part's claim alive (service.jobs.Heartbeat):
it renews the lease with the latest progress, survives a database blip, and a lost lease stops
the computation at its next progress call."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy.exc import OperationalError

from service.jobs import Heartbeat, Lost


class FakeLease:
    label = "audit-1"

    def __init__(self, fail_with: list[Exception | None] | None = None) -> None:
        self.calls: list[tuple[float | None, str | None]] = []
        self.fail_with = list(fail_with or [])
        self.beat = threading.Event()

    def heartbeat(self, progress: float | None = None, step: str | None = None) -> None:
        self.calls.append((progress, step))
        self.beat.set()
        error = self.fail_with.pop(0) if self.fail_with else None
        if error is not None:
            raise error


def _wait_for(condition: object, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_the_beat_renews_the_lease_with_the_latest_progress() -> None:
    lease = FakeLease()
    with Heartbeat(lease, interval_s=0.01) as beat:
        _wait_for(lambda: len(lease.calls) >= 1)
        beat.progress(0.5, "computing")
        _wait_for(lambda: (0.5, "computing") in lease.calls)
    assert lease.calls[0] == (None, None)  # nothing reported yet: the heartbeat alone
    assert not beat.is_alive()


def test_a_database_blip_is_retried_at_the_next_beat() -> None:
    blip = OperationalError("UPDATE", {}, Exception("server closed the connection"))
    lease = FakeLease([blip, None])
    with Heartbeat(lease, interval_s=0.01) as beat:
        _wait_for(lambda: len(lease.calls) >= 2)
        assert beat.lost is None
        beat.progress(0.1, "still ours")


def test_a_lost_lease_stops_the_computation_at_its_next_progress_call() -> None:
    lease = FakeLease([Lost("canceled")])
    with Heartbeat(lease, interval_s=0.01) as beat:
        _wait_for(lambda: beat.lost is not None)
        with pytest.raises(Lost) as raised:
            beat.progress(0.2, "working")
    assert raised.value.reason == "canceled"
    assert len(lease.calls) == 1  # the thread stopped beating once the lease was gone


def test_progress_is_written_at_once_then_at_most_once_per_interval() -> None:
    lease = FakeLease()
    beat = Heartbeat(lease, interval_s=3600, write_progress_every_s=3600)
    beat.progress(0.1, "first")
    beat.progress(0.2, "second")
    assert lease.calls == [(0.1, "first")]
    assert beat.latest == (0.2, "second")  # the next beat sends it


def test_without_direct_writes_progress_waits_for_the_beat() -> None:
    lease = FakeLease()
    beat = Heartbeat(lease, interval_s=3600)
    beat.progress(0.3, "part")
    assert lease.calls == []
    assert beat.latest == (0.3, "part")
