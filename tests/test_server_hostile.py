"""
Hostile clients over StringTransport and in-memory TLS: a client that never
reads its replies, sessions that must end in bounded time whatever the
client does, refused connections on an implicit-TLS port, AUTH guesses in
parallel and behind a disconnect, and the AUTH block an admin can see and
lift.

``SocketModel`` stands in for Twisted's socket transport where it matters
here: replies pile up until the client reads them, and past ``bufferSize``
the registered producer is paused until the client has read everything,
as twisted.internet.abstract.FileDescriptor does.
"""

from __future__ import annotations

import dataclasses

import pytest
import trustme
from twisted.internet import address, defer, protocol, ssl
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure

from relayd import auth, config, replies, server
from relayd.tls import ServerTLS
from tests.test_server_security import (PASSWORDS, Harness, TLSStringTransport, logged,  # noqa: F401
                                        plain)

FAILED = "535 5.7.8 Error: authentication failed: authentication failure"
THROTTLED = "421 4.7.0 relay.test Error: too many failed authentications; try again later"


class SocketModel(TLSStringTransport):
    """What the client has not read stays here; past bufferSize the producer is paused."""

    bufferSize = 64 * 1024  # FileDescriptor.bufferSize

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.producerPaused = False
        self.aborted = False

    # What unsentBytes reads on a FileDescriptor.
    @property
    def dataBuffer(self) -> bytes:
        return self.io.getvalue()

    def write(self, data):
        super().write(data)
        if (self.producer is not None and self.streaming and not self.producerPaused
                and len(self.io.getvalue()) > self.bufferSize):
            self.producerPaused = True
            self.producer.pauseProducing()

    def read(self) -> bytes:
        """The client reads everything; a paused producer is resumed."""
        data = self.value()
        self.clear()
        if self.producer is not None and self.producerPaused:
            self.producerPaused = False
            self.producer.resumeProducing()
        return data

    def abortConnection(self):
        self.aborted = True
        super().abortConnection()


class HostileHarness(Harness):
    def connect(self, tls="starttls", auth="required", peer="192.0.2.50", plaintextAuth=False,
                endpoint="tcp:587"):
        listener = config.Listener(endpoint, tls, auth, plaintextAuth)
        self.transport = SocketModel(
            peerAddress=address.IPv4Address("TCP", peer, 40000),
            hostAddress=address.IPv4Address("TCP", "127.0.0.1", 587))
        self.transport.implicit = tls == "implicit"
        self.proto = self.factory.forListener(listener).buildProtocol(None)
        self.proto.makeConnection(self.transport)
        return self.take()

    def authReady(self, **kw):
        """Connected, TLS, EHLO: ready for AUTH."""
        self.connect(**kw)
        self.startTLS()
        self.send(b"EHLO c\r\n")


@pytest.fixture
def hs(tmp_path):
    return HostileHarness(tmp_path)


def replyLines(data: bytes) -> list[str]:
    return [line for line in data.decode().split("\r\n") if line]


# 1. A client that never reads its replies


def test_a_client_that_never_reads_is_no_longer_read(hs):
    hs.connect(auth="none")
    hs.transport.read()
    # 120 KB of NOOPs in one read would make 280 KB of replies.
    hs.proto.dataReceived(b"NOOP\r\n" * 20_000)
    assert hs.transport.producerState == "paused"  # the session stopped reading
    assert hs.proto.unsentReplyBytes <= SocketModel.bufferSize + len(replies.NOOP_OK.toBytes())
    # Once paused, the session wrote no further reply.
    assert hs.proto.repliesWrittenWhileBlocked == 0
    assert hs.proto.pendingInputBytes > 0  # the rest waits, unanswered
    # As the client reads, the session carries on, in order, to the end.
    answered = 0
    for _ in range(10):
        answered += len(replyLines(hs.transport.read()))
    assert answered == 20_000
    assert hs.transport.producerState == "producing"
    assert hs.proto.pendingInputBytes == 0


