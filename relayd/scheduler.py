"""
The scheduler: decides when each queued message is tried, records what
happened, and returns to the sender what cannot be delivered.

A heap keyed by next attempt time holds every message the daemon knows;
one IDelayedCall is armed for the earliest, so each event costs O(log n)
and the spool is read only once, at start-up. The retry delay is a pure
function. Attempts run through the courier, at most ``delivery.concurrency``
at a time and at most ``delivery.destination_concurrency`` per destination
(a next-hop list from route.groupByDestination); a message whose
destination is full waits in that destination's line, not in the heap.

After each attempt the envelope's per-recipient state is written back with
an atomic rename (no fsync: a crash repeats a delivery, never loses one).
Recipients that failed permanently in the attempt, or that are still
pending when ``queue.lifetime`` has run out, get one notice (relayd.bounce)
which is committed to the spool, fsynced, *before* they are marked done: a
crash in between sends the notice twice at worst, never not at all.
"""

from __future__ import annotations

import heapq
import random as _random
from collections import deque
from collections.abc import Callable, Iterable, Sequence

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from relayd import bounce, maillog, route
from relayd.courier import BOUNCED, SENT, AttemptResult
from relayd.envelope import (
    FAILED,
    NOTICE_BOUNCE,
    NOTICE_DELAY,
    NOTICE_DOUBLE_BOUNCE,
    NOTICE_QUARANTINE,
    PENDING,
    SENT as RECIPIENT_SENT,
    Envelope,
    Recipient,
)

log = Logger()


def retryDelay(failedAttempts: int, minimum: float, maximum: float, jitter: float) -> float:
    """
    Seconds until the next attempt after ``failedAttempts`` failures:
    ``minimum`` doubled per failure, capped at ``maximum``, then spread by
    ±10% (``jitter`` in [0, 1)) so messages deferred together do not retry
    together, and kept within [minimum, maximum].
    """
    exponent = min(max(failedAttempts - 1, 0), 62)
    base = min(maximum, minimum * (2 ** exponent))
    spread = base * (0.9 + 0.2 * jitter)
    return max(minimum, min(maximum, spread))


def nextAttemptTime(now: float, arrival: float, failedAttempts: int, retry, lifetime: float,
                    jitter: float) -> float:
    """
    When to try again: after the retry delay, but not later than the end of
    the lifetime, so a message gets its last attempt when it expires rather
    than up to ``retry.max`` after.
    """
    due = now + retryDelay(failedAttempts, retry.min, retry.max, jitter)
    expiry = arrival + lifetime
    if expiry > now:
        due = min(due, expiry)
    return due


class UnknownMessage(KeyError):
    """No message with this queue id is in the queue."""


class AdminRefusal(Exception):
    """An admin request that cannot be done now; the text says why."""


