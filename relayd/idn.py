"""
International mail addresses (RFC 6531, 6532) and domain names (IDNA2008).

relayd keeps an address as the client wrote it (the queue, the log, a
bounce to it) and turns its domain into A-labels wherever a name is looked
up or compared: routes, auth.senders, MX lookups, and the MAIL FROM and
RCPT TO sent to a next hop that does not speak SMTPUTF8. A local part
cannot be converted: an address with UTF-8 in its local part goes only to a
next hop that offers SMTPUTF8.

Conversion uses the ``idna`` package (IDNA2008 with the UTS #46 mapping, so
"Bücher.Example" is "xn--bcher-kva.example"), never Python's ``idna``
codec, which implements IDNA2003 and turns "faß.de" into another domain,
"fass.de". Pure functions; nothing here touches the network.
"""

from __future__ import annotations

import unicodedata

import idna

# RFC 5321 section 4.5.3.1, counted in octets (RFC 6531 section 3.3): a
# local part of 64, a domain of 255, a path of 256 with its angle brackets.
MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_MAILBOX = 254
MAX_LABEL = 63

# Characters never accepted in an address, even with SMTPUTF8: C0 and C1
# controls, and the Unicode line and paragraph separators (a log line or a
# header field must not be broken by an address).
_REFUSED_CATEGORIES = frozenset({"Cc", "Cs", "Zl", "Zp"})


class IDNError(ValueError):
    """A domain that IDNA2008 refuses; the message says why, in the idna package's words."""


def toAscii(domain: str) -> str:
    """
    ``domain`` in A-labels, lower-case, a trailing dot kept. ASCII labels
    are only lower-cased (host names may hold what IDNA refuses, such as
    "_"), but an ``xn--`` label must be a valid A-label. Raises IDNError.
    """
    if not domain:
        raise IDNError("empty domain")
    if domain.isascii():
        labels = domain.lower().split(".")
    else:
        try:
            labels = idna.uts46_remap(domain, std3_rules=False, transitional=False).split(".")
        except idna.IDNAError as e:
            raise IDNError(str(e)) from None
    trailing = labels[-1] == "" and len(labels) > 1
    if trailing:
        labels.pop()
    out = []
    for label in labels:
        if not label:
            raise IDNError("empty label")
        try:
            if label.isascii():
                if label.startswith("xn--"):
                    idna.ulabel(label)  # raises for an invalid A-label
                out.append(label.lower())
            else:
                out.append(idna.alabel(label).decode("ascii"))
        except idna.IDNAError as e:
            raise IDNError(str(e)) from None
        if len(out[-1]) > MAX_LABEL:
            raise IDNError(f"label longer than {MAX_LABEL} octets")
    name = ".".join(out)
    if len(name) > MAX_DOMAIN:
        raise IDNError(f"domain longer than {MAX_DOMAIN} octets")
    return name + ("." if trailing else "")


def toAsciiOrSame(domain: str) -> str:
    """``toAscii``, or the domain lower-cased when it cannot be converted (matches nothing configured)."""
    try:
        return toAscii(domain)
    except IDNError:
        return domain.lower()


def hasUtf8LocalPart(address: str) -> bool:
    """UTF-8 in the local part: the address cannot be written in ASCII at all."""
    local, at, _ = address.rpartition("@")
    return not (local if at else address).isascii()


def asciiAddress(address: str) -> str | None:
    """
    The address with its domain in A-labels (as a next hop without
    SMTPUTF8 must get it), or None when it has UTF-8 in its local part or
    an invalid domain. ASCII addresses come back as they are.
    """
    if address.isascii():
        return address
    local, at, domain = address.rpartition("@")
    if not at or not local.isascii() or domain.startswith("["):
        return None
    try:
        return f"{local}@{toAscii(domain)}"
    except IDNError:
        return None


def comparable(address: str) -> str:
    """The address as auth.senders compares it: lower-cased, its domain in A-labels."""
    local, at, domain = address.rpartition("@")
    if not at:
        return address.lower()
    return f"{local.lower()}@{toAsciiOrSame(domain)}"


def hasRefusedCharacters(text: str) -> bool:
    """A control character or line separator anywhere in ``text``."""
    return any(not c.isascii() and unicodedata.category(c) in _REFUSED_CATEGORIES for c in text)


def withinLengthLimits(address: str) -> bool:
    """RFC 5321's limits, in octets of UTF-8: local part, domain, whole mailbox."""
    local, at, domain = address.rpartition("@")
    if not at:
        return len(address.encode("utf-8")) <= MAX_MAILBOX
    return (len(local.encode("utf-8")) <= MAX_LOCAL_PART
            and len(domain.encode("utf-8")) <= MAX_DOMAIN
            and len(address.encode("utf-8")) <= MAX_MAILBOX)
