"""Tests for relayd.resolve: MX, null MX, NXDOMAIN, SERVFAIL and A/AAAA fallback, as a table."""

from __future__ import annotations

import pytest
from twisted.internet import defer
from twisted.names import dns, error

from relayd.resolve import MailTarget, Targets, Unroutable, mailTargets


class FakeResolver:
    """name -> {"MX": [(pref, host)], "A": [...], "AAAA": [...]} or an exception class."""

    def __init__(self, zone):
        self.zone = zone
        self.queries = []

    def _answer(self, name, rrtype, build):
        self.queries.append((name, rrtype))
        entry = self.zone.get(name, error.DNSNameError)
        if isinstance(entry, type):
            return defer.fail(entry(name))
        if isinstance(entry.get(rrtype), type):
            return defer.fail(entry[rrtype](name))
        return defer.succeed(([build(v) for v in entry.get(rrtype, [])], [], []))

    def lookupMailExchange(self, name):
        return self._answer(name, "MX", lambda v: dns.RRHeader(
            name, dns.MX, payload=dns.Record_MX(v[0], v[1].encode())))

    def lookupAddress(self, name):
        return self._answer(name, "A", lambda v: dns.RRHeader(name, dns.A, payload=dns.Record_A(v)))

    def lookupIPV6Address(self, name):
        return self._answer(name, "AAAA", lambda v: dns.RRHeader(
            name, dns.AAAA, payload=dns.Record_AAAA(v)))


def resolve(zone, domain, limit=5, shuffle=lambda group: None):
    d = defer.ensureDeferred(mailTargets(FakeResolver(zone), domain, limit, shuffle))
    return d.result


ZONE = {
    "x.test": {"MX": [(20, "b.x.test"), (10, "a.x.test"), (20, "c.x.test")]},
    "a.x.test": {"A": ["192.0.2.1"], "AAAA": ["2001:db8::1"]},
    "b.x.test": {"A": ["192.0.2.2"]},
    "c.x.test": {"A": ["192.0.2.3"]},
    "null.test": {"MX": [(0, "")]},
    "servfail.test": error.DNSServerError,
    "timeout.test": error.DNSQueryTimeoutError,
    "nomx.test": {"A": ["192.0.2.9"], "AAAA": ["2001:db8::9"]},
    "nodata.test": {},
    "broken-mx.test": {"MX": [(10, "gone.test")]},
    "slow-mx.test": {"MX": [(10, "slowhost.test")]},
    "slowhost.test": {"A": error.DNSQueryTimeoutError, "AAAA": error.DNSQueryTimeoutError},
    "half.test": {"A": ["192.0.2.7"], "AAAA": error.DNSServerError},
}


def t(host, address):
    return MailTarget(host, address)


@pytest.mark.parametrize("domain, expected", [
    ("x.test", Targets((t("a.x.test", "192.0.2.1"), t("a.x.test", "2001:db8::1"),
                        t("b.x.test", "192.0.2.2"), t("c.x.test", "192.0.2.3")))),
    ("X.Test.", Targets((t("a.x.test", "192.0.2.1"), t("a.x.test", "2001:db8::1"),
                         t("b.x.test", "192.0.2.2"), t("c.x.test", "192.0.2.3")))),
    ("nomx.test", Targets((t("nomx.test", "192.0.2.9"), t("nomx.test", "2001:db8::9")))),
    ("half.test", Targets((t("half.test", "192.0.2.7"),))),
    ("null.test", Unroutable(True, 556, "5.1.10", "Domain null.test does not accept mail (nullMX)")),
    ("nxdomain.test", Unroutable(True, 550, "5.1.2", "Host or domain name not found. Name service "
                                 "error for name=nxdomain.test type=MX: Host not found")),
    ("servfail.test", Unroutable(False, 0, "4.4.3", "Host or domain name not found. Name service "
                                 "error for name=servfail.test type=MX: Host not found, try again")),
    ("timeout.test", Unroutable(False, 0, "4.4.3", "Host or domain name not found. Name service "
                                "error for name=timeout.test type=MX: Host not found, try again")),
    ("nodata.test", Unroutable(True, 550, "5.4.4", "Host or domain name not found. Name service "
                               "error for name=nodata.test type=A: Host found but no data record "
                               "of requested type")),
    ("broken-mx.test", Unroutable(True, 550, "5.4.4", "Host or domain name not found. Name service "
                                  "error for name=gone.test type=A: Host not found")),
    ("slow-mx.test", Unroutable(False, 0, "4.4.3", "Host or domain name not found. Name service "
                                "error for name=slowhost.test type=A: Host not found, try again")),
    ("", Unroutable(True, 550, "5.1.2", "recipient address has no domain to deliver to")),
])
def test_mailTargets(domain, expected):
    assert resolve(ZONE, domain) == expected


def test_temporary_error_never_falls_back_to_A():
    resolver = FakeResolver({"servfail.test": error.DNSServerError})
    defer.ensureDeferred(mailTargets(resolver, "servfail.test"))
    assert resolver.queries == [("servfail.test", "MX")]


