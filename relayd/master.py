"""
The master process of a daemon with ``processes`` above 1: what ``twistd
relayd`` starts. It runs start-up recovery once, creates the listening
sockets, runs the queue manager (scheduler and courier: the schedule,
retries, notices, and the delivery slots every process's attempts take)
and owns every limit counter and the AUTH block list. It starts the intake workers (relayd.worker), each running relayd's
SMTP server on the same listening sockets, passed to it as inherited file
descriptors, and talks to each over its own socketpair (relayd.channel).

Who owns a committed message (the only process that writes, moves or
removes its spool files, and that delivers it):

- the worker that commits it, from ``Committing`` (sent before its commit
  starts, which also asks for the slots of a first attempt) until it
  sends ``AttemptEnded`` or ``Queued``: allowed, the worker makes the
  first delivery attempt itself, from the body still in its memory, as a
  single process does; not allowed, it keeps the message in its own line
  and asks again (``StartAttempt``) whenever one of its attempts ends, or
  hands it over (``Queued``) when it has none left;
- the master from then on (retries, notices, expiry, relayctl); a notice
  a worker wrote after a first attempt is the master's once announced
  (``Queued``): should the worker die in between, the failed recipients
  are still pending on disk, so the master's attempt bounces them again
  (the notice may go twice), and the first notice is sent after the next
  start's recovery;
- the master, for every message a worker owned when that worker died: once
  the process has exited (so none of its threads can still write), each is
  looked up in the spool and scheduled. One that was being delivered may be
  delivered twice; one that is gone (delivered and removed) is skipped.

So ``delivery.concurrency`` and ``destination_concurrency`` stay global:
the workers' attempts take their slots from the master's scheduler.

A worker that dies is started again, with a log line. The master asks every worker for a heartbeat (``Ping``), answered by the
worker's reactor thread: ``alive()`` tells whether each one answered
recently, and a worker whose reactor stops answering for ``HANG_LIMIT``
seconds is killed and started again.

With a ``metrics`` section, each worker sends its metric updates in
batches (``MetricUpdates``) and the master applies them to the daemon's
one registry; a gone worker's share of the gauges is taken away.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from collections import Counter

from twisted.application import service
from twisted.internet import defer, protocol, task
from twisted.logger import Logger, eventFromJSON, globalLogPublisher
from twisted.python.failure import Failure
from twisted.python.reflect import qual

from relayd import channel, maillog
from relayd.auth import FailureThrottle, MessageRate
from relayd.limits import SessionCounts

log = Logger()

# Seconds between heartbeats, and without an answer before a worker is killed.
HEARTBEAT = 2.0
HANG_LIMIT = 30.0
# A worker that dies within MIN_LIFETIME of its start waits RESTART_DELAY
# before the next start: a worker that cannot start must not spin.
MIN_LIFETIME = 5.0
RESTART_DELAY = 1.0
# After the drain's grace, how long workers get to exit before SIGKILL.
EXIT_GRACE = 10.0
# The first inherited descriptors of a worker: the channel and the spool lock.
CHANNEL_FD = 3
LOCK_FD = 4
FIRST_LISTENER_FD = 5


class LimitsOwner:
    """
    Every counter the intake processes share: sessions per client and in
    all, the AUTH failure throttle (with checks in flight) and the message
    rate per login. ``broadcast(command, **arguments)`` tells every worker
    of a change to the block list or the rate limit.
    """

    def __init__(self, config, clock, throttleSettings) -> None:
        self.clock = clock
        self._throttleSettings = throttleSettings
        self.sessions = SessionCounts(config.limits.connections, config.limits.connectionsPerClient)
        self.throttle = FailureThrottle(clock, *throttleSettings(config))
        self.messageRate = MessageRate(clock, config.limits.messagesPerUserPerHour)
        self.broadcast = lambda command, **arguments: None

    def reconfigure(self, config) -> None:
        self.sessions.reconfigure(config)
        self.throttle.limit, self.throttle.window = self._throttleSettings(config)
        self.messageRate.limit = config.limits.messagesPerUserPerHour

    # relayctl blocked / unblock (relayd.control)

    def blockedClients(self) -> list[tuple[str, float]]:
        return self.throttle.blockedClients()

    def unblock(self, address: str) -> bool:
        wasBlocked = self.throttle.unblock(address)
        self.broadcast(channel.BlockLifted, address=address)
        return wasBlocked

    def blockStarted(self, address: str, until: float | None) -> None:
        if until is not None:
            self.broadcast(channel.BlockStarted, address=address, until=until)

    def messageQueued(self, login: str | None) -> None:
        if not login:
            return
        self.messageRate.queued(login)
        until = self.messageRate.exceededUntil(login)
        if until is not None:
            self.broadcast(channel.RateLimited, login=login, until=until)


def heartbeatInterval(watchdog: float | None) -> float:
    """
    Seconds between heartbeats: HEARTBEAT, or a quarter of systemd's
    WatchdogSec= when that is shorter, so that a worker's answer is always
    more recent than the watchdog's window unless its reactor is blocked.
    """
    return HEARTBEAT if watchdog is None else min(HEARTBEAT, watchdog / 4)


class Worker:
    """What the master knows of one intake worker."""

    def __init__(self, number: int, started: float) -> None:
        self.number = number
        self.started = started
        self.pid: int | None = None
        self.process = None  # the IProcessTransport
        self.link: WorkerLink | None = None
        self.lastAnswer = started
        # Queue ids this worker owns: announced by Committing, not yet
        # handed over (Queued, AttemptEnded).
        self.committing: set[str] = set()
        # Its attempts in progress: queue id -> the destinations whose slots they hold.
        self.attempts: dict[str, tuple] = {}
        # Password checks in flight, per client address.
        self.checks: Counter = Counter()
        self.exited = False
        self.released = False
        self.hung = False  # killed for not answering the heartbeat

    def describe(self) -> str:
        return f"worker {self.number} (pid {self.pid})"


class WorkerLink(channel.Quiet):
    """The master's side of one worker's channel."""

    def __init__(self, pool: "WorkerPool", worker: Worker) -> None:
        super().__init__()
        self.pool = pool
        self.worker = worker

    @channel.Admit.responder
    def admit(self, address):
        return {"refusal": self.pool.owner.sessions.admit(self.worker, address)}

    @channel.Left.responder
    def left(self, address):
        self.pool.owner.sessions.left(self.worker, address)
        return {}

    @channel.StartCheck.responder
    def startCheck(self, address):
        allowed = self.pool.owner.throttle.startCheck(address)
        if allowed:
            self.worker.checks[address] += 1
        return {"allowed": allowed}

    @channel.CheckEnded.responder
    def checkEnded(self, address, failed):
        owner = self.pool.owner
        if self.worker.checks[address] <= 0:
            return {}  # not counted here (a check from before a restart of this link)
        self.worker.checks[address] -= 1
        if self.worker.checks[address] <= 0:
            del self.worker.checks[address]
        until = owner.throttle.checkEnded(address, failed)
        owner.blockStarted(address, until)
        return {} if until is None else {"blockedUntil": until}

    @channel.Failed.responder
    def failed(self, address):
        owner = self.pool.owner
        until = owner.throttle.failed(address)
        owner.blockStarted(address, until)
        return {} if until is None else {"blockedUntil": until}

    @channel.MetricUpdates.responder
    def metricUpdates(self, updates):
        # Once released (its process ended before its channel was read to
        # the end), a worker's gauge share is gone and must not come back.
        if self.pool.metrics is not None and not self.worker.released:
            self.pool.metrics.applyFrom(self.worker, [
                (u["name"], tuple(u["labels"]), u["amount"]) for u in updates])
        return {}

    @channel.Accepting.responder
    def accepting(self):
        self.pool.accepting(self.worker)
        return {}

    @channel.RunningConfig.responder
    def runningConfig(self, offset):
        text = self.pool.configText()
        start = max(0, offset)
        return {"text": text[start:start + channel.CONFIG_PAGE], "total": len(text),
                "path": self.pool.config.path}

    @channel.Committing.responder
    def committing(self, queueId, login=None, domains=None):
        self.worker.committing.add(queueId)
        if domains is None:
            return {}
        pool = self.pool
        # Counted at the commit's start (a commit that fails still counts).
        pool.owner.messageQueued(login)
        destinations = pool.scheduler.takeSlots(domains)
        if destinations is None:
            return {"allowed": False}
        self.worker.attempts[queueId] = destinations
        return {"allowed": True}

    @channel.Queued.responder
    def queued(self, queueId, login=None):
        self.worker.committing.discard(queueId)
        destinations = self.worker.attempts.pop(queueId, None)
        if destinations is not None:
            # Allowed after the worker stopped waiting for the answer: not attempted there.
            self.pool.scheduler.freeSlots(destinations)
        self.pool.owner.messageQueued(login)
        self.pool.schedule(queueId)
        return {}

    @channel.StartAttempt.responder
    def startAttempt(self, queueId, domains):
        # Only for a message this worker still owns (not taken over meanwhile).
        if queueId not in self.worker.committing or queueId in self.worker.attempts:
            return {"allowed": False}
        destinations = self.pool.scheduler.takeSlots(domains)
        if destinations is None:
            return {"allowed": False}
        self.worker.attempts[queueId] = destinations
        return {"allowed": True}

    @channel.AttemptEnded.responder
    def attemptEnded(self, queueId, kept):
        destinations = self.worker.attempts.pop(queueId, None)
        if destinations is not None:
            self.pool.scheduler.freeSlots(destinations)
        if queueId in self.worker.committing:
            self.worker.committing.discard(queueId)
            if kept:
                self.pool.schedule(queueId)
        return {}

    def connectionLost(self, reason) -> None:
        super().connectionLost(reason)
        self.pool.release(self.worker)


class WorkerProcess(protocol.ProcessProtocol):
    def __init__(self, pool: "WorkerPool", worker: Worker) -> None:
        self.pool = pool
        self.worker = worker
        self._partial = b""
        self._skipping = False  # within a line longer than MAX_EVENT_LINE

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        """The worker's log events (``--log-events``: one JSON object a line), into this log."""
        lines = data.split(b"\n")
        lines[0] = self._partial + lines[0]
        self._partial = lines.pop()
        for line in lines:
            if self._skipping:
                self._skipping = False
            elif line:
                forwardEvent(line, self.worker)
        if len(self._partial) > MAX_EVENT_LINE:
            self._partial, self._skipping = b"", True

    def processEnded(self, reason: Failure) -> None:
        self.pool.exited(self.worker, reason.value)


