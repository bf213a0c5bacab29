"""
Hostile clients against the running daemon: connections refused on the
implicit-TLS port that never handshake, clients that pipeline commands and
never read a reply (plaintext and TLS), AUTH guesses on many connections at
once, and the AUTH block seen and lifted with relayctl.

Every wait has a deadline (harness.DELIVERY_DEADLINE); none is a timing
threshold: each only turns a hang into a failure.
"""

from __future__ import annotations

import base64
import re
import socket
import ssl
import time

import pytest

from tests.integration.harness import DELIVERY_DEADLINE, HOST, SMTP_TIMEOUT, waitUntil
from tests.integration.test_relayctl import relayctl
from tests.integration.test_submission_security import PASSWORD, USER, SecureRelayd

pytestmark = pytest.mark.integration

THROTTLED = b"421 4.7.0 relay.test.example Error: too many failed authentications; try again later"


class HostileRelayd(SecureRelayd):
    """SecureRelayd (failure_limit 3) with limits for these tests."""

    def __init__(self, directory, smarthostPort, limits: str) -> None:
        self.limits = limits
        super().__init__(directory, smarthostPort)

    def configText(self, smarthostPort, trustedNetworks=None, extra=""):
        return super().configText(smarthostPort) + f"limits: {{{self.limits}}}\n"


@pytest.fixture
def relay(tmp_path, processes, twistd, sink):
    def start(limits: str) -> HostileRelayd:
        d = HostileRelayd(tmp_path / "relayd", sink.port, limits)
        processes.append(d)
        return d.start()
    return start


def closedByServer(sock: socket.socket) -> bool:
    """True once the server has closed or reset the connection (nothing is ever sent to it)."""
    sock.settimeout(0.2)
    try:
        data = sock.recv(65536)
    except socket.timeout:
        return False
    except (ConnectionResetError, ssl.SSLError, OSError):
        return True
    return data == b""


def admittedOnImplicitTLS(daemon, context) -> ssl.SSLSocket:
    """
    A session on the implicit-TLS port that got its 220. With intake
    workers, the worker that served the harness's probe tells the master
    that the probe left a few milliseconds after logging its disconnect:
    until then the probe still counts, and a connection may rightly get
    421 for it. Such a connection is closed and the next one tried.
    """
    deadline = time.monotonic() + DELIVERY_DEADLINE
    while True:
        sock = context.wrap_socket(
            socket.create_connection((HOST, daemon.implicitPort), timeout=SMTP_TIMEOUT),
            server_hostname=HOST)
        banner = sock.recv(1024)
        if banner.startswith(b"220 "):
            return sock
        sock.close()
        assert banner.startswith(b"421 4.7.0 ") and time.monotonic() < deadline, banner
        time.sleep(0.05)


def test_refused_connections_on_the_implicit_tls_port_close_without_a_handshake(relay):
    daemon = relay("connections_per_client: 2")
    # The harness's probe of the port must not count as one of the two.
    daemon.waitForLog(r"disconnect from unknown\[127\.0\.0\.1\]")
    # Two sessions admitted first: each has its banner before the next
    # connection opens (with intake workers, the master admits connections
    # in the order their workers ask, not the order they were opened).
    context = daemon.clientContext()
    held = [admittedOnImplicitTLS(daemon, context) for _ in range(2)]
    refused = [socket.create_connection((HOST, daemon.implicitPort), timeout=SMTP_TIMEOUT)
               for _ in range(3)]
    try:
        # The 421 waits inside TLS for a handshake these clients never start;
        # the connections must end anyway (within CLOSE_GRACE).
        for sock in refused:
            waitUntil(lambda: closedByServer(sock), DELIVERY_DEADLINE,
                      "a refused connection on the implicit-TLS port closed by relayd", daemon.describe)
        # The two accepted ones wait for their EHLO (limits.command_timeout, 5m).
        assert not any(closedByServer(sock) for sock in held)
    finally:
        for sock in held + refused:
            sock.close()
    assert daemon.running


def floodWithoutReading(sock) -> int:
    """
    Pipeline NOOPs until the daemon stops reading them; never read a reply.
    The kernel's socket buffers on both sides hold megabytes of replies
    before relayd's own buffer fills, hence the volume.
    """
    sock.settimeout(2.0)
    sent = 0
    chunk = b"NOOP\r\n" * 10_000
    try:
        for _ in range(1_000):  # 60 MB at most
            sock.sendall(chunk)
            sent += len(chunk)
    except (socket.timeout, ssl.SSLError, OSError):
        return sent  # every buffer on the way is full: relayd stopped reading
    raise AssertionError(f"relayd read {sent} bytes of commands whose replies were never read")


