"""
SMTPUTF8 (RFC 6531, 6532) and international domains (IDNA2008): dialogues
with the server, the MAIL and RCPT the client sends, routes, auth.senders
and MX lookups in A-labels, the envelope flag, and RFC 6533 bounces parsed
back with the email package.
"""

from __future__ import annotations

import email
import email.policy
import io
import json

import pytest
from twisted.internet import defer

from relayd import bounce, idn, server
from relayd.auth import senderAllowed
from relayd.delivery import Destination
from relayd.envelope import Envelope, Recipient, Status
from relayd.resolve import mailTargets
from relayd.route import destinationOf, recipientDomain
from tests.builders import testConfig
from tests.test_courier import EHLO_FULL, GREETING, Hop, Network, Peer, converse, result, send
from tests.test_resolve import FakeResolver
from tests.test_server import Harness, codes, storedBody

MUST_DECLARE = "553 5.6.7 Must declare SMTPUTF8 to send unicode address"
BAD_SENDER = "501 5.1.7 Bad sender address syntax"
BAD_RECIPIENT = "501 5.1.3 Bad recipient address syntax"
EHLO_UTF8 = EHLO_FULL.replace(b"250 ENHANCEDSTATUSCODES", b"250-ENHANCEDSTATUSCODES\r\n250 SMTPUTF8")


def lines(text: str) -> bytes:
    return text.encode("utf-8")


def transaction(hs: Harness, sender: str, recipients, body: bytes, smtputf8=True) -> list[str]:
    option = " SMTPUTF8" if smtputf8 else ""
    hs.send(b"EHLO client.test\r\n")
    out = hs.send(lines(f"MAIL FROM:<{sender}>{option}\r\n"))
    for r in recipients:
        out += hs.send(lines(f"RCPT TO:<{r}>\r\n"))
    out += hs.send(b"DATA\r\n")
    out += hs.send(body + b".\r\n")
    return out


# -- the server: UTF-8 only with SMTPUTF8 on MAIL ------------------------------------


def test_utf8_addresses_need_smtputf8_on_mail():
    hs = Harness()
    hs.send(b"EHLO client.test\r\n")
    assert hs.send(lines("MAIL FROM:<jörg@example.com>\r\n")) == [MUST_DECLARE]
    assert hs.send(b"MAIL FROM:<a@example.com>\r\n") == ["250 2.1.0 Ok"]
    # A transaction without SMTPUTF8 takes no UTF-8 recipient either.
    assert hs.send(lines("RCPT TO:<用户@例子.example>\r\n")) == [MUST_DECLARE]
    assert hs.send(lines("RCPT TO:<user@bücher.example>\r\n")) == [MUST_DECLARE]


def test_utf8_message_is_queued_with_its_utf8_untouched():
    hs = Harness()
    body = lines("From: Jörg <jörg@bücher.example>\r\nSubject: Grüße\r\n\r\nHallo\r\n")
    out = transaction(hs, "jörg@bücher.example", ["用户@例子.example"], body)
    assert codes(out) == ["250", "250", "354", "250"]
    envelope, stored = storedBody(hs)
    assert envelope.sender == "jörg@bücher.example"
    assert [r.address for r in envelope.recipients] == ["用户@例子.example"]
    assert envelope.smtputf8 is True
    assert envelope.mailParams == {}  # the flag is the record, not a parameter
    assert lines("From: Jörg <jörg@bücher.example>\r\nSubject: Grüße\r\n") in stored
    # RFC 6531 section 3.7.3's protocol name; the recipient in UTF-8.
    assert b"with UTF8SMTP id " in stored
    assert lines("for <用户@例子.example>") in stored


