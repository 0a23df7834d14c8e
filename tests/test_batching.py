"""ec262/batching.py: calls from many threads carried as few batch calls,
with plain functions for the peer (no gRPC). Every wait is on an event the
code under test sets; none is a sleep."""

from __future__ import annotations

import threading

import pytest

from ec262.batching import Abandoned, Batcher


class Peer:
    """A batch call that waits to be let go, one gate per call, noting the
    items of each call."""

    def __init__(self, fail_items: frozenset = frozenset()) -> None:
        self.calls: list[list] = []
        self.arrived = threading.Semaphore(0)
        self.gates: list[threading.Event] = []
        self.lock = threading.Lock()
        self.fail_items = fail_items

    def __call__(self, items: list) -> list:
        gate = threading.Event()
        with self.lock:
            self.calls.append(list(items))
            self.gates.append(gate)
        self.arrived.release()
        assert gate.wait(10)
        return [ValueError(f"bad {i}") if i in self.fail_items else i * 10 for i in items]

    def let_go(self, index: int) -> None:
        self.gates[index].set()


def _arrived(peer: Peer, count: int = 1) -> None:
    for _ in range(count):
        assert peer.arrived.acquire(timeout=10)


def test_a_lone_call_goes_at_once_and_gets_its_own_answer():
    peer = Peer()
    batcher = Batcher(peer, name="t", max_in_flight=1)
    pending = batcher.submit(1)
    _arrived(peer)
    peer.let_go(0)
    assert pending.wait(10) == 10
    assert peer.calls == [[1]]
    batcher.close()


def test_calls_made_while_one_is_out_share_the_next():
    peer = Peer()
    batcher = Batcher(peer, name="t", max_in_flight=1)
    first = batcher.submit(1)
    _arrived(peer)
    waiting = [batcher.submit(n) for n in (2, 3, 4)]
    peer.let_go(0)
    _arrived(peer)
    peer.let_go(1)
    assert first.wait(10) == 10
    assert [p.wait(10) for p in waiting] == [20, 30, 40]
    assert peer.calls == [[1], [2, 3, 4]]
    assert (batcher.batches, batcher.items) == (2, 4)
    batcher.close()


def test_up_to_max_in_flight_calls_go_without_waiting():
    peer = Peer()
    batcher = Batcher(peer, name="t", max_in_flight=2)
    a, b = batcher.submit(1), batcher.submit(2)
    _arrived(peer, 2)  # both out at once, neither waited for the other
    c = batcher.submit(3)
    peer.let_go(0)
    _arrived(peer)
    peer.let_go(1)
    peer.let_go(2)
    assert (a.wait(10), b.wait(10), c.wait(10)) == (10, 20, 30)
    assert sorted(map(tuple, peer.calls)) == [(1,), (2,), (3,)]
    batcher.close()


def test_items_queued_together_take_a_free_place_together():
    """call_many queues its items at once: with one place free and one
    taken, they go in one call, not the first alone while the rest wait for
    an answer (issue 16: a round trip for settles decided together)."""
    peer = Peer()
    batcher = Batcher(peer, name="t", max_in_flight=2)
    lone = batcher.submit(1)
    _arrived(peer)  # one place taken, one free
    together: list = []
    caller = threading.Thread(target=lambda: together.extend(batcher.call_many([2, 3, 4])))
    caller.start()
    _arrived(peer)
    assert peer.calls == [[1], [2, 3, 4]]  # before either call is answered
    peer.let_go(1)
    caller.join(10)
    assert [p.wait(10) for p in together] == [20, 30, 40]
    assert not lone.done
    peer.let_go(0)
    assert lone.wait(10) == 10
    batcher.close()


def test_batches_are_cut_by_items_and_bytes_and_a_big_item_goes_alone():
    peer = Peer()
    batcher = Batcher(peer, name="t", max_items=3, max_bytes=100, size=lambda n: n, max_in_flight=1)
    first = batcher.submit(1)
    _arrived(peer)
    rest = [batcher.submit(n) for n in (10, 20, 30, 40, 60, 50, 500, 5)]
    for call in range(1, 6):
        peer.let_go(call - 1)
        _arrived(peer)
    peer.let_go(5)
    assert first.wait(10) == 10
    assert [p.wait(10) for p in rest] == [100, 200, 300, 400, 600, 500, 5000, 50]
    # three at most; 40+60 fits 100, +50 does not; 500 alone; then 5
    assert peer.calls == [[1], [10, 20, 30], [40, 60], [50], [500], [5]]
    batcher.close()


