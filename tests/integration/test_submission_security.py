"""
Submission security against the running daemon (twistd relayd): STARTTLS on
one port, implicit TLS on another, AUTH required on both, certificates from
a trustme CA whose leaf is issued by an intermediate (so a client that
trusts only the root proves the whole chain is served). Real clients: swaks
and smtplib, and a raw socket for the STARTTLS injection.
"""

from __future__ import annotations

import base64
import re
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest
import trustme

from tests.integration.harness import (
    HOST,
    HOSTNAME,
    RETRY_MAX,
    RETRY_MIN,
    SHUTDOWN_GRACE,
    SMTP_TIMEOUT,
    Relayd,
    addUser,
    freePort,
    makeMessage,
    writeChain,
)

pytestmark = pytest.mark.integration

PASSWORD = "correct horse battery"
USER = "alice@client.test"


class SecureRelayd(Relayd):
    """relayd with a STARTTLS listener (self.port) and an implicit-TLS one (self.implicitPort)."""

    def __init__(self, directory: Path, smarthostPort: int) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.implicitPort = freePort()
        self.ca = writeChain(directory)
        self.passwordFile = directory / "passwd"
        addUser(self.passwordFile, USER, PASSWORD)
        super().__init__(directory, smarthostPort)

    def configText(self, smarthostPort, trustedNetworks=None, extra=""):
        return (
            f"hostname: {HOSTNAME}\n"
            f"listeners:\n"
            f'  - {{endpoint: "tcp:{self.port}:interface={HOST}", tls: starttls, auth: required}}\n'
            f'  - {{endpoint: "tcp:{self.implicitPort}:interface={HOST}", tls: implicit, auth: required}}\n'
            f"tls: {{certificate: cert.pem, key: key.pem}}\n"
            f"auth:\n"
            f"  password_file: passwd\n"
            f"  failure_limit: 3\n"
            f"  received_header_user: true\n"
            f"queue:\n"
            f"  directory: {self.spool}\n"
            f"  retry: {{min: {RETRY_MIN}, max: {RETRY_MAX}}}\n"
            f"delivery:\n"
            f"  smarthosts: [{{host: {HOST}, port: {smarthostPort}, tls: none}}]\n"
            f"shutdown_grace: {SHUTDOWN_GRACE}\n"
        )

    def clientContext(self, ca: trustme.CA | None = None) -> ssl.SSLContext:
        # Trusts only the root: the handshake succeeds only if the
        # intermediate is served with the leaf.
        context = ssl.create_default_context()
        (ca or self.ca).configure_trust(context)
        return context


@pytest.fixture
def daemon(tmp_path, processes, twistd, sink):
    d = SecureRelayd(tmp_path / "relayd", sink.port)
    processes.append(d)
    return d.start()


