"""
Tests for relayd.courier: the SMTP client dialogue over StringTransport with
a task.Clock (exact bytes, every reply class, every timeout stage), the
stateful dot-stuffing, failover between hops, and integration against real
servers on 127.0.0.1 (Postfix's smtp-sink and aiosmtpd), each scenario run
with the real reactor in a subprocess so the test process never runs it.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import pytest
from twisted.internet import defer, error
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from relayd.config import NextHop
from relayd.courier import Courier
from relayd.delivery import AttemptResult, Destination, classify
from relayd.envelope import Status
from relayd.route import mxHop
from relayd.smtpclient import (
    CHUNK_SIZE,
    MAX_REPLY_BYTES,
    MAX_REPLY_LINES,
    QUIT_TIMEOUT,
    DotStuffer,
    HopRefused,
    OutboundSession,
    ServerReply,
    SessionBroken,
    Timeouts,
    parseReplyLine,
)
from tests.builders import testConfig

ROOT = Path(__file__).resolve().parent.parent


def Hop(host: str, port: int = 25, tls: str = "none") -> NextHop:
    """A configured next hop with the defaults these tests mostly need."""
    return NextHop(host, port, tls)


GREETING = b"220 mx.example.net ESMTP\r\n"
EHLO_FULL = (
    b"250-mx.example.net\r\n"
    b"250-PIPELINING\r\n"
    b"250-SIZE 10240000\r\n"
    b"250-8BITMIME\r\n"
    b"250-AUTH PLAIN LOGIN\r\n"
    b"250-STARTTLS\r\n"
    b"250 ENHANCEDSTATUSCODES\r\n"
)
EHLO_PLAIN = b"250-mx.example.net\r\n250 ENHANCEDSTATUSCODES\r\n"
PEER = "mx.example.net[192.0.2.7]"


class TLSStringTransport(StringTransport):
    """Records startTLS: what follows is "inside TLS" for the test."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tlsStarted = []

    def startTLS(self, options):
        self.tlsStarted.append(options)


class Peer:
    """
    The server side of one OutboundSession over a StringTransport: feed it
    server bytes, read what the client wrote. The body producer is driven
    the way a real transport does: with ``pump`` off, every write fills the
    transport's buffer (pauseProducing) until the test resumes it. An
    aborted or closed transport is reported to the protocol as connectionLost.
    """

    def __init__(self, timeouts=Timeouts(), chunkSize=CHUNK_SIZE, clock=None, **sessionArgs):
        self.clock = clock or Clock()
        self.transport = TLSStringTransport(
            peerAddress=IPv4Address("TCP", "192.0.2.7", 25)
        )
        self.session = OutboundSession(
            self.clock, "relay.example.com", timeouts, "mx.example.net", chunkSize, **sessionArgs
        )
        self.pump = True
        self.lost = False
        write = self.transport.write

        def writeFillingTheBuffer(data):
            write(data)
            if not self.pump and self.transport.producer is not None:
                self.transport.producer.pauseProducing()

        self.transport.write = writeFillingTheBuffer
        self.session.makeConnection(self.transport)

    def feed(self, data: bytes) -> None:
        self.session.dataReceived(data)
        self.settle()

    def settle(self) -> None:
        while self.pump and self.transport.producer is not None and not self.lost:
            self.transport.producer.resumeProducing()
        if self.transport.disconnecting and not self.lost:
            self.lost = True
            self.session.connectionLost(Failure(error.ConnectionDone()))

    def sent(self) -> bytes:
        value = self.transport.value()
        self.transport.clear()
        return value

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.settle()

    def ready(self, ehlo: bytes = EHLO_FULL) -> None:
        self.feed(GREETING)
        assert self.sent() == b"EHLO relay.example.com\r\n"
        self.feed(ehlo)
        assert self.session.whenReady().called


def result(d: defer.Deferred):
    """The result a Deferred already fired with (fails the test if not)."""
    assert d.called, "Deferred has not fired"
    box = []
    d.addBoth(lambda r: (box.append(r), r)[1])
    if isinstance(box[0], Failure):
        box[0].raiseException()
    return box[0]


def failureOf(d: defer.Deferred) -> Failure:
    assert d.called, "Deferred has not fired"
    box = []
    d.addBoth(lambda r: (box.append(r), None)[1])
    assert isinstance(box[0], Failure), f"expected a failure, got {box[0]!r}"
    return box[0]


def send(peer: Peer, recipients, body=b"Subject: t\r\n\r\nhello\r\n", params=None, sender="s@example.com"):
    return peer.session.sendMessage(
        sender, params or {}, recipients, lambda: io.BytesIO(body), len(body)
    )


def unstuff(wire: bytes) -> bytes:
    """The body a receiver reconstructs from DATA bytes ending in CRLF.CRLF."""
    assert wire.endswith(b"\r\n.\r\n") or wire == b".\r\n"
    lines = wire[:-3].split(b"\r\n")[:-1]
    return b"".join((line[1:] if line.startswith(b".") else line) + b"\r\n" for line in lines)


# -- pure parts ------------------------------------------------------------


@pytest.mark.parametrize(
    "code, status",
    [(250, Status.SENT), (221, Status.SENT), (450, Status.DEFERRED), (421, Status.DEFERRED), (550, Status.BOUNCED),
     (554, Status.BOUNCED), (354, Status.DEFERRED), (0, Status.DEFERRED), (199, Status.DEFERRED)],
)
def test_classify(code, status):
    assert classify(code) == status


@pytest.mark.parametrize(
    "line, parsed",
    [
        (b"250-PIPELINING", (250, False, b"PIPELINING")),
        (b"250 2.0.0 Ok", (250, True, b"2.0.0 Ok")),
        (b"250", (250, True, b"")),
        (b"25O Ok", None),
        (b"250:Ok", None),
        (b"hello", None),
        (b"999 x", None),
    ],
)
def test_parseReplyLine(line, parsed):
    assert parseReplyLine(line) == parsed


@pytest.mark.parametrize(
    "reply, dsn",
    [
        (ServerReply(250, (b"2.0.0 Ok: queued as X",)), "2.0.0"),
        (ServerReply(250, (b"Ok",)), "2.0.0"),
        (ServerReply(450, (b"4.7.1 Greylisted",)), "4.7.1"),
        (ServerReply(450, (b"Mailbox busy",)), "4.0.0"),
        (ServerReply(550, (b"5.1.1 <a@b>: unknown",)), "5.1.1"),
        (ServerReply(550, (b"4.1.1 wrong class",)), "5.0.0"),
        (ServerReply(554, (b"5.7.1Ok",)), "5.0.0"),
    ],
)
def test_enhancedCode(reply, dsn):
    assert reply.enhancedCode() == dsn


def test_reply_text_joins_lines():
    assert ServerReply(550, (b"5.7.1 first", b"second")).text() == "550 5.7.1 first second"


# -- dot-stuffing ------------------------------------------------------------


def stuffInChunks(body: bytes, size: int) -> bytes:
    stuffer = DotStuffer()
    out = [stuffer.transform(body[i:i + size]) for i in range(0, len(body), size)]
    out.append(stuffer.finish())
    return b"".join(out)


def assertWireCarries(wire: bytes, body: bytes) -> None:
    """Exactly one end-of-data marker, at the end, and the body unstuffs back."""
    expected = body if body.endswith(b"\r\n") or not body else body + b"\r\n"
    if body:
        assert wire.find(b"\r\n.\r\n") == len(wire) - 5
        assert not wire.startswith(b".\r\n")
    else:
        assert wire == b".\r\n"
    assert unstuff(wire) == expected


def boundaryBody(chunkSize: int) -> bytes:
    """
    A '.' line first, then lines starting with '.' whose line starts fall
    on every offset around chunk boundaries, a line that is exactly '.',
    '..' lines and a final line without CRLF.
    """
    parts = [b".\r\n", b"..\r\n"]
    for pad in range(2 * chunkSize + 3):
        parts.append(b"x" * pad + b"\r\n.\r\n.dot\r\n..\r\n")
    parts.append(b".last")
    return b"".join(parts)


@pytest.mark.parametrize("chunkSize", [1, 2, 3, 7, 64])
def test_dotstuff_boundaries_small_chunks(chunkSize):
    body = boundaryBody(chunkSize)
    wire = stuffInChunks(body, chunkSize)
    assertWireCarries(wire, body)
    assert wire.startswith(b"..\r\n...\r\n")
    assert wire.endswith(b"\r\n..last\r\n.\r\n")


@pytest.mark.parametrize("shift", range(-4, 5))
def test_dotstuff_boundaries_default_chunk(shift):
    # A "\r\n." whose bytes sit at every position around the 64 KiB boundary.
    body = b"x" * (CHUNK_SIZE + shift - 2) + b"\r\n.\r\n.x\r\n" + b"y" * 100 + b"\r\n.\r\n"
    wire = stuffInChunks(body, CHUNK_SIZE)
    assertWireCarries(wire, body)
    assert wire.count(b"\r\n..") == 3


def test_dotstuff_empty_body():
    assert stuffInChunks(b"", 7) == b".\r\n"


def test_dotstuff_crlf_ending_gets_short_terminator():
    assert stuffInChunks(b"a\r\n", 7) == b"a\r\n.\r\n"
    assert stuffInChunks(b"a", 7) == b"a\r\n.\r\n"


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 100])
def test_dotstuff_normalises_bare_lf_and_cr(size):
    body = b".a\nb\r\n.c\rd\r\r\n.\n\r"
    assert stuffInChunks(body, size) == (
        b"..a\r\nb\r\n..c\r\nd\r\n\r\n..\r\n\r\n.\r\n"
    )


def test_dotstuff_never_emits_bare_cr_or_lf():
    rng = random.Random(7)
    body = bytes(rng.choice(b"\r\n.a") for _ in range(5000))
    for size in (1, 3, 7, 64):
        wire = stuffInChunks(body, size)
        assert wire.replace(b"\r\n", b"").count(b"\r") == 0
        assert wire.replace(b"\r\n", b"").count(b"\n") == 0
        assert wire.find(b"\r\n.\r\n") == len(wire) - 5


# -- the dialogue ------------------------------------------------------------


