"""
A DNS server on loopback under the tests' control (twisted.names), so MX
delivery can be tested end to end: relayd's resolver is pointed at it with
``delivery.dns.servers``.

The zone is JSON: ``{name: answer}`` where answer is

- ``{"MX": [[preference, host], ...], "A": [...], "AAAA": [...], "PTR": [host, ...],
  "TXT": [text, ...]}`` (any of them; a TXT text longer than 255 bytes is
  sent as several strings of one record, as zone files split DKIM keys; a missing type is an empty NOERROR answer; ``[[0, ""]]``
  is a null MX; PTR under a reverse name like ``4.2.0.192.in-addr.arpa``);
- ``"SERVFAIL"``: every query for the name fails with SERVFAIL;
- ``"TIMEOUT"``: queries for the name are never answered.

Any other name is NXDOMAIN.

Usage: python tests/dnsserver.py --port PORT --zone JSON [--interface 127.0.0.1]   (UDP)
"""

from __future__ import annotations

import argparse
import json
import sys

from twisted.internet import defer
from twisted.names import common, dns, error, server


class ZoneResolver(common.ResolverBase):
    def __init__(self, zone: dict):
        super().__init__()
        self.zone = {name.lower().rstrip("."): value for name, value in zone.items()}

    def _lookup(self, name, cls, type, timeout):
        key = name.decode("ascii").lower().rstrip(".")
        entry = self.zone.get(key)
        if entry is None:
            return defer.fail(error.DomainError(key))
        if entry == "SERVFAIL":
            # Not a DomainError (which the server answers NXDOMAIN): SERVFAIL.
            return defer.fail(RuntimeError(f"SERVFAIL for {key}"))
        if entry == "TIMEOUT":
            return defer.Deferred()
        answers = []
        if type in (dns.MX, dns.ALL_RECORDS):
            for preference, host in entry.get("MX", []):
                answers.append(dns.RRHeader(name, dns.MX, payload=dns.Record_MX(preference, host.encode()), ttl=60))
        if type in (dns.A, dns.ALL_RECORDS):
            for address in entry.get("A", []):
                answers.append(dns.RRHeader(name, dns.A, payload=dns.Record_A(address), ttl=60))
        if type in (dns.AAAA, dns.ALL_RECORDS):
            for address in entry.get("AAAA", []):
                answers.append(dns.RRHeader(name, dns.AAAA, payload=dns.Record_AAAA(address), ttl=60))
        if type in (dns.PTR, dns.ALL_RECORDS):
            for host in entry.get("PTR", []):
                answers.append(dns.RRHeader(name, dns.PTR, payload=dns.Record_PTR(host.encode()), ttl=60))
        if type in (dns.TXT, dns.ALL_RECORDS):
            for text in entry.get("TXT", []):
                data = text.encode()
                strings = [data[i:i + 255] for i in range(0, len(data), 255)] or [b""]
                answers.append(dns.RRHeader(name, dns.TXT, payload=dns.Record_TXT(*strings), ttl=60))
        return defer.succeed((answers, [], []))


def listen(reactor, zone: dict, port: int = 0, interface: str = "127.0.0.1"):
    """Serve ``zone`` over UDP; returns the listening port."""
    factory = server.DNSServerFactory(authorities=[ZoneResolver(zone)])
    factory.noisy = False
    protocol = dns.DNSDatagramProtocol(factory)
    protocol.noisy = False
    return reactor.listenUDP(port, protocol, interface=interface)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--zone", required=True)
    parser.add_argument("--interface", default="127.0.0.1")
    args = parser.parse_args(argv)
    from twisted.internet import reactor

    listen(reactor, json.loads(args.zone), args.port, args.interface)
    print(f"dnsserver: listening on {args.interface}:{args.port}/udp", flush=True)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
