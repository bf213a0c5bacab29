"""
The admin channel, daemon side: relayctl's verbs as AMP commands on a local
UNIX socket.

Why a socket into the daemon rather than spool edits under a lock: the
daemon holds every queued message in memory (the schedule, attempts in
flight), so a change made behind its back would be undone by its next
write, or race an attempt. Through the socket the change goes through the
scheduler itself, in order with everything else, and is logged by the
daemon. Reading needs no daemon: ``relayctl list`` and ``show`` read the
spool's envelope files, which are only ever replaced by atomic renames.

Who may steer the queue is who may connect: the socket is created mode 0600
(by default in the spool directory, itself 0700), so only the daemon's user
and root get in. AMP (twisted.protocols.amp) gives typed commands with
length-prefixed values and request/response matching for free; a value is
at most 64 KiB, so relayctl sends ids in batches (MAX_IDS_PER_CALL), the
daemon refuses a request with more (``TooManyIds``), and flush/requeue of
the whole queue answer with a count (and at most MAX_IDS_PER_CALL of the
messages whose envelope could not be written, plus how many more). Every
piece of an answer is bounded so that no answer can outgrow one AMP value
(``answerBound`` states the arithmetic; a test checks it on the wire).

Beside the queue, the channel shows and lifts the AUTH failure throttle's
blocks (relayctl blocked / unblock): they live only in the daemon. And it
reloads the configuration (relayctl reload), answering only once the
reload is done, with its outcome: what systemd's ExecReload= needs.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import time

from twisted.application import service
from twisted.internet import defer, endpoints, protocol
from twisted.protocols import amp
from twisted.python.failure import Failure

import relayd
from relayd import maillog
from relayd.envelope import isQueueId
from relayd.queue import permissionFix
from relayd.scheduler import FLUSHED, REQUEUED, AdminRefusal, UnknownMessage

# Ids per AMP call. Each answers with one entry of at most ENTRY_BYTES, and
# all of them travel in one AMP value, at most AMP_VALUE_LIMIT bytes.
MAX_IDS_PER_CALL = 250
AMP_VALUE_LIMIT = amp.MAX_VALUE_LENGTH
# An echoed id that is not a queue id (a queue id is 16 bytes) and an outcome
# text are cut to these many bytes of UTF-8.
MAX_ECHOED_ID_BYTES = 40
MAX_OUTCOME_BYTES = 160
# An entry is an AMP box: per key, two 2-byte lengths, the key and the value
# ("id", "ok": "False" at most, "outcome"), then a 2-byte end mark.
ENTRY_BYTES = (4 + len(b"id") + MAX_ECHOED_ID_BYTES + 4 + len(b"ok") + len(b"False")
               + 4 + len(b"outcome") + MAX_OUTCOME_BYTES + 2)
# The ids DaemonStatus lists as being delivered (each a 2-byte length and 16
# bytes); delivery.concurrency is far below it in practice.
MAX_ACTIVE_LISTED = 3000


def answerBound(ids: int = MAX_IDS_PER_CALL) -> int:
    """The most bytes the outcomes of ``ids`` ids take in one AMP value."""
    return ids * ENTRY_BYTES


assert answerBound() <= AMP_VALUE_LIMIT
assert MAX_ACTIVE_LISTED * (2 + 16) <= AMP_VALUE_LIMIT

# Blocked clients per answer; relayctl asks page after page. An entry: the
# address (normalized, at most 39 characters for IPv6) and the end of its
# block (a float's repr, at most 24 characters), framed like an outcome.
MAX_BLOCKED_PER_CALL = 500
BLOCKED_ENTRY_BYTES = 4 + len(b"address") + 39 + 4 + len(b"until") + 24 + 2
assert MAX_BLOCKED_PER_CALL * BLOCKED_ENTRY_BYTES <= AMP_VALUE_LIMIT


class TooManyIds(Exception):
    """A request named more ids than MAX_IDS_PER_CALL."""


_Outcomes = amp.AmpList([(b"id", amp.Unicode()), (b"ok", amp.Boolean()),
                         (b"outcome", amp.Unicode())])


class _PerMessage(amp.Command):
    arguments = [(b"ids", amp.ListOf(amp.Unicode()))]
    response = [(b"outcomes", _Outcomes)]
    errors = {TooManyIds: b"TOO_MANY_IDS"}
    requiresAnswer = True


class Hold(_PerMessage):
    commandName = b"hold"


class Release(_PerMessage):
    commandName = b"release"


class Delete(_PerMessage):
    commandName = b"delete"


class Bounce(_PerMessage):
    commandName = b"bounce"


class Flush(_PerMessage):
    """``ids`` empty: every message not on hold."""

    commandName = b"flush"
    # unlisted: the whole queue's failures beyond the MAX_IDS_PER_CALL listed.
    response = [(b"outcomes", _Outcomes), (b"count", amp.Integer()),
                (b"unlisted", amp.Integer(optional=True))]


class Requeue(_PerMessage):
    """``ids`` empty: every message in the queue."""

    commandName = b"requeue"
    response = [(b"outcomes", _Outcomes), (b"count", amp.Integer()),
                (b"unlisted", amp.Integer(optional=True))]


class DaemonStatus(amp.Command):
    """What only the daemon knows: which messages are being delivered right now."""

    commandName = b"status"
    arguments = []
    response = [(b"version", amp.Unicode()), (b"messages", amp.Integer()),
                (b"active", amp.ListOf(amp.Unicode()))]


class Blocked(amp.Command):
    """The addresses AUTH is blocked for and until when (clock seconds), from ``start`` on."""

    commandName = b"blocked"
    arguments = [(b"start", amp.Integer())]
    response = [(b"clients", amp.AmpList([(b"address", amp.Unicode()), (b"until", amp.Float())])),
                (b"total", amp.Integer())]


class Unblock(amp.Command):
    """Lift the block on an address (and forget its failures)."""

    commandName = b"unblock"
    arguments = [(b"address", amp.Unicode())]
    response = [(b"address", amp.Unicode()), (b"wasBlocked", amp.Boolean())]
    errors = {ValueError: b"BAD_ADDRESS"}


class QuarantineRestore(_PerMessage):
    """Put quarantined messages back into the queue, each checked again."""

    commandName = b"quarantine-restore"


class Reload(amp.Command):
    """Re-read the configuration and apply it; the answer says whether it was applied, and why not."""

    commandName = b"reload"
    arguments = []
    response = [(b"ok", amp.Boolean()), (b"message", amp.Unicode())]


# The longest Stall: a test's bound, not a tuning knob.
MAX_STALL = 30.0


class Stall(amp.Command):
    """
    For tests only (the daemon answers it only when started with
    RELAYD_TEST_HOOKS=1): keep the reactor thread busy for ``seconds``, as a
    hung file system would, to show that the watchdog notices; with
    ``worker``, the reactor of that intake worker instead (the answer comes
    when it is free again).
    """

    commandName = b"test-stall"
    arguments = [(b"seconds", amp.Float()), (b"worker", amp.Integer(optional=True))]
    response = []
    errors = {ValueError: b"NOT_ENABLED"}


NOT_A_QUEUE_ID = "not a queue id"
UNKNOWN = "no such message in the queue"
# What flush and requeue of the whole queue count as done.
_SUCCESSES = frozenset((FLUSHED, REQUEUED))


def cannotWrite(error: OSError) -> dict:
    """The answer for a message whose envelope could not be written (a full disk, say)."""
    return {"ok": False, "outcome": _clip(f"cannot write the queue: {error.strerror or error}",
                                          MAX_OUTCOME_BYTES)}


def _clip(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` bytes of UTF-8 (never inside a character)."""
    data = text.encode("utf-8", "replace")
    if len(data) <= limit:
        return text
    return data[: limit - 3].decode("utf-8", "ignore") + "..."


