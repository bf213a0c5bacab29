"""
The scheduler: decides when each queued message is tried, records what
happened, and returns to the sender what cannot be delivered.

A heap keyed by next attempt time holds every message the daemon knows;
one IDelayedCall is armed for the earliest, so each event costs O(log n)
and the spool is read only once, at start-up. The retry delay is a pure
function. Attempts run through the courier, at most ``delivery.concurrency``
at a time and at most ``delivery.destination_concurrency`` per destination
(a ``Destination`` from route.groupByDestination); a message whose
destination is full waits in that destination's line, not in the heap.
The scheduler writes the log: each recipient's result, the TLS sessions
an attempt opened, and a transport's local errors.

After each attempt the envelope's per-recipient state is written back with
an atomic rename (no fsync: a crash repeats a delivery, never loses one).
Every write of a message's envelope and its removal, the admin's included,
runs in the spool's threads through the message's lane (relayd.queue's
``MessageLanes``): in the order they were asked for, the envelope encoded
on the reactor thread at that moment.
Recipients that failed permanently in the attempt, or that are still
pending when ``queue.lifetime`` has run out, get one notice (relayd.bounce)
which is committed to the spool, fsynced, *before* they are marked done: a
crash in between sends the notice twice at worst, never not at all.

A delivered message's attempt gives back its slot (and its connection
goes on to the next message) before its queue file's removal has run;
attempts in flight plus such removals stay within twice
``delivery.concurrency``, the deliveries a crash can repeat.

With intake workers (relayd.worker) there are two kinds of scheduler. A
worker's makes only the first attempt of the messages that worker
committed, from memory, in slots the master's scheduler granted
(``takeSlots``/``freeSlots``), so ``delivery.concurrency`` and
``destination_concurrency`` stay limits over every process. Whatever
needs a later step (a retry, a notice to send, a removal that failed) it
writes to the spool and hands to the master (``handOff``), and forgets.
The master's is the one described above, for everything else.
"""

from __future__ import annotations

