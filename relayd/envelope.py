"""The envelope of one queued message: who sent it, to whom, and how delivery stands.

An envelope is plain data. The queue stores it as JSON beside the message
body (see relayd.queue); the server builds it, the scheduler and the courier
read and update it. Nothing here touches the disk or the network.
"""

from __future__ import annotations

import enum
import math
import os
import time
from dataclasses import dataclass, field

from relayd import dsn

# The envelope's on-disk formats, each with what it added. fromJSON reads
# every one: a field an older format lacks takes its default. Adding an
# optional field: a new version here, the field in toJSON, and in fromJSON
# read with its default (an older relayd then quarantines the newer
# envelope instead of dropping a field it does not know). A field that
# changes meaning needs a conversion of the older versions in fromJSON.
FORMAT_VERSIONS = {
    1: "the first format",
    2: "DSN (RFC 3461): ret and envid; per recipient notify and orcpt",
    3: "DKIM: the DKIM-Signature fields stored before the first delivery attempt",
    4: "SMTPUTF8 (RFC 6531): smtputf8, the message needs it (written when true)",
}
FORMAT_VERSION = max(FORMAT_VERSIONS)


class Status(enum.StrEnum):
    """
    Where one recipient stands, in the words of Postfix's ``status=``: the
    courier's result for it, the envelope's state, the log's and the
    history's word, the bounce code's input.
    """

    SENT = "sent"  # accepted by the next hop
    DEFERRED = "deferred"  # not delivered yet; may carry the last temporary error
    BOUNCED = "bounced"  # permanently refused (5xx), or expired: bounce material


# How the spool (and relayctl's JSON) spells each status: the words of the
# first format, kept so that spools written by any relayd still load.
STORED_STATES = {Status.DEFERRED: "pending", Status.SENT: "sent", Status.BOUNCED: "failed"}
_STATUS_OF_STORED = {stored: status for status, stored in STORED_STATES.items()}

# Messages relayd writes itself (relayd.bounce). A failed NOTICE_BOUNCE or
# NOTICE_DELAY goes to the postmaster as a double bounce; a failed double
# bounce or quarantine report is dropped, so notices never loop.
NOTICE_BOUNCE = "bounce"
NOTICE_DELAY = "delay"
NOTICE_DOUBLE_BOUNCE = "2bounce"
NOTICE_QUARANTINE = "quarantine"
# A "relayed" delivery status notification (NOTIFY=SUCCESS and a next hop
# without DSN); from format 2.
NOTICE_RELAYED = "relayed"
NOTICE_KINDS = (NOTICE_BOUNCE, NOTICE_DELAY, NOTICE_DOUBLE_BOUNCE, NOTICE_QUARANTINE,
                NOTICE_RELAYED)

# Delivery results kept per message for relayctl show.
HISTORY_LIMIT = 50

# Stored times are Unix seconds from 1970 up to the end of the year 9999:
# what the scheduler can compare and relayctl can print as a date.
MAX_TIME = 253402300800.0

