"""
``twistd relayd --config FILE``: the options and makeService, the only place
that wires relayd's objects together.

Start order: thread pool, spool recovery, scheduler, then the listeners
last. Stop order (SIGTERM) is the reverse and sequential: listeners stop
accepting, open sessions get 421 4.3.2 (or finish the message in flight)
within ``shutdown_grace``, deliveries in flight get the same grace, then
the thread pool stops. SIGHUP (or ``relayctl reload``, which waits for the
outcome) re-reads the config (twistd's default would kill the process
without stopping anything): every file it reads (the config, certificates,
password, CA and hosts files) in a thread, then applied on the reactor
thread. Under systemd, relayd.notify tells it when
the daemon is ready, reloading and stopping, and feeds its watchdog; with
a ``metrics`` section, relayd.metrics serves Prometheus's page.

SIGINT and SIGTERM are relayd's from the moment its options are parsed
(``StopSignals``): under stock twistd, SIGINT before the reactor runs is a
KeyboardInterrupt wherever start-up happens to be (a traceback, and started
thread pools keep the process alive), and twistd re-raises the signal that
stopped the reactor, so a clean stop would exit -15.
"""

from __future__ import annotations

import gc
import os
import dataclasses
import resource
import signal
import sys

from twisted.application import service
from twisted.cred.portal import Portal
from twisted.internet import defer, endpoints
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger, globalLogPublisher
from twisted.python import threadpool, usage
from twisted.python.failure import Failure

from relayd import config as configModule
from relayd import maillog, notify
from relayd.auth import (
    PasswordFile, PasswordFileChecker, PasswordFileError, Realm, Verifier, warnPasswordFile,
)
from relayd.courier import Courier
from relayd.dkim import KeyProblem, Signer, keyProblems
from relayd.proxy import ProxyFactory
from relayd.queue import (SPOOL_THREADS, MessageLanes, Spool, ThreadBatches, commitInLane,
                          ownershipProblem, permissionFix, spoolProblems)
from relayd.resolve import HOSTS_FILE, ClientNames, ConfiguredResolver
from relayd.scheduler import Scheduler
from relayd.tcp import sendAtOnceOnAccept
from relayd.secret import deliverySecrets
from relayd.tls import ServerTLS, TLSSetupError, wrapImplicit

log = Logger()



def fail(message: str) -> "NoReturn":  # noqa: F821
    """One line on stderr and a non-zero exit: twistd itself exits 0 after usage errors."""
    sys.stderr.write(f"relayd: {message}\n")
    sys.stderr.flush()
    raise SystemExit(1)


