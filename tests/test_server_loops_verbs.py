"""
Dialogues for mail loops, the verbs relayd does not offer, clients that do
not speak SMTP, and NUL bytes in a message: exact bytes in, exact replies
and log lines out, and what was or was not queued.
"""

from __future__ import annotations

import dataclasses

import pytest
from twisted.logger import globalLogPublisher

from tests.test_server import Harness, codes, message, storedBody

NOT_IMPLEMENTED = "502 5.5.1 Error: command not implemented"
GOODBYE = "221 2.7.0 Error: I can break rules, too. Goodbye."


@pytest.fixture
def logged():
    events = []
    globalLogPublisher.addObserver(events.append)
    yield lambda: [e["log_line"] for e in events if "log_line" in e]
    globalLogPublisher.removeObserver(events.append)


def withHopCount(hs: Harness, hopCount: int) -> Harness:
    config = hs.factory.config
    hs.factory.config = dataclasses.replace(
        config, limits=dataclasses.replace(config.limits, hopCount=hopCount))
    return hs


def received(n: int) -> bytes:
    return b"".join(b"Received: from hop%d.example (hop%d.example [192.0.2.%d])\r\n"
                    b"\tby hop%d.example with ESMTP id X%d;\r\n"
                    b"\tTue, 1 Dec 2026 12:00:00 +0000\r\n" % (i, i, i % 250, i + 1, i)
                    for i in range(n))


def data(hs: Harness) -> None:
    out = hs.send(b"EHLO client.test\r\nMAIL FROM:<alice@example.com>\r\nRCPT TO:<bob@example.org>\r\n"
                  b"DATA\r\n")
    assert codes(out) == ["250", "250", "250", "354"]


# The hop limit (limits.hop_count, default 50, relayd's own Received: counted)


@pytest.mark.parametrize("inMessage, hops, reply", [
    (0, 1, "250"),
    (48, 49, "250"),
    (49, 50, "554 5.4.6 Error: too many hops"),
    (50, 51, "554 5.4.6 Error: too many hops"),
])
def test_hop_limit_counts_received_headers_with_relayds_own(logged, inMessage, hops, reply):
    hs = Harness()
    out = message(hs, received(inMessage) + b"Subject: loop?\r\n\r\nbody\r\n")
    if reply == "250":
        assert codes(out) == ["250"]
        _, body = storedBody(hs)
        assert body.count(b"Received: ") == hops
        return
    queueId = hs.spool.writers[-1].queueId
    assert out == [reply]
    assert hs.spool.committed == {} and hs.queued == []
    assert hs.spool.writers[-1].aborted
    assert (f"{queueId}: reject: END-OF-MESSAGE from unknown[127.0.0.1]: {reply}; "
            f"from=<alice@example.com> proto=ESMTP helo=<client.test>") in logged()
    # The session goes on, in step with the client.
    assert hs.send(b"NOOP\r\n") == ["250 2.0.0 Ok"]


def test_hop_limit_comes_from_the_config_and_ignores_case_and_folding():
    hs = withHopCount(Harness(), 3)
    data(hs)
    out = hs.send(b"RECEIVED: from a\r\n\tby b;\r\n\tTue, 1 Dec 2026 12:00:00 +0000\r\n"
                  b"received:from c\r\n by d; Tue, 1 Dec 2026 12:00:00 +0000\r\n"
                  b"Subject: x\r\n\r\nbody\r\n.\r\n")
    assert out == ["554 5.4.6 Error: too many hops"]
    data(hs)
    assert codes(hs.send(b"Received: from a by b; Tue, 1 Dec 2026 12:00:00 +0000\r\n"
                         b"X-Received: from c\r\nSubject: x\r\n\r\nbody\r\n.\r\n")) == ["250"]


def test_received_lines_in_the_body_are_not_hops():
    hs = Harness()
    out = message(hs, b"Subject: a forwarded log\r\n\r\n" + received(60) + b"end\r\n")
    assert codes(out) == ["250"]


