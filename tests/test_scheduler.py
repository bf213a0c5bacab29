"""The scheduler over task.Clock: when attempts happen and what is recorded."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from twisted.internet import defer, task
from twisted.logger import globalLogPublisher, formatEvent

from relayd import scheduler
from relayd.config import NextHop
from relayd.courier import AttemptResult, RecipientResult
from relayd.envelope import FAILED, PENDING, SENT, Envelope, Recipient, newQueueId
from relayd.scheduler import Scheduler, retryDelay


@pytest.mark.parametrize("failed, jitter, expected", [
    (1, 0.5, 300),      # first retry: the minimum
    (2, 0.5, 600),
    (3, 0.5, 1200),
    (4, 0.5, 2400),
    (5, 0.5, 3600),     # capped
    (50, 0.5, 3600),
    (2000, 0.5, 3600),  # no overflow
    (2, 0.0, 540),      # -10%
    (2, 0.999, 659.88),  # +10%
    (1, 0.0, 300),      # never below the minimum
    (5, 0.999, 3600),   # never above the maximum
    (0, 0.5, 300),
])
def test_retry_delay_table(failed, jitter, expected):
    assert retryDelay(failed, 300, 3600, jitter) == pytest.approx(expected, abs=0.01)


class FakeSpool:
    def __init__(self):
        self.updated = []
        self.removed = []

    def openBody(self, queueId):
        raise AssertionError("the fake courier does not read bodies")

    def update(self, envelope):
        self.updated.append((envelope.queueId, envelope.nextAttempt, [r.state for r in envelope.recipients]))

    def remove(self, queueId):
        self.removed.append(queueId)


class FakeCourier:
    """Answers each attempt with the next scripted per-recipient codes."""

    def __init__(self, clock):
        self.clock = clock
        self.calls = []
        self.script = []
        self.pending = []

    def deliver(self, hops, sender, mailParams, recipients, openBody, size):
        self.calls.append((self.clock.seconds(), tuple(recipients)))
        if not self.script:
            d = defer.Deferred()
            self.pending.append((d, recipients))
            return d
        codes = self.script.pop(0)
        return defer.succeed(result(recipients, codes))


def result(recipients, codes):
    status = {2: "sent", 4: "deferred", 5: "bounced"}
    return AttemptResult(
        relay="smtp.test[192.0.2.7]:25",
        results=tuple(RecipientResult(address=r, code=c, dsn=f"{c // 100}.0.0", text=f"{c} reply",
                                      status=status[c // 100]) for r, c in zip(recipients, codes)),
        connectSeconds=0.5, transmitSeconds=0.25)


def settings(concurrency=20):
    return SimpleNamespace(
        queue=SimpleNamespace(retry=SimpleNamespace(min=300.0, max=3600.0)),
        delivery=SimpleNamespace(smarthosts=(NextHop(host="smtp.test", port=25, tls="none"),),
                                 concurrency=concurrency),
        shutdownGrace=30.0,
    )


def envelope(clock, *rcpts, nextAttempt=None):
    return Envelope(queueId=newQueueId(), sender="a@example.com",
                    recipients=[Recipient(r) for r in rcpts], arrival=clock.seconds(),
                    nextAttempt=clock.seconds() if nextAttempt is None else nextAttempt, size=10)


@pytest.fixture
def rig():
    clock = task.Clock()
    clock.advance(1_000_000)
    spool = FakeSpool()
    courier = FakeCourier(clock)
    sched = Scheduler(spool, courier.deliver, settings(), clock, random=lambda: 0.5)
    sched.startService()
    lines = []
    observer = lambda e: lines.append(formatEvent(e))  # noqa: E731
    globalLogPublisher.addObserver(observer)
    yield SimpleNamespace(clock=clock, spool=spool, courier=courier, sched=sched, lines=lines)
    globalLogPublisher.removeObserver(observer)


def test_delivered_message_is_removed_and_logged(rig):
    rig.courier.script = [[250, 250]]
    env = envelope(rig.clock, "b@example.org", "c@example.org")
    rig.sched.add(env)
    assert rig.spool.removed == [env.queueId]
    assert [r.state for r in env.recipients] == [SENT, SENT]
    assert rig.sched.queueLength() == 0
    tos = [l for l in rig.lines if "to=<" in l]
    assert tos[0] == (f"{env.queueId}: to=<b@example.org>, relay=smtp.test[192.0.2.7]:25, delay=0, "
                      "delays=0/0/0.5/0.25, dsn=2.0.0, status=sent (250 reply)")
    assert f"{env.queueId}: removed" in rig.lines


def test_temporary_failure_retries_with_backoff(rig):
    rig.courier.script = [[450], [450], [250]]
    env = envelope(rig.clock, "b@example.org")
    start = rig.clock.seconds()
    rig.sched.add(env)
    assert rig.spool.updated == [(env.queueId, start + 300, [PENDING])]
    rig.clock.advance(299)
    assert len(rig.courier.calls) == 1
    rig.clock.advance(1)
    assert len(rig.courier.calls) == 2
    assert env.nextAttempt == start + 300 + 600
    rig.clock.advance(600)
    assert [c[0] - start for c in rig.courier.calls] == [0, 300, 900]
    assert rig.spool.removed == [env.queueId]
    assert "status=deferred (450 reply)" in " ".join(rig.lines)


def test_permanent_failure_marks_recipient_failed_and_rest_retries(rig):
    rig.courier.script = [[550, 450], [250]]
    env = envelope(rig.clock, "gone@example.org", "later@example.org")
    rig.sched.add(env)
    assert [r.state for r in env.recipients] == [FAILED, PENDING]
    rig.clock.advance(300)
    # Only the pending recipient is tried again.
    assert rig.courier.calls[1][1] == ("later@example.org",)
    assert [r.state for r in env.recipients] == [FAILED, SENT]
    assert rig.spool.removed == [env.queueId]
    assert any("to=<gone@example.org>" in l and "status=bounced (550 reply)" in l for l in rig.lines)


def test_future_next_attempt_is_honoured_after_restart(rig):
    env = envelope(rig.clock, "b@example.org", nextAttempt=rig.clock.seconds() + 1000)
    rig.courier.script = [[250]]
    rig.sched.add(env)
    assert rig.courier.calls == []
    rig.clock.advance(999)
    assert rig.courier.calls == []
    rig.clock.advance(1)
    assert len(rig.courier.calls) == 1


def test_concurrency_limit(rig):
    rig.sched.reconfigure(settings(concurrency=2))
    envs = [envelope(rig.clock, f"r{i}@example.org") for i in range(5)]
    for e in envs:
        rig.sched.add(e)
    assert len(rig.courier.calls) == 2
    d, rcpts = rig.courier.pending.pop(0)
    d.callback(result(rcpts, [250]))
    assert len(rig.courier.calls) == 3


def test_held_message_is_not_tried(rig):
    env = envelope(rig.clock, "b@example.org")
    env.hold = True
    rig.sched.add(env)
    rig.clock.advance(10_000)
    assert rig.courier.calls == []


def test_stop_waits_for_attempts_in_flight_within_grace(rig):
    rig.sched.add(envelope(rig.clock, "b@example.org"))
    d = rig.sched.stopService(grace=30)
    assert not d.called
    rig.clock.advance(30)
    assert d.called


def test_stop_fires_when_attempt_finishes(rig):
    rig.sched.add(envelope(rig.clock, "b@example.org"))
    d = rig.sched.stopService(grace=30)
    pending, rcpts = rig.courier.pending.pop()
    pending.callback(result(rcpts, [250]))
    assert d.called
    # Nothing new starts once stopped.
    rig.courier.script = [[250]]
    rig.sched.add(envelope(rig.clock, "c@example.org"))
    assert len(rig.courier.calls) == 1


def test_many_messages_cost_one_timer(rig):
    for i in range(1000):
        rig.sched.add(envelope(rig.clock, "b@example.org", nextAttempt=rig.clock.seconds() + 100 + i))
    assert len(rig.clock.getDelayedCalls()) == 1