def test_address_limit():
    got = resolve(ZONE, "x.test", limit=2)
    assert got == Targets((t("a.x.test", "192.0.2.1"), t("a.x.test", "2001:db8::1")))


def test_equal_preferences_are_shuffled_not_sorted_by_name():
    got = resolve(ZONE, "x.test", shuffle=lambda group: group.reverse())
    assert [x.host for x in got.targets] == ["a.x.test", "a.x.test", "c.x.test", "b.x.test"]


def test_temporary_failure_in_the_A_record_fallback_defers():
    zone = {"nomx-temp.test": {"A": error.DNSServerError, "AAAA": error.DNSQueryTimeoutError}}
    assert resolve(zone, "nomx-temp.test") == Unroutable(
        False, 0, "4.4.3", "Host or domain name not found. Name service error for "
        "name=nomx-temp.test type=A: Host not found, try again")


def test_mx_names_that_are_not_ascii_host_names_are_skipped():
    zone = dict(ZONE, **{
        "idn.test": {"MX": [(5, "m\u00e9.idn.test"), (7, "-bad.idn.test"), (10, "b.x.test")]},
        "m\u00e9.idn.test": {"A": ["192.0.2.66"]},
    })
    got = resolve(zone, "idn.test")
    assert got == Targets((t("b.x.test", "192.0.2.2"),))


def test_only_invalid_mx_names_is_a_temporary_failure():
    zone = {"idn.test": {"MX": [(10, "m\u00e9.idn.test")]}}
    assert resolve(zone, "idn.test") == Unroutable(
        False, 0, "4.4.3", "Host or domain name not found. Name service error for "
        "name=idn.test type=MX: Malformed or unexpected name server reply")


def test_targets_carry_their_mx_preference():
    got = resolve(ZONE, "x.test")
    assert [(x.host, x.preference) for x in got.targets] == [
        ("a.x.test", 10), ("a.x.test", 10), ("b.x.test", 20), ("c.x.test", 20)]
    assert [x.preference for x in resolve(ZONE, "nomx.test").targets] == [0, 0]


# The resolver's configuration: read once, quietly


def test_makeResolver_reads_resolv_conf_once_without_log_lines(tmp_path):
    from twisted.internet import task
    from twisted.logger import globalLogPublisher

    from relayd.resolve import makeResolver

    resolvConf = tmp_path / "resolv.conf"
    resolvConf.write_text("# by hand\nsearch example.com\nnameserver 192.0.2.53\nnameserver 192.0.2.54\n")
    clock = task.Clock()
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        resolver = makeResolver(clock, (), 10.0, resolvConf=str(resolvConf))
    finally:
        globalLogPublisher.removeObserver(events.append)
    # Twisted's own reading logged "<file> changed, reparsing" and each
    # server at every start and SIGHUP, and re-read the file every minute.
    assert events == []
    assert clock.getDelayedCalls() == []
    assert resolver.servers == [("192.0.2.53", 53), ("192.0.2.54", 53)]
    assert {resolver.pickServer(), resolver.pickServer()} == {("192.0.2.53", 53), ("192.0.2.54", 53)}


def test_nameServers_without_any_is_the_local_server(tmp_path):
    from relayd.resolve import nameServers

    assert nameServers(str(tmp_path / "missing")) == [("127.0.0.1", 53)]
    (tmp_path / "empty").write_text("options edns0\n")
    assert nameServers(str(tmp_path / "empty")) == [("127.0.0.1", 53)]


# Client names against a real twisted.names DNS server (tests/dnsserver.py)

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

NAMES_ZONE = {
    # Confirmed: the PTR name points back.
    "10.2.0.192.in-addr.arpa": {"PTR": ["Mail.Example.TEST."]},
    "mail.example.test": {"A": ["192.0.2.10", "192.0.2.99"]},
    # The PTR name points elsewhere.
    "11.2.0.192.in-addr.arpa": {"PTR": ["liar.example.test"]},
    "liar.example.test": {"A": ["198.51.100.1"]},
    # The PTR name does not exist.
    "12.2.0.192.in-addr.arpa": {"PTR": ["ghost.example.test"]},
    # No PTR at all: 192.0.2.13 (NXDOMAIN).
    # The PTR query is never answered.
    "14.2.0.192.in-addr.arpa": "TIMEOUT",
    # The forward query is never answered.
    "15.2.0.192.in-addr.arpa": {"PTR": ["slow.example.test"]},
    "slow.example.test": "TIMEOUT",
    # A PTR that is an address, not a name.
    "16.2.0.192.in-addr.arpa": {"PTR": ["192.0.2.16"]},
    # SERVFAIL on the reverse zone.
    "17.2.0.192.in-addr.arpa": "SERVFAIL",
    # IPv6, confirmed by AAAA.
    "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa": {"PTR": ["six.example.test"]},
    "six.example.test": {"AAAA": ["2001:db8::1"], "A": ["192.0.2.10"]},
}


