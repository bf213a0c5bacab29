"""Tests for relayd.route: where each recipient goes next, as a table."""

from __future__ import annotations

import pytest

from relayd.config import Delivery, NextHop
from relayd.delivery import Destination
from relayd.route import destinationOf, groupByDestination, mxHop, recipientDomain


def Hop(host: str, port: int = 25, tls: str = "none") -> NextHop:
    return NextHop(host, port, tls)


PRIMARY = Hop("smtp.example.net", 587)
BACKUP = Hop("backup.example.net", 25)
TWO = Delivery((PRIMARY, BACKUP))


@pytest.mark.parametrize(
    "address, domain",
    [
        ("alice@Example.ORG", "example.org"),
        ("Alice@example.org", "example.org"),
        ('"a@b"@example.net', "example.net"),
        ("postmaster", ""),
        ("", ""),
    ],
)
def test_recipientDomain(address, domain):
    assert recipientDomain(address) == domain


@pytest.mark.parametrize(
    "domain, delivery, hops",
    [
        ("example.org", TWO, (PRIMARY, BACKUP)),
        ("other.example", TWO, (PRIMARY, BACKUP)),
        ("", TWO, (PRIMARY, BACKUP)),
        ("example.org", Delivery((BACKUP,)), (BACKUP,)),
        ("example.org", Delivery([BACKUP, PRIMARY]), (BACKUP, PRIMARY)),
    ],
)
def test_destination_is_the_smarthosts_in_order(domain, delivery, hops):
    got = destinationOf(domain, delivery)
    assert got == Destination(hops)
    assert isinstance(got.hops, tuple)


@pytest.mark.parametrize(
    "recipients, groups",
    [
        ([], {}),
        (["a@x.org"], {Destination((PRIMARY, BACKUP)): ["a@x.org"]}),
        (
            ["b@y.org", "a@x.org", "c@Y.ORG"],
            {Destination((PRIMARY, BACKUP)): ["b@y.org", "a@x.org", "c@Y.ORG"]},
        ),
    ],
)
def test_groupByDestination(recipients, groups):
    got = groupByDestination(recipients, TWO)
    assert got == groups
    assert list(got.values()) == list(groups.values())  # order kept


# -- routes and MX delivery -------------------------------------------------------------


def RouteHop(host: str = "", port: int = 25, tls: str = "may", caFile: str | None = None,
             mx: bool = False) -> NextHop:
    """A delivery.routes entry as the config parses it (an mx entry has no host)."""
    return NextHop(host, 0 if mx else port, tls, caFile=caFile, mx=mx)


def FullDelivery(smarthosts: tuple = (), routes: dict | None = None, mxPort: int = 25) -> Delivery:
    return Delivery(smarthosts=smarthosts, routes=routes or {}, mxPort=mxPort)


INTERNAL = RouteHop("mx.internal.example.org", 25, "may")
MX_REQUIRED = RouteHop(tls="starttls", mx=True, caFile="/ca.pem")
ROUTES = {"example.org": (INTERNAL,), "partner.example": (MX_REQUIRED,)}


@pytest.mark.parametrize("domain, delivery, hops", [
    # No smarthosts: MX delivery on mx_port, opportunistic TLS.
    ("example.net", FullDelivery(mxPort=2525), (mxHop("example.net", 2525, "may"),)),
    # A route beats the smarthosts; other domains use the smarthosts.
    ("example.org", FullDelivery((PRIMARY,), ROUTES), (INTERNAL,)),
    ("example.net", FullDelivery((PRIMARY,), ROUTES), (PRIMARY,)),
    # An mx entry: MX delivery for that domain with its own TLS policy.
    ("partner.example", FullDelivery((PRIMARY,), ROUTES),
     (mxHop("partner.example", 25, "starttls", True, "/ca.pem"),)),
    # "*" catches every domain without its own route.
    ("example.net", FullDelivery((PRIMARY,), {"*": (BACKUP,), **ROUTES}), (BACKUP,)),
    ("example.org", FullDelivery((PRIMARY,), {"*": (BACKUP,), **ROUTES}), (INTERNAL,)),
    ("x.example", FullDelivery((), {"*": (RouteHop(mx=True, tls="none"),)}), (mxHop("x.example", 25, "none"),)),
])
def test_destination_routes_and_mx(domain, delivery, hops):
    assert destinationOf(domain, delivery) == Destination(hops)


def test_mx_delivery_groups_by_domain():
    got = groupByDestination(["a@x.org", "b@y.org", "c@X.org"], FullDelivery())
    assert list(got.values()) == [["a@x.org", "c@X.org"], ["b@y.org"]]
    assert list(got) == [Destination((mxHop("x.org"),)), Destination((mxHop("y.org"),))]
