"""
Delivery status notification requests (RFC 3461): the ESMTP ``DSN``
parameters a client gives at MAIL (``RET``, ``ENVID``) and RCPT
(``NOTIFY``, ``ORCPT``), and what they ask of relayd.

Pure functions. The server validates the parameters with the ``parse``
functions (each returns None for a value it refuses); the envelope keeps
``NOTIFY`` as its words and ``ENVID``/``ORCPT`` exactly as received (xtext),
so they are passed on unchanged to a next hop that speaks DSN
(``mailParameters``, ``rcptParameters``); the scheduler asks ``wants`` which
notices a recipient asked for; relayd.bounce writes the decoded values into
its reports.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

NEVER = "NEVER"
SUCCESS = "SUCCESS"
FAILURE = "FAILURE"
DELAY = "DELAY"
NOTIFY_WORDS = (SUCCESS, FAILURE, DELAY)

RET_FULL = "FULL"
RET_HDRS = "HDRS"

# RFC 3461 section 4.4: ENVID is at most 100 characters; section 4.2 caps
# ORCPT at 500. Both are counted as sent (xtext, before decoding).
ENVID_LIMIT = 100
ORCPT_LIMIT = 500

# The parameters only a next hop that advertises DSN may be given.
MAIL_PARAMETERS = ("RET", "ENVID")
RCPT_PARAMETERS = ("NOTIFY", "ORCPT")

# xtext (RFC 3461 section 4): printable ASCII except "+" and "=", which
# (like any other character) travel as "+" and two upper-case hex digits.
_XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})+")
_HEXCHAR = re.compile(r"\+([0-9A-F]{2})")
# An ORCPT address type is an atom (RFC 3461 section 4.2).
_ADDRESS_TYPE = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+")
# utf-8-addr-unitext (RFC 6533 section 3): like xtext, plus any non-ASCII
# character and \x{HEX} escapes (which are printable ASCII already).
_UTF8_UNITEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2}|[^\x00-\x7f])+")


def isXtext(value: str) -> bool:
    return _XTEXT.fullmatch(value) is not None


def decodeXtext(value: str) -> str:
    return _HEXCHAR.sub(lambda m: chr(int(m.group(1), 16)), value)


def _printable(text: str) -> bool:
    # RFC 3461 sections 4.2 and 4.4: the decoded value is printable
    # US-ASCII (graphic characters and space), so no CR or LF ever reaches
    # a report's header fields.
    return all(" " <= c <= "~" for c in text)


def parseNotify(value: str | None) -> tuple[str, ...] | None:
    """
    ``NEVER``, or one or more of SUCCESS, FAILURE, DELAY (any case, each
    once), as upper-case words in the order given; None when invalid.
    """
    if not value:
        return None
    words = tuple(word.upper() for word in value.split(","))
    if words == (NEVER,):
        return words
    if len(set(words)) != len(words) or not all(word in NOTIFY_WORDS for word in words):
        return None
    return words


def parseRet(value: str | None) -> str | None:
    """``FULL`` or ``HDRS`` (any case), upper-cased; None when invalid."""
    if value is None or value.upper() not in (RET_FULL, RET_HDRS):
        return None
    return value.upper()


def parseEnvid(value: str | None) -> str | None:
    """The ENVID as received when it is xtext of printable ASCII, else None."""
    if value is None or not _XTEXT.fullmatch(value) or not _printable(decodeXtext(value)):
        return None
    return value


def parseOrcpt(value: str | None, smtputf8: bool = False) -> str | None:
    """
    ``addr-type;`` + xtext whose decoded text is printable ASCII, as
    received (RFC 3461 section 4.2 does not constrain the address to its
    type's syntax); with ``smtputf8`` (RFC 6533) ``utf-8;`` may also carry
    non-ASCII characters (utf-8-addr-unitext). None when invalid.
    """
    if value is None:
        return None
    addressType, sep, address = value.partition(";")
    if not sep or not _ADDRESS_TYPE.fullmatch(addressType) or not address:
        return None
    if _XTEXT.fullmatch(address) and _printable(decodeXtext(address)):
        return value
    if smtputf8 and addressType.lower() == "utf-8" and _UTF8_UNITEXT.fullmatch(address):
        return value
    return None


def originalRecipient(orcpt: str) -> str:
    """
    The Original-Recipient field's value (RFC 3464 section 2.3.1): the
    address type and the decoded address; a ``utf-8`` address stays in
    utf-8-addr-xtext (RFC 6533), non-ASCII characters as ``\\x{HEX}``.
    """
    addressType, _, address = orcpt.partition(";")
    if addressType.lower() == "utf-8":
        return asciiOrcpt(orcpt)
    return f"{addressType.lower()};{decodeXtext(address)}"


def asciiOrcpt(orcpt: str) -> str:
    """
    ``orcpt`` with every non-ASCII character as ``\\x{HEX}``: RFC 6533's
    utf-8-addr-xtext, the form for a next hop or a report without SMTPUTF8.
    """
    addressType, _, address = orcpt.partition(";")
    text = "".join(c if c.isascii() else f"\\x{{{ord(c):X}}}" for c in address)
    return f"{addressType.lower()};{text}"


def originalEnvelopeId(envid: str) -> str:
    return decodeXtext(envid)


# What a recipient asked to be told about. Without NOTIFY, relayd acts as
# for FAILURE,DELAY (RFC 3461 section 4.1 leaves the default to the MTA;
# this is Postfix's and relayd's behaviour before DSN).
def wantsFailure(notify: Sequence[str] | None) -> bool:
    return notify is None or FAILURE in notify


def wantsDelay(notify: Sequence[str] | None) -> bool:
    return notify is None or DELAY in notify


def wantsSuccess(notify: Sequence[str] | None) -> bool:
    return notify is not None and SUCCESS in notify


def mailParameters(ret: str | None, envid: str | None) -> dict[str, str]:
    """The MAIL parameters for a next hop that speaks DSN, as received."""
    params = {}
    if ret is not None:
        params["RET"] = ret
    if envid is not None:
        params["ENVID"] = envid
    return params


def rcptParameters(notify: Sequence[str] | None, orcpt: str | None) -> dict[str, str]:
    """The RCPT parameters for a next hop that speaks DSN, as received."""
    params = {}
    if notify is not None:
        params["NOTIFY"] = ",".join(notify)
    if orcpt is not None:
        params["ORCPT"] = orcpt
    return params