def test_a_client_that_stays_over_the_bound_is_dropped_after_command_timeout(hs, logged):
    hs.connect(auth="none")
    hs.proto.dataReceived(b"NOOP\r\n" * 20_000)
    timeout = hs.config.limits.commandTimeout
    hs.clock.advance(timeout - 1)
    assert not hs.transport.aborted
    hs.clock.advance(1)
    assert hs.transport.aborted
    assert any(line.startswith("timeout after NOOP from unknown[192.0.2.50]: replies not read for 300s")
               for line in logged())


def test_a_client_that_reads_in_time_is_not_dropped(hs):
    hs.connect(auth="none")
    hs.proto.dataReceived(b"NOOP\r\n" * 20_000)
    hs.clock.advance(hs.config.limits.commandTimeout - 1)
    hs.transport.read()  # drained: the stall timer is off, the idle timer back
    hs.clock.advance(hs.config.limits.commandTimeout - 1)
    assert not hs.transport.aborted and not hs.transport.disconnecting


def test_backpressure_carries_over_starttls(hs):
    hs.connect()
    hs.startTLS()
    # Twisted moves a registered producer into the TLS layer at startTLS.
    assert hs.transport.producer is hs.proto
    hs.proto.dataReceived(b"EHLO c\r\n" * 2_000)
    assert hs.transport.producerState == "paused"


# 3. Every way a session ends, ends in bounded time


def _quit(hs):
    hs.send(b"QUIT\r\n")


def _idle(hs):
    hs.clock.advance(hs.config.limits.commandTimeout)


def _errors(hs):
    hs.send(b"FOO\r\n" * hs.config.limits.errors)


def _shutdown(hs):
    hs.factory.shutdown(grace=3600)


def _throttled(hs):
    hs.startTLS()
    hs.send(b"EHLO c\r\n")
    for _ in range(3):
        hs.login(password="bad")


@pytest.mark.parametrize("end", [_quit, _idle, _errors, _shutdown, _throttled])
def test_a_closing_session_that_cannot_deliver_its_replies_is_aborted(hs, end):
    hs.connect()
    end(hs)
    assert hs.transport.disconnecting and not hs.transport.aborted
    # The client reads nothing: the close never completes by itself.
    hs.clock.advance(server.CLOSE_GRACE)
    assert hs.transport.aborted


def test_noops_and_quit_never_read_end_within_command_timeout(hs):
    hs.connect(auth="none")
    hs.proto.dataReceived(b"NOOP\r\n" * 200_000 + b"QUIT\r\n")
    hs.clock.advance(hs.config.limits.commandTimeout)
    assert hs.transport.aborted
    assert hs.proto.pendingInputBytes == 0


def test_a_session_that_closes_normally_leaves_no_timer_behind(hs):
    hs.connect()
    hs.send(b"QUIT\r\n")
    hs.proto.connectionLost(Failure(ConnectionError("closed")))
    assert hs.clock.getDelayedCalls() == []


# 2. Refused connections on an implicit-TLS port


