"""Delivery status notifications, parsed back with the email package as a mail client would."""

from __future__ import annotations

import email
import email.policy
import io

import pytest

from relayd import bounce
from relayd.envelope import Envelope, Recipient, Status
from relayd.queue import Spool

ARRIVAL = 1_700_000_000.0
ORIGINAL = (
    b"Received: from client.test (unknown [192.0.2.10])\r\n"
    b"\tby relay.test (relayd) with ESMTP id 0123456789ABCDEF\r\n"
    b"From: Alice <alice@example.com>\r\n"
    b"Subject: quarterly report, with a header long enough that a careless generator would fold it somewhere\r\n"
    b"Message-ID: <report-42@example.com>\r\n"
    b"\r\n"
    b"Hello,\r\n.dot line\r\nFrom the start of a line\r\n"
)


def original(**kw) -> Envelope:
    values = dict(queueId="0123456789ABCDEF", sender="alice@example.com", arrival=ARRIVAL,
                  recipients=[
                      Recipient("bob@example.org", dsn="5.1.1", reply="550 5.1.1 <bob@example.org>: no such user",
                                relay="mx.example.org[198.51.100.7]:25", lastAttempt=ARRIVAL + 60),
                      Recipient("carol@example.org", dsn="5.7.1", reply="554 5.7.1 rejected\x1b[31m",
                                relay="mx.example.org[198.51.100.7]:25", lastAttempt=ARRIVAL + 60),
                  ])
    values.update(kw)
    return Envelope(**values)


def parse(content: bytes):
    return email.message_from_bytes(content, policy=email.policy.default)


def build(env: Envelope, kind="bounce", whole=True, data=ORIGINAL, action=bounce.FAILED_ACTION):
    return bounce.report(kind, hostname="relay.test", envelope=env, to=env.sender or "pm@example.net",
                         statuses=[bounce.statusFor(r, action) for r in env.recipients],
                         original=data, originalWhole=whole, now=ARRIVAL + 61, lifetime=5 * 86400.0)


def test_report_structure():
    content = build(original())
    assert b"\n" not in content.replace(b"\r\n", b"")  # canonical CRLF
    message = parse(content)
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    assert message["To"].addresses[0].addr_spec == "alice@example.com"
    assert message["From"].addresses[0].addr_spec == "MAILER-DAEMON@relay.test"
    assert message["Auto-Submitted"] == "auto-replied"
    assert message["Message-ID"].endswith("@relay.test>")
    human, status, returned = message.iter_parts()
    assert human.get_content_type() == "text/plain"
    text = human.get_content().replace("\r\n", "\n")
    assert "could not\nbe delivered" in text
    assert "<bob@example.org>: 550 5.1.1 <bob@example.org>: no such user" in text

    assert status.get_content_type() == "message/delivery-status"
    perMessage, bob, carol = status.get_payload()
    assert perMessage["Reporting-MTA"] == "dns; relay.test"
    assert email.utils.parsedate_to_datetime(perMessage["Arrival-Date"]).timestamp() == ARRIVAL
    assert bob["Final-Recipient"] == "rfc822; bob@example.org"
    assert bob["Action"] == "failed"
    assert bob["Status"] == "5.1.1"
    assert bob["Remote-MTA"] == "dns; mx.example.org"
    assert bob["Diagnostic-Code"] == "smtp; 550 5.1.1 <bob@example.org>: no such user"
    assert email.utils.parsedate_to_datetime(bob["Last-Attempt-Date"]).timestamp() == ARRIVAL + 60
    # A remote reply cannot smuggle control characters into the report.
    assert carol["Diagnostic-Code"] == "smtp; 554 5.7.1 rejected [31m"

    assert returned.get_content_type() == "message/rfc822"
    inner = returned.get_payload()[0]
    assert inner["Message-ID"] == "<report-42@example.com>"
    assert inner["Subject"].startswith("quarterly report")
    assert ORIGINAL.split(b"\r\n\r\n", 1)[1] in content  # body returned unchanged
    assert b"\r\n>From the start" not in content


def test_too_big_original_returns_only_its_header():
    data, whole = bounce.readOriginal(lambda: io.BytesIO(ORIGINAL + b"x" * 100_000 + b"\r\n"), 50_000)
    assert not whole
    assert data == ORIGINAL.split(b"\r\n\r\n")[0] + b"\r\n"
    message = parse(build(original(), data=data, whole=False))
    returned = list(message.iter_parts())[2]
    assert returned.get_content_type() == "text/rfc822-headers"
    assert "Message-ID: <report-42@example.com>" in returned.get_content()
    assert "Hello" not in returned.get_content()


