"""Tests for relayd.route: where each recipient goes next, as a table."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from relayd.route import groupByDestination, nextHops, recipientDomain


@dataclass(frozen=True)
class Hop:
    """Stand-in for relayd.config.NextHop."""

    host: str
    port: int = 25
    tls: str = "none"


@dataclass(frozen=True)
class Delivery:
    """Stand-in for relayd.config.Delivery."""

    smarthosts: tuple
    concurrency: int = 20


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
def test_nextHops_are_the_smarthosts_in_order(domain, delivery, hops):
    got = nextHops(domain, delivery)
    assert got == hops
    assert isinstance(got, tuple)


@pytest.mark.parametrize(
    "recipients, groups",
    [
        ([], {}),
        (["a@x.org"], {(PRIMARY, BACKUP): ["a@x.org"]}),
        (
            ["b@y.org", "a@x.org", "c@Y.ORG"],
            {(PRIMARY, BACKUP): ["b@y.org", "a@x.org", "c@Y.ORG"]},
        ),
    ],
)
def test_groupByDestination(recipients, groups):
    got = groupByDestination(recipients, TWO)
    assert got == groups
    assert list(got.values()) == list(groups.values())  # order kept


# -- routes and MX delivery -------------------------------------------------------------

from relayd.route import MXRoute  # noqa: E402


@dataclass(frozen=True)
class RouteHop:
    host: str = ""
    port: int = 25
    tls: str = "may"
    verify: bool = True
    caFile: str | None = None
    mx: bool = False


@dataclass(frozen=True)
class FullDelivery:
    smarthosts: tuple = ()
    routes: dict | None = None
    mxPort: int = 25


INTERNAL = RouteHop("mx.internal.example.org", 25, "may")
MX_REQUIRED = RouteHop(tls="starttls", mx=True, caFile="/ca.pem")
ROUTES = {"example.org": (INTERNAL,), "partner.example": (MX_REQUIRED,)}


@pytest.mark.parametrize("domain, delivery, hops", [
    # No smarthosts: MX delivery on mx_port, opportunistic TLS.
    ("example.net", FullDelivery(mxPort=2525), (MXRoute("example.net", 2525, "may"),)),
    # A route beats the smarthosts; other domains use the smarthosts.
    ("example.org", FullDelivery((PRIMARY,), ROUTES), (INTERNAL,)),
    ("example.net", FullDelivery((PRIMARY,), ROUTES), (PRIMARY,)),
    # An mx entry: MX delivery for that domain with its own TLS policy.
    ("partner.example", FullDelivery((PRIMARY,), ROUTES),
     (MXRoute("partner.example", 25, "starttls", True, "/ca.pem"),)),
    # "*" catches every domain without its own route.
    ("example.net", FullDelivery((PRIMARY,), {"*": (BACKUP,), **ROUTES}), (BACKUP,)),
    ("example.org", FullDelivery((PRIMARY,), {"*": (BACKUP,), **ROUTES}), (INTERNAL,)),
    ("x.example", FullDelivery((), {"*": (RouteHop(mx=True, tls="none"),)}), (MXRoute("x.example", 25, "none"),)),
])
def test_nextHops_routes_and_mx(domain, delivery, hops):
    assert nextHops(domain, delivery) == hops


def test_mx_delivery_groups_by_domain():
    got = groupByDestination(["a@x.org", "b@y.org", "c@X.org"], FullDelivery())
    assert list(got.values()) == [["a@x.org", "c@X.org"], ["b@y.org"]]
    assert list(got) == [(MXRoute("x.org"),), (MXRoute("y.org"),)]