@pytest.mark.parametrize("sender, recipient, header, needs", [
    # UTF-8 in a local part: cannot be downgraded.
    ("jörg@example.com", "bob@example.org", b"Subject: hi\r\n", True),
    ("alice@example.com", "用户@example.org", b"Subject: hi\r\n", True),
    # UTF-8 in the header only.
    ("alice@example.com", "bob@example.org", lines("Subject: Grüße\r\n"), True),
    # UTF-8 only in domains: A-labels will do.
    ("alice@bücher.example", "bob@例子.example", b"Subject: hi\r\n", False),
    # All ASCII, even with SMTPUTF8 declared.
    ("alice@example.com", "bob@example.org", b"Subject: hi\r\n", False),
])
def test_whether_a_message_needs_smtputf8_is_recorded(sender, recipient, header, needs):
    hs = Harness()
    out = transaction(hs, sender, [recipient], header + b"\r\nbody \xc3\xa4\r\n")
    assert codes(out)[-1] == "250"
    envelope, stored = storedBody(hs)
    assert envelope.smtputf8 is needs
    if not needs:
        # relayd's own Received: does not make the message need it either.
        assert stored.split(b"\r\n\r\n")[0].isascii()


def test_a_header_block_too_big_to_check_counts_as_needing_smtputf8():
    hs = Harness()
    header = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"x" * 80) for i in range(3000))
    assert len(header) > server.MAX_HEADER_BLOCK and header.isascii()
    hs.send(b"EHLO client.test\r\nMAIL FROM:<a@example.com> SMTPUTF8\r\n"
            b"RCPT TO:<b@example.org>\r\nDATA\r\n")
    # Read by the line, as from a socket: the held block passes its bound.
    for i in range(0, len(header), 4096):
        hs.send(header[i:i + 4096])
    assert codes(hs.send(b"\r\nbody\r\n.\r\n")) == ["250"]
    envelope, _ = storedBody(hs)
    assert envelope.smtputf8 is True  # cannot tell without holding it all: the safe answer


def test_undeclared_utf8_header_passes_through_and_needs_nothing():
    hs = Harness()
    header = lines("Subject: Grüße\r\nFrom: a@example.com\r\n")
    out = transaction(hs, "a@example.com", ["b@example.org"], header + b"\r\nx\r\n", smtputf8=False)
    assert codes(out)[-1] == "250"
    envelope, stored = storedBody(hs)
    assert envelope.smtputf8 is False
    assert header in stored
    assert b"with ESMTP id " in stored


@pytest.mark.parametrize("command, reply", [
    ("MAIL FROM:<a@example.com> SMTPUTF8=yes", "501 5.5.4 Bad parameter value: SMTPUTF8"),
    # A C1 control character (NEL), and the Unicode line separator.
    ("MAIL FROM:<j\u0085rg@example.com> SMTPUTF8", BAD_SENDER),
    ("MAIL FROM:<j\u2028rg@example.com> SMTPUTF8", BAD_SENDER),
    # IDNA2008 refuses a snowman (IDNA2003 took it), an invalid A-label, an empty label.
    ("MAIL FROM:<jörg@☃.example> SMTPUTF8", BAD_SENDER),
    ("MAIL FROM:<jörg@xn--zz.example> SMTPUTF8", BAD_SENDER),
    ("MAIL FROM:<jörg@bücher..example> SMTPUTF8", BAD_SENDER),
    # The local part grammar still applies: no space, no unbalanced quote.
    ("MAIL FROM:<jö rg@example.com> SMTPUTF8", BAD_SENDER),
    ('MAIL FROM:<"jörg@example.com> SMTPUTF8', BAD_SENDER),
    # 22 characters, 66 octets: over the 64-octet local part.
    ("MAIL FROM:<" + "用" * 22 + "@example.com> SMTPUTF8", BAD_SENDER),
    ("MAIL FROM:<" + "用" * 21 + "@example.com> SMTPUTF8", "250 2.1.0 Ok"),
    ('MAIL FROM:<"jö rg"@bücher.example> SMTPUTF8', "250 2.1.0 Ok"),
])
def test_utf8_address_validation(command, reply):
    hs = Harness()
    hs.send(b"EHLO client.test\r\n")
    assert hs.send(lines(command + "\r\n")) == [reply]


def test_utf8_recipient_validation_and_invalid_utf8_bytes():
    hs = Harness()
    hs.send(b"EHLO client.test\r\nMAIL FROM:<a@example.com> SMTPUTF8\r\n")
    assert hs.send(lines("RCPT TO:<用户@☃.example>\r\n")) == [BAD_RECIPIENT]
    assert hs.send(lines("RCPT TO:<用\u0085户@example.org>\r\n")) == [BAD_RECIPIENT]
    assert hs.send(b"RCPT TO:<\xff\xfe@example.org>\r\n") == ["500 5.5.2 Error: bad characters in command"]
    assert hs.send(lines("RCPT TO:<用户@例子.example>\r\n")) == ["250 2.1.5 Ok"]