@pytest.mark.parametrize("tls", ["none", "implicit", "starttls"])
def test_a_client_that_never_reads_is_dropped_after_command_timeout(relay, tls):
    daemon = relay("command_timeout: 2s")
    offset = daemon.logOffset()
    sock = socket.create_connection((HOST, daemon.implicitPort if tls == "implicit" else daemon.port),
                                    timeout=SMTP_TIMEOUT)
    if tls == "starttls":
        reader = sock.makefile("rb")
        assert reader.readline().startswith(b"220 ")
        sock.sendall(b"STARTTLS\r\n")
        assert reader.readline().startswith(b"220 ")
    if tls != "none":
        sock = daemon.clientContext().wrap_socket(sock, server_hostname="relay.test.example")
    try:
        floodWithoutReading(sock)
        daemon.waitForLog(r"timeout after NOOP from unknown\[127\.0\.0\.1\]: replies not read for 2s "
                          r"\(\d+ bytes unsent\); connection dropped", since=offset)
        daemon.waitForLog(r"disconnect from unknown\[127\.0\.0\.1\]", since=offset)
    finally:
        sock.close()
    # And the daemon serves on.
    import smtplib

    with smtplib.SMTP(HOST, daemon.port, timeout=SMTP_TIMEOUT) as client:
        assert client.noop()[0] == 250


def authConnection(daemon) -> ssl.SSLSocket:
    sock = daemon.clientContext().wrap_socket(
        socket.create_connection((HOST, daemon.implicitPort), timeout=SMTP_TIMEOUT),
        server_hostname="relay.test.example")
    reader = sock.makefile("rb")
    assert reader.readline().startswith(b"220 ")
    sock.sendall(b"EHLO client.test\r\n")
    while not reader.readline().startswith(b"250 "):
        pass
    sock.reader = reader
    return sock


def test_parallel_guesses_get_no_more_verdicts_than_the_failure_limit(relay):
    daemon = relay("connections_per_client: 20")
    sockets = [authConnection(daemon) for _ in range(10)]
    try:
        guess = b"AUTH PLAIN " + base64.b64encode(f"\0{USER}\0wrong".encode()) + b"\r\n"
        for sock in sockets:
            sock.sendall(guess)
        answers = [sock.reader.readline().rstrip(b"\r\n") for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()
    failed = [a for a in answers if a.startswith(b"535 ")]
    # failure_limit is 3: never more checks than that, however the guesses race.
    assert len(failed) <= 3 and len(failed) + answers.count(THROTTLED) == 10, answers
    daemon.waitForLog(r"warning: SASL authentication failure limit exceeded: 3 in 900s from "
                      r"unknown\[127\.0\.0\.1\]; AUTH blocked until \d{4}-\d\d-\d\d \d\d:\d\d:\d\d [+-]\d{4}$")
    assert len(re.findall("failure limit exceeded", daemon.log())) == 1


def test_relayctl_lists_and_lifts_an_auth_block(relay):
    daemon = relay("connections_per_client: 20")
    sock = authConnection(daemon)
    try:
        for _ in range(3):
            sock.sendall(b"AUTH PLAIN " + base64.b64encode(f"\0{USER}\0wrong".encode()) + b"\r\n")
        lines = [sock.reader.readline().rstrip(b"\r\n") for _ in range(4)]
        assert lines[-1] == THROTTLED
    finally:
        sock.close()
    listed = relayctl(daemon, "blocked")
    assert listed.returncode == 0, listed.stderr
    assert re.fullmatch(r"127\.0\.0\.1  AUTH blocked until \d{4}-\d\d-\d\d \d\d:\d\d:\d\d [+-]\d{4}\n",
                        listed.stdout), listed.stdout
    lifted = relayctl(daemon, "unblock", "127.0.0.1")
    assert (lifted.returncode, lifted.stdout) == (0, "127.0.0.1: unblocked\n"), lifted.stderr
    daemon.waitForLog(r"127\.0\.0\.1: AUTH block lifted by admin$")
    assert relayctl(daemon, "blocked").stdout == "No client is blocked\n"
    sock = authConnection(daemon)
    try:
        sock.sendall(b"AUTH PLAIN " + base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()) + b"\r\n")
        assert sock.reader.readline() == b"235 2.7.0 Authentication successful\r\n"
    finally:
        sock.close()
