"""
systemd's notifications from the real daemon, to a notify socket the test
binds as systemd would ($NOTIFY_SOCKET, $WATCHDOG_USEC): READY=1 only once
the port accepts, WATCHDOG=1 while the reactor runs and not while it is
blocked, RELOADING=1/READY=1 around ``relayctl reload`` (which reports the
outcome), STOPPING=1 on SIGTERM. Each with one process and with a master
and two intake workers, whose reactors the watchdog covers too.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests.integration.harness import (
    DELIVERY_DEADLINE,
    START_DEADLINE,
    Relayd,
    childEnvironment,
    freePort,
    makeMessage,
    portAcceptsConnections,
    twistdPath,
    waitUntil,
)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
# systemd's WatchdogSec= for the daemon: pings every half of it.
WATCHDOG_SECONDS = 1.0
# How long the test blocks the daemon's reactor: several watchdog periods.
STALL_SECONDS = 4.0


# A field only the test sends to its own notify socket (NotifySocket.caughtUp).
MARK = "X_RELAYD_TEST_MARK"


def sent(messages: list[tuple[float, dict[str, str]]], key: str,
         value: str | None = None) -> list[float]:
    """When each of ``messages`` with ``key`` (equal to ``value``, if given) arrived."""
    return [t for t, m in messages if key in m and (value is None or m[key] == value)]


class NotifySocket:
    """The datagram socket systemd listens on, with every message and when it arrived."""

    def __init__(self) -> None:
        # AF_UNIX paths are short (108 bytes): not under pytest's tmp_path.
        self.directory = tempfile.mkdtemp(prefix="relayd-notify-")
        self.path = os.path.join(self.directory, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._lock = threading.Lock()
        self._marks: dict[str, int] = {}  # marker sent by caughtUp() -> len(messages) when read
        self._done = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while not self._done.is_set():
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            with self._lock:
                if MARK in fields:
                    self._marks[fields[MARK]] = len(self.messages)
                else:
                    self.messages.append((time.monotonic(), fields))

    def received(self, key: str, value: str | None = None) -> list[float]:
        """When each message with ``key`` (equal to ``value``, if given) arrived."""
        with self._lock:
            return sent(self.messages, key, value)

    def waitFor(self, key: str, value: str | None = None, count: int = 1, describe=lambda: "") -> list[float]:
        return waitUntil(lambda: (lambda found: found if len(found) >= count else None)(
            self.received(key, value)), DELIVERY_DEADLINE,
            f"{count} notification(s) {key}={value or '...'}; got {self.messages}", describe)

    def caughtUp(self) -> list[tuple[float, dict[str, str]]]:
        """
        Every message sent before this call, once the reader has them.
        A datagram the daemon sent is queued on the socket when its send
        returns, but the reader thread may not have taken it yet: a marker
        sent now is queued behind it, so when the reader has the marker it
        has everything before it (and what is returned stops there).
        """
        mark = f"{id(self)}-{time.monotonic_ns()}"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
            sender.sendto(f"{MARK}={mark}\n".encode(), self.path)

        def read() -> list | None:
            with self._lock:
                count = self._marks.get(mark)
                return None if count is None else self.messages[:count]

        return waitUntil(read, DELIVERY_DEADLINE, "the notify socket's reader read the marker")

    def clear(self) -> None:
        """Forget every message sent so far (read or not yet)."""
        count = len(self.caughtUp())
        with self._lock:
            del self.messages[:count]
            self._marks.clear()  # counts of the list before this cut

    def close(self) -> None:
        self._done.set()
        self._reader.join(5)
        self.sock.close()
        shutil.rmtree(self.directory, ignore_errors=True)


class NotifiedRelayd(Relayd):
    """relayd started as systemd starts a Type=notify unit with WatchdogSec=."""

    def __init__(self, directory: Path, smarthostPort: int, notify: NotifySocket,
                 processCount: int = 1) -> None:
        self.notify = notify
        self.processCount = processCount
        super().__init__(directory, smarthostPort)

    def configText(self, smarthostPort, trustedNetworks=None, extra=""):
        return super().configText(smarthostPort, trustedNetworks,
                                  extra=extra + f"processes: {self.processCount}\n")

    def environment(self) -> dict[str, str]:
        env = super().environment()
        env["NOTIFY_SOCKET"] = self.notify.path
        env["WATCHDOG_USEC"] = str(int(WATCHDOG_SECONDS * 1e6))
        env["RELAYD_TEST_HOOKS"] = "1"  # the control command that blocks the reactor
        return env


@pytest.fixture
def notifySocket():
    s = NotifySocket()
    yield s
    s.close()


def relayctl(daemon: Relayd, *args: str) -> subprocess.CompletedProcess:
    script = twistdPath().parent / "relayctl"
    return subprocess.run([str(script), "-c", str(daemon.configPath), *args], capture_output=True,
                          text=True, timeout=120, env=childEnvironment(), cwd=daemon.directory)


def stallReactor(daemon: Relayd, seconds: float, worker: int | None = None) -> None:
    """
    Block the daemon's reactor thread for ``seconds`` (the test-only control
    command), or intake worker ``worker``'s; returns when it is free again.
    """
    from relayd import control
    from relayd.cli.relayctl import callDaemon

    arguments = {"seconds": seconds} if worker is None else {"seconds": seconds, "worker": worker}
    callDaemon(str(daemon.spool / "control.sock"), control.Stall, timeout=seconds + 30,
               **arguments)


def greets(port: int) -> bool:
    """Whether a connection gets relayd's 220 (a bound socket alone would take it and say nothing)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
            return sock.recv(4).startswith(b"220")
    except OSError:
        return False