def test_orcpt_utf8_with_non_ascii_needs_a_smtputf8_transaction():
    """RFC 6533: an ORCPT of type utf-8 may carry UTF-8 only where SMTPUTF8 is in use."""
    orcpt = "RCPT TO:<bob@example.org> ORCPT=utf-8;用户@例子.example\r\n"
    hs = Harness()
    hs.send(b"EHLO client.test\r\nMAIL FROM:<a@example.com> SMTPUTF8\r\n")
    assert hs.send(lines(orcpt)) == ["250 2.1.5 Ok"]
    hs = Harness()
    hs.send(b"EHLO client.test\r\nMAIL FROM:<a@example.com>\r\n")
    assert hs.send(lines(orcpt)) == ["501 5.5.4 Bad parameter value: ORCPT"]


def test_received_header_names_a_domain_only_recipient_in_a_labels():
    hs = Harness()
    out = transaction(hs, "a@example.com", ["bob@bücher.example"], b"Subject: x\r\n\r\ny\r\n")
    assert codes(out)[-1] == "250"
    _, stored = storedBody(hs)
    assert b"for <bob@xn--bcher-kva.example>" in stored


# -- the envelope --------------------------------------------------------------------


def test_envelope_flag_round_trips_and_old_envelopes_load_without_it():
    envelope = Envelope(queueId="0123456789ABCDEF", sender="jörg@example.com",
                        recipients=[Recipient("b@example.org")], arrival=1.0, smtputf8=True)
    data = json.loads(json.dumps(envelope.toJSON()))
    assert Envelope.fromJSON(data).smtputf8 is True
    del data["smtputf8"]
    assert Envelope.fromJSON(data).smtputf8 is False
    for older in (1, 2):  # spools written before the flag existed
        assert Envelope.fromJSON({**data, "version": older}).smtputf8 is False
    # Most messages need no SMTPUTF8: their envelopes do not spell it out.
    plain = Envelope(queueId="0123456789ABCDEF", sender="a@example.com",
                     recipients=[Recipient("b@example.org")], arrival=1.0)
    assert "smtputf8" not in plain.toJSON()
    data["smtputf8"] = "false"
    with pytest.raises(ValueError, match="smtputf8"):
        Envelope.fromJSON(data)


# -- the client: SMTPUTF8 to a hop that offers it, A-labels otherwise ------------------


def test_client_sends_smtputf8_and_utf8_addresses_to_a_hop_that_offers_it():
    peer = Peer()
    peer.ready(EHLO_UTF8)
    d = peer.session.sendMessage("jörg@bücher.example", {}, ["用户@例子.example"],
                                 lambda: io.BytesIO(b"x\r\n"), 3, smtputf8=True)
    assert peer.sent() == lines("MAIL FROM:<jörg@bücher.example> SIZE=3 SMTPUTF8\r\n"
                                "RCPT TO:<用户@例子.example>\r\nDATA\r\n")
    converse(peer, [b"250 Ok\r\n250 Ok\r\n", b"354 go\r\n", b"250 Ok\r\n"])
    assert [r.status for r in result(d).results] == [Status.SENT]


def test_client_sends_a_labels_where_only_domains_are_international():
    peer = Peer()
    peer.ready()
    d = send(peer, ["bob@例子.example"], sender="alice@Bücher.example")
    assert peer.sent() == (b"MAIL FROM:<alice@xn--bcher-kva.example> SIZE=21\r\n"
                           b"RCPT TO:<bob@xn--fsqu00a.example>\r\nDATA\r\n")
    converse(peer, [b"250 Ok\r\n250 Ok\r\n", b"354 go\r\n", b"250 Ok\r\n"])
    assert [r.status for r in result(d).results] == [Status.SENT]


