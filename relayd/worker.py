"""
An intake worker: one of the ``processes`` that run relayd's SMTP server
when there is more than one (relayd.master starts them). It adopts the
listening sockets the master created, receives and commits messages to the
spool as a single-process relayd does, and asks the master, over its
channel (relayd.channel), before admitting a client and before each
password check.

It also makes the first delivery attempt of what it committed, with its
own courier (its own connections to the next hops, reused as a single
process reuses them) and the body still in its memory: so the work of a
message, intake and delivery, runs on every core, not only the master's.
The master grants the slots with its answer to ``Committing``, which the
250 waits for anyway (the concurrency limits stay global, at no extra
round trip); what is not delivered and removed by that attempt is written
back and handed to the master (``AttemptEnded``), which owns every retry
and notice. relayd.master says who owns a message when.

A worker never recovers, deletes or moves what is in the spool at its
start: another worker may be between the two renames of a commit. It
writes and removes only the files of the messages it owns. It
holds the spool's lock descriptor (inherited), so no second daemon can
start on the spool while any worker of this one runs.

Run by the master as ``python -m relayd.worker --config FILE --number N
--channel FD --lock FD --listener FD ...``; not a command for admins. The
file is named for ``ps``: a worker runs with the master's running
configuration, fetched over the channel at its start and at each reload,
so a worker started after the file was edited (or broken) runs as the
others do.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
from collections import deque

from twisted.application import service
from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.failure import Failure

from relayd import channel, maillog, replies, route
from relayd.tcp import sendAtOnceOnAccept

log = Logger()

_REFUSALS = {
    channel.REFUSED_CONNECTIONS: replies.TOO_MANY_CONNECTIONS,
    channel.REFUSED_PER_CLIENT: replies.TOO_MANY_CONNECTIONS_FROM_CLIENT,
}

# How long a stopping worker waits for the master to take its last metric updates.
LAST_METRICS_TIMEOUT = 5.0

# Blocks and rate limits this worker remembers (as FailureThrottle.MAX_TRACKED).
MAX_TRACKED = 100_000

# Seconds a session waits for the master's answer to Admit or StartCheck:
# then it gets LIMITS_NOT_ANSWERING and ends, however the master is stuck
# (the heartbeat kills a worker only when the worker hangs, not the master).
# CheckEnded, Failed and Committing wait as long, then the session goes on
# (a committed message gets its 250: the spool has it).
ANSWER_TIMEOUT = 10.0


def _ignored(answer) -> None:
    """A late answer that needs nothing given back."""


class MasterNotAnswering(Exception):
    """The master did not answer within ANSWER_TIMEOUT."""


def _within(d: defer.Deferred, clock, seconds: float, late) -> defer.Deferred:
    """
    ``d``'s outcome, or a MasterNotAnswering failure after ``seconds``; an
    answer that comes later goes to ``late(answer)`` (to give back what the
    master counted for a session that has been told no).
    """
    result: defer.Deferred = defer.Deferred()

    def timedOut() -> None:
        maillog.daemonEvent(f"the master did not answer within {seconds:g}s; "
                            "the session gets a temporary failure",
                            level=maillog.LogLevel.warn)
        result.errback(MasterNotAnswering())

    timer = clock.callLater(seconds, timedOut)

    def answered(outcome):
        if result.called:
            if not isinstance(outcome, Failure):
                late(outcome)
            return None
        timer.cancel()
        if isinstance(outcome, Failure):
            result.errback(outcome)
        else:
            result.callback(outcome)
        return None

    d.addBoth(answered)
    return result


def _call(link, command, **arguments) -> defer.Deferred:
    """``callRemote``, as a Deferred that fails (never raises) once the master is gone."""
    if link.transport is None:
        return defer.fail(ConnectionError("the master process is gone"))
    try:
        return link.callRemote(command, **arguments)
    except Exception:
        return defer.fail()


def _send(link, command, **arguments) -> None:
    """A command that needs no answer; nothing when the master is gone."""
    if link.transport is not None:
        try:
            link.callRemote(command, **arguments)
        except Exception:
            pass


def _expiring(table: dict, key: str, clock) -> float | None:
    until = table.get(key)
    if until is not None and until <= clock.seconds():
        del table[key]
        return None
    return until


def _remember(table: dict, key: str, until: float, clock) -> None:
    if key not in table and len(table) >= MAX_TRACKED:
        now = clock.seconds()
        for old in [k for k, t in table.items() if t <= now]:
            del table[old]
        if len(table) >= MAX_TRACKED:
            table.pop(next(iter(table)))
    table[key] = until


class RemoteAdmission:
    """``limits.connections`` and ``connections_per_client``, counted by the master."""

    def __init__(self, link, clock) -> None:
        self.link = link
        self.clock = clock

    def admit(self, address: str) -> defer.Deferred:
        """Deferred: None (admitted) or the reply that refuses the session."""

        def late(answer) -> None:
            if answer["refusal"] == channel.ADMITTED:
                self.left(address)  # counted by the master, refused here

        d = _within(_call(self.link, channel.Admit, address=address), self.clock,
                    ANSWER_TIMEOUT, late)
        d.addCallback(lambda answer: _REFUSALS.get(answer["refusal"]))

        def failed(failure):
            if failure.check(MasterNotAnswering):
                return replies.LIMITS_NOT_ANSWERING
            return replies.SHUTTING_DOWN  # the master is gone: this worker is stopping

        d.addErrback(failed)
        return d

    def left(self, address: str) -> None:
        _send(self.link, channel.Left, address=address)


class RemoteThrottle:
    """
    The AUTH failure throttle of relayd.auth.FailureThrottle, kept by the
    master: the checks ask it; the blocks it announces are remembered here
    so that AUTH from a blocked address is refused without asking.
    """

    def __init__(self, link, clock, limit: int, window: float) -> None:
        self.link = link
        self.clock = clock
        self.limit = limit
        self.window = window
        self._blocked: dict[str, float] = {}

    def blockedUntil(self, address: str) -> float | None:
        return _expiring(self._blocked, address, self.clock)

    def blocked(self, address: str) -> bool:
        return self.blockedUntil(address) is not None

    def mayCheck(self, address: str) -> bool:
        return not self.blocked(address)

    def block(self, address: str, until: float) -> None:
        _remember(self._blocked, address, until, self.clock)

    def unblock(self, address: str) -> bool:
        return self._blocked.pop(address, None) is not None

    def startCheck(self, address: str) -> defer.Deferred:
        """
        Deferred: True (the check may start), False (throttled), or the
        reply to end the session with when the master does not answer.
        """

        def late(answer) -> None:
            if answer["allowed"]:
                # Counted in flight by the master; never started here.
                _send(self.link, channel.CheckEnded, address=address, failed=False)

        d = _within(_call(self.link, channel.StartCheck, address=address), self.clock,
                    ANSWER_TIMEOUT, late)
        d.addCallback(lambda answer: answer["allowed"])
        d.addErrback(lambda f: replies.LIMITS_NOT_ANSWERING if f.check(MasterNotAnswering)
                     else False)
        return d

    def _until(self, address: str, answer: dict) -> float | None:
        until = answer.get("blockedUntil")
        if until is not None:
            self.block(address, until)
        return until

    def checkEnded(self, address: str, failed: bool) -> defer.Deferred:
        # Without an answer in time the session goes on; a block it started
        # reaches this worker anyway (BlockStarted).
        d = _within(_call(self.link, channel.CheckEnded, address=address, failed=failed),
                    self.clock, ANSWER_TIMEOUT, _ignored)
        d.addCallback(lambda answer: self._until(address, answer))
        d.addErrback(lambda f: None)
        return d

    def failed(self, address: str) -> defer.Deferred:
        d = _within(_call(self.link, channel.Failed, address=address), self.clock,
                    ANSWER_TIMEOUT, _ignored)
        d.addCallback(lambda answer: self._until(address, answer))
        d.addErrback(lambda f: None)
        return d


class RemoteMessageRate:
    """``messages_per_user_per_hour``, counted by the master; logins over it are announced."""

    def __init__(self, clock, limit: int) -> None:
        self.clock = clock
        self.limit = limit
        self._limited: dict[str, float] = {}

    def exceeded(self, login: str) -> bool:
        return _expiring(self._limited, login, self.clock) is not None

    def queued(self, login: str) -> None:
        """Counted by the master, from the Queued notice."""

    def limited(self, login: str, until: float) -> None:
        _remember(self._limited, login, until, self.clock)


class RemoteLimits:
    """What a worker's SubmissionFactory takes as ``limits``."""

    def __init__(self, link, clock, config, throttleSettings) -> None:
        self._throttleSettings = throttleSettings
        self.admission = RemoteAdmission(link, clock)
        self.throttle = RemoteThrottle(link, clock, *throttleSettings(config))
        self.messageRate = RemoteMessageRate(clock, config.limits.messagesPerUserPerHour)

    def reconfigure(self, config) -> None:
        self.throttle.limit, self.throttle.window = self._throttleSettings(config)
        self.messageRate.limit = config.limits.messagesPerUserPerHour


