"""
SMTP dialogues with relayd's server over StringTransport: exact bytes in,
exact replies out, and what was or was not queued.
"""

from __future__ import annotations

import errno
import re

import pytest
from twisted.internet import address, defer, task
from twisted.internet.testing import StringTransport

from relayd import server
from relayd.envelope import isQueueId
from tests.builders import testConfig
from tests.dialogue import Dialogue


class MemoryWriter:
    buffered = 0  # nothing is ever handed to writeOut: the body stays in chunks

    def __init__(self, spool, queueId):
        self.spool = spool
        self.queueId = queueId
        self.chunks = []
        self.size = 0
        self.aborted = False

    def write(self, data):
        self.chunks.append(bytes(data))
        self.size += len(data)

    def commit(self, envelope):
        self.spool.committed[envelope.queueId] = (envelope, b"".join(self.chunks))

    def abort(self):
        self.aborted = True


class MemorySpool:
    def __init__(self):
        self.committed = {}
        self.writers = []

    def begin(self, queueId):
        w = MemoryWriter(self, queueId)
        self.writers.append(w)
        return w

    receive = begin


def makeConfig(trusted=("127.0.0.0/8", "::1/128"), messageSize=10_000_000, recipients=100,
               connections=100, connectionsPerClient=20):
    """A real config: these limits, every other one at its default, no free-space check."""
    return testConfig(
        hostname="relay.test",
        relay={"trusted_networks": list(trusted)},
        limits={"message_size": messageSize, "recipients": recipients,
                "connections": connections, "connections_per_client": connectionsPerClient},
        queue={"free_space_reserve": 0},
    )


class Harness(Dialogue):
    def __init__(self, peer="127.0.0.1", commit=None, **configArgs):
        self.clock = task.Clock()
        self.clock.advance(1_800_000_000)
        self.spool = MemorySpool()
        self.queued = []
        self.commitDeferreds = []

        def syncCommit(writer, envelope):
            writer.commit(envelope)

        self.factory = server.SubmissionFactory(
            config=makeConfig(**configArgs),
            spool=self.spool,
            commit=commit or syncCommit,
            messageQueued=self.queued.append,
            clock=self.clock,
        )
        self.sessions = []
        self.connect(peer)

    def connect(self, peer="127.0.0.1"):
        cls = address.IPv6Address if ":" in peer else address.IPv4Address
        self.transport = StringTransport(peerAddress=cls("TCP", peer, 40000),
                                         hostAddress=address.IPv4Address("TCP", "127.0.0.1", 2525))
        self.proto = self.factory.buildProtocol(None)
        self.proto.makeConnection(self.transport)
        self.sessions.append((self.proto, self.transport))
        return self.take()


def codes(lines):
    return [line[:3] for line in lines if line[3:4] == " "]


def message(hs, body=b"Subject: hi\r\n\r\nhello\r\n", rcpts=("bob@example.org",)):
    out = hs.send(b"EHLO client.test\r\n")
    assert out[-1].startswith("250 ")
    out = hs.send(b"MAIL FROM:<alice@example.com>\r\n")
    assert out == ["250 2.1.0 Ok"]
    for r in rcpts:
        assert hs.send(b"RCPT TO:<%s>\r\n" % r.encode()) == ["250 2.1.5 Ok"]
    assert hs.send(b"DATA\r\n") == ["354 End data with <CR><LF>.<CR><LF>"]
    return hs.send(body + b".\r\n")


def storedBody(hs):
    (envelope, body), = hs.spool.committed.values()
    return envelope, body


def withoutAddedHeaders(body: bytes) -> bytes:
    """Drop the Received header relayd prepends (3 lines) and added Message-ID/Date."""
    lines = body.split(b"\r\n")
    assert lines[0].startswith(b"Received: from ")
    i = 1
    while lines[i].startswith(b"\t"):
        i += 1
    return b"\r\n".join(lines[i:])


