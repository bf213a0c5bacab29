"""relayd.dsn's pure functions as tables: the parameter grammars and what a NOTIFY asks for."""

from __future__ import annotations

import pytest

from relayd import dsn


@pytest.mark.parametrize("value, parsed", [
    ("NEVER", ("NEVER",)),
    ("success,Failure", ("SUCCESS", "FAILURE")),
    ("DELAY,SUCCESS,FAILURE", ("DELAY", "SUCCESS", "FAILURE")),
    (None, None),
    ("", None),
    ("NEVER,DELAY", None),
    ("DELAY,DELAY", None),
    ("FAILURE,", None),
    ("FAILURE ", None),
    ("ALWAYS", None),
])
def test_parseNotify(value, parsed):
    assert dsn.parseNotify(value) == parsed


@pytest.mark.parametrize("value, parsed", [
    ("FULL", "FULL"), ("hdrs", "HDRS"), (None, None), ("", None), ("HEADERS", None),
])
def test_parseRet(value, parsed):
    assert dsn.parseRet(value) == parsed


@pytest.mark.parametrize("value, ok", [
    ("abc", True), ("a+2Bb", True), ("+20", True), ("a+2bb", False), ("a=b", False),
    ("a b", False), ("", False), (None, False), ("a+0Ab", False), ("a+7Fb", False),
    ("\u00e9", False),
])
def test_parseEnvid(value, ok):
    assert dsn.parseEnvid(value) == (value if ok else None)


@pytest.mark.parametrize("value, smtputf8, ok", [
    ("rfc822;bob@example.org", False, True),
    ("RFC822;bob+2B1@example.org", False, True),
    ("x-local;12345", False, True),
    ("utf-8;bob@example.org", False, True),
    ("utf-8;b\\x{F6}b@example.org", False, True),
    ("utf-8;b\u00f6b@example.org", False, False),
    ("utf-8;b\u00f6b@example.org", True, True),
    ("rfc822;b\u00f6b@example.org", True, False),  # only utf-8 addresses may be UTF-8
    ("utf-8;b\u00f6b=x@example.org", True, False),
    ("rfc822;bob+0D+0A@example.org", False, False),
    ("rfc822;", False, False),
    ("rfc822", False, False),
    (";bob@example.org", False, False),
    ("rfc(822);bob@example.org", False, False),
    (None, False, False),
])
def test_parseOrcpt(value, smtputf8, ok):
    assert dsn.parseOrcpt(value, smtputf8=smtputf8) == (value if ok else None)


@pytest.mark.parametrize("orcpt, field", [
    ("rfc822;bob+2B1@example.org", "rfc822;bob+1@example.org"),
    ("RFC822;Bob@Example.org", "rfc822;Bob@Example.org"),
    ("utf-8;b\u00f6b@example.org", "utf-8;b\\x{F6}b@example.org"),
    ("UTF-8;b\\x{F6}b@example.org", "utf-8;b\\x{F6}b@example.org"),
])
def test_originalRecipient(orcpt, field):
    assert dsn.originalRecipient(orcpt) == field


@pytest.mark.parametrize("notify, failure, delay, success", [
    (None, True, True, False),  # relayd's behaviour without DSN
    (("NEVER",), False, False, False),
    (("SUCCESS",), False, False, True),
    (("FAILURE",), True, False, False),
    (("DELAY",), False, True, False),
    (("SUCCESS", "DELAY"), False, True, True),
    (("FAILURE", "DELAY"), True, True, False),
    (("SUCCESS", "FAILURE", "DELAY"), True, True, True),
])
def test_what_a_notify_asks_for(notify, failure, delay, success):
    assert (dsn.wantsFailure(notify), dsn.wantsDelay(notify), dsn.wantsSuccess(notify)) == (
        failure, delay, success)


def test_wire_parameters_are_what_was_received():
    assert dsn.mailParameters("HDRS", "QQ+2B314") == {"RET": "HDRS", "ENVID": "QQ+2B314"}
    assert dsn.mailParameters(None, None) == {}
    assert dsn.rcptParameters(("SUCCESS", "FAILURE"), "rfc822;a+2Bb@x.org") == {
        "NOTIFY": "SUCCESS,FAILURE", "ORCPT": "rfc822;a+2Bb@x.org"}
    assert dsn.rcptParameters(None, None) == {}