def test_received_headers_arriving_a_line_per_read_are_counted():
    hs = Harness()
    data(hs)
    for line in received(49).split(b"\r\n")[:-1]:
        assert hs.send(line + b"\r\n") == []
    assert hs.send(b"\r\nbody\r\n.\r\n") == ["554 5.4.6 Error: too many hops"]
    assert hs.spool.committed == {}


def test_received_headers_past_the_held_header_block_still_count():
    # A header block over the 256 KiB relayd holds: the Received: headers
    # within it are counted all the same.
    hs = Harness()
    data(hs)
    filler = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"f" * 900) for i in range(300))
    out = hs.send(received(50) + filler + b"\r\nbody\r\n.\r\n")
    assert out == ["554 5.4.6 Error: too many hops"]


# NUL bytes in a message: refused at the end of data, never relayed


@pytest.mark.parametrize("body", [
    b"Subject: s\r\n\r\nx\r\n\x00.\r\nMAIL FROM:<evil@example.com>\r\n",  # NUL-dot: not an end of data
    b"Subject: s\x00\r\n\r\nbody\r\n",
    b"Subject: s\r\n\r\n" + b"a" * 5000 + b"\r\n\x00\r\n",
    b"Subject: s\n\nx\n\x00.\nmore\r\n",  # bare LFs, which a trusted client may send
])
def test_nul_in_a_message_is_refused_after_the_end_of_data(logged, body):
    hs = Harness()
    out = message(hs, body)
    queueId = hs.spool.writers[-1].queueId
    assert out == ["550 5.6.0 Error: NUL character in message"]
    assert hs.spool.committed == {} and hs.queued == []
    assert hs.spool.writers[-1].aborted
    assert (f"{queueId}: reject: END-OF-MESSAGE from unknown[127.0.0.1]: 550 5.6.0 Error: NUL character "
            f"in message; from=<alice@example.com> proto=ESMTP helo=<client.test>") in logged()
    # What followed the NUL was body, never commands; the next message goes through.
    assert codes(message(hs)) == ["250"]


def test_nul_split_across_reads_is_refused():
    hs = Harness()
    data(hs)
    assert hs.send(b"Subject: s\r\n\r\nab") == []
    assert hs.send(b"\x00cd\r\nmore\r\n") == []
    assert hs.send(b".\r\n") == ["550 5.6.0 Error: NUL character in message"]
    assert hs.spool.committed == {}


# Verbs: what relayd offers and what it refuses


def test_ehlo_offers_no_chunking():
    hs = Harness()
    out = hs.send(b"EHLO c\r\n")
    assert not any("CHUNKING" in line or "BINARYMIME" in line for line in out)


@pytest.mark.parametrize("command, reply", [
    (b"EXPN staff", NOT_IMPLEMENTED),
    (b"expn staff", NOT_IMPLEMENTED),
    (b"ETRN example.org", NOT_IMPLEMENTED),
    (b"VRFY bob", "252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery"),
    (b"HELP", "214 2.0.0 See RFC 5321"),
])
def test_small_verbs(command, reply):
    hs = Harness()
    hs.send(b"EHLO c\r\n")
    assert hs.send(command + b"\r\n") == [reply]
    assert hs.transport.connected and not hs.transport.disconnecting


def test_expn_and_etrn_count_as_errors():
    hs = Harness()
    hs.factory.config = dataclasses.replace(
        hs.factory.config, limits=dataclasses.replace(hs.factory.config.limits, errors=2))
    hs.send(b"EHLO c\r\n")
    assert hs.send(b"EXPN a\r\nETRN b\r\n") == [
        NOT_IMPLEMENTED, NOT_IMPLEMENTED, "421 4.7.0 relay.test Error: too many errors"]