processCounts = pytest.mark.parametrize("processCount", [1, 2])


@processCounts
def test_ready_only_once_the_port_accepts_and_the_queue_is_loaded(tmp_path, processes, twistd,
                                                                  notifySocket, processCount):
    """
    READY=1 arrives after the port accepts (with intake workers: after
    each of them accepts); its STATUS= counts the queue loaded from the
    spool (two messages left by a previous run).
    """
    daemon = NotifiedRelayd(tmp_path / "relayd", freePort(), notifySocket, processCount)
    processes.append(daemon)
    daemon.start()
    for i in range(2):
        daemon.submit(makeMessage(f"queued {i}", ["body"]))
    assert daemon.terminate() == 0
    notifySocket.clear()

    # Started by hand, probing the port from the first instant on until it
    # accepts. Each refused probe's start time is kept: a probe that starts
    # after READY=1 and is refused means READY=1 came before the port
    # accepted. Probing stops at the first accepted connection: the kernel
    # queues accepted probes until a worker takes them, and dozens of them
    # would each count against connections_per_client for a moment, so
    # that the greeting below could rightly get a 421.
    refused: list[float] = []
    since = daemon.logOffset()  # before the spawn: none of the new run's lines is left out
    with open(daemon.logPath, "ab") as log:
        daemon.process = subprocess.Popen(daemon.command(), cwd=daemon.directory, stdout=log,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          env=daemon.environment())
    deadline = time.monotonic() + START_DEADLINE
    while not notifySocket.received("READY") and time.monotonic() < deadline:
        assert daemon.process.poll() is None, daemon.describe()
        started = time.monotonic()
        if portAcceptsConnections(daemon.port):
            break
        refused.append(started)
        time.sleep(0.01)
    [ready] = notifySocket.waitFor("READY", "1", describe=daemon.describe)
    assert all(probe < ready for probe in refused), (refused, ready)
    if processCount > 1:
        # Each worker of this start says it accepts. It logs the line, then
        # tells the master, which sends READY=1 once every worker has told
        # it (tests/test_processes.py, test_the_daemon_is_ready_once_every_
        # worker_accepts); but a worker's log thread writes the line when
        # it gets to it, which may be a moment after READY=1 arrived here.
        for number in range(1, processCount + 1):
            daemon.waitForLog(rf"worker {number} accepting connections", since=since)
    assert greets(daemon.port)
    statuses = [m["STATUS"] for t, m in notifySocket.messages if "READY" in m]
    assert statuses and statuses[0].startswith("2 messages in queue"), notifySocket.messages