def test_full_dialogue_exact_bytes_with_pipelining():
    peer = Peer()
    peer.ready()
    s = peer.session
    assert s.capabilities == {
        "PIPELINING": "",
        "SIZE": "10240000",
        "8BITMIME": "",
        "AUTH": "PLAIN LOGIN",
        "STARTTLS": "",
        "ENHANCEDSTATUSCODES": "",
    }
    body = b"Subject: t\r\n\r\n.hello\r\n"
    d = send(peer, ["a@x.org", "b@y.org"], body, {"BODY": "8BITMIME"})
    # DATA goes in the same group as MAIL and RCPT.
    assert peer.sent() == (
        b"MAIL FROM:<s@example.com> SIZE=%d BODY=8BITMIME\r\n"
        b"RCPT TO:<a@x.org>\r\n"
        b"RCPT TO:<b@y.org>\r\n"
        b"DATA\r\n" % len(body)
    )
    peer.feed(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n")
    assert peer.sent() == b""  # the body waits for the reply to DATA
    peer.feed(b"354 End data with <CR><LF>.<CR><LF>\r\n")
    assert peer.sent() == b"Subject: t\r\n\r\n..hello\r\n.\r\n"
    assert not d.called
    peer.feed(b"250 2.0.0 Ok: queued as 9XK2\r\n")
    outcome = result(d)
    assert outcome.mailAccepted
    assert [(r.address, r.code, r.dsn, r.text, r.status) for r in outcome.results] == [
        ("a@x.org", 250, "2.0.0", "250 2.0.0 Ok: queued as 9XK2", Status.SENT),
        ("b@y.org", 250, "2.0.0", "250 2.0.0 Ok: queued as 9XK2", Status.SENT),
    ]
    closed = s.quit()
    assert peer.sent() == b"QUIT\r\n"
    peer.feed(b"221 2.0.0 Bye\r\n")
    assert peer.lost and closed.called
    assert s.relay == "mx.example.net[192.0.2.7]:25"


def test_no_pipelining_one_command_at_a_time_and_no_params():
    peer = Peer()
    peer.ready(EHLO_PLAIN)
    d = send(peer, ["a@x.org", "b@y.org"], params={"BODY": "8BITMIME"})
    assert peer.sent() == b"MAIL FROM:<s@example.com>\r\n"
    peer.feed(b"250 Ok\r\n")
    assert peer.sent() == b"RCPT TO:<a@x.org>\r\n"
    peer.feed(b"250 Ok\r\n")
    assert peer.sent() == b"RCPT TO:<b@y.org>\r\n"
    peer.feed(b"250 Ok\r\n")
    assert peer.sent() == b"DATA\r\n"
    peer.feed(b"354 go\r\n")
    peer.sent()
    peer.feed(b"250 Ok queued\r\n")
    assert [r.dsn for r in result(d).results] == ["2.0.0", "2.0.0"]


def test_null_sender():
    peer = Peer()
    peer.ready(EHLO_PLAIN)
    send(peer, ["a@x.org"], sender="")
    assert peer.sent() == b"MAIL FROM:<>\r\n"


def test_helo_fallback_after_ehlo_5xx():
    peer = Peer()
    peer.feed(GREETING)
    assert peer.sent() == b"EHLO relay.example.com\r\n"
    peer.feed(b"502 5.5.2 Error: command not recognized\r\n")
    assert peer.sent() == b"HELO relay.example.com\r\n"
    peer.feed(b"250 mx.example.net\r\n")
    assert result(peer.session.whenReady()) is peer.session
    assert peer.session.capabilities == {}
    send(peer, ["a@x.org"])
    assert peer.sent() == b"MAIL FROM:<s@example.com>\r\n"


def test_ehlo_4xx_refuses_hop_without_helo():
    peer = Peer()
    peer.feed(GREETING)
    peer.sent()
    peer.feed(b"421 4.3.2 Service shutting down\r\n")
    failure = failureOf(peer.session.whenReady())
    assert failure.check(HopRefused)
    assert failure.value.text == (
        f"host {PEER} said: 421 4.3.2 Service shutting down (in reply to EHLO command)"
    )
    assert peer.sent() == b"QUIT\r\n"


def test_greeting_refused():
    peer = Peer()
    peer.feed(b"554 5.7.1 go away\r\n")
    failure = failureOf(peer.session.whenReady())
    assert failure.value.text == f"host {PEER} refused to talk to me: 554 5.7.1 go away"
    assert peer.sent() == b"QUIT\r\n"


def test_multiline_greeting_and_replies_split_across_reads():
    peer = Peer()
    for byte in b"220-mx.example.net ESMTP\r\n220 second line\r\n":
        peer.feed(bytes([byte]))
    assert peer.sent() == b"EHLO relay.example.com\r\n"
    for piece in (EHLO_FULL[:10], EHLO_FULL[10:33], EHLO_FULL[33:]):
        assert not peer.session.whenReady().called
        peer.feed(piece)
    assert "AUTH" in peer.session.capabilities


def test_mixed_recipient_results():
    peer = Peer()
    peer.ready()
    d = send(peer, ["ok@x.org", "later@x.org", "never@x.org", "plain@x.org"])
    peer.sent()
    peer.feed(
        b"250 2.1.0 Ok\r\n"
        b"250 2.1.5 Ok\r\n"
        b"450 4.2.0 <later@x.org>: Recipient address rejected: Greylisted\r\n"
        b"550-5.1.1 <never@x.org>: Recipient address rejected:\r\n"
        b"550 5.1.1 User unknown\r\n"
        b"550 no such user\r\n"
    )
    assert peer.sent() == b""
    peer.feed(b"354 go\r\n")
    peer.sent()
    peer.feed(b"250 2.0.0 Ok: queued as Q1\r\n")
    got = [(r.address, r.code, r.dsn, r.status, r.text) for r in result(d).results]
    assert got == [
        ("ok@x.org", 250, "2.0.0", Status.SENT, "250 2.0.0 Ok: queued as Q1"),
        ("later@x.org", 450, "4.2.0", Status.DEFERRED,
         f"host {PEER} said: 450 4.2.0 <later@x.org>: Recipient address rejected: "
         "Greylisted (in reply to RCPT TO command)"),
        ("never@x.org", 550, "5.1.1", Status.BOUNCED,
         f"host {PEER} said: 550 5.1.1 <never@x.org>: Recipient address rejected: "
         "5.1.1 User unknown (in reply to RCPT TO command)"),
        ("plain@x.org", 550, "5.0.0", Status.BOUNCED,
         f"host {PEER} said: 550 no such user (in reply to RCPT TO command)"),
    ]


def test_final_4xx_defers_every_accepted_recipient_only():
    peer = Peer()
    peer.ready()
    d = send(peer, ["a@x.org", "b@x.org", "c@x.org"])
    peer.sent()
    peer.feed(b"250 Ok\r\n250 Ok\r\n550 5.1.1 unknown\r\n250 Ok\r\n")
    peer.feed(b"354 go\r\n")
    peer.feed(b"452 4.3.1 Insufficient system storage\r\n")
    got = [(r.address, r.code, r.dsn, r.status) for r in result(d).results]
    assert got == [
        ("a@x.org", 452, "4.3.1", Status.DEFERRED),
        ("b@x.org", 550, "5.1.1", Status.BOUNCED),
        ("c@x.org", 452, "4.3.1", Status.DEFERRED),
    ]
    assert result(d).results[0].text.endswith("(in reply to end of DATA command)")


def test_final_5xx_bounces_accepted():
    peer = Peer()
    peer.ready()
    d = send(peer, ["a@x.org"])
    peer.feed(b"250 Ok\r\n250 Ok\r\n354 go\r\n")
    peer.feed(b"554 5.7.1 spam\r\n")
    [r] = result(d).results
    assert (r.code, r.dsn, r.status) == (554, "5.7.1", Status.BOUNCED)


def test_data_command_refused():
    peer = Peer()
    peer.ready()
    d = send(peer, ["a@x.org"])
    peer.sent()
    peer.feed(b"250 Ok\r\n250 Ok\r\n")
    assert peer.sent() == b""
    peer.feed(b"451 4.3.0 try later\r\n")
    assert peer.sent() == b""  # no body
    [r] = result(d).results
    assert (r.code, r.dsn, r.status) == (451, "4.3.0", Status.DEFERRED)
    assert r.text.endswith("(in reply to DATA command)")


@pytest.mark.parametrize("code, status", [(b"550 5.7.1", Status.BOUNCED), (b"451 4.3.0", Status.DEFERRED)])
def test_mail_refused_applies_to_all_and_sends_no_body(code, status):
    peer = Peer()
    peer.ready()
    d = send(peer, ["a@x.org", "b@x.org"])
    peer.sent()
    peer.feed(code + b" sender rejected\r\n503 5.5.1 Error: need MAIL command\r\n")
    assert not d.called  # the pipelined RCPT and DATA replies are still owed
    peer.feed(b"503 5.5.1 Error: need MAIL command\r\n")
    assert not d.called
    peer.feed(b"554 5.5.1 Error: no valid recipients\r\n")
    outcome = result(d)
    assert not outcome.mailAccepted
    assert {(r.status, r.dsn) for r in outcome.results} == {(status, code[4:].decode())}
    assert outcome.results[0].text.endswith("(in reply to MAIL FROM command)")
    assert peer.sent() == b""


def test_no_body_when_every_recipient_refused():
    peer = Peer()
    peer.ready()
    d = send(peer, ["a@x.org", "b@x.org"])
    peer.sent()
    peer.feed(b"250 Ok\r\n550 5.1.1 no\r\n450 4.2.1 later\r\n")
    assert not d.called  # the reply to the pipelined DATA is still owed
    peer.feed(b"554 5.5.1 Error: no valid recipients\r\n")
    assert [r.status for r in result(d).results] == [Status.BOUNCED, Status.DEFERRED]
    assert peer.sent() == b""
    # The open transaction is reset before the next message on this session.
    send(peer, ["c@x.org"])
    assert peer.sent() == b"RSET\r\n"
    peer.feed(b"250 Ok\r\n")
    assert peer.sent().startswith(b"MAIL FROM:<s@example.com>")


@pytest.mark.parametrize("mailReply, rcptReply", [
    (b"250 Ok", b"550 5.1.1 no"),  # every recipient refused
    (b"451 4.3.0 later", b"503 5.5.1 need MAIL"),  # the sender refused
], ids=["recipients refused", "sender refused"])
def test_data_accepted_with_no_one_to_send_to_gets_a_lone_dot(mailReply, rcptReply):
    """RFC 2920 3.1: a server may answer the pipelined DATA with 354 anyway."""
    peer = Peer()
    peer.ready()
    d = send(peer, ["a@x.org"], b"secret body\r\n")
    peer.sent()
    peer.feed(mailReply + b"\r\n" + rcptReply + b"\r\n354 go ahead\r\n")
    assert peer.sent() == b".\r\n"  # an empty message: never the body
    assert not d.called
    peer.feed(b"554 5.5.1 no valid recipients\r\n")
    [r] = result(d).results
    assert r.status in (Status.BOUNCED, Status.DEFERRED)
    assert r.text.endswith("(in reply to RCPT TO command)" if mailReply.startswith(b"250")
                           else "(in reply to MAIL FROM command)")
    # The transaction ended with the dot: the next message needs no RSET.
    send(peer, ["c@x.org"])
    assert peer.sent().startswith(b"MAIL FROM:<s@example.com>")


def test_second_message_on_same_session_after_success_needs_no_rset():
    peer = Peer()
    peer.ready()
    d = send(peer, ["a@x.org"])
    peer.feed(b"250 Ok\r\n250 Ok\r\n354 go\r\n")
    peer.feed(b"250 Ok: queued as 1\r\n")
    assert result(d).results[0].status == Status.SENT
    peer.sent()
    d = send(peer, ["b@x.org"], body=b"two\r\n")
    assert peer.sent().startswith(b"MAIL FROM:")
    peer.feed(b"250 Ok\r\n250 Ok\r\n354 go\r\n")
    assert peer.sent() == b"two\r\n.\r\n"
    peer.feed(b"250 Ok: queued as 2\r\n")
    assert result(d).results[0].text == "250 Ok: queued as 2"


def test_address_with_line_break_is_never_written():
    peer = Peer()
    peer.ready()
    d = send(peer, ["a@x.org\r\nRCPT TO:<evil@x.org>", "b@x.org"])
    assert peer.sent() == b"MAIL FROM:<s@example.com> SIZE=21\r\nRCPT TO:<b@x.org>\r\nDATA\r\n"
    peer.feed(b"250 Ok\r\n250 Ok\r\n354 go\r\n")
    peer.feed(b"250 Ok\r\n")
    assert [(r.status, r.dsn) for r in result(d).results] == [(Status.BOUNCED, "5.1.3"), (Status.SENT, "2.0.0")]


def test_malformed_reply_breaks_session():
    peer = Peer()
    peer.ready()
    d = send(peer, ["a@x.org"])
    peer.feed(b"250 Ok\r\nhello there\r\n")
    [r] = result(d).results
    assert (r.status, r.dsn) == (Status.DEFERRED, "4.4.2")
    assert r.text == f"{PEER} sent a malformed reply: hello there"
    assert peer.transport.disconnected  # aborted


def test_connection_lost_mid_rcpt_fires_the_result():
    peer = Peer()
    peer.ready()
    d = send(peer, ["a@x.org", "b@x.org"])
    peer.feed(b"250 Ok\r\n550 5.1.1 no\r\n")
    peer.session.connectionLost(Failure(error.ConnectionLost()))
    got = [(r.status, r.dsn, r.text) for r in result(d).results]
    assert got == [
        (Status.BOUNCED, "5.1.1", f"host {PEER} said: 550 5.1.1 no (in reply to RCPT TO command)"),
        (Status.DEFERRED, "4.4.2", f"lost connection with {PEER} while sending RCPT TO"),
    ]
    assert result(d).broken and result(d).mailAccepted


def test_quit_is_bounded():
    peer = Peer()
    peer.ready()
    closed = peer.session.quit()
    assert peer.sent() == b"QUIT\r\n"
    peer.advance(QUIT_TIMEOUT - 0.5)
    assert not closed.called
    peer.advance(1)
    assert closed.called and peer.transport.disconnected


# -- timeouts, one per stage ---------------------------------------------------

TIMEOUTS = Timeouts(connect=1, greeting=11, mail=12, rcpt=13, dataInit=14, dataBlock=15, dataDone=16)


def _toGreeting(peer):
    return peer.session.whenReady()


def _toEhlo(peer):
    peer.feed(GREETING)
    return peer.session.whenReady()


def _toMail(peer):
    peer.ready(EHLO_PLAIN)
    return send(peer, ["a@x.org"])


def _toRcpt(peer):
    peer.ready(EHLO_PLAIN)
    d = send(peer, ["a@x.org"])
    peer.feed(b"250 Ok\r\n")
    return d


def _toPipelinedRcpt(peer):
    peer.ready()
    d = send(peer, ["a@x.org", "b@x.org"])
    peer.feed(b"250 Ok\r\n250 Ok\r\n")
    return d


def _toData(peer):
    d = _toRcpt(peer)
    peer.feed(b"250 Ok\r\n")
    return d


def _toBody(peer):
    d = _toData(peer)
    peer.pump = False
    peer.feed(b"354 go\r\n")
    # The transport took the first chunk and never asks for more.
    peer.transport.producer.resumeProducing()
    return d


def _toDot(peer):
    d = _toData(peer)
    peer.feed(b"354 go\r\n")
    return d


@pytest.mark.parametrize(
    "drive, limit, text",
    [
        (_toGreeting, 11, "receiving the initial server greeting"),
        (_toEhlo, 11, "performing the EHLO handshake"),
        (_toMail, 12, "sending MAIL FROM"),
        (_toRcpt, 13, "sending RCPT TO"),
        (_toPipelinedRcpt, 13, "sending RCPT TO"),
        (_toData, 14, "sending DATA command"),
        (_toBody, 15, "sending message body"),
        (_toDot, 16, "sending end of data -- message may be sent more than once"),
    ],
)
def test_each_stage_times_out(drive, limit, text):
    peer = Peer(TIMEOUTS, chunkSize=4)
    d = drive(peer)
    peer.advance(limit - 0.5)
    assert not d.called
    assert not peer.transport.disconnected
    peer.advance(0.5)
    assert peer.transport.disconnected  # aborted, not closed politely
    expected = f"conversation with {PEER} timed out while {text}"
    if drive in (_toGreeting, _toEhlo):
        failure = failureOf(d)
        assert failure.check(SessionBroken)
        assert (failure.value.dsn, failure.value.text) == ("4.4.2", expected)
    else:
        outcome = result(d)
        assert outcome.broken
        assert {(r.status, r.dsn, r.text) for r in outcome.results} == {
            (Status.DEFERRED, "4.4.2", expected)
        }


def test_rcpt_timer_restarts_for_each_reply():
    peer = Peer(TIMEOUTS)
    peer.ready()
    d = send(peer, ["a@x.org", "b@x.org"])
    peer.advance(10)
    peer.feed(b"250 Ok\r\n")
    peer.advance(10)
    peer.feed(b"250 Ok\r\n")
    peer.advance(10)
    assert not d.called  # 30s in total, but never 13s without a reply
    peer.advance(3)
    assert result(d).results[0].text.endswith("timed out while sending RCPT TO")


def test_body_timer_restarts_on_progress():
    peer = Peer(TIMEOUTS, chunkSize=4)
    d = _toData(peer)
    peer.pump = False
    peer.feed(b"354 go\r\n")
    producer = peer.transport.producer
    for _ in range(3):
        peer.advance(14)
        producer.resumeProducing()
    assert not d.called
    while peer.transport.producer is not None:
        producer.resumeProducing()
    assert peer.transport.value().endswith(b"hello\r\n.\r\n")
    peer.feed(b"250 Ok\r\n")
    assert result(d).results[0].status == Status.SENT


# -- body on the wire ------------------------------------------------------------


@pytest.mark.parametrize("chunkSize", [7, CHUNK_SIZE])
def test_session_writes_stuffed_body(chunkSize):
    # Filler of legal lines (at most 998 octets) as long as one chunk less
    # three bytes, so the dot lines after it straddle the chunk boundary.
    filler = (b"x" * 98 + b"\r\n") * ((CHUNK_SIZE - 3) // 100)
    filler += b"x" * (CHUNK_SIZE - 3 - len(filler))
    body = boundaryBody(7) + filler + b"\r\n.\r\n..\r\n.end\r\n"
    peer = Peer(chunkSize=chunkSize)
    peer.ready()
    d = send(peer, ["a@x.org"], body=body)
    peer.feed(b"250 Ok\r\n250 Ok\r\n")
    peer.sent()
    peer.feed(b"354 go\r\n")
    wire = peer.sent()
    assertWireCarries(wire, body)
    peer.feed(b"250 Ok\r\n")
    assert result(d).results[0].status == Status.SENT


def test_a_body_of_one_chunk_and_its_final_dot_go_out_in_one_write():
    # One send for the body of a small message: the transport sends each
    # write at once (relayd.tcp), so two writes would be two segments.
    peer = Peer()
    writes = []
    write = peer.transport.write

    def recording(data):
        writes.append(data)
        write(data)

    peer.transport.write = recording
    peer.ready()
    d = send(peer, ["a@x.org"], body=b"Subject: hi\r\n\r\nhello\r\n")
    peer.feed(b"250 Ok\r\n250 Ok\r\n")
    del writes[:]
    peer.feed(b"354 go\r\n")
    assert writes == [b"Subject: hi\r\n\r\nhello\r\n.\r\n"]
    peer.feed(b"250 Ok\r\n")
    assert result(d).results[0].status == Status.SENT


def test_body_is_read_in_chunks():
    reads = []

    class Body(io.BytesIO):
        def read(self, n=-1):
            reads.append(n)
            return super().read(n)

    peer = Peer(chunkSize=7)
    peer.ready()
    body = b"a" * 20 + b"\r\n"
    peer.session.sendMessage("s@x", {}, ["a@x.org"], lambda: Body(body), len(body))
    peer.feed(b"250 Ok\r\n250 Ok\r\n354 go\r\n")
    assert reads and set(reads) == {7}


def test_unreadable_body_defers_and_aborts():
    peer = Peer()
    peer.ready()

    def openBody():
        raise FileNotFoundError(2, "No such file or directory")

    d = peer.session.sendMessage("s@x", {}, ["a@x.org"], openBody, 10)
    peer.feed(b"250 Ok\r\n250 Ok\r\n354 go\r\n")
    [r] = result(d).results
    assert (r.status, r.dsn) == (Status.DEFERRED, "4.3.0")
    assert peer.transport.disconnected


# -- the courier: hops, failover, SIZE ----------------------------------------------


class FakeEndpoint:
    """Connects the protocol to a StringTransport Peer, or fails, or hangs."""

    def __init__(self, owner, hop):
        self.owner = owner
        self.hop = hop

    def connect(self, factory):
        name = getattr(self.hop, "address", None) or self.hop.host
        self.owner.attempts.append(name)
        behaviour = self.owner.behaviour[name]
        if isinstance(behaviour, Exception):
            return defer.fail(behaviour)
        if behaviour == "hang":
            return defer.Deferred(lambda d: d.errback(error.ConnectingCancelledError(None)))
        protocol = factory.buildProtocol(None)
        transport = TLSStringTransport(peerAddress=IPv4Address("TCP", behaviour, self.hop.port))
        peer = Peer.__new__(Peer)
        peer.clock, peer.transport, peer.session = self.owner.clock, transport, protocol
        peer.pump, peer.lost = True, False
        protocol.makeConnection(transport)
        self.owner.peers[name] = peer
        return defer.succeed(protocol)


class Network:
    def __init__(self, **behaviour):
        self.clock = Clock()
        self.behaviour = {k.replace("_", "."): v for k, v in behaviour.items()}
        self.attempts: list[str] = []
        self.peers: dict[str, Peer] = {}

    def courier(self, timeouts=Timeouts(), **kwargs):
        return Courier(self.clock, "relay.example.com", timeouts,
                       endpointFactory=lambda reactor, hop, t: FakeEndpoint(self, hop), **kwargs)


def deliver(courier, hops, recipients=("a@x.org", "b@x.org"), body=b"hi\r\n", size=None):
    return courier.deliver(
        Destination(tuple(hops)), "s@example.com", {}, list(recipients), lambda: io.BytesIO(body),
        len(body) if size is None else size,
    )


def converse(peer: Peer, steps):
    for data in steps:
        peer.feed(data)


HAPPY = [GREETING, EHLO_FULL, b"250 Ok\r\n250 Ok\r\n250 Ok\r\n", b"354 go\r\n",
         b"250 2.0.0 Ok: queued as Z\r\n", b"221 Bye\r\n"]


def test_courier_delivers_and_times_phases():
    net = Network(smtp_example_net="192.0.2.9")
    d = deliver(net.courier(), [Hop("smtp.example.net", 587)])
    peer = net.peers["smtp.example.net"]
    converse(peer, HAPPY[:2])
    net.clock.advance(2)
    converse(peer, HAPPY[2:4])
    net.clock.advance(3)
    converse(peer, HAPPY[4:])
    attempt = result(d)
    assert isinstance(attempt, AttemptResult)
    assert attempt.relay == "smtp.example.net[192.0.2.9]:587"
    assert [r.status for r in attempt.results] == [Status.SENT, Status.SENT]
    assert (attempt.connectSeconds, attempt.transmitSeconds) == (0, 5)


def test_courier_connection_refused_everywhere():
    net = Network(**{"192_0_2_1": error.ConnectionRefusedError()})
    d = deliver(net.courier(), [Hop("192.0.2.1")])
    attempt = result(d)
    assert attempt.relay == "none"
    assert {(r.code, r.status, r.dsn, r.text) for r in attempt.results} == {
        (0, Status.DEFERRED, "4.4.1", "connect to 192.0.2.1[192.0.2.1]:25: Connection refused")
    }


def test_courier_dns_failure():
    net = Network(nowhere_invalid=error.DNSLookupError("no results"))
    attempt = result(deliver(net.courier(), [Hop("nowhere.invalid")]))
    assert attempt.relay == "none"
    assert attempt.results[0].dsn == "4.4.1"
    assert "nowhere.invalid" in attempt.results[0].text


def test_courier_connect_timeout():
    net = Network(slow_example="hang")
    d = deliver(net.courier(Timeouts(connect=7)), [Hop("slow.example")])
    net.clock.advance(6.5)
    assert not d.called
    net.clock.advance(0.5)
    attempt = result(d)
    assert (attempt.relay, attempt.results[0].dsn) == ("none", "4.4.1")
    assert attempt.results[0].text == "connect to slow.example:25: Connection timed out"


def test_courier_fails_over_after_refused_connection():
    net = Network(a_example=error.ConnectionRefusedError(), b_example="192.0.2.8")
    d = deliver(net.courier(), [Hop("a.example"), Hop("b.example")])
    converse(net.peers["b.example"], HAPPY)
    attempt = result(d)
    assert net.attempts == ["a.example", "b.example"]
    assert attempt.relay == "b.example[192.0.2.8]:25"
    assert [r.status for r in attempt.results] == [Status.SENT, Status.SENT]


@pytest.mark.parametrize(
    "steps",
    [
        [b"421 4.3.2 busy\r\n"],
        [GREETING, b"421 4.3.2 closing\r\n"],
    ],
)
def test_courier_fails_over_after_refused_greeting_or_ehlo(steps):
    net = Network(a_example="192.0.2.7", b_example="192.0.2.8")
    d = deliver(net.courier(), [Hop("a.example"), Hop("b.example")])
    converse(net.peers["a.example"], steps)
    assert net.peers["a.example"].transport.value().endswith(b"QUIT\r\n")
    net.peers["a.example"].feed(b"221 Bye\r\n")
    converse(net.peers["b.example"], HAPPY)
    assert result(d).relay == "b.example[192.0.2.8]:25"


def test_courier_fails_over_after_timeout_before_mail_accepted():
    net = Network(a_example="192.0.2.7", b_example="192.0.2.8")
    d = deliver(net.courier(Timeouts(mail=9)), [Hop("a.example"), Hop("b.example")])
    converse(net.peers["a.example"], HAPPY[:2])
    net.clock.advance(9)
    net.peers["a.example"].settle()
    converse(net.peers["b.example"], HAPPY)
    assert [r.status for r in result(d).results] == [Status.SENT, Status.SENT]


def test_courier_keeps_results_once_mail_accepted():
    net = Network(a_example="192.0.2.7", b_example="192.0.2.8")
    d = deliver(net.courier(), [Hop("a.example"), Hop("b.example")])
    peer = net.peers["a.example"]
    converse(peer, HAPPY[:2] + [b"250 Ok\r\n250 Ok\r\n"])
    peer.session.connectionLost(Failure(error.ConnectionLost()))
    attempt = result(d)
    assert net.attempts == ["a.example"]
    assert attempt.relay == "a.example[192.0.2.7]:25"
    assert {(r.status, r.dsn) for r in attempt.results} == {(Status.DEFERRED, "4.4.2")}


def test_courier_last_hop_failure_is_reported():
    net = Network(a_example="192.0.2.7", b_example=error.ConnectionRefusedError())
    d = deliver(net.courier(), [Hop("a.example"), Hop("b.example")])
    converse(net.peers["a.example"], [b"421 4.3.2 busy\r\n", b"221 Bye\r\n"])
    attempt = result(d)
    assert attempt.relay == "none"
    assert attempt.results[0].text == "connect to b.example:25: Connection refused"


def test_courier_refuses_message_over_peer_size_limit_without_mail():
    net = Network(a_example="192.0.2.7", b_example="192.0.2.8")
    d = deliver(net.courier(), [Hop("a.example"), Hop("b.example")], size=10240001)
    peer = net.peers["a.example"]
    converse(peer, [GREETING, EHLO_FULL])
    assert peer.transport.value() == b"EHLO relay.example.com\r\n"
    attempt = result(d)
    assert net.attempts == ["a.example"]
    assert {(r.code, r.dsn, r.status) for r in attempt.results} == {(552, "5.3.4", Status.BOUNCED)}
    assert attempt.results[0].text == (
        "message size 10240001 exceeds size limit 10240000 of server a.example[192.0.2.7]"
    )


def test_courier_without_hops_defers():
    attempt = result(deliver(Network().courier(), []))
    assert {(r.status, r.dsn) for r in attempt.results} == {(Status.DEFERRED, "4.3.5")}


def test_courier_one_result_per_recipient_in_order():
    net = Network(a_example="192.0.2.7")
    d = deliver(net.courier(), [Hop("a.example")], recipients=["c@x", "a@x", "b@x"])
    converse(net.peers["a.example"], [GREETING, EHLO_FULL,
             b"250 Ok\r\n550 no\r\n250 Ok\r\n450 later\r\n", b"354 go\r\n", b"250 Ok\r\n", b"221 Bye\r\n"])
    attempt = result(d)
    assert [(r.address, r.status) for r in attempt.results] == [
        ("c@x", Status.BOUNCED), ("a@x", Status.SENT), ("b@x", Status.DEFERRED)]


# -- STARTTLS, injection, AUTH ----------------------------------------------------------

from relayd.secret import Secret  # noqa: E402
from relayd.smtpclient import isTooManyRecipients  # noqa: E402

EHLO_TLS = b"250-mx.example.net\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 AUTH PLAIN LOGIN\r\n"


def tlsPeer(mode="starttls", credentials=None):
    peer = Peer(tls=mode, tlsOptions=lambda: "client-tls-options", credentials=credentials)
    peer.feed(GREETING)
    assert peer.sent() == b"EHLO relay.example.com\r\n"
    return peer


def test_starttls_discards_reply_injected_before_the_handshake():
    peer = tlsPeer()
    peer.feed(EHLO_FULL)
    assert peer.sent() == b"STARTTLS\r\n"
    # A man-in-the-middle appends a fake EHLO reply to the 220, in plaintext.
    peer.feed(b"220 2.0.0 ready\r\n250 fake\r\n")
    assert peer.transport.tlsStarted == ["client-tls-options"]
    assert peer.sent() == b"EHLO relay.example.com\r\n"
    assert not peer.session.whenReady().called
    peer.session.tlsActive = True  # the handshake (StringTransport has none)
    peer.feed(EHLO_TLS)
    assert result(peer.session.whenReady()) is peer.session
    assert "AUTH" in peer.session.capabilities and "STARTTLS" not in peer.session.capabilities


def test_required_starttls_not_offered_is_refused():
    peer = tlsPeer()
    peer.feed(EHLO_PLAIN)
    refused = failureOf(peer.session.whenReady()).value
    assert isinstance(refused, HopRefused)
    assert (refused.dsn, refused.text) == ("4.7.4", f"TLS is required, but was not offered by host {PEER}")
    assert peer.sent() == b"QUIT\r\n"


@pytest.mark.parametrize("mode, ready", [("may", True), ("starttls", False)])
def test_starttls_refused(mode, ready):
    peer = tlsPeer(mode)
    peer.feed(EHLO_FULL)
    peer.sent()
    peer.feed(b"454 4.7.0 TLS not available\r\n")
    assert peer.transport.tlsStarted == []
    if ready:
        assert result(peer.session.whenReady()) is peer.session
    else:
        assert failureOf(peer.session.whenReady()).value.dsn == "4.7.0"


def test_may_without_starttls_stays_plaintext():
    peer = tlsPeer("may")
    peer.feed(EHLO_PLAIN)
    assert result(peer.session.whenReady()) is peer.session
    assert peer.sent() == b""


def test_tls_handshake_failure_is_reported_as_such():
    from OpenSSL import SSL

    peer = tlsPeer()
    peer.feed(EHLO_FULL)
    peer.feed(b"220 ready\r\n")
    peer.session.connectionLost(Failure(SSL.Error([("SSL routines", "", "certificate verify failed")])))
    broken = failureOf(peer.session.whenReady()).value
    assert (broken.dsn, broken.text) == (
        "4.7.5", f"TLS handshake with {PEER} failed: certificate verify failed")
    assert peer.session.tlsFailed


def authedPeer(mechanisms=b"PLAIN LOGIN"):
    peer = tlsPeer(credentials=("relay", Secret("pw")))
    peer.feed(EHLO_FULL)
    peer.feed(b"220 ready\r\n")
    peer.sent()
    peer.session.tlsActive = True
    peer.feed(b"250-mx.example.net\r\n250 AUTH " + mechanisms + b"\r\n")
    return peer


def test_auth_plain():
    peer = authedPeer()
    assert peer.sent() == b"AUTH PLAIN AHJlbGF5AHB3\r\n"  # \0relay\0pw
    peer.feed(b"235 2.7.0 ok\r\n")
    assert result(peer.session.whenReady()).authenticated


def test_auth_login():
    peer = authedPeer(b"LOGIN")
    assert peer.sent() == b"AUTH LOGIN\r\n"
    peer.feed(b"334 VXNlcm5hbWU6\r\n")
    assert peer.sent() == b"cmVsYXk=\r\n"
    peer.feed(b"334 UGFzc3dvcmQ6\r\n")
    assert peer.sent() == b"cHc=\r\n"
    peer.feed(b"235 2.7.0 ok\r\n")
    assert result(peer.session.whenReady()).authenticated


def test_auth_failure_defers_once_and_never_shows_the_password():
    peer = authedPeer()
    peer.sent()
    peer.feed(b"535 5.7.8 Error: authentication failed\r\n")
    refused = failureOf(peer.session.whenReady()).value
    assert (refused.code, refused.dsn) == (535, "4.7.8")
    assert refused.text == (f"SASL authentication failed; server {PEER} said: "
                            "535 5.7.8 Error: authentication failed")
    assert peer.sent() == b"QUIT\r\n"  # no second AUTH
    assert "pw" not in repr(Secret("pw")) and "pw" not in str(Secret("pw"))


def test_auth_without_usable_mechanism_is_refused():
    peer = authedPeer(b"CRAM-MD5")
    refused = failureOf(peer.session.whenReady()).value
    assert refused.dsn == "4.7.0"
    assert "offers no SASL mechanism relayd uses" in refused.text


def test_credentials_never_sent_without_tls():
    peer = Peer(tls="none", credentials=("relay", Secret("pw")))
    peer.feed(GREETING)
    peer.sent()
    peer.feed(EHLO_FULL)
    assert failureOf(peer.session.whenReady()).value.dsn == "4.7.0"
    assert b"AUTH" not in peer.sent()


# -- 452 too many recipients, 8BITMIME, long lines ------------------------------------


@pytest.mark.parametrize("reply, expected", [
    (ServerReply(452, (b"4.5.3 Too many recipients",)), True),
    (ServerReply(452, (b"Too many recipients",)), True),
    (ServerReply(552, (b"5.5.3 Too many recipients",)), True),
    (ServerReply(452, (b"4.3.1 Insufficient system storage",)), False),
    (ServerReply(450, (b"4.5.3 x",)), False),
])
def test_isTooManyRecipients(reply, expected):
    assert isTooManyRecipients(reply) is expected


def test_too_many_recipients_sends_the_rest_in_another_transaction():
    peer = Peer()
    peer.ready()
    d = send(peer, ["a@x", "b@x", "c@x"])
    assert peer.sent().count(b"RCPT TO") == 3
    peer.feed(b"250 Ok\r\n250 Ok\r\n452 4.5.3 Too many recipients\r\n452 4.5.3 Too many recipients\r\n")
    assert peer.sent() == b""
    peer.feed(b"354 go\r\n")
    peer.sent()
    peer.feed(b"250 2.0.0 first\r\n")
    assert peer.sent() == (b"MAIL FROM:<s@example.com> SIZE=21\r\n"
                           b"RCPT TO:<b@x>\r\nRCPT TO:<c@x>\r\nDATA\r\n")
    peer.feed(b"250 Ok\r\n250 Ok\r\n452 4.5.3 Too many recipients\r\n")
    peer.feed(b"354 go\r\n")
    peer.sent()
    peer.feed(b"250 2.0.0 second\r\n")
    # c@x alone: refused again, no progress, so it stays deferred.
    assert peer.sent() == b"MAIL FROM:<s@example.com> SIZE=21\r\nRCPT TO:<c@x>\r\nDATA\r\n"
    peer.feed(b"250 Ok\r\n452 4.5.3 Too many recipients\r\n554 5.5.1 no valid recipients\r\n")
    outcome = result(d)
    assert [(r.address, r.status, r.text) for r in outcome.results] == [
        ("a@x", Status.SENT, "250 2.0.0 first"), ("b@x", Status.SENT, "250 2.0.0 second"),
        ("c@x", Status.DEFERRED, f"host {PEER} said: 452 4.5.3 Too many recipients (in reply to RCPT TO command)")]


def test_too_many_recipients_without_progress_stops():
    peer = Peer()
    peer.ready()
    d = send(peer, ["a@x", "b@x"])
    peer.feed(b"250 Ok\r\n452 4.5.3 Too many\r\n452 4.5.3 Too many\r\n"
              b"554 5.5.1 no valid recipients\r\n")
    outcome = result(d)
    assert [r.status for r in outcome.results] == [Status.DEFERRED, Status.DEFERRED]
    assert peer.sent().endswith(b"DATA\r\n")  # one transaction, no body


def test_line_over_998_octets_is_never_written():
    peer = Peer()
    peer.ready()
    body = b"Subject: x\r\n\r\n" + b"y" * 998 + b"\r\n" + b"z" * 999 + b"\r\nend\r\n"
    d = send(peer, ["a@x"], body=body)
    peer.feed(b"250 Ok\r\n250 Ok\r\n354 go\r\n")
    wire = peer.sent()
    assert b"z" * 999 not in wire and not wire.endswith(b"\r\n.\r\n")
    [r] = result(d).results
    assert (r.status, r.dsn) == (Status.BOUNCED, "5.6.0")
    assert r.text == "message has a line of 999 octets, longer than SMTP allows (998); not sent"
    assert peer.transport.disconnecting


@pytest.mark.parametrize("params, body", [
    ({"BODY": "8BITMIME"}, b"Subject: x\r\n\r\nascii\r\n"),
    ({}, "Subject: caf\u00e9\r\n\r\nx\r\n".encode()),
])
def test_eight_bit_to_peer_without_8bitmime_bounces_before_mail(params, body):
    net = Network(a_example="192.0.2.7")
    d = net.courier().deliver(Destination((Hop("a.example"),)), "s@x", params, ["r@x"], lambda: io.BytesIO(body), len(body))
    converse(net.peers["a.example"], [GREETING, EHLO_PLAIN])
    [r] = result(d).results
    assert (r.code, r.dsn, r.status) == (554, "5.6.3", Status.BOUNCED)
    assert "does not support 8BITMIME" in r.text
    assert b"MAIL" not in net.peers["a.example"].transport.value()


# -- connection reuse ---------------------------------------------------------------------


def test_next_message_to_the_same_hop_reuses_the_connection():
    net = Network(a_example="192.0.2.7")
    courier = net.courier()
    d1 = deliver(courier, [Hop("a.example")], recipients=["a@x"])
    peer = net.peers["a.example"]
    converse(peer, [GREETING, EHLO_FULL, b"250 Ok\r\n250 Ok\r\n", b"354 go\r\n", b"250 Ok: 1\r\n"])
    assert result(d1).results[0].status == Status.SENT
    peer.sent()
    net.clock.advance(1)
    d2 = deliver(courier, [Hop("a.example")], recipients=["b@x"])
    assert net.attempts == ["a.example"]  # no second connection
    assert peer.sent().startswith(b"MAIL FROM:<s@example.com>")
    converse(peer, [b"250 Ok\r\n250 Ok\r\n", b"354 go\r\n", b"250 Ok: 2\r\n"])
    assert result(d2).results[0].text == "250 Ok: 2"
    peer.sent()
    net.clock.advance(courier.reuseTime)
    assert peer.sent() == b"QUIT\r\n"


def _idleAfterOneMessage():
    """A courier whose one connection has carried a message and is idle from t=0."""
    net = Network(a_example="192.0.2.7")
    courier = net.courier()
    d = deliver(courier, [Hop("a.example")], recipients=["a@x"])
    peer = net.peers["a.example"]
    converse(peer, [GREETING, EHLO_FULL])
    _oneMessage(peer)
    result(d)
    return net, courier, peer


def test_an_idle_connection_closes_reuse_time_after_its_last_release():
    net, courier, peer = _idleAfterOneMessage()
    net.clock.advance(1)
    d = deliver(courier, [Hop("a.example")], recipients=["b@x"])
    net.clock.advance(0.5)
    _oneMessage(peer)
    result(d)  # idle again from t=1.5
    peer.sent()
    net.clock.advance(1.9)
    assert peer.sent() == b""
    net.clock.advance(0.1)
    assert peer.sent() == b"QUIT\r\n"


def test_an_idle_deadline_that_passes_during_a_transaction_leaves_it_alone():
    net, courier, peer = _idleAfterOneMessage()
    net.clock.advance(1)
    d = deliver(courier, [Hop("a.example")], recipients=["b@x"])
    peer.sent()
    net.clock.advance(2)  # t=3: the first idle deadline is long past
    assert b"QUIT" not in peer.sent() and not d.called
    _oneMessage(peer)
    assert result(d).results[0].status == Status.SENT  # idle again from t=3
    peer.sent()
    net.clock.advance(1.9)
    assert peer.sent() == b""
    d = deliver(courier, [Hop("a.example")], recipients=["c@x"])
    _oneMessage(peer)
    assert result(d).results[0].status == Status.SENT
    assert net.attempts == ["a.example"]
    assert len(net.clock.getDelayedCalls()) <= 2  # its idle deadline and the reply deadline at most
    peer.sent()
    net.clock.advance(2)
    assert peer.sent() == b"QUIT\r\n"


def test_reused_connection_that_died_is_replaced():
    net = Network(a_example="192.0.2.7")
    courier = net.courier()
    d1 = deliver(courier, [Hop("a.example")], recipients=["a@x"])
    first = net.peers["a.example"]
    converse(first, [GREETING, EHLO_FULL, b"250 Ok\r\n250 Ok\r\n", b"354 go\r\n", b"250 Ok\r\n"])
    result(d1)
    d2 = deliver(courier, [Hop("a.example")], recipients=["b@x"])
    first.feed(b"421 4.4.2 idle too long\r\n250 Ok\r\n503 5.5.1 need MAIL\r\n")
    second = net.peers["a.example"]
    assert second is not first and net.attempts == ["a.example", "a.example"]
    converse(second, [GREETING, EHLO_FULL, b"250 Ok\r\n250 Ok\r\n", b"354 go\r\n", b"250 Ok\r\n"])
    assert result(d2).results[0].status == Status.SENT


# -- MX through the courier -----------------------------------------------------------


class StaticResolver:
    def __init__(self, mx, addresses):
        self.mx, self.addresses = mx, addresses

    def lookupMailExchange(self, name):
        from twisted.names import dns

        return defer.succeed(([dns.RRHeader(name, dns.MX, payload=dns.Record_MX(p, h.encode()))
                               for p, h in self.mx], [], []))

    def lookupAddress(self, name):
        from twisted.names import dns

        return defer.succeed(([dns.RRHeader(name, dns.A, payload=dns.Record_A(a))
                               for a in self.addresses.get(name, [])], [], []))

    def lookupIPV6Address(self, name):
        return defer.succeed(([], [], []))


def test_mx_targets_fail_over_by_address_and_name_the_mx_in_relay():
    net = Network(**{"192_0_2_1": error.ConnectionRefusedError(), "192_0_2_2": "192.0.2.2"})
    resolver = StaticResolver([(10, "mx1.x.test"), (20, "mx2.x.test")],
                              {"mx1.x.test": ["192.0.2.1"], "mx2.x.test": ["192.0.2.2"]})
    d = deliver(net.courier(resolver=resolver), [mxHop("x.test", 2525, "none")])
    converse(net.peers["192.0.2.2"], HAPPY)
    attempt = result(d)
    assert net.attempts == ["192.0.2.1", "192.0.2.2"]
    assert attempt.relay == "mx2.x.test[192.0.2.2]:2525"


def test_mx_that_is_relayd_itself_bounces():
    net = Network()
    resolver = StaticResolver([(10, "mx.x.test")], {"mx.x.test": ["127.0.0.1"]})
    courier = net.courier(resolver=resolver, localAddresses=lambda: [("0.0.0.0", 25)])
    attempt = result(deliver(courier, [mxHop("x.test")]))
    assert {(r.status, r.dsn) for r in attempt.results} == {(Status.BOUNCED, "5.4.6")}
    assert net.attempts == []


def test_opportunistic_tls_failure_retries_in_plaintext():
    from OpenSSL import SSL

    net = Network(a_example="192.0.2.7")
    courier = net.courier(tlsOptions=lambda target: "opts")
    d = deliver(courier, [NextHop("a.example", 25, "may")])
    first = net.peers["a.example"]
    converse(first, [GREETING, EHLO_FULL, b"220 go\r\n"])
    first.session.connectionLost(Failure(SSL.Error([("", "", "wrong version number")])))
    second = net.peers["a.example"]
    assert second is not first
    converse(second, [GREETING, EHLO_FULL])
    assert second.transport.tlsStarted == []  # tls none this time
    converse(second, HAPPY[2:])
    assert [r.status for r in result(d).results] == [Status.SENT, Status.SENT]


def test_required_tls_failure_never_retries_in_plaintext():
    from OpenSSL import SSL

    net = Network(a_example="192.0.2.7")
    d = deliver(net.courier(tlsOptions=lambda target: "opts"), [NextHop("a.example", 25, "starttls")])
    peer = net.peers["a.example"]
    converse(peer, [GREETING, EHLO_FULL, b"220 go\r\n"])
    peer.session.connectionLost(Failure(SSL.Error([("", "", "certificate verify failed")])))
    attempt = result(d)
    assert net.attempts == ["a.example"]
    assert {(r.status, r.dsn) for r in attempt.results} == {(Status.DEFERRED, "4.7.5")}


def test_failed_smarthost_is_tried_last_for_a_while():
    from relayd.courier import FAILED_HOP_TIME

    net = Network(a_example=error.ConnectionRefusedError(), b_example="192.0.2.8")
    courier = net.courier(reuseTime=0)
    hops = [Hop("a.example"), Hop("b.example")]
    d = deliver(courier, hops)
    converse(net.peers["b.example"], HAPPY)
    result(d)
    d = deliver(courier, hops)
    converse(net.peers["b.example"], HAPPY)
    result(d)
    assert net.attempts == ["a.example", "b.example", "b.example"]
    net.clock.advance(FAILED_HOP_TIME)
    deliver(courier, hops)
    assert net.attempts[-2:] == ["a.example", "b.example"]


# -- review mends: reuse limits, backup MX, handler errors, unreadable body -------------


def _oneMessage(peer, queued=b"250 Ok\r\n"):
    converse(peer, [b"250 Ok\r\n250 Ok\r\n", b"354 go\r\n", queued])


def test_idle_session_is_watched_once_however_often_it_is_pooled():
    net = Network(a_example="192.0.2.7")
    courier = net.courier()
    forgotten = []
    original = courier._forget
    courier._forget = lambda key, session: (forgotten.append(session), original(key, session))
    d = deliver(courier, [Hop("a.example")], recipients=["a@x"])
    peer = net.peers["a.example"]
    converse(peer, [GREETING, EHLO_FULL])
    _oneMessage(peer)
    result(d)
    for _ in range(4):
        d = deliver(courier, [Hop("a.example")], recipients=["a@x"])
        _oneMessage(peer)
        assert result(d).results[0].status == Status.SENT
    assert net.attempts == ["a.example"]
    peer.session.connectionLost(Failure(error.ConnectionDone()))
    assert forgotten == [peer.session]  # one close callback, not one per release
    assert courier._idle == {}


def test_session_is_not_reused_past_the_transaction_limit():
    net = Network(a_example="192.0.2.7")
    courier = net.courier(reuseCountLimit=2)
    d = deliver(courier, [Hop("a.example")], recipients=["a@x"])
    first = net.peers["a.example"]
    converse(first, [GREETING, EHLO_FULL])
    _oneMessage(first)
    result(d)
    d = deliver(courier, [Hop("a.example")], recipients=["b@x"])
    assert net.attempts == ["a.example"]
    first.sent()
    _oneMessage(first)
    assert result(d).results[0].status == Status.SENT
    assert first.sent().endswith(b".\r\nQUIT\r\n")  # second transaction: the limit
    first.feed(b"221 Bye\r\n")
    deliver(courier, [Hop("a.example")], recipients=["c@x"])
    assert net.attempts == ["a.example", "a.example"]
    assert net.peers["a.example"] is not first


def test_by_default_only_the_time_limit_ends_reuse_as_in_postfix():
    # Postfix's defaults: smtp_connection_reuse_count_limit = 0 (none),
    # smtp_connection_reuse_time_limit = 300s.
    net, courier, peer = _idleAfterOneMessage()
    for _ in range(299):  # one connection carries them all, each a second apart
        net.clock.advance(1)
        d = deliver(courier, [Hop("a.example")], recipients=["a@x"])
        _oneMessage(peer)
        assert result(d).results[0].status == Status.SENT
    assert net.attempts == ["a.example"]
    assert b"QUIT" not in peer.sent()
    d = deliver(courier, [Hop("a.example")], recipients=["a@x"])
    net.clock.advance(1)  # 300s since it connected: the last transaction
    _oneMessage(peer)
    assert result(d).results[0].status == Status.SENT
    assert peer.sent().endswith(b".\r\nQUIT\r\n")
    assert net.attempts == ["a.example"]


def test_session_is_not_reused_past_the_time_limit():
    net = Network(a_example="192.0.2.7")
    courier = net.courier(reuseTime=1000, reuseTimeLimit=300)
    d = deliver(courier, [Hop("a.example")], recipients=["a@x"])
    first = net.peers["a.example"]
    converse(first, [GREETING, EHLO_FULL, b"250 Ok\r\n250 Ok\r\n", b"354 go\r\n"])
    net.clock.advance(300)
    first.sent()
    first.feed(b"250 Ok\r\n")
    assert result(d).results[0].status == Status.SENT
    assert first.sent() == b"QUIT\r\n"
    deliver(courier, [Hop("a.example")], recipients=["b@x"])
    assert net.attempts == ["a.example", "a.example"]


def test_relayd_as_backup_mx_uses_only_the_better_mx_hosts():
    net = Network(**{"192_0_2_1": error.ConnectionRefusedError(), "192_0_2_3": "192.0.2.3"})
    resolver = StaticResolver(
        [(10, "mx1.x.test"), (20, "self.x.test"), (30, "mx3.x.test")],
        {"mx1.x.test": ["192.0.2.1"], "self.x.test": ["192.0.2.2"], "mx3.x.test": ["192.0.2.3"]})
    courier = net.courier(resolver=resolver, localAddresses=lambda: [("192.0.2.2", 25)])
    attempt = result(deliver(courier, [mxHop("x.test")]))
    # Never relayd itself, never the worse MX: the mail waits for mx1.
    assert net.attempts == ["192.0.2.1"]
    assert {(r.status, r.dsn) for r in attempt.results} == {(Status.DEFERRED, "4.4.1")}


def test_relayd_among_the_best_mx_hosts_bounces():
    net = Network(**{"192_0_2_1": "192.0.2.1"})
    resolver = StaticResolver([(10, "mx1.x.test"), (10, "self.x.test")],
                              {"mx1.x.test": ["192.0.2.1"], "self.x.test": ["192.0.2.2"]})
    courier = net.courier(resolver=resolver, localAddresses=lambda: [("192.0.2.2", 25)],
                          shuffle=lambda group: None)
    attempt = result(deliver(courier, [mxHop("x.test")]))
    assert {(r.status, r.dsn) for r in attempt.results} == {(Status.BOUNCED, "5.4.6")}
    assert "loops back to myself (self.x.test[192.0.2.2]:25)" in attempt.results[0].text
    assert net.attempts == []


def test_failed_mx_address_is_not_remembered():
    net = Network(**{"192_0_2_1": error.ConnectionRefusedError()})
    resolver = StaticResolver([(10, "mx1.x.test")], {"mx1.x.test": ["192.0.2.1"]})
    courier = net.courier(resolver=resolver)
    result(deliver(courier, [mxHop("x.test")]))
    assert courier._failedUntil == {}  # _order never reads MX targets


class RaisingTLSTransport(TLSStringTransport):
    """startTLS builds the OpenSSL connection at once, as TLSMemoryBIOProtocol does."""

    def startTLS(self, options):
        super().startTLS(options)
        options.clientConnectionForTLS(None)


def test_error_in_a_reply_handler_defers_instead_of_hanging():
    from relayd.tls import OpportunisticTLS

    peer = Peer.__new__(Peer)
    peer.clock, peer.pump, peer.lost = Clock(), True, False
    peer.transport = RaisingTLSTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 25))
    peer.session = OutboundSession(
        peer.clock, "relay.example.com", Timeouts(), "mx.example.net", tls="may",
        tlsOptions=lambda: OpportunisticTLS("m\ufffdx.example"))
    peer.session.makeConnection(peer.transport)
    peer.feed(GREETING + EHLO_FULL)
    assert peer.sent().endswith(b"STARTTLS\r\n")
    peer.feed(b"220 go\r\n")  # SNI: .encode("idna") raises in startTLS
    broken = failureOf(peer.session.whenReady()).value
    assert isinstance(broken, SessionBroken)
    assert (broken.dsn, broken.stage) == ("4.3.0", "starttls")
    assert broken.text == f"local error with {PEER} while sending STARTTLS: UnicodeError"
    assert peer.transport.disconnecting
    assert [f.type for f in peer.session.localErrors] == [UnicodeError]  # kept for the log