def _entry(queueId: str, ok: bool, outcome: str) -> dict:
    return {"id": queueId if isQueueId(queueId) else _clip(queueId, MAX_ECHOED_ID_BYTES),
            "ok": ok, "outcome": _clip(outcome, MAX_OUTCOME_BYTES)}


def _checkCount(ids) -> None:
    if len(ids) > MAX_IDS_PER_CALL:
        raise TooManyIds(f"{len(ids)} ids in one request; at most {MAX_IDS_PER_CALL} "
                         "(relayctl sends larger lists in batches)")


class ControlProtocol(amp.AMP):
    def __init__(self, scheduler, throttle=None, reload=None, stall=None) -> None:
        super().__init__()
        self.scheduler = scheduler
        self.throttle = throttle  # relayd.auth.FailureThrottle
        # () -> (applied, what was logged): the daemon's reload.
        self.reload = reload
        # (seconds[, worker number]) -> None or a Deferred, blocking a
        # reactor thread; None unless testing.
        self.stall = stall

    # AMP logs every connection and disconnection; the mail log gets one
    # line per admin action instead (from the scheduler).
    def makeConnection(self, transport) -> None:
        amp.BinaryBoxProtocol.makeConnection(self, transport)

    def connectionLost(self, reason) -> None:
        amp.BinaryBoxProtocol.connectionLost(self, reason)
        self.transport = None

    @defer.inlineCallbacks
    def _each(self, ids, action):
        """Fires with the outcome per id; ``action`` may answer at once or with a Deferred."""
        _checkCount(ids)
        outcomes = []
        for queueId in ids:
            if not isQueueId(queueId):
                outcomes.append(_entry(queueId, False, NOT_A_QUEUE_ID))
                continue
            try:
                outcome = yield defer.maybeDeferred(action, queueId)
            except UnknownMessage:
                outcomes.append(_entry(queueId, False, UNKNOWN))
            except AdminRefusal as e:
                outcomes.append(_entry(queueId, False, str(e)))
            except OSError as e:
                # Per id, so one failed write does not lose the batch's
                # answer; the scheduler has left that message as on disk.
                outcomes.append({"id": queueId, **cannotWrite(e)})
            else:
                outcomes.append(_entry(queueId, True, outcome))
        return outcomes

    @Hold.responder
    def hold(self, ids):
        return self._each(ids, self.scheduler.hold).addCallback(lambda o: {"outcomes": o})

    @Release.responder
    def release(self, ids):
        return self._each(ids, self.scheduler.release).addCallback(lambda o: {"outcomes": o})

    @Delete.responder
    def delete(self, ids):
        return self._each(ids, self.scheduler.delete).addCallback(lambda o: {"outcomes": o})

    @Bounce.responder
    def bounce(self, ids):
        return self._each(ids, self.scheduler.bounce).addCallback(lambda o: {"outcomes": o})

    @defer.inlineCallbacks
    def _many(self, ids, action):
        """
        Flush or requeue. The whole queue is answered with a count, plus the
        messages that could not be written; the scheduler answers those with
        the OSError instead of raising it, so the rest still gets done.
        """
        if not ids:
            outcomes = yield defer.maybeDeferred(action, None)
            failed = [{"id": queueId, **cannotWrite(o)}
                      for queueId, o in outcomes.items() if isinstance(o, OSError)]
            return {"outcomes": failed[:MAX_IDS_PER_CALL],
                    "count": sum(1 for o in outcomes.values() if o in _SUCCESSES),
                    "unlisted": max(0, len(failed) - MAX_IDS_PER_CALL)}

        @defer.inlineCallbacks
        def one(queueId):
            outcome = (yield defer.maybeDeferred(action, [queueId]))[queueId]
            if isinstance(outcome, OSError):
                raise outcome
            return outcome
        return {"outcomes": (yield self._each(ids, one)), "count": 0}

    @Flush.responder
    def flush(self, ids):
        return self._many(ids, self.scheduler.flush)

    @Requeue.responder
    def requeue(self, ids):
        return self._many(ids, self.scheduler.requeue)

    @Blocked.responder
    def blocked(self, start):
        clients = self.throttle.blockedClients() if self.throttle is not None else []
        page = clients[max(0, start):max(0, start) + MAX_BLOCKED_PER_CALL]
        return {"clients": [{"address": a, "until": until} for a, until in page],
                "total": len(clients)}

    @Unblock.responder
    def unblock(self, address):
        # Imported here: relayd.server installs the global reactor (through
        # twisted.mail.smtp) and relayctl, which uses none, imports this module.
        from relayd.server import normalizeAddress

        try:
            address = str(ipaddress.ip_address(normalizeAddress(address)))
        except ValueError:
            raise ValueError(f"{address!r} is not an IP address") from None
        wasBlocked = self.throttle.unblock(address) if self.throttle is not None else False
        if wasBlocked:
            maillog.clientUnblocked(address)
        return {"address": address, "wasBlocked": wasBlocked}

    @QuarantineRestore.responder
    @defer.inlineCallbacks
    def restoreFromQuarantine(self, ids):
        _checkCount(ids)
        outcomes = []
        for queueId in ids:
            if not isQueueId(queueId):
                outcomes.append(_entry(queueId, False, NOT_A_QUEUE_ID))
                continue
            try:
                outcome = yield self.scheduler.restore(queueId)
            except FileNotFoundError:
                outcomes.append(_entry(queueId, False, "not in quarantine"))
            except FileExistsError:
                outcomes.append(_entry(queueId, False, "a message with this id is in the queue"))
            except PermissionError as e:
                outcomes.append(_entry(queueId, False, f"{e.strerror}; "
                                       f"{permissionFix(self.scheduler.spool.directory)}"))
            except (ValueError, AdminRefusal) as e:
                outcomes.append(_entry(queueId, False, f"not restored: {e}"))
            except OSError as e:
                outcomes.append({"id": queueId, **cannotWrite(e)})
            else:
                outcomes.append(_entry(queueId, True, outcome))
        return {"outcomes": outcomes}

    @Reload.responder
    def reloadConfiguration(self):
        if self.reload is None:
            return {"ok": False, "message": "this daemon cannot reload over the control socket"}
        # The reload reads its files in a thread: the answer comes when it is applied.
        return defer.maybeDeferred(self.reload).addCallback(
            lambda outcome: {"ok": outcome[0], "message": outcome[1]})

    @Stall.responder
    def stallReactor(self, seconds, worker=None):
        if self.stall is None:
            raise ValueError("test hooks are not enabled in this daemon")
        seconds = min(max(0.0, seconds), MAX_STALL)
        if worker is None:
            self.stall(seconds)
            return {}
        return defer.maybeDeferred(self.stall, seconds, worker).addCallback(lambda _: {})

    @DaemonStatus.responder
    def status(self):
        return {"version": relayd.__version__, "messages": self.scheduler.queueLength(),
                "active": self.scheduler.activeIds()[:MAX_ACTIVE_LISTED]}