def test_greeting_and_ehlo_advertise_extensions():
    hs = Harness()
    hs.connect()
    assert hs.send(b"EHLO client.test\r\n") == [
        "250-relay.test", "250-PIPELINING", "250-SIZE 10000000", "250-8BITMIME",
        "250-ENHANCEDSTATUSCODES", "250-SMTPUTF8", "250 DSN",
    ]


def test_banner():
    hs = Harness()
    assert hs.connect() == ["220 relay.test ESMTP relayd"]


def test_trusted_client_relays_and_gets_queue_id():
    hs = Harness()
    out = message(hs)
    assert len(out) == 1
    m = re.fullmatch(r"250 2\.0\.0 Ok: queued as (\w+)", out[0])
    assert m and isQueueId(m.group(1))
    envelope, body = storedBody(hs)
    assert envelope.queueId == m.group(1)
    assert envelope.sender == "alice@example.com"
    assert [r.address for r in envelope.recipients] == ["bob@example.org"]
    assert envelope.clientAddress == "127.0.0.1"
    assert envelope.helo == "client.test"
    assert hs.queued == [envelope]
    assert body.startswith(b"Received: from client.test (unknown [127.0.0.1])\r\n\tby relay.test (relayd) with ESMTP id ")
    assert b"Subject: hi\r\n" in body and body.endswith(b"\r\n\r\nhello\r\n")


def test_untrusted_client_is_refused_at_rcpt():
    hs = Harness(peer="192.0.2.4")
    hs.send(b"EHLO x\r\n")
    assert hs.send(b"MAIL FROM:<x@example.org>\r\n") == ["250 2.1.0 Ok"]
    assert hs.send(b"RCPT TO:<c@example.com>\r\n") == ["554 5.7.1 <c@example.com>: Relay access denied"]
    assert hs.send(b"DATA\r\n") == ["503 5.5.1 Error: need RCPT command"]
    assert hs.spool.committed == {}


def test_ipv4_mapped_peer_is_normalised_for_trust():
    hs = Harness(peer="::ffff:127.0.0.1")
    assert hs.proto.clientAddress == "127.0.0.1"
    assert message(hs)[0].startswith("250 2.0.0 Ok: queued as ")


def test_pipelined_envelope_and_data_and_quit_answered_in_order_with_async_commit():
    pending = []

    def slowCommit(writer, envelope):
        d = defer.Deferred()
        pending.append((d, writer, envelope))
        return d

    hs = Harness(commit=slowCommit)
    out = hs.send(
        b"EHLO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\n"
        b"RCPT TO:<c@example.org>\r\nDATA\r\n"
        b"Subject: x\r\n\r\nbody\r\n.\r\nMAIL FROM:<a@example.com>\r\nQUIT\r\n"
    )
    # Everything up to the end of data is answered; the rest waits for the commit.
    assert codes(out) == ["250", "250", "250", "250", "354"]
    assert hs.transport.connected
    d, writer, envelope = pending.pop()
    writer.commit(envelope)
    d.callback(None)
    out = hs.take()
    assert codes(out) == ["250", "250", "221"]
    assert out[0] == f"250 2.0.0 Ok: queued as {envelope.queueId}"
    assert hs.transport.disconnecting


def test_body_after_failed_commit_is_not_read_as_commands():
    def failingCommit(writer, envelope):
        raise OSError(errno.ENOSPC, "No space left on device")

    hs = Harness(commit=failingCommit)
    hs.send(b"EHLO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\n")
    hs.send(b"DATA\r\n")
    out = hs.send(b"RCPT TO:<evil@example.org>\r\n.\r\nNOOP\r\n")
    assert out == ["452 4.3.1 Insufficient system storage", "250 2.0.0 Ok"]
    assert hs.queued == []


def test_commit_error_other_than_disk_full_is_451():
    def failingCommit(writer, envelope):
        raise OSError(errno.EIO, "Input/output error")

    hs = Harness(commit=failingCommit)
    assert message(hs) == ["451 4.3.0 Error: queue file write error"]