def test_error_in_a_reply_handler_fails_over_to_the_next_hop():
    net = Network(a_example="192.0.2.7", b_example="192.0.2.8")
    courier = net.courier()
    courier.heloName = "relay.ex\u00e4mple"  # cannot be written in EHLO
    d = deliver(courier, [Hop("a.example"), Hop("b.example")])
    net.peers["a.example"].feed(GREETING)
    net.peers["b.example"].feed(GREETING)
    attempt = result(d)
    assert net.attempts == ["a.example", "b.example"]
    assert attempt.relay == "b.example[192.0.2.8]:25"
    assert {(r.status, r.dsn) for r in attempt.results} == {(Status.DEFERRED, "4.3.0")}
    # Both bugs go back with the result, for the scheduler to log.
    assert [f.type for f in attempt.localErrors] == [UnicodeEncodeError, UnicodeEncodeError]


def test_no_helo_fallback_after_starttls():
    peer = tlsPeer()
    peer.feed(EHLO_FULL)
    peer.feed(b"220 ready\r\n")
    assert peer.sent() == b"STARTTLS\r\nEHLO relay.example.com\r\n"
    peer.session.tlsActive = True
    peer.feed(b"502 5.5.1 no\r\n")
    refused = failureOf(peer.session.whenReady()).value
    assert isinstance(refused, HopRefused)
    assert peer.sent() == b"QUIT\r\n"