def serverTLS(tmp_path) -> tuple[ServerTLS, trustme.CA]:
    ca = trustme.CA()
    leaf = ca.issue_cert("relay.test")
    leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    leaf.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    return ServerTLS(str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")), ca


def implicitSession(hs, tls, peer="192.0.2.50"):
    """A connection to a real implicit-TLS listener; the client has sent nothing yet."""
    listener = config.Listener("tcp:465", "implicit", "required", False)
    wrapped = TLSMemoryBIOFactory(tls, False, hs.factory.forListener(listener), clock=hs.clock)
    tlsProtocol = wrapped.buildProtocol(address.IPv4Address("TCP", peer, 40001))
    socket = SocketModel(peerAddress=address.IPv4Address("TCP", peer, 40001),
                         hostAddress=address.IPv4Address("TCP", "127.0.0.1", 465))
    tlsProtocol.makeConnection(socket)
    return tlsProtocol, socket


def test_refused_connection_on_implicit_tls_port_ends_without_a_handshake(tmp_path):
    hs = HostileHarness(tmp_path, limits=", connections_per_client: 1")
    tls, _ = serverTLS(tmp_path)
    implicitSession(hs, tls)  # holds the one slot of 192.0.2.50
    _, refused = implicitSession(hs, tls)
    assert len(hs.factory.sessions) == 1
    # The 421 waits inside TLS for a handshake this client never starts.
    assert not refused.disconnecting
    hs.clock.advance(server.CLOSE_GRACE)
    assert refused.aborted


def test_a_refused_connection_holds_no_slot(tmp_path):
    hs = HostileHarness(tmp_path, limits=", connections: 2, connections_per_client: 1")
    assert hs.connect(peer="192.0.2.50") == ["220 relay.test ESMTP relayd"]
    assert hs.connect(peer="192.0.2.50") == [
        "421 4.7.0 relay.test Error: too many connections from your address"]
    refused = hs.proto
    # Still closing (the client has not read the 421), yet another client gets in.
    assert hs.connect(peer="192.0.2.51") == ["220 relay.test ESMTP relayd"]
    refused.connectionLost(Failure(ConnectionError("closed")))
    assert len(hs.factory.sessions) == 2 and not hs.factory.refused


class ClientProtocol(protocol.Protocol):
    def connectionMade(self):
        self.received = b""

    def dataReceived(self, data):
        self.received += data


class TLSPair:
    """A real TLS client and relayd's implicit-TLS session, wired through memory."""

    def __init__(self, hs, tmp_path):
        self.hs = hs
        tls, ca = serverTLS(tmp_path)
        self.serverTLS, self.socket = implicitSession(hs, tls)
        self.session = self.serverTLS.wrappedProtocol
        clientFactory = protocol.Factory.forProtocol(ClientProtocol)
        options = ssl.optionsForClientTLS("relay.test", trustRoot=ssl.Certificate.loadPEM(ca.cert_pem.bytes()))
        self.clientTLS = TLSMemoryBIOFactory(options, True, clientFactory, clock=hs.clock).buildProtocol(None)
        self.clientSocket = StringTransport()
        self.clientTLS.makeConnection(self.clientSocket)
        self.client = self.clientTLS.wrappedProtocol

    def pump(self, clientReads=True):
        for _ in range(50):
            self.hs.clock.advance(0)  # TLS's small-write aggregation flushes
            moved = False
            toServer = self.clientSocket.value()
            self.clientSocket.clear()
            if toServer:
                self.serverTLS.dataReceived(toServer)
                moved = True
            if clientReads:
                toClient = self.socket.read()
                if toClient:
                    self.clientTLS.dataReceived(toClient)
                    moved = True
            if not moved:
                return

    def send(self, data: bytes):
        self.clientTLS.write(data)
        self.hs.clock.advance(0)


def test_tls_session_stops_reading_when_its_replies_back_up(tmp_path):
    hs = HostileHarness(tmp_path)
    pair = TLSPair(hs, tmp_path)
    pair.pump()
    assert pair.client.received == b"220 relay.test ESMTP relayd\r\n"
    # Registered once the handshake was done (through the TLS layer's membrane).
    assert pair.socket.producer is not None
    # The client pipelines NOOPs and stops reading.
    for _ in range(6):
        pair.send(b"NOOP\r\n" * 5_000)
        pair.pump(clientReads=False)
    assert pair.session._writeBlocked
    assert pair.socket.producerState == "paused"
    # Bounded: the socket's buffer, plus TLS's aggregation, plus records' overhead.
    assert server.SOCKET_BUFFER < pair.session.unsentReplyBytes <= server.MAX_UNSENT_TLS
    assert pair.session.repliesWrittenWhileBlocked <= server.MAX_UNSENT - server.SOCKET_BUFFER
    # The client reads everything: every NOOP is answered, in order.
    pair.pump()
    assert pair.client.received.count(b"250 2.0.0 Ok\r\n") == 30_000
    assert not pair.session._writeBlocked


def test_tls_session_that_is_never_read_is_dropped(tmp_path, logged):
    hs = HostileHarness(tmp_path)
    pair = TLSPair(hs, tmp_path)
    pair.pump()
    for _ in range(6):
        pair.send(b"NOOP\r\n" * 5_000)
        pair.pump(clientReads=False)
    hs.clock.advance(hs.config.limits.commandTimeout)
    assert pair.socket.aborted
    assert any("replies not read" in line for line in logged())


# 4. AUTH followed by a disconnect


class ResultHoldingPool:
    """Verifies at once (the thread has started) and holds the verdict until ``release``."""

    def __init__(self):
        self.held = []

    def callInThreadWithCallback(self, onResult, f, *args, **kw):
        try:
            self.held.append((onResult, True, f(*args, **kw)))
        except BaseException:
            self.held.append((onResult, False, Failure()))

    def release(self):
        held, self.held = self.held, []
        for onResult, ok, result in held:
            onResult(ok, result)


def test_verdict_of_a_check_whose_client_left_is_logged_and_counted(tmp_path, logged):
    hs = HostileHarness(tmp_path)
    pool = ResultHoldingPool()
    hs.portal.checkers[auth.credentials.IUsernamePassword].pool = pool
    for attempt in range(3):
        hs.authReady()
        hs.send(b"AUTH PLAIN " + plain("alice@example.com", "wrong") + b"\r\n")
        hs.proto.connectionLost(Failure(ConnectionError("gone")))
        pool.release()
        assert hs.take() == []
    failed = [line for line in logged() if "SASL PLAIN authentication failed" in line]
    assert failed == ["warning: unknown[192.0.2.50]: SASL PLAIN authentication failed: "
                      "authentication failure, sasl_username=alice@example.com"] * 3
    assert logged().count("lost connection after AUTH from unknown[192.0.2.50]") == 3
    assert hs.factory.authThrottle.blocked("192.0.2.50")
    assert any("failure limit exceeded" in line for line in logged())


def test_no_check_is_started_for_a_client_that_has_gone(hs, logged, monkeypatch):
    verified = []
    real = auth.Verifier.verify
    monkeypatch.setattr(auth.Verifier, "verify", lambda self, *a: verified.append(a) or real(self, *a))
    hs.authReady()
    hs.pool.hold = True
    hs.send(b"AUTH PLAIN " + plain("alice@example.com", "wrong") + b"\r\n")
    hs.proto.connectionLost(Failure(ConnectionError("gone")))
    hs.pool.release()  # the thread gets to it only now
    assert verified == []
    assert not any("authentication failed" in line for line in logged())
    assert hs.factory.authThrottle.startCheck("192.0.2.50")  # the slot was given back


def test_auth_pipelined_behind_a_disconnect_is_never_checked(tmp_path):
    pending = []
    hs = HostileHarness(tmp_path)

    def slowCommit(writer, envelope):
        d = defer.Deferred()
        pending.extend((writer, envelope, d))
        return d

    hs.factory.commit = slowCommit
    hs.pool.hold = True  # a check that starts waits here
    hs.authReady(auth="optional", peer="127.0.0.1")
    hs.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
    hs.send(b"Subject: x\r\n\r\nx\r\n.\r\nAUTH PLAIN " + plain("alice@example.com", "x") + b"\r\n")
    hs.proto.connectionLost(Failure(ConnectionError("gone")))
    writer, envelope, d = pending
    writer.commit(envelope)
    d.callback(None)
    assert hs.pool.held == []


# 5. Parallel guesses


def test_parallel_guesses_from_one_address_get_no_more_checks_than_the_limit(hs):
    hs.pool.hold = True
    sessions = []
    for _ in range(20):
        hs.authReady()
        out = hs.send(b"AUTH PLAIN " + plain("alice@example.com", "guess") + b"\r\n")
        sessions.append((hs.proto, hs.transport, out))
    limit = hs.config.auth.failureLimit
    assert len(hs.pool.held) == limit
    assert [out for _, _, out in sessions[limit:]] == [[THROTTLED]] * (20 - limit)
    assert all(t.disconnecting for _, t, _ in sessions[limit:])
    hs.pool.release()
    assert [t.value().decode().split("\r\n")[0] for _, t, _ in sessions[:limit]] == [FAILED] * limit


def test_another_address_is_not_held_back_by_checks_in_flight(hs):
    hs.pool.hold = True
    for _ in range(3):
        hs.authReady()
        hs.login(password="guess")
    hs.authReady(peer="192.0.2.51")
    assert hs.login() == []  # its check started
    assert len(hs.pool.held) == 4


# 6. The block: logged once, listed, lifted, kept across a reload


def test_block_is_logged_once_with_address_and_end(hs, logged):
    hs.pool.hold = True
    for _ in range(3):
        hs.authReady()
        hs.login(password="guess")
    hs.pool.release()
    blocks = [line for line in logged() if "failure limit exceeded" in line]
    until = hs.clock.seconds() + hs.config.auth.failureWindow
    assert blocks == [f"warning: SASL authentication failure limit exceeded: 3 in 600s from "
                      f"unknown[192.0.2.50]; AUTH blocked until {server.maillog.when(until)}"]
    assert hs.factory.authThrottle.blockedClients() == [("192.0.2.50", until)]


def test_reload_keeps_blocks(tmp_path):
    hs = HostileHarness(tmp_path)
    hs.authReady()
    for _ in range(3):
        hs.login(password="guess")
    before = hs.factory.authThrottle.blockedClients()
    assert before
    hs.factory.reconfigure(dataclasses.replace(hs.config, auth=dataclasses.replace(
        hs.config.auth, failureLimit=50, failureWindow=60.0)))
    assert hs.factory.authThrottle.limit == 50
    assert hs.factory.authThrottle.blockedClients() == before
    hs.authReady()
    assert hs.login() == [THROTTLED]


def test_no_reply_is_longer_than_max_reply():
    longest = "x" * (server.MAX_COMMAND_LINE)
    for name in dir(replies):
        reply = getattr(replies, name)
        if isinstance(reply, replies.Reply):
            fields = dict.fromkeys(("hostname", "address", "verb", "name", "queueId", "challenge"),
                                   longest)
            fields["hostname"] = "h" * 253
            assert len(reply.format(**fields).toBytes()) <= server.MAX_REPLY, name


def test_readme_states_the_session_bounds_computed_from_the_constants():
    from pathlib import Path

    readme = " ".join((Path(__file__).parent.parent / "README.rst").read_text().split())
    plainBound, tlsBound = server.MAX_SESSION_MEMORY, server.MAX_SESSION_MEMORY_TLS
    assert f"at most {plainBound:,} bytes ({round(plainBound / 1024)} KiB)" in readme
    assert f"{tlsBound:,} bytes ({round(tlsBound / 1024)} KiB) over TLS" in readme
    assert f"capped at {server.MAX_HELD_INPUT // 1024} KiB" in readme
    # 100 default connections, each with its queue file's write buffer during DATA.
    assert 100 * (tlsBound + 64 * 1024) < 86_000_000 and "under 86 MB" in readme
    assert f"not read within {server.CLOSE_GRACE:g} seconds" in readme


def test_lost_connection_is_logged_after_auth_only(hs, logged):
    hs.connect()
    hs.send(b"EHLO c\r\nNOOP\r\n")
    hs.proto.connectionLost(Failure(ConnectionError("gone")))  # a health check, say
    hs.authReady()
    hs.send(b"AUTH LOGIN\r\n")
    hs.proto.connectionLost(Failure(ConnectionError("gone")))
    assert [line for line in logged() if line.startswith("lost connection")] == [
        "lost connection after AUTH from unknown[192.0.2.50]"]