class MasterLink(channel.Quiet):
    """
    A worker's side of its channel. ``lost()`` is called when the master
    has gone. Its notices that may wait do (relayd.channel.NOTICE_WAIT).
    """

    noticeDelay = channel.NOTICE_WAIT

    def __init__(self, clock, lost, parse) -> None:
        super().__init__()
        self.clock = clock
        self.lost = lost
        self.parse = parse  # (YAML text, path) -> Config
        self.limits: RemoteLimits | None = None
        self.sessionCount = lambda: 0
        self.reload = lambda config: None
        # seconds -> None, blocking the reactor thread; None unless testing.
        self.stall = None

    @defer.inlineCallbacks
    def runningConfig(self):
        """The master's running configuration (a Deferred)."""
        parts: list[str] = []
        offset = 0
        while True:
            answer = yield _call(self, channel.RunningConfig, offset=offset)
            parts.append(answer["text"])
            offset += len(answer["text"])
            if offset >= answer["total"] or not answer["text"]:
                return self.parse("".join(parts), answer["path"])

    @channel.Ping.responder
    def ping(self):
        return {"sessions": self.sessionCount()}

    @channel.StallWorker.responder
    def stallNow(self, seconds):
        if self.stall is None:
            raise ValueError("test hooks are not enabled in this daemon")
        self.stall(seconds)
        return {}

    @channel.ConfigChanged.responder
    def reloadNow(self):
        d = self.runningConfig()
        d.addCallback(self.reload)
        d.addErrback(lambda f: log.failure("reloading the master's configuration", f))
        return {}

    @channel.BlockStarted.responder
    def blockedNow(self, address, until):
        self.limits.throttle.block(address, until)
        return {}

    @channel.BlockLifted.responder
    def unblockedNow(self, address):
        self.limits.throttle.unblock(address)
        return {}

    @channel.RateLimited.responder
    def rateLimited(self, login, until):
        self.limits.messageRate.limited(login, until)
        return {}

    # Intake notices

    def committing(self, queueId: str) -> defer.Deferred:
        return _within(_call(self, channel.Committing, queueId=queueId), self.clock,
                       ANSWER_TIMEOUT, _ignored)

    def queued(self, envelope) -> None:
        arguments = {"queueId": envelope.queueId}
        if envelope.authIdentity:
            arguments["login"] = envelope.authIdentity
        _send(self, channel.Queued, **arguments)

    # First attempts (the worker's relayd.scheduler.Scheduler ``handOff``)

    def committingWithSlots(self, envelope) -> defer.Deferred:
        """
        ``Committing``, asking for the slots of ``envelope``'s first attempt:
        a Deferred firing with whether this worker may make it; None when
        its recipients' domains are too many to ask about (then the master
        schedules it after the commit, as any message it is not allowed).
        """
        domains = sorted({route.recipientDomain(r.address) for r in envelope.pending()})
        if sum(len(d.encode("utf-8")) + 2 for d in domains) > channel.DOMAINS_BYTES:
            return _within(_call(self, channel.Committing, queueId=envelope.queueId),
                           self.clock, ANSWER_TIMEOUT, _ignored).addCallback(lambda answer: None)
        arguments = {"queueId": envelope.queueId, "domains": domains}
        if envelope.authIdentity:
            arguments["login"] = envelope.authIdentity
        # Not answered in time: the 250 goes out anyway (the message is
        # committed) and the master schedules it (Queued frees any slot).
        return _within(_call(self, channel.Committing, **arguments), self.clock,
                       ANSWER_TIMEOUT, _ignored).addCallback(
            lambda answer: bool(answer.get("allowed")))

    def startAttempt(self, envelope) -> defer.Deferred:
        """Whether a message waiting in this worker's line may be attempted now (a Deferred)."""
        domains = sorted({route.recipientDomain(r.address) for r in envelope.pending()})
        d = _call(self, channel.StartAttempt, queueId=envelope.queueId, domains=domains)
        return d.addCallback(lambda answer: answer["allowed"])

    def ended(self, queueId: str, kept: bool) -> None:
        """The first attempt has ended: gone from the spool, or (``kept``) the master's now."""
        _send(self, channel.AttemptEnded, queueId=queueId, kept=kept)

    def notice(self, envelope) -> None:
        """A notice this worker committed (a bounce of its first attempt): the master sends it."""
        _send(self, channel.Queued, queueId=envelope.queueId)

    def accepting(self) -> None:
        _send(self, channel.Accepting)

    def sendMetrics(self, updates) -> defer.Deferred:
        """A batch of relayd.metrics updates for the master's registry."""
        return _call(self, channel.MetricUpdates, updates=[
            {"name": name, "labels": list(labels), "amount": float(amount)}
            for name, labels, amount in updates])

    def connectionLost(self, reason) -> None:
        super().connectionLost(reason)
        self.lost()


