"""
Where a recipient's mail goes next: the ordered list of next hops to try.

Pure functions over the delivery configuration, so the scheduler can group a
message's recipients by destination (one courier attempt per group) and the
rules can be tested as a table. For now every recipient goes to the
configured smarthosts; per-domain routes and MX lookup come later and will
change what these functions return, not their shape.

A next hop is anything with ``.host``, ``.port`` and ``.tls`` (in practice
``relayd.config.NextHop``); this module never imports the config module.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence


def recipientDomain(address: str) -> str:
    """
    The domain part of an address, lower-cased (domains are case-insensitive;
    local parts are not, so they are never touched). An address without ``@``
    (e.g. ``postmaster``) has the empty domain.
    """
    _, at, domain = address.rpartition("@")
    return domain.lower() if at else ""


def nextHops(recipientDomain: str, delivery: Any) -> tuple[Any, ...]:
    """
    The next hops, in the order to try them, for mail to ``recipientDomain``.

    Today: the configured smarthosts, whatever the domain. Later: a
    per-domain route first, then the smarthosts, then MX lookup.
    """
    return tuple(delivery.smarthosts)


def groupByDestination(
    recipients: Iterable[str], delivery: Any
) -> dict[tuple[Any, ...], list[str]]:
    """
    Recipients grouped by the next-hop list they route to, so that one
    delivery attempt (one connection) carries every recipient that shares
    a destination. Order is kept inside each group and groups appear in the
    order of their first recipient. Today there is a single group.
    """
    groups: dict[tuple[Any, ...], list[str]] = {}
    for address in recipients:
        hops = nextHops(recipientDomain(address), delivery)
        groups.setdefault(hops, []).append(address)
    return groups


__all__: Sequence[str] = ("recipientDomain", "nextHops", "groupByDestination")
