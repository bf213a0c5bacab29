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

import os
import dataclasses
import resource
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



def fail(message: str) -> "NoReturn":  # noqa: F821
    """One line on stderr and a non-zero exit: twistd itself exits 0 after usage errors."""
    sys.stderr.write(f"relayd: {message}\n")
    sys.stderr.flush()
    raise SystemExit(1)


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

    def __init__(self, config, reactor, spool, pool, scheduler, factory, listeners,
                 tls=None, passwords=None, verifier=None, authPool=None):
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.spool = spool
        self.pool = pool
        self.scheduler = scheduler
        self.factory = factory
        self.listeners = listeners
        # Submission security: the reloadable TLS context, the password
        # file and its verifier, and the threads that verify passwords
        # (a pool of their own, so DNS lookups never wait behind bcrypt).
        self.tls = tls
        self.passwords = passwords
        self.verifier = verifier
        self.authPool = authPool
        self.scheduler.setServiceParent(self)
        for listener in listeners:
            listener.setServiceParent(self)
        self._previousHup = None

    def startService(self) -> None:
        self.pool.start()
        if self.authPool is not None:
            self.authPool.start()
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
        self.scheduler.reportQuarantine(getattr(self.spool, "quarantined", []))
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
        old = self.config
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft != resource.RLIM_INFINITY and _filesNeeded(new) > soft:
            maillog.daemonEvent(
                f"reload failed, keeping the running configuration: {_fileLimitProblem(new, soft)}",
                level=maillog.LogLevel.error)
            return
        needRestart = [name for name, before, after in (
            ("listeners", old.listeners, new.listeners),
            ("queue.directory", old.queue.directory, new.queue.directory),
            ("queue.control_socket", old.queue.controlSocketPath, new.queue.controlSocketPath),
        ) if before != after]
        # What only a restart applies stays as running, so the next reload
        # still reports it and nothing reads a spool the daemon does not use.
        new = dataclasses.replace(new, listeners=old.listeners, queue=dataclasses.replace(
            new.queue, directory=old.queue.directory, controlSocket=old.queue.controlSocket))
        self.config = new
        self.factory.reconfigure(new)
        self.scheduler.reconfigure(new)
        self._reloadSecurity(new)
        if getattr(self, "courier", None) is not None:
            _reloadDelivery(self.courier, new, self.reactor)
        note = f"; {', '.join(needRestart)} changed and need a restart" if needRestart else ""
        maillog.daemonEvent(f"reload: configuration {new.path} applied{note}")

    def _reloadSecurity(self, new) -> None:
        """New certificate and password file; a broken one keeps the running one (one error line)."""
        from relayd.auth import PasswordFileError
        from relayd.tls import TLSSetupError

        if self.tls is not None and new.tls is not None:
            try:
                self.tls.reload(new.tls)
            except TLSSetupError as e:
                maillog.daemonEvent(f"reload: keeping the running TLS certificate: {e}",
                                    level=maillog.LogLevel.error)
        if self.passwords is not None and new.auth is not None:
            self.passwords.path = new.auth.passwordFile
            try:
                self.passwords.load()
            except PasswordFileError as e:
                maillog.daemonEvent(f"reload: auth.password_file {e}", level=maillog.LogLevel.error)
            else:
                _warnSkipped(self.passwords)
            self.verifier.cacheSeconds = new.auth.cache
            self.verifier.clearCache()

    @defer.inlineCallbacks
    def stopService(self):
        if self._previousHup is not None:
            signal.signal(signal.SIGHUP, self._previousHup)
        self.running = False
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
        if getattr(self, "courier", None) is not None:  # idle upstream connections: QUIT
            yield self.courier.closeIdle()
        self.pool.stop()
        if self.authPool is not None:
            self.authPool.stop()
        maillog.daemonEvent("daemon stopped")


def _globalReactor():
    from twisted.internet import reactor

    return reactor


def makeService(options, reactor=None) -> Relay:
    if reactor is None:
        reactor = _globalReactor()
    # Imported here, not at module level: twistd imports every plugin
    # whenever it scans them, before a reactor is chosen.
    from relayd.queue import Spool
    from relayd.scheduler import Scheduler
    from relayd.server import SubmissionFactory

    config = options["loaded"]
    raiseFileLimit(config)
    spool = Spool(config.queue.directory)
    pool = threadpool.ThreadPool(minthreads=1, maxthreads=4, name="relayd-spool")
    listenerServices: list = []
    courier = _courier(config, reactor, listenerServices)

    def runInThread(f, *args):
        # Every file system call of the spool (create, fsync, rename,
        # unlink) waits for the disk: never on the reactor thread.
        return deferToThreadPool(reactor, pool, f, *args)

    # Notices (bounces) are written and fsynced in the spool's threads too.
    scheduler = Scheduler(spool, courier.deliver, config, reactor, runInThread=runInThread)

    def commit(writer, envelope):
        # fsync never runs on the reactor thread.
        return deferToThreadPool(reactor, pool, writer.commit, envelope)

    tls, passwords, verifier, authPool, credPortal = _security(config, reactor)
    factory = SubmissionFactory(config, spool, commit, scheduler.add, reactor,
                                portal=credPortal, tls=tls, runInThread=runInThread)
    if credPortal is not None:
        # auth.senders as of the last reload, not as of the start.
        credPortal.realm.sendersFor = lambda login: (
            factory.config.auth.sendersFor(login) if factory.config.auth is not None else None)
    listeners = []
    for l in config.listeners:
        listenerFactory = factory.forListener(l)
        if l.tls == "implicit":
            from relayd.tls import wrapImplicit

            listenerFactory = wrapImplicit(tls, listenerFactory)
        listeners.append(Listener(l.endpoint, listenerFactory, reactor))
    relay = Relay(config, reactor, spool, pool, scheduler, factory, listeners,
                  tls=tls, passwords=passwords, verifier=verifier, authPool=authPool)
    # relayctl's channel; a child service, so it starts after the spool lock.
    from relayd.control import ControlService

    ControlService(config.queue.controlSocketPath, scheduler, reactor).setServiceParent(relay)
    listenerServices.extend(listeners)
    relay.courier = courier
    return relay


