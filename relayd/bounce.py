"""
Delivery status notifications (RFC 3464) and the other notices relayd writes
itself: non-delivery reports ("bounces"), "delayed" warnings, "relayed"
reports (NOTIFY=SUCCESS and a next hop without DSN), double bounces to the
postmaster and quarantine reports.

A notice is an ordinary message in the spool, sent from the null sender
``<>`` so that it can never cause another bounce to a sender (RFC 5321
§4.5.5). ``report`` builds the ``multipart/report; report-type=delivery-status``
message with Python's email package: a human-readable part, the
``message/delivery-status`` part and the original message (whole as
``message/rfc822`` up to ``queue.bounce_size_limit``, else its header as
``text/rfc822-headers``; the header only for RET=HDRS and in a "relayed"
report). ENVID and ORCPT (relayd.dsn) become Original-Envelope-Id and
Original-Recipient. About a message that needed SMTPUTF8 it is an
internationalised report (RFC 6533): ``global-delivery-status`` with
``utf-8;`` addresses, and the original as ``message/global`` or
``message/global-headers``, its UTF-8 as it was. ``writeNotice`` reads the
original and commits the notice to the spool; it blocks and belongs in a
thread.

Nothing here decides *whether* to send a notice: that is the scheduler's.
"""

from __future__ import annotations

import email.charset
import email.parser
import email.policy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from email.generator import BytesGenerator
from email.message import Message
from email.mime.message import MIMEMessage
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.utils import formatdate, make_msgid
from io import BytesIO
from typing import BinaryIO

from relayd import dsn, idn
from relayd.envelope import (
    NOTICE_BOUNCE,
    NOTICE_DELAY,
    NOTICE_DOUBLE_BOUNCE,
    NOTICE_QUARANTINE,
    NOTICE_RELAYED,
    Envelope,
    Recipient,
    Status,
    newQueueId,
)

FAILED_ACTION = "failed"
DELAYED_ACTION = "delayed"
# Delivered to a next hop that does not speak DSN: the sender who asked
# for NOTIFY=SUCCESS hears no more from down the line (RFC 3464 2.3.3).
RELAYED_ACTION = "relayed"
RELAYED_TEXT = "relayed to a next hop without DSN support"

# The status of a recipient that ran out of queue.lifetime (RFC 3463 X.4.7,
# "delivery time expired"); the class stays 4 as the last error was
# temporary, with Action: failed, as Postfix reports expiry.
EXPIRED_STATUS = "4.4.7"
ADMIN_BOUNCE_STATUS = "5.0.0"
ADMIN_BOUNCE_TEXT = "delivery cancelled by the administrator"

# UTF-8 text parts of a report as they are (8bit), not base64: a report
# that holds UTF-8 already goes only where 8-bit content does.
_UTF8_8BIT = email.charset.Charset("utf-8")
_UTF8_8BIT.body_encoding = None

# Longest header block looked for when the original is too big to return whole.
MAX_RETURNED_HEADER_BLOCK = 1024 * 1024

# Generating with compat32 and no line length keeps the original's header
# fields as they were (no refolding); CRLF is the spool's canonical form.
_OUTPUT_POLICY = email.policy.compat32.clone(linesep="\r\n", max_line_length=0)
_INPUT_POLICY = email.policy.compat32.clone(max_line_length=0)

_SUBJECTS = {
    NOTICE_BOUNCE: "Undelivered Mail Returned to Sender",
    NOTICE_DELAY: "Delayed Mail (still being retried)",
    NOTICE_DOUBLE_BOUNCE: "Postmaster Copy: Undelivered Mail",
    NOTICE_QUARANTINE: "Postmaster Warning: unreadable queue entries quarantined",
    NOTICE_RELAYED: "Successful Mail Delivery Report",
}


@dataclass(frozen=True)
class ReportLine:
    """One recipient's line of the report, snapshotted on the reactor thread."""

    address: str
    action: str  # FAILED_ACTION, DELAYED_ACTION or RELAYED_ACTION
    status: str  # enhanced status code, e.g. 5.1.1
    diagnostic: str | None  # the remote reply ("550 5.1.1 no such user") or our reason
    remoteMta: str | None  # "host[ip]:port" as logged, or None
    lastAttempt: float | None
    orcpt: str | None = None  # the client's ORCPT as received (relayd.dsn)


