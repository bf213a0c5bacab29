"""
``twistd relayd --config FILE``: the options and makeService, the only place
that wires relayd's objects together.

Start order: thread pool, spool recovery, scheduler, then the listeners
last. Stop order (SIGTERM) is the reverse and sequential: listeners stop
accepting, open sessions get 421 4.3.2 (or finish the message in flight)
within ``shutdown_grace``, deliveries in flight get the same grace, then
the thread pool stops. SIGHUP re-reads the config (twistd's default would
kill the process without stopping anything, TWISTED-NOTES §6).
"""

from __future__ import annotations

import signal
import sys

from twisted.application import service
from twisted.internet import defer, endpoints
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python import threadpool, usage
from twisted.python.failure import Failure

from relayd import config as configModule
from relayd import maillog

log = Logger()

# Fields that only take effect at start-up; a reload that changes them says so.
_RESTART_ONLY = ("listeners", "queue.directory")


def fail(message: str) -> "NoReturn":  # noqa: F821
    """One line on stderr and a non-zero exit: twistd itself exits 0 after usage errors."""
    sys.stderr.write(f"relayd: {message}\n")
    sys.stderr.flush()
    raise SystemExit(1)


class Options(usage.Options):
    synopsis = "--config FILE"
    longdesc = "relayd: an authenticated SMTP submission relay with a durable queue."
    optParameters = [["config", "c", None, "The relayd YAML configuration file (required)."]]

    def postOptions(self) -> None:
        path = self["config"]
        if not path:
            fail("--config FILE is required (see etc/relayd.yaml for an example)")
        try:
            self["loaded"] = configModule.load(path)
        except configModule.ConfigError as e:
            fail(str(e))


class Listener(service.Service):
    """
    One listening endpoint. Unlike StreamServerEndpointService, a port that
    cannot be bound stops the start-up with one line, instead of a daemon
    running on without it.
    """

    def __init__(self, description: str, factory, reactor):
        self.description = description
        self.factory = factory
        self.reactor = reactor
        self.port = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        endpoint = endpoints.serverFromString(self.reactor, self.description)
        result: list = []
        endpoint.listen(self.factory).addBoth(result.append)
        if not result:
            fail(f"listener {self.description}: did not start listening at once")
        outcome = result[0]
        if isinstance(outcome, Failure):
            fail(f"cannot listen on {self.description}: {outcome.getErrorMessage()}")
        self.port = outcome
        host = outcome.getHost()
        maillog.daemonEvent(f"listening on {self.description} ({getattr(host, 'host', host)}:{getattr(host, 'port', '')})")

    def startService(self) -> None:
        if self.port is None:
            self.privilegedStartService()
        super().startService()

    def stopService(self):
        super().stopService()
        port, self.port = self.port, None
        if port is not None:
            return defer.maybeDeferred(port.stopListening)


class Relay(service.MultiService):
    """
    The whole daemon. Children start in order; stopService is sequential
    in reverse (MultiService would stop them all at once).
    """

    def __init__(self, config, reactor, spool, pool, scheduler, factory, listeners):
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.spool = spool
        self.pool = pool
        self.scheduler = scheduler
        self.factory = factory
        self.listeners = listeners
        self.scheduler.setServiceParent(self)
        for listener in listeners:
            listener.setServiceParent(self)
        self._previousHup = None

    def startService(self) -> None:
        self.pool.start()
        try:
            self.spool.lock()
        except BlockingIOError:
            fail(f"queue.directory {self.config.queue.directory} is in use by another relayd")
        except OSError as e:
            fail(f"queue.directory {self.config.queue.directory}: {e.strerror}")
        try:
            recovered = self.spool.recover()
        except OSError as e:
            fail(f"queue.directory {self.config.queue.directory}: {e.strerror}")
        for envelope in recovered:
            self.scheduler.add(envelope)
        super().startService()
        maillog.daemonEvent(
            f"daemon started -- version {__import__('relayd').__version__}, "
            f"configuration {self.config.path}, {self.scheduler.queueLength()} messages in queue")
        if self.reactor is _globalReactor():
            self._previousHup = signal.signal(signal.SIGHUP, self._sighup)
            # After the reactor's own handlers are in place: twistd re-raises
            # the signal that stopped the reactor, so a clean SIGTERM stop
            # would exit with -15. relayd stops the reactor itself and exits 0.
            self.reactor.callWhenRunning(signal.signal, signal.SIGTERM, self._sigterm)

    def _sighup(self, signum, frame) -> None:
        self.reactor.callFromThread(self.reload)

    def _sigterm(self, signum, frame) -> None:
        maillog.daemonEvent("received SIGTERM, shutting down")
        self.reactor.callFromThread(self.reactor.stop)

    def reload(self) -> None:
        """Re-read the config; apply what can change live; keep the old one on error."""
        try:
            new = configModule.load(self.config.path)
        except configModule.ConfigError as e:
            maillog.daemonEvent(f"reload failed, keeping the running configuration: {e}",
                                level=maillog.LogLevel.error)
            return
        needRestart = [name for name, old, cur in (
            ("listeners", self.config.listeners, new.listeners),
            ("queue.directory", self.config.queue.directory, new.queue.directory),
        ) if old != cur]
        self.config = new
        self.factory.config = new
        self.scheduler.reconfigure(new)
        note = f"; {', '.join(needRestart)} changed and need a restart" if needRestart else ""
        maillog.daemonEvent(f"reload: configuration {new.path} applied{note}")

    @defer.inlineCallbacks
    def stopService(self):
        if self._previousHup is not None:
            signal.signal(signal.SIGHUP, self._previousHup)
        self.running = False
        grace = self.config.shutdownGrace
        maillog.daemonEvent("stopping: no new connections, finishing sessions and deliveries")
        yield defer.DeferredList([defer.maybeDeferred(l.stopService) for l in self.listeners],
                                 consumeErrors=True)
        yield self.factory.shutdown(grace)
        yield self.scheduler.stopService(grace)
        self.pool.stop()
        maillog.daemonEvent("daemon stopped")


def _globalReactor():
    from twisted.internet import reactor

    return reactor


def makeService(options, reactor=None) -> Relay:
    if reactor is None:
        reactor = _globalReactor()
    # Imported here, not at module level: twistd imports every plugin
    # whenever it scans them, before a reactor is chosen.
    from relayd.courier import Courier
    from relayd.queue import Spool
    from relayd.scheduler import Scheduler
    from relayd.server import SubmissionFactory

    config = options["loaded"]
    spool = Spool(config.queue.directory)
    pool = threadpool.ThreadPool(minthreads=1, maxthreads=4, name="relayd-spool")
    courier = Courier(reactor, config.hostname)
    scheduler = Scheduler(spool, courier.deliver, config, reactor)

    def commit(writer, envelope):
        # fsync never runs on the reactor thread.
        return deferToThreadPool(reactor, pool, writer.commit, envelope)

    factory = SubmissionFactory(config, spool, commit, scheduler.add, reactor)
    listeners = [Listener(l.endpoint, factory, reactor) for l in config.listeners]
    return Relay(config, reactor, spool, pool, scheduler, factory, listeners)
