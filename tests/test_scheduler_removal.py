"""
A delivered message gives back its delivery slot (and its connection goes
on to the next message) while its envelope's removal still runs in a
spool thread; how many wait so is bounded, the "removed" line comes only
once the envelope is gone, and the admin and the stop see such messages
as they are: delivered, on their way out of the queue.
"""

from __future__ import annotations

import errno
from types import SimpleNamespace

import pytest
from twisted.internet import defer, task
from twisted.logger import formatEvent, globalLogPublisher

from relayd.envelope import Status
from relayd.scheduler import BEING_REMOVED, AdminRefusal, Scheduler
from tests.test_courier import EHLO_FULL, GREETING, Network, converse
from tests.test_scheduler import FakeCourier, FakeSpool, answer, envelope, result, settings


class Threads:
    """A runInThread whose jobs run only when the test says so."""

    def __init__(self):
        self.jobs = []

    def __call__(self, f, *args):
        d = defer.Deferred()
        self.jobs.append((f, args, d))
        return d

    def runOne(self):
        f, args, d = self.jobs.pop(0)
        try:
            value = f(*args)
        except Exception as e:
            d.errback(e)
        else:
            d.callback(value)

    def runAll(self):
        while self.jobs:
            self.runOne()


@pytest.fixture
def rig():
    lines = []
    observer = lambda e: lines.append(formatEvent(e))  # noqa: E731
    globalLogPublisher.addObserver(observer)
    made = []

    def make(concurrency=1, handOff=None, transport=None):
        clock = task.Clock()
        clock.advance(1_000_000)
        spool = FakeSpool()
        courier = FakeCourier(clock)
        threads = Threads()
        sched = Scheduler(spool, transport or courier, settings(concurrency=concurrency), clock,
                          random=lambda: 0.5, runInThread=threads, handOff=handOff)
        sched.startService()
        made.append(SimpleNamespace(clock=clock, spool=spool, courier=courier, threads=threads,
                                    sched=sched, lines=lines))
        return made[-1]

    yield make
    globalLogPublisher.removeObserver(observer)


def deliverPending(courier, code=250):
    d, rcpts = courier.pending.pop(0)
    d.callback(result(rcpts, [code]))


def test_next_attempt_starts_before_the_delivered_envelope_is_removed(rig):
    r = rig(concurrency=1)
    first, second = envelope(r.clock, "a@example.org"), envelope(r.clock, "b@example.org")
    r.sched.add(first)
    r.sched.add(second)
    assert len(r.courier.calls) == 1
    deliverPending(r.courier)
    # The first envelope's unlink waits in a spool thread; the one slot is free already.
    assert r.spool.removed == []
    assert [c[1] for c in r.courier.calls] == [("a@example.org",), ("b@example.org",)]
    r.threads.runAll()
    assert r.spool.removed == [first.queueId]


def test_removed_is_logged_only_once_the_envelope_is_gone(rig):
    r = rig(concurrency=1)
    env = envelope(r.clock, "a@example.org")
    r.sched.add(env)
    deliverPending(r.courier)
    assert f"{env.queueId}: removed" not in r.lines
    # Still in the queue (and in the active queue) until then.
    assert r.sched.queueLength() == 1
    assert r.sched.activeIds() == [env.queueId]
    r.threads.runOne()
    assert r.spool.removed == [env.queueId]
    assert f"{env.queueId}: removed" in r.lines
    assert r.sched.queueLength() == 0
    assert r.sched.activeIds() == []


def test_no_attempt_starts_while_pending_removals_fill_the_bound(rig):
    # concurrency 1: one attempt in flight, and with the removals waiting,
    # at most two messages that a crash could deliver again.
    r = rig(concurrency=1)
    envs = [envelope(r.clock, f"r{i}@example.org") for i in range(3)]
    for e in envs:
        r.sched.add(e)
    deliverPending(r.courier)
    assert len(r.courier.calls) == 2  # one removal waits, one attempt runs
    deliverPending(r.courier)
    assert len(r.courier.calls) == 2  # two removals wait: nothing starts
    assert r.sched.takeSlots(["example.org"]) is None  # nor an intake worker's attempt
    r.clock.advance(1000)
    assert len(r.courier.calls) == 2
    r.threads.runOne()
    assert r.spool.removed == [envs[0].queueId]
    assert len(r.courier.calls) == 3


def test_admin_leaves_a_message_being_removed_alone(rig):
    r = rig(concurrency=1)
    env = envelope(r.clock, "a@example.org")
    r.sched.add(env)
    deliverPending(r.courier)
    queueId = env.queueId
    for request in (r.sched.hold, r.sched.release, r.sched.delete, r.sched.bounce):
        with pytest.raises(AdminRefusal, match=BEING_REMOVED):
            request(queueId)
    assert r.sched.flush([queueId]) == {queueId: BEING_REMOVED}
    assert r.sched.flush() == {queueId: BEING_REMOVED}
    assert answer(r.sched.requeue([queueId])) == {queueId: BEING_REMOVED}
    assert not any("flushed" in l or "requeued" in l for l in r.lines)
    r.threads.runAll()
    # Nothing was written after the removal, and it is not tried again.
    assert r.spool.events[0] == ("remove", queueId)
    assert ("update", queueId) not in r.spool.events
    r.clock.advance(10_000)
    assert len(r.courier.calls) == 1


