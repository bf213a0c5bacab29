"""
PROXY-protocol listeners of the running daemon, driven over raw sockets:
the greeting comes only after the header, the header's client address is
the one relayd trusts, counts and logs, and whoever may not send a header
is dropped. 127.0.0.1 plays the balancer (proxy_from); 127.0.0.2 is a
host outside proxy_from.
"""

from __future__ import annotations

import re
import socket
import ssl
import struct

import pytest

from tests.integration.harness import (
    HOST,
    HOSTNAME,
    RETRY_MAX,
    RETRY_MIN,
    SHUTDOWN_GRACE,
    SMTP_TIMEOUT,
    Relayd,
    freePort,
    makeMessage,
    writeChain,
)

pytestmark = pytest.mark.integration

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def v1(source: str, port: int = 40000) -> bytes:
    return f"PROXY TCP4 {source} {HOST} {port} 25\r\n".encode()


def v2(source: str, port: int = 40000) -> bytes:
    block = socket.inet_aton(source) + socket.inet_aton(HOST) + struct.pack("!HH", port, 25)
    return V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", len(block)) + block


class ProxiedRelayd(Relayd):
    """Two haproxy: listeners, plain (``port``, trusted networks relay) and implicit TLS."""

    def __init__(self, directory, smarthostPort):
        directory.mkdir(parents=True, exist_ok=True)
        self.implicitPort = freePort()
        self.ca = writeChain(directory)
        super().__init__(directory, smarthostPort)

    def configText(self, smarthostPort, trustedNetworks=None, extra=""):
        return (
            f"hostname: {HOSTNAME}\n"
            f"listeners:\n"
            f'  - {{endpoint: "haproxy:tcp:{self.port}:interface={HOST}", tls: none, auth: none,'
            f' proxy_from: ["{HOST}/32"]}}\n'
            f'  - {{endpoint: "haproxy:tcp:{self.implicitPort}:interface={HOST}", tls: implicit,'
            f' auth: none, proxy_from: ["{HOST}/32"]}}\n'
            f"tls: {{certificate: cert.pem, key: key.pem}}\n"
            f'relay: {{trusted_networks: ["192.0.2.0/24"]}}\n'
            f"limits: {{connections_per_client: 1}}\n"
            f"queue:\n"
            f"  directory: {self.spool}\n"
            f"  retry: {{min: {RETRY_MIN}, max: {RETRY_MAX}}}\n"
            f"delivery:\n"
            f"  smarthosts: [{{host: {HOST}, port: {smarthostPort}, tls: none}}]\n"
            f"shutdown_grace: {SHUTDOWN_GRACE}\n"
        )


@pytest.fixture
def daemon(tmp_path, processes, twistd, sink):
    d = ProxiedRelayd(tmp_path / "relayd", sink.port)
    processes.append(d)
    d.start()
    # The harness's "is it listening" probe sent no header: that much is
    # logged before a test looks.
    d.waitForLog(r"dropped connection from unknown\[127\.0\.0\.1\]: connection closed before the PROXY header")
    return d


def opened(port: int, source: str = HOST) -> socket.socket:
    sock = socket.create_connection((HOST, port), timeout=SMTP_TIMEOUT, source_address=(source, 0))
    return sock


def readReply(sock) -> bytes:
    data = b""
    while not re.search(rb"(^|\r\n)\d{3} [^\r\n]*\r\n$", data):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def nothingThenClosed(sock) -> bytes:
    """What the server sent before closing (b"" when it said nothing)."""
    data = b""
    while True:
        try:
            chunk = sock.recv(4096)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def dialogue(sock, sender="alice@client.test", rcpt="bob@remote.test", subject="proxied"):
    """EHLO, MAIL, RCPT on an open session; the reply to RCPT."""
    sock.sendall(b"EHLO client.test\r\n")
    assert readReply(sock).startswith(b"250")
    sock.sendall(f"MAIL FROM:<{sender}>\r\n".encode())
    assert readReply(sock).startswith(b"250")
    sock.sendall(f"RCPT TO:<{rcpt}>\r\n".encode())
    return readReply(sock)


