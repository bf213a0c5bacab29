"""
Where a recipient's mail goes next: its ``Destination``, the ordered list
of next hops to try.

Pure functions over the delivery configuration, so the scheduler can group a
message's recipients by destination (one attempt per group) and the rules
can be tested as a table. In order:

1. ``delivery.routes[domain]`` (exact; the recipient domain lower-cased
   and in A-labels, as the config's keys are);
2. ``delivery.routes["*"]``;
3. ``delivery.smarthosts`` when there are any;
4. the domain's MX hosts (a ``NextHop`` with ``mx``; the courier resolves it).

A route entry with ``mx: true`` becomes the domain's MX hop with that
entry's TLS policy, so a domain can get MX delivery with required TLS while
the rest of the mail goes to a smarthost.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from relayd import idn
from relayd.config import DEFAULT_MX_PORT, DEFAULT_MX_TLS, Delivery, NextHop
from relayd.delivery import Destination


def mxHop(domain: str, port: int = DEFAULT_MX_PORT, tls: str = DEFAULT_MX_TLS, verify: bool = True,
          caFile: str | None = None) -> NextHop:
    """
    "The MX hosts of ``domain``": resolved by the courier at each attempt
    (DNS answers change), connected to on ``port`` with this TLS policy.
    """
    return NextHop(domain, port, tls, verify, caFile, mx=True)


def recipientDomain(address: str) -> str:
    """
    The domain part of an address, lower-cased and in A-labels (IDNA2008):
    domains are case-insensitive and looked up in DNS as A-labels; local
    parts are not, so they are never touched. An address without ``@``
    (e.g. ``postmaster``) has the empty domain.
    """
    _, at, domain = address.rpartition("@")
    return idn.toAsciiOrSame(domain) if at else ""


def destinationOf(recipientDomain: str, delivery: Delivery) -> Destination:
    """The next hops, in the order to try them, for mail to ``recipientDomain``."""
    hops = delivery.routes.get(recipientDomain) or delivery.routes.get("*")
    if hops:
        entry = hops[0]
        if entry.mx:
            return Destination((mxHop(recipientDomain, delivery.mxPort, entry.tls, entry.verify,
                                      entry.caFile),))
        return Destination(tuple(hops))
    if delivery.smarthosts:
        return Destination(tuple(delivery.smarthosts))
    return Destination((mxHop(recipientDomain, delivery.mxPort),))


def groupByDestination(recipients: Iterable[str], delivery: Delivery) -> dict[Destination, list[str]]:
    """
    Recipients grouped by destination, so that one delivery attempt (one
    connection) carries every recipient that shares a destination: with
    smarthosts every recipient shares one group; with MX delivery each
    recipient domain is its own group. Order is kept inside each group and
    groups appear in the order of their first recipient.
    """
    groups: dict[Destination, list[str]] = {}
    for address in recipients:
        groups.setdefault(destinationOf(recipientDomain(address), delivery), []).append(address)
    return groups


__all__: Sequence[str] = ("mxHop", "recipientDomain", "destinationOf", "groupByDestination")
