"""
PROXY protocol listeners (relayd.proxy): the strict header parser as a
table, and connections through ProxyFactory to the real session over
StringTransport, where every per-client decision must see the address
from the header, never the balancer's.
"""

from __future__ import annotations

import ipaddress
import socket
import struct

import pytest
from twisted.internet import address, task
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent, globalLogPublisher

from relayd import proxy, server
from tests.test_server import makeConfig, MemorySpool

V2 = proxy.V2_SIGNATURE


def v2(command: int, family: int, block: bytes) -> bytes:
    return V2 + bytes([0x20 | command, family]) + struct.pack("!H", len(block)) + block


def v2tcp4(src: str, dst: str, sport: int, dport: int, tlvs: bytes = b"") -> bytes:
    block = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!HH", sport, dport)
    return v2(1, 0x11, block + tlvs)


def v2tcp6(src: str, dst: str, sport: int, dport: int) -> bytes:
    block = (socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, dst)
             + struct.pack("!HH", sport, dport))
    return v2(1, 0x21, block)


V4 = address.IPv4Address
V6 = address.IPv6Address


@pytest.mark.parametrize("data, source, destination, length", [
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 25\r\nEHLO", V4("TCP", "192.0.2.7", 40000),
     V4("TCP", "198.51.100.1", 25), 44),
    (b"PROXY TCP6 2001:db8::7 2001:db8::1 65535 587\r\n", V6("TCP", "2001:db8::7", 65535),
     V6("TCP", "2001:db8::1", 587), 46),
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 0 25\r\n", V4("TCP", "192.0.2.7", 0),
     V4("TCP", "198.51.100.1", 25), 40),
    (b"PROXY UNKNOWN\r\n", None, None, 15),
    (b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n", None, None, 35),
    (v2tcp4("192.0.2.7", "198.51.100.1", 40000, 25) + b"EHLO", V4("TCP", "192.0.2.7", 40000),
     V4("TCP", "198.51.100.1", 25), 28),
    (v2tcp4("192.0.2.7", "198.51.100.1", 1, 2, tlvs=b"\x04\x00\x02ab"), V4("TCP", "192.0.2.7", 1),
     V4("TCP", "198.51.100.1", 2), 33),
    (v2tcp6("2001:db8::7", "2001:db8::1", 5, 6), V6("TCP", "2001:db8::7", 5),
     V6("TCP", "2001:db8::1", 6), 52),
    (v2(0, 0x00, b""), None, None, 16),  # LOCAL: a health check
    (v2(0, 0x11, b"\x00" * 12), None, None, 28),  # LOCAL with addresses: ignored
    (v2(1, 0x00, b""), None, None, 16),  # PROXY with UNSPEC: no client address
])
def test_valid_headers(data, source, destination, length):
    header, used = proxy.parseHeader(data)
    assert (header.source, header.destination, used) == (source, destination, length)
    assert header.local == (source is None)


@pytest.mark.parametrize("data", [
    b"P", b"PROXY", b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 25", b"PROXY TCP4 192.0.2.7\r",
    V2[:5], V2, v2tcp4("192.0.2.7", "198.51.100.1", 1, 2)[:27],
])
def test_incomplete_headers_wait_for_more(data):
    assert proxy.parseHeader(data) is None


@pytest.mark.parametrize("data, why", [
    (b"EHLO client.test\r\n", "not a PROXY protocol header"),
    (b"proxy TCP4 192.0.2.7 198.51.100.1 1 2\r\n", "not a PROXY protocol header"),
    (b"\r\nEHLO", "not a PROXY protocol header"),
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 1 2\n", "without CRLF"),
    (b"PROXY TCP4 " + b"1" * 100, "without CRLF"),
    (b"PROXY TCP4  192.0.2.7 198.51.100.1 1 2\r\n", "is not 'PROXY"),
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 1 2 \r\n", "is not 'PROXY"),
    (b"PROXY UDP4 192.0.2.7 198.51.100.1 1 2\r\n", "is not 'PROXY"),
    (b"PROXY TCP4 192.0.2.300 198.51.100.1 1 2\r\n", "address '192.0.2.300' is not valid"),
    (b"PROXY TCP4 192.0.2.07 198.51.100.1 1 2\r\n", "is not valid"),
    (b"PROXY TCP4 2001:db8::7 198.51.100.1 1 2\r\n", "is not valid"),
    (b"PROXY TCP6 192.0.2.7 2001:db8::1 1 2\r\n", "is not valid"),
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 65536 2\r\n", "port '65536'"),
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 01 2\r\n", "port '01'"),
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 +1 2\r\n", "port '+1'"),
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 1 2\xff\r\n", "not ASCII"),
    (V2 + b"\x11\x11\x00\x0c" + b"\x00" * 12, "version 1"),
    (V2 + b"\x22\x11\x00\x0c" + b"\x00" * 12, "unknown command 2"),
    (v2(1, 0x12, b"\x00" * 12), "0x12 is not TCP"),  # UDP
    (v2(1, 0x31, b"\x00" * 216), "0x31 is not TCP"),  # UNIX
    (v2(1, 0x11, b"\x00" * 8), "8-byte address block"),
    (v2(1, 0x21, b"\x00" * 12), "12-byte address block"),
])
def test_invalid_headers_are_refused(data, why):
    with pytest.raises(proxy.ProxyHeaderError, match=why.replace("(", r"\(").replace("+", r"\+")):
        proxy.parseHeader(data)


