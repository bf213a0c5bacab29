"""
The DSN parameters on the way out (RFC 3461 section 5.2): passed on
unchanged to a next hop that advertises DSN, dropped for one that does
not, and each recipient's result says whether the next hop took its
notification request over. Exact bytes over StringTransport.
"""

from __future__ import annotations

import io

import pytest

from relayd.delivery import Destination
from relayd.envelope import Status
from tests.test_courier import GREETING, Hop, Network, Peer, converse, result

EHLO_DSN = (b"250-mx.example.net\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-8BITMIME\r\n"
            b"250-ENHANCEDSTATUSCODES\r\n250 DSN\r\n")
EHLO_NO_DSN = (b"250-mx.example.net\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-8BITMIME\r\n"
               b"250 ENHANCEDSTATUSCODES\r\n")
BODY = b"Subject: t\r\n\r\nhello\r\n"
MAIL_PARAMS = {"BODY": "8BITMIME", "RET": "HDRS", "ENVID": "QQ+2B314"}
RCPT_PARAMS = {
    "a@x.org": {"NOTIFY": "SUCCESS,FAILURE", "ORCPT": "rfc822;A+2Bfilter@x.org"},
    "b@x.org": {"NOTIFY": "NEVER"},
}


def sendThrough(peer: Peer, recipients=("a@x.org", "b@x.org", "c@x.org"), rcptParams=RCPT_PARAMS):
    return peer.session.sendMessage("s@example.com", MAIL_PARAMS, list(recipients),
                                    lambda: io.BytesIO(BODY), len(BODY), recipientParams=rcptParams)


def test_next_hop_with_dsn_gets_the_parameters_unchanged():
    peer = Peer()
    peer.ready(EHLO_DSN)
    d = sendThrough(peer)
    assert peer.sent() == (
        b"MAIL FROM:<s@example.com> SIZE=%d BODY=8BITMIME RET=HDRS ENVID=QQ+2B314\r\n"
        b"RCPT TO:<a@x.org> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;A+2Bfilter@x.org\r\n"
        b"RCPT TO:<b@x.org> NOTIFY=NEVER\r\n"
        b"RCPT TO:<c@x.org>\r\n"
        b"DATA\r\n" % len(BODY)
    )
    converse(peer, [b"250 Ok\r\n250 Ok\r\n250 Ok\r\n250 Ok\r\n", b"354 go\r\n"])
    peer.sent()
    peer.feed(b"250 2.0.0 Ok: queued as Z\r\n")
    assert [(r.status, r.notifyPassedOn) for r in result(d).results] == [(Status.SENT, True)] * 3


def test_next_hop_without_dsn_gets_none_of_them():
    peer = Peer()
    peer.ready(EHLO_NO_DSN)
    d = sendThrough(peer)
    assert peer.sent() == (
        b"MAIL FROM:<s@example.com> SIZE=%d BODY=8BITMIME\r\n"
        b"RCPT TO:<a@x.org>\r\n"
        b"RCPT TO:<b@x.org>\r\n"
        b"RCPT TO:<c@x.org>\r\n"
        b"DATA\r\n" % len(BODY)
    )
    converse(peer, [b"250 Ok\r\n250 Ok\r\n550 5.1.1 no\r\n250 Ok\r\n", b"354 go\r\n"])
    peer.sent()
    peer.feed(b"250 2.0.0 Ok: queued as Z\r\n")
    assert [(r.status, r.notifyPassedOn) for r in result(d).results] == [
        (Status.SENT, False), (Status.BOUNCED, False), (Status.SENT, False)]


def test_a_refused_recipient_is_not_passed_on_even_with_dsn():
    peer = Peer()
    peer.ready(EHLO_DSN)
    d = sendThrough(peer, ("a@x.org", "b@x.org"))
    peer.sent()
    converse(peer, [b"250 Ok\r\n250 Ok\r\n450 4.2.0 later\r\n", b"354 go\r\n"])
    peer.sent()
    peer.feed(b"250 2.0.0 Ok\r\n")
    assert [(r.status, r.notifyPassedOn) for r in result(d).results] == [
        (Status.SENT, True), (Status.DEFERRED, False)]


@pytest.mark.parametrize("value", ["x\r\nRSET", "x y", "", "x\x7f"])
def test_a_value_that_could_split_the_command_is_never_written(value):
    """Validated at intake; a damaged spool must still not inject a command."""
    peer = Peer()
    peer.ready(EHLO_DSN)
    sendThrough(peer, ("a@x.org",), {"a@x.org": {"NOTIFY": value, "ORCPT": value}})
    assert peer.sent().split(b"\r\n")[1] == b"RCPT TO:<a@x.org>"


def test_courier_passes_recipient_parameters_to_the_next_hop():
    net = Network(smtp_example_net="192.0.2.9")
    d = net.courier().deliver(
        Destination((Hop("smtp.example.net", 587),)), "s@example.com", MAIL_PARAMS,
        ["a@x.org"], lambda: io.BytesIO(BODY), len(BODY), recipientParams=RCPT_PARAMS)
    peer = net.peers["smtp.example.net"]
    converse(peer, [GREETING, EHLO_DSN])
    wire = peer.sent()
    assert b"RET=HDRS ENVID=QQ+2B314\r\n" in wire
    assert b"RCPT TO:<a@x.org> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;A+2Bfilter@x.org\r\n" in wire
    converse(peer, [b"250 Ok\r\n250 Ok\r\n", b"354 go\r\n"])
    peer.sent()
    converse(peer, [b"250 2.0.0 Ok\r\n"])
    [r] = result(d).results
    assert (r.status, r.notifyPassedOn) == (Status.SENT, True)


@pytest.mark.parametrize("ehlo, expected", [
    (EHLO_DSN, b"ORCPT=utf-8;j\\x{F6}rg@x.org"),
    (EHLO_DSN.replace(b"250 DSN", b"250-DSN\r\n250 SMTPUTF8"), "ORCPT=utf-8;jörg@x.org".encode()),
])
def test_a_utf8_orcpt_is_escaped_for_a_next_hop_without_smtputf8(ehlo, expected):
    # RFC 6533 section 3: utf-8-addr-unitext only to an SMTPUTF8 server;
    # to others its utf-8-addr-xtext form, the non-ASCII as \x{HEX}.
    peer = Peer()
    peer.ready(ehlo)
    sendThrough(peer, ("a@x.org",), {"a@x.org": {"ORCPT": "utf-8;jörg@x.org"}})
    assert b"RCPT TO:<a@x.org> " + expected + b"\r\n" in peer.sent()