# Delivery: the courier's settings, password files and CA files ------------------


def _deliverySecrets(config) -> tuple[dict, set[str], list[str]]:
    """
    Every delivery password_file read (path -> Secret), the ca_files that
    cannot be loaded, and the problems as "key path: reason" (the reason
    names the file, never its content).
    """
    from relayd.courier import loadTrustRoot, readPassword

    passwords, brokenCaFiles, problems = {}, set(), []
    for keyPath, path in config.delivery.passwordFiles():
        try:
            passwords[path] = readPassword(path)
        except OSError as e:
            problems.append(f"{keyPath}: cannot read {path}: {e.strerror or e}")
        except (ValueError, UnicodeDecodeError) as e:
            problems.append(f"{keyPath}: {path}: {'not UTF-8' if isinstance(e, UnicodeDecodeError) else 'the file is empty'}")
    hops = list(config.delivery.smarthosts) + [
        h for hops in config.delivery.routes.values() for h in hops]
    for caFile in sorted({h.caFile for h in hops if h.caFile}):
        try:
            loadTrustRoot(caFile)
        except Exception as e:  # OSError, or any complaint about the PEM content
            brokenCaFiles.add(caFile)
            problems.append(f"ca_file {caFile}: {getattr(e, 'strerror', None) or e}")
    return passwords, brokenCaFiles, problems


def _resolver(config, reactor):
    from relayd.resolve import makeResolver

    return makeResolver(reactor, config.delivery.dns.servers, config.delivery.dns.timeout)


def _courier(config, reactor, listeners):
    """The courier; ``listeners`` (filled in later) tell it relayd's own addresses."""
    from relayd.courier import Courier

    passwords, _, problems = _deliverySecrets(config)
    if problems:
        fail(f"{config.path}: {problems[0]}")

    def localAddresses():
        found = []
        for listener in listeners:
            host = listener.port.getHost() if listener.port is not None else None
            if host is not None and hasattr(host, "port"):
                found.append((host.host, host.port))
        return found

    return Courier(reactor, config.hostname, config.delivery.timeouts,
                   resolver=_resolver(config, reactor), passwords=passwords,
                   localAddresses=localAddresses)


def _reloadDelivery(courier, new, reactor) -> None:
    """
    New HELO name, timeouts, resolver and passwords; a password file or
    ca_file that cannot be read keeps what was loaded before.
    """
    passwords, brokenCaFiles, problems = _deliverySecrets(new)
    for problem in problems:
        maillog.daemonEvent(f"reload: {problem}; keeping what was loaded before",
                            level=maillog.LogLevel.error)
    courier.heloName = new.hostname
    courier.reconfigure(new.delivery.timeouts, {**courier.passwords, **passwords},
                        _resolver(new, reactor), keepCaFiles=brokenCaFiles)


def _warnSkipped(passwords) -> None:
    """A line of the password file that is not login:hash is a typo worth one warning."""
    from relayd.auth import skippedLines

    if passwords.skipped:
        maillog.daemonEvent(f"warning: auth.password_file {passwords.path}: {skippedLines(passwords.skipped)}",
                            level=maillog.LogLevel.warn)


def _security(config, reactor):
    """The TLS context and the AUTH machinery the listeners need; start-up errors end the start."""
    from twisted.cred.portal import Portal

    from relayd.auth import PasswordFile, PasswordFileChecker, PasswordFileError, Realm, Verifier
    from relayd.tls import ServerTLS, TLSSetupError

    tls = passwords = verifier = authPool = credPortal = None
    if config.tls is not None and any(l.tls != "none" for l in config.listeners):
        try:
            tls = ServerTLS.fromConfig(config.tls)
        except TLSSetupError as e:
            fail(str(e))
    if config.auth is not None and any(l.auth != "none" for l in config.listeners):
        passwords = PasswordFile(config.auth.passwordFile)
        try:
            passwords.load()
        except PasswordFileError as e:
            fail(f"auth.password_file {e}")
        _warnSkipped(passwords)
        verifier = Verifier(passwords, config.auth.cache)
        # bcrypt and argon2 release the GIL: one thread per core verifies in parallel.
        authPool = threadpool.ThreadPool(minthreads=0, maxthreads=min(4, os.cpu_count() or 1),
                                         name="relayd-auth")
        credPortal = Portal(Realm(config.auth.sendersFor),
                            [PasswordFileChecker(verifier, reactor, authPool)])
    return tls, passwords, verifier, authPool, credPortal