def test_bdat_is_refused_and_its_chunk_never_runs_as_commands(logged):
    hs = Harness()
    hs.send(b"EHLO c\r\nMAIL FROM:<alice@example.com>\r\nRCPT TO:<bob@example.org>\r\n")
    chunk = b"RSET\r\nMAIL FROM:<evil@example.com>\r\nRCPT TO:<x@example.org>\r\nDATA\r\n"
    out = hs.send(b"BDAT %d LAST\r\n" % len(chunk) + chunk + b"evil\r\n.\r\n")
    assert out == [NOT_IMPLEMENTED]
    assert hs.transport.disconnecting
    assert hs.spool.writers == [] and hs.spool.committed == {}
    assert ("warning: unknown[127.0.0.1]: BDAT without CHUNKING offered; connection closed"
            in logged())


# Clients that do not speak SMTP: one reply, closed, logged as Postfix does


@pytest.mark.parametrize("line, shown", [
    (b"GET / HTTP/1.1", "GET / HTTP/1.1"),
    (b"get /favicon.ico HTTP/1.1", "get /favicon.ico HTTP/1.1"),
    (b"POST /cgi-bin/x HTTP/1.0", "POST /cgi-bin/x HTTP/1.0"),
    (b"CONNECT 192.0.2.1:25 HTTP/1.1", "CONNECT 192.0.2.1:25 HTTP/1.1"),
    (b"HEAD / HTTP/1.1", "HEAD / HTTP/1.1"),
    (b"PUT /x HTTP/1.1", "PUT /x HTTP/1.1"),
    (b"OPTIONS * HTTP/1.1", "OPTIONS * HTTP/1.1"),
    (b"USER alice", "USER alice"),
    # The rest may be a password or a credential: the verb or field name only.
    (b"PASS hunter2", "PASS"),
    (b"Authorization: Basic YWxpY2U6aHVudGVyMg==", "Authorization:"),
    (b"Host: relay.test", "Host:"),
    (b"Subject: hello", "Subject:"),
])
def test_non_smtp_command_is_answered_once_closed_and_logged(logged, line, shown):
    hs = Harness(peer="192.0.2.4", trusted=())
    out = hs.send(line + b"\r\nHost: relay.test\r\nUser-Agent: x\r\n\r\n")
    assert out == [GOODBYE]
    assert hs.transport.disconnecting
    lines = logged()
    assert f"warning: non-SMTP command from unknown[192.0.2.4]: {shown}" in lines
    assert len([l for l in lines if "non-SMTP" in l]) == 1
    assert not any("hunter2" in l or "YWxpY2U6" in l for l in lines)


def test_non_smtp_command_in_the_middle_of_a_session():
    # Postfix's classic: a client that sends its body although DATA was refused.
    hs = Harness(peer="192.0.2.4", trusted=())
    out = hs.send(b"EHLO c\r\nMAIL FROM:<a@example.com>\r\nDATA\r\nSubject: hi\r\n\r\nbody\r\n.\r\n")
    assert out[-2:] == ["503 5.5.1 Error: need RCPT command", GOODBYE]
    assert hs.transport.disconnecting


def test_non_smtp_log_line_is_bounded_and_escaped(logged):
    hs = Harness(peer="192.0.2.4", trusted=())
    # Over 512 octets, with an escape sequence and a bare LF ending.
    out = hs.send(b"GET /\x1b[2J" + b"a" * 2000 + b" HTTP/1.1\n")
    assert out == [GOODBYE]
    line, = [l for l in logged() if "non-SMTP" in l]
    prefix = "warning: non-SMTP command from unknown[192.0.2.4]: "
    assert line == prefix + "GET /\\x1b[2J" + "a" * 91
    assert line.isprintable()


def test_smtp_commands_with_a_colon_are_not_junk():
    hs = Harness()
    assert codes(hs.send(b"EHLO c\r\nMAIL FROM:<alice@example.com>\r\nRCPT TO:<bob@example.org>\r\n"
                         b"RSET\r\n")) == ["250", "250", "250", "250"]
    assert hs.send(b"XYZZY:\r\n") == [GOODBYE]