# The Action of a recipient in a notice (RFC 3464), by its status.
ACTIONS = {Status.BOUNCED: FAILED_ACTION, Status.DEFERRED: DELAYED_ACTION}


def statusFor(recipient: Recipient, action: str | None = None, status: str | None = None,
              diagnostic: str | None = None) -> ReportLine:
    """
    The report line for ``recipient``; its ``action`` follows from its
    status (bounced: failed, still deferred: delayed) unless given.
    """
    action = action or ACTIONS[recipient.state]
    return ReportLine(
        address=recipient.address,
        action=action,
        status=status or recipient.dsn or ("5.0.0" if action == FAILED_ACTION else "4.0.0"),
        diagnostic=diagnostic if diagnostic is not None else recipient.reply,
        remoteMta=recipient.relay,
        lastAttempt=recipient.lastAttempt,
        orcpt=recipient.orcpt,
    )


def _mtaName(relay: str | None) -> str | None:
    """The host name of a logged relay ``host[ip]:port`` (Remote-MTA wants a DNS name)."""
    if not relay or relay == "none":
        return None
    return relay.split("[", 1)[0].rsplit(":", 1)[0] or None


def _field(text: str) -> str:
    # Remote replies are untrusted: one line, printable ASCII only.
    return "".join(c if " " <= c <= "~" else " " for c in text).strip()


def _raw(text: str) -> str:
    """
    UTF-8 text as the email package writes it out unchanged, byte for byte
    (surrogate-escaped), rather than as RFC 2047 encoded words, which an
    address or a delivery-status field must never be.
    """
    return text.encode("utf-8").decode("ascii", "surrogateescape")


def _asciiAddress(address: str) -> str:
    """An address for an ASCII report: its domain in A-labels where it has U-labels."""
    return idn.asciiAddress(address) or address


# RFC 6533 section 3: what utf-8-addr-unitext takes as it is; any other
# character is written \x{HEX}.
def _unitext(address: str) -> str:
    return "".join(
        c if not c.isascii() or ("\x21" <= c <= "\x7e" and c not in "+=\\") else f"\\x{{{ord(c):X}}}"
        for c in address)


def _typedAddress(address: str, international: bool) -> str:
    """An address field's value: ``rfc822;`` in A-labels, or RFC 6533's ``utf-8;`` in a global report."""
    if international and not address.isascii():
        return _raw(f"utf-8; {_unitext(address)}")
    return f"rfc822; {_asciiAddress(address)}"


def _humanText(kind: str, hostname: str, statuses: Sequence[ReportLine],
               lifetime: float | None, international: bool = False) -> str:
    lines = [f"This is the mail system at host {hostname}.", ""]
    if kind == NOTICE_DELAY:
        lines += [
            "####################################################################",
            "# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #",
            "####################################################################",
            "",
            "Your message could not be delivered yet to the recipients below;",
            "the mail system will keep trying"
            + (f" for up to {_days(lifetime)} after it was sent." if lifetime else "."),
        ]
    elif kind == NOTICE_RELAYED:
        lines += [
            "Your message was successfully relayed to the destinations listed",
            "below, which do not send delivery notifications: you will receive",
            "no further notification from them, but you may still receive",
            "notifications of delivery errors from other systems.",
        ]
    elif kind == NOTICE_DOUBLE_BOUNCE:
        lines += [
            "A message from the null sender <> (a notice) could not be delivered",
            "and cannot be returned to anyone; this copy goes to the postmaster.",
        ]
    else:
        lines += [
            "I'm sorry to have to inform you that your message could not",
            "be delivered to one or more recipients. It's attached below.",
        ]
    lines += ["", "The mail system", ""]
    for s in statuses:
        reason = _field(s.diagnostic) if s.diagnostic else s.status
        address = s.address if international else _asciiAddress(s.address)
        lines.append(f"<{address}>: {reason}")
    return "\n".join(lines) + "\n"


def _days(seconds: float) -> str:
    days = seconds / 86400
    if days >= 1 and days == int(days):
        return f"{int(days)} day{'s' if days != 1 else ''}"
    return f"{seconds / 3600:g} hours"