# Crockford's base32 alphabet: no I, L, O, U; ids stay readable when read aloud.
_ID_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def newQueueId(now: float | None = None) -> str:
    """
    A queue id unique across restarts and instances: 10 characters of
    microsecond time (sortable by arrival) and 6 random ones (30 bits), so
    two relays sharing nothing still do not collide in practice. The queue
    also refuses to overwrite an existing id (O_EXCL).
    """
    micros = int((time.time() if now is None else now) * 1_000_000)
    rnd = int.from_bytes(os.urandom(4), "big") & ((1 << 30) - 1)
    value = (micros << 30) | rnd
    chars = []
    for _ in range(16):
        chars.append(_ID_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def isQueueId(text: str) -> bool:
    return len(text) == 16 and all(c in _ID_ALPHABET for c in text)


@dataclass
class Recipient:
    """One RCPT TO of the transaction and its delivery state."""

    address: str
    params: dict[str, str | None] = field(default_factory=dict)
    state: Status = Status.DEFERRED
    # The last result for this recipient: enhanced status code and the
    # remote (or local) reply text, as logged after status=.
    dsn: str | None = None
    reply: str | None = None
    # When the last attempt for this recipient ended (Unix time).
    lastAttempt: float | None = None
    # The next hop that gave the last result ("host[ip]:port"), for the
    # Remote-MTA field of a delivery status notification.
    relay: str | None = None
    # RCPT's DSN parameters (relayd.dsn): the NOTIFY words (None: not
    # given) and ORCPT exactly as received (addr-type;xtext).
    notify: tuple[str, ...] | None = None
    orcpt: str | None = None

    def toJSON(self) -> dict:
        return {
            "address": self.address,
            "params": self.params,
            "state": STORED_STATES[self.state],
            "dsn": self.dsn,
            "reply": self.reply,
            "last_attempt": self.lastAttempt,
            "relay": self.relay,
            **_present(notify=list(self.notify) if self.notify is not None else None,
                       orcpt=self.orcpt),
        }

    @classmethod
    def fromJSON(cls, data: dict) -> "Recipient":
        if not isinstance(data, dict):
            raise ValueError("a recipient is not a JSON object")
        stored = data["state"]
        state = _STATUS_OF_STORED.get(stored) if isinstance(stored, str) else None
        if state is None:
            raise ValueError(f"unknown recipient state {_shown(stored)}")
        return cls(
            address=_str(data, "address"),
            params=_params(data.get("params", {})),
            state=state,
            dsn=_optionalStr(data, "dsn"),
            reply=_optionalStr(data, "reply"),
            lastAttempt=_time(data, "last_attempt", optional=True),
            relay=_optionalStr(data, "relay"),
            notify=_notify(data.get("notify")),
            orcpt=_optionalStr(data, "orcpt"),
        )


@dataclass
class Envelope:
    """
    Everything the queue keeps about one message except its body.

    ``sender`` is the MAIL FROM address without angle brackets; the null
    sender ``<>`` is the empty string.
    """

    queueId: str
    sender: str
    recipients: list[Recipient]
    arrival: float
    size: int = 0
    mailParams: dict[str, str | None] = field(default_factory=dict)
    clientAddress: str = ""
    clientName: str = "unknown"
    helo: str = ""
    authIdentity: str | None = None
    attempts: int = 0
    nextAttempt: float = 0.0
    lastError: str | None = None
    hold: bool = False
    # The "delayed" notice (queue.delay_warning) has been sent.
    warned: bool = False
    # What relayd generated this message as (NOTICE_KINDS), None for mail a
    # client submitted; decides whether its own failure may cause a notice.
    notice: str | None = None
    # The latest delivery results, oldest first, at most HISTORY_LIMIT:
    # {"time", "recipient", "relay", "dsn", "status", "reply"} (relayctl show).
    history: list[dict] = field(default_factory=list)
    # MAIL's DSN parameters (relayd.dsn): RET (FULL or HDRS) and ENVID as
    # received (xtext); None when not given.
    ret: str | None = None
    envid: str | None = None
    # The DKIM-Signature fields (CRLF lines) sent before the message, set
    # once before its first delivery attempt (relayd.dkim): "" means
    # unsigned, None not decided yet.
    dkim: str | None = None
    # The message needs SMTPUTF8 (RFC 6531): UTF-8 in a local part or in its
    # header, so it goes only to a next hop that offers it.
    smtputf8: bool = False

    def recordHistory(self, entry: dict) -> None:
        self.history.append(entry)
        del self.history[:-HISTORY_LIMIT]

    def pending(self) -> list[Recipient]:
        return [r for r in self.recipients if r.state is Status.DEFERRED]

    def isFinished(self) -> bool:
        """No recipient is left to try: the message can leave the queue."""
        return not self.pending()

    def toJSON(self) -> dict:
        return {
            "version": FORMAT_VERSION,
            "queue_id": self.queueId,
            "sender": self.sender,
            "mail_params": self.mailParams,
            "recipients": [r.toJSON() for r in self.recipients],
            "arrival": self.arrival,
            "size": self.size,
            "client_address": self.clientAddress,
            "client_name": self.clientName,
            "helo": self.helo,
            "auth_identity": self.authIdentity,
            "attempts": self.attempts,
            "next_attempt": self.nextAttempt,
            "last_error": self.lastError,
            "hold": self.hold,
            "warned": self.warned,
            "notice": self.notice,
            "history": self.history,
            **_present(ret=self.ret, envid=self.envid, dkim=self.dkim,
                       smtputf8=self.smtputf8 or None),
        }

    @classmethod
    def fromJSON(cls, data: dict) -> "Envelope":
        """
        Parse a stored envelope; raises ValueError (or KeyError) naming the
        first field that is missing, of the wrong type, or not a finite
        number in range: such an envelope is quarantined, never guessed at.
        """
        if not isinstance(data, dict):
            raise ValueError("envelope is not a JSON object")
        version = data.get("version")
        if isinstance(version, bool) or not isinstance(version, int) or version not in FORMAT_VERSIONS:
            raise ValueError(f"unsupported envelope version {_shown(version)}")
        if not isinstance(data["recipients"], list):
            raise ValueError("recipients is not a list")
        recipients = [Recipient.fromJSON(r) for r in data["recipients"]]
        if not recipients:
            raise ValueError("envelope has no recipients")
        queueId = _str(data, "queue_id")
        if not isQueueId(queueId):
            raise ValueError(f"bad queue id {_shown(queueId)}")
        return cls(
            queueId=queueId,
            sender=_str(data, "sender"),
            mailParams=_params(data.get("mail_params", {})),
            recipients=recipients,
            arrival=_time(data, "arrival"),
            size=_count(data, "size"),
            clientAddress=_str(data, "client_address", ""),
            clientName=_str(data, "client_name", "unknown"),
            helo=_str(data, "helo", ""),
            authIdentity=_optionalStr(data, "auth_identity"),
            attempts=_count(data, "attempts"),
            nextAttempt=_time(data, "next_attempt", default=0.0),
            lastError=_optionalStr(data, "last_error"),
            hold=_flag(data, "hold"),
            warned=_flag(data, "warned"),
            notice=_notice(data.get("notice")),
            history=_history(data.get("history", [])),
            ret=_ret(data.get("ret")),
            envid=_optionalStr(data, "envid"),
            dkim=_dkim(data.get("dkim")),
            smtputf8=_flag(data, "smtputf8"),
        )


def _dkim(value) -> str | None:
    if value is not None and not (isinstance(value, str) and value.isascii()):
        raise ValueError(f"dkim is {_shown(value)}, expected ASCII header fields or null")
    return value


def _ret(value) -> str | None:
    if value is not None and value not in (dsn.RET_FULL, dsn.RET_HDRS):
        raise ValueError(f"ret is {_shown(value)}, expected FULL, HDRS or null")
    return value


def _notify(value) -> tuple[str, ...] | None:
    if value is None:
        return None
    if (not isinstance(value, list) or not value
            or not all(isinstance(w, str) and (w == dsn.NEVER or w in dsn.NOTIFY_WORDS) for w in value)):
        raise ValueError(f"notify is {_shown(value)}, expected a list of NEVER, SUCCESS, FAILURE, DELAY")
    return tuple(value)


def _present(**fields) -> dict:
    # Optional fields are written only when set: most envelopes carry none,
    # and each one is rewritten after every attempt.
    return {key: value for key, value in fields.items() if value is not None}


def _notice(value) -> str | None:
    if value is not None and value not in NOTICE_KINDS:
        raise ValueError(f"unknown notice kind {_shown(value)}")
    return value


_HISTORY_TEXT = ("recipient", "relay", "dsn", "status", "reply")


def _history(value) -> list[dict]:
    if not isinstance(value, list) or not all(isinstance(e, dict) for e in value):
        raise ValueError("history is not a list of mappings")
    for entry in value:
        _time(entry, "time", optional=True, name="history time")
        for key in _HISTORY_TEXT:
            _optionalStr(entry, key, name=f"history {key}")
    return list(value[-HISTORY_LIMIT:])


_MISSING = object()


def _shown(value: object) -> str:
    """A found value as a quarantine reason quotes it: short, one line."""
    text = repr(value)
    return text if len(text) <= 40 else text[:40] + "..."


def _str(data: dict, key: str, default: object = _MISSING) -> str:
    value = data[key] if default is _MISSING else data.get(key, default)
    if not isinstance(value, str):
        raise ValueError(f"{key} is not a string")
    return value


def _optionalStr(data: dict, key: str, name: str | None = None) -> str | None:
    value = data.get(key)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{name or key} is {_shown(value)}, expected a string or null")
    return value


def _time(data: dict, key: str, default: object = _MISSING, optional: bool = False,
          name: str | None = None) -> float | None:
    """A Unix time: a JSON number (never NaN or Infinity) from 0 to MAX_TIME."""
    if optional:
        value = data.get(key)
        if value is None:
            return None
    else:
        value = data[key] if default is _MISSING else data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name or key} is {_shown(value)}, expected a time in seconds")
    if not (math.isfinite(value) and 0 <= value < MAX_TIME):
        raise ValueError(f"{name or key} is {_shown(value)}, expected a time from 1970 to 9999")
    return float(value)


def _count(data: dict, key: str) -> int:
    """A whole number from 0 (a JSON 2.0 or "2" is refused, not rounded)."""
    value = data.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{key} is {_shown(value)}, expected a whole number from 0")
    return value


def _flag(data: dict, key: str) -> bool:
    value = data.get(key, False)
    if not isinstance(value, bool):
        # "false" is a non-empty string: bool() would read it as true.
        raise ValueError(f"{key} is {_shown(value)}, expected true or false")
    return value


def _params(value) -> dict[str, str | None]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and (v is None or isinstance(v, str)) for k, v in value.items()
    ):
        raise ValueError("parameters are not a string mapping")
    return dict(value)
