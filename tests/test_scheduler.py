"""The scheduler over task.Clock: when attempts happen and what is recorded."""

from __future__ import annotations

import dataclasses
import errno
import io
import json
from types import SimpleNamespace

import pytest
from twisted.internet import defer, task
from twisted.logger import globalLogPublisher, formatEvent
from twisted.python.failure import Failure

from relayd import scheduler
from relayd.config import NextHop, Retry, formatDuration
from relayd.delivery import AttemptResult, Destination, RecipientResult, TLSInfo
from relayd.envelope import Envelope, Recipient, Status, newQueueId
from relayd.route import mxHop
from relayd.scheduler import Scheduler, retryDelay
from tests.builders import testConfig


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


def answer(d: defer.Deferred):
    """What an admin request answered: at once, its writes run inline here; raises its failure."""
    box = []
    d.addBoth(box.append)
    assert box, "not answered yet"
    if isinstance(box[0], Failure):
        box[0].raiseException()
    return box[0]


class FakeSpool:
    """Records what the scheduler writes, in order; notices are kept as bytes."""

    def __init__(self):
        self.updated = []
        self.removed = []
        self.events = []
        self.notices = []  # (envelope, content) committed by the scheduler
        self.bodies = {}
        self.commitError = None
        self.updateError = None  # raised by update, e.g. OSError(ENOSPC)
        self.removeError = None  # raised by remove, e.g. OSError(EROFS)
        self.removeBodyError = None  # raised by removeBody
        self.pairs = set()  # ids stored in the older two-file layout
        self.forgotten = []
        self.stored = {}  # queue id -> the envelope as last written

    def openBody(self, queueId):
        return io.BytesIO(self.bodies.get(queueId, ORIGINAL))

    def begin(self, queueId):
        return FakeWriter(self, queueId)

    def update(self, envelope):
        if self.updateError is not None:
            raise self.updateError
        self.updated.append((envelope.queueId, envelope.nextAttempt, [r.state for r in envelope.recipients]))
        self.stored[envelope.queueId] = envelope  # what a load would read back
        self.events.append(("update", envelope.queueId))

    def writeEnvelope(self, queueId, raw):
        self.update(Envelope.fromJSON(json.loads(raw)))

    def remove(self, queueId):
        if self.removeEnvelope(queueId):
            self.removeBody(queueId)

    def removeEnvelope(self, queueId):
        if self.removeError is not None:
            raise self.removeError
        self.removed.append(queueId)
        self.events.append(("remove", queueId))
        return queueId in self.pairs

    def forget(self, queueId):
        self.forgotten.append(queueId)

    def removeBody(self, queueId):
        if self.removeBodyError is not None:
            raise self.removeBodyError
        self.events.append(("removeBody", queueId))


class FakeWriter:
    def __init__(self, spool, queueId):
        self.spool = spool
        self.queueId = queueId
        self.data = b""

    def write(self, data):
        self.data += data

    def commit(self, envelope):
        if self.spool.commitError is not None:
            raise self.spool.commitError
        self.spool.notices.append((envelope, self.data))
        self.spool.bodies[envelope.queueId] = self.data
        self.spool.events.append(("commit", envelope.queueId))

    def abort(self):
        pass


ORIGINAL = b"Received: from client\r\nSubject: the original\r\nMessage-ID: <orig@example.com>\r\n\r\nHello\r\n"


class FakeCourier:
    """Answers each attempt with the next scripted per-recipient codes."""

    def __init__(self, clock):
        self.clock = clock
        self.calls = []
        self.script = []
        self.pending = []
        self.noticeCalls = []
        self.scriptNotices = False

    def deliver(self, hops, sender, mailParams, recipients, openBody, size, recipientParams=None,
                smtputf8=False):
        if sender == "" and not self.scriptNotices:
            # Notices relayd writes itself are delivered at once unless a
            # test scripts them: they must not eat the original's script.
            self.noticeCalls.append((self.clock.seconds(), tuple(recipients)))
            return defer.succeed(result(recipients, [250] * len(recipients)))
        self.calls.append((self.clock.seconds(), tuple(recipients)))
        self.bodies = getattr(self, "bodies", []) + [(openBody().read(), getattr(openBody, "inMemory", False))]
        if not self.script:
            d = defer.Deferred()
            self.pending.append((d, recipients))
            return d
        codes = self.script.pop(0)
        return defer.succeed(result(recipients, codes))