def test_client_refuses_a_utf8_local_part_without_smtputf8():
    peer = Peer()
    peer.ready()
    d = send(peer, ["用户@example.org", "bob@example.org"])
    assert peer.sent() == b"MAIL FROM:<s@example.com> SIZE=21\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n"
    converse(peer, [b"250 Ok\r\n250 Ok\r\n", b"354 go\r\n", b"250 Ok\r\n"])
    first, second = result(d).results
    assert (first.code, first.dsn, first.status) == (553, "5.6.7", Status.BOUNCED)
    assert second.status == Status.SENT


def test_message_needing_smtputf8_bounces_at_a_hop_without_it():
    net = Network(a_example="192.0.2.7")
    d = net.courier().deliver(Destination((Hop("a.example"),)), "a@example.com", {},
                              ["bob@example.org"], lambda: io.BytesIO(b"x\r\n"), 3, smtputf8=True)
    converse(net.peers["a.example"], [GREETING, EHLO_FULL])
    [r] = result(d).results
    assert (r.code, r.dsn, r.status) == (553, "5.6.7", Status.BOUNCED)
    assert r.text == "SMTPUTF8 is required, but was not offered by host a.example[192.0.2.7]"
    assert b"MAIL" not in net.peers["a.example"].transport.value()


# -- IDN in routes, auth.senders and MX lookups ------------------------------------------


@pytest.mark.parametrize("key", ["bücher.example", "xn--bcher-kva.example", "BÜCHER.example"])
@pytest.mark.parametrize("recipient", ["a@bücher.example", "a@xn--bcher-kva.example",
                                       "a@Bücher.Example"])
def test_route_keys_in_u_labels_or_a_labels_match_either(key, recipient):
    delivery = testConfig(delivery={"smarthosts": [], "routes": {
        key: [{"host": "mx.bücher.example", "tls": "none"}]}}).delivery
    assert list(delivery.routes) == ["xn--bcher-kva.example"]
    [hop] = destinationOf(recipientDomain(recipient), delivery).hops
    # The hop's own name is in A-labels too (DNS, TLS, logs).
    assert hop.host == "mx.xn--bcher-kva.example"


def test_recipient_domain_is_idna2008_not_idna2003():
    assert recipientDomain("a@faß.de") == "xn--fa-hia.de"
    assert "faß.de".encode("idna") == b"fass.de"  # what Python's codec would have looked up


def test_mx_lookup_asks_for_the_a_label():
    resolver = FakeResolver({"xn--fa-hia.de": {"MX": [(10, "mx.xn--fa-hia.de")]},
                             "mx.xn--fa-hia.de": {"A": ["192.0.2.1"]}})
    found = defer.ensureDeferred(mailTargets(resolver, "Faß.de")).result
    assert resolver.queries[0] == ("xn--fa-hia.de", "MX")
    assert [t.address for t in found.targets] == ["192.0.2.1"]


@pytest.mark.parametrize("entry", ["@bücher.example", "@xn--bcher-kva.example",
                                   "alice@bücher.example", "alice@XN--BCHER-KVA.example"])
@pytest.mark.parametrize("sender", ["alice@bücher.example", "alice@xn--bcher-kva.example",
                                    "Alice@BÜCHER.example"])
def test_auth_senders_match_idn_in_either_form(entry, sender):
    auth = testConfig(auth={"password_file": "/etc/relayd/passwd",
                            "senders": {"alice": [entry]}}).auth
    entries = auth.sendersFor("alice")
    assert senderAllowed(sender, "alice", entries)
    assert not senderAllowed("alice@bucher.example", "alice", entries)


def test_a_login_that_is_an_idn_address_may_send_as_itself_in_either_form():
    assert senderAllowed("alice@xn--bcher-kva.example", "alice@bücher.example", None)


# -- bounces (RFC 6533) ---------------------------------------------------------------


ORIGINAL = lines("From: Jörg <jörg@bücher.example>\r\nSubject: Grüße\r\n\r\nHallo\r\n")