def test_a_removal_that_fails_keeps_the_message_queued_and_retried(rig):
    r = rig(concurrency=1)
    env = envelope(r.clock, "a@example.org")
    r.sched.add(env)
    r.spool.removeError = OSError(errno.EROFS, "Read-only file system")
    deliverPending(r.courier)
    r.threads.runAll()
    assert r.sched.queueLength() == 1 and r.sched.activeIds() == []
    assert f"{env.queueId}: removed" not in r.lines
    assert any("cannot remove the queue file: Read-only file system" in l for l in r.lines)
    r.spool.removeError = None
    r.clock.advance(300)
    r.threads.runAll()
    assert len(r.courier.calls) == 1  # the next attempt only removes it
    assert r.spool.removed == [env.queueId]
    assert f"{env.queueId}: removed" in r.lines


def test_stop_waits_for_the_removals_of_delivered_messages(rig):
    r = rig(concurrency=1)
    env = envelope(r.clock, "a@example.org")
    r.sched.add(env)
    deliverPending(r.courier)
    stopped = r.sched.stopService(grace=30)
    assert not stopped.called
    r.threads.runOne()
    assert stopped.called
    assert f"{env.queueId}: removed" in r.lines


def test_stop_waits_for_a_removal_its_attempt_asks_for_later(rig):
    r = rig(concurrency=1)
    env = envelope(r.clock, "a@example.org")
    r.sched.add(env)
    stopped = r.sched.stopService(grace=30)
    deliverPending(r.courier)
    assert not stopped.called
    r.threads.runOne()
    assert stopped.called and r.spool.removed == [env.queueId]


def test_an_intake_workers_first_attempt_keeps_its_slot_until_the_removal(rig):
    # The master hears the attempt ended (and frees the slot it granted)
    # only once the message is gone from the spool.
    ended = []
    handOff = SimpleNamespace(ended=lambda queueId, kept: ended.append((queueId, kept)),
                              notice=lambda e: None)
    r = rig(concurrency=1, handOff=handOff)
    first, second = envelope(r.clock, "a@example.org"), envelope(r.clock, "b@example.org")
    r.sched.add(first)
    r.sched.add(second)
    deliverPending(r.courier)
    assert len(r.courier.calls) == 1 and ended == []
    assert r.sched.isActive(first.queueId)
    r.threads.runAll()
    assert ended == [(first.queueId, False)]
    assert len(r.courier.calls) == 2


def test_the_connection_carries_the_next_message_while_the_removal_waits(rig):
    # The real courier: after the sink's 250 for the first message, the
    # second one's MAIL goes out on the same connection although the
    # first envelope's unlink has not run yet.
    net = Network(smtp_test="192.0.2.7")
    r = rig(concurrency=1, transport=net.courier())
    first, second = envelope(r.clock, "a@example.org"), envelope(r.clock, "b@example.org")
    r.sched.add(first)
    r.sched.add(second)
    peer = net.peers["smtp.test"]
    converse(peer, [GREETING, EHLO_FULL, b"250 Ok\r\n250 Ok\r\n", b"354 go\r\n"])
    peer.sent()
    peer.feed(b"250 2.0.0 Ok: queued as 1\r\n")
    assert r.spool.removed == []
    assert peer.sent().startswith(b"MAIL FROM:<a@example.com>")
    assert net.attempts == ["smtp.test"]
    converse(peer, [b"250 Ok\r\n250 Ok\r\n", b"354 go\r\n", b"250 2.0.0 Ok: queued as 2\r\n"])
    assert [r_.state for r_ in second.recipients] == [Status.SENT]
    r.threads.runAll()
    assert sorted(r.spool.removed) == sorted([first.queueId, second.queueId])


def test_a_destination_slot_is_given_back_once(rig):
    # destination_concurrency 1: the slot goes to the next message at the
    # first one's 250, and the end of its removal frees nothing more.
    r = rig(concurrency=5)
    r.sched.reconfigure(settings(concurrency=5, destinationConcurrency=1))
    envs = [envelope(r.clock, f"r{i}@example.org") for i in range(3)]
    for e in envs:
        r.sched.add(e)
    assert len(r.courier.calls) == 1
    deliverPending(r.courier)
    assert len(r.courier.calls) == 2
    r.threads.runAll()  # the first removal ends while the second attempt runs
    assert r.spool.removed == [envs[0].queueId]
    assert len(r.courier.calls) == 2
    deliverPending(r.courier)
    assert len(r.courier.calls) == 3
