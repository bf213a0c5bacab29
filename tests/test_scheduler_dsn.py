"""
The notices a DSN request asks for (RFC 3461), through the scheduler over
task.Clock: for each NOTIFY and RET, which notices a bounce, a delay and a
delivery produce, each parsed back with the email package.
"""

from __future__ import annotations

import pytest
from twisted.internet import defer

from relayd.delivery import AttemptResult, RecipientResult
from relayd.envelope import Envelope, Recipient, Status, newQueueId
from tests.test_scheduler import ORIGINAL, parseNotice, rigWith

STATUS_OF = {2: Status.SENT, 4: Status.DEFERRED, 5: Status.BOUNCED}


class DSNCourier:
    """Answers with scripted codes from a next hop that speaks DSN or not; records what it was given."""

    def __init__(self, clock, codes, dsn):
        self.clock = clock
        self.codes = codes
        self.dsn = dsn
        self.calls = []

    def deliver(self, destination, sender, mailParams, recipients, openBody, size, recipientParams=None,
                smtputf8=False):
        if sender == "":
            codes = [250] * len(recipients)  # notices are delivered at once
        else:
            self.calls.append((dict(mailParams), dict(recipientParams or {})))
            codes = self.codes
        return defer.succeed(AttemptResult(
            relay="smtp.test[192.0.2.7]:25",
            results=tuple(RecipientResult(
                address=r, code=c, dsn=f"{c // 100}.{1 if c >= 500 else 0}.0", text=f"{c} reply",
                status=STATUS_OF[c // 100], notifyPassedOn=self.dsn and c < 300)
                for r, c in zip(recipients, codes)),
            connectSeconds=0.5, transmitSeconds=0.25))


def run(notify, ret=None, envid=None, orcpt=None, code=250, dsn=False, sender="a@example.com"):
    """One message to one recipient through a rig whose next hop answers ``code``; the rig."""
    rig = rigWith(delayWarning=3600.0)
    rig.courier = rig.sched.transport = DSNCourier(rig.clock, [code], dsn)
    env = Envelope(queueId=newQueueId(), sender=sender, arrival=rig.clock.seconds(),
                   nextAttempt=rig.clock.seconds(), size=len(ORIGINAL), ret=ret, envid=envid,
                   recipients=[Recipient("b@example.org", notify=notify, orcpt=orcpt)])
    rig.sched.add(env)
    if code // 100 == 4:
        rig.clock.pump([60] * 120)  # two hours: past delay_warning
    rig.env = env
    rig.close()
    return rig


NOTIFY = [None, ("NEVER",), ("SUCCESS",), ("FAILURE",), ("DELAY",), ("SUCCESS", "FAILURE"),
          ("FAILURE", "DELAY"), ("SUCCESS", "FAILURE", "DELAY")]


def notify(words):
    return "absent" if words is None else ",".join(words)


# The table: for each NOTIFY, whether a bounce (550), a delay (451 past
# delay_warning), a delivery to a next hop without DSN (250) and one with
# DSN (250, dsn) produce a notice. Without NOTIFY: failures and delays.
@pytest.mark.parametrize("words", NOTIFY, ids=notify)
@pytest.mark.parametrize("code, dsn, kind, askedBy", [
    (550, False, "bounce", lambda w: w is None or "FAILURE" in w),
    (451, False, "delay", lambda w: w is None or "DELAY" in w),
    (250, False, "relayed", lambda w: w is not None and "SUCCESS" in w),
    (250, True, None, lambda w: False),  # the next hop took the request over
], ids=["bounced", "delayed", "relayed-without-dsn", "sent-to-dsn-hop"])
def test_notices_follow_notify(words, code, dsn, kind, askedBy):
    rig = run(words, code=code, dsn=dsn)
    kinds = [notice.notice for notice, _ in rig.spool.notices]
    assert kinds == ([kind] if askedBy(words) else [])
    if code == 550:
        # Returned or not, the recipient is done and the message leaves the queue.
        assert rig.env.recipients[0].state is Status.BOUNCED
        assert rig.env.queueId in rig.spool.removed
    if code == 451 and not askedBy(words):
        assert rig.env.warned  # nothing is due: not looked at again


@pytest.mark.parametrize("ret, returned", [
    (None, "message/rfc822"),
    ("FULL", "message/rfc822"),
    ("HDRS", "text/rfc822-headers"),
])
@pytest.mark.parametrize("words", [None, ("FAILURE",), ("SUCCESS", "FAILURE", "DELAY")], ids=notify)
def test_bounce_returns_what_ret_asks(ret, returned, words):
    rig = run(words, ret=ret, code=550)
    [(notice, content)] = rig.spool.notices
    message, parts, perMessage, [block] = parseNotice(content)
    assert message["Subject"] == "Undelivered Mail Returned to Sender"
    assert (block["Action"], block["Status"]) == ("failed", "5.1.0")
    assert parts[2].get_content_type() == returned
    if returned == "message/rfc822":
        assert b"\r\n\r\nHello\r\n" in content
    else:
        assert "Subject: the original" in parts[2].get_content()
        assert b"Hello" not in content


def test_relayed_notice_for_success_to_a_next_hop_without_dsn():
    rig = run(("SUCCESS",), ret="FULL", envid="QQ+2B314", orcpt="rfc822;B+2Bx@example.org")
    [(notice, content)] = rig.spool.notices
    assert (notice.notice, notice.sender, [r.address for r in notice.recipients]) == (
        "relayed", "", ["a@example.com"])
    message, parts, perMessage, [block] = parseNotice(content)
    assert message["Subject"] == "Successful Mail Delivery Report"
    assert message["Auto-Submitted"] == "auto-replied"
    assert "successfully relayed" in parts[0].get_content()
    assert perMessage["Original-Envelope-Id"] == "QQ+314"
    assert block["Original-Recipient"] == "rfc822;B+x@example.org"
    assert block["Final-Recipient"] == "rfc822; b@example.org"
    assert (block["Action"], block["Status"]) == ("relayed", "2.0.0")
    assert block["Remote-MTA"] == "dns; smtp.test"
    assert block["Diagnostic-Code"] == "smtp; 250 reply"
    # A success notice returns the header only, whatever RET says.
    assert parts[2].get_content_type() == "text/rfc822-headers"
    assert b"Hello" not in content
    assert (f"{rig.env.queueId}: sender delivery status notification: {notice.queueId}"
            in rig.lines)
    # And the original was delivered and left the queue as usual.
    assert rig.env.queueId in rig.spool.removed


@pytest.mark.parametrize("code, subject", [(550, "Undelivered Mail Returned to Sender"),
                                           (451, "Delayed Mail (still being retried)")])
def test_envid_and_orcpt_in_failure_and_delay_notices(code, subject):
    rig = run(None, envid="batch-7", orcpt="rfc822;alias@example.org", code=code)
    [(notice, content)] = rig.spool.notices
    message, parts, perMessage, [block] = parseNotice(content)
    assert message["Subject"] == subject
    assert perMessage["Original-Envelope-Id"] == "batch-7"
    assert list(perMessage.keys())[:2] == ["Original-Envelope-Id", "Reporting-MTA"]
    assert block["Original-Recipient"] == "rfc822;alias@example.org"
    assert list(block.keys())[:2] == ["Original-Recipient", "Final-Recipient"]


def test_without_envid_and_orcpt_the_report_is_as_before():
    rig = run(None, code=550)
    [(notice, content)] = rig.spool.notices
    _, _, perMessage, [block] = parseNotice(content)
    assert "Original-Envelope-Id" not in perMessage
    assert "Original-Recipient" not in block
    assert list(perMessage.keys())[0] == "Reporting-MTA"


def test_dsn_parameters_reach_the_transport():
    rig = run(("SUCCESS", "FAILURE"), ret="HDRS", envid="QQ+2B314", orcpt="rfc822;b@example.org",
              dsn=True)
    [(mailParams, recipientParams)] = rig.courier.calls
    assert mailParams == {"RET": "HDRS", "ENVID": "QQ+2B314"}
    assert recipientParams == {"b@example.org": {"NOTIFY": "SUCCESS,FAILURE",
                                                 "ORCPT": "rfc822;b@example.org"}}
    assert rig.spool.notices == []


def test_only_the_recipients_that_asked_are_named():
    """One bounce for the attempt, listing only the recipients whose NOTIFY includes FAILURE."""
    rig = rigWith()
    rig.courier = rig.sched.transport = DSNCourier(rig.clock, [550, 550, 550], False)
    env = Envelope(queueId=newQueueId(), sender="a@example.com", arrival=rig.clock.seconds(),
                   nextAttempt=rig.clock.seconds(), size=len(ORIGINAL), recipients=[
                       Recipient("x@example.org", notify=("NEVER",)),
                       Recipient("y@example.org"),
                       Recipient("z@example.org", notify=("FAILURE",))])
    rig.sched.add(env)
    rig.close()
    [(notice, content)] = rig.spool.notices
    _, _, _, blocks = parseNotice(content)
    assert [b["Final-Recipient"] for b in blocks] == ["rfc822; y@example.org", "rfc822; z@example.org"]


def test_relayed_notice_for_mail_from_the_null_sender_goes_nowhere():
    rig = run(("SUCCESS",), sender="")
    assert rig.spool.notices == []


@pytest.mark.parametrize("words, returned", [(("NEVER",), False), (("DELAY",), False),
                                             (("FAILURE",), True), (None, True)],
                         ids=["NEVER", "DELAY", "FAILURE", "absent"])
def test_expiry_and_an_admin_bounce_follow_notify(words, returned):
    """Failure is failure however it comes: expiry (4.4.7) and relayctl bounce (5.0.0) too."""
    for giveUp in ("expiry", "admin"):
        rig = rigWith(lifetime=7200.0)
        rig.courier = rig.sched.transport = DSNCourier(rig.clock, [451], False)
        env = Envelope(queueId=newQueueId(), sender="a@example.com", arrival=rig.clock.seconds(),
                       nextAttempt=rig.clock.seconds(), size=len(ORIGINAL),
                       recipients=[Recipient("b@example.org", notify=words)])
        rig.sched.add(env)
        if giveUp == "expiry":
            rig.clock.pump([60] * 130)
        else:
            assert rig.sched.bounce(env.queueId) == "returned to sender"
        rig.close()
        assert env.recipients[0].state is Status.BOUNCED
        assert env.queueId in rig.spool.removed, giveUp
        statuses = [parseNotice(content)[3][0]["Status"] for _, content in rig.spool.notices]
        expected = {"expiry": "4.4.7", "admin": "5.0.0"}[giveUp]
        assert statuses == ([expected] if returned else []), giveUp
