"""
The delivery boundary: what the scheduler hands a transport and what it
gets back.

The scheduler groups a message's pending recipients by ``Destination``
(relayd.route), limits concurrency per destination, and calls a
``Transport`` once per group. A transport never fails for a network or
protocol outcome: whatever happened becomes one ``RecipientResult`` per
recipient, with a ``Status`` (relayd.envelope) that the scheduler writes
into the envelope as it is. relayd.courier (SMTP to smarthosts and MX
hosts) is the transport today; another one (LMTP, a pipe to a program) is
a new module with the same ``deliver``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import BinaryIO, Callable, Mapping, Protocol, Sequence

from twisted.internet import defer
from twisted.python.failure import Failure

from relayd.config import NextHop
from relayd.envelope import Status


@dataclass(frozen=True)
class Destination:
    """
    Where a group of recipients goes: the next hops in the order to try
    them. Two recipients with equal destinations share one attempt (one
    connection); the scheduler counts concurrency per destination.
    """

    hops: tuple[NextHop, ...]

    @property
    def name(self) -> str:
        """
        The destination as metrics label it: ``mx`` for MX delivery (one
        value whatever the recipient's domain, which a sender chooses), else
        the configured host of its first next hop.
        """
        return "mx" if not self.hops or self.hops[0].mx else self.hops[0].host


def classify(code: int) -> Status:
    """
    The status an SMTP reply code means for a recipient: 2xx sent, 5xx
    bounced, anything else (4xx, and codes that are no final answer at all)
    deferred, so that nothing unexpected ever bounces or counts as delivered.
    """
    if 200 <= code < 300:
        return Status.SENT
    if 500 <= code < 600:
        return Status.BOUNCED
    return Status.DEFERRED


@dataclass(frozen=True)
class RecipientResult:
    """
    What happened to one recipient. ``code`` is the remote reply code; 0
    when no reply applies (connection failure, timeout, lost connection:
    always deferred); 552 / 553 for the courier's own refusals (message
    over the peer's SIZE limit, an address unsafe to write). ``status`` is
    authoritative: it equals ``classify(code)`` except that a refusing
    greeting or EHLO (even 5xx) is deferred, as Postfix does.
    """

    address: str
    code: int
    dsn: str
    text: str
    status: Status
    # Sent to a next hop that advertises DSN: it was given the recipient's
    # NOTIFY and ORCPT and does any further notifying (RFC 3461 section 5.2).
    notifyPassedOn: bool = False


@dataclass(frozen=True)
class TLSInfo:
    """What a TLS handshake gave: for the log line (Postfix's wording)."""

    protocol: str
    cipher: str
    bits: int
    # "Verified" (chain and name), "Trusted" (chain only), "Untrusted".
    trust: str


@dataclass(frozen=True)
class AttemptResult:
    """
    One ``deliver`` call's outcome. ``tlsSessions`` are the TLS
    connections the attempt opened, ``(relay, TLSInfo)`` in order, and
    ``localErrors`` the bugs met on the way (the hop or the attempt is then
    deferred, never bounced): the scheduler logs both.
    """

    relay: str
    results: tuple[RecipientResult, ...]
    connectSeconds: float
    transmitSeconds: float
    tlsSessions: tuple[tuple[str, TLSInfo], ...] = ()
    localErrors: tuple[Failure, ...] = ()


class Transport(Protocol):
    """
    What the scheduler calls to deliver; fires with an ``AttemptResult``,
    never fails. ``mailParams`` and ``recipientParams`` (by address) hold
    the DSN parameters too (relayd.dsn): a transport passes them on only
    to a next hop that takes them. ``smtputf8``: the message needs SMTPUTF8
    (the envelope's flag), so a next hop without it must not get it.
    """

    def deliver(
        self,
        destination: Destination,
        sender: str,
        mailParams: dict[str, str | None],
        recipients: Sequence[str],
        openBody: Callable[[], BinaryIO],
        size: int,
        recipientParams: Mapping[str, Mapping[str, str]] | None = None,
        smtputf8: bool = False,
    ) -> defer.Deferred[AttemptResult]: ...