class Scheduler(service.Service):
    """
    ``deliver(hops, sender, mailParams, recipients, openBody, size)`` is the
    courier's; ``settings`` is the loaded config (``hostname``,
    ``postmaster``, ``queue``, ``delivery``), replaced on reload with
    ``reconfigure``. ``runInThread(f, *args)`` runs blocking spool work
    (writing a notice) off the reactor thread and returns a Deferred; tests
    run it inline.
    """

    name = "scheduler"

    def __init__(self, spool, deliver: Callable[..., defer.Deferred], settings, clock,
                 random: Callable[[], float] = _random.random,
                 runInThread: Callable[..., defer.Deferred] | None = None):
        self.spool = spool
        self.deliver = deliver
        self.settings = settings
        self.clock = clock
        self.random = random
        self.runInThread = runInThread or defer.maybeDeferred
        self.envelopes: dict[str, Envelope] = {}
        self._heap: list[tuple[float, int, str]] = []
        self._sequence = 0
        self._timer = None
        self._waking = False
        self._wakeAgain = False
        # queue id -> (attempt Deferred, destinations it occupies)
        self._active: dict[str, tuple[defer.Deferred, tuple]] = {}
        self._perDestination: dict[tuple, int] = {}
        # Due messages waiting for a slot at a full destination, in order.
        self._blocked: dict[tuple, deque[str]] = {}
        self._waiting: set[str] = set()

    # Feeding the schedule

    def add(self, envelope: Envelope) -> None:
        """A message is committed (new, or recovered at start-up): schedule it."""
        self.envelopes[envelope.queueId] = envelope
        self._push(envelope)
        self._wake()

    def reconfigure(self, settings) -> None:
        self.settings = settings
        self._wake()

    def _push(self, envelope: Envelope) -> None:
        self._sequence += 1
        heapq.heappush(self._heap, (envelope.nextAttempt, self._sequence, envelope.queueId))

    def _wake(self) -> None:
        # An attempt that completes at once calls back in here; the outer
        # call then goes round again instead of nesting (one timer, always).
        if self._waking:
            self._wakeAgain = True
            return
        self._waking = True
        try:
            self._wakeAgain = True
            while self._wakeAgain:
                self._wakeAgain = False
                self._startDue()
        finally:
            self._waking = False

    def _startDue(self) -> None:
        """Start what is due now; arm one timer for the earliest future entry."""
        if not self.running:
            return
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        now = self.clock.seconds()
        limit = self.settings.delivery.concurrency
        while self._heap and len(self._active) < limit:
            due, _, queueId = self._heap[0]
            envelope = self.envelopes.get(queueId)
            if (envelope is None or envelope.nextAttempt != due or queueId in self._active
                    or queueId in self._waiting):
                heapq.heappop(self._heap)  # stale entry: removed, rescheduled or waiting
                continue
            if due > now:
                break
            heapq.heappop(self._heap)
            if envelope.hold:
                continue
            destinations = self._destinations(envelope)
            full = self._fullDestination(destinations)
            if full is not None:
                self._waiting.add(queueId)
                self._blocked.setdefault(full, deque()).append(queueId)
                continue
            self._start(envelope, destinations, self._attempt)
        if self._heap and len(self._active) < limit:
            self._timer = self.clock.callLater(max(0.0, self._heap[0][0] - now), self._wake)

    def _destinations(self, envelope: Envelope) -> tuple:
        groups = route.groupByDestination([r.address for r in envelope.pending()],
                                          self.settings.delivery)
        return tuple(groups)

    def _fullDestination(self, destinations: Iterable[tuple]) -> tuple | None:
        limit = self.settings.delivery.destinationConcurrency
        for destination in destinations:
            if self._perDestination.get(destination, 0) >= limit:
                return destination
        return None

    # One attempt

    def _start(self, envelope: Envelope, destinations: tuple, work) -> None:
        started = self.clock.seconds()
        for destination in destinations:
            self._perDestination[destination] = self._perDestination.get(destination, 0) + 1
        d = work(envelope, started)
        self._active[envelope.queueId] = (d, destinations)
        d.addErrback(self._attemptBroke, envelope)
        d.addBoth(self._finished, envelope.queueId)

    def _attemptBroke(self, failure, envelope: Envelope) -> None:
        """A bug, not a delivery outcome: log it and try again later, never drop the message."""
        log.failure("delivery attempt of {queueId} failed unexpectedly", failure, queueId=envelope.queueId)
        maillog.queueWarning(envelope.queueId, f"delivery attempt failed unexpectedly: {failure.getErrorMessage()}")
        if self.envelopes.get(envelope.queueId) is envelope:
            envelope.nextAttempt = self.clock.seconds() + self.settings.queue.retry.min
            self._push(envelope)

    @defer.inlineCallbacks
    def _attempt(self, envelope: Envelope, started: float):
        delivery = self.settings.delivery
        pending = envelope.pending()
        groups = route.groupByDestination([r.address for r in pending], delivery)
        byAddress: dict[str, list[Recipient]] = {}
        for r in pending:
            byAddress.setdefault(r.address, []).append(r)
        failed: list[tuple[Recipient, bounce.RecipientStatus]] = []
        for hops, addresses in groups.items():
            result: AttemptResult = yield self.deliver(
                hops, envelope.sender, envelope.mailParams, addresses,
                lambda: self.spool.openBody(envelope.queueId), envelope.size,
            )
            failed += self._record(envelope, byAddress, result, started)
        envelope.attempts += 1
        yield self._conclude(envelope, failed)

    @defer.inlineCallbacks
    def _conclude(self, envelope: Envelope, failed: list):
        """
        After an attempt: return the failures to the sender, expire the
        message at the end of its lifetime, warn about the delay, then
        remove it or schedule the next attempt.
        """
        queueId = envelope.queueId
        if self.envelopes.get(queueId) is not envelope:
            return  # removed by the admin while it was being delivered
        queue = self.settings.queue
        now = self.clock.seconds()
        expiring = bool(envelope.pending()) and now >= envelope.arrival + queue.lifetime
        if expiring:
            for r in envelope.pending():
                r.state = FAILED
                failed.append((r, bounce.statusFor(
                    r, bounce.FAILED_ACTION, bounce.EXPIRED_STATUS,
                    r.reply or "delivery time expired")))
        noticeFailed = False
        if failed:
            queued = yield self._notify(envelope, NOTICE_BOUNCE, [s for _, s in failed])
            if not queued:
                # Nothing is marked done before its notice is safe on disk.
                for r, _ in failed:
                    r.state = PENDING
                expiring = False
                noticeFailed = True
        elif (queue.delayWarning is not None and not envelope.warned and envelope.pending()
              and now - envelope.arrival >= queue.delayWarning):
            queued = yield self._notify(envelope, NOTICE_DELAY, [
                bounce.statusFor(r, bounce.DELAYED_ACTION) for r in envelope.pending()])
            envelope.warned = queued
        if self.envelopes.get(queueId) is not envelope:
            return
        if expiring:
            maillog.expired(queueId, envelope.sender)
        if envelope.isFinished():
            self.spool.remove(queueId)
            self.envelopes.pop(queueId, None)
            maillog.removed(queueId)
            return
        now = self.clock.seconds()
        envelope.nextAttempt = nextAttemptTime(
            now, envelope.arrival, envelope.attempts, queue.retry,
            0.0 if noticeFailed else queue.lifetime, self.random())
        self.spool.update(envelope)
        self._push(envelope)

    def _record(self, envelope: Envelope, byAddress, result: AttemptResult,
                started: float) -> list[tuple[Recipient, bounce.RecipientStatus]]:
        """Apply one courier result; the recipients that failed permanently, for the bounce."""
        now = self.clock.seconds()
        delays = (
            max(0.0, started - envelope.arrival),  # a: before this attempt (queue)
            0.0,  # b: in the scheduler before the courier took it
            result.connectSeconds,  # c: connection setup
            result.transmitSeconds,  # d: transmission
        )
        failed = []
        for outcome in result.results:
            for recipient in byAddress.get(outcome.address, ()):
                recipient.dsn = outcome.dsn
                recipient.reply = outcome.text
                recipient.lastAttempt = now
                recipient.relay = result.relay
                if outcome.status == SENT:
                    recipient.state = RECIPIENT_SENT
                elif outcome.status == BOUNCED:
                    recipient.state = FAILED
                    failed.append((recipient, bounce.statusFor(recipient, bounce.FAILED_ACTION)))
                else:
                    recipient.state = PENDING
                    envelope.lastError = outcome.text
            envelope.recordHistory({
                "time": now, "recipient": outcome.address, "relay": result.relay,
                "dsn": outcome.dsn, "status": outcome.status, "reply": outcome.text,
            })
            maillog.delivery(envelope.queueId, outcome.address, result.relay,
                             now - envelope.arrival, delays, outcome.dsn,
                             outcome.status, outcome.text)
        return failed

    def _finished(self, _: object, queueId: str) -> None:
        _, destinations = self._active.pop(queueId, (None, ()))
        limit = self.settings.delivery.destinationConcurrency
        for destination in destinations:
            count = self._perDestination.get(destination, 1) - 1
            if count > 0:
                self._perDestination[destination] = count
            else:
                self._perDestination.pop(destination, None)
            line = self._blocked.get(destination)
            free = limit - max(count, 0)
            while line and free > 0:
                waiting = line.popleft()
                self._waiting.discard(waiting)
                envelope = self.envelopes.get(waiting)
                if envelope is not None:
                    self._push(envelope)
                    free -= 1
            if line is not None and not line:
                del self._blocked[destination]
        self._wake()

    # Notices

    @defer.inlineCallbacks
    def _notify(self, envelope: Envelope, kind: str, statuses: Sequence[bounce.RecipientStatus]):
        """
        Queue the notice about ``envelope``: to its sender, or for mail from
        <> a double bounce to the postmaster. True once it is committed (or
        when none is due), False if it could not be written.
        """
        queueId = envelope.queueId
        to = envelope.sender
        if not to:
            if kind == NOTICE_DELAY:
                return True  # nobody to warn; and never a notice about a notice's delay
            postmaster = getattr(self.settings, "postmaster", None)
            if envelope.notice in (NOTICE_DOUBLE_BOUNCE, NOTICE_QUARANTINE):
                maillog.noticeDiscarded(queueId, "a notice to the postmaster is never returned")
                return True
            if not postmaster:
                maillog.noticeDiscarded(
                    queueId, "mail from <> is never returned and no postmaster address is configured")
                return True
            to, kind = postmaster, NOTICE_DOUBLE_BOUNCE
        try:
            notice = yield self.runInThread(
                self._writeNotice, envelope, kind, to, list(statuses), self.clock.seconds())
        except Exception as e:
            reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
            maillog.noticeFailed(queueId, reason)
            return False
        maillog.noticeQueued(queueId, kind, notice.queueId)
        self.add(notice)
        return True

    def _writeNotice(self, envelope: Envelope, kind: str, to: str, statuses, now: float) -> Envelope:
        """Blocking, in a thread: read the original, build the report, commit it."""
        queue = self.settings.queue
        original, whole = bounce.readOriginal(
            lambda: self.spool.openBody(envelope.queueId), queue.bounceSizeLimit)
        content = bounce.report(
            kind, hostname=self.settings.hostname, envelope=envelope, to=to, statuses=statuses,
            original=original, originalWhole=whole, now=now, lifetime=queue.lifetime)
        return bounce.writeNotice(self.spool, kind, to, self.settings.hostname, content, now)

    def reportQuarantine(self, entries: Sequence[tuple[str, str]]) -> defer.Deferred:
        """Tell the postmaster (if one is configured) which entries recovery quarantined."""
        postmaster = getattr(self.settings, "postmaster", None)
        if not entries or not postmaster:
            return defer.succeed(None)
        now = self.clock.seconds()

        def write() -> Envelope:
            content = bounce.quarantineReport(
                hostname=self.settings.hostname, to=postmaster, entries=entries,
                directory=self.settings.queue.directory, now=now)
            return bounce.writeNotice(self.spool, NOTICE_QUARANTINE, postmaster,
                                      self.settings.hostname, content, now)

        def queued(notice: Envelope) -> None:
            maillog.noticeQueued(None, NOTICE_QUARANTINE, notice.queueId)
            self.add(notice)

        def failed(failure) -> None:
            maillog.noticeFailed(None, f"quarantine report: {failure.getErrorMessage()}")

        return self.runInThread(write).addCallbacks(queued, failed)

    # Admin requests (relayd.control). Each returns what was done, raises
    # UnknownMessage or AdminRefusal, and logs one line when it changes something.

    def _known(self, queueId: str) -> Envelope:
        envelope = self.envelopes.get(queueId)
        if envelope is None:
            raise UnknownMessage(queueId)
        return envelope

    def isActive(self, queueId: str) -> bool:
        return queueId in self._active

    def activeIds(self) -> list[str]:
        return sorted(self._active)

    def hold(self, queueId: str) -> str:
        envelope = self._known(queueId)
        if envelope.hold:
            return "already on hold"
        envelope.hold = True
        self.spool.update(envelope)
        maillog.adminAction(queueId, "placed on hold")
        return "placed on hold" + (" (after the attempt in progress)" if self.isActive(queueId) else "")

    def release(self, queueId: str) -> str:
        envelope = self._known(queueId)
        if not envelope.hold:
            return "not on hold"
        envelope.hold = False
        if not self.isActive(queueId):
            envelope.nextAttempt = self.clock.seconds()
        self.spool.update(envelope)
        maillog.adminAction(queueId, "released from hold")
        if not self.isActive(queueId):
            self._push(envelope)
            self._wake()
        return "released from hold"

    def delete(self, queueId: str) -> str:
        self._known(queueId)
        active = self.isActive(queueId)
        self.envelopes.pop(queueId)
        self._waiting.discard(queueId)
        self.spool.remove(queueId)
        maillog.adminAction(queueId, "removed")
        return "removed" + (" (an attempt in progress may still deliver it)" if active else "")

    def flush(self, queueIds: Sequence[str] | None = None) -> dict[str, str]:
        """Try now: the named messages, or every message not on hold."""
        ids = list(self.envelopes) if queueIds is None else list(queueIds)
        outcomes = {}
        now = self.clock.seconds()
        for queueId in ids:
            envelope = self._known(queueId) if queueIds is not None else self.envelopes[queueId]
            if envelope.hold:
                outcomes[queueId] = "on hold (release it first)"
            elif self.isActive(queueId) or queueId in self._waiting:
                outcomes[queueId] = "being delivered now"
            else:
                envelope.nextAttempt = now
                self._push(envelope)
                maillog.adminAction(queueId, "flushed")
                outcomes[queueId] = "scheduled for delivery now"
        self._wake()
        return outcomes

    def requeue(self, queueIds: Sequence[str] | None = None) -> dict[str, str]:
        """Start over: forget the backoff and the hold, try now."""
        ids = list(self.envelopes) if queueIds is None else list(queueIds)
        outcomes = {}
        now = self.clock.seconds()
        for queueId in ids:
            envelope = self._known(queueId) if queueIds is not None else self.envelopes[queueId]
            if self.isActive(queueId):
                outcomes[queueId] = "being delivered now"
                continue
            envelope.attempts = 0
            envelope.hold = False
            envelope.lastError = None
            envelope.nextAttempt = now
            self.spool.update(envelope)
            if queueId not in self._waiting:
                self._push(envelope)
            maillog.adminAction(queueId, "requeued")
            outcomes[queueId] = "requeued"
        self._wake()
        return outcomes

    def bounce(self, queueId: str) -> str:
        """Give up on the pending recipients: return the message to its sender now."""
        envelope = self._known(queueId)
        if self.isActive(queueId):
            raise AdminRefusal("it is being delivered now; try again when the attempt ends")
        if not envelope.pending():
            raise AdminRefusal("it has no pending recipients")
        self._waiting.discard(queueId)
        maillog.adminAction(queueId, "returned to sender")
        self._start(envelope, (), self._cancel)
        return "returned to sender"

    @defer.inlineCallbacks
    def _cancel(self, envelope: Envelope, started: float):
        failed = []
        for r in envelope.pending():
            r.state = FAILED
            r.dsn = bounce.ADMIN_BOUNCE_STATUS
            r.reply = bounce.ADMIN_BOUNCE_TEXT
            failed.append((r, bounce.statusFor(r, bounce.FAILED_ACTION)))
        yield self._conclude(envelope, failed)

    # Service

    def startService(self) -> None:
        super().startService()
        self._wake()

    def stopService(self, grace: float | None = None) -> defer.Deferred:
        """Start nothing new; wait for the attempts in flight, at most ``grace`` seconds."""
        super().stopService()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if not self._active:
            return defer.succeed(None)
        inFlight = defer.DeferredList([d for d, _ in self._active.values()], consumeErrors=True)
        if grace is None:
            grace = self.settings.shutdownGrace
        done = defer.Deferred()
        timer = self.clock.callLater(grace, lambda: done.called or done.callback(None))
        inFlight.addBoth(lambda _: (timer.active() and timer.cancel(), done.called or done.callback(None)))
        return done

    def queueLength(self) -> int:
        return len(self.envelopes)


def hopsFor(delivery) -> Sequence:
    return delivery.smarthosts
