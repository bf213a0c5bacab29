"""
systemd's service notifications (sd_notify): READY, STATUS, RELOADING,
STOPPING and the watchdog's WATCHDOG=1.

The protocol is one datagram of ``KEY=value`` lines on the AF_UNIX socket
named by ``$NOTIFY_SOCKET`` (a leading ``@`` is the abstract namespace),
a few lines of code: no library is needed for it. The socket is connected
once at start, then every message is one non-blocking send from the
reactor thread; a message systemd cannot take at once is dropped, never
waited for (the next status or watchdog tick sends again).

The watchdog pings only while every reactor is alive: each one records a
heartbeat (``Heartbeats.beat``) and WATCHDOG=1 goes out at half of
``WatchdogSec=`` only when every heartbeat is recent. Today the one reactor
is this process's, whose tick both beats and pings, so a reactor that is
blocked (a hung file system, a runaway loop) stops the pings and systemd
restarts the daemon. With intake workers, ``alive(within)`` also asks
whether every worker's reactor answered the master's heartbeat within
``WatchdogSec=``: a blocked worker stops the pings too.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Callable, Mapping

from twisted.application import service
from twisted.internet import defer, task

from relayd import maillog

# How often STATUS= is refreshed (sent when it changed).
STATUS_INTERVAL = 5.0
# The name of this process's reactor among the heartbeats.
THIS_REACTOR = "main"
# What systemd tells the process it started: only that process speaks for
# the service, so relayd takes them out of the environment that processes
# it starts would inherit.
ENVIRONMENT = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def notifyAddress(environ: Mapping[str, str]) -> str | bytes | None:
    """The address of ``$NOTIFY_SOCKET`` to send to, or None when systemd is not listening."""
    path = environ.get("NOTIFY_SOCKET") or None
    if path is None:
        return None
    if path.startswith("@"):
        return b"\0" + path[1:].encode()
    if not path.startswith("/"):
        return None  # vsock and other forms: not for a service on this host
    return path


def watchdogInterval(environ: Mapping[str, str], pid: int) -> float | None:
    """
    Seconds of ``WatchdogSec=`` from ``$WATCHDOG_USEC``, or None when there is
    no watchdog for this process (unset, not a positive number, or
    ``$WATCHDOG_PID`` names another process).
    """
    owner = environ.get("WATCHDOG_PID")
    if owner and owner.strip() != str(pid):
        return None
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 1e6 if usec > 0 else None


def statusLine(messages: int, connections: int) -> str:
    """What ``systemctl status`` shows: ``3 messages in queue, 1 connection``."""
    return (f"{messages} message{'' if messages == 1 else 's'} in queue, "
            f"{connections} connection{'' if connections == 1 else 's'}")


class Notifier:
    """Sends notifications to systemd; does nothing when the service was not started by it."""

    def __init__(self, address: str | bytes | None) -> None:
        self.address = address
        self._socket: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    def open(self) -> None:
        if self.address is None or self._socket is not None:
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.connect(self.address)
        except OSError as e:
            sock.close()
            maillog.daemonEvent(f"cannot notify systemd on $NOTIFY_SOCKET: {e.strerror or e}",
                                level=maillog.LogLevel.warn)
            return
        sock.setblocking(False)
        self._socket = sock

    def send(self, *lines: str) -> bool:
        """One notification of ``KEY=value`` lines; whether it went out."""
        if self._socket is None:
            return False
        try:
            self._socket.send("\n".join(lines).encode("utf-8", "replace"))
        except OSError:
            # Full (BlockingIOError) or gone: dropped; the next tick sends again.
            return False
        return True

    def close(self) -> None:
        sock, self._socket = self._socket, None
        if sock is not None:
            sock.close()


class Heartbeats:
    """When each reactor last showed it runs: the watchdog pings only while all of them do."""

    def __init__(self, clock) -> None:
        self.clock = clock
        self.last: dict[str, float] = {}

    def beat(self, name: str) -> None:
        self.last[name] = self.clock.seconds()

    def forget(self, name: str) -> None:
        self.last.pop(name, None)

    def stale(self, within: float) -> list[str]:
        """The reactors whose last beat is older than ``within`` seconds."""
        now = self.clock.seconds()
        return sorted(name for name, at in self.last.items() if now - at > within)


class NotifyService(service.Service):
    """
    The notifications over the daemon's life. ``ready()`` once the
    listeners accept and the queue is loaded; ``status()`` says what STATUS=
    shows; ``reloading``/``reloaded`` around a reload; ``stopping()`` when the
    stop begins.
    """

    name = "notify"

    def __init__(self, notifier: Notifier, clock, status: Callable[[], str],
                 watchdog: float | None = None, heartbeats: Heartbeats | None = None,
                 monotonic: Callable[[], float] = time.monotonic,
                 alive: Callable[[float], bool] = lambda within: True,
                 accepting: Callable[[], defer.Deferred] | None = None) -> None:
        self.notifier = notifier
        self.clock = clock
        self.status = status
        self.watchdog = watchdog
        self.heartbeats = heartbeats if heartbeats is not None else Heartbeats(clock)
        self.monotonic = monotonic
        # With intake workers: whether each answered the master's pings
        # within so many seconds (relayd.master.WorkerPool.alive), and a
        # Deferred that fires once each accepts (WorkerPool.whenAccepting).
        self.alive = alive
        self.accepting = accepting
        self._ticks: list[task.LoopingCall] = []
        self._lastStatus: str | None = None
        self._isReady = False
        self._stopping = False

    def startService(self) -> None:
        super().startService()
        self.notifier.open()
        if self.accepting is not None:
            # The master holds the sockets; its workers accept on them.
            self.accepting().addCallback(lambda _: self.ready())
            return
        # The first thing the running reactor does: the listeners started
        # before this service, and the queue was loaded before them.
        self.clock.callLater(0, self.ready)

    def ready(self) -> None:
        """READY=1 (with the first STATUS=), then the ticks: status and watchdog."""
        if not self.running or self._isReady:
            return
        self._isReady = True
        self._lastStatus = self.status()
        self.notifier.send("READY=1", f"STATUS={self._lastStatus}")
        if not self.notifier.enabled:
            return
        ticks = [(self.statusTick, STATUS_INTERVAL)]
        if self.watchdog is not None:
            ticks.append((self.watchdogTick, self.watchdog / 2))
        for call, interval in ticks:
            tick = task.LoopingCall(call)
            tick.clock = self.clock
            tick.start(interval, now=False)
            self._ticks.append(tick)

    def watchdogTick(self) -> None:
        """
        Runs on the reactor, so it runs at all only while the reactor does:
        this reactor's heartbeat, then WATCHDOG=1 if every reactor beat
        within WatchdogSec and every intake worker's reactor answers.
        """
        self.heartbeats.beat(THIS_REACTOR)
        if not self.heartbeats.stale(self.watchdog) and self.alive(self.watchdog):
            self.notifier.send("WATCHDOG=1")

    def statusTick(self) -> None:
        if self._stopping:
            return  # STATUS= says "stopping" until the end
        text = self.status()
        if text != self._lastStatus:
            self._lastStatus = text
            self.notifier.send(f"STATUS={text}")

    def reloading(self) -> None:
        self.notifier.send("RELOADING=1", f"MONOTONIC_USEC={int(self.monotonic() * 1e6)}",
                           "STATUS=reloading the configuration")

    def reloaded(self) -> None:
        self._lastStatus = self.status()
        self.notifier.send("READY=1", f"STATUS={self._lastStatus}")

    def stopping(self) -> None:
        """STOPPING=1; the watchdog pings go on while sessions and deliveries finish."""
        if self._stopping:
            return
        self._stopping = True
        self.notifier.send("STOPPING=1", "STATUS=stopping: finishing sessions and deliveries")

    def _stopTicks(self) -> None:
        ticks, self._ticks = self._ticks, []
        for tick in ticks:
            if tick.running:
                tick.stop()

    def stopService(self) -> None:
        super().stopService()
        self._stopTicks()
        self.notifier.close()


def fromEnvironment(clock, status: Callable[[], str], environ: dict[str, str] = os.environ,
                    pid: int | None = None, alive: Callable[[float], bool] = lambda within: True,
                    accepting: Callable[[], defer.Deferred] | None = None) -> NotifyService:
    """The NotifyService for the environment systemd gave this process, which it then forgets."""
    made = NotifyService(Notifier(notifyAddress(environ)), clock, status,
                         watchdog=watchdogInterval(environ, os.getpid() if pid is None else pid),
                         alive=alive, accepting=accepting)
    for name in ENVIRONMENT:
        environ.pop(name, None)
    return made