def _statusPart(hostname: str, envelope: Envelope, statuses: Sequence[ReportLine],
                lifetime: float | None) -> Message:
    international = envelope.smtputf8
    part = Message(policy=_OUTPUT_POLICY)
    part.set_type("message/global-delivery-status" if international else "message/delivery-status")
    del part["MIME-Version"]
    perMessage = Message(policy=_OUTPUT_POLICY)
    if envelope.envid is not None:
        perMessage["Original-Envelope-Id"] = _field(dsn.originalEnvelopeId(envelope.envid))
    perMessage["Reporting-MTA"] = f"dns; {hostname}"
    perMessage["X-Relayd-Queue-ID"] = envelope.queueId
    perMessage["X-Relayd-Sender"] = _typedAddress(envelope.sender, international)
    perMessage["Arrival-Date"] = formatdate(envelope.arrival, localtime=True)
    blocks = [perMessage]
    for s in statuses:
        block = Message(policy=_OUTPUT_POLICY)
        if s.orcpt is not None:
            block["Original-Recipient"] = _field(dsn.originalRecipient(s.orcpt))
        block["Final-Recipient"] = _typedAddress(s.address, international)
        block["Action"] = s.action
        block["Status"] = s.status
        mta = _mtaName(s.remoteMta)
        if mta:
            block["Remote-MTA"] = f"dns; {_field(mta)}"
        if s.diagnostic:
            diagnostic = _field(s.diagnostic)
            # A reply from the next hop is an SMTP diagnostic; our own
            # reasons (expiry, connection failures) are X-Relayd ones.
            kind = "smtp" if diagnostic[:3].isdigit() else "X-Relayd"
            block["Diagnostic-Code"] = f"{kind}; {diagnostic}"
        if s.lastAttempt is not None:
            block["Last-Attempt-Date"] = formatdate(s.lastAttempt, localtime=True)
        if s.action == DELAYED_ACTION and lifetime:
            block["Will-Retry-Until"] = formatdate(envelope.arrival + lifetime, localtime=True)
        blocks.append(block)
    if not international:
        part.set_payload(blocks)
        return part
    if not (envelope.sender.isascii() and all(s.address.isascii() for s in statuses)):
        part["Content-Transfer-Encoding"] = "8bit"
    # The email package writes a message/* part other than
    # message/delivery-status as one message: here the first block is its
    # header and the recipients' blocks its body, which is the same text.
    perRecipient = b"".join(_bytes(block) for block in blocks[1:])
    perMessage.set_payload(perRecipient[:-2].decode("ascii", "surrogateescape"))
    part.set_payload([perMessage])
    return part


def _originalPart(original: bytes, whole: bool, international: bool = False) -> Message:
    if international:
        # RFC 6532 section 3.7, RFC 6533 section 6.3: the original as it
        # was, UTF-8 header fields included.
        parsed = email.parser.BytesParser(policy=_INPUT_POLICY).parsebytes(original)
        part = MIMEMessage(parsed, "global" if whole else "global-headers")
        if not original.isascii():
            part["Content-Transfer-Encoding"] = "8bit"
        del part["MIME-Version"]
        return part
    if whole:
        parsed = email.parser.BytesParser(policy=_INPUT_POLICY).parsebytes(original)
        part = MIMEMessage(parsed)
    else:
        text = original.decode("ascii", "replace").replace("\r\n", "\n")
        part = MIMEText(text, "rfc822-headers", "us-ascii")
    del part["MIME-Version"]
    return part


def _headers(message: Message, kind: str, hostname: str, to: str, now: float,
             autoSubmitted: str) -> None:
    """The header fields every notice carries, in this order."""
    message["From"] = f"MAILER-DAEMON@{hostname} (Mail Delivery System)"
    message["To"] = _raw(f"<{_asciiAddress(to)}>")
    message["Subject"] = _SUBJECTS[kind]
    message["Date"] = formatdate(now, localtime=True)
    message["Message-ID"] = make_msgid(domain=hostname)
    # RFC 3834: no auto-replies to this, please.
    message["Auto-Submitted"] = autoSubmitted


def _bytes(message: Message) -> bytes:
    out = BytesIO()
    BytesGenerator(out, mangle_from_=False, policy=_OUTPUT_POLICY).flatten(message)
    return out.getvalue()