def test_trust_limits_logs_and_received_header_use_the_client_from_the_header(daemon, sink):
    offset = daemon.logOffset()
    with opened(daemon.port) as sock:
        sock.settimeout(1.0)
        with pytest.raises(socket.timeout):
            sock.recv(100)  # no greeting before the header
        sock.settimeout(SMTP_TIMEOUT)
        sock.sendall(v1("192.0.2.7"))
        assert readReply(sock).startswith(b"220 " + HOSTNAME.encode())
        # connections_per_client is 1: the same client again is refused,
        # another client through the same balancer is not.
        with opened(daemon.port) as again:
            again.sendall(v2("192.0.2.7", 40001))
            assert readReply(again).startswith(b"421 4.7.0 ")
        with opened(daemon.port) as other:
            other.sendall(v2("198.51.100.9", 40002))
            assert readReply(other).startswith(b"220 ")
            # Not in trusted_networks, although the balancer is loopback.
            assert dialogue(other).startswith(b"554 5.7.1 <bob@remote.test>: Relay access denied")
        assert dialogue(sock).startswith(b"250 2.1.5")
        sock.sendall(b"DATA\r\n")
        assert readReply(sock).startswith(b"354")
        sent = makeMessage("proxied", ["through the balancer"])
        sock.sendall(sent + b".\r\n")
        qid = re.search(rb"queued as ([0-9A-Z]{16})", readReply(sock)).group(1).decode()
    daemon.waitForLog(rf"connect from unknown\[192\.0\.2\.7\]", since=offset)
    daemon.waitForLog(rf"\b{qid}: client=unknown\[192\.0\.2\.7\]$", since=offset)
    [arrived] = sink.waitForMessages(1)
    assert arrived.content.startswith(b"Received: from client.test (unknown [192.0.2.7])")
    assert arrived.content.endswith(sent)
    assert not re.search(r"connect from \S+\[127\.0\.0\.1\]", daemon.log(offset))


def test_implicit_tls_after_the_header(daemon, sink):
    offset = daemon.logOffset()
    context = ssl.create_default_context()
    daemon.ca.configure_trust(context)
    with opened(daemon.implicitPort) as raw:
        raw.sendall(v2("192.0.2.8"))
        with context.wrap_socket(raw, server_hostname=HOSTNAME) as sock:
            assert readReply(sock).startswith(b"220 ")
            assert dialogue(sock).startswith(b"250 2.1.5")
            sock.sendall(b"DATA\r\n")
            assert readReply(sock).startswith(b"354")
            sock.sendall(makeMessage("tls", ["over implicit TLS"]) + b".\r\n")
            assert b"queued as" in readReply(sock)
    [arrived] = sink.waitForMessages(1)
    assert re.match(rb"Received: from client\.test \(unknown \[192\.0\.2\.8\]\)\r\n\t\(using TLSv1\.[23] ",
                    arrived.content), arrived.content[:200]
    daemon.waitForLog(r"connect from unknown\[192\.0\.2\.8\]", since=offset)


@pytest.mark.parametrize("source, send, reason", [
    ("127.0.0.2", v1("127.0.0.1"), r"not in proxy_from"),
    (HOST, b"EHLO client.test\r\n", r"bad PROXY header: not a PROXY protocol header"),
    (HOST, b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 99999\r\n", r"bad PROXY header: v1 port '99999'"),
])
def test_who_may_not_name_a_client_is_dropped_and_logged(daemon, source, send, reason):
    offset = daemon.logOffset()
    try:
        sock = opened(daemon.port, source=source)
    except ConnectionResetError:
        pass  # dropped so fast that the reset reached connect() itself
    else:
        with sock:
            try:
                sock.sendall(send)
            except OSError:
                pass  # already dropped
            assert nothingThenClosed(sock) == b""
    peer = re.escape(source)
    daemon.waitForLog(rf"warning: dropped connection from unknown\[{peer}\]: {reason}", since=offset)
    assert "connect from" not in daemon.log(offset)


def test_health_check_is_answered_and_not_a_client(daemon):
    offset = daemon.logOffset()
    with opened(daemon.port) as sock:
        sock.sendall(V2_SIGNATURE + b"\x20\x00\x00\x00")  # LOCAL
        assert readReply(sock) == f"220 {HOSTNAME} ESMTP relayd\r\n".encode()
        sock.sendall(b"EHLO lb.test\r\n")
        assert readReply(sock) == f"250 {HOSTNAME}\r\n".encode()
        sock.sendall(b"QUIT\r\n")
        assert readReply(sock) == b"221 2.0.0 Bye\r\n"
        assert nothingThenClosed(sock) == b""
    # One real session afterwards, so the log is known to be written up to here.
    with opened(daemon.port) as sock:
        sock.sendall(v1("192.0.2.9"))
        assert readReply(sock).startswith(b"220 ")
    daemon.waitForLog(r"disconnect from unknown\[192\.0\.2\.9\]", since=offset)
    # No smtpd line names the balancer (name[127.0.0.1]) for the health check.
    log = daemon.log(offset)
    assert not re.search(r"\[127\.0\.0\.1\]", log), log