def test_unreadable_body_when_checking_for_8bit_defers_and_quits():
    net = Network(a_example="192.0.2.7")

    def openBody():
        raise PermissionError(13, "Permission denied")

    d = net.courier().deliver(Destination((Hop("a.example"),)), "s@x", {}, ["r@x"], openBody, 10)
    peer = net.peers["a.example"]
    converse(peer, [GREETING, EHLO_PLAIN])
    [r] = result(d).results
    assert (r.code, r.dsn, r.status) == (0, "4.3.0", Status.DEFERRED)
    assert r.text == "cannot read the queued message: Permission denied"
    assert result(d).relay == "a.example[192.0.2.7]:25"
    assert peer.sent() == b"EHLO relay.example.com\r\nQUIT\r\n"


def test_a_bug_during_an_attempt_defers_and_is_returned_for_the_log():
    net = Network(a_example="192.0.2.7")

    def tlsOptions(target):
        raise RuntimeError("a bug")

    attempt = result(deliver(net.courier(tlsOptions=tlsOptions), [Hop("a.example", tls="may")]))
    assert {(r.status, r.dsn, r.text) for r in attempt.results} == {
        (Status.DEFERRED, "4.3.0", "delivery failed locally: RuntimeError")}
    assert [f.type for f in attempt.localErrors] == [RuntimeError]


