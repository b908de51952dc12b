"""One heartbeat thread keeps an audit's or a part's claim alive
(saliency_audit.service.jobs.Heartbeat):
it renews the lease with the latest progress, survives a database blip, and a lost lease stops
the computation at its next progress call. When the worker shuts down
(saliency_audit.service.jobs.Drain) and
its grace runs out, the lease is handed back and the computation stops with Drained."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy.exc import OperationalError

from saliency_audit.service.jobs import Drain, Drained, Heartbeat, Lost


class FakeLease:
    label = "audit-1"

    def __init__(
        self, fail_with: list[Exception | None] | None = None, hand_back_gives: object = True
    ) -> None:
        self.calls: list[tuple[float | None, str | None]] = []
        self.fail_with = list(fail_with or [])
        self.beat = threading.Event()
        self.hand_back_gives = hand_back_gives  # True/False, or an exception to raise
        self.handed_back = 0

    def hand_back(self) -> bool:
        self.handed_back += 1
        if isinstance(self.hand_back_gives, Exception):
            raise self.hand_back_gives
        return bool(self.hand_back_gives)

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


def test_a_drain_within_its_grace_lets_the_computation_go_on() -> None:
    lease, drain = FakeLease(), Drain()
    drain.request(grace_s=3600)
    with Heartbeat(lease, interval_s=0.01, drain=drain) as beat:
        _wait_for(lambda: len(lease.calls) >= 2)
        beat.progress(0.5, "still within the grace")
    assert lease.handed_back == 0 and beat.lost is None


def test_the_first_progress_call_past_the_grace_hands_the_lease_back_once() -> None:
    lease, drain = FakeLease(), Drain()
    beat = Heartbeat(lease, interval_s=3600, drain=drain)
    beat.progress(0.6, "within the grace: no stop requested yet")
    drain.request(grace_s=0.0)
    with pytest.raises(Drained) as raised:
        beat.progress(0.7, "next step")
    assert raised.value.handed_back and lease.handed_back == 1
    with pytest.raises(Drained):
        beat.progress(0.8, "and the one after")
    assert lease.handed_back == 1


def test_the_heartbeat_thread_hands_back_at_the_deadline() -> None:
    lease, drain = FakeLease(), Drain()
    drain.request(grace_s=0.05)
    with Heartbeat(lease, interval_s=3600, drain=drain) as beat:
        _wait_for(lambda: lease.handed_back == 1)  # not waiting for the hour-long beat
        assert isinstance(beat.lost, Drained) and beat.lost.handed_back
        with pytest.raises(Drained):
            beat.progress(0.9, "too late")


def test_a_hand_back_the_database_refused_is_not_reported_as_handed_back() -> None:
    blip = OperationalError("UPDATE", {}, Exception("server closed the connection"))
    drain = Drain()
    drain.request(grace_s=0.0)
    beat = Heartbeat(FakeLease(hand_back_gives=blip), interval_s=3600, drain=drain)
    with pytest.raises(Drained) as raised:
        beat.progress(0.1, "step")
    assert not raised.value.handed_back  # the reconciler repairs it, as after a crash


def test_a_lease_already_gone_at_the_hand_back_is_lost_not_drained() -> None:
    drain = Drain()
    drain.request(grace_s=0.0)
    beat = Heartbeat(FakeLease(hand_back_gives=False), interval_s=3600, drain=drain)
    with pytest.raises(Lost) as raised:
        beat.progress(0.1, "step")
    assert not isinstance(raised.value, Drained)


def test_a_drain_request_keeps_its_first_deadline_until_reset() -> None:
    drain = Drain()
    assert not drain.requested and drain.remaining_s() is None and not drain.expired()
    drain.request(grace_s=0.0)
    drain.request(grace_s=3600)  # a second SIGTERM does not extend the grace
    assert drain.expired()
    drain.reset()
    assert not drain.requested
