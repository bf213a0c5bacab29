"""
MX delivery's name service: where mail for a domain goes, through
``twisted.names`` (never ``MXCalculator``, which breaks on equal
preferences and null MX, and never ``getHostByName``, which sends ANY
queries: docs/twisted-traps.rst, "4. MX lookup").

``mailTargets`` turns a domain into the ordered addresses to try:

- MX records sorted by preference, ties shuffled (RFC 5321 section 5.1);
- no MX record (NOERROR, empty answer): the domain's own A/AAAA records;
- a null MX (RFC 7505, a single MX for "."): permanent, ``5.1.10``;
- NXDOMAIN: permanent, ``5.1.2``;
- MX names that are not ASCII host names are skipped (one could not even
  be sent as the TLS server name); when no MX name is left: temporary,
  ``4.4.3``;
- SERVFAIL, REFUSED or a timeout: temporary, ``4.4.3``; never a fall back
  to A records, which could send the mail somewhere it does not belong;
- per MX host, IPv4 addresses then IPv6; at most ``limit`` addresses in all
  (Postfix's smtp_mx_address_limit).

Outcomes are values (``Targets`` or ``Unroutable``), never exceptions, so
the courier maps them to recipient results without guessing.

``clientName`` names an SMTP client as Postfix does: the first PTR name of
its address, kept only when that name's A (or AAAA) records include the
address again; otherwise ``unknown``.
"""

from __future__ import annotations

import ipaddress
import random as _random
import re
import socket
from dataclasses import dataclass, field
from typing import Any, Callable

from twisted.internet import defer
from twisted.internet.interfaces import IResolver
from twisted.names import client, dns, error as dnsError

from relayd import idn

# Postfix's smtp_mx_address_limit.
ADDRESS_LIMIT = 5

# A host name as Postfix's valid_hostname takes it: ASCII letters, digits,
# "-" and "_" in labels of 1 to 63 octets, no hyphen at either end.
_DNS_LABEL = rb"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOSTNAME = re.compile(rb"(?:" + _DNS_LABEL + rb"\.)*" + _DNS_LABEL + rb"\.?\Z")


@dataclass(frozen=True)
class MailTarget:
    """
    One address to connect to: ``host`` is the MX (or domain) name,
    ``preference`` its MX preference (0 without MX); the courier needs it to
    cut the list at its own MX host. Not part of equality: a target is where
    to connect.
    """

    host: str
    address: str
    preference: int = field(default=0, compare=False)


@dataclass(frozen=True)
class Targets:
    targets: tuple[MailTarget, ...]


@dataclass(frozen=True)
class Unroutable:
    """The domain has no usable mail host: ``permanent`` bounces, else defers."""

    permanent: bool
    code: int
    dsn: str
    text: str


def _name(payload: Any) -> str:
    return payload.name.name.decode("ascii", "replace").rstrip(".").lower()


def _validHostname(payload: Any) -> bool:
    raw = payload.name.name
    return len(raw.rstrip(b".")) <= 253 and _HOSTNAME.match(raw) is not None


def _failureKind(failure) -> str:
    """'nxdomain' or 'temporary' for a failed query."""
    if failure.check(dnsError.DNSNameError):
        return "nxdomain"
    return "temporary"


def makeResolver(reactor: Any, servers: tuple[tuple[str, int], ...] = (), timeout: float = 10.0,
                 resolvConf: str = "/etc/resolv.conf"):
    """
    A ``twisted.names`` resolver with explicit timeouts: ``timeout`` seconds
    in all per query, spread over three tries (the default would wait up
    to 60 s). No servers: the ``nameserver`` lines of ``resolvConf``, read
    now (start-up, and SIGHUP, which builds a new resolver). Not Twisted's
    own reading of the file, which logs "resolv.conf changed, reparsing"
    and every server at each start and reload, re-reads the file every
    minute on the reactor thread, and keeps doing so for every resolver a
    reload replaced.
    """
    # Each query gets its own UDP port (source-port randomisation); without
    # this every lookup adds "starting on"/"stopping" lines to the mail log.
    dns.DNSDatagramProtocol.noisy = False
    tries = (timeout * 0.1, timeout * 0.3, timeout * 0.6)
    return client.Resolver(servers=list(servers) or nameServers(resolvConf), timeout=tries,
                           reactor=reactor)