def result(recipients, codes):
    status = {2: Status.SENT, 4: Status.DEFERRED, 5: Status.BOUNCED}
    return AttemptResult(
        relay="smtp.test[192.0.2.7]:25",
        results=tuple(RecipientResult(address=r, code=c, dsn=f"{c // 100}.0.0", text=f"{c} reply",
                                      status=status[c // 100]) for r, c in zip(recipients, codes)),
        connectSeconds=0.5, transmitSeconds=0.25)


def settings(concurrency=20, destinationConcurrency=20, lifetime=5 * 86400.0,
             delayWarning=None, postmaster=None, bounceSizeLimit=50_000):
    """A real config with these delivery settings (seconds and bytes)."""
    return testConfig(
        postmaster=postmaster,
        queue={"lifetime": formatDuration(lifetime), "bounce_size_limit": bounceSizeLimit,
               **({"delay_warning": formatDuration(delayWarning)} if delayWarning else {})},
        delivery={"smarthosts": [{"host": "smtp.test", "port": 25, "tls": "none"}],
                  "concurrency": concurrency, "destination_concurrency": destinationConcurrency},
    )


def envelope(clock, *rcpts, nextAttempt=None):
    return Envelope(queueId=newQueueId(), sender="a@example.com",
                    recipients=[Recipient(r) for r in rcpts], arrival=clock.seconds(),
                    nextAttempt=clock.seconds() if nextAttempt is None else nextAttempt, size=10)


@pytest.fixture
def rig():
    made = rigWith()
    yield made
    made.close()


def test_delivered_message_is_removed_and_logged(rig):
    rig.courier.script = [[250, 250]]
    env = envelope(rig.clock, "b@example.org", "c@example.org")
    rig.sched.add(env)
    assert rig.spool.removed == [env.queueId]
    assert [r.state for r in env.recipients] == [Status.SENT, Status.SENT]
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
    assert rig.spool.updated == [(env.queueId, start + 300, [Status.DEFERRED])]
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
    assert [r.state for r in env.recipients] == [Status.BOUNCED, Status.DEFERRED]
    rig.clock.advance(300)
    # Only the pending recipient is tried again.
    assert rig.courier.calls[1][1] == ("later@example.org",)
    assert [r.state for r in env.recipients] == [Status.BOUNCED, Status.SENT]
    # The refused recipient went back to the sender, once; then the message left.
    [(notice, _)] = rig.spool.notices
    assert notice.recipients[0].address == "a@example.com"
    assert rig.spool.removed == [notice.queueId, env.queueId]
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


# Lifetime, notices and destinations


def parseNotice(content):
    import email
    import email.policy
    message = email.message_from_bytes(content, policy=email.policy.default)
    parts = list(message.iter_parts())
    perMessage, *perRecipient = parts[1].get_payload()
    return message, parts, perMessage, perRecipient


def rigWith(**kw):
    clock = task.Clock()
    clock.advance(1_000_000)
    spool = FakeSpool()
    courier = FakeCourier(clock)
    sched = Scheduler(spool, courier, settings(**kw), clock, random=lambda: 0.5)
    sched.startService()
    lines = []
    observer = lambda e: lines.append(formatEvent(e))  # noqa: E731
    globalLogPublisher.addObserver(observer)
    return SimpleNamespace(clock=clock, spool=spool, courier=courier, sched=sched, lines=lines,
                           close=lambda: globalLogPublisher.removeObserver(observer))


@pytest.fixture
def rigFactory():
    rigs = []

    def make(**kw):
        rigs.append(rigWith(**kw))
        return rigs[-1]
    yield make
    for r in rigs:
        r.close()


@pytest.mark.parametrize("now, arrival, failed, lifetime, expected", [
    (1000, 1000, 1, 86400, 1300),      # plain backoff
    (1000, 0, 5, 86400, 4600),         # capped at retry.max
    (7000, 0, 5, 7200, 7200),          # never past the end of the lifetime
    (7200, 0, 6, 7200, 10800),         # already expired (notice failed): plain backoff
])
def test_next_attempt_time_table(now, arrival, failed, lifetime, expected):
    retry = Retry(min=300.0, max=3600.0)
    assert scheduler.nextAttemptTime(now, arrival, failed, retry, lifetime, 0.5) == expected


def test_attempts_until_expiry_then_one_bounce(rigFactory):
    rig = rigFactory(lifetime=7200.0)
    env = envelope(rig.clock, "b@example.org")
    start = rig.clock.seconds()
    rig.courier.script = [[451]] * 10
    rig.sched.add(env)
    rig.clock.pump([60] * 200)
    # Backoff 5, 10, 20, 40 min; the last attempt falls at the lifetime's end.
    assert [t - start for t, _ in rig.courier.calls] == [0, 300, 900, 2100, 4500, 7200]
    [(notice, content)] = rig.spool.notices
    assert notice.sender == "" and notice.notice == "bounce"
    assert [r.address for r in notice.recipients] == ["a@example.com"]
    message, parts, perMessage, [rcpt] = parseNotice(content)
    assert message["Subject"] == "Undelivered Mail Returned to Sender"
    assert rcpt["Action"] == "failed" and rcpt["Status"] == "4.4.7"
    assert rcpt["Final-Recipient"] == "rfc822; b@example.org"
    assert rcpt["Diagnostic-Code"] == "smtp; 451 reply"
    # The notice is safe on disk before the original leaves the queue.
    assert rig.spool.events.index(("commit", notice.queueId)) < rig.spool.events.index(("remove", env.queueId))
    assert f"{env.queueId}: from=<a@example.com>, status=expired, returned to sender" in rig.lines
    assert f"{env.queueId}: sender non-delivery notification: {notice.queueId}" in rig.lines
    assert rig.sched.queueLength() == 0


def test_delay_warning_is_sent_once(rigFactory):
    rig = rigFactory(delayWarning=3600.0)
    env = envelope(rig.clock, "b@example.org")
    rig.courier.script = [[451]] * 8
    rig.sched.add(env)
    rig.clock.pump([60] * 300)  # 5 hours
    assert len(rig.courier.calls) >= 6
    [(notice, content)] = rig.spool.notices
    assert notice.notice == "delay"
    message, parts, perMessage, [rcpt] = parseNotice(content)
    assert message["Subject"] == "Delayed Mail (still being retried)"
    assert rcpt["Action"] == "delayed" and rcpt["Status"] == "4.0.0"
    assert "Will-Retry-Until" in rcpt
    # Sent at the first attempt ending an hour or more after arrival (4500 s).
    assert notice.arrival - env.arrival == 4500
    assert env.warned and rig.sched.queueLength() == 1
    assert f"{env.queueId}: sender delay notification: {notice.queueId}" in rig.lines


def test_one_notice_per_attempt_covers_every_failed_recipient(rigFactory):
    rig = rigFactory()
    env = envelope(rig.clock, "x@example.org", "y@example.org", "z@example.org")
    rig.courier.script = [[550, 250, 554]]
    rig.sched.add(env)
    [(notice, content)] = rig.spool.notices
    _, _, _, blocks = parseNotice(content)
    assert [b["Final-Recipient"] for b in blocks] == ["rfc822; x@example.org", "rfc822; z@example.org"]
    assert [b["Status"] for b in blocks] == ["5.0.0", "5.0.0"]
    assert env.queueId in rig.spool.removed


def test_null_sender_failure_goes_to_the_postmaster(rigFactory):
    rig = rigFactory(postmaster="pm@example.net")
    rig.courier.scriptNotices = True
    env = envelope(rig.clock, "b@example.org")
    env.sender = ""
    rig.courier.script = [[550]]
    rig.sched.add(env)
    [(notice, content)] = rig.spool.notices
    assert notice.notice == "2bounce" and notice.recipients[0].address == "pm@example.net"
    assert f"{env.queueId}: postmaster non-delivery notification: {notice.queueId}" in rig.lines


def test_null_sender_failure_without_postmaster_is_logged_and_dropped(rigFactory):
    rig = rigFactory()
    rig.courier.scriptNotices = True
    env = envelope(rig.clock, "b@example.org")
    env.sender = ""
    rig.courier.script = [[550]]
    rig.sched.add(env)
    assert rig.spool.notices == []
    assert rig.spool.removed == [env.queueId]
    assert any(f"{env.queueId}: discarded undeliverable notice" in l for l in rig.lines)


def test_failed_double_bounce_produces_nothing(rigFactory):
    rig = rigFactory(postmaster="pm@example.net")
    rig.courier.scriptNotices = True
    env = envelope(rig.clock, "pm@example.net")
    env.sender = ""
    env.notice = "2bounce"
    rig.courier.script = [[550]]
    rig.sched.add(env)
    assert rig.spool.notices == []
    assert rig.spool.removed == [env.queueId]


def test_undeliverable_bounce_expires_into_a_double_bounce_only(rigFactory):
    """A bounce to a dead sender: retried, then one copy to the postmaster, never a bounce to <>."""
    rig = rigFactory(lifetime=3600.0, postmaster="pm@example.net")
    rig.courier.scriptNotices = True
    env = envelope(rig.clock, "dead@example.org")
    env.sender = ""
    env.notice = "bounce"
    rig.courier.script = [[451]] * 10 + [[250]] * 10
    rig.sched.add(env)
    rig.clock.pump([60] * 120)
    [(notice, _)] = rig.spool.notices
    assert notice.notice == "2bounce" and notice.recipients[0].address == "pm@example.net"
    assert env.queueId in rig.spool.removed


def test_notice_that_cannot_be_written_keeps_recipients_pending(rigFactory):
    rig = rigFactory()
    rig.spool.commitError = OSError(28, "No space left on device")
    env = envelope(rig.clock, "b@example.org")
    rig.courier.script = [[550], [550]]
    rig.sched.add(env)
    assert [r.state for r in env.recipients] == [Status.DEFERRED]
    assert rig.spool.removed == []
    assert any("cannot queue notification, will retry: No space left on device" in l for l in rig.lines)
    rig.spool.commitError = None
    rig.clock.advance(300)
    assert len(rig.spool.notices) == 1
    assert env.queueId in rig.spool.removed


def test_destination_concurrency_limit(rigFactory):
    rig = rigFactory(destinationConcurrency=2)
    for i in range(5):
        rig.sched.add(envelope(rig.clock, f"r{i}@example.org"))
    assert len(rig.courier.calls) == 2
    for expected in (3, 4, 5):
        d, rcpts = rig.courier.pending.pop(0)
        d.callback(result(rcpts, [250]))
        assert len(rig.courier.calls) == expected
    assert len(rig.clock.getDelayedCalls()) <= 1


def test_restart_keeps_the_schedule(tmp_path):
    """The next attempt time lives in the spool: a new daemon neither forgets nor hurries it."""
    from relayd.queue import Spool

    clock = task.Clock()
    clock.advance(1_000_000)
    spool = Spool(str(tmp_path / "spool"))
    spool.recover()
    env = envelope(clock, "b@example.org")
    writer = spool.begin(env.queueId)
    writer.write(ORIGINAL)
    writer.commit(env)
    courier = FakeCourier(clock)
    courier.script = [[451]]
    first = Scheduler(spool, courier, settings(), clock, random=lambda: 0.5)
    first.startService()
    first.add(env)
    first.stopService()
    assert len(courier.calls) == 1

    clock.advance(100)
    second = Scheduler(spool, courier, settings(), clock, random=lambda: 0.5)
    [recovered] = spool.recover()
    assert recovered.nextAttempt == env.arrival + 300
    courier.script = [[250]]
    second.add(recovered)
    second.startService()
    clock.advance(199)
    assert len(courier.calls) == 1
    clock.advance(1)
    assert len(courier.calls) == 2
    assert spool.ids() == []


def test_admin_hold_release_delete_flush_requeue_bounce(rigFactory):
    rig = rigFactory()
    a = envelope(rig.clock, "a@example.org")
    b = envelope(rig.clock, "b@example.org")
    rig.courier.script = [[451], [451]]
    rig.sched.add(a)
    rig.sched.add(b)
    assert len(rig.courier.calls) == 2
    assert answer(rig.sched.hold(a.queueId)) == "placed on hold"
    assert answer(rig.sched.hold(a.queueId)) == "already on hold"
    rig.clock.advance(3600)
    assert len(rig.courier.calls) == 3  # only b was retried
    rig.courier.script = [[250]]
    assert answer(rig.sched.release(a.queueId)) == "released from hold"
    assert a.queueId not in rig.sched.envelopes  # tried at once and delivered
    assert rig.sched.flush([b.queueId]) == {b.queueId: "being delivered now"}
    d, rcpts = rig.courier.pending.pop()
    d.callback(result(rcpts, [451]))
    rig.courier.script = [[451]]
    assert rig.sched.flush([b.queueId]) == {b.queueId: "scheduled for delivery now"}
    assert b.attempts == 3
    assert answer(rig.sched.requeue([b.queueId])) == {b.queueId: "requeued"}
    d, rcpts = rig.courier.pending.pop()
    d.callback(result(rcpts, [451]))
    assert b.attempts == 1
    assert rig.sched.bounce(b.queueId) == "returned to sender"
    [(notice, content)] = rig.spool.notices
    _, _, _, [block] = parseNotice(content)
    assert block["Status"] == "5.0.0" and "cancelled by the administrator" in block["Diagnostic-Code"]
    c = envelope(rig.clock, "c@example.org")
    rig.courier.script = [[451]]
    rig.sched.add(c)
    assert answer(rig.sched.delete(c.queueId)) == "removed"
    assert c.queueId in rig.spool.removed
    with pytest.raises(scheduler.UnknownMessage):
        answer(rig.sched.hold(c.queueId))
    for line in (f"{a.queueId}: placed on hold by admin", f"{a.queueId}: released from hold by admin",
                 f"{b.queueId}: requeued by admin", f"{b.queueId}: returned to sender by admin",
                 f"{c.queueId}: removed by admin"):
        assert line in rig.lines


def test_quarantine_report_goes_to_the_postmaster(rigFactory):
    rig = rigFactory(postmaster="pm@example.net")
    rig.sched.reportQuarantine([("0123456789ABCDEF", "envelope is not JSON (Expecting value at byte 0)")])
    [(notice, content)] = rig.spool.notices
    assert notice.notice == "quarantine" and notice.recipients[0].address == "pm@example.net"
    assert b"0123456789ABCDEF: envelope is not JSON" in content
    assert f"postmaster quarantine notification: {notice.queueId}" in rig.lines


def test_no_quarantine_report_without_postmaster(rigFactory):
    rig = rigFactory()
    rig.sched.reportQuarantine([("0123456789ABCDEF", "bad")])
    assert rig.spool.notices == []


def test_held_message_in_a_destination_line_does_not_take_the_freed_slot(rigFactory):
    rig = rigFactory(destinationConcurrency=1)
    a, b, c = (envelope(rig.clock, f"{n}@example.org") for n in "abc")
    for e in (a, b, c):
        rig.sched.add(e)
    assert [rcpts for _, rcpts in rig.courier.calls] == [("a@example.org",)]
    assert rig.sched.flush([b.queueId]) == {b.queueId: scheduler.WAITING_FOR_SLOT}
    assert answer(rig.sched.hold(b.queueId)) == "placed on hold"
    d, rcpts = rig.courier.pending.pop()
    d.callback(result(rcpts, [250]))
    # The slot A freed goes to C; held B drops out of the line.
    assert [rcpts for _, rcpts in rig.courier.calls] == [("a@example.org",), ("c@example.org",)]
    assert answer(rig.sched.release(b.queueId)) == "released from hold"
    assert len(rig.courier.calls) == 2  # C still holds the slot: B waits again
    d, rcpts = rig.courier.pending.pop()
    d.callback(result(rcpts, [250]))
    assert rig.courier.calls[-1][1] == ("b@example.org",)


def test_attempt_that_breaks_backs_off_and_is_held_when_its_lifetime_ends(rigFactory):
    rig = rigFactory(lifetime=7200.0)
    calls = []

    class Broken:
        def deliver(self, destination, sender, mailParams, recipients, openBody, size,
                    recipientParams=None, smtputf8=False):
            calls.append(rig.clock.seconds())
            raise RuntimeError("a bug")
    rig.sched.transport = Broken()
    env = envelope(rig.clock, "b@example.org")
    start = rig.clock.seconds()
    rig.sched.add(env)
    rig.clock.pump([60] * 400)
    # Counted and backed off like any failed attempt, the last at the lifetime's end...
    assert [t - start for t in calls] == [0, 300, 900, 2100, 4500, 7200]
    assert env.attempts == 6
    # ...then held for an admin (and written so), not returned to the sender.
    assert env.hold and rig.spool.notices == [] and rig.spool.removed == []
    assert rig.spool.updated[-1][0] == env.queueId
    assert any(f"{env.queueId}: warning: placed on hold: delivery attempts keep failing "
               "unexpectedly" in line for line in rig.lines)


def test_admin_change_that_cannot_be_written_is_undone(rigFactory):
    rig = rigFactory()
    a, b = envelope(rig.clock, "a@example.org"), envelope(rig.clock, "b@example.org")
    rig.courier.script = [[451], [451]]
    rig.sched.add(a)
    rig.sched.add(b)
    rig.spool.updateError = OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(OSError):
        answer(rig.sched.hold(a.queueId))
    assert not a.hold
    rig.spool.updateError = None
    answer(rig.sched.hold(a.queueId))
    rig.spool.updateError = OSError(errno.ENOSPC, "No space left on device")
    nextAttempt = a.nextAttempt
    with pytest.raises(OSError):
        answer(rig.sched.release(a.queueId))
    assert a.hold and a.nextAttempt == nextAttempt
    outcomes = answer(rig.sched.requeue())
    assert isinstance(outcomes[a.queueId], OSError) and outcomes[b.queueId] == scheduler.REQUEUED
    assert a.hold and a.attempts == 1 and a.lastError == "451 reply" and a.nextAttempt == nextAttempt


def test_requeue_writes_only_a_changed_hold(rigFactory):
    rig = rigFactory()
    a, b = envelope(rig.clock, "a@example.org"), envelope(rig.clock, "b@example.org")
    rig.courier.script = [[451], [451]]
    rig.sched.add(a)
    rig.sched.add(b)
    answer(rig.sched.hold(a.queueId))
    written = len(rig.spool.updated)
    rig.courier.pending.clear()
    assert answer(rig.sched.requeue()) == {a.queueId: scheduler.REQUEUED, b.queueId: scheduler.REQUEUED}
    # a's hold was lifted on disk; b's reset is written by the attempt it gets now.
    assert [u[0] for u in rig.spool.updated[written:]] == [a.queueId]
    assert not a.hold and a.attempts == 0 and b.attempts == 0


@pytest.mark.parametrize("error", [
    OSError(errno.EROFS, "Read-only file system"),
    OSError(errno.EMFILE, "Too many open files"),
])
def test_envelope_that_cannot_be_updated_after_an_attempt_stays_queued(rigFactory, error):
    """
    One warning line, no traceback; the message keeps its place in the
    queue and its schedule, and the next write records it.
    """
    rig = rigFactory()
    env = envelope(rig.clock, "b@example.org", "c@example.org")
    rig.courier.script = [[250, 451], [250]]
    rig.spool.updateError = error
    start = rig.clock.seconds()
    rig.sched.add(env)
    assert rig.sched.envelopes[env.queueId] is env
    assert [r.state for r in env.recipients] == [Status.SENT, Status.DEFERRED]
    assert env.nextAttempt == start + 300
    warnings = [l for l in rig.lines if "warning" in l]
    assert warnings == [f"{env.queueId}: warning: cannot update the queue file: {error.strerror}; "
                        "message kept in the queue, next attempt as scheduled"]
    assert not any("Traceback" in l or "unexpectedly" in l for l in rig.lines)
    rig.spool.updateError = None
    rig.clock.advance(300)
    # Retried as usual: only the recipient still pending, then removed.
    assert rig.courier.calls[1][1] == ("c@example.org",)
    assert rig.spool.removed == [env.queueId]


def test_message_that_cannot_be_removed_stays_queued_until_it_can(rigFactory):
    rig = rigFactory()
    env = envelope(rig.clock, "b@example.org")
    rig.courier.script = [[250]]
    rig.spool.removeError = OSError(errno.EROFS, "Read-only file system")
    rig.sched.add(env)
    assert rig.sched.queueLength() == 1
    assert f"{env.queueId}: removed" not in rig.lines
    assert [l for l in rig.lines if "warning" in l] == [
        f"{env.queueId}: warning: cannot remove the queue file: Read-only file system; "
        "message kept in the queue, next attempt as scheduled"]
    assert not any("Traceback" in l or "unexpectedly" in l for l in rig.lines)
    rig.spool.removeError = None
    rig.clock.advance(300)
    # Not sent again: the next attempt only removes it.
    assert len(rig.courier.calls) == 1
    assert rig.spool.removed == [env.queueId]
    assert rig.sched.queueLength() == 0
    assert f"{env.queueId}: removed" in rig.lines


# -- the delivery boundary ---------------------------------------------------------------


class RecordingTransport:
    """Another transport: records what the scheduler hands it, answers with ``answer``."""

    def __init__(self, answer):
        self.answer = answer
        self.calls = []

    def deliver(self, destination, sender, mailParams, recipients, openBody, size,
                recipientParams=None, smtputf8=False):
        self.calls.append((destination, tuple(recipients)))
        return defer.succeed(self.answer(tuple(recipients)))


def test_transport_gets_one_destination_of_next_hops_per_group(rig):
    transport = RecordingTransport(lambda rs: result(rs, [250] * len(rs)))
    rig.sched.transport = transport
    rig.sched.add(envelope(rig.clock, "b@example.org", "c@example.net"))
    rig.sched.reconfigure(testConfig(delivery={"smarthosts": []}))  # MX delivery: a group per domain
    rig.sched.add(envelope(rig.clock, "d@example.org", "e@example.net", "f@Example.ORG"))
    assert transport.calls == [
        (Destination((NextHop("smtp.test", 25, "none"),)), ("b@example.org", "c@example.net")),
        (Destination((mxHop("example.org"),)), ("d@example.org", "f@Example.ORG")),
        (Destination((mxHop("example.net"),)), ("e@example.net",)),
    ]


def test_scheduler_logs_the_tls_sessions_of_an_attempt_before_its_results(rig):
    tls = TLSInfo("TLSv1.3", "TLS_AES_256_GCM_SHA384", 256, "Verified")
    rig.sched.transport = RecordingTransport(lambda rs: dataclasses.replace(
        result(rs, [250] * len(rs)), tlsSessions=(("smtp.test[192.0.2.7]:25", tls),)))
    env = envelope(rig.clock, "b@example.org")
    rig.sched.add(env)
    tlsLine = ("Verified TLS connection established to smtp.test[192.0.2.7]:25: "
               "TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)")
    [tlsIndex] = [i for i, l in enumerate(rig.lines) if tlsLine in l]
    [toIndex] = [i for i, l in enumerate(rig.lines) if "to=<b@example.org>" in l]
    assert tlsIndex < toIndex


def test_scheduler_logs_a_transport_local_error_and_keeps_the_recipient(rig):
    def answer(rs):
        return AttemptResult(
            "none", tuple(RecipientResult(r, 0, "4.3.0", "delivery failed locally: RuntimeError",
                                          Status.DEFERRED) for r in rs),
            0.0, 0.0, localErrors=(Failure(RuntimeError("a bug")),))
    rig.sched.transport = RecordingTransport(answer)
    env = envelope(rig.clock, "b@example.org")
    rig.sched.add(env)
    assert [r.state for r in env.recipients] == [Status.DEFERRED]
    assert any(f"delivery attempt of {env.queueId} failed locally" in l for l in rig.lines)


def test_a_new_message_is_sent_from_memory_once_then_read_from_the_spool(rig, monkeypatch):
    """The body just committed is not read back for the first attempt; later ones read the spool."""
    rig.courier.script = [[451], [250]]
    env = envelope(rig.clock, "b@example.org")
    rig.spool.bodies[env.queueId] = b"on disk"
    rig.sched.keepBody(env.queueId, b"on disk")
    rig.sched.add(env)
    rig.clock.advance(300)
    assert rig.courier.bodies == [(b"on disk", True), (b"on disk", False)]
    assert rig.sched._keptBytes == 0


def test_kept_bodies_are_bounded_and_freed_when_their_message_goes(rig, monkeypatch):
    monkeypatch.setattr(scheduler, "KEPT_BODIES_LIMIT", 10)
    a, b = envelope(rig.clock, "a@example.org"), envelope(rig.clock, "b@example.org")
    rig.sched.keepBody(a.queueId, b"x" * 6)
    rig.sched.keepBody(b.queueId, b"y" * 6)  # over the limit: read from the spool later
    assert list(rig.sched._keptBodies) == [a.queueId] and rig.sched._keptBytes == 6
    a.hold = True
    rig.sched.add(a)
    answer(rig.sched.delete(a.queueId))
    assert rig.sched._keptBodies == {} and rig.sched._keptBytes == 0


def test_a_delivered_message_in_one_file_leaves_with_one_removal(rig):
    rig.courier.script = [[250]]
    env = envelope(rig.clock, "b@example.org")
    rig.sched.add(env)
    assert rig.spool.events == [("remove", env.queueId)]
    assert rig.sched.queueLength() == 0
    assert [l for l in rig.lines if l.startswith(env.queueId)][-1] == f"{env.queueId}: removed"


def test_delivered_message_leaves_with_its_envelope_and_the_body_goes_after(rig):
    # The older two-file layout: the unlink of the envelope takes the
    # message out of the queue; the body's unlink comes after "removed"
    # (recovery deletes a body left without envelope), and one that fails
    # is only a warning.
    rig.courier.script = [[250]]
    rig.spool.removeBodyError = OSError(errno.EIO, "Input/output error")
    env = envelope(rig.clock, "b@example.org")
    rig.spool.pairs.add(env.queueId)
    rig.sched.add(env)
    assert rig.spool.events == [("remove", env.queueId)]
    assert rig.sched.queueLength() == 0
    assert [l for l in rig.lines if l.startswith(env.queueId)][-2:] == [
        f"{env.queueId}: removed",
        f"{env.queueId}: warning: cannot remove the message body: Input/output error; "
        "removed at the next start"]
    rig.spool.removeBodyError = None
    rig.courier.script = [[250]]
    other = envelope(rig.clock, "c@example.org")
    rig.spool.pairs.add(other.queueId)
    rig.sched.add(other)
    assert rig.spool.events[-2:] == [("remove", other.queueId), ("removeBody", other.queueId)]


def test_removals_asked_for_while_one_runs_share_the_next_thread_job(rigFactory):
    jobs = []

    def runInThread(f, *args):
        d = defer.Deferred()
        jobs.append((f, args, d))
        return d

    clock = task.Clock()
    spool = FakeSpool()
    courier = FakeCourier(clock)
    sched = Scheduler(spool, courier, settings(), clock, random=lambda: 0.5, runInThread=runInThread)
    sched.startService()
    envs = [envelope(clock, f"r{i}@example.org") for i in range(5)]
    for e in envs:
        sched.add(e)
    for d, rcpts in courier.pending:
        d.callback(result(rcpts, [250]))
    # Envelope removals: REMOVAL_JOBS jobs at once, the rest in one more.
    from relayd.scheduler import REMOVAL_JOBS
    assert len(jobs) == REMOVAL_JOBS
    while jobs:
        f, args, d = jobs.pop(0)
        d.callback(f(*args))
    assert sorted(spool.removed) == sorted(e.queueId for e in envs)
    assert sched.queueLength() == 0