def test_body_is_checked_for_8bit_once_per_attempt():
    net = Network(a_example="192.0.2.7", b_example="192.0.2.8")
    opened = []

    def openBody():
        opened.append(1)
        return io.BytesIO(b"plain\r\n")

    d = net.courier(Timeouts(mail=9)).deliver(
        Destination((Hop("a.example"), Hop("b.example"))), "s@x", {}, ["r@x"], openBody, 7)
    converse(net.peers["a.example"], [GREETING, EHLO_PLAIN])
    assert len(opened) == 1
    net.clock.advance(9)  # MAIL times out: next hop, which lacks 8BITMIME too
    net.peers["a.example"].settle()
    converse(net.peers["b.example"], [GREETING, EHLO_PLAIN, b"250 Ok\r\n", b"250 Ok\r\n",
                                      b"354 go\r\n", b"250 Ok\r\n"])
    assert result(d).results[0].status == Status.SENT
    assert len(opened) == 2  # one check, one DATA


# -- reconfigure ------------------------------------------------------------------------


def test_reconfigure_closes_idle_sessions_and_takes_the_new_settings(tmp_path):
    secret = tmp_path / "upstream.secret"
    secret.write_text("new\n")
    new = testConfig(hostname="two.example", delivery={
        "timeouts": {"mail": "7s"},
        "smarthosts": [{"host": "a.example", "username": "u", "password_file": str(secret)}]})
    net = Network(a_example="192.0.2.7")
    courier = net.courier()
    d = deliver(courier, [Hop("a.example")], recipients=["a@x"])
    peer = net.peers["a.example"]
    converse(peer, [GREETING, EHLO_FULL])
    _oneMessage(peer)
    result(d)
    peer.sent()
    courier.reconfigure(new)
    assert peer.sent() == b"QUIT\r\n"
    assert courier._idle == {}
    assert courier.timeouts == Timeouts(mail=7) and courier.passwords == {str(secret): Secret("new")}
    assert courier.heloName == "two.example"