@pytest.mark.parametrize("processCount, blocked", [(1, None), (2, None), (2, 1)],
                         ids=["one process", "master of two workers", "worker 1 of two"])
def test_watchdog_pings_stop_while_a_reactor_is_blocked_and_stopping_on_sigterm(
        tmp_path, processes, twistd, notifySocket, processCount, blocked):
    daemon = NotifiedRelayd(tmp_path / "relayd", freePort(), notifySocket, processCount)
    processes.append(daemon)
    daemon.start()
    notifySocket.waitFor("READY", "1", describe=daemon.describe)
    notifySocket.waitFor("WATCHDOG", "1", count=3, describe=daemon.describe)

    stallReactor(daemon, STALL_SECONDS, worker=blocked)
    answered = time.monotonic()
    notifySocket.waitFor("WATCHDOG", "1", count=len(notifySocket.received("WATCHDOG")) + 2,
                         describe=daemon.describe)
    pings = notifySocket.received("WATCHDOG", "1")
    # Nothing pinged while the reactor slept: between two pings there is a
    # gap at least as long as the stall (less what the reader thread's own
    # scheduling may shift); pings every half second before and after it.
    gaps = [later - earlier for earlier, later in zip(pings, pings[1:])]
    assert max(gaps) >= STALL_SECONDS * 0.8, gaps
    assert [t for t in pings if t > answered]
    if blocked is not None:
        # Not killed: the stall was shorter than the master's hang limit.
        assert daemon.running and "killing it" not in daemon.log()

    assert daemon.terminate() == 0
    notifySocket.waitFor("STOPPING", "1", describe=daemon.describe)


@processCounts
def test_relayctl_reload_waits_and_reports_the_outcome(tmp_path, processes, twistd, notifySocket,
                                                       processCount):
    daemon = NotifiedRelayd(tmp_path / "relayd", freePort(), notifySocket, processCount)
    processes.append(daemon)
    daemon.start()
    notifySocket.waitFor("READY", "1", describe=daemon.describe)
    good = daemon.configPath.read_text()

    # Applied: RELOADING=1 then READY=1 were sent before relayctl returned
    # (those sent by then, whether or not the reader thread had read them).
    daemon.writeConfig(good + "limits: {recipients: 7}\n")
    result = relayctl(daemon, "reload")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"reload: configuration {daemon.configPath} applied\n"
    before = notifySocket.caughtUp()
    [reloading] = sent(before, "RELOADING", "1")
    assert [t for t in sent(before, "READY", "1") if t > reloading], before
    assert "MONOTONIC_USEC" in [m for t, m in before if "RELOADING" in m][0]

    # A file that does not load: refused with the key and why, the old config runs on.
    daemon.writeConfig(good + "limits: {recipients: many}\n")
    result = relayctl(daemon, "reload")
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == (f"relayctl: reload refused, relayd keeps its running configuration: "
                             f"{daemon.configPath}: limits.recipients: expected a whole number of at "
                             "least 1, got \"many\"\n"), result.stderr

    # A file that loads but that the daemon refuses (more connections than
    # its file limit holds): the daemon's answer, logged there too.
    daemon.writeConfig(good + "limits: {connections: 100000000}\n")
    result = relayctl(daemon, "reload")
    assert result.returncode == 1, result.stdout
    assert result.stderr.startswith("relayctl: reload failed, keeping the running configuration: ")
    assert "raise LimitNOFILE=" in result.stderr and result.stderr.count("\n") == 1
    daemon.waitForLog(r"reload failed, keeping the running configuration: .*limits\.connections")
    assert len(sent(notifySocket.caughtUp(), "RELOADING", "1")) == 2, notifySocket.messages
    daemon.submit(makeMessage("still running", ["body"]))