def test_dot_unstuffing_and_first_line_dot():
    hs = Harness()
    out = message(hs, body=b"..first\r\n..\r\n...\r\n.x\r\nlast\r\n")
    assert out[0].startswith("250 ")
    _, body = storedBody(hs)
    assert withoutAddedHeaders(body).endswith(b".first\r\n.\r\n..\r\nx\r\nlast\r\n")


@pytest.mark.parametrize("split", range(1, 12))
def test_terminator_split_across_reads(split):
    hs = Harness()
    message_ = b"Subject: s\r\n\r\na\r\n.\r\nNOOP\r\n"
    hs.send(b"EHLO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
    wire = message_[:split], message_[split:]
    out = hs.send(wire[0]) + hs.send(wire[1])
    assert codes(out) == ["250", "250"]
    _, body = storedBody(hs)
    assert body.endswith(b"\r\n\r\na\r\n")


def test_empty_message_ends_at_once():
    hs = Harness()
    hs.send(b"EHLO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
    assert codes(hs.send(b".\r\n")) == ["250"]


@pytest.mark.parametrize("fake", [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\r\n.\r", b"\r\n.\r\r\n"])
def test_smuggling_variants_do_not_end_data(fake):
    hs = Harness(peer="192.0.2.9", trusted=("192.0.2.0/24",))
    hs.send(b"EHLO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
    out = hs.send(b"Subject: s\r\n\r\nx" + fake + b"MAIL FROM:<evil@example.com>\r\n")
    assert out == []  # still in DATA: the smuggled MAIL is body text
    out = hs.send(b"\r\n.\r\n")
    assert codes(out) == ["250"]
    _, body = storedBody(hs)
    assert b"MAIL FROM:<evil@example.com>\r\n" in body
    assert b"\r\n" in body and body.count(b"\n") == body.count(b"\r\n")  # canonical CRLF


def test_bare_lf_from_trusted_client_is_normalised():
    hs = Harness()
    out = hs.send(b"EHLO printer\nMAIL FROM:<scan@example.com>\nRCPT TO:<b@example.org>\nDATA\n")
    assert codes(out) == ["250", "250", "250", "354"]
    assert codes(hs.send(b"Subject: scan\n\nline one\nline two\r\n.\r\n")) == ["250"]
    _, body = storedBody(hs)
    assert re.search(rb"\r\nSubject: scan\r\nMessage-ID: <[^>]+>\r\nDate: [^\r]+\r\n\r\nline one\r\nline two\r\n$", body)
    assert body.count(b"\n") == body.count(b"\r\n")


def test_bare_lf_from_untrusted_client_is_rejected_after_end_of_data():
    hs = Harness(peer="192.0.2.9", trusted=())
    hs.proto.trusted = False
    # Until AUTH exists only trusted clients relay: stand in for an
    # authenticated user, who may relay but is not trusted to send bare LF.
    hs.proto.avatar = server.TrustedNetworkClient()
    hs.send(b"EHLO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
    out = hs.send(b"Subject: s\n\nbare\nend\r\n.\r\nQUIT\r\n")
    assert out == ["550 5.5.2 Error: bare <CR> or <LF> in message; see RFC 5321 section 2.3.8",
                   "221 2.0.0 Bye"]
    assert hs.spool.committed == {}
    assert hs.spool.writers[0].aborted


def test_bare_lf_command_from_untrusted_client_is_refused():
    hs = Harness(peer="192.0.2.9")
    assert hs.send(b"EHLO c\n") == ["500 5.5.2 Error: bare <CR> or <LF> in command"]


def test_message_id_and_date_added_only_where_missing():
    hs = Harness()
    message(hs, body=b"Subject: a\r\n\r\nbody\r\n")
    _, body = storedBody(hs)
    assert re.search(rb"\r\nMessage-ID: <[^>]+@relay\.test>\r\nDate: [^\r]+\r\n\r\nbody\r\n$", body)

    hs = Harness()
    given = b"Message-Id: <x@y>\r\nDATE: Mon, 1 Jan 2024 00:00:00 +0000\r\nSubject: a\r\n\r\nbody\r\n"
    message(hs, body=given)
    _, body = storedBody(hs)
    assert withoutAddedHeaders(body) == given


def test_message_without_headers_keeps_its_body_a_body():
    hs = Harness()
    message(hs, body=b"just text\r\n")
    _, body = storedBody(hs)
    assert re.search(rb"\r\nDate: [^\r]+\r\n\r\njust text\r\n$", body)


def test_declared_size_over_limit_is_refused_at_mail():
    hs = Harness(messageSize=1000)
    hs.send(b"EHLO c\r\n")
    assert hs.send(b"MAIL FROM:<a@example.com> SIZE=1001\r\n") == ["552 5.3.4 Message size exceeds fixed limit"]
    assert hs.send(b"MAIL FROM:<a@example.com> SIZE=1000\r\n") == ["250 2.1.0 Ok"]


def test_actual_size_over_limit_is_read_to_the_end_then_552():
    hs = Harness(messageSize=1000)
    hs.send(b"EHLO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
    out = hs.send((b"x" * 70 + b"\r\n") * 50 + b".\r\nNOOP\r\n")
    assert out == ["552 5.3.4 Message size exceeds fixed limit", "250 2.0.0 Ok"]
    assert hs.spool.committed == {}


def test_long_data_line_is_refused_and_session_stays_in_sync():
    hs = Harness()
    hs.send(b"EHLO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
    hs.send(b"Subject: x\r\n\r\n" + b"y" * 5000)
    hs.send(b"z" * 5000)
    out = hs.send(b"\r\nMAIL FROM:<evil@example.com>\r\n.\r\nNOOP\r\n")
    assert out == ["550 5.5.2 Error: line longer than 998 characters in message", "250 2.0.0 Ok"]
    assert hs.spool.committed == {}


def test_unknown_mail_parameter_555_and_unknown_command():
    hs = Harness()
    hs.send(b"EHLO c\r\n")
    assert hs.send(b"MAIL FROM:<a@example.com> MT-PRIORITY=3\r\n") == [
        "555 5.5.4 Unsupported option: MT-PRIORITY"]
    assert hs.send(b"XYZZY 10\r\n") == ["500 5.5.2 Error: command not recognized"]


def test_helo_required_before_mail_and_helo_injection_refused():
    hs = Harness()
    assert hs.send(b"MAIL FROM:<a@example.com>\r\n") == ["503 5.5.1 Error: send HELO/EHLO first"]
    assert hs.send(b"EHLO foo\rX-Injected: evil\r\n") == ["500 5.5.2 Error: bare <CR> or <LF> in command"]
    assert hs.send(b"EHLO foo bar\r\n") == ["501 5.5.4 Syntax: EHLO hostname"]


def test_rset_and_new_ehlo_clear_the_envelope():
    hs = Harness()
    hs.send(b"EHLO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\n")
    assert hs.send(b"RSET\r\n") == ["250 2.0.0 Ok"]
    assert hs.send(b"DATA\r\n") == ["503 5.5.1 Error: need MAIL command"]
    hs.send(b"MAIL FROM:<a@example.com>\r\n")
    hs.send(b"EHLO c\r\n")
    assert hs.send(b"RCPT TO:<b@example.org>\r\n") == ["503 5.5.1 Error: need MAIL command"]


def test_too_many_recipients():
    hs = Harness(recipients=2)
    hs.send(b"EHLO c\r\nMAIL FROM:<a@example.com>\r\n")
    out = hs.send(b"RCPT TO:<b1@example.org>\r\nRCPT TO:<b2@example.org>\r\nRCPT TO:<b3@example.org>\r\n")
    assert out == ["250 2.1.5 Ok", "250 2.1.5 Ok", "452 4.5.3 Error: too many recipients"]


def test_bad_addresses():
    hs = Harness()
    hs.send(b"EHLO c\r\n")
    assert hs.send(b"MAIL FROM:alice@example.com\r\n") == ["501 5.5.4 Syntax: MAIL FROM:<address>"]
    assert hs.send(b"MAIL FROM:<a b@example.com>\r\n") == ["501 5.1.7 Bad sender address syntax"]
    assert hs.send("MAIL FROM:<jörg@example.com>\r\n".encode()) == ["553 5.6.7 Must declare SMTPUTF8 to send unicode address"]
    assert hs.send(b"MAIL FROM:<>\r\n") == ["250 2.1.0 Ok"]
    assert hs.send(b"RCPT TO:<>\r\n") == ["501 5.1.3 Bad recipient address syntax"]
    assert hs.send(b"RCPT TO:<@a.example,@b.example:u@c.example>\r\n") == ["501 5.1.3 Bad recipient address syntax"]


def test_unterminated_command_line_closes_with_bounded_memory():
    hs = Harness()
    out = hs.send(b"A" * (server.MAX_UNTERMINATED + 1))
    assert out == ["500 5.5.2 Error: line too long"]
    assert hs.transport.disconnecting
    assert len(hs.proto._inbox) == 0


def test_command_line_over_512_octets_is_refused_after_reading_it():
    hs = Harness()
    assert hs.send(b"NOOP " + b"x" * 600 + b"\r\nNOOP\r\n") == ["500 5.5.2 Error: line too long", "250 2.0.0 Ok"]


def test_idle_timeout_says_421():
    hs = Harness()
    hs.clock.advance(hs.factory.config.limits.commandTimeout + 1)
    assert hs.take() == ["421 4.4.2 relay.test Error: timeout exceeded"]
    assert hs.transport.disconnecting


def test_connection_limit_per_client():
    hs = Harness(connectionsPerClient=1)
    assert hs.connect() == ["421 4.7.0 relay.test Error: too many connections from your address"]
    assert hs.transport.disconnecting


def test_shutdown_says_421_to_a_session_in_a_transaction():
    hs = Harness()
    hs.send(b"EHLO c\r\nMAIL FROM:<a@example.com>\r\n")
    d = hs.factory.shutdown(grace=30)
    assert hs.take() == ["421 4.3.2 relay.test Service shutting down, closing connection"]
    assert hs.transport.disconnecting
    hs.proto.connectionLost(None)
    assert d.called


def test_shutdown_lets_data_in_progress_finish_then_421():
    hs = Harness()
    hs.send(b"EHLO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\nSubject: x\r\n")
    d = hs.factory.shutdown(grace=30)
    assert hs.take() == []
    out = hs.send(b"\r\nbody\r\n.\r\n")
    assert codes(out) == ["250", "421"]
    hs.proto.connectionLost(None)
    assert d.called


def test_shutdown_aborts_sessions_left_after_grace():
    hs = Harness()
    hs.send(b"EHLO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
    aborted = []
    hs.transport.abortConnection = lambda: aborted.append(True)
    d = hs.factory.shutdown(grace=30)
    hs.clock.advance(31)
    assert aborted == [True]
    assert not d.called


def test_reject_log_lines_in_postfix_wording():
    from twisted.logger import formatEvent, globalLogPublisher

    lines = []
    observer = lambda e: lines.append(formatEvent(e))  # noqa: E731
    globalLogPublisher.addObserver(observer)
    try:
        hs = Harness(peer="192.0.2.4")
        hs.send(b"EHLO x\r\nMAIL FROM:<x@example.org>\r\nRCPT TO:<c@example.com>\r\n")
    finally:
        globalLogPublisher.removeObserver(observer)
    assert "connect from unknown[192.0.2.4]" in lines
    assert ("NOQUEUE: reject: RCPT from unknown[192.0.2.4]: 554 5.7.1 <c@example.com>: Relay access denied; "
            "from=<x@example.org> to=<c@example.com> proto=ESMTP helo=<x>") in lines
    # No recipient accepted, no message: no client= line (pflogsumm counts them).
    assert not any("client=" in l for l in lines)


def test_client_line_is_logged_at_the_first_accepted_recipient():
    from twisted.logger import formatEvent, globalLogPublisher

    lines = []
    observer = lambda e: lines.append(formatEvent(e))  # noqa: E731
    globalLogPublisher.addObserver(observer)
    try:
        hs = Harness()
        hs.send(b"EHLO x\r\nMAIL FROM:<a@example.com>\r\n")
        assert not any("client=" in l for l in lines)
        hs.send(b"RCPT TO:<b@example.org>\r\nRCPT TO:<c@example.org>\r\n")
    finally:
        globalLogPublisher.removeObserver(observer)
    queueId = hs.proto.transaction.queueId
    assert [l for l in lines if "client=" in l] == [f"{queueId}: client=unknown[127.0.0.1]"]


@pytest.mark.parametrize("command, reply", [
    # str.isdigit() takes these; the SIZE grammar is ASCII digits only.
    ("MAIL FROM:<a@example.com> SIZE=²", "501 5.5.4 Bad parameter value: SIZE"),
    ("MAIL FROM:<a@example.com> SIZE=٣", "501 5.5.4 Bad parameter value: SIZE"),
    ("MAIL FROM:<a@example.com> SIZE=abc", "501 5.5.4 Bad parameter value: SIZE"),
    ("MAIL FROM:<a@example.com> SIZE", "501 5.5.4 Bad parameter value: SIZE"),
    ("MAIL FROM:<a@example.com> BODY=9BIT", "501 5.5.4 Bad parameter value: BODY"),
    ("RCPT TO:b@example.org", "503 5.5.1 Error: need MAIL command"),
    ("VRFY bob", "252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery"),
    ("HELP", "214 2.0.0 See RFC 5321"),
    ("NOOP \x01", "500 5.5.2 Error: bad characters in command"),
])
def test_bad_parameters_and_small_commands(command, reply):
    hs = Harness()
    hs.send(b"EHLO c\r\n")
    assert hs.send(command.encode("utf-8") + b"\r\n") == [reply]
    assert hs.transport.connected and not hs.transport.disconnecting


def test_nested_mail_and_rcpt_syntax():
    hs = Harness()
    hs.send(b"EHLO c\r\nMAIL FROM:<a@example.com>\r\n")
    assert hs.send(b"MAIL FROM:<a@example.com>\r\n") == ["503 5.5.1 Error: nested MAIL command"]
    assert hs.send(b"RCPT TO:b@example.org\r\n") == ["501 5.5.4 Syntax: RCPT TO:<address>"]
    assert hs.send(b"NOOP \xff\xfe\r\n") == ["500 5.5.2 Error: bad characters in command"]


def test_header_block_sent_a_line_per_read_gets_message_id_once():
    hs = Harness()
    hs.send(b"EHLO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
    for i in range(200):
        hs.send(b"X-Line-%d: v\r\n" % i)
    hs.send(b"\r\nbody\r\n")
    assert codes(hs.send(b".\r\n")) == ["250"]
    _, body = storedBody(hs)
    assert body.count(b"\r\nMessage-ID: ") == 1
    assert re.search(rb"X-Line-199: v\r\nMessage-ID: <[^>]+>\r\nDate: [^\r]+\r\n\r\nbody\r\n$", body)


def test_shutdown_during_a_refused_message_says_421_once():
    hs = Harness(messageSize=100)
    hs.send(b"EHLO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
    hs.factory.shutdown(grace=30)
    out = hs.send(b"x" * 200 + b"\r\n.\r\n")
    assert out == ["552 5.3.4 Message size exceeds fixed limit",
                   "421 4.3.2 relay.test Service shutting down, closing connection"]


# The client's name: looked up before the banner, in every line after it


class Names:
    """Stands in for ClientNames.lookup: one pending Deferred per looked-up address."""

    def __init__(self):
        self.pending: dict[str, defer.Deferred] = {}

    def __call__(self, address):
        d = self.pending[address] = defer.Deferred()
        return d


def logLines():
    from twisted.logger import formatEvent, globalLogPublisher

    lines = []
    observer = lambda e: lines.append(formatEvent(e))  # noqa: E731
    globalLogPublisher.addObserver(observer)
    return lines, lambda: globalLogPublisher.removeObserver(observer)


def test_banner_waits_for_the_client_name_and_every_line_carries_it():
    from twisted.python.failure import Failure
    from twisted.internet.error import ConnectionDone

    from relayd.resolve import ClientName

    hs = Harness()
    names = hs.factory.clientNames = Names()
    lines, stop = logLines()
    try:
        assert hs.connect("192.0.2.4") == []  # no banner yet
        assert hs.transport.producerState == "paused"  # and nothing read meanwhile
        assert not any("connect from" in l for l in lines)
        names.pending["192.0.2.4"].callback(ClientName("mail.example.org"))
        assert hs.take() == ["220 relay.test ESMTP relayd"]
        assert hs.transport.producerState == "producing"
        # The name never buys trust: relaying is still denied by address.
        hs.send(b"EHLO x\r\nMAIL FROM:<x@example.org>\r\n")
        assert hs.send(b"RCPT TO:<c@example.com>\r\n") == [
            "554 5.7.1 <c@example.com>: Relay access denied"]
        hs.proto.connectionLost(Failure(ConnectionDone()))
    finally:
        stop()
    assert [l for l in lines if "192.0.2.4" in l] == [
        "connect from mail.example.org[192.0.2.4]",
        "NOQUEUE: reject: RCPT from mail.example.org[192.0.2.4]: 554 5.7.1 <c@example.com>: "
        "Relay access denied; from=<x@example.org> to=<c@example.com> proto=ESMTP helo=<x>",
        "disconnect from mail.example.org[192.0.2.4]",
    ]


def test_unconfirmed_name_is_unknown_with_postfixs_warning():
    from relayd.resolve import ClientName

    hs = Harness()
    names = hs.factory.clientNames = Names()
    lines, stop = logLines()
    try:
        hs.connect("192.0.2.5")
        names.pending["192.0.2.5"].callback(ClientName(
            "unknown", "hostname liar.example does not resolve to address 192.0.2.5"))
    finally:
        stop()
    assert hs.take() == ["220 relay.test ESMTP relayd"]
    assert lines == ["warning: hostname liar.example does not resolve to address 192.0.2.5",
                     "connect from unknown[192.0.2.5]"]


def test_client_gone_before_its_name_is_known():
    from twisted.python.failure import Failure
    from twisted.internet.error import ConnectionDone

    from relayd.resolve import ClientName

    hs = Harness()
    names = hs.factory.clientNames = Names()
    lines, stop = logLines()
    try:
        hs.connect("192.0.2.6")
        hs.proto.connectionLost(Failure(ConnectionDone()))
        names.pending["192.0.2.6"].callback(ClientName("late.example"))
    finally:
        stop()
    assert hs.take() == []
    assert lines == ["connect from unknown[192.0.2.6]", "disconnect from unknown[192.0.2.6]"]
    assert hs.proto not in hs.factory.sessions


def test_refused_connection_costs_no_lookup():
    hs = Harness(connectionsPerClient=1)
    names = hs.factory.clientNames = Names()
    hs.connect("192.0.2.7")
    assert hs.connect("192.0.2.7") == [
        "421 4.7.0 relay.test Error: too many connections from your address"]
    assert list(names.pending) == ["192.0.2.7"]  # the first connection only


def test_header_dates_are_formatted_once_per_second(monkeypatch):
    from email.utils import formatdate

    calls = []
    monkeypatch.setattr(server, "formatdate", lambda t, localtime: (calls.append(t), formatdate(t, localtime=localtime))[1])
    monkeypatch.setattr(server, "_lastHeaderDate", [(-1, "")])
    for t in (1_796_012_830.0, 1_796_012_830.25, 1_796_012_830.999, 1_796_012_831.5, 1_796_012_831.75):
        assert server.headerDate(t) == formatdate(t, localtime=True)
    assert calls == [1_796_012_830, 1_796_012_831]
