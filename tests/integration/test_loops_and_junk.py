"""
Mail loops, verbs relayd does not offer and clients that do not speak SMTP,
against the running daemon (twistd relayd) with AUTH over STARTTLS and
implicit TLS: a browser's request on the submission ports, a message that
has been round a loop, NUL in a message, EXPN and BDAT, each seen by a real
client and in the log.
"""

from __future__ import annotations

import smtplib
import socket

import pytest

from tests.integration.harness import HOST, HOSTNAME, SMTP_TIMEOUT, makeMessage
from tests.integration.test_submission_security import PASSWORD, USER, SecureRelayd, readReply

pytestmark = pytest.mark.integration

GOODBYE = b"221 2.7.0 Error: I can break rules, too. Goodbye.\r\n"
HTTP_REQUEST = (b"GET / HTTP/1.1\r\nHost: relay.test.example\r\nUser-Agent: Mozilla/5.0\r\n"
                b"Accept: */*\r\n\r\n")


@pytest.fixture
def daemon(tmp_path, processes, twistd, sink):
    d = SecureRelayd(tmp_path / "relayd", sink.port)
    processes.append(d)
    return d.start()


def readToEnd(sock) -> bytes:
    """Everything the server sends until it closes the connection."""
    data = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            return data
        data += chunk


def test_http_on_the_submission_port_gets_one_reply_and_is_closed(daemon):
    before = daemon.logOffset()
    with socket.create_connection((HOST, daemon.port), timeout=SMTP_TIMEOUT) as raw:
        assert readReply(raw).startswith(b"220 ")
        raw.sendall(HTTP_REQUEST)
        assert readToEnd(raw) == GOODBYE
    daemon.waitForLog(r"warning: non-SMTP command from unknown\[127\.0\.0\.1\]: GET / HTTP/1\.1\n",
                      since=before)
    # Nothing after the request line was taken for a command.
    assert "Host:" not in daemon.log(before) and "Mozilla" not in daemon.log(before)


def test_https_on_the_implicit_tls_port_gets_one_reply_and_is_closed(daemon):
    before = daemon.logOffset()
    with socket.create_connection((HOST, daemon.implicitPort), timeout=SMTP_TIMEOUT) as raw:
        with daemon.clientContext().wrap_socket(raw, server_hostname=HOSTNAME) as tls:
            assert readReply(tls).startswith(b"220 ")
            tls.sendall(b"POST /login HTTP/1.1\r\nContent-Length: 10\r\n\r\nPASS=x&y=z")
            assert readToEnd(tls) == GOODBYE
    daemon.waitForLog(r"warning: non-SMTP command from unknown\[127\.0\.0\.1\]: POST /login HTTP/1\.1\n",
                      since=before)


def submitter(daemon: SecureRelayd) -> smtplib.SMTP:
    client = smtplib.SMTP(HOST, daemon.port, timeout=SMTP_TIMEOUT)
    client.starttls(context=daemon.clientContext())
    client.login(USER, PASSWORD)
    return client


def withHops(count: int, subject: str) -> bytes:
    trace = b"".join(b"Received: from hop%d.example ([192.0.2.%d]) by hop%d.example;\r\n"
                     b"\tMon, 01 Jan 2024 12:00:00 +0000\r\n" % (i, i + 1, i + 1) for i in range(count))
    return trace + makeMessage(subject, ["round and round"])


def test_a_51_hop_message_is_refused_and_a_49_hop_one_relayed(daemon, sink):
    before = daemon.logOffset()
    with submitter(daemon) as client:
        # 50 Received: headers, 51 with relayd's: a loop.
        with pytest.raises(smtplib.SMTPDataError) as refused:
            client.sendmail(USER, ["bob@remote.test"], withHops(50, "looping"))
        assert (refused.value.smtp_code, refused.value.smtp_error) == (554, b"5.4.6 Error: too many hops")
        # 48, 49 with relayd's: relayed.
        assert client.sendmail(USER, ["bob@remote.test"], withHops(48, "far travelled")) == {}
    delivered, = sink.waitForMessages(1, daemon.describe)
    header = delivered.content.split(b"\r\n\r\n", 1)[0]
    assert header.count(b"Received: ") == 49
    assert b"Subject: far travelled" in header
    daemon.waitForLog(r"\w+: reject: END-OF-MESSAGE from unknown\[127\.0\.0\.1\]: 554 5\.4\.6 Error: too many "
                      r"hops; from=<alice@client\.test> proto=ESMTP helo=<", since=before)


def test_nul_in_a_message_is_refused_and_expn_and_bdat_are_not_offered(daemon, sink):
    with submitter(daemon) as client:
        assert "chunking" not in client.esmtp_features
        assert client.docmd("EXPN", "staff") == (502, b"5.5.1 Error: command not implemented")
        assert client.docmd("ETRN", "remote.test") == (502, b"5.5.1 Error: command not implemented")
        assert client.docmd("VRFY", "bob") == (
            252, b"2.0.0 Cannot VRFY user, but will accept message and attempt delivery")
        with pytest.raises(smtplib.SMTPDataError) as refused:
            client.sendmail(USER, ["bob@remote.test"], makeMessage("nul", ["a\0.", "b"]))
        assert (refused.value.smtp_code, refused.value.smtp_error) == (
            550, b"5.6.0 Error: NUL character in message")
        assert client.sendmail(USER, ["bob@remote.test"], makeMessage("clean", ["a."])) == {}
        assert client.docmd("BDAT", "4 LAST") == (502, b"5.5.1 Error: command not implemented")
    delivered, = sink.waitForMessages(1, daemon.describe)
    assert b"Subject: clean" in delivered.content and b"\0" not in delivered.content
