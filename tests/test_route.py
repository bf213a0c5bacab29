"""Tests for relayd.route: where each recipient goes next, as a table."""

from __future__ import annotations

import pytest

from relayd.config import NextHop
from relayd.route import MXRoute, groupByDestination, nextHops, recipientDomain
from tests.builders import testConfig


def delivery(smarthosts=(), routes=None, mxPort=25):
    """The delivery section read from these YAML values (hops as mappings)."""
    return testConfig(delivery={"smarthosts": list(smarthosts), "routes": routes or {},
                                "mx_port": mxPort}).delivery


# Each next hop as written in the YAML, and as read.
PRIMARY_YAML = {"host": "smtp.example.net", "port": 587, "tls": "none"}
BACKUP_YAML = {"host": "backup.example.net", "port": 25, "tls": "none"}
PRIMARY = NextHop("smtp.example.net", 587, "none")
BACKUP = NextHop("backup.example.net", 25, "none")
TWO = delivery([PRIMARY_YAML, BACKUP_YAML])


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
        ("example.org", delivery([BACKUP_YAML]), (BACKUP,)),
        ("example.org", delivery([BACKUP_YAML, PRIMARY_YAML]), (BACKUP, PRIMARY)),
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

INTERNAL_YAML = {"host": "mx.internal.example.org", "port": 25, "tls": "may"}
INTERNAL = NextHop("mx.internal.example.org", 25, "may")
MX_REQUIRED_YAML = {"mx": True, "tls": "starttls", "ca_file": "/ca.pem"}
ROUTES = {"example.org": [INTERNAL_YAML], "partner.example": [MX_REQUIRED_YAML]}


@pytest.mark.parametrize("domain, delivery, hops", [
    # No smarthosts: MX delivery on mx_port, opportunistic TLS.
    ("example.net", delivery(mxPort=2525), (MXRoute("example.net", 2525, "may"),)),
    # A route beats the smarthosts; other domains use the smarthosts.
    ("example.org", delivery([PRIMARY_YAML], ROUTES), (INTERNAL,)),
    ("example.net", delivery([PRIMARY_YAML], ROUTES), (PRIMARY,)),
    # An mx entry: MX delivery for that domain with its own TLS policy.
    ("partner.example", delivery([PRIMARY_YAML], ROUTES),
     (MXRoute("partner.example", 25, "starttls", True, "/ca.pem"),)),
    # "*" catches every domain without its own route.
    ("example.net", delivery([PRIMARY_YAML], {"*": [BACKUP_YAML], **ROUTES}), (BACKUP,)),
    ("example.org", delivery([PRIMARY_YAML], {"*": [BACKUP_YAML], **ROUTES}), (INTERNAL,)),
    ("x.example", delivery([], {"*": [{"mx": True, "tls": "none"}]}),
     (MXRoute("x.example", 25, "none"),)),
])
def test_nextHops_routes_and_mx(domain, delivery, hops):
    assert nextHops(domain, delivery) == hops


def test_mx_delivery_groups_by_domain():
    got = groupByDestination(["a@x.org", "b@y.org", "c@X.org"], delivery())
    assert list(got.values()) == [["a@x.org", "c@X.org"], ["b@y.org"]]
    assert list(got) == [(MXRoute("x.org"),), (MXRoute("y.org"),)]