def test_proxy_from_matching():
    networks = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::/32")]
    assert proxy.mayProxy("10.1.2.3", networks)
    assert proxy.mayProxy("::ffff:10.1.2.3", networks)
    assert proxy.mayProxy("2001:db8::5", networks)
    assert not proxy.mayProxy("192.0.2.1", networks)
    assert not proxy.mayProxy("unix-socket", networks)


# Connections through ProxyFactory to the real session


@pytest.fixture
def logLines():
    lines = []
    observer = lambda e: lines.append(formatEvent(e))  # noqa: E731
    globalLogPublisher.addObserver(observer)
    yield lines
    globalLogPublisher.removeObserver(observer)


class Balanced:
    """relayd's session factory behind ProxyFactory; the balancer is 10.0.0.1."""

    def __init__(self, proxyFrom=("10.0.0.0/24",), **configArgs):
        self.clock = task.Clock()
        self.clock.advance(1_800_000_000)
        self.spool = MemorySpool()
        self.sessions = server.SubmissionFactory(
            config=makeConfig(**configArgs), spool=self.spool,
            commit=lambda writer, envelope: writer.commit(envelope),
            messageQueued=lambda envelope: None, clock=self.clock)
        self.factory = proxy.ProxyFactory(
            self.sessions, [ipaddress.ip_network(n) for n in proxyFrom],
            lambda: "relay.test", lambda: 300.0, self.clock)

    def connect(self, balancer="10.0.0.1"):
        transport = StringTransport(peerAddress=V4("TCP", balancer, 50000),
                                    hostAddress=V4("TCP", "10.0.0.2", 2525))
        connection = self.factory.buildProtocol(transport.getPeer())
        connection.makeConnection(transport)
        return connection, transport


def replies(transport) -> list[str]:
    out = transport.value().decode()
    transport.clear()
    return [line for line in out.split("\r\n") if line]


def test_session_starts_after_the_header_and_sees_the_client(logLines):
    b = Balanced(trusted=("192.0.2.0/24",))
    connection, transport = b.connect()
    assert transport.value() == b""  # no greeting before the header
    assert not b.sessions.sessions
    # The header and the first command in one read, as clients pipeline.
    connection.dataReceived(b"PROXY TCP4 192.0.2.7 10.0.0.2 40000 25\r\nEHLO client.test\r\n")
    out = replies(transport)
    assert out[0] == "220 relay.test ESMTP relayd"
    assert out[1] == "250-relay.test"
    [session] = b.sessions.sessions
    assert (session.clientAddress, session.trusted) == ("192.0.2.7", True)
    assert any("connect from unknown[192.0.2.7]" in line for line in logLines), logLines
    assert not any("10.0.0.1" in line for line in logLines), logLines
    connection.dataReceived(b"MAIL FROM:<a@client.test>\r\nRCPT TO:<b@remote.test>\r\nDATA\r\n")
    assert replies(transport)[-1].startswith("354 ")
    connection.dataReceived(b"Subject: x\r\n\r\nbody\r\n.\r\n")
    assert replies(transport)[-1].startswith("250 2.0.0 Ok: queued as ")
    [(envelope, body)] = b.spool.committed.values()
    assert body.startswith(b"Received: from client.test (unknown [192.0.2.7])")
    assert envelope.clientAddress == "192.0.2.7"


@pytest.mark.parametrize("header", [
    b"PROXY TCP4 192.0.2.7 10.0.0.2 40000 25\r\n", v2tcp4("192.0.2.7", "10.0.0.2", 40000, 25)])
def test_header_split_over_many_reads(header):
    b = Balanced()
    connection, transport = b.connect()
    assert connection.logPrefix() == "ProxiedConnection"
    for i in range(len(header)):
        assert transport.value() == b""
        connection.dataReceived(header[i:i + 1])
    assert replies(transport) == ["220 relay.test ESMTP relayd"]
    [session] = b.sessions.sessions
    assert session.clientAddress == "192.0.2.7"


def test_a_trusted_balancer_does_not_make_its_clients_trusted():
    b = Balanced(trusted=("10.0.0.0/24",))
    connection, transport = b.connect()
    connection.dataReceived(v2tcp4("198.51.100.9", "10.0.0.2", 40000, 25))
    connection.dataReceived(b"EHLO c\r\nMAIL FROM:<a@client.test>\r\nRCPT TO:<b@remote.test>\r\n")
    assert replies(transport)[-1] == "554 5.7.1 <b@remote.test>: Relay access denied"