def test_reconfigure_keeps_tls_settings_of_unreadable_ca_files():
    courier = Network().courier()
    kept = NextHop("a.example", 25, "may", caFile="/nonexistent/broken.pem")
    dropped = NextHop("b.example", 25, "may", caFile="/fine.pem")

    def creator(target):
        return result(defer.ensureDeferred(courier._tlsCreator(target)))

    keptCreator = creator(kept)
    droppedCreator = creator(dropped)
    assert creator(kept) is keptCreator  # cached
    # The new config names broken.pem, which cannot be read: its settings stay.
    courier.reconfigure(testConfig(delivery={"smarthosts": [
        {"host": "a.example", "tls": "starttls", "ca_file": "/nonexistent/broken.pem"}]}))
    assert creator(kept) is keptCreator
    assert creator(dropped) is not droppedCreator


def test_the_first_connection_to_a_hop_makes_its_tls_settings_in_a_thread(tmp_path):
    """Making them reads the CA file: never on the reactor thread; once per hop."""
    trustme = pytest.importorskip("trustme")
    caFile = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(caFile))
    threads = []

    def runInThread(f, *args):
        threads.append(f.__name__)
        return defer.maybeDeferred(f, *args)

    net = Network(a_example="192.0.2.7")
    courier = net.courier(runInThread=runInThread)
    hop = NextHop("a.example", 25, "starttls", caFile=str(caFile))
    first = result(defer.ensureDeferred(courier._tlsCreator(hop)))
    assert threads == ["clientTLSOptions"]
    assert result(defer.ensureDeferred(courier._tlsCreator(hop))) is first
    assert threads == ["clientTLSOptions"]