def swaks(daemon: SecureRelayd, *args: str) -> str:
    if shutil.which("swaks") is None:
        pytest.skip("swaks is not installed (Debian package swaks)")
    result = subprocess.run(
        ["swaks", "--server", HOST, "--from", USER, "--to", "bob@remote.test",
         "--auth-user", USER, "--auth-password", PASSWORD, "--tls-ca-path", str(daemon.directory / "ca.pem"),
         "--timeout", "30", *args],
        capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_swaks_plain_over_starttls_and_login_over_implicit_tls(daemon, sink):
    daemon.ca.cert_pem.write_to_path(str(daemon.directory / "ca.pem"))
    out = swaks(daemon, "--port", str(daemon.port), "--tls", "--auth", "PLAIN")
    assert re.search(r"<~  235 2\.7\.0 Authentication successful", out)
    assert re.search(r"<~  250 2\.0\.0 Ok: queued as [0-9A-Z]{16}", out)
    out = swaks(daemon, "--port", str(daemon.implicitPort), "--tls-on-connect", "--auth", "LOGIN")
    assert "<~  334 VXNlcm5hbWU6" in out
    assert re.search(r"<~  250 2\.0\.0 Ok: queued as [0-9A-Z]{16}", out)
    messages = sink.waitForMessages(2, daemon.describe)
    for message in messages:
        header = message.content.split(b"\r\n\r\n")[0]
        assert b"with ESMTPSA id" in header
        assert re.search(rb"\(using TLSv1\.[23] with cipher \S+ \(\d+/\d+ bits\)\)", header)
        assert b"(Authenticated sender: alice@client.test)" in header
    daemon.waitForLog(r"client=unknown\[127\.0\.0\.1\], sasl_method=PLAIN, sasl_username=alice@client\.test")
    daemon.waitForLog(r"client=unknown\[127\.0\.0\.1\], sasl_method=LOGIN, sasl_username=alice@client\.test")


def test_smtplib_starttls_and_ssl(daemon, sink):
    message = makeMessage("smtplib", ["over TLS"], sender=USER)
    with smtplib.SMTP(HOST, daemon.port, local_hostname="client.test", timeout=SMTP_TIMEOUT) as client:
        client.ehlo()
        assert "auth" not in client.esmtp_features  # not before TLS
        assert client.docmd("AUTH", "PLAIN " + base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()) == (
            538, b"5.7.11 Encryption required for requested authentication mechanism")
        assert client.mail(USER) == (530, b"5.7.0 Authentication required")
        client.starttls(context=daemon.clientContext())
        client.ehlo()
        assert client.esmtp_features["auth"] == " PLAIN LOGIN"
        assert "starttls" not in client.esmtp_features
        client.login(USER, PASSWORD)
        assert client.sendmail(USER, ["bob@remote.test"], message) == {}
    with smtplib.SMTP_SSL(HOST, daemon.implicitPort, local_hostname="client.test", timeout=SMTP_TIMEOUT,
                          context=daemon.clientContext()) as client:
        client.ehlo()
        assert "starttls" not in client.esmtp_features
        assert client.docmd("STARTTLS") == (503, b"5.5.1 Error: TLS already active")
        client.login(USER, PASSWORD)
        code, reply = client.mail("someone.else@client.test")
        assert (code, reply) == (553, b"5.7.1 <someone.else@client.test>: Sender address rejected: not owned by you")
        client.rset()
        assert client.sendmail(USER, ["bob@remote.test"], message) == {}
    sink.waitForMessages(2, daemon.describe)


def readReply(sock) -> bytes:
    """One whole (possibly multi-line) reply."""
    data = b""
    deadline = time.monotonic() + SMTP_TIMEOUT
    while time.monotonic() < deadline:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
        lines = data.split(b"\r\n")
        if len(lines) > 1 and re.match(rb"\d{3} ", lines[-2]):
            return data
    raise AssertionError(f"no complete reply, got {data!r}")


def test_commands_injected_behind_starttls_are_never_run(daemon):
    with socket.create_connection((HOST, daemon.port), timeout=SMTP_TIMEOUT) as raw:
        assert readReply(raw).startswith(b"220 ")
        raw.sendall(b"EHLO client.test\r\n")
        assert b"250-STARTTLS\r\n" in readReply(raw)
        # One packet: the RSET is a man-in-the-middle's injection.
        raw.sendall(b"STARTTLS\r\nRSET\r\n")
        assert readReply(raw) == b"220 2.0.0 Ready to start TLS\r\n"
        with daemon.clientContext().wrap_socket(raw, server_hostname=HOSTNAME) as tls:
            tls.sendall(b"EHLO client.test\r\n")
            # The first reply inside TLS answers the EHLO, not the RSET.
            reply = readReply(tls)
            assert reply.startswith(b"250-relay.test.example\r\n"), reply
            assert b"AUTH PLAIN LOGIN" in reply and b"STARTTLS" not in reply
            tls.sendall(b"NOOP\r\n")
            assert readReply(tls) == b"250 2.0.0 Ok\r\n"
    daemon.waitForLog(r"discarded 6 bytes sent after STARTTLS before the TLS handshake")


def test_failed_handshake_closes_cleanly_and_daemon_serves_on(daemon):
    with socket.create_connection((HOST, daemon.implicitPort), timeout=SMTP_TIMEOUT) as raw:
        raw.sendall(b"EHLO this is not a TLS ClientHello\r\n" * 4)
        assert raw.recv(4096)[:1] in (b"", b"\x15")  # closed, at most a TLS alert
    daemon.waitForLog(r"SSL_accept error from unknown\[127\.0\.0\.1\]: ")
    with smtplib.SMTP_SSL(HOST, daemon.implicitPort, timeout=SMTP_TIMEOUT,
                          context=daemon.clientContext()) as client:
        assert client.noop()[0] == 250


def test_sighup_reloads_the_certificate_and_keeps_it_when_broken(daemon):
    early = smtplib.SMTP_SSL(HOST, daemon.implicitPort, timeout=SMTP_TIMEOUT, context=daemon.clientContext())
    oldCA = daemon.ca
    newCA = writeChain(daemon.directory)
    before = daemon.logOffset()
    daemon.signal(signal.SIGHUP)
    daemon.waitForLog(r"reload: configuration .* applied", since=before)
    # New sessions get the new certificate; the open session goes on.
    with smtplib.SMTP_SSL(HOST, daemon.implicitPort, timeout=SMTP_TIMEOUT,
                          context=daemon.clientContext(newCA)) as client:
        assert client.noop()[0] == 250
    with pytest.raises(ssl.SSLCertVerificationError):
        smtplib.SMTP_SSL(HOST, daemon.implicitPort, timeout=SMTP_TIMEOUT, context=daemon.clientContext(oldCA))
    assert early.noop()[0] == 250
    early.close()
    # A broken certificate: one error line, and the running one stays.
    (daemon.directory / "cert.pem").write_text("not a certificate\n")
    before = daemon.logOffset()
    daemon.signal(signal.SIGHUP)
    daemon.waitForLog(r"reload: keeping the running TLS certificate: tls\.certificate .*cert\.pem: "
                      r"no PEM certificate in it$", since=before)
    with smtplib.SMTP(HOST, daemon.port, timeout=SMTP_TIMEOUT) as client:
        client.starttls(context=daemon.clientContext(newCA))
        assert client.noop()[0] == 250
    assert daemon.running


def test_password_file_changes_apply_without_restart_and_failures_lock_out(daemon):
    addUser(daemon.passwordFile, "bob@client.test", "bob's password")

    # The daemon stats the file at most once a second (no SIGHUP needed):
    # after that second the first attempt must succeed. One attempt only, as
    # failures count towards the lockout tested below.
    time.sleep(1.5)
    with smtplib.SMTP_SSL(HOST, daemon.implicitPort, timeout=SMTP_TIMEOUT,
                          context=daemon.clientContext()) as client:
        client.ehlo()
        response = base64.b64encode(b"\0bob@client.test\0bob's password").decode()
        assert client.docmd("AUTH", "PLAIN " + response) == (235, b"2.7.0 Authentication successful")

    with smtplib.SMTP_SSL(HOST, daemon.implicitPort, timeout=SMTP_TIMEOUT,
                          context=daemon.clientContext()) as client:
        client.ehlo()
        for attempt in range(3):
            code, _ = client.docmd("AUTH", "PLAIN " + base64.b64encode(b"\0mallory\x01\0guess").decode())
            assert code == 535
        # The third failure is followed by 421 and the end of the session.
        assert client.noop() == (421, b"4.7.0 relay.test.example Error: too many failed "
                                      b"authentications; try again later")
    daemon.waitForLog(r"warning: unknown\[127\.0\.0\.1\]: SASL PLAIN authentication failed: "
                      r"authentication failure, sasl_username=mallory\\x01$")
    with smtplib.SMTP_SSL(HOST, daemon.implicitPort, timeout=SMTP_TIMEOUT,
                          context=daemon.clientContext()) as client:
        client.ehlo()
        code, reply = client.docmd("AUTH", "PLAIN " + base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode())
        assert (code, reply) == (421, b"4.7.0 relay.test.example Error: too many failed authentications; try again later")