import heapq
import io
import random as _random
from collections import deque
from collections.abc import Callable, Iterable, Sequence

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from relayd import bounce, dsn, maillog, route
from relayd.dkim import withSignature
from relayd.queue import MessageLanes, ThreadBatches, encodeEnvelope
from relayd.delivery import AttemptResult, Destination, Transport
from relayd.envelope import (
    NOTICE_BOUNCE,
    NOTICE_DELAY,
    NOTICE_DOUBLE_BOUNCE,
    NOTICE_QUARANTINE,
    NOTICE_RELAYED,
    Envelope,
    Recipient,
    Status,
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


# What flush and requeue answer per message; relayd.control counts the
# successes by these, relayctl prints them.
FLUSHED = "scheduled for delivery now"
REQUEUED = "requeued"
ON_HOLD = "on hold (release it first)"
BEING_DELIVERED = "being delivered now"
BEING_REMOVED = "delivered, being removed from the queue"
WAITING_FOR_SLOT = "waiting for a free slot at its destination"


# Thread jobs removing delivered messages at once (queue.ThreadBatches):
# the message files' (each unlink waits for the disk, and parallel ones
# overlap their waits), and the bodies' of messages in the older two-file
# layout (off the delivery's path).
REMOVAL_JOBS = 4
BODY_REMOVAL_JOBS = 2


# Bodies of new messages kept in memory for their first attempt, in all
# (bytes): a burst of mail beyond it is read back from the spool instead.
KEPT_BODIES_LIMIT = 16 * 1024 * 1024


class InMemoryBody:
    """A body opener for a body held in memory: opening it needs no thread."""

    inMemory = True

    def __init__(self, body: bytes) -> None:
        self.body = body

    def __call__(self) -> io.BytesIO:
        return io.BytesIO(self.body)


class UnknownMessage(KeyError):
    """No message with this queue id is in the queue."""


class AdminRefusal(Exception):
    """An admin request that cannot be done now; the text says why."""


class Scheduler(service.Service):
    """
    ``transport`` delivers (relayd.delivery's ``Transport``: the courier);
    ``settings`` is the loaded config (``hostname``,
    ``postmaster``, ``queue``, ``delivery``), replaced on reload with
    ``reconfigure``. ``runInThread(f, *args)`` runs blocking spool work
    (writing a notice) off the reactor thread and returns a Deferred; tests
    run it inline. ``lanes`` runs a message's envelope writes and removal
    in those threads, in order (by default over ``runInThread``).
    ``signer`` (relayd.dkim.Signer) signs a message before its first
    delivery attempt; None: nothing is signed.

    The admin requests that write (hold, release, delete, requeue) return
    Deferreds; the others answer at once.
    """

    name = "scheduler"

    def __init__(self, spool, transport: Transport, settings, clock,
                 random: Callable[[], float] = _random.random,
                 runInThread: Callable[..., defer.Deferred] | None = None,
                 lanes: MessageLanes | None = None, signer=None, handOff=None):
        self.spool = spool
        # In an intake worker: where a message goes after its first attempt
        # (``ended(queueId, kept)``) and the notices it queued
        # (``notice(envelope)``); None: this scheduler keeps everything.
        self.handOff = handOff
        self.signer = signer
        self.transport = transport
        self.settings = settings
        self.clock = clock
        self.random = random
        self.runInThread = runInThread or defer.maybeDeferred
        self.lanes = lanes or MessageLanes(self.runInThread)
        # Removals of delivered messages, many to a thread job under load:
        # the message file (or an older message's envelope: the message
        # leaves the queue) after the attempt gave back its slot (_letGo);
        # an older message's body afterwards.
        self._removals = ThreadBatches(self.runInThread, jobs=REMOVAL_JOBS)
        self._bodyRemovals = ThreadBatches(self.runInThread, jobs=BODY_REMOVAL_JOBS)
        self.envelopes: dict[str, Envelope] = {}
        self._heap: list[tuple[float, int, str]] = []
        self._sequence = 0
        self._timer = None
        self._waking = False
        self._wakeAgain = False
        # queue id -> (attempt Deferred, destinations it occupies)
        self._active: dict[str, tuple[defer.Deferred, tuple[Destination, ...]]] = {}
        # queue id -> attempt Deferred, for the delivered messages whose
        # removal is under way (_letGo): out of their slots, not
        # yet out of the queue.
        self._removing: dict[str, defer.Deferred] = {}
        self._perDestination: dict[Destination, int] = {}
        # Attempts other processes make in slots taken here (takeSlots).
        self._remote = 0
        # Due messages waiting for a slot at a full destination, in order.
        self._blocked: dict[Destination, deque[str]] = {}
        self._waiting: set[str] = set()
        # queue id -> body, for the first attempt (keepBody), KEPT_BODIES_LIMIT in all.
        self._keptBodies: dict[str, bytes] = {}
        self._keptBytes = 0

    # Feeding the schedule

    def add(self, envelope: Envelope) -> None:
        """A message is committed (new, or recovered at start-up): schedule it."""
        self.envelopes[envelope.queueId] = envelope
        self._push(envelope)
        self._wake()

    def keepBody(self, queueId: str, body: bytes) -> None:
        """A new message's body, just committed: its first attempt sends it from memory."""
        if self._keptBytes + len(body) <= KEPT_BODIES_LIMIT:
            self._keptBodies[queueId] = body
            self._keptBytes += len(body)

    def forgetBody(self, queueId: str) -> None:
        """A kept body whose message this scheduler will not attempt after all."""
        self._takeBody(queueId)

    def _takeBody(self, queueId: str) -> bytes | None:
        body = self._keptBodies.pop(queueId, None)
        if body is not None:
            self._keptBytes -= len(body)
        return body

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
        while self._heap and self._mayStart():
            due, _, queueId = self._heap[0]
            envelope = self.envelopes.get(queueId)
            if (envelope is None or envelope.nextAttempt != due or queueId in self._active
                    or queueId in self._waiting or queueId in self._removing):
                heapq.heappop(self._heap)  # stale entry: removed, rescheduled or waiting
                continue
            if due > now:
                break
            heapq.heappop(self._heap)
            if envelope.hold:
                continue
            groups = route.groupByDestination([r.address for r in envelope.pending()],
                                              self.settings.delivery)
            full = self._fullDestination(groups)
            if full is not None:
                self._waiting.add(queueId)
                self._blocked.setdefault(full, deque()).append(queueId)
                continue
            self._start(envelope, groups, self._attempt)
        if self._heap and self._mayStart():
            self._timer = self.clock.callLater(max(0.0, self._heap[0][0] - now), self._wake)

    def _mayStart(self) -> bool:
        """
        Whether a slot is free for one more attempt: at most
        ``delivery.concurrency`` in flight, and, with the delivered messages
        whose removal is still under way, at most twice that. A
        crash repeats a delivery only for those two kinds of message.
        """
        limit = self.settings.delivery.concurrency
        inFlight = len(self._active) + self._remote
        return inFlight < limit and inFlight + len(self._removing) < limit * 2

    def _fullDestination(self, destinations: Iterable[Destination]) -> Destination | None:
        limit = self.settings.delivery.destinationConcurrency
        for destination in destinations:
            if self._perDestination.get(destination, 0) >= limit:
                return destination
        return None

    def takeSlots(self, domains: Sequence[str]) -> tuple[Destination, ...] | None:
        """
        Slots for an attempt an intake worker makes itself (to recipients at
        ``domains``, as route.recipientDomain gives them),
        counted with this scheduler's own: the destinations taken, or None
        when the daemon's concurrency or a destination's is used up (the
        caller then hands the message over).
        """
        if not self.running:
            return None
        delivery = self.settings.delivery
        groups = dict.fromkeys(route.destinationOf(domain, delivery) for domain in domains)
        if not self._mayStart() or self._fullDestination(groups) is not None:
            return None
        for destination in groups:
            self._perDestination[destination] = self._perDestination.get(destination, 0) + 1
        self._remote += 1
        return tuple(groups)

    def freeSlots(self, destinations: Sequence[Destination]) -> None:
        """The attempt ``takeSlots`` counted has ended."""
        self._remote = max(0, self._remote - 1)
        self._freeDestinations(destinations)
        self._wake()

    # One attempt

    def _start(self, envelope: Envelope, groups: dict[Destination, list[str]], work) -> None:
        """``groups``: the pending recipients by destination (route.groupByDestination)."""
        started = self.clock.seconds()
        destinations = tuple(groups)
        for destination in destinations:
            self._perDestination[destination] = self._perDestination.get(destination, 0) + 1
        attemptsBefore = envelope.attempts
        d = defer.Deferred.fromCoroutine(work(envelope, started, groups))
        self._active[envelope.queueId] = (d, destinations)
        d.addErrback(self._attemptBroke, envelope, attemptsBefore)
        d.addBoth(self._finished, envelope.queueId)

    def _writeEnvelope(self, envelope: Envelope) -> defer.Deferred:
        """Write the envelope as it is now, after the message's earlier spool calls."""
        return self.lanes.run(envelope.queueId, self.spool.writeEnvelope, envelope.queueId,
                              encodeEnvelope(envelope))

    def _attemptBroke(self, failure, envelope: Envelope, attemptsBefore: int) -> None:
        """
        A bug, not a delivery outcome: log it and try again after the usual
        backoff, never drop the message. Once its lifetime has run out it is
        put on hold for an admin: returning it to the sender would blame the
        mail for our broken code.
        """
        queueId = envelope.queueId
        log.failure("delivery attempt of {queueId} failed unexpectedly", failure, queueId=queueId)
        maillog.queueWarning(queueId, f"delivery attempt failed unexpectedly: {failure.getErrorMessage()}")
        if self.envelopes.get(queueId) is not envelope:
            return
        # Counted like any attempt (once: it may have broken after counting
        # itself), so the backoff grows and the lifetime is checked.
        envelope.attempts = max(envelope.attempts, attemptsBefore + 1)
        queue = self.settings.queue
        now = self.clock.seconds()
        if now >= envelope.arrival + queue.lifetime:
            envelope.hold = True
            maillog.queueWarning(
                queueId, "placed on hold: delivery attempts keep failing unexpectedly and "
                "queue.lifetime has run out; see the daemon log, then release, bounce or delete it")
        else:
            envelope.nextAttempt = nextAttemptTime(
                now, envelope.arrival, envelope.attempts, queue.retry, queue.lifetime, self.random())
            if self.handOff is None:
                self._push(envelope)
        if self.handOff is not None:
            self._handOver(envelope)
            return

        def failed(failure) -> None:
            # The schedule in memory stands; the spool catches up at the next write.
            e = failure.value
            maillog.queueWarning(queueId, f"cannot write the envelope: {getattr(e, 'strerror', None) or e}")

        self._writeEnvelope(envelope).addErrback(failed)

    def _handOver(self, envelope: Envelope) -> None:
        """
        An intake worker lets go of a message after its first attempt: its
        envelope written as it is now, then the master takes it (``handOff``).
        """
        queueId = envelope.queueId
        self.envelopes.pop(queueId, None)
        self._takeBody(queueId)

        def failed(failure) -> None:
            # The master reads the state before this attempt: a delivery may
            # be repeated, none is lost.
            e = failure.value
            maillog.queueFileFailed(queueId, "update", getattr(e, "strerror", None) or str(e))

        def handedOver(_) -> None:
            self.spool.forget(queueId)  # the master removes it in the end
            self.handOff.ended(queueId, True)

        d = self._writeEnvelope(envelope)
        d.addErrback(failed)
        d.addBoth(handedOver)

    async def _attempt(self, envelope: Envelope, started: float, groups: dict[Destination, list[str]]):
        pending = envelope.pending()
        byAddress: dict[str, list[Recipient]] = {}
        for r in pending:
            byAddress.setdefault(r.address, []).append(r)
        failed: list[tuple[Recipient, bounce.ReportLine]] = []
        relayed: list[bounce.ReportLine] = []
        # The DSN parameters go to the transport beside the others; it
        # passes them on only to a next hop that advertises DSN.
        mailParams = {**envelope.mailParams, **dsn.mailParameters(envelope.ret, envelope.envid)}
        recipientParams = {}
        for r in pending:
            recipientParams.setdefault(r.address, dsn.rcptParameters(r.notify, r.orcpt))
        kept = self._takeBody(envelope.queueId)
        if kept is not None:
            openBody = InMemoryBody(kept)
        else:
            def openBody():
                return self.spool.openBody(envelope.queueId)

        if envelope.dkim is None and self.signer is not None:
            # Signed once, kept in the envelope: an attempt that leaves the
            # message queued writes it with the rest (_conclude, _handOver),
            # so every retry sends the same signature, whatever keys come
            # later. Not written before the first attempt: most messages
            # leave at it, and their removal stays one unlink. A crash during
            # that attempt signs again after the restart.
            await self.signer.sign(envelope, openBody)
        openMessage = withSignature(envelope.dkim, openBody)
        size = envelope.size + len(envelope.dkim or "")
        for destination, addresses in groups.items():
            result: AttemptResult = await self.transport.deliver(
                destination, envelope.sender, mailParams, addresses, openMessage, size,
                smtputf8=envelope.smtputf8,
                recipientParams=recipientParams,
            )
            failed += self._record(envelope, byAddress, result, started, relayed, destination)
        envelope.attempts += 1
        await self._conclude(envelope, failed, relayed)

    async def _conclude(self, envelope: Envelope, failed: list, relayed: Sequence = ()):
        """
        After an attempt: return the failures to the sender, expire the
        message at the end of its lifetime, warn about the delay, tell of
        the recipients ``relayed`` without DSN, then remove it or schedule
        the next attempt. Each notice names only the recipients whose
        NOTIFY asked for it (relayd.dsn).
        """
        queueId = envelope.queueId
        if self.envelopes.get(queueId) is not envelope:
            return  # removed by the admin while it was being delivered
        queue = self.settings.queue
        now = self.clock.seconds()
        expiring = bool(envelope.pending()) and now >= envelope.arrival + queue.lifetime
        if expiring:
            for r in envelope.pending():
                r.state = Status.BOUNCED
                failed.append((r, bounce.statusFor(
                    r, status=bounce.EXPIRED_STATUS, diagnostic=r.reply or "delivery time expired")))
        noticeFailed = False
        if failed:
            wanted = [s for r, s in failed if dsn.wantsFailure(r.notify)]
            queued = (await self._notify(envelope, NOTICE_BOUNCE, wanted)) if wanted else True
            if not queued:
                # Nothing is marked done before its notice is safe on disk.
                for r, _ in failed:
                    r.state = Status.DEFERRED
                expiring = False
                noticeFailed = True
        elif (queue.delayWarning is not None and not envelope.warned and envelope.pending()
              and now - envelope.arrival >= queue.delayWarning):
            wanted = [bounce.statusFor(r) for r in envelope.pending() if dsn.wantsDelay(r.notify)]
            queued = (await self._notify(envelope, NOTICE_DELAY, wanted)) if wanted else True
            envelope.warned = queued
        if relayed:
            # The recipients are delivered whatever happens to this notice:
            # one that cannot be written is logged, not retried.
            await self._notify(envelope, NOTICE_RELAYED, relayed, retried=False)
        if self.envelopes.get(queueId) is not envelope:
            return
        if expiring:
            maillog.expired(queueId, envelope.sender)
        now = self.clock.seconds()
        if envelope.isFinished():
            self._letGo(queueId)
            try:
                # Unlinking waits for the file system journal: in a thread,
                # after the envelope writes still under way.
                bodyLeft = await self.lanes.runStep(
                    queueId, lambda: self._removals.run(self.spool.removeEnvelope, queueId))
            except OSError as e:
                # Still queued on disk: kept in memory too, and the removal is
                # tried again at the next attempt (which finds nobody to send to).
                maillog.queueFileFailed(queueId, "remove", e.strerror or str(e))
                if self.envelopes.get(queueId) is not envelope:
                    return  # deleted by the admin meanwhile
                if self.handOff is not None:
                    self._handOver(envelope)  # the master tries the removal again
                    return
                envelope.nextAttempt = nextAttemptTime(
                    now, envelope.arrival, envelope.attempts, queue.retry, queue.lifetime,
                    self.random())
                self._push(envelope)
                return
            self.envelopes.pop(queueId, None)
            maillog.removed(queueId)
            if self.handOff is not None:
                self.handOff.ended(queueId, False)
            if bodyLeft:  # a message in the older two-file layout
                self._bodyRemovals.run(self.spool.removeBody, queueId).addErrback(
                    self._bodyNotRemoved, queueId)
            return
        envelope.nextAttempt = nextAttemptTime(
            now, envelope.arrival, envelope.attempts, queue.retry,
            0.0 if noticeFailed else queue.lifetime, self.random())
        if self.handOff is not None:
            self._handOver(envelope)
            return

        def failed(failure) -> None:
            # The disk keeps the previous state (a restart may repeat a
            # delivery, never lose one); the schedule in memory stands and the
            # spool catches up at the next write.
            e = failure.value
            maillog.queueFileFailed(queueId, "update", getattr(e, "strerror", None) or str(e))

        self._writeEnvelope(envelope).addErrback(failed)
        self._push(envelope)

    def _bodyNotRemoved(self, failure, queueId: str) -> None:
        # Out of the queue already: recovery deletes the body at the next start.
        e = failure.value
        maillog.queueWarning(queueId, "cannot remove the message body: "
                             f"{getattr(e, 'strerror', None) or e}; removed at the next start")

    def _record(self, envelope: Envelope, byAddress, result: AttemptResult,
                started: float, relayed: list, destination: Destination | None = None,
                ) -> list[tuple[Recipient, bounce.ReportLine]]:
        """
        Apply one transport's result; the recipients that failed permanently,
        for the bounce. Adds to ``relayed`` the recipients delivered to a
        next hop without DSN that asked for NOTIFY=SUCCESS.
        """
        queueId = envelope.queueId
        for failure in result.localErrors:
            log.failure("delivery attempt of {queueId} failed locally", failure, queueId=queueId)
        for relay, tls in result.tlsSessions:
            maillog.tlsConnection(relay, tls.trust, tls.protocol, tls.cipher, tls.bits)
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
                recipient.state = outcome.status
                if outcome.status is Status.BOUNCED:
                    failed.append((recipient, bounce.statusFor(recipient)))
                elif (outcome.status is Status.SENT and not outcome.notifyPassedOn
                      and dsn.wantsSuccess(recipient.notify)):
                    relayed.append(bounce.statusFor(
                        recipient, action=bounce.RELAYED_ACTION, diagnostic=outcome.text))
                elif outcome.status is Status.DEFERRED:
                    envelope.lastError = outcome.text
            envelope.recordHistory({
                "time": now, "recipient": outcome.address, "relay": result.relay,
                "dsn": outcome.dsn, "status": outcome.status.value, "reply": outcome.text,
            })
            maillog.delivery(queueId, outcome.address, result.relay,
                             now - envelope.arrival, delays, outcome.dsn,
                             outcome.status.value, outcome.text,
                             route=destination.name if destination is not None else None)
        return failed

    def _letGo(self, queueId: str) -> None:
        """
        The message is delivered (or returned) and only its removal from
        the spool is left: the attempt gives back its slots now, so the
        connection it used carries the next message while the unlink waits
        for the disk. The message stays in the queue (and is reported as
        being removed) until the removal has run; ``_mayStart`` bounds how
        many wait so. An intake worker's first attempt keeps its slots:
        the master hears it has ended only once the message is gone.
        """
        if self.handOff is not None:
            return
        entry = self._active.pop(queueId, None)
        if entry is None:
            return
        attempt, destinations = entry
        self._removing[queueId] = attempt
        self._freeDestinations(destinations)
        self._wake()

    def _finished(self, _: object, queueId: str) -> None:
        if self._removing.pop(queueId, None) is not None:
            self._wake()  # a start may have waited for the removals to catch up
            return
        _, destinations = self._active.pop(queueId, (None, ()))
        self._freeDestinations(destinations)
        self._wake()

    def _freeDestinations(self, destinations) -> None:
        """Give back a slot at each of ``destinations``: the next waiting message moves up."""
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
                if waiting not in self._waiting:
                    continue  # left the line already (returned to sender, or a stale copy)
                self._waiting.discard(waiting)
                envelope = self.envelopes.get(waiting)
                if envelope is None or envelope.hold:
                    # Deleted or held: it drops out of the line without
                    # taking the slot (release pushes a held one back).
                    continue
                self._push(envelope)
                free -= 1
            if line is not None and not line:
                del self._blocked[destination]

    # Notices

    @defer.inlineCallbacks
    def _notify(self, envelope: Envelope, kind: str, statuses: Sequence[bounce.ReportLine],
                retried: bool = True):
        """
        Queue the notice about ``envelope``: to its sender, or for mail from
        <> a double bounce to the postmaster. True once it is committed (or
        when none is due), False if it could not be written (logged as to
        be retried when ``retried``).
        """
        queueId = envelope.queueId
        to = envelope.sender
        if not to:
            if kind in (NOTICE_DELAY, NOTICE_RELAYED):
                return True  # nobody to tell; and never a notice about a notice's delay
            postmaster = self.settings.postmaster
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
            reason = (e.strerror if isinstance(e, OSError) else None) or str(e) or type(e).__name__
            maillog.noticeFailed(queueId, reason, retried)
            return False
        maillog.noticeQueued(queueId, kind, notice.queueId)
        if self.handOff is not None:
            self.handOff.notice(notice)  # sent by the master
        else:
            self.add(notice)
        return True

    def _writeNotice(self, envelope: Envelope, kind: str, to: str, statuses, now: float) -> Envelope:
        """Blocking, in a thread: read the original, build the report, commit it."""
        queue = self.settings.queue
        # RET=HDRS asks failures to return the header only; a success
        # notice returns it only (RFC 3461 section 4.3).
        headersOnly = kind == NOTICE_RELAYED or (
            kind in (NOTICE_BOUNCE, NOTICE_DOUBLE_BOUNCE) and envelope.ret == dsn.RET_HDRS)
        original, whole = bounce.readOriginal(
            lambda: self.spool.openBody(envelope.queueId), queue.bounceSizeLimit,
            headersOnly=headersOnly)
        content = bounce.report(
            kind, hostname=self.settings.hostname, envelope=envelope, to=to, statuses=statuses,
            original=original, originalWhole=whole, now=now, lifetime=queue.lifetime)
        return bounce.writeNotice(self.spool, kind, to, self.settings.hostname, content, now)

    def reportQuarantine(self, entries: Sequence[tuple[str, str]]) -> defer.Deferred:
        """Tell the postmaster (if one is configured) which entries recovery quarantined."""
        postmaster = self.settings.postmaster
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
        """Being delivered, or delivered and being removed: the active queue."""
        return sorted([*self._active, *self._removing])

    def _refuseRemoving(self, queueId: str) -> None:
        """A delivered message on its way out of the queue is left alone."""
        if queueId in self._removing:
            raise AdminRefusal(BEING_REMOVED)

    def hold(self, queueId: str) -> defer.Deferred:
        envelope = self._known(queueId)
        self._refuseRemoving(queueId)
        if envelope.hold:
            return defer.succeed("already on hold")
        envelope.hold = True

        def written(_) -> str:
            maillog.adminAction(queueId, "placed on hold")
            return "placed on hold" + (" (after the attempt in progress)" if self.isActive(queueId) else "")

        def failed(failure):
            envelope.hold = False  # memory stays as on disk; the caller reports the error
            return failure

        return self._writeEnvelope(envelope).addCallbacks(written, failed)

    def release(self, queueId: str) -> defer.Deferred:
        envelope = self._known(queueId)
        self._refuseRemoving(queueId)
        if not envelope.hold:
            return defer.succeed("not on hold")
        nextAttempt = envelope.nextAttempt
        envelope.hold = False
        if not self.isActive(queueId):
            envelope.nextAttempt = self.clock.seconds()

        def written(_) -> str:
            maillog.adminAction(queueId, "released from hold")
            if not self.isActive(queueId) and self.envelopes.get(queueId) is envelope:
                self._push(envelope)
                self._wake()
            return "released from hold"

        def failed(failure):
            envelope.hold, envelope.nextAttempt = True, nextAttempt  # as on disk
            return failure

        return self._writeEnvelope(envelope).addCallbacks(written, failed)

    def delete(self, queueId: str) -> defer.Deferred:
        self._known(queueId)
        self._refuseRemoving(queueId)
        active = self.isActive(queueId)
        self.envelopes.pop(queueId)
        self._waiting.discard(queueId)
        self._takeBody(queueId)

        def removed(_) -> str:
            maillog.adminAction(queueId, "removed")
            return "removed" + (" (an attempt in progress may still deliver it)" if active else "")

        return self.lanes.run(queueId, self.spool.remove, queueId).addCallback(removed)

    def _selected(self, queueIds: Sequence[str] | None) -> list[tuple[str, Envelope]]:
        """The named messages (UnknownMessage before anything changes), or the whole queue."""
        if queueIds is None:
            return list(self.envelopes.items())
        return [(queueId, self._known(queueId)) for queueId in queueIds]

    def flush(self, queueIds: Sequence[str] | None = None) -> dict[str, str]:
        """Try now: the named messages, or every message not on hold."""
        outcomes = {}
        now = self.clock.seconds()
        for queueId, envelope in self._selected(queueIds):
            if queueId in self._removing:
                outcomes[queueId] = BEING_REMOVED
            elif envelope.hold:
                outcomes[queueId] = ON_HOLD
            elif self.isActive(queueId):
                outcomes[queueId] = BEING_DELIVERED
            elif queueId in self._waiting:
                outcomes[queueId] = WAITING_FOR_SLOT
            else:
                envelope.nextAttempt = now
                self._push(envelope)
                maillog.adminAction(queueId, "flushed")
                outcomes[queueId] = FLUSHED
        self._wake()
        return outcomes

    def requeue(self, queueIds: Sequence[str] | None = None) -> defer.Deferred:
        """
        Start over: forget the backoff and the hold, try now. Fires with the
        outcome per message; a message whose envelope cannot be written is
        left as it was and answered with the OSError (not raised: the rest
        of the batch still gets done).
        """
        outcomes: dict[str, str | OSError] = {}
        writes = []
        now = self.clock.seconds()
        for queueId, envelope in self._selected(queueIds):
            if queueId in self._removing:
                outcomes[queueId] = BEING_REMOVED
                continue
            if self.isActive(queueId):
                outcomes[queueId] = BEING_DELIVERED
                continue
            before = (envelope.attempts, envelope.hold, envelope.lastError, envelope.nextAttempt)
            envelope.attempts = 0
            envelope.lastError = None
            envelope.nextAttempt = now
            if envelope.hold:
                # Only the hold must reach the disk now (a restart must not
                # keep it held); the rest is written by the coming attempt,
                # which spares the whole-queue requeue a write per message.
                envelope.hold = False
                outcomes[queueId] = REQUEUED
                writes.append(self._writeEnvelope(envelope).addCallbacks(
                    self._requeued, self._notRequeued, callbackArgs=(queueId, envelope, outcomes),
                    errbackArgs=(queueId, envelope, before, outcomes)))
                continue
            self._requeued(None, queueId, envelope, outcomes, wake=False)
        self._wake()
        return defer.gatherResults(writes).addCallback(lambda _: outcomes)

    def _requeued(self, _: object, queueId: str, envelope: Envelope, outcomes: dict,
                  wake: bool = True) -> None:
        if queueId not in self._waiting and self.envelopes.get(queueId) is envelope:
            self._push(envelope)
        maillog.adminAction(queueId, "requeued")
        outcomes[queueId] = REQUEUED
        if wake:
            self._wake()

    def _notRequeued(self, failure, queueId: str, envelope: Envelope, before: tuple,
                     outcomes: dict) -> None:
        (envelope.attempts, envelope.hold, envelope.lastError, envelope.nextAttempt) = before
        if not isinstance(failure.value, OSError):
            log.failure("requeue of {queueId}", failure, queueId=queueId)
        outcomes[queueId] = failure.value

    def bounce(self, queueId: str) -> str:
        """Give up on the pending recipients: return the message to its sender now."""
        envelope = self._known(queueId)
        self._refuseRemoving(queueId)
        if self.isActive(queueId):
            raise AdminRefusal("it is being delivered now; try again when the attempt ends")
        if not envelope.pending():
            raise AdminRefusal("it has no pending recipients")
        self._waiting.discard(queueId)
        maillog.adminAction(queueId, "returned to sender")
        self._start(envelope, {}, self._cancel)
        return "returned to sender"

    def restore(self, queueId: str) -> defer.Deferred:
        """
        Put a quarantined message back into the queue (checked again, in the
        spool's threads) and schedule it. Fails with the spool's errors
        (ValueError: still broken; FileNotFoundError; FileExistsError).
        """
        if queueId in self.envelopes:
            return defer.fail(AdminRefusal("a message with this id is in the queue"))

        def restored(envelope: Envelope) -> str:
            maillog.adminAction(queueId, "restored from quarantine")
            self.add(envelope)
            return "restored from quarantine"

        return self.runInThread(self.spool.restore, queueId).addCallback(restored)

    async def _cancel(self, envelope: Envelope, started: float, groups: dict):
        self._takeBody(envelope.queueId)
        failed = []
        for r in envelope.pending():
            r.state = Status.BOUNCED
            r.dsn = bounce.ADMIN_BOUNCE_STATUS
            r.reply = bounce.ADMIN_BOUNCE_TEXT
            failed.append((r, bounce.statusFor(r)))
        await self._conclude(envelope, failed)

    # Service

    def startService(self) -> None:
        super().startService()
        self._wake()

    def stopService(self, grace: float | None = None) -> defer.Deferred:
        """
        Start nothing new; wait for the attempts in flight and the removals
        of the messages they delivered, at most ``grace`` seconds (a
        delivered message still queued when the daemon exits is delivered
        again after the restart).
        """
        super().stopService()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if not self._active and not self._removing:
            return defer.succeed(None)
        # An attempt's Deferred fires once its removal has run, too.
        inFlight = defer.DeferredList([d for d, _ in self._active.values()]
                                      + list(self._removing.values()), consumeErrors=True)
        if grace is None:
            grace = self.settings.shutdownGrace
        done = defer.Deferred()
        timer = self.clock.callLater(grace, lambda: done.called or done.callback(None))
        inFlight.addBoth(lambda _: (timer.active() and timer.cancel(), done.called or done.callback(None)))
        return done

    def queueLength(self) -> int:
        return len(self.envelopes)
