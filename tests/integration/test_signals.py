"""
Signals an admin (or systemd) sends: SIGHUP reloads the config without
dropping service, and a broken config on reload keeps the old one; SIGTERM
stops cleanly and tells clients in a transaction to come back later.
"""

from __future__ import annotations

import re
import signal
import socket
import time

import pytest

from tests.integration.harness import (
    HOST,
    STOP_DEADLINE,
    SMTP_TIMEOUT,
    exitStatusHint,
    freePort,
    makeMessage,
)

pytestmark = pytest.mark.integration


def test_sighup_keeps_serving_and_survives_a_broken_config(sink, startRelayd):
    daemon = startRelayd(sink.port)

    before = daemon.logOffset()
    daemon.signal(signal.SIGHUP)
    line = daemon.waitForLog(r"^.*reload.*$", since=before, flags=re.IGNORECASE).group(0)
    assert not re.search(r"error|fail", line, re.IGNORECASE), f"reload of a valid config: {line!r}"
    assert daemon.running, daemon.describe()
    daemon.submit(makeMessage("after a reload", ["still here"]))
    sink.waitForMessages(1, daemon.describe)

    # A broken config: an unknown key, and a smarthost where nothing listens.
    # If relayd applied any of it, the next message could not reach the sink.
    configPath = str(daemon.configPath)
    daemon.writeConfig(
        daemon.configText(freePort()) + "no_such_key: 1\n")
    before = daemon.logOffset()
    daemon.signal(signal.SIGHUP)
    line = daemon.waitForLog(rf"^.*{re.escape(configPath)}.*$", since=before).group(0)
    assert "no_such_key" in line, f"the error must name the offending key: {line!r}"
    assert daemon.running, daemon.describe()

    qid = daemon.submit(makeMessage("after a failed reload", ["old config still in force"]))
    sink.waitForMessages(2, daemon.describe)
    daemon.waitForLog(rf"\b{qid}: removed\b", since=before)
    naming = [l for l in daemon.log(before).splitlines() if configPath in l]
    assert len(naming) == 1, "one error line naming the file, got:\n" + "\n".join(naming)
    assert daemon.running, daemon.describe()