def bounced(envelope: Envelope, whole=True) -> tuple[email.message.Message, bytes]:
    [recipient] = envelope.recipients
    recipient.state, recipient.dsn = Status.BOUNCED, "5.6.7"
    recipient.reply = "SMTPUTF8 is required, but was not offered by host mx.example[192.0.2.1]"
    original = ORIGINAL if whole else ORIGINAL.split(b"\r\n\r\n")[0] + b"\r\n"
    content = bounce.report(bounce.NOTICE_BOUNCE, hostname="relay.test", envelope=envelope,
                            to=envelope.sender, statuses=[bounce.statusFor(recipient)],
                            original=original, originalWhole=whole, now=1.8e9)
    return email.message_from_bytes(content, policy=email.policy.SMTPUTF8), content


def utf8Envelope(smtputf8=True, sender="jörg@bücher.example", recipient="用户@例子.example"):
    return Envelope(queueId="0123456789ABCDEF", sender=sender, recipients=[Recipient(recipient)],
                    arrival=1.8e9, smtputf8=smtputf8)


def test_bounce_of_an_international_message_is_a_global_report():
    report, content = bounced(utf8Envelope())
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "global-delivery-status"
    assert lines("\r\nTo: <jörg@bücher.example>\r\n") in content
    human, status, original = report.get_payload()
    assert "<用户@例子.example>: SMTPUTF8 is required" in human.get_content()
    assert status.get_content_type() == "message/global-delivery-status"
    # The email package reads a message/* part as one message: the first
    # block is its header, the others its body.
    fields = status.get_payload()[0].as_bytes(policy=email.policy.SMTPUTF8).decode("utf-8")
    assert "X-Relayd-Sender: utf-8; jörg@bücher.example" in fields
    assert "Final-Recipient: utf-8; 用户@例子.example" in fields
    assert "Status: 5.6.7" in fields
    assert original.get_content_type() == "message/global"
    assert original["Content-Transfer-Encoding"] == "8bit"
    [returned] = original.get_payload()
    assert str(returned["Subject"]) == "Grüße"
    assert returned.get_content().rstrip() == "Hallo"


def test_bounce_of_an_international_message_too_big_returns_global_headers():
    report, _ = bounced(utf8Envelope(), whole=False)
    _, _, original = report.get_payload()
    assert original.get_content_type() == "message/global-headers"
    [returned] = original.get_payload()
    assert str(returned["Subject"]) == "Grüße"
    assert str(returned["From"]) == "Jörg <jörg@bücher.example>"


def test_bounce_to_a_utf8_local_part_needs_smtputf8_itself():
    envelope = bounce.noticeEnvelope(bounce.NOTICE_BOUNCE, "jörg@bücher.example", "relay.test", 10, 1.0)
    assert envelope.smtputf8 is True
    envelope = bounce.noticeEnvelope(bounce.NOTICE_BOUNCE, "joerg@bücher.example", "relay.test", 10, 1.0)
    assert envelope.smtputf8 is False


def test_bounce_of_a_domain_only_message_is_an_ascii_report_in_a_labels():
    report, content = bounced(utf8Envelope(smtputf8=False, sender="joerg@bücher.example",
                                           recipient="bob@例子.example"))
    assert report.get_param("report-type") == "delivery-status"
    assert b"\r\nTo: <joerg@xn--bcher-kva.example>\r\n" in content
    human, status, original = report.get_payload()
    # Nothing of relayd's own needs 8-bit: the addresses are in A-labels throughout.
    assert content[:content.index(b"Content-Description: Undelivered Message")].isascii()
    assert "<bob@xn--fsqu00a.example>: SMTPUTF8 is required" in human.get_content()
    assert status.get_content_type() == "message/delivery-status"
    perMessage, perRecipient = status.get_payload()
    assert perMessage["X-Relayd-Sender"] == "rfc822; joerg@xn--bcher-kva.example"
    assert perRecipient["Final-Recipient"] == "rfc822; bob@xn--fsqu00a.example"
    assert original.get_content_type() == "message/rfc822"


# -- the helpers, as a table ---------------------------------------------------------


@pytest.mark.parametrize("address, converted", [
    ("a@bücher.example", "a@xn--bcher-kva.example"),
    ("a@example.com", "a@example.com"),
    ("jörg@example.com", None),
    ("a@☃.example", None),
    ("a@[192.0.2.1]", "a@[192.0.2.1]"),
])
def test_ascii_address(address, converted):
    assert idn.asciiAddress(address) == converted
