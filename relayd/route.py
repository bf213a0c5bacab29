"""
Where a recipient's mail goes next: the ordered list of next hops to try.

Pure functions over the delivery configuration, so the scheduler can group a
message's recipients by destination (one courier attempt per group) and the
rules can be tested as a table. In order:

1. ``delivery.routes[domain]`` (exact, lower-cased recipient domain);
2. ``delivery.routes["*"]``;
3. ``delivery.smarthosts`` when there are any;
4. the domain's MX hosts (an ``MXRoute``; the courier resolves it).

A route entry with ``mx: true`` is an ``MXRoute`` too, with that entry's
TLS policy, so a domain can get MX delivery with required TLS while the
rest of the mail goes to a smarthost.

``delivery`` is ``relayd.config.Delivery`` and its next hops are
``relayd.config.NextHop``; this module never imports the config module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

DEFAULT_MX_PORT = 25
DEFAULT_MX_TLS = "may"


@dataclass(frozen=True)
class MXRoute:
    """
    "The MX hosts of ``domain``": resolved by the courier at each attempt
    (DNS answers change), connected to on ``port`` with this TLS policy.
    """

    domain: str
    port: int = DEFAULT_MX_PORT
    tls: str = DEFAULT_MX_TLS
    verify: bool = True
    caFile: str | None = None

    @property
    def host(self) -> str:
        return self.domain


def recipientDomain(address: str) -> str:
    """
    The domain part of an address, lower-cased (domains are case-insensitive;
    local parts are not, so they are never touched). An address without ``@``
    (e.g. ``postmaster``) has the empty domain.
    """
    _, at, domain = address.rpartition("@")
    return domain.lower() if at else ""


def _mxRoute(domain: str, delivery: Any, entry: Any = None) -> MXRoute:
    if entry is None:
        return MXRoute(domain, delivery.mxPort)
    return MXRoute(domain, delivery.mxPort, entry.tls, entry.verify, entry.caFile)


def nextHops(recipientDomain: str, delivery: Any) -> tuple[Any, ...]:
    """The next hops, in the order to try them, for mail to ``recipientDomain``."""
    hops = delivery.routes.get(recipientDomain) or delivery.routes.get("*")
    if hops:
        if hops[0].mx:
            return (_mxRoute(recipientDomain, delivery, hops[0]),)
        return tuple(hops)
    if delivery.smarthosts:
        return tuple(delivery.smarthosts)
    return (_mxRoute(recipientDomain, delivery),)


def groupByDestination(
    recipients: Iterable[str], delivery: Any
) -> dict[tuple[Any, ...], list[str]]:
    """
    Recipients grouped by the next-hop list they route to, so that one
    delivery attempt (one connection) carries every recipient that shares
    a destination: with smarthosts every recipient shares one group; with
    MX delivery each recipient domain is its own group. Order is kept inside
    each group and groups appear in the order of their first recipient.
    """
    groups: dict[tuple[Any, ...], list[str]] = {}
    for address in recipients:
        hops = nextHops(recipientDomain(address), delivery)
        groups.setdefault(hops, []).append(address)
    return groups


__all__: Sequence[str] = ("MXRoute", "recipientDomain", "nextHops", "groupByDestination")