class RawClient:
    """A client on a bare socket, to see exactly what the server sends and when it closes."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=SMTP_TIMEOUT)
        self.buffer = b""

    def reply(self) -> bytes:
        """One complete (possibly multi-line) reply."""
        lines = []
        while True:
            while b"\r\n" not in self.buffer:
                chunk = self.sock.recv(4096)
                assert chunk, f"connection closed; got {lines!r} {self.buffer!r}"
                self.buffer += chunk
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            lines.append(line + b"\r\n")
            if line[3:4] != b"-":
                return b"".join(lines)

    def send(self, command: bytes) -> bytes:
        self.sock.sendall(command + b"\r\n")
        return self.reply()

    def readUntilClosed(self, deadline: float) -> bytes:
        """Everything the server sends until it closes the connection."""
        self.sock.settimeout(1.0)
        data, self.buffer = self.buffer, b""
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            try:
                chunk = self.sock.recv(4096)
            except socket.timeout:
                continue
            if not chunk:
                return data
            data += chunk
        raise AssertionError(f"connection still open {deadline:g} s after SIGTERM; received {data!r}")

    def close(self) -> None:
        self.sock.close()


def test_sigterm_closes_open_transactions_with_421_and_exits_0(sink, startRelayd):
    daemon = startRelayd(sink.port)

    client = RawClient(daemon.port)
    try:
        assert client.reply().startswith(b"220 ")
        assert client.send(b"EHLO client.test").startswith(b"250")
        assert client.send(b"MAIL FROM:<alice@client.test>").startswith(b"250 ")

        daemon.signal(signal.SIGTERM)
        rest = client.readUntilClosed(STOP_DEADLINE)
    finally:
        client.close()
    assert rest.startswith(b"421 4.3.2 "), (
        f"a client in a transaction must get 421 4.3.2 before the close; got {rest!r}"
        f"\n{daemon.describe()}")

    code = daemon.waitForExit()
    assert code == 0, f"after SIGTERM: {exitStatusHint(code)}\n{daemon.describe()}"


# Start-up: a signal at any moment of it stops the daemon cleanly. Each point
# is the log line after which the signal is sent (polled closely, so it lands
# in the start-up step that follows the line).
STARTUP_POINTS = (
    "starting up.",               # twistd: options parsed, config loaded, service made
    "reactor class:",             # before the listeners are bound
    "listening on tcp:",          # listeners bound, spool not yet recovered
    "control socket listening",   # services started, reactor not yet running
    "daemon started",             # just before the reactor runs
)


def startAndSignal(daemon, marker: str, signum: int) -> tuple[int, str]:
    """Start ``daemon``, send ``signum`` as soon as ``marker`` is logged; (exit status, log)."""
    offset = daemon.logOffset()
    startAndSignalOnly(daemon, marker, signum)
    code = daemon.waitForExit()
    return code, daemon.log(offset)


def startAndSignalOnly(daemon, marker: str, signum: int) -> None:
    """Start ``daemon`` and send ``signum`` as soon as ``marker`` is logged."""
    import subprocess

    from tests.integration.harness import childEnvironment

    offset = daemon.logOffset()
    with open(daemon.logPath, "ab") as log:
        daemon.process = subprocess.Popen(
            daemon.command(), cwd=daemon.directory, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, env=childEnvironment())

    def markerSeen():
        if daemon.process.poll() is not None:
            return "exited"
        return marker in daemon.log(offset) or None

    end = time.monotonic() + 20
    while markerSeen() is None:  # a close poll: the signal must land inside start-up
        assert time.monotonic() < end, f"no {marker!r} in the log\n{daemon.describe()}"
        time.sleep(0.002)
    assert daemon.process.poll() is None, f"relayd exited before {marker!r}\n{daemon.describe()}"
    daemon.process.send_signal(signum)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_at_any_moment_of_start_up_stops_the_daemon_cleanly(
        signum, tmp_path, processes, twistd):
    from tests.integration.harness import Relayd, portAcceptsConnections

    daemon = Relayd(tmp_path / "relayd", freePort())
    processes.append(daemon)
    for marker in STARTUP_POINTS:
        code, log = startAndSignal(daemon, marker, signum)
        assert code == 0, (f"{signal.Signals(signum).name} after {marker!r}: "
                           f"{exitStatusHint(code)}\n{daemon.describe()}")
        assert "Traceback" not in log and "KeyboardInterrupt" not in log, (
            f"{signal.Signals(signum).name} after {marker!r}: a traceback\n{log}")
        assert not portAcceptsConnections(daemon.port), f"port still open after {marker!r}"
        assert not (daemon.spool / "control.sock").exists(), (
            f"control socket left behind after {marker!r}")


def test_sighup_during_start_up_reloads_once_started_instead_of_killing(tmp_path, processes, twistd):
    """systemctl reload right after start (Type=simple: the unit is active at once)."""
    from tests.integration.harness import Relayd, waitUntil

    daemon = Relayd(tmp_path / "relayd", freePort())
    processes.append(daemon)
    for marker in STARTUP_POINTS:
        offset = daemon.logOffset()
        startAndSignalOnly(daemon, marker, signal.SIGHUP)
        waitUntil(lambda: daemon.process.poll() is not None or "reload: configuration" in daemon.log(offset),
                  20, f"no reload after SIGHUP after {marker!r}", daemon.describe)
        assert daemon.process.poll() is None, (
            f"SIGHUP after {marker!r} ended the daemon: {exitStatusHint(daemon.process.returncode)}"
            f"\n{daemon.describe()}")
        assert "daemon started" in daemon.log(offset)
        code = daemon.terminate()
        assert code == 0, f"{exitStatusHint(code)}\n{daemon.describe()}"
        assert "Traceback" not in daemon.log(offset), daemon.describe()