def clientNamesMain(zone: dict, addresses: list[str], timeout: float) -> None:
    """A DNS server and relayd's ClientNames in one real reactor; prints {address: [name, warning]}."""
    from twisted.internet import task

    from relayd.resolve import ClientNames, makeResolver
    from tests import dnsserver

    async def main(reactor):
        port = dnsserver.listen(reactor, zone)
        resolver = makeResolver(reactor, (("127.0.0.1", port.getHost().port),), 10.0)
        names = ClientNames(resolver, timeout, reactor)
        results = await defer.gatherResults([names.lookup(a) for a in addresses])
        print(json.dumps({a: [r.name, r.warning] for a, r in zip(addresses, results)}))
        await port.stopListening()

    task.react(lambda reactor: defer.ensureDeferred(main(reactor)))


def lookupNames(addresses, timeout=2.0):
    code = ("import json, sys; from tests.test_resolve import clientNamesMain; "
            "clientNamesMain(*json.loads(sys.argv[1]))")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps([NAMES_ZONE, addresses, timeout])],
                          cwd=ROOT, capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()
    return json.loads(proc.stdout.decode().strip().splitlines()[-1])


def test_client_names_as_postfix_confirms_them():
    found = lookupNames(["192.0.2.10", "192.0.2.11", "192.0.2.12", "192.0.2.13", "192.0.2.14",
                         "192.0.2.15", "192.0.2.16", "192.0.2.17", "2001:db8::1"])
    assert found == {
        "192.0.2.10": ["mail.example.test", None],
        "192.0.2.11": ["unknown", "hostname liar.example.test does not resolve to address 192.0.2.11"],
        "192.0.2.12": ["unknown", "hostname ghost.example.test does not resolve to address "
                                  "192.0.2.12: Name or service not known"],
        "192.0.2.13": ["unknown", None],
        "192.0.2.14": ["unknown", None],  # timed out: the banner does not wait for ever
        "192.0.2.15": ["unknown", "hostname slow.example.test does not resolve to address "
                                  "192.0.2.15: Temporary failure in name resolution"],
        "192.0.2.16": ["unknown", None],
        "192.0.2.17": ["unknown", None],
        "2001:db8::1": ["six.example.test", None],
    }


def test_client_names_never_wait_past_the_timeout_whatever_the_resolver():
    from twisted.internet import task

    from relayd.resolve import ClientName, ClientNames

    class Silent:
        def lookupPointer(self, name, timeout=None):
            return defer.Deferred()  # never answers, never times out

    clock = task.Clock()
    d = ClientNames(Silent(), 5.0, clock).lookup("192.0.2.4")
    clock.advance(4.9)
    assert not d.called
    clock.advance(0.1)
    assert d.result == ClientName("unknown")
    # Off: no lookup at all.
    assert ClientNames(Silent(), 0.0, clock).lookup("192.0.2.4").result == ClientName("unknown")


def test_hosts_file_names_each_address_by_the_first_name_of_its_first_line():
    from relayd.resolve import parseHostsFile

    text = ("# comment\n"
            "127.0.0.1 localhost\n"
            "127.0.0.1 runsc vm\n"
            "192.0.2.10\tprinter.office.test printer  # the printer\n"
            "::1 ip6-localhost ip6-loopback\n"
            "fe80::1%eth0 linklocal\n"
            "2001:DB8:0:0::7 Mail.Example.\n"
            "not-an-address name\n"
            "192.0.2.11\n"
            "192.0.2.12 bad_name!\n"
            "192.0.2.13 192.0.2.14\n")
    assert parseHostsFile(text) == {
        "127.0.0.1": "localhost",
        "192.0.2.10": "printer.office.test",
        "::1": "ip6-localhost",
        "fe80::1": "linklocal",
        "2001:db8::7": "mail.example",
    }


def test_client_names_answer_from_the_hosts_file_without_a_query(tmp_path):
    from twisted.internet import task

    from relayd.resolve import ClientName, ClientNames
    from tests.builders import testConfig

    class Refusing:
        def lookupPointer(self, *a, **k):
            raise AssertionError("the DNS was asked")

    hosts = tmp_path / "hosts"
    hosts.write_text("192.0.2.10 printer.office.test\n")
    names = ClientNames(Refusing(), 5.0, task.Clock(), hostsFile=str(hosts))
    assert names.lookup("192.0.2.10").result == ClientName("printer.office.test")
    # Off means off: no name, not even from the hosts file.
    assert ClientNames(Refusing(), 0.0, task.Clock(), hostsFile=str(hosts)).lookup(
        "192.0.2.10").result == ClientName("unknown")
    # Re-read on reload; a missing file names nobody.
    hosts.write_text("192.0.2.10 scanner.office.test\n")
    names.reconfigure(testConfig(limits={"client_name_timeout": "5s"}))
    assert names.lookup("192.0.2.10").result == ClientName("scanner.office.test")
    assert ClientNames(Refusing(), 5.0, task.Clock(), hostsFile=str(tmp_path / "none")).hosts == {}