# Messages a worker keeps waiting for a delivery slot, at most: beyond, the
# master takes them (their bodies are read back from the spool there).
LINE_LIMIT = 1000


class FirstAttempts:
    """
    The worker's commit and ``messageQueued``, and its scheduler's
    ``handOff``. The commit asks the master for the slots of the message's
    first attempt (relayd.channel's ``Committing``); once committed, an
    allowed message goes into this worker's scheduler. One not allowed
    (every slot taken) waits in this worker's line, as it would in a single
    process's, and asks again (``StartAttempt``) each time one of this
    worker's attempts ends; when none is left to end, the line goes to the
    master. ``commitInThread(writer, envelope)`` is the spool's commit.
    """

    def __init__(self, link, scheduler, commitInThread) -> None:
        self.link = link
        self.scheduler = scheduler
        # queue id -> may this worker attempt it (None: not asked), until queued.
        self._allowed: dict[str, bool | None] = {}
        self._commit = announcedCommit(self, commitInThread)
        self._committing: dict[str, object] = {}
        # Committed messages waiting for a slot, oldest first; and whether
        # the first of them is being asked about.
        self.line: deque = deque()
        self._asking = False

    def committing(self, queueId: str) -> defer.Deferred:
        """announcedCommit's announcement: the master's answer kept for ``queued``."""
        envelope = self._committing.pop(queueId)

        def answered(allowed):
            self._allowed[queueId] = allowed
            return allowed

        return self.link.committingWithSlots(envelope).addCallback(answered)

    def commit(self, writer, envelope) -> defer.Deferred:
        queueId = envelope.queueId
        self._committing[queueId] = envelope
        d = self._commit(writer, envelope)

        def failed(failure):
            # Nothing was committed: the slots go back, the master forgets the id.
            if self._allowed.pop(queueId, None):
                self.link.ended(queueId, False)
            self.scheduler.forgetBody(queueId)
            return failure

        d.addErrback(failed)
        return d

    def queued(self, envelope) -> None:
        queueId = envelope.queueId
        allowed = self._allowed.pop(queueId, None)
        if allowed and self.scheduler.running:
            self.scheduler.add(envelope)
            return
        if allowed is False and self.scheduler.running and len(self.line) < LINE_LIMIT:
            self.line.append(envelope)
            self._next()
            return
        self.scheduler.forgetBody(queueId)
        if allowed:
            # Stopping: the slots go back and the master has the message.
            self.link.ended(queueId, True)
        elif allowed is None:
            self.link.queued(envelope)  # not asked about slots: counted now
        else:
            # The master counted the login when it was asked about slots.
            self.link.notice(envelope)

    # The scheduler's handOff

    def ended(self, queueId: str, kept: bool) -> None:
        self.link.ended(queueId, kept)
        self._next()

    def notice(self, envelope) -> None:
        self.link.notice(envelope)

    def _next(self) -> None:
        """Ask for a slot for the first message in the line; hand the line over if none will free."""
        if self._asking or not self.line:
            return
        if not self.scheduler.running or not self.scheduler.activeIds():
            # No attempt of this worker's will end and ask again: the master's.
            while self.line:
                envelope = self.line.popleft()
                self.scheduler.forgetBody(envelope.queueId)
                self.link.notice(envelope)
            return
        envelope = self.line[0]
        self._asking = True

        def answered(allowed: bool) -> None:
            self._asking = False
            if not self.line or self.line[0] is not envelope:
                return
            if allowed and self.scheduler.running:
                self.line.popleft()
                self.scheduler.add(envelope)
                self._next()
            elif allowed:
                self.line.popleft()
                self.link.ended(envelope.queueId, True)
                self._next()
            elif not self.scheduler.activeIds():
                self._next()  # hands the line over

        def failed(failure) -> None:
            # The master is gone (this worker is stopping): the spool keeps them.
            self._asking = False

        self.link.startAttempt(envelope).addCallbacks(answered, failed)


