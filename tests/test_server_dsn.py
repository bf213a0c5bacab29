"""
Dialogues for the DSN extension (RFC 3461): RET and ENVID at MAIL, NOTIFY
and ORCPT at RCPT, each value and error case, and what the envelope keeps.
"""

from __future__ import annotations

import pytest
from twisted.logger import globalLogPublisher

from tests.test_server import Harness, codes, storedBody

BAD_VALUE = "501 5.5.4 Bad parameter value: {}"


@pytest.fixture
def logged():
    events = []
    globalLogPublisher.addObserver(events.append)
    yield lambda: [e["log_line"] for e in events if "log_line" in e]
    globalLogPublisher.removeObserver(events.append)


def mail(hs: Harness, params: str) -> list[str]:
    hs.send(b"EHLO client.test\r\n")
    return hs.send(b"MAIL FROM:<alice@example.com>" + params.encode() + b"\r\n")


def rcpt(hs: Harness, params: str, address: str = "bob@example.org") -> list[str]:
    assert mail(hs, "") == ["250 2.1.0 Ok"]
    return hs.send(b"RCPT TO:<" + address.encode() + b">" + params.encode() + b"\r\n")


def queued(hs: Harness, mailParams: str = "", rcpts=(("bob@example.org", ""),)):
    """Send a whole transaction; the committed envelope."""
    assert mail(hs, mailParams) == ["250 2.1.0 Ok"]
    for address, params in rcpts:
        assert hs.send(b"RCPT TO:<%s>%s\r\n" % (address.encode(), params.encode())) == ["250 2.1.5 Ok"]
    out = hs.send(b"DATA\r\nSubject: hi\r\n\r\nhello\r\n.\r\n")
    assert codes(out) == ["354", "250"]
    envelope, _ = storedBody(hs)
    return envelope


def test_ehlo_advertises_dsn():
    hs = Harness()
    assert "250 DSN" in hs.send(b"EHLO client.test\r\n")


# MAIL: RET


@pytest.mark.parametrize("given, stored", [("FULL", "FULL"), ("HDRS", "HDRS"), ("hdrs", "HDRS"),
                                           ("Full", "FULL")])
def test_ret_accepted_and_stored(given, stored):
    hs = Harness()
    envelope = queued(hs, f" RET={given}")
    assert envelope.ret == stored
    assert "RET" not in envelope.mailParams


@pytest.mark.parametrize("params", [" RET", " RET=", " RET=ALL", " RET=FULL,HDRS", " RET=HEADERS"])
def test_bad_ret_is_501(logged, params):
    hs = Harness()
    assert mail(hs, params) == [BAD_VALUE.format("RET")]
    assert ("NOQUEUE: reject: MAIL from unknown[127.0.0.1]: 501 5.5.4 Bad parameter value: RET; "
            "from=<alice@example.com> proto=ESMTP helo=<client.test>") in logged()
    # The transaction did not start.
    assert hs.send(b"RCPT TO:<bob@example.org>\r\n") == ["503 5.5.1 Error: need MAIL command"]


# MAIL: ENVID


@pytest.mark.parametrize("given", ["QQ314159", "a+2Bb+3Dc", "x" * 100, "!#$%&'*,-./:<>~"])
def test_envid_accepted_and_stored_as_received(given):
    hs = Harness()
    envelope = queued(hs, f" ENVID={given}")
    assert envelope.envid == given
    assert "ENVID" not in envelope.mailParams


@pytest.mark.parametrize("params", [
    " ENVID",  # no value
    " ENVID=",  # empty
    " ENVID=a+2bb",  # hexchar digits must be upper case
    " ENVID=a+2",  # incomplete hexchar
    " ENVID=a=b",  # "=" must be encoded
    " ENVID=a+0D+0Ab",  # CR LF once decoded: not printable
    " ENVID=caf\u00e9",  # not ASCII
])
def test_bad_envid_is_501(params):
    hs = Harness()
    assert mail(hs, params) == [BAD_VALUE.format("ENVID")]


def test_envid_over_100_characters_is_501():
    hs = Harness()
    assert mail(hs, " ENVID=" + "x" * 101) == ["501 5.5.4 Parameter value too long: ENVID"]
    # Counted as sent: 34 hexchars are 102 characters, though they decode to 34.
    hs = Harness()
    assert mail(hs, " ENVID=" + "+41" * 34) == ["501 5.5.4 Parameter value too long: ENVID"]


# RCPT: NOTIFY