class ControlFactory(protocol.Factory):
    noisy = False

    def __init__(self, scheduler, throttle=None, reload=None, stall=None) -> None:
        self.scheduler = scheduler
        self.throttle = throttle
        self.reload = reload
        self.stall = stall

    def buildProtocol(self, addr) -> ControlProtocol:
        return ControlProtocol(self.scheduler, self.throttle, self.reload, self.stall)


def stallForTests(seconds: float, worker: int | None = None) -> None:
    """What Stall does when enabled: the reactor thread waits (nothing else may)."""
    if worker is not None:
        raise ValueError("this daemon has no intake workers")
    time.sleep(seconds)


def _inUse(path: str) -> bool:
    """Whether something answers on the socket at ``path`` (a stale file does not)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True


class ControlService(service.Service):
    """
    Listens on the control socket while the daemon runs. A socket that
    cannot be created is logged and the daemon carries on: mail matters
    more than relayctl.
    """

    name = "control"

    def __init__(self, path: str, scheduler, reactor, throttle=None, reload=None,
                 stall=None) -> None:
        self.path = path
        self.scheduler = scheduler
        self.reactor = reactor
        self.throttle = throttle
        self.reload = reload
        self.stall = stall
        self.port = None

    def startService(self) -> None:
        super().startService()
        path = self.path
        try:
            if os.path.lexists(path):
                if _inUse(path):
                    raise OSError(errno.EADDRINUSE, "another process answers on it")
                # Left behind by a daemon that was killed; ours now (the
                # spool lock says no other relayd uses this spool).
                os.unlink(path)
        except OSError as e:
            maillog.daemonEvent(f"control socket {path}: {e.strerror or e}; relayctl cannot "
                                "change the queue (list and show still work)",
                                level=maillog.LogLevel.error)
            return
        endpoint = endpoints.UNIXServerEndpoint(self.reactor, path, mode=0o600, wantPID=False)
        result: list = []
        endpoint.listen(ControlFactory(self.scheduler, self.throttle, self.reload, self.stall)).addBoth(
            result.append)
        outcome = result[0] if result else None
        if outcome is None or isinstance(outcome, Failure):
            reason = outcome.getErrorMessage() if isinstance(outcome, Failure) else "did not listen at once"
            maillog.daemonEvent(f"control socket {path}: {reason}; relayctl cannot change the "
                                "queue (list and show still work)", level=maillog.LogLevel.error)
            return
        self.port = outcome
        # The mode argument is applied after bind; make sure, whatever the umask.
        os.chmod(path, 0o600)
        maillog.daemonEvent(f"control socket listening on {path}")

    def stopService(self):
        super().stopService()
        port, self.port = self.port, None
        if port is None:
            return None
        # Twisted's UNIX port removes the socket file when it has closed.
        d = defer.maybeDeferred(port.stopListening)
        d.addErrback(lambda f: maillog.daemonEvent(
            f"control socket {self.path}: {f.getErrorMessage()}", level=maillog.LogLevel.warn))
        return d