class ConfiguredResolver:
    """
    The one resolver of MX delivery and client names, built from
    delivery.dns; a reload builds the ``twisted.names`` resolver again
    (new servers and timeout, resolv.conf read again) for the lookups that
    start after it.
    """

    # Read for the nameservers when delivery.dns names none.
    resolvConf = "/etc/resolv.conf"

    def __init__(self, reactor: Any, config: Any):
        self.reactor = reactor
        self.reconfigure(config)

    def prepareReload(self, config: Any) -> Callable[[], None]:
        """A reload's reading (in a thread): resolv.conf when no servers are configured."""
        dnsConfig = config.delivery.dns
        servers = tuple(dnsConfig.servers) or tuple(nameServers(self.resolvConf))

        def apply() -> None:
            self.resolver = makeResolver(self.reactor, servers, dnsConfig.timeout)

        return apply

    def reconfigure(self, config: Any) -> None:
        self.prepareReload(config)()

    def lookupAddress(self, name: str, timeout: Any = None) -> defer.Deferred:
        return self.resolver.lookupAddress(name, timeout)

    def lookupIPV6Address(self, name: str, timeout: Any = None) -> defer.Deferred:
        return self.resolver.lookupIPV6Address(name, timeout)

    def lookupMailExchange(self, name: str, timeout: Any = None) -> defer.Deferred:
        return self.resolver.lookupMailExchange(name, timeout)

    def lookupPointer(self, name: str, timeout: Any = None) -> defer.Deferred:
        return self.resolver.lookupPointer(name, timeout)


def nameServers(path: str) -> list[tuple[str, int]]:
    """
    The ``nameserver`` addresses of a resolv.conf file; like the C
    library, the local server (127.0.0.1) when there are none or the file
    is missing.
    """
    found = []
    try:
        with open(path, "rb") as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 2 and fields[0] == b"nameserver":
                    found.append((fields[1].decode("ascii", "replace"), dns.PORT))
    except OSError:
        pass
    return found or [("127.0.0.1", dns.PORT)]


async def _addresses(resolver: IResolver, name: str) -> tuple[list[str], str | None]:
    """
    (IPv4 then IPv6 addresses of ``name``, problem) where problem is None,
    'nxdomain' (both queries) or 'temporary' (either failed temporarily
    and nothing was found).
    """
    results = await defer.DeferredList(
        [resolver.lookupAddress(name), resolver.lookupIPV6Address(name)], consumeErrors=True
    )
    found: list[str] = []
    kinds = []
    for (ok, value), rrtype in zip(results, (dns.A, dns.AAAA)):
        if not ok:
            kinds.append(_failureKind(value))
            continue
        for record in value[0]:
            if record.type == rrtype:
                found.append(record.payload.dottedQuad() if rrtype == dns.A
                              else _ipv6(record.payload))
    if found:
        return found, None
    if "temporary" in kinds:
        return [], "temporary"
    if kinds == ["nxdomain", "nxdomain"]:
        return [], "nxdomain"
    return [], None


def _ipv6(payload: Any) -> str:
    return socket.inet_ntop(socket.AF_INET6, payload.address)


def _tempFailure(name: str, rrtype: str) -> Unroutable:
    return Unroutable(False, 0, "4.4.3",
                      f"Host or domain name not found. Name service error for name={name} "
                      f"type={rrtype}: Host not found, try again")


