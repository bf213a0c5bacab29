"""
DSN (RFC 3461) end to end: a client submits with RET, ENVID, NOTIFY and
ORCPT to the running daemon (twistd relayd), which relays to a recording
next hop that advertises DSN (the parameters arrive unchanged, no notice)
or does not (they are dropped, and the sender who asked NOTIFY=SUCCESS gets
a "relayed" notice, parsed back with the email package).
"""

from __future__ import annotations

import email
import email.policy

import pytest

from tests.integration.harness import Sink, makeMessage

pytestmark = pytest.mark.integration

MAIL_OPTIONS = ["RET=HDRS", "ENVID=QQ+2B314"]
RCPT_OPTIONS = ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;Bob+2Bold@remote.test"]


def submit(daemon, message: bytes) -> None:
    with daemon.connect() as client:
        code, reply = client.ehlo()
        assert code == 250 and b"\nDSN" in reply, reply
        assert client.mail("alice@client.test", MAIL_OPTIONS)[0] == 250
        assert client.rcpt("bob@remote.test", RCPT_OPTIONS)[0] == 250
        assert client.rcpt("carol@remote.test")[0] == 250
        assert client.data(message)[0] == 250


@pytest.mark.parametrize("dsn", [True, False], ids=["next-hop-with-dsn", "next-hop-without-dsn"])
def test_dsn_parameters_at_the_next_hop(tmp_path, processes, startRelayd, dsn):
    sink = Sink(tmp_path / "sink", dsn=dsn)
    processes.append(sink)
    sink.start()
    daemon = startRelayd(sink.port)
    message = makeMessage("dsn test", ["hello"])
    submit(daemon, message)
    if dsn:
        [delivered] = sink.waitForMessages(1, daemon.describe)
        envelope = delivered.envelope
        assert envelope["mail_command"].endswith(" RET=HDRS ENVID=QQ+2B314")
        assert envelope["rcpt_commands"] == [
            "TO:<bob@remote.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;Bob+2Bold@remote.test",
            "TO:<carol@remote.test>",
        ]
        daemon.waitForLog(r": removed\n")
        # The next hop took the request over: relayd sends no notice.
        assert len(sink.messages()) == 1
        assert "delivery status notification" not in daemon.log()
        return
    original, notice = sink.waitForMessages(2, daemon.describe)
    assert original.envelope["mail_command"].startswith("FROM:<alice@client.test>")
    assert "RET=" not in original.envelope["mail_command"]
    assert "ENVID=" not in original.envelope["mail_command"]
    assert original.envelope["rcpt_commands"] == ["TO:<bob@remote.test>", "TO:<carol@remote.test>"]
    # Only bob asked for SUCCESS: a "relayed" notice for him alone, to the sender, from <>.
    assert (notice.envelope["mail_from"], notice.envelope["rcpt_tos"]) == ("<>", ["alice@client.test"])
    report = email.message_from_bytes(notice.content, policy=email.policy.default)
    assert report["Subject"] == "Successful Mail Delivery Report"
    human, status, returned = report.iter_parts()
    perMessage, block = status.get_payload()
    assert perMessage["Original-Envelope-Id"] == "QQ+314"
    assert block["Original-Recipient"] == "rfc822;Bob+old@remote.test"
    assert block["Final-Recipient"] == "rfc822; bob@remote.test"
    assert (block["Action"], block["Status"]) == ("relayed", "2.0.0")
    assert returned.get_content_type() == "text/rfc822-headers"
    assert "Subject: dsn test" in returned.get_content()
    daemon.waitForLog(r"[0-9A-Z]{16}: sender delivery status notification: [0-9A-Z]{16}\n")