# -- reply and address corner cases -----------------------------------------------------


def test_2xx_reply_to_data_is_taken_as_451():
    peer = Peer()
    peer.ready()
    d = send(peer, ["a@x.org"])
    peer.sent()
    peer.feed(b"250 Ok\r\n250 Ok\r\n")
    assert peer.sent() == b""
    peer.feed(b"250 2.0.0 Ok\r\n")
    assert peer.sent() == b""  # no body
    [r] = result(d).results
    assert (r.code, r.status) == (451, Status.DEFERRED)
    assert r.text.endswith("(in reply to DATA command)")


def test_3xx_reply_to_rcpt_is_taken_as_451():
    peer = Peer()
    peer.ready()
    d = send(peer, ["a@x.org"])
    peer.sent()
    peer.feed(b"250 Ok\r\n354 what\r\n554 5.5.1 no valid recipients\r\n")
    [r] = result(d).results
    assert (r.code, r.dsn, r.status) == (451, "4.0.0", Status.DEFERRED)
    assert peer.sent() == b""  # nobody accepted: no body


def test_552_too_many_recipients_is_taken_as_452():
    peer = Peer()
    peer.ready()
    d = send(peer, ["a@x.org", "b@x.org"])
    peer.sent()
    peer.feed(b"250 Ok\r\n250 Ok\r\n552 5.5.3 Too many recipients\r\n")
    assert peer.sent() == b""
    peer.feed(b"354 go\r\n")
    peer.sent()
    peer.feed(b"250 Ok: first\r\n")
    assert peer.sent() == b"MAIL FROM:<s@example.com> SIZE=21\r\nRCPT TO:<b@x.org>\r\nDATA\r\n"
    # No progress: stays deferred.
    peer.feed(b"250 Ok\r\n552 Too many recipients\r\n554 5.5.1 no valid recipients\r\n")
    outcome = result(d)
    assert [(r.code, r.status) for r in outcome.results] == [(250, Status.SENT), (452, Status.DEFERRED)]


def test_unsafe_sender_is_never_written():
    peer = Peer()
    peer.ready()
    d = send(peer, ["a@x.org", "b@x.org"], sender="s@x.org>\r\nRCPT TO:<evil@x.org")
    outcome = result(d)
    assert {(r.code, r.dsn, r.status) for r in outcome.results} == {(553, "5.1.7", Status.BOUNCED)}
    assert not outcome.mailAccepted
    assert peer.sent() == b""


def test_missing_upstream_password_defers_and_fails_over():
    net = Network(a_example="192.0.2.7", b_example="192.0.2.8")
    hops = [NextHop("a.example", 25, "starttls", username="relay", passwordFile="/etc/relayd/pw"),
            Hop("b.example")]
    d = deliver(net.courier(), hops[:1])
    attempt = result(d)
    assert net.attempts == []
    assert {(r.code, r.dsn, r.status) for r in attempt.results} == {(0, "4.3.5", Status.DEFERRED)}
    assert attempt.results[0].text == "no password loaded from /etc/relayd/pw for a.example"
    d = deliver(net.courier(), hops)
    converse(net.peers["b.example"], HAPPY)
    assert result(d).relay == "b.example[192.0.2.8]:25"


def test_reply_line_too_long_breaks_the_session():
    peer = Peer()
    peer.feed(b"220-" + b"x" * 9000 + b"\r\n")
    broken = failureOf(peer.session.whenReady()).value
    assert isinstance(broken, SessionBroken)
    assert (broken.dsn, broken.stage) == ("4.4.2", "greeting")
    assert broken.text == f"{PEER} sent a reply line that is too long"
    assert peer.transport.disconnecting


@pytest.mark.parametrize("line, over", [
    (b"250-x\r\n", f"{MAX_REPLY_LINES} lines"),
    (b"250-" + b"x" * 1000 + b"\r\n", f"{MAX_REPLY_BYTES} bytes"),
])
def test_endless_multiline_reply_is_cut_off(line, over):
    """
    A hop that answers EHLO with line after line of "250-" (each line
    short enough) is dropped once the reply passes its cap, and the
    session holds no more than the cap meanwhile.
    """
    peer = Peer()
    peer.feed(GREETING)
    peer.sent()
    held = []
    for _ in range(MAX_REPLY_LINES + 10):
        peer.feed(line)
        held.append(len(peer.session._replyLines))
        if peer.lost:
            break
    broken = failureOf(peer.session.whenReady()).value
    assert isinstance(broken, SessionBroken)
    assert (broken.dsn, broken.stage, broken.status) == ("4.4.2", "ehlo", Status.DEFERRED)
    assert broken.text == f"{PEER} sent a reply of more than {over}"
    assert peer.lost
    assert max(held) <= MAX_REPLY_LINES
    assert peer.session._replyLines == []


def test_reply_at_the_caps_is_accepted():
    """A reply of exactly MAX_REPLY_LINES lines and MAX_REPLY_BYTES bytes is fine."""
    perLine, extra = divmod(MAX_REPLY_BYTES, MAX_REPLY_LINES)
    lines = [b"x" * (perLine + (1 if i < extra else 0)) for i in range(MAX_REPLY_LINES)]
    assert sum(map(len, lines)) == MAX_REPLY_BYTES
    reply = b"".join(b"250-" + l + b"\r\n" for l in lines[:-1]) + b"250 " + lines[-1] + b"\r\n"
    peer = Peer()
    peer.feed(GREETING)
    peer.sent()
    peer.feed(reply)
    assert result(peer.session.whenReady()) is peer.session


def test_courier_fails_over_after_endless_ehlo_reply():
    net = Network(a_example="192.0.2.7", b_example="192.0.2.8")
    d = deliver(net.courier(), [Hop("a.example"), Hop("b.example")])
    bad = net.peers["a.example"]
    bad.feed(GREETING)
    bad.feed(b"250-x\r\n" * (MAX_REPLY_LINES + 1))
    assert bad.lost
    converse(net.peers["b.example"], HAPPY)
    attempt = result(d)
    assert net.attempts == ["a.example", "b.example"]
    assert attempt.relay == "b.example[192.0.2.8]:25"
    assert [r.status for r in attempt.results] == [Status.SENT, Status.SENT]


def test_endless_reply_from_the_only_hop_defers():
    net = Network(a_example="192.0.2.7")
    d = deliver(net.courier(), [Hop("a.example")])
    bad = net.peers["a.example"]
    bad.feed(GREETING)
    bad.feed(b"250-x\r\n" * (MAX_REPLY_LINES + 1))
    attempt = result(d)
    assert attempt.relay == "a.example[192.0.2.7]:25"
    assert {(r.status, r.dsn, r.text) for r in attempt.results} == {
        (Status.DEFERRED, "4.4.2", f"a.example[192.0.2.7] sent a reply of more than {MAX_REPLY_LINES} lines")}


# -- integration: real servers on 127.0.0.1, real reactor in a subprocess -----------

SMTP_SINK = "/usr/sbin/smtp-sink"
SCENARIO_DEADLINE = 60


def _specHop(hop):
    """A hop from a scenario spec: [host, port], {"mx": domain, ...} or NextHop fields."""
    if isinstance(hop, list):
        return Hop(*hop)
    if "mx" in hop:
        fields = dict(hop)
        return mxHop(fields.pop("mx"), **fields)
    return NextHop(**{"tls": "none", **hop})


def scenarioMain(spec: dict) -> None:
    """
    Run deliveries with the real reactor and print the last AttemptResult
    as JSON, with the TLS log lines under "log" and every attempt under
    "attempts" (the test process never runs the global reactor).
    """
    from twisted.internet import task
    from twisted.logger import globalLogPublisher

    from relayd import maillog
    from relayd.resolve import makeResolver
    from relayd.secret import Secret

    lines = []
    globalLogPublisher.addObserver(
        lambda event: lines.append(event["log_line"]) if "log_line" in event else None)

    async def main(reactor):
        resolver = None
        if spec.get("dns"):
            resolver = makeResolver(reactor, tuple(tuple(s) for s in spec["dns"]), 3.0)
        courier = Courier(
            reactor, "relayd.test",
            Timeouts(connect=5, greeting=10, mail=10, rcpt=10, dataInit=10,
                     dataBlock=10, dataDone=20),
            resolver=resolver,
            passwords={k: Secret(v) for k, v in spec.get("passwords", {}).items()},
            localAddresses=lambda: [tuple(a) for a in spec.get("local", [])],
        )
        hops = [_specHop(h) for h in spec["hops"]]
        path = spec["body"]
        attempts = []
        for _ in range(spec.get("messages", 1)):
            attempt = await courier.deliver(
                Destination(tuple(hops)), spec["sender"], spec.get("mailParams", {}), spec["recipients"],
                lambda: open(path, "rb"), os.path.getsize(path),
            )
            for relay, tls in attempt.tlsSessions:  # as the scheduler logs them
                maillog.tlsConnection(relay, tls.trust, tls.protocol, tls.cipher, tls.bits)
            attempts.append(asdict(attempt))
        await courier.closeIdle()
        print(json.dumps({**attempts[-1], "attempts": attempts, "log": lines}))

    task.react(lambda reactor: defer.ensureDeferred(main(reactor)))


def runScenario(tmp_path, hops, recipients=("rcpt@example.org",), body=b"Subject: hi\r\n\r\nhello\r\n",
                sender="sender@example.com", mailParams=None, **extra):
    bodyPath = tmp_path / "body"
    bodyPath.write_bytes(body)
    spec = {"hops": hops, "recipients": list(recipients), "body": str(bodyPath),
            "sender": sender, "mailParams": mailParams or {}, **extra}
    code = "import json, sys; from tests.test_courier import scenarioMain; scenarioMain(json.loads(sys.argv[1]))"
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(spec)],
        cwd=ROOT, capture_output=True, timeout=SCENARIO_DEADLINE,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    return json.loads(proc.stdout.decode().strip().splitlines()[-1])