async def mailTargets(
    resolver: IResolver,
    domain: str,
    limit: int = ADDRESS_LIMIT,
    random: Callable[[list], None] = _random.shuffle,
) -> Targets | Unroutable:
    """The addresses to try for mail to ``domain``, in order, or why there are none."""
    # A-labels: Twisted would encode a U-label with Python's IDNA2003 codec.
    domain = idn.toAsciiOrSame(domain.rstrip("."))
    if not domain:
        return Unroutable(True, 550, "5.1.2", "recipient address has no domain to deliver to")
    try:
        answers, _, _ = await resolver.lookupMailExchange(domain)
    except Exception as e:
        if isinstance(e, dnsError.DNSNameError):
            return Unroutable(True, 550, "5.1.2",
                              f"Host or domain name not found. Name service error for "
                              f"name={domain} type=MX: Host not found")
        return _tempFailure(domain, "MX")

    records = [r.payload for r in answers if r.type == dns.MX]
    real = [r for r in records if _name(r)]
    if records and not real:
        # RFC 7505: the domain says it accepts no mail at all.
        return Unroutable(True, 556, "5.1.10",
                          f"Domain {domain} does not accept mail (nullMX)")
    usable = [r for r in real if _validHostname(r)]
    if real and not usable:
        return Unroutable(False, 0, "4.4.3",
                          f"Host or domain name not found. Name service error for name={domain} "
                          "type=MX: Malformed or unexpected name server reply")
    real = usable
    if not real:
        addresses, problem = await _addresses(resolver, domain)
        if addresses:
            return Targets(tuple(MailTarget(domain, a) for a in addresses[:limit]))
        if problem == "temporary":
            return _tempFailure(domain, "A")
        return Unroutable(True, 550, "5.4.4",
                          f"Host or domain name not found. Name service error for "
                          f"name={domain} type=A: Host found but no data record of requested type")

    hosts = _byPreference(real, random)
    targets: list[MailTarget] = []
    temporary = False
    for preference, host in hosts:
        if len(targets) >= limit:
            break
        addresses, problem = await _addresses(resolver, host)
        temporary = temporary or problem == "temporary"
        for address in addresses:
            if len(targets) < limit and MailTarget(host, address) not in targets:
                targets.append(MailTarget(host, address, preference))
    if targets:
        return Targets(tuple(targets))
    if temporary:
        return _tempFailure(hosts[0][1], "A")
    return Unroutable(True, 550, "5.4.4",
                      f"Host or domain name not found. Name service error for "
                      f"name={hosts[0][1]} type=A: Host not found")


def _byPreference(records: list, shuffle: Callable[[list], None]) -> list[tuple[int, str]]:
    """
    (preference, MX host name) by preference, equal preferences in random
    order, each name once (at its best preference).
    """
    groups: dict[int, list[str]] = {}
    for record in records:
        groups.setdefault(record.preference, []).append(_name(record))
    ordered: list[tuple[int, str]] = []
    seen: set[str] = set()
    for preference in sorted(groups):
        group = groups[preference]
        shuffle(group)
        for name in group:
            if name not in seen:
                seen.add(name)
                ordered.append((preference, name))
    return ordered


# Client names ----------------------------------------------------------------

UNKNOWN_CLIENT = "unknown"


@dataclass(frozen=True)
class ClientName:
    """The name to log, and why a PTR name was not taken (Postfix's warning), if it was not."""

    name: str
    warning: str | None = None


def _reverseName(address: str) -> str | None:
    try:
        return ipaddress.ip_address(address).reverse_pointer
    except ValueError:
        return None


def _numeric(name: str) -> bool:
    """A PTR name that reads as an address ("192.0.2.4") names nothing."""
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return all(label.isdigit() for label in name.split("."))
    return True