# The longest log event a worker may forward (JSON); longer ones are dropped.
MAX_EVENT_LINE = 1 << 20


def forwardEvent(line: bytes, worker: Worker) -> None:
    """One event a worker forwarded, published here as if logged here (its time and pid kept)."""
    try:
        event = eventFromJSON(line.decode("utf-8"))
    except ValueError:
        maillog.daemonEvent(f"{worker.describe()} wrote a line that is not a log event",
                            level=maillog.LogLevel.warn)
        return
    # Counted by the worker's own metrics batches, not again here.
    event["forwarded_from"] = worker.pid
    globalLogPublisher(event)


def exitDescription(status) -> str:
    """``exited with status 1`` or ``killed by SIGKILL``, from a ProcessDone/ProcessTerminated."""
    sig = getattr(status, "signal", None)
    if sig:
        try:
            return f"killed by {signal.Signals(sig).name}"
        except ValueError:
            return f"killed by signal {sig}"
    return f"exited with status {getattr(status, 'exitCode', None)}"


class WorkerPool(service.Service):
    """
    Starts ``count`` intake workers on the listeners' sockets and keeps them
    running; ``shutdown(grace)`` drains them (SIGTERM) for the daemon's stop.
    ``command(number, listenerFds)`` is a worker's argv.
    """

    name = "workers"

    def __init__(self, count: int, command, reactor, listeners, lockFd, owner: LimitsOwner,
                 scheduler, spool, runInThread, config=None) -> None:
        self.count = count
        # Whether the workers forward their log events (``--log-events``).
        self.forwardsLog = getattr(command, "forwardsLog", False)
        # The running configuration, which the workers fetch (RunningConfig).
        self.config = config
        self._configText: str | None = None
        self.command = command
        self.reactor = reactor
        self.listeners = listeners
        self.lockFd = lockFd
        self.owner = owner
        owner.broadcast = self.broadcast
        self.scheduler = scheduler
        self.spool = spool
        self.runInThread = runInThread
        self.workers: dict[int, Worker] = {}
        self._stopping = False
        self._exits: list[defer.Deferred] = []
        self._heartbeat = None
        # Seconds between pings (heartbeatInterval).
        self.heartbeat = HEARTBEAT
        # The daemon's relayd.metrics.MetricsRegistry, with a metrics section.
        self.metrics = None
        # Worker numbers that have said their listeners accept, and who waits for all.
        self._accepting: set[int] = set()
        self._allAccepting: list[defer.Deferred] = []

    def startService(self) -> None:
        super().startService()
        for number in range(1, self.count + 1):
            self.spawn(number)
        self._heartbeat = task.LoopingCall(self._beat)
        self._heartbeat.clock = self.reactor
        self._heartbeat.start(self.heartbeat, now=False)

    # Starting

    def spawn(self, number: int) -> None:
        if self._stopping:
            return
        worker = Worker(number, self.reactor.seconds())
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # Its stdout: the master's, or a pipe its log events come through.
        fds = {0: "w", 1: "r" if self.forwardsLog else 1, 2: 2, CHANNEL_FD: theirs.fileno(),
               LOCK_FD: self.lockFd()}
        listenerFds = []
        for index, listener in enumerate(self.listeners):
            fd = FIRST_LISTENER_FD + index
            fds[fd] = listener.port.fileno()
            listenerFds.append(fd)
        argv = self.command(number, listenerFds)
        try:
            process = self.reactor.spawnProcess(
                WorkerProcess(self, worker), argv[0], argv, env=dict(os.environ), childFDs=fds)
        except OSError as e:
            ours.close()
            theirs.close()
            maillog.daemonEvent(f"worker {number}: cannot start: {e.strerror or e}",
                                level=maillog.LogLevel.error)
            self.reactor.callLater(RESTART_DELAY, self.spawn, number)
            return
        finally:
            theirs.close()
        process.closeStdin()
        worker.process = process
        worker.pid = process.pid
        self.workers[number] = worker
        worker.link = link = WorkerLink(self, worker)
        # What the link writes in one turn of the reactor goes in one send.
        link.clock = self.reactor
        factory = protocol.Factory()
        factory.noisy = False
        factory.buildProtocol = lambda addr: link
        channel.adopt(self.reactor, ours.fileno(), factory)
        ours.close()
        maillog.daemonEvent(f"{worker.describe()} started")
        # What the new worker must know already: the blocks and rate limits in force.
        for address, until in self.owner.throttle.blockedClients():
            link.callRemote(channel.BlockStarted, address=address, until=until)
        for login, until in self.owner.messageRate.exceededLogins():
            link.callRemote(channel.RateLimited, login=login, until=until)

    def accepting(self, worker: Worker) -> None:
        self._accepting.add(worker.number)
        if len(self._accepting) >= self.count:
            waiting, self._allAccepting = self._allAccepting, []
            for d in waiting:
                d.callback(None)

    def whenAccepting(self) -> defer.Deferred:
        """Fires once every worker has accepted on the listeners (at its first start)."""
        if len(self._accepting) >= self.count:
            return defer.succeed(None)
        d = defer.Deferred()
        self._allAccepting.append(d)
        return d

    # Messages

    def schedule(self, queueId: str, mayBeGone: bool = False) -> defer.Deferred:
        """
        A worker committed ``queueId`` and the master owns it now: load its
        envelope and schedule it (once). ``mayBeGone``: the worker died
        owning it, so it may never have been committed, or been delivered.
        """
        d = self.runInThread(self.spool.load, queueId)

        def loaded(envelope) -> None:
            if envelope.queueId not in self.scheduler.envelopes:
                self.scheduler.add(envelope)

        def failed(failure: Failure) -> None:
            failure.trap(OSError, ValueError)
            if mayBeGone and failure.check(FileNotFoundError):
                return
            maillog.queueWarning(queueId, f"cannot read the envelope a worker committed: "
                                 f"{getattr(failure.value, 'strerror', None) or failure.value}")

        d.addCallbacks(loaded, failed)
        d.addErrback(lambda f: log.failure("scheduling a message from a worker", f))
        return d

    # A worker's end

    def release(self, worker: Worker) -> None:
        """Give back what a gone worker held: its sessions, checks, slots and messages."""
        if worker.released:
            if worker.exited:
                self._takeOver(worker)
            return
        worker.released = True
        self.owner.sessions.forget(worker)
        if self.metrics is not None:
            # Its open connections closed with it.
            self.metrics.forget(worker)
        for address, count in worker.checks.items():
            for _ in range(count):
                self.owner.throttle.checkEnded(address, failed=False)
        worker.checks.clear()
        if worker.process is None or worker.exited:
            self._takeOver(worker)
        # else: once it has exited (exited() calls here again).
        if worker.process is not None and not worker.exited and not self._stopping:
            # A worker without its channel cannot be asked anything: end it.
            try:
                worker.process.signalProcess("KILL")
            except Exception:
                pass

    def _takeOver(self, worker: Worker) -> None:
        """A dead worker's messages (committed or not as it died: the spool says) are the master's."""
        attempts, worker.attempts = worker.attempts, {}
        for destinations in attempts.values():
            self.scheduler.freeSlots(destinations)
        owned, worker.committing = worker.committing, set()
        for queueId in sorted(owned):
            self.schedule(queueId, mayBeGone=True).addErrback(lambda f: None)

    def exited(self, worker: Worker, status) -> None:
        worker.exited = True
        self.release(worker)
        if self.workers.get(worker.number) is worker:
            del self.workers[worker.number]
        if self._stopping:
            maillog.daemonEvent(f"{worker.describe()} {exitDescription(status)}")
            if not self.workers:
                exits, self._exits = self._exits, []
                for d in exits:
                    d.callback(None)
            return
        lived = self.reactor.seconds() - worker.started
        # A clean exit is a worker stopped by a signal meant for the whole
        # daemon (systemd's SIGTERM to every process, Ctrl-C): the master's
        # own stop is likely on its way.
        clean = getattr(status, "exitCode", None) == 0
        delay = RESTART_DELAY if lived < MIN_LIFETIME or clean else 0
        maillog.daemonEvent(f"{worker.describe()} {exitDescription(status)}; starting it again",
                            level=maillog.LogLevel.warn)
        self.reactor.callLater(delay, self.spawn, worker.number)

    # Heartbeat

    def _beat(self) -> None:
        now = self.reactor.seconds()
        for worker in list(self.workers.values()):
            link = worker.link
            if link is None or link.transport is None:
                continue
            if now - worker.lastAnswer > HANG_LIMIT:
                maillog.daemonEvent(f"{worker.describe()} has not answered for "
                                    f"{now - worker.lastAnswer:.0f}s; killing it",
                                    level=maillog.LogLevel.error)
                worker.lastAnswer = now
                worker.hung = True
                try:
                    worker.process.signalProcess("KILL")
                except Exception:
                    pass
                continue
            d = link.callRemote(channel.Ping)
            d.addCallback(lambda _, w=worker: setattr(w, "lastAnswer", self.reactor.seconds()))
            d.addErrback(lambda f: None)

    def alive(self, within: float = HANG_LIMIT) -> bool:
        """Whether every worker runs and its reactor answered within ``within`` seconds."""
        now = self.reactor.seconds()
        return (len(self.workers) == self.count
                and all(now - w.lastAnswer <= within and not w.hung
                        for w in self.workers.values()))

    def stallWorker(self, number: int, seconds: float) -> defer.Deferred:
        """For tests only: block worker ``number``'s reactor (it refuses unless enabled)."""
        worker = self.workers.get(number)
        if worker is None or worker.link is None or worker.link.transport is None:
            raise ValueError(f"no worker {number} is running")
        return worker.link.callRemote(channel.StallWorker, seconds=seconds)

    # Reload and stop

    def broadcast(self, command, **arguments) -> None:
        for worker in self.workers.values():
            link = worker.link
            if link is not None and link.transport is not None:
                d = link.callRemote(command, **arguments)
                if d is not None:
                    d.addErrback(lambda f: None)

    def configText(self) -> str:
        if self._configText is None:
            self._configText = self.config.toYAML()
        return self._configText

    def reconfigure(self, config) -> None:
        """The master has applied a reloaded config: every worker fetches it."""
        self.config = config
        self._configText = None
        self.broadcast(channel.ConfigChanged)

    def shutdown(self, grace: float) -> defer.Deferred:
        """SIGTERM to every worker (each drains for ``grace``); fires when all have exited."""
        self._stopping = True
        if self._heartbeat is not None and self._heartbeat.running:
            self._heartbeat.stop()
        if not self.workers:
            return defer.succeed(None)
        for worker in self.workers.values():
            try:
                worker.process.signalProcess("TERM")
            except Exception:
                pass
        d = defer.Deferred()
        self._exits.append(d)

        def killLeft() -> None:
            for worker in list(self.workers.values()):
                maillog.daemonEvent(f"{worker.describe()} did not exit; killing it",
                                    level=maillog.LogLevel.warn)
                try:
                    worker.process.signalProcess("KILL")
                except Exception:
                    pass

        timer = self.reactor.callLater(grace + EXIT_GRACE, killLeft)
        d.addBoth(lambda r: (timer.cancel() if timer.active() else None, r)[1])
        return d

    def stopService(self):
        super().stopService()
        if self._heartbeat is not None and self._heartbeat.running:
            self._heartbeat.stop()


def workerCommand(configPath: str, logger: str | None, logfile: str | None):
    """The argv builder for WorkerPool: ``python -m relayd.worker`` with this daemon's settings."""

    def command(number: int, listenerFds: list[int]) -> list[str]:
        argv = [sys.executable, "-m", "relayd.worker", "--config", configPath,
                "--number", str(number), "--master", str(os.getpid()),
                "--channel", str(CHANNEL_FD), "--lock", str(LOCK_FD)]
        for fd in listenerFds:
            argv += ["--listener", str(fd)]
        if logger:
            # twistd's options hold the observer factory itself, not its name.
            argv += ["--logger", logger if isinstance(logger, str) else qual(logger)]
        elif command.forwardsLog:
            argv += ["--log-events"]
        return argv

    # twistd --logfile: the master alone writes (and rotates) the file.
    command.forwardsLog = bool(not logger and logfile and logfile != "-")
    return command
