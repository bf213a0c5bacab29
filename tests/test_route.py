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