def announcedCommit(link, commitInThread):
    """
    The worker's commit: the master hears of the queue id before the
    commit ends, and the 250 waits for both, so a message acknowledged to
    a client is one the master can find in the spool if this worker dies.
    A master that is gone cannot be told, and need not be: the message is
    committed, and the next master's recovery finds it (a 4xx here would
    make the client send it twice).
    """

    def commit(writer, envelope) -> defer.Deferred:
        announced = link.committing(envelope.queueId)
        written = commitInThread(writer, envelope)
        result = defer.Deferred()

        def committed(_):
            announced.addBoth(lambda _: result.callback(None))

        def failed(failure):
            announced.addErrback(lambda f: None)
            result.errback(failure)

        written.addCallbacks(committed, failed)
        return result

    return commit


class WorkerService(service.MultiService):
    """
    One worker: its listeners (adopted sockets), sessions and thread pools.
    Stops as the daemon does (listeners, then sessions within
    ``shutdown_grace``, then the pools) on SIGTERM, SIGINT, or when the
    master has gone.
    """

    def __init__(self, config, reactor, factory, listenerFactories, listenerFds, pool,
                 authPool, reloadable, readReload, reloadConfig, scheduler=None, courier=None,
                 signer=None, boundListeners=None) -> None:
        super().__init__()
        # The first attempts: started with the listeners, stopped after the sessions.
        self.scheduler = scheduler
        self.courier = courier
        self.signer = signer
        # Filled in at the start, for the courier's loop check (relayd's own addresses).
        self.boundListeners = boundListeners if boundListeners is not None else []
        self.config = config
        self.reactor = reactor
        self.factory = factory
        self.listenerFactories = listenerFactories
        self.listenerFds = listenerFds
        self.pool = pool
        self.authPool = authPool
        self.reloadable = list(reloadable)
        self._readReload = readReload
        self._reloadConfig = reloadConfig
        self._reloading = defer.DeferredLock()
        self.ports: list = []
        self._stopping = False
        # The metric updates waiting for the master (relayd.metrics.UpdateBatch), if counted.
        self.metrics = None

    def startService(self) -> None:
        self.pool.start()
        if self.authPool is not None:
            self.authPool.start()
        for fd, factory in zip(self.listenerFds, self.listenerFactories):
            family = socket.socket(fileno=os.dup(fd))
            try:
                addressFamily = family.family
            finally:
                family.close()
            # adoptStreamPort duplicates the descriptor; the inherited one is closed.
            port = self.reactor.adoptStreamPort(fd, addressFamily, factory)
            # Before the reactor's next turn, so before its first accept.
            sendAtOnceOnAccept(port)
            self.ports.append(port)
            self.boundListeners.append(_Bound(port))
            os.close(fd)
        if self.scheduler is not None:
            self.scheduler.startService()
        super().startService()

    def reload(self, new) -> defer.Deferred:
        """
        The master's running configuration ``new``, through the daemon's one
        reload path: what it reads (certificates, password files) is read
        in a spool thread, then applied on the reactor thread; one reload
        at a time, in the order they came.
        """
        return self._reloading.run(self._reload, new)

    def _reload(self, new) -> defer.Deferred:
        d = threads.deferToThreadPool(self.reactor, self.pool, self._readReload, self.config,
                                      self.reloadable, new)

        def apply(reading) -> None:
            applied, _ = self._reloadConfig(self.config, self.reloadable, reading=reading)
            if applied is not None:
                self.config = applied

        return d.addCallback(apply)

    def stopNow(self, why: str) -> None:
        if self._stopping:
            return
        self._stopping = True
        maillog.daemonEvent(f"worker {why}, shutting down")
        self.reactor.callFromThread(self.reactor.stop)

    @defer.inlineCallbacks
    def stopService(self):
        self._stopping = True
        super().stopService()
        deadline = self.reactor.seconds() + self.config.shutdownGrace
        ports, self.ports = self.ports, []
        yield defer.DeferredList([defer.maybeDeferred(p.stopListening) for p in ports],
                                 consumeErrors=True)
        yield self.factory.shutdown(max(0.0, deadline - self.reactor.seconds()))
        if self.scheduler is not None:
            # What is still being delivered after the grace is the master's
            # once this process has exited (it may be delivered twice).
            yield self.scheduler.stopService(max(0.0, deadline - self.reactor.seconds()))
        if self.courier is not None:
            yield self.courier.closeIdle()
        if self.metrics is not None:
            # The sessions' last events (disconnections) reach the master's page.
            yield self.metrics.flush().addTimeout(LAST_METRICS_TIMEOUT, self.reactor).addErrback(
                lambda f: None)
        self.pool.stop()
        if self.authPool is not None:
            self.authPool.stop()
        if self.signer is not None:
            self.signer.stop()