async def clientName(resolver: IResolver, address: str, timeout: float) -> ClientName:
    """
    The client's forward-confirmed name: one PTR query, then one A or AAAA
    query for the first usable PTR name, each given ``timeout / 2`` seconds
    over two tries, so the whole costs two queries and at most ``timeout``.
    Any failure (NXDOMAIN, SERVFAIL, timeout, a name that does not point
    back) is ``unknown``; the client's address alone decides what it may do.
    """
    reverse = _reverseName(address)
    if reverse is None or timeout <= 0:
        return ClientName(UNKNOWN_CLIENT)
    tries = (timeout * 0.5 * 0.4, timeout * 0.5 * 0.6)
    try:
        answers, _, _ = await resolver.lookupPointer(reverse, timeout=tries)
    except Exception:
        return ClientName(UNKNOWN_CLIENT)
    names = [r.payload for r in answers if r.type == dns.PTR]
    usable = [_name(p) for p in names if _validHostname(p) and _name(p) and not _numeric(_name(p))]
    if not usable:
        return ClientName(UNKNOWN_CLIENT)
    name = usable[0]
    ip = ipaddress.ip_address(address)
    rrtype = dns.A if ip.version == 4 else dns.AAAA
    lookup = resolver.lookupAddress if ip.version == 4 else resolver.lookupIPV6Address
    try:
        answers, _, _ = await lookup(name, timeout=tries)
    except Exception as e:
        reason = "Name or service not known" if isinstance(e, dnsError.DNSNameError) else \
            "Temporary failure in name resolution"
        return ClientName(UNKNOWN_CLIENT,
                          f"hostname {name} does not resolve to address {address}: {reason}")
    for record in answers:
        if record.type != rrtype:
            continue
        found = record.payload.dottedQuad() if rrtype == dns.A else _ipv6(record.payload)
        if ipaddress.ip_address(found) == ip:
            return ClientName(name)
    return ClientName(UNKNOWN_CLIENT, f"hostname {name} does not resolve to address {address}")


HOSTS_FILE = "/etc/hosts"


def parseHostsFile(text: str) -> dict[str, str]:
    """
    Address -> name from a hosts file: the first name of the first line that
    lists the address, as the system's resolver answers a reverse lookup
    from it (and that name leads back to the address on the same line).
    Lines that are not an address followed by valid names are skipped.
    """
    names: dict[str, str] = {}
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) < 2:
            continue
        try:
            address = ipaddress.ip_address(fields[0].split("%", 1)[0]).compressed
        except ValueError:
            continue
        name = fields[1].rstrip(".").lower()
        if address not in names and _HOSTNAME.match(name.encode("ascii", "replace")) \
                and not _numeric(name):
            names[address] = name
    return names


def readHostsFile(path: str | None) -> dict[str, str]:
    """parseHostsFile of ``path``; none (and no error) when it cannot be read, as for the system's resolver."""
    if path is None:
        return {}
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return parseHostsFile(f.read(1 << 20))
    except OSError:
        return {}


class ClientNames:
    """
    Client names for the SMTP server, within ``timeout`` seconds whatever
    the DNS does (0: no lookups, every client ``unknown``).

    ``hostsFile`` (read at start and on reload) is asked first, as Postfix's
    lookups through the system's resolver do: a client listed there (the
    loopback address, hosts of a small office) is named without a query.
    """

    def __init__(self, resolver: Any, timeout: float, clock: Any, hostsFile: str | None = None):
        self.resolver = resolver
        self.timeout = timeout
        self.clock = clock
        self.hostsFile = hostsFile
        self.hosts = readHostsFile(hostsFile)

    def prepareReload(self, config: Any) -> Callable[[], None]:
        """A reload's reading (in a thread): the hosts file; returns what applies it."""
        hosts = readHostsFile(self.hostsFile)

        def apply() -> None:
            self.timeout = config.limits.clientNameTimeout
            self.hosts = hosts

        return apply

    def reconfigure(self, config: Any) -> None:
        """A reload: limits.client_name_timeout for the sessions that start after it; the hosts file again."""
        self.prepareReload(config)()

    def lookup(self, address: str) -> defer.Deferred:
        """A Deferred that fires with a ClientName within ``timeout`` seconds, never fails."""
        if self.timeout <= 0 or self.resolver is None:
            return defer.succeed(ClientName(UNKNOWN_CLIENT))
        try:
            listed = self.hosts.get(ipaddress.ip_address(address).compressed)
        except ValueError:
            listed = None
        if listed is not None:
            return defer.succeed(ClientName(listed))
        result: defer.Deferred = defer.Deferred()

        def settle(value) -> None:
            if deadline.active():
                deadline.cancel()
            if not result.called:
                result.callback(value if isinstance(value, ClientName) else ClientName(UNKNOWN_CLIENT))

        # The queries end by themselves within the timeout; this only
        # guarantees the answer if a resolver does not.
        deadline = self.clock.callLater(self.timeout, settle, ClientName(UNKNOWN_CLIENT))
        defer.Deferred.fromCoroutine(clientName(self.resolver, address, self.timeout)).addBoth(settle)
        return result