class StopSignals:
    """
    The SIGINT and SIGTERM handler, from the first step of start-up to the
    exit. A signal that arrives before the daemon has started is recorded
    and acted on as soon as start-up reaches a point where it can stop
    cleanly (``RelayService.startService``); once started, it stops the reactor
    (``RelayService.stopOnSignal``) and the daemon exits 0.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self.relay: RelayService | None = None
        # SIGHUP before the RelayService has its own handler (whose default would
        # kill the process): the config is re-read once start-up is done.
        self.reloadRequested = False

    def install(self) -> None:
        signal.signal(signal.SIGINT, self)
        signal.signal(signal.SIGTERM, self)

    def installForStartUp(self) -> None:
        self.install()
        signal.signal(signal.SIGHUP, self._hup)

    def _hup(self, signum, frame) -> None:
        self.reloadRequested = True

    def __call__(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum
        if self.relay is not None:
            self.relay.stopOnSignal(signum)


# One per process: the handler twistd's start-up and the RelayService share.
stopSignals = StopSignals()


# Open files (RLIMIT_NOFILE) relayd needs, counted from its config:
#   FILES_BASE                       stdio, logs, the spool lock, epoll and the
#                                    waker, the control socket, the spool
#                                    threads' files, files read at start
#   + 1 per listener
#   + FILES_PER_CONNECTION  per limits.connections:   the client's socket, its
#                                    message file during DATA, and room for as
#                                    many connections again being refused (421)
#   + FILES_PER_DELIVERY    per delivery.concurrency: the next hop's socket,
#                                    the message body being sent, an idle
#                                    connection kept for reuse, three DNS
#                                    queries (MX, A, AAAA: a UDP socket each)
FILES_BASE = 64

# Processes that sign DKIM (started at the first message to sign): each
# holds one signature at a time, one per core up to four.
DKIM_WORKERS = max(1, min(4, os.cpu_count() or 1))

# Thread jobs reading bodies for delivery at once; the reads asked for
# meanwhile wait and then go together in the next job (queue.ThreadBatches).
BODY_READ_JOBS = 2
FILES_PER_CONNECTION = 3
FILES_PER_DELIVERY = 6


def filesNeeded(listeners: int, connections: int, concurrency: int) -> int:
    """The open files a configuration needs (the formula above)."""
    return (FILES_BASE + listeners + FILES_PER_CONNECTION * connections
            + FILES_PER_DELIVERY * concurrency)


def fileLimitPlan(soft: int, hard: int, needed: int,
                  infinity: int = resource.RLIM_INFINITY) -> tuple[int, bool]:
    """
    ``(soft limit to set, enough)``: relayd raises its soft limit to the
    hard one (a hard limit of ``infinity`` leaves the soft one as it is,
    or raises it to ``needed``); ``enough`` says whether that holds
    ``needed`` open files.
    """
    if hard == infinity:
        target = soft if soft == infinity else max(soft, needed)
        return target, True
    target = hard
    return target, target >= needed


def _filesNeeded(config) -> int:
    return filesNeeded(len(config.listeners), config.limits.connections,
                       config.delivery.concurrency)


def _fileLimitProblem(config, limit: int) -> str:
    needed = _filesNeeded(config)
    return (f"{config.path}: limits.connections: {config.limits.connections} connections "
            f"(with delivery.concurrency {config.delivery.concurrency}) need {needed} open files "
            f"({FILES_BASE} + listeners + {FILES_PER_CONNECTION} x connections + "
            f"{FILES_PER_DELIVERY} x concurrency), but the file limit (RLIMIT_NOFILE) is {limit}; "
            "raise LimitNOFILE= in the systemd unit (or ulimit -n), or lower limits.connections")


def raiseFileLimit(config, getrlimit=resource.getrlimit, setrlimit=resource.setrlimit) -> None:
    """
    At start: the soft file limit up to the hard one; refuse to start (one
    line) when that cannot hold what the configuration needs.
    """
    soft, hard = getrlimit(resource.RLIMIT_NOFILE)
    needed = _filesNeeded(config)
    target, enough = fileLimitPlan(soft, hard, needed)
    if not enough:
        fail(_fileLimitProblem(config, hard))
    if target != soft:
        try:
            setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError) as e:
            if soft < needed:
                fail(_fileLimitProblem(config, soft) + f" (raising it failed: {e})")


class Options(usage.Options):
    synopsis = "--config FILE"
    longdesc = "relayd: an authenticated SMTP submission relay with a durable queue."
    optParameters = [["config", "c", None, "The relayd YAML configuration file (required)."]]

    def postOptions(self) -> None:
        # Under twistd (which sets ``parent``) this is relayd's first code of
        # the start-up: take SIGINT and SIGTERM before any work begins.
        if getattr(self, "parent", None) is not None:
            stopSignals.installForStartUp()
        path = self["config"]
        if not path:
            fail("--config FILE is required (see etc/relayd.yaml for an example)")
        try:
            self["loaded"] = configModule.load(path)
        except configModule.ConfigError as e:
            fail(str(e))


class ListenerService(service.Service):
    """
    One listening endpoint. Unlike StreamServerEndpointService, a port that
    cannot be bound stops the start-up with one line, instead of a daemon
    running on without it.
    """

    def __init__(self, description: str, factory, reactor, label: str | None = None,
                 accept: bool = True):
        self.description = description
        # False: the socket is only held for the intake workers, which accept on it.
        self.accept = accept
        # As the admin wrote it (haproxy:tcp:25 listens on tcp:25).
        self.label = label or description
        self.factory = factory
        self.reactor = reactor
        self.port = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        endpoint = endpoints.serverFromString(self.reactor, self.description)
        result: list = []
        endpoint.listen(self.factory).addBoth(result.append)
        if not result:
            fail(f"listener {self.label}: did not start listening at once")
        outcome = result[0]
        if isinstance(outcome, Failure):
            fail(f"cannot listen on {self.label}: {outcome.getErrorMessage()}")
        self.port = outcome
        sendAtOnceOnAccept(outcome)
        if not self.accept:
            outcome.stopReading()
        host = outcome.getHost()
        maillog.daemonEvent(f"listening on {self.label} ({getattr(host, 'host', host)}:{getattr(host, 'port', '')})")

    def startService(self) -> None:
        if self.port is None:
            self.privilegedStartService()
        super().startService()

    def stopService(self):
        super().stopService()
        port, self.port = self.port, None
        if port is not None:
            return defer.maybeDeferred(port.stopListening)


class RelayService(service.MultiService):
    """
    The whole daemon. Children start in order; stopService is sequential
    in reverse (MultiService would stop them all at once).
    """

    # systemd's notifications (relayd.notify.NotifyService), when wired.
    notify = None

    def __init__(self, config, reactor, spool, pool, scheduler, factory, listeners,
                 reloadable, courier=None, passwords=None, authPool=None, signer=None):
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.spool = spool
        self.pool = pool
        self.scheduler = scheduler
        self.factory = factory
        self.listeners = listeners
        # Every component that holds settings, each built from the config
        # and given every new one (``reconfigure(config)``) on SIGHUP, in
        # this order: the one way a reload reaches them.
        self.reloadable = list(reloadable)
        # Idle upstream connections get QUIT at the stop.
        self.courier = courier
        # The password file, and the threads that verify passwords (a pool
        # of their own, so DNS lookups never wait behind bcrypt).
        self.passwords = passwords
        self.authPool = authPool
        # DKIM's worker processes end with the daemon.
        self.signer = signer
        self.scheduler.setServiceParent(self)
        for listener in listeners:
            listener.setServiceParent(self)
        self._previousHup = None
        self._stopping = False
        # A reload reads its files (the config, certificates, password and
        # hosts files) in the spool's threads: the reactor thread never waits
        # on the disk. One reload at a time, so they apply in order.
        self.readInThread = lambda f, *args: deferToThreadPool(reactor, pool, f, *args)
        self._reloading = defer.DeferredLock()
        # The process's StopSignals when this RelayService runs on the global reactor.
        self.stopSignals: StopSignals | None = None

    def startService(self) -> None:
        signals = self.stopSignals
        if signals is not None:
            signals.installForStartUp()  # idempotent; relayd's Options may not have run
            if signals.received is not None:
                # Nothing runs yet but bound sockets, which the exit closes.
                maillog.daemonEvent(f"received {signal.Signals(signals.received).name} "
                                    "during start-up, not started")
                raise SystemExit(0)
        # Every check that can refuse the start comes before the thread
        # pools: a started pool's threads would keep a refused process alive.
        directory = self.config.queue.directory

        problem = ownershipProblem(directory)
        if problem is not None:
            fail(f"queue.directory {problem}")
        try:
            self.spool.lock()
        except BlockingIOError:
            fail(f"queue.directory {directory} is in use by another relayd")
        except OSError as e:
            fail(f"queue.directory {directory}: {_withFix(e, directory)}")
        try:
            recovered = self.spool.recover()
        except OSError as e:
            fail(f"queue.directory {directory}: {_withFix(e, directory)}")
        self.pool.start()
        if self.authPool is not None:
            self.authPool.start()
        for envelope in recovered:
            self.scheduler.add(envelope)
        self.scheduler.reportQuarantine(getattr(self.spool, "quarantined", []))
        super().startService()
        # What start-up loaded (the recovered queue above all) lives until it
        # is delivered, yet every full pass of the cyclic garbage collector
        # would scan it again, the reactor stopped meanwhile (0.6-0.9 s with
        # 100,000 queued messages): it leaves those objects alone from now
        # on. Reference counting still frees each one when it goes.
        gc.freeze()
        unreadable = len(getattr(self.spool, "unreadable", []))
        maillog.daemonEvent(
            f"daemon started -- version {__import__('relayd').__version__}, "
            f"configuration {self.config.path}, {self.scheduler.queueLength()} messages in queue"
            + (f", {unreadable} unreadable (see the errors above)" if unreadable else ""))
        if signals is not None:
            self._previousHup = signal.signal(signal.SIGHUP, self._sighup)
            signals.relay = self
            if signals.received is not None:  # arrived during the start-up above
                self.stopOnSignal(signals.received)
            elif signals.reloadRequested:
                signals.reloadRequested = False
                self.reactor.callWhenRunning(self.reload)
            # reactor.run() puts its own SIGTERM handler in place (SIGINT it
            # leaves alone, as it is not Python's default any more): ours again.
            self.reactor.callWhenRunning(signals.install)

    def _sighup(self, signum, frame) -> None:
        self.reactor.callFromThread(self.reload)

    def stopOnSignal(self, signum: int) -> None:
        """SIGINT or SIGTERM: stop as SIGTERM does (sessions and deliveries finish), exit 0."""
        if self._stopping:
            return
        self._stopping = True
        maillog.daemonEvent(f"received {signal.Signals(signum).name}, shutting down")
        # Before the reactor runs, this waits in its queue for the first iteration.
        self.reactor.callFromThread(self.reactor.stop)

    def reload(self) -> defer.Deferred:
        """
        Re-read the config; apply what can change live; keep the old one on
        error. Fires with (applied, what was logged), for ``relayctl reload``.
        """
        return self._reloading.run(self._reload)

    def _reload(self) -> defer.Deferred:
        if self.notify is not None:
            self.notify.reloading()
        d = self.readInThread(readReload, self.config, self.reloadable)

        def apply(reading):
            new, text = reloadConfig(self.config, self.reloadable, reading=reading)
            if new is not None:
                self.config = new
            return new is not None, text

        def done(result):
            if self.notify is not None:
                self.notify.reloaded()
            return result

        return d.addCallback(apply).addBoth(done)

    @defer.inlineCallbacks
    def stopService(self):
        if self._previousHup is not None:
            signal.signal(signal.SIGHUP, self._previousHup)
        self._stopping = True
        # A SIGTERM caught by the reactor's own handler (in the instant
        # between reactor.run() installing it and ours going back) would be
        # re-raised by twistd after the stop: this stop is clean, exit 0.
        # The one private name of Twisted relayd reads (no public API tells
        # it); should Twisted rename it, that rare stop exits by SIGTERM,
        # which systemd also counts as clean. tests/test_source_hygiene.py
        # allows it; tests/test_twisted_internals.py pins it.
        if getattr(self.reactor, "_exitSignal", None) in (signal.SIGINT, signal.SIGTERM):
            self.reactor._exitSignal = None
        self.running = False
        if self.notify is not None:
            self.notify.stopping()
        # One grace for sessions and deliveries together: systemd's
        # TimeoutStopSec is set against shutdown_grace, not twice it.
        deadline = self.reactor.seconds() + self.config.shutdownGrace
        maillog.daemonEvent("stopping: no new connections, finishing sessions and deliveries")
        yield defer.DeferredList([defer.maybeDeferred(l.stopService) for l in self.listeners],
                                 consumeErrors=True)
        if "control" in self.namedServices:  # relayctl: no changes during the stop
            yield defer.maybeDeferred(self.namedServices["control"].stopService)
        yield self.factory.shutdown(max(0.0, deadline - self.reactor.seconds()))
        yield self.scheduler.stopService(max(0.0, deadline - self.reactor.seconds()))
        if self.courier is not None:  # idle upstream connections: QUIT
            yield self.courier.closeIdle()
        # The metrics page serves until here, so the drain can be watched.
        for name in ("metrics", "notify"):
            if name in self.namedServices:
                yield defer.maybeDeferred(self.namedServices[name].stopService)
        self.pool.stop()
        if self.authPool is not None:
            self.authPool.stop()
        if self.signer is not None:
            self.signer.stop()
        maillog.daemonEvent("daemon stopped")


@dataclasses.dataclass(frozen=True)
class ReloadReading:
    """What a reload read (``readReload``), to be applied on the reactor thread (``reloadConfig``)."""

    # The configuration to apply, or None with ``problem`` (the line logged).
    config: object | None
    problem: str = ""
    # The settings that changed but only a restart applies.
    needRestart: tuple[str, ...] = ()
    # One function per component, in the order of ``reloadable``.
    apply: tuple = ()


def readReload(old, reloadable, new=None) -> ReloadReading:
    """
    The reading half of a reload, which may wait on the disk (run in a
    thread): the config file (an intake worker is given the master's
    ``new`` one instead) and whatever each of ``reloadable`` reads for it
    (``prepareReload(config)``, which returns the function that applies
    it; a component without one is simply given the config,
    ``reconfigure(config)``). Nothing is applied here.
    """
    if new is None:
        try:
            new = configModule.load(old.path)
        except configModule.ConfigError as e:
            return ReloadReading(None, f"reload failed, keeping the running configuration: {e}")
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft != resource.RLIM_INFINITY and _filesNeeded(new) > soft:
        return ReloadReading(None, "reload failed, keeping the running configuration: "
                                   f"{_fileLimitProblem(new, soft)}")
    needRestart = tuple(name for name, before, after in (
        ("listeners", old.listeners, new.listeners),
        ("queue.directory", old.queue.directory, new.queue.directory),
        ("queue.control_socket", old.queue.controlSocketPath, new.queue.controlSocketPath),
        ("processes", old.processes, new.processes),
        ("metrics", old.metrics, new.metrics),
    ) if before != after)
    # What only a restart applies stays as running, so the next reload
    # still reports it and nothing reads a spool the daemon does not use.
    new = dataclasses.replace(new, listeners=old.listeners, processes=old.processes,
                              metrics=old.metrics,
                              queue=dataclasses.replace(
                                  new.queue, directory=old.queue.directory,
                                  controlSocket=old.queue.controlSocket))
    return ReloadReading(new, needRestart=needRestart,
                         apply=tuple(_prepared(component, new) for component in reloadable))


def _prepared(component, config):
    prepare = getattr(component, "prepareReload", None)
    if prepare is not None:
        return prepare(config)
    return lambda: component.reconfigure(config)


def reloadConfig(old, reloadable, new=None, reading: ReloadReading | None = None):
    """
    The one reload path, for every process of the daemon: apply what
    ``readReload`` read (read here when ``reading`` is not given) to each of
    ``reloadable``, and return the new config with the line logged; None
    (the running config stays) when it cannot be used.
    """
    if reading is None:
        reading = readReload(old, reloadable, new)
    if reading.config is None:
        maillog.daemonEvent(reading.problem, level=maillog.LogLevel.error)
        return None, reading.problem
    for apply in reading.apply:
        apply()
    new = reading.config
    note = f"; {', '.join(reading.needRestart)} changed and need a restart" if reading.needRestart else ""
    text = f"reload: configuration {new.path} applied{note}"
    maillog.daemonEvent(text)
    return new, text


def _withFix(error: OSError, directory: str) -> str:
    """An OSError on the spool, with what to do when it is a permission problem."""

    text = error.strerror or str(error)
    if isinstance(error, PermissionError):
        return f"{getattr(error, 'filename', None) or directory}: {text}; {permissionFix(directory)}"
    return text


def _globalReactor():
    # Imported when called: importing twisted.internet.reactor installs the
    # default reactor, and twistd installs the one the admin chose after it
    # has imported this module to parse the command line.
    from twisted.internet import reactor

    return reactor


def makeService(options, reactor=None) -> RelayService:
    if reactor is None:
        reactor = _globalReactor()
    # Imported here: relayd.server (also behind relayd.control) imports
    # twisted.mail.smtp, which installs the global reactor; importing this
    # module (twistd's option parsing, relayd check-config) must not.
    from relayd.control import ControlService
    from relayd.metrics import TimedTransport
    from relayd.server import SubmissionFactory
    config = options["loaded"]
    raiseFileLimit(config)
    count = configModule.processCount(config.processes, os.cpu_count())
    if count > 1:
        return _makeMaster(options, config, reactor, count)
    spool = Spool(config.queue.directory, deliver=_fromThreads(reactor))
    pool, runInThread = _spoolThreads(reactor)
    listenerServices: list = []
    # One resolver for MX delivery and client names.
    resolver = ConfiguredResolver(reactor, config)
    courier = _courier(config, reactor, listenerServices, resolver, runInThread)

    # A message's writes, commit, updates and removal, in order, in those threads.
    lanes = MessageLanes(runInThread)
    # DKIM keys are read now (a bad one stops the start) and on reload;
    # messages are signed in worker processes (relayd.dkim says why).
    signer = _signer(config, runInThread, reactor)
    metrics = _metrics(config)
    # Each delivery attempt timed for the metrics.
    transport = TimedTransport(courier, metrics, reactor) if metrics is not None else courier
    # Notices (bounces) are written and fsynced in the spool's threads too.
    scheduler = Scheduler(spool, transport, config, reactor, runInThread=runInThread,
                          lanes=lanes, signer=signer)

    commit = _committer(lanes, metrics, reactor, pool)

    tls, passwords, verifier, authPool, credPortal = _security(config, reactor)
    # RELAYD_HOSTS_FILE: another hosts file (the tests' own).
    clientNames = ClientNames(resolver, config.limits.clientNameTimeout, reactor,
                              hostsFile=os.environ.get("RELAYD_HOSTS_FILE") or HOSTS_FILE)
    factory = SubmissionFactory(config, spool, commit, scheduler.add, reactor,
                                portal=credPortal, tls=tls, clientNames=clientNames.lookup,
                                runInThread=runInThread, lanes=lanes, bodyKept=scheduler.keepBody)
    listeners = [ListenerService(l.innerEndpoint, listenerFactory, reactor, label=l.endpoint)
                 for l, listenerFactory in _listenerFactories(config, factory, tls, reactor)]
    # What SIGHUP reconfigures, in this order; restart-only settings (the
    # listeners, the spool and its control socket) are in none of them.
    reloadable = [factory, scheduler, tls, passwords, verifier,
                  credPortal.realm if credPortal is not None else None,
                  resolver, clientNames, courier, signer]
    relay = RelayService(config, reactor, spool, pool, scheduler, factory, listeners,
                  [c for c in reloadable if c is not None], courier=courier,
                  passwords=passwords, authPool=authPool, signer=signer)
    if passwords is not None:
        # A file edited while running is re-read by itself, in a verification
        # thread: the same warnings as at start, from the reactor thread.
        passwords.changed = lambda: reactor.callFromThread(
            lambda: warnPasswordFile(passwords, relay.config.auth))
    # relayctl's channel; a child service, so it starts after the spool lock.
    # RELAYD_TEST_HOOKS=1 (the integration tests) adds a command that blocks
    # the reactor, to show the watchdog stops.
    ControlService(config.queue.controlSocketPath, scheduler, reactor,
                   throttle=factory.authThrottle, reload=relay.reload, stall=_stallHook(),
                   ).setServiceParent(relay)
    if metrics is not None:
        _metricsPage(config, reactor, metrics, scheduler).setServiceParent(relay)
    # Last: READY=1 once the listeners above accept and the queue is loaded.
    relay.notify = notify.fromEnvironment(reactor, lambda: notify.statusLine(
        scheduler.queueLength(), len(factory.sessions)))
    relay.notify.setServiceParent(relay)
    listenerServices.extend(listeners)
    if reactor is _globalReactor():
        relay.stopSignals = stopSignals
    return relay


def _committer(lanes, metrics, reactor, pool):
    """
    A message's commit, in its lane of the spool's threads (fsync never runs
    on the reactor thread; it follows the body's last piece), answered on
    the reactor thread by the fsync of queue/ that covers it (the spool's
    ``deliver``), timed for the metrics page when there is one.
    """

    def commit(writer, envelope):
        d = commitInLane(lanes, writer, envelope, pool.callInThread)
        if metrics is not None:
            started = reactor.seconds()
            d.addCallback(_passing(lambda: metrics.timedCommit(reactor.seconds() - started)))
        return d

    return commit


def _fromThreads(reactor):
    """``reactor.callFromThread``, looked up when called (a test's reactor may have none)."""
    return lambda f, *args: reactor.callFromThread(f, *args)


def _spoolThreads(reactor):
    """
    The spool's threads and a ``runInThread`` into them: every file system
    call of the spool (create, fsync, rename, unlink, reading a body) waits
    for the disk, so none runs on the reactor thread.
    """
    pool = threadpool.ThreadPool(minthreads=1, maxthreads=SPOOL_THREADS, name="relayd-spool")

    def runInThread(f, *args):
        return deferToThreadPool(reactor, pool, f, *args)

    return pool, runInThread


def _signer(config, runInThread, reactor) -> Signer:
    """The DKIM signer; a key that cannot be used stops the start with one line."""
    try:
        return Signer(config, runInThread, workers=DKIM_WORKERS,
                      callFromThread=lambda f, *args: reactor.callFromThread(f, *args))
    except KeyProblem as e:
        fail(str(e))


def _metrics(config):
    """The metrics registry, or None without a metrics section."""
    if config.metrics is None:
        return None
    # Imported here: prometheus_client is only needed with metrics on.
    from relayd.metrics import MetricsRegistry
    return MetricsRegistry()


def _metricsPage(config, reactor, metrics, scheduler):
    """
    The service that counts this process's log events into ``metrics`` and
    serves the page on ``metrics.endpoint``, with the queue's gauges.
    """
    from relayd.metrics import MetricsService, metricsSite, queueSnapshot

    metrics.addQueue(lambda: queueSnapshot(scheduler.envelopes.values(), scheduler.activeIds(),
                                           reactor.seconds()))
    return MetricsService(metrics, globalLogPublisher, ListenerService(
        config.metrics.endpoint, metricsSite(metrics, reactor), reactor,
        label=f"{config.metrics.endpoint} (metrics)"))


def _stallHook(workers=None):
    """
    RELAYD_TEST_HOOKS=1 (the integration tests): the control command that
    blocks this process's reactor, or an intake worker's, to show the
    watchdog stops; None (refused) otherwise.
    """
    if os.environ.get("RELAYD_TEST_HOOKS") != "1":
        return None
    from relayd.control import stallForTests

    def stall(seconds: float, worker: int | None = None):
        if worker is None or workers is None:
            return stallForTests(seconds, worker)
        return workers.stallWorker(worker, seconds)

    return stall


def _passing(action):
    """A callback that runs ``action()`` and passes the result on."""
    def callback(result):
        action()
        return result
    return callback


def _listenerFactories(config, factory, tls, reactor) -> list:
    """(listener, the factory its connections get) for every configured listener."""
    found = []
    for l in config.listeners:
        listenerFactory = factory.forListener(l)
        if l.tls == "implicit":
            listenerFactory = wrapImplicit(tls, listenerFactory)
        if l.proxied:
            # The PROXY header comes before everything, TLS included; the
            # session is built once it is read (relayd.proxy).
            listenerFactory = ProxyFactory(
                listenerFactory, l.proxyFrom, lambda: factory.config.hostname,
                lambda: factory.config.limits.commandTimeout, reactor)
        found.append((l, listenerFactory))
    return found


# More than one process: the master and its intake workers ---------------------


def _makeMaster(options, config, reactor, count: int) -> RelayService:
    """
    The master (relayd.master): recovery, the listening sockets, the queue
    manager, the limits and the block list; ``count`` intake workers
    (relayd.worker) accept and receive on the sockets it holds.
    """
    from twisted.internet import protocol

    from relayd.control import ControlService
    from relayd.master import LimitsOwner, WorkerPool, heartbeatInterval, workerCommand
    from relayd.metrics import TimedTransport
    from relayd.server import _throttleSettings

    spool = Spool(config.queue.directory, deliver=_fromThreads(reactor))
    pool, runInThread = _spoolThreads(reactor)
    listenerServices: list = []
    resolver = ConfiguredResolver(reactor, config)
    courier = _courier(config, reactor, listenerServices, resolver, runInThread)

    # DKIM signs before a message's first attempt: in the worker that makes it,
    # or here for a message the master takes over before any attempt.
    signer = _signer(config, runInThread, reactor)
    # The daemon's one registry: the master's events, and the workers' batches.
    metrics = _metrics(config)
    transport = TimedTransport(courier, metrics, reactor) if metrics is not None else courier
    scheduler = Scheduler(spool, transport, config, reactor, runInThread=runInThread,
                          signer=signer)
    # The workers read the certificate and the password file; checked here
    # too, so that a broken one stops the start with one line. The master
    # re-reads the password file on reload too: what is wrong in it is
    # logged here, once, not by every worker.
    masterPasswords = _security(config, reactor)[1]
    owner = LimitsOwner(config, reactor, _throttleSettings)
    held = protocol.Factory()  # never builds anything: the master does not accept
    held.noisy = False
    listeners = [ListenerService(l.innerEndpoint, held, reactor, label=l.endpoint, accept=False)
                 for l in config.listeners]
    parent = getattr(options, "parent", None) or {}
    command = workerCommand(config.path, parent.get("logger"),
                            parent.get("logfile"))
    workers = WorkerPool(count, command, reactor, listeners, spool.lockDescriptor, owner,
                         scheduler, spool, runInThread, config=config)
    relay = RelayService(config, reactor, spool, pool, scheduler, workers, listeners,
                         [c for c in (owner, scheduler, resolver, courier, signer, masterPasswords,
                                      workers) if c is not None],
                         courier=courier, signer=signer)
    relay.workers = workers
    workers.metrics = metrics
    ControlService(config.queue.controlSocketPath, scheduler, reactor,
                   throttle=owner, reload=relay.reload, stall=_stallHook(workers),
                   ).setServiceParent(relay)
    if metrics is not None:
        _metricsPage(config, reactor, metrics, scheduler).setServiceParent(relay)
    # Read (and removed from the environment) before any worker is spawned,
    # so only the master speaks for the unit. READY=1 once every worker
    # accepts; WATCHDOG=1 only while every worker answers the heartbeat.
    relay.notify = notify.fromEnvironment(
        reactor, lambda: notify.statusLine(scheduler.queueLength(), owner.sessions.total),
        alive=workers.alive, accepting=workers.whenAccepting)
    workers.heartbeat = heartbeatInterval(relay.notify.watchdog)
    # Started last: after recovery, the listeners and the control socket.
    workers.setServiceParent(relay)
    relay.notify.setServiceParent(relay)
    listenerServices.extend(listeners)
    if reactor is _globalReactor():
        relay.stopSignals = stopSignals
    return relay


def makeWorker(config, reactor, link, listenerFds: list[int], number: int = 1):
    """
    An intake worker's service (relayd.worker) for the master's running
    ``config``, wired as the single process's intake is, with the
    master's limits through ``link`` (a relayd.worker.MasterLink).
    ``number`` is the worker's (1 to ``processes``).
    """
    from relayd.control import stallForTests
    from relayd.server import SubmissionFactory, _throttleSettings
    from relayd.worker import FirstAttempts, RemoteLimits, WorkerService

    raiseFileLimit(config)
    link.limits = RemoteLimits(link, reactor, config, _throttleSettings)

    spool = Spool(config.queue.directory, deliver=_fromThreads(reactor))
    pool, runInThread = _spoolThreads(reactor)
    resolver = ConfiguredResolver(reactor, config)
    boundListeners: list = []
    courier = _courier(config, reactor, boundListeners, resolver, runInThread)

    # A message's body pieces, its commit, the envelope written after its
    # first attempt and its removal, in order, in the spool threads.
    lanes = MessageLanes(runInThread)
    # With a metrics section, this worker's counts go to the master's page in batches.
    metrics = None
    if config.metrics is not None:
        from relayd.metrics import TimedTransport, UpdateBatch
        metrics = UpdateBatch(link.sendMetrics, reactor)

    commitInThread = _committer(lanes, metrics, reactor, pool)

    # The first attempt of what this worker commits, in slots the master
    # grants; the rest is handed to the master (relayd.worker).
    signer = _signer(config, runInThread, reactor)
    transport = TimedTransport(courier, metrics, reactor) if metrics is not None else courier
    scheduler = Scheduler(spool, transport, config, reactor, runInThread=runInThread,
                          lanes=lanes, signer=signer)
    attempts = FirstAttempts(link, scheduler, commitInThread)
    scheduler.handOff = attempts  # what it does not finish goes to the master
    # What is wrong in the password file is the master's to log, at start
    # and on reload.
    tls, passwords, verifier, authPool, credPortal = _security(config, reactor, warn=False)
    clientNames = ClientNames(resolver, config.limits.clientNameTimeout, reactor,
                              hostsFile=os.environ.get("RELAYD_HOSTS_FILE") or HOSTS_FILE)
    factory = SubmissionFactory(config, spool, attempts.commit, attempts.queued, reactor,
                                portal=credPortal, tls=tls, clientNames=clientNames.lookup,
                                runInThread=runInThread, limits=link.limits, lanes=lanes,
                                bodyKept=scheduler.keepBody)
    listenerFactories = [f for _, f in _listenerFactories(config, factory, tls, reactor)]
    reloadable = [factory, scheduler, tls, passwords, verifier,
                  credPortal.realm if credPortal is not None else None,
                  resolver, clientNames, courier, signer, link.limits]
    service = WorkerService(config, reactor, factory, listenerFactories, listenerFds, pool,
                            authPool, [c for c in reloadable if c is not None], readReload,
                            reloadConfig,
                            scheduler=scheduler, courier=courier, signer=signer,
                            boundListeners=boundListeners)
    link.sessionCount = lambda: len(factory.sessions)
    if os.environ.get("RELAYD_TEST_HOOKS") == "1":
        link.stall = stallForTests
    if metrics is not None:
        globalLogPublisher.addObserver(metrics.observer())
        service.metrics = metrics
    if passwords is not None:
        passwords.reports = False
        # An edit noticed without a reload (each worker notices it at its
        # next AUTH): worker 1 alone says what is wrong, as one process does.
        if number == 1:
            passwords.changed = lambda: reactor.callFromThread(
                lambda: warnPasswordFile(passwords, service.config.auth))
    return service


# Delivery: the courier's settings, password files and CA files ------------------


def _needsTLS(config) -> bool:
    return config.tls is not None and any(l.tls != "none" for l in config.listeners)


def _needsAuth(config) -> bool:
    return config.auth is not None and any(l.auth != "none" for l in config.listeners)


def startupProblems(config) -> list[str]:
    """
    Everything that would stop ``twistd relayd`` from starting with
    ``config`` when run as this process's user, in the daemon's order and
    words (without "relayd: "): every file the config names opened and
    read as the daemon reads it, and the spool checked. For ``relayd
    check-config``; changes nothing.
    """

    problems = [f"{config.path}: {p}" for p in deliverySecrets(config)[2]]
    if _needsTLS(config):
        try:
            ServerTLS.fromConfig(config.tls)
        except TLSSetupError as e:
            problems.append(str(e))
    if _needsAuth(config):
        try:
            PasswordFile(config.auth.passwordFile).load()
        except PasswordFileError as e:
            problems.append(f"auth.password_file {e}")
    problems.extend(keyProblems(config))
    problems.extend(f"queue.directory {p}" for p in spoolProblems(config.queue.directory))
    return problems


def _courier(config, reactor, listeners, resolver, runInThread):
    """The courier; ``listeners`` (filled in later) tell it relayd's own addresses."""

    passwords, _, problems = deliverySecrets(config)
    if problems:
        fail(f"{config.path}: {problems[0]}")

    def localAddresses():
        found = []
        for listener in listeners:
            host = listener.port.getHost() if listener.port is not None else None
            if host is not None and hasattr(host, "port"):
                found.append((host.host, host.port))
        return found

    # Bodies are read many to a thread job when several deliveries want one.
    return Courier(reactor, config.hostname, config.delivery.timeouts,
                   resolver=resolver, passwords=passwords,
                   localAddresses=localAddresses, runInThread=runInThread,
                   readInThread=ThreadBatches(runInThread, jobs=BODY_READ_JOBS).run)


def _security(config, reactor, warn: bool = True):
    """
    The TLS context and the AUTH machinery the listeners need; start-up
    errors end the start. ``warn``: log what is wrong in the password file.
    """

    tls = passwords = verifier = authPool = credPortal = None
    if _needsTLS(config):
        try:
            tls = ServerTLS.fromConfig(config.tls)
        except TLSSetupError as e:
            fail(str(e))
    if _needsAuth(config):
        passwords = PasswordFile(config.auth.passwordFile)
        try:
            passwords.load()
        except PasswordFileError as e:
            fail(f"auth.password_file {e}")
        if warn:
            warnPasswordFile(passwords, config.auth)
        verifier = Verifier(passwords, config.auth.cache)
        # bcrypt and argon2 release the GIL: one thread per core verifies in parallel.
        authPool = threadpool.ThreadPool(minthreads=0, maxthreads=min(4, os.cpu_count() or 1),
                                         name="relayd-auth")
        credPortal = Portal(Realm(config.auth),
                            [PasswordFileChecker(verifier, reactor, authPool)])
    return tls, passwords, verifier, authPool, credPortal