def test_an_items_own_failure_is_its_own_and_a_call_failure_is_everyones():
    peer = Peer(fail_items=frozenset({2}))
    batcher = Batcher(peer, name="t", max_in_flight=1)
    blocker = batcher.submit(1)
    _arrived(peer)
    good, bad = batcher.submit(3), batcher.submit(2)
    peer.let_go(0)
    _arrived(peer)
    peer.let_go(1)
    assert blocker.wait(10) == 10 and good.wait(10) == 30
    with pytest.raises(ValueError, match="bad 2"):
        bad.wait(10)
    batcher.close()

    def unreachable(items):
        raise ConnectionError("peer gone")

    broken = Batcher(unreachable, name="t")
    pendings = [broken.submit(n) for n in range(3)]
    for pending in pendings:
        with pytest.raises(ConnectionError):
            pending.wait(10)
    broken.close()


def test_an_answer_count_that_does_not_match_fails_every_item():
    batcher = Batcher(lambda items: [1], name="t")
    a = batcher.submit(1)
    assert a.wait(10) == 1
    blocker_gate = threading.Event()

    def slow_then_short(items):
        assert blocker_gate.wait(10)
        return [0]

    short = Batcher(slow_then_short, name="t", max_in_flight=1)
    x = short.submit(1)
    y, z = short.submit(2), short.submit(3)
    blocker_gate.set()
    assert x.wait(10) == 0
    for pending in (y, z):
        with pytest.raises(ValueError, match="1 answers for 2 items"):
            pending.wait(10)
    batcher.close()
    short.close()


def test_an_abandoned_item_is_never_sent():
    peer = Peer()
    batcher = Batcher(peer, name="t", max_in_flight=1)
    blocker = batcher.submit(1)
    _arrived(peer)
    dropped, kept = batcher.submit(2), batcher.submit(3)
    dropped.abandon()
    with pytest.raises(Abandoned):
        dropped.wait(0)
    peer.let_go(0)
    _arrived(peer)
    peer.let_go(1)
    assert blocker.wait(10) == 10 and kept.wait(10) == 30
    assert peer.calls == [[1], [3]]
    batcher.close()


class CancellableCall:
    def __init__(self, items: list) -> None:
        self.items = items
        self.cancelled = threading.Event()

    def result(self) -> list:
        assert self.cancelled.wait(10)
        raise ConnectionAbortedError("cancelled")

    def cancel(self) -> bool:
        self.cancelled.set()
        return True


def test_a_call_is_cancelled_on_the_wire_once_every_item_in_it_is_abandoned():
    calls: list[CancellableCall] = []
    made = threading.Semaphore(0)

    def send(items):
        call = CancellableCall(items)
        calls.append(call)
        made.release()
        return call

    batcher = Batcher(send, name="t", max_in_flight=1)
    a = batcher.submit(1)
    assert made.acquire(timeout=10)
    b, c = batcher.submit(2), batcher.submit(3)
    a.abandon()  # the only item of the first call: it is cancelled
    assert calls[0].cancelled.wait(10)
    assert made.acquire(timeout=10)  # the next call carries b and c
    b.abandon()
    assert not calls[1].cancelled.is_set()  # c still wants its answer
    c.abandon()
    assert calls[1].cancelled.wait(10)
    assert calls[1].items == [2, 3]
    batcher.close()


def test_close_fails_what_is_still_queued_and_refuses_more():
    peer = Peer()
    batcher = Batcher(peer, name="t", max_in_flight=1)
    batcher.submit(1)
    _arrived(peer)
    queued = batcher.submit(2)
    batcher.close()
    with pytest.raises(Abandoned):
        queued.wait(0)
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit(3)
    peer.let_go(0)


def test_call_many_sends_on_the_callers_thread_and_hands_the_rest_on():
    """A caller whose call may go now makes it itself (no hand-off to a
    sender thread); items queued meanwhile go on a sender thread after."""
    threads: list[str] = []
    gate, inside = threading.Event(), threading.Event()

    def send(items):
        threads.append(threading.current_thread().name)
        if len(threads) == 1:
            inside.set()
            assert gate.wait(10)
        return [i * 10 for i in items]

    batcher = Batcher(send, name="t", max_in_flight=1)
    mine: list = []
    caller = threading.Thread(
        target=lambda: mine.extend(p.wait(10) for p in batcher.call_many([1, 2])), name="caller"
    )
    caller.start()
    assert inside.wait(10)
    later = batcher.submit(3)  # queued while the caller's call is out
    gate.set()
    caller.join(10)
    assert mine == [10, 20]
    assert later.wait(10) == 30
    assert threads[0] == "caller" and threads[1].startswith("t")
    batcher.close()