def test_small_original_is_returned_whole():
    assert bounce.readOriginal(lambda: io.BytesIO(ORIGINAL), len(ORIGINAL)) == (ORIGINAL, True)
    assert bounce.readOriginal(lambda: io.BytesIO(ORIGINAL), len(ORIGINAL) - 1)[1] is False


def test_limit_zero_returns_headers_only():
    data, whole = bounce.readOriginal(lambda: io.BytesIO(ORIGINAL), 0)
    assert not whole and data.startswith(b"Received:") and b"Hello" not in data


def test_delay_notice():
    env = original(recipients=[Recipient("bob@example.org", dsn="4.4.1", reply="connect to mx: Connection refused")])
    message = parse(build(env, kind="delay", action=bounce.DELAYED_ACTION))
    assert message["Subject"] == "Delayed Mail (still being retried)"
    human, status, _ = message.iter_parts()
    assert "THIS IS A WARNING ONLY" in human.get_content()
    assert "up to 5 days" in human.get_content()
    _, block = status.get_payload()
    assert block["Action"] == "delayed"
    assert block["Status"] == "4.4.1"
    # Not an SMTP reply: relayd's own diagnostic type.
    assert block["Diagnostic-Code"] == "X-Relayd; connect to mx: Connection refused"
    assert email.utils.parsedate_to_datetime(block["Will-Retry-Until"]).timestamp() == ARRIVAL + 5 * 86400


def test_expired_status():
    env = original(recipients=[Recipient("bob@example.org", dsn="4.4.1", reply="451 try later")])
    status = bounce.statusFor(env.recipients[0], bounce.FAILED_ACTION, bounce.EXPIRED_STATUS)
    assert (status.action, status.status, status.diagnostic) == ("failed", "4.4.7", "451 try later")


@pytest.mark.parametrize("state, action, status", [
    (Status.BOUNCED, "failed", "5.1.1"),
    (Status.DEFERRED, "delayed", "4.4.1"),
])
def test_the_action_of_a_recipient_follows_its_status(state, action, status):
    recipient = Recipient("bob@example.org", state=state, dsn=status, reply="the reply")
    line = bounce.statusFor(recipient)
    assert (line.action, line.status, line.diagnostic) == (action, status, "the reply")


def test_write_notice_commits_to_the_spool(tmp_path):
    spool = Spool(str(tmp_path / "spool"))
    spool.recover()
    content = build(original())
    notice = bounce.writeNotice(spool, "bounce", "alice@example.com", "relay.test", content, now=ARRIVAL)
    [loaded] = spool.recover()
    assert loaded == notice
    assert loaded.sender == "" and loaded.notice == "bounce"
    assert [r.address for r in loaded.recipients] == ["alice@example.com"]
    assert loaded.nextAttempt == ARRIVAL and loaded.size == len(content)
    with spool.openBody(notice.queueId) as f:
        assert f.read() == content


def test_write_notice_failure_leaves_nothing(tmp_path, monkeypatch):
    spool = Spool(str(tmp_path / "spool"))
    spool.recover()
    import os

    def full(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError):
        bounce.writeNotice(spool, "bounce", "alice@example.com", "relay.test", b"x\r\n", now=ARRIVAL)
    monkeypatch.undo()
    assert spool.recover() == []
    assert os.listdir(tmp_path / "spool" / "queue") == []


def test_quarantine_report():
    content = bounce.quarantineReport(hostname="relay.test", to="pm@example.net",
                                      entries=[("0123456789ABCDEF", "envelope is not JSON")],
                                      directory="/var/spool/relayd", now=ARRIVAL)
    message = parse(content)
    assert message["To"].addresses[0].addr_spec == "pm@example.net"
    assert "0123456789ABCDEF: envelope is not JSON" in message.get_content()
    assert "/var/spool/relayd/quarantine/" in message.get_content()


def test_quarantine_report_carries_the_notice_header_fields():
    content = bounce.quarantineReport(hostname="relay.test", to="pm@example.net",
                                      entries=[("0123456789ABCDEF", "bad")],
                                      directory="/var/spool/relayd", now=ARRIVAL)
    message = parse(content)
    assert b"\r\nFrom: MAILER-DAEMON@relay.test (Mail Delivery System)\r\n" in content
    assert message["Subject"] == "Postmaster Warning: unreadable queue entries quarantined"
    assert message["Auto-Submitted"] == "auto-generated"
    assert message["Message-ID"].endswith("@relay.test>") and message["Date"]
    assert b"\r\n" in content and b"\n" not in content.replace(b"\r\n", b"")
