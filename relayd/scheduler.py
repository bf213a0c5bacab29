"""
The scheduler: decides when each queued message is tried and records what
happened.

A heap keyed by next attempt time holds every message the daemon knows;
one IDelayedCall is armed for the earliest, so each event costs O(log n)
and the spool is read only once, at start-up. The retry delay is a pure
function. Attempts run through the courier, at most ``concurrency`` at a
time; after each, the envelope's per-recipient state is written back with
an atomic rename (no fsync: a crash repeats a delivery, never loses one).
"""

from __future__ import annotations

import heapq
import random as _random
from collections.abc import Callable, Sequence

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from relayd import maillog, route
from relayd.courier import BOUNCED, DEFERRED, SENT, AttemptResult
from relayd.envelope import FAILED, PENDING, SENT as RECIPIENT_SENT, Envelope

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


class Scheduler(service.Service):
    """
    ``deliver(hops, sender, mailParams, recipients, openBody, size)`` is the
    courier's; ``settings`` is anything with ``.queue.retry.min/max`` and
    ``.delivery`` (smarthosts, concurrency): the loaded config, replaced on
    reload with ``reconfigure``.
    """

    name = "scheduler"

    def __init__(self, spool, deliver: Callable[..., defer.Deferred], settings, clock,
                 random: Callable[[], float] = _random.random):
        self.spool = spool
        self.deliver = deliver
        self.settings = settings
        self.clock = clock
        self.random = random
        self.envelopes: dict[str, Envelope] = {}
        self._heap: list[tuple[float, int, str]] = []
        self._sequence = 0
        self._timer = None
        self._active: dict[str, defer.Deferred] = {}

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
            if envelope is None or envelope.nextAttempt != due or queueId in self._active:
                heapq.heappop(self._heap)  # stale entry: removed or rescheduled
                continue
            if due > now:
                break
            heapq.heappop(self._heap)
            if envelope.hold:
                continue
            self._start(envelope)
        if self._heap and len(self._active) < limit:
            self._timer = self.clock.callLater(max(0.0, self._heap[0][0] - now), self._wake)

    # One attempt

    def _start(self, envelope: Envelope) -> None:
        started = self.clock.seconds()
        d = self._attempt(envelope, started)
        self._active[envelope.queueId] = d
        d.addErrback(self._attemptBroke, envelope)
        d.addBoth(self._finished, envelope.queueId)

    def _attemptBroke(self, failure, envelope: Envelope) -> None:
        """A bug, not a delivery outcome: log it and try again later, never drop the message."""
        log.failure("delivery attempt of {queueId} failed unexpectedly", failure, queueId=envelope.queueId)
        maillog.queueWarning(envelope.queueId, f"delivery attempt failed unexpectedly: {failure.getErrorMessage()}")
        if envelope.queueId in self.envelopes:
            envelope.nextAttempt = self.clock.seconds() + self.settings.queue.retry.min
            self._push(envelope)

    @defer.inlineCallbacks
    def _attempt(self, envelope: Envelope, started: float):
        delivery = self.settings.delivery
        pending = envelope.pending()
        groups = route.groupByDestination([r.address for r in pending], delivery)
        byAddress = {r.address: r for r in pending}
        for hops, addresses in groups.items():
            result: AttemptResult = yield self.deliver(
                hops, envelope.sender, envelope.mailParams, addresses,
                lambda: self.spool.openBody(envelope.queueId), envelope.size,
            )
            self._record(envelope, byAddress, result, started)
        envelope.attempts += 1
        if envelope.isFinished():
            self.spool.remove(envelope.queueId)
            self.envelopes.pop(envelope.queueId, None)
            maillog.removed(envelope.queueId)
            return
        retry = self.settings.queue.retry
        envelope.nextAttempt = self.clock.seconds() + retryDelay(
            envelope.attempts, retry.min, retry.max, self.random())
        self.spool.update(envelope)
        self._push(envelope)

    def _record(self, envelope: Envelope, byAddress, result: AttemptResult, started: float) -> None:
        now = self.clock.seconds()
        delays = (
            max(0.0, started - envelope.arrival),  # a: before this attempt (queue)
            0.0,  # b: in the scheduler before the courier took it
            result.connectSeconds,  # c: connection setup
            result.transmitSeconds,  # d: transmission
        )
        for outcome in result.results:
            recipient = byAddress[outcome.address]
            recipient.dsn = outcome.dsn
            recipient.reply = outcome.text
            recipient.lastAttempt = now
            if outcome.status == SENT:
                recipient.state = RECIPIENT_SENT
            elif outcome.status == BOUNCED:
                # Bounce messages come with the queue issue; the failure is
                # recorded and logged, and the recipient leaves the queue.
                recipient.state = FAILED
            else:
                recipient.state = PENDING
                envelope.lastError = outcome.text
            maillog.delivery(envelope.queueId, outcome.address, result.relay,
                             now - envelope.arrival, delays, outcome.dsn,
                             outcome.status, outcome.text)

    def _finished(self, _: object, queueId: str) -> None:
        self._active.pop(queueId, None)
        self._wake()

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
        inFlight = defer.DeferredList(list(self._active.values()), consumeErrors=True)
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