@pytest.mark.parametrize("given, stored", [
    ("NEVER", ("NEVER",)),
    ("never", ("NEVER",)),
    ("SUCCESS", ("SUCCESS",)),
    ("FAILURE", ("FAILURE",)),
    ("DELAY", ("DELAY",)),
    ("SUCCESS,FAILURE", ("SUCCESS", "FAILURE")),
    ("delay,Success", ("DELAY", "SUCCESS")),
    ("SUCCESS,FAILURE,DELAY", ("SUCCESS", "FAILURE", "DELAY")),
])
def test_notify_accepted_and_stored(given, stored):
    hs = Harness()
    envelope = queued(hs, rcpts=[("bob@example.org", f" NOTIFY={given}"), ("carol@example.org", "")])
    assert [r.notify for r in envelope.recipients] == [stored, None]
    assert envelope.recipients[0].params == {}


@pytest.mark.parametrize("value", [
    None, "", "NEVER,SUCCESS", "FAILURE,NEVER", "SUCCESS,SUCCESS", "SOMETIMES", "SUCCESS,",
    ",DELAY", "SUCCESS;FAILURE", "NEVER,NEVER",
])
def test_bad_notify_is_501(logged, value):
    hs = Harness()
    params = " NOTIFY" if value is None else f" NOTIFY={value}"
    assert rcpt(hs, params) == [BAD_VALUE.format("NOTIFY")]
    assert ("NOQUEUE: reject: RCPT from unknown[127.0.0.1]: 501 5.5.4 Bad parameter value: NOTIFY; "
            "from=<alice@example.com> to=<bob@example.org> proto=ESMTP helo=<client.test>") in logged()
    # The transaction goes on without the refused recipient.
    assert hs.send(b"DATA\r\n") == ["503 5.5.1 Error: need RCPT command"]


# RCPT: ORCPT


@pytest.mark.parametrize("given", [
    "rfc822;bob@example.org",
    "RFC822;Bob+2Bfilter@Example.ORG",
    "rfc822;" + "b" * 480 + "@example.org",  # 499 characters in all
    "x400;/G+3DBob/S+3DSmith/",  # another address type: not checked against its syntax
    "utf-8;bob@example.org",  # utf-8-addr-xtext (RFC 6533) in ASCII is xtext too
])
def test_orcpt_accepted_and_stored_as_received(given):
    hs = Harness()
    envelope = queued(hs, rcpts=[("bob@example.org", f" ORCPT={given}")])
    assert envelope.recipients[0].orcpt == given


@pytest.mark.parametrize("value", [
    None,
    "",
    "bob@example.org",  # no address type
    ";bob@example.org",  # empty address type
    "rfc822;",  # empty address
    "rfc 822;bob@example.org",  # (split at the space: "rfc" has no ";")
    "rfc822;bob=x@example.org",  # "=" must be encoded
    "rfc822;bob+0D+0AX-Injected:+20yes@example.org",  # CR LF once decoded
    "rfc822;b\u00f6b@example.org",  # not ASCII, and no SMTPUTF8
    "utf-8;b\u00f6b@example.org",  # utf-8-addr-unitext needs SMTPUTF8
])
def test_bad_orcpt_is_501(value):
    hs = Harness()
    params = " ORCPT" if value is None else f" ORCPT={value}"
    assert rcpt(hs, params)[0] in (BAD_VALUE.format("ORCPT"), "501 5.5.4 Syntax: RCPT TO:<address>")


def test_orcpt_over_500_characters_is_501():
    hs = Harness()
    value = "rfc822;" + "b" * 481 + "@example.org"  # 500: the most
    assert rcpt(hs, f" ORCPT={value}") == ["250 2.1.5 Ok"]
    hs = Harness()
    assert rcpt(hs, f" ORCPT={value}x") == ["501 5.5.4 Parameter value too long: ORCPT"]


def test_notify_and_orcpt_together_with_ret_and_envid():
    hs = Harness()
    envelope = queued(hs, " RET=HDRS ENVID=QQ314159 BODY=8BITMIME", rcpts=[
        ("bob@example.org", " NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;bob@example.org"),
        ("carol@example.org", " ORCPT=rfc822;carol@example.org NOTIFY=NEVER"),
    ])
    assert (envelope.ret, envelope.envid) == ("HDRS", "QQ314159")
    assert envelope.mailParams == {"BODY": "8BITMIME"}
    assert [(r.address, r.notify, r.orcpt) for r in envelope.recipients] == [
        ("bob@example.org", ("SUCCESS", "FAILURE"), "rfc822;bob@example.org"),
        ("carol@example.org", ("NEVER",), "rfc822;carol@example.org"),
    ]


