"""
SMTPUTF8 end to end: Python's smtplib submits with SMTPUTF8 to the running
daemon (twistd relayd), which relays to the recording sink with and without
SMTPUTF8 offered: UTF-8 addresses and header fields arrive untouched where
it is offered; elsewhere a message that needs it bounces with 5.6.7 (the
bounce, an RFC 6533 report, is read back with the email package) and one
with only international domains goes in A-labels.
"""

from __future__ import annotations

import email
import email.policy

import pytest

from tests.integration.harness import Sink

pytestmark = pytest.mark.integration

GLOBAL_MESSAGE = ("From: Jörg <jörg@bücher.example>\r\nTo: 用户@例子.example\r\n"
                  "Subject: Grüße aus Köln\r\nMessage-ID: <utf8.1@bücher.example>\r\n"
                  "\r\nHallo, 你好.\r\n").encode("utf-8")


@pytest.fixture
def asciiSink(tmp_path, processes):
    """A recording sink that does not offer SMTPUTF8."""
    s = Sink(tmp_path / "ascii-sink", smtputf8=False)
    processes.append(s)
    return s.start()


def submit(daemon, sender: str, recipients: list[str], message: bytes) -> None:
    with daemon.connect() as client:
        client.ehlo()
        # smtplib itself refuses SMTPUTF8 unless the server's EHLO offers it.
        assert client.has_extn("smtputf8"), daemon.describe()
        refused = client.sendmail(sender, recipients, message, mail_options=["SMTPUTF8"])
        assert refused == {}


def test_utf8_addresses_and_headers_reach_a_hop_with_smtputf8_untouched(startRelayd, sink):
    daemon = startRelayd(sink.port, ["127.0.0.0/8"])
    submit(daemon, "jörg@bücher.example", ["用户@例子.example"], GLOBAL_MESSAGE)
    [delivered] = sink.waitForMessages(1, daemon.describe)
    assert delivered.envelope["mail_from"] == "jörg@bücher.example"
    assert delivered.envelope["rcpt_tos"] == ["用户@例子.example"]
    assert "SMTPUTF8" in delivered.envelope["mail_options"]
    header, _, body = GLOBAL_MESSAGE.partition(b"\r\n\r\n")
    assert header + b"\r\n" in delivered.content
    assert delivered.content.endswith(b"\r\n\r\n" + body)
    assert b"with UTF8SMTP id " in delivered.content


def test_a_message_needing_smtputf8_bounces_at_a_hop_without_it(startRelayd, asciiSink):
    daemon = startRelayd(asciiSink.port, ["127.0.0.0/8"])
    submit(daemon, "alice@client.test", ["用户@例子.example"], GLOBAL_MESSAGE)
    daemon.waitForLog(r"dsn=5\.6\.7, status=bounced \(SMTPUTF8 is required, but was not offered "
                      r"by host 127\.0\.0\.1\[127\.0\.0\.1\]\)")
    # The bounce to the ASCII sender needs no SMTPUTF8 itself, so the same hop takes it.
    [notice] = asciiSink.waitForMessages(1, daemon.describe)
    assert notice.envelope["mail_from"] == "<>"
    assert notice.envelope["rcpt_tos"] == ["alice@client.test"]
    assert "SMTPUTF8" not in notice.envelope["mail_options"]
    report = email.message_from_bytes(notice.content, policy=email.policy.SMTPUTF8)
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "global-delivery-status"
    human, status, original = report.get_payload()
    assert "<用户@例子.example>: SMTPUTF8 is required" in human.get_content()
    assert status.get_content_type() == "message/global-delivery-status"
    fields = status.get_payload()[0].as_bytes(policy=email.policy.SMTPUTF8).decode("utf-8")
    assert "Final-Recipient: utf-8; 用户@例子.example" in fields
    assert "Action: failed" in fields and "Status: 5.6.7" in fields
    assert original.get_content_type() == "message/global"
    [returned] = original.get_payload()
    assert str(returned["Subject"]) == "Grüße aus Köln"


def test_only_international_domains_go_as_a_labels_to_a_hop_without_smtputf8(startRelayd,
                                                                             asciiSink):
    daemon = startRelayd(asciiSink.port, ["127.0.0.0/8"])
    message = (b"From: alice@xn--bcher-kva.example\r\nSubject: plain\r\n"
               b"Message-ID: <idn.1@client.test>\r\n\r\nhello\r\n")
    submit(daemon, "alice@bücher.example", ["bob@例子.example"], message)
    [delivered] = asciiSink.waitForMessages(1, daemon.describe)
    assert delivered.envelope["mail_from"] == "alice@xn--bcher-kva.example"
    assert delivered.envelope["rcpt_tos"] == ["bob@xn--fsqu00a.example"]
    assert "SMTPUTF8" not in delivered.envelope["mail_options"]
    assert b"for <bob@xn--fsqu00a.example>" in delivered.content
    assert delivered.content.isascii()