def report(kind: str, *, hostname: str, envelope: Envelope, to: str,
           statuses: Sequence[ReportLine], original: bytes, originalWhole: bool,
           now: float, lifetime: float | None = None) -> bytes:
    """
    The notice about ``envelope`` for ``to`` as CRLF bytes, ready for the
    spool: a ``multipart/report; report-type=delivery-status`` message.
    """
    international = envelope.smtputf8
    message = MIMEMultipart(
        "report", report_type="global-delivery-status" if international else "delivery-status",
        policy=_OUTPUT_POLICY)
    _headers(message, kind, hostname, to, now, "auto-replied")
    message.preamble = "This is a MIME-encapsulated message."
    text = _humanText(kind, hostname, statuses, lifetime, international)
    human = MIMEText(text, "plain", "us-ascii" if text.isascii() else _UTF8_8BIT)
    human["Content-Description"] = "Notification"
    del human["MIME-Version"]
    message.attach(human)
    status = _statusPart(hostname, envelope, statuses, lifetime)
    status["Content-Description"] = "Delivery report"
    message.attach(status)
    originalPart = _originalPart(original, originalWhole, international)
    if kind == NOTICE_RELAYED:
        originalPart["Content-Description"] = "Relayed Message Headers"
    else:
        originalPart["Content-Description"] = "Undelivered Message" if originalWhole else "Undelivered Message Headers"
    message.attach(originalPart)
    return _bytes(message)


def quarantineReport(*, hostname: str, to: str, entries: Sequence[tuple[str, str]],
                     directory: str, now: float) -> bytes:
    """A plain note to the postmaster listing queue entries moved to quarantine at start-up."""
    lines = [f"This is the mail system at host {hostname}.", "",
             "At start-up these queue entries could not be read back and were moved",
             f"to {directory}/quarantine/, where they wait for you:", ""]
    lines += [f"  {queueId}: {_field(reason)}" for queueId, reason in entries]
    lines += ["", "Their senders have not been told. Nothing else was lost.", ""]
    message = MIMEText("\n".join(lines), "plain", "us-ascii", policy=_OUTPUT_POLICY)
    # Not a reply to any message: auto-generated (RFC 3834).
    _headers(message, NOTICE_QUARANTINE, hostname, to, now, "auto-generated")
    return _bytes(message)


def readOriginal(openBody: Callable[[], BinaryIO], limit: int,
                 headersOnly: bool = False) -> tuple[bytes, bool]:
    """
    The original as a notice returns it: ``(bytes, True)`` when it is at
    most ``limit`` bytes and not ``headersOnly``, else ``(header block,
    False)``. Blocking.
    """
    with openBody() as f:
        data = f.read(64 * 1024 if headersOnly else limit + 1)
        if not headersOnly and len(data) <= limit:
            return data, True
        while b"\r\n\r\n" not in data and len(data) < MAX_RETURNED_HEADER_BLOCK:
            more = f.read(64 * 1024)
            if not more:
                break
            data += more
    end = data.find(b"\r\n\r\n")
    return (data[: end + 2] if end >= 0 else data[:MAX_RETURNED_HEADER_BLOCK]), False


def noticeEnvelope(kind: str, to: str, hostname: str, size: int, now: float) -> Envelope:
    """
    The envelope of a new notice: from <>, to one address, due now. It
    needs SMTPUTF8 when that address has a UTF-8 local part; its own header
    fields are ASCII otherwise (the To: domain in A-labels).
    """
    return Envelope(
        queueId=newQueueId(now),
        sender="",
        recipients=[Recipient(address=to)],
        arrival=now,
        size=size,
        clientAddress="127.0.0.1",
        clientName="localhost",
        helo=hostname,
        nextAttempt=now,
        notice=kind,
        smtputf8=idn.hasUtf8LocalPart(to),
    )


def writeNotice(spool, kind: str, to: str, hostname: str, content: bytes,
                now: float | None = None) -> Envelope:
    """
    Commit a notice to the spool (fsynced, like any accepted message) and
    return its envelope. Blocking: run it in a thread. Raises OSError.
    """
    now = time.time() if now is None else now
    for _ in range(5):
        envelope = noticeEnvelope(kind, to, hostname, len(content), now)
        try:
            writer = spool.begin(envelope.queueId)
        except FileExistsError:
            continue
        try:
            writer.write(content)
        except BaseException:
            writer.abort()
            raise
        writer.commit(envelope)
        return envelope
    raise FileExistsError("no free queue id for a notice")