# Duplicate and unknown parameters


@pytest.mark.parametrize("command, name", [
    ("MAIL FROM:<alice@example.com> RET=FULL RET=HDRS", "RET"),
    ("MAIL FROM:<alice@example.com> ENVID=a envid=b", "ENVID"),
    ("MAIL FROM:<alice@example.com> SIZE=10 SIZE=10", "SIZE"),
    ("MAIL FROM:<alice@example.com> BODY=7BIT BODY=8BITMIME", "BODY"),
])
def test_duplicate_mail_parameter_is_501(command, name):
    """RFC 3461 section 4: a parameter at most once; a second one is a syntax error (as Postfix)."""
    hs = Harness()
    hs.send(b"EHLO client.test\r\n")
    assert hs.send(command.encode() + b"\r\n") == [f"501 5.5.4 Duplicate parameter: {name}"]


@pytest.mark.parametrize("params, name", [
    (" NOTIFY=SUCCESS NOTIFY=FAILURE", "NOTIFY"),
    (" NOTIFY=NEVER notify=NEVER", "NOTIFY"),
    (" ORCPT=rfc822;a@b.example ORCPT=rfc822;a@b.example", "ORCPT"),
])
def test_duplicate_rcpt_parameter_is_501(params, name):
    hs = Harness()
    assert rcpt(hs, params) == [f"501 5.5.4 Duplicate parameter: {name}"]


@pytest.mark.parametrize("command, name", [
    ("MAIL FROM:<alice@example.com> NOTIFY=NEVER", "NOTIFY"),  # a RCPT parameter at MAIL
    ("MAIL FROM:<alice@example.com> MT-PRIORITY=3", "MT-PRIORITY"),
])
def test_unknown_mail_parameter_is_555(command, name):
    """RFC 5321 section 4.1.1.11: 555, parameters not recognized."""
    hs = Harness()
    hs.send(b"EHLO client.test\r\n")
    assert hs.send(command.encode() + b"\r\n") == [f"555 5.5.4 Unsupported option: {name}"]


@pytest.mark.parametrize("params, name", [
    (" RET=FULL", "RET"),  # a MAIL parameter at RCPT
    (" ENVID=x", "ENVID"),
    (" XFOO", "XFOO"),
    (" NOTIFY=NEVER XFOO=1", "XFOO"),
])
def test_unknown_rcpt_parameter_is_555(params, name):
    hs = Harness()
    assert rcpt(hs, params) == [f"555 5.5.4 Unsupported option: {name}"]


def test_dsn_parameters_lengthen_mail_and_rcpt_lines_but_not_addresses():
    """RFC 3461 section 4: MAIL lines may be 100 octets longer, RCPT lines 500; addresses may not."""
    local = "a" * 380
    hs = Harness()
    hs.send(b"EHLO client.test\r\n")
    mailLine = f"MAIL FROM:<{local}@example.com> RET=HDRS ENVID={'e' * 100}\r\n".encode()
    assert 512 < len(mailLine) <= 612
    assert hs.send(mailLine) == ["250 2.1.0 Ok"]
    rcptLine = f"RCPT TO:<{local}@example.org> NOTIFY=SUCCESS,FAILURE,DELAY ORCPT=rfc822;{'o' * 460}@example.org\r\n".encode()
    assert 512 + 400 < len(rcptLine) <= 1012
    assert hs.send(rcptLine) == ["250 2.1.5 Ok"]
    assert hs.send(b"RCPT TO:<b@example.org> ORCPT=rfc822;" + b"o" * 1000 + b"\r\n") == [
        "500 5.5.2 Error: line too long"]
    assert hs.send(b"MAIL FROM:<a@example.com> ENVID=" + b"e" * 600 + b"\r\n") == [
        "500 5.5.2 Error: line too long"]
    # An address gets no more room than in a plain 512-octet line.
    hs = Harness()
    hs.send(b"EHLO client.test\r\nMAIL FROM:<a@example.com>\r\n")
    longest = b"b" * (512 - len(b"RCPT TO:<@example.org>\r\n"))
    assert hs.send(b"RCPT TO:<" + longest + b"@example.org>\r\n") == ["250 2.1.5 Ok"]
    assert hs.send(b"RCPT TO:<" + longest + b"b@example.org> NOTIFY=NEVER\r\n") == [
        "500 5.5.2 Error: line too long"]