def test_connections_per_client_count_the_real_clients():
    b = Balanced(connectionsPerClient=1)
    first, t1 = b.connect()
    first.dataReceived(b"PROXY TCP4 192.0.2.7 10.0.0.2 40000 25\r\n")
    assert replies(t1)[0].startswith("220 ")
    second, t2 = b.connect()
    second.dataReceived(b"PROXY TCP4 192.0.2.7 10.0.0.2 40001 25\r\n")
    assert replies(t2)[0].startswith("421 4.7.0 ")
    other, t3 = b.connect()
    other.dataReceived(b"PROXY TCP4 192.0.2.8 10.0.0.2 40002 25\r\n")
    assert replies(t3)[0].startswith("220 ")


def test_connection_from_outside_proxy_from_is_dropped_and_logged(logLines):
    b = Balanced()
    connection, transport = b.connect(balancer="192.0.2.66")
    assert transport.disconnecting and transport.value() == b""
    connection.dataReceived(b"PROXY TCP4 127.0.0.1 10.0.0.2 40000 25\r\nEHLO x\r\n")
    assert transport.value() == b"" and not b.sessions.sessions
    assert [l for l in logLines if "dropped" in l] == [
        "warning: dropped connection from unknown[192.0.2.66]: not in proxy_from"]


@pytest.mark.parametrize("data, reason", [
    (b"EHLO client.test\r\n", "bad PROXY header: not a PROXY protocol header"),
    (b"PROXY TCP4 192.0.2.7 10.0.0.2 99999 25\r\n", "bad PROXY header: v1 port '99999'"),
])
def test_bad_header_is_dropped_and_logged(logLines, data, reason):
    b = Balanced()
    connection, transport = b.connect()
    connection.dataReceived(data)
    assert transport.disconnecting and transport.value() == b"" and not b.sessions.sessions
    [line] = [l for l in logLines if "dropped" in l]
    assert line.startswith(f"warning: dropped connection from unknown[10.0.0.1]: {reason}"), line


def test_no_header_in_time_is_dropped(logLines):
    b = Balanced()
    connection, transport = b.connect()
    connection.dataReceived(b"PROXY TCP4 192.0.2.7")
    b.clock.advance(299)
    assert not transport.disconnecting
    b.clock.advance(1)
    assert transport.disconnecting and not b.sessions.sessions
    assert "warning: dropped connection from unknown[10.0.0.1]: no PROXY header within 300 s" in logLines


def test_local_header_is_a_health_check_answered_and_never_a_client(logLines):
    b = Balanced()
    connection, transport = b.connect()
    connection.dataReceived(v2(0, 0x00, b""))
    assert replies(transport) == ["220 relay.test ESMTP relayd"]
    connection.dataReceived(b"EHLO haproxy.test\r\n")
    assert replies(transport) == ["250 relay.test"]
    connection.dataReceived(b"QUIT\r\n")
    assert replies(transport) == ["221 2.0.0 Bye"]
    assert transport.disconnecting
    connection.connectionLost(None)
    assert not b.sessions.sessions and not b.factory.protocols
    assert not [l for l in logLines if "connect" in l or "dropped" in l], logLines


def test_health_check_dialogue_is_bounded():
    b = Balanced()
    connection, transport = b.connect()
    connection.dataReceived(b"PROXY UNKNOWN\r\n" + b"HELO x\r\n" * 10)
    assert replies(transport) == ["220 relay.test ESMTP relayd"] + ["250 relay.test"] * 3 + ["221 2.0.0 Bye"]
    b2 = Balanced()
    connection, transport = b2.connect()
    connection.dataReceived(b"PROXY UNKNOWN\r\n")
    b2.clock.advance(300)
    assert transport.disconnecting


def test_starttls_handshake_reaches_the_session():
    b = Balanced()
    connection, transport = b.connect()
    connection.dataReceived(b"PROXY TCP4 192.0.2.7 10.0.0.2 40000 25\r\n")
    [session] = b.sessions.sessions
    session._handshaking = True
    connection.handshakeCompleted()
    assert session._handshaking is False


def test_client_name_is_looked_up_for_the_header_address_and_pipelined_input_waits():
    from relayd.resolve import ClientName
    from tests.test_server import Names

    b = Balanced()
    names = b.sessions.clientNames = Names()
    connection, transport = b.connect()
    # The header and a command in one read, while the name is not known yet.
    connection.dataReceived(b"PROXY TCP4 192.0.2.4 10.0.0.2 40000 25\r\nEHLO client.test\r\n")
    assert list(names.pending) == ["192.0.2.4"]
    assert transport.value() == b""  # nothing answered before the banner
    assert transport.producerState == "paused"
    names.pending["192.0.2.4"].callback(ClientName("mail.example.org"))
    assert replies(transport) == ["220 relay.test ESMTP relayd"]
    b.clock.advance(0)
    assert replies(transport)[0] == "250-relay.test"
    assert transport.producerState == "producing"
    [session] = b.sessions.sessions
    assert (session.clientName, session.clientAddress) == ("mail.example.org", "192.0.2.4")