class _Bound:
    """An adopted listening port, as the courier's loop check reads listeners."""

    def __init__(self, port) -> None:
        self.port = port


def _dieWithMaster(masterPid: int) -> None:
    """
    SIGKILL when the master dies (Linux's PR_SET_PDEATHSIG): a worker left
    running would hold the spool's lock and keep a restarted daemon out.
    Being killed is safe (what it acknowledged is in the spool), as it is
    for the master.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # elsewhere: the lost channel stops the worker
    if os.getppid() != masterPid:  # the master died before the line above
        os._exit(1)


def _arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="relayd-worker")
    parser.add_argument("--config", required=True)
    parser.add_argument("--number", type=int, required=True)
    parser.add_argument("--master", type=int, required=True)
    parser.add_argument("--channel", type=int, required=True)
    parser.add_argument("--lock", type=int, required=True)
    parser.add_argument("--listener", type=int, action="append", default=[])
    parser.add_argument("--logger")
    parser.add_argument("--log-events", action="store_true")
    return parser.parse_args(argv)


def _startLogging(arguments: argparse.Namespace) -> None:
    """
    The master's log destination, in its format; this process's pid in
    every line. ``--log-events``: the events go to the master instead, one
    JSON object a line on stdout, and the master writes them to its
    ``--logfile`` (twistd's log file is not opened for appending, and only
    the master reopens it when it rotates it).
    """
    from twisted.logger import globalLogBeginner, jsonFileLogObserver, textFileLogObserver
    from twisted.python.reflect import namedAny

    if arguments.logger:
        from relayd import logformat

        logformat.socketWarnings = False  # the master's warning speaks for the daemon
        observer = namedAny(arguments.logger)()
    else:
        if arguments.log_events:
            out = jsonFileLogObserver(sys.stdout, recordSeparator="")
        else:
            out = textFileLogObserver(sys.stdout)
        pid = os.getpid()

        def observer(event: dict) -> None:
            # twistd's own format shows no pid: the worker's lines say theirs.
            if "log_system" not in event:
                level = event.get("log_level")
                event = dict(event, log_system=f"{event.get('log_namespace', '-')}#"
                             f"{getattr(level, 'name', level)} pid {pid}")
            out(event)

    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


def main(argv: list[str] | None = None) -> None:
    arguments = _arguments(sys.argv[1:] if argv is None else argv)
    _dieWithMaster(arguments.master)
    # SIGINT and SIGTERM stop the worker as the daemon's stop does; until
    # it has started they only say so. SIGHUP is the master's to handle.
    stopRequested: list[str] = []
    signal.signal(signal.SIGTERM, lambda s, f: stopRequested.append("SIGTERM"))
    signal.signal(signal.SIGINT, lambda s, f: stopRequested.append("SIGINT"))
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    _startLogging(arguments)

    from twisted.internet import protocol, reactor

    from relayd import config as configModule
    from relayd import tap

    started: list[WorkerService] = []

    def stop(why: str) -> None:
        if started:
            started[0].stopNow(why)
        elif reactor.running:
            reactor.stop()

    link = MasterLink(reactor, lost=lambda: stop("lost its master"), parse=configModule.parse)
    linkFactory = protocol.Factory()
    linkFactory.noisy = False
    linkFactory.buildProtocol = lambda addr: link
    channel.adopt(reactor, arguments.channel, linkFactory)
    os.close(arguments.channel)

    def start(config) -> None:
        # The configuration the master runs with, whatever the file says now.
        worker = tap.makeWorker(config, reactor, link, arguments.listener, arguments.number)
        worker.startService()
        started.append(worker)
        maillog.daemonEvent(f"worker {arguments.number} accepting connections")
        link.accepting()
        link.reload = worker.reload
        # The notices still waiting go to the master before the process ends.
        reactor.addSystemEventTrigger(
            "before", "shutdown", lambda: worker.stopService().addBoth(
                lambda result: (link.flush(), result)[1]))

        def onSignal(signum, frame) -> None:
            worker.stopNow(f"received {signal.Signals(signum).name}")

        signal.signal(signal.SIGTERM, onSignal)
        signal.signal(signal.SIGINT, onSignal)
        if stopRequested:
            worker.stopNow(f"received {stopRequested[0]}")

    def failed(failure) -> None:
        log.failure("worker start-up", failure)
        reactor.stop()

    reactor.callWhenRunning(lambda: link.runningConfig().addCallback(start).addErrback(failed))
    reactor.run(installSignalHandlers=False)
    if not started:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