def freePort() -> int:
    """The integration harness's: a port never handed out twice in a run (two picks can collide)."""
    from tests.integration.harness import freePort

    return freePort()


def waitForPort(port: int, proc=None, deadline: float = 10.0) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


needsSink = pytest.mark.skipif(
    not os.access(SMTP_SINK, os.X_OK), reason="Postfix's smtp-sink is not installed"
)


@pytest.fixture
def smtpSink(tmp_path):
    """Start smtp-sink with extra options; returns (port, dump directory)."""
    procs = []
    dumps = []

    def start(*options):
        port = freePort()
        # Outside tmp_path: pytest's directories are private to the test
        # user and smtp-sink writes as nobody.
        dump = Path(tempfile.mkdtemp(prefix="relayd-sink-"))
        os.chmod(dump, 0o777)
        dumps.append(dump)
        args = [SMTP_SINK]
        if os.geteuid() == 0:
            args += ["-u", "nobody"]
        args += [*options, "-d", f"{dump}/msg.", f"127.0.0.1:{port}", "10"]
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        procs.append(proc)
        waitForPort(port, proc)
        return port, dump

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(timeout=10)
    for dump in dumps:
        shutil.rmtree(dump, ignore_errors=True)


def dumpedMessages(dump: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted(dump.iterdir())]


@needsSink
def test_integration_sink_receives_exact_body(tmp_path, smtpSink):
    port, dump = smtpSink()
    body = b"Subject: hello\r\nX-Test: 1\r\n\r\n.first dot line\r\n.\r\nend\r\n"
    attempt = runScenario(tmp_path, [["127.0.0.1", port]], ["a@example.org", "b@example.org"], body,
                          mailParams={"BODY": "8BITMIME"})
    assert attempt["relay"] == f"127.0.0.1[127.0.0.1]:{port}"
    assert [(r["address"], r["status"], r["code"]) for r in attempt["results"]] == [
        ("a@example.org", Status.SENT, 250), ("b@example.org", Status.SENT, 250)]
    [message] = dumpedMessages(dump)
    headers, _, received = message.partition(b"Received: ")
    # smtp-sink offers 8BITMIME but not SIZE.
    assert b"\nX-Mail-Args: <sender@example.com> BODY=8BITMIME\n" in headers
    assert b"X-Rcpt-Args: <a@example.org>\nX-Rcpt-Args: <b@example.org>\n" in headers
    # After its 3-line Received header, smtp-sink writes the unstuffed body
    # with LF line ends and one empty line.
    assert received.split(b"\n", 3)[3] == body.replace(b"\r\n", b"\n") + b"\n"


@needsSink
@pytest.mark.parametrize("option, status, code", [("-r", Status.DEFERRED, 450), ("-f", Status.BOUNCED, 500)])
def test_integration_sink_rcpt_refused(tmp_path, smtpSink, option, status, code):
    port, dump = smtpSink(option, "RCPT")
    attempt = runScenario(tmp_path, [["127.0.0.1", port]], ["a@example.org"])
    [r] = attempt["results"]
    assert (r["status"], r["code"], r["dsn"]) == (status, code, f"{code // 100}.3.0")
    assert r["text"] == (
        f"host 127.0.0.1[127.0.0.1] said: {code} {code // 100}.3.0 Error: command failed "
        "(in reply to RCPT TO command)"
    )
    assert dumpedMessages(dump) == []


@needsSink
def test_integration_sink_disconnect_at_dot(tmp_path, smtpSink):
    port, dump = smtpSink("-q", ".")
    attempt = runScenario(tmp_path, [["127.0.0.1", port]], ["a@example.org"])
    [r] = attempt["results"]
    assert (r["status"], r["dsn"]) == (Status.DEFERRED, "4.4.2")
    assert r["text"] == (
        "lost connection with 127.0.0.1[127.0.0.1] while sending end of data "
        "-- message may be sent more than once"
    )


def test_integration_connection_refused(tmp_path):
    port = freePort()
    attempt = runScenario(tmp_path, [["127.0.0.1", port]], ["a@example.org"])
    assert attempt["relay"] == "none"
    [r] = attempt["results"]
    assert (r["status"], r["dsn"], r["text"]) == (
        Status.DEFERRED, "4.4.1", f"connect to 127.0.0.1[127.0.0.1]:{port}: Connection refused")


@needsSink
def test_integration_failover_to_live_sink(tmp_path, smtpSink):
    closed = freePort()
    port, dump = smtpSink()
    attempt = runScenario(tmp_path, [["127.0.0.1", closed], ["127.0.0.1", port]], ["a@example.org"])
    assert attempt["relay"] == f"127.0.0.1[127.0.0.1]:{port}"
    assert attempt["results"][0]["status"] == Status.SENT
    assert len(dumpedMessages(dump)) == 1


class FloodingServer:
    """
    A real server on 127.0.0.1 that greets, reads EHLO, then sends "250-"
    lines until the client hangs up (or FLOOD_LIMIT bytes, so the test ends
    whatever the client does); ``sent`` is how many bytes it got out.
    """

    FLOOD_LIMIT = 50 * 1024 * 1024

    def __init__(self):
        import threading

        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sent = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        self.listener.settimeout(SCENARIO_DEADLINE)
        conn, _ = self.listener.accept()
        with conn:
            conn.settimeout(SCENARIO_DEADLINE)
            conn.sendall(b"220 flood.example ESMTP\r\n")
            conn.recv(1024)
            chunk = b"250-" + b"x" * 60 + b"\r\n"
            chunk *= 1024
            try:
                while self.sent < self.FLOOD_LIMIT:
                    conn.sendall(chunk)
                    self.sent += len(chunk)
            except OSError:
                pass

    def close(self):
        self.thread.join(SCENARIO_DEADLINE)
        self.listener.close()


def test_integration_flooding_hop_is_cut_off_and_the_next_hop_used(tmp_path):
    """
    A real next hop that floods its EHLO reply is dropped after the cap
    (it gets out far less than its flood) and the message goes to the
    next hop.
    """
    aiosmtpd = pytest.importorskip("aiosmtpd.controller")

    class Capture:
        async def handle_DATA(self, server, session, envelope):
            return "250 2.0.0 Ok: captured"

    flood = FloodingServer()
    port = freePort()
    controller = aiosmtpd.Controller(Capture(), hostname="127.0.0.1", port=port)
    controller.start()
    try:
        attempt = runScenario(tmp_path, [["127.0.0.1", flood.port], ["127.0.0.1", port]],
                              ["a@example.org"])
    finally:
        controller.stop()
        flood.close()
    assert attempt["relay"] == f"127.0.0.1[127.0.0.1]:{port}"
    assert attempt["results"][0]["status"] == Status.SENT
    # Socket buffers hold some megabytes at most; the flood is 50 MiB.
    assert flood.sent < FloodingServer.FLOOD_LIMIT


def largeDottedBody(size: int = 5_000_000) -> bytes:
    """Lines of varied lengths, many starting with '.', some exactly '.'."""
    rng = random.Random(20240601)
    lines = [b".", b".."]
    total = 0
    while total < size:
        kind = rng.randrange(6)
        if kind == 0:
            line = b"."
        elif kind == 1:
            line = b"." * rng.randrange(1, 4) + b"x" * rng.randrange(0, 80)
        else:
            line = b"y" * rng.randrange(0, 200)
        lines.append(line)
        total += len(line) + 2
    return b"\r\n".join(lines) + b"\r\n"


def test_integration_aiosmtpd_large_dotted_body_arrives_identical(tmp_path):
    aiosmtpd = pytest.importorskip("aiosmtpd.controller")

    class Capture:
        def __init__(self):
            self.envelopes = []

        async def handle_DATA(self, server, session, envelope):
            self.envelopes.append(envelope)
            return "250 2.0.0 Ok: captured"

    handler = Capture()
    port = freePort()
    controller = aiosmtpd.Controller(handler, hostname="127.0.0.1", port=port,
                                     data_size_limit=20_000_000)
    controller.start()
    try:
        body = largeDottedBody()
        attempt = runScenario(tmp_path, [["127.0.0.1", port]], ["a@example.org"], body)
    finally:
        controller.stop()
    [r] = attempt["results"]
    assert (r["status"], r["text"]) == (Status.SENT, "250 2.0.0 Ok: captured")
    [envelope] = handler.envelopes
    assert envelope.mail_from == "sender@example.com"
    assert envelope.rcpt_tos == ["a@example.org"]
    assert envelope.original_content == body


class HeldReads:
    """A runInThread whose calls wait until the test runs them."""

    def __init__(self):
        self.calls = []

    def __call__(self, f, *args):
        d = defer.Deferred()
        self.calls.append((f, args, d))
        return d

    def runAll(self):
        calls, self.calls = self.calls, []
        for f, args, d in calls:
            try:
                d.callback(f(*args))
            except Exception:
                d.errback(Failure())


def test_the_body_is_read_while_data_waits_for_its_354():
    # The read of a spooled body (a thread job) overlaps the round trip of
    # MAIL, RCPT and DATA instead of following the 354.
    reads = HeldReads()
    peer = Peer(runInThread=reads)
    peer.ready()
    d = send(peer, ["a@x.org"], body=b"Subject: hi\r\n\r\nhello\r\n")
    assert peer.sent().endswith(b"RCPT TO:<a@x.org>\r\nDATA\r\n")
    assert len(reads.calls) == 1  # asked for before any reply
    reads.runAll()
    peer.feed(b"250 Ok\r\n250 Ok\r\n354 go\r\n")
    assert peer.sent() == b"Subject: hi\r\n\r\nhello\r\n.\r\n"
    peer.feed(b"250 Ok\r\n")
    assert result(d).results[0].status == Status.SENT


@pytest.mark.parametrize("readFirst", [True, False], ids=["read before the replies", "read after them"])
def test_a_body_read_ahead_is_closed_when_no_body_is_sent(readFirst):
    reads = HeldReads()
    opened = []

    class Body(io.BytesIO):
        def close(self):
            opened.append("closed")
            super().close()

    def openBody():
        opened.append("opened")
        return Body(b"a" * 100 + b"\r\n")

    peer = Peer(runInThread=reads, chunkSize=16)  # longer than a chunk: stays open after the read
    peer.ready()
    d = peer.session.sendMessage("s@example.com", {}, ["a@x.org"], openBody, 102)
    peer.sent()
    if readFirst:
        reads.runAll()
    peer.feed(b"550 5.7.1 no\r\n503 5.5.1 need MAIL\r\n554 5.5.1 no valid recipients\r\n")
    reads.runAll()
    reads.runAll()
    assert not result(d).mailAccepted
    assert opened in ([], ["opened", "closed"])  # whatever was opened is closed
    assert peer.sent() == b""


def test_a_body_that_cannot_be_read_ahead_defers_after_the_354():
    reads = HeldReads()
    peer = Peer(runInThread=reads)
    peer.ready()

    def openBody():
        raise FileNotFoundError(2, "No such file or directory")

    d = peer.session.sendMessage("s@x", {}, ["a@x.org"], openBody, 10)
    reads.runAll()
    assert not d.called and not peer.transport.disconnected  # nothing happens before the 354
    peer.feed(b"250 Ok\r\n250 Ok\r\n354 go\r\n")
    reads.runAll()
    [r] = result(d).results
    assert (r.status, r.dsn) == (Status.DEFERRED, "4.3.0")
    assert peer.transport.disconnected
