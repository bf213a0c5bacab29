"""
PROXY protocol (versions 1 and 2) in front of a listener's sessions.

Behind a TCP load balancer every connection comes from the balancer; the
balancer names the real client in a PROXY header before the first SMTP
byte. This module reads that header *before* the SMTP session exists: the
session is built and connected only once the header is parsed, with a
transport whose ``getPeer()``/``getHost()`` are the addresses from the
header, so every per-client decision (trusted networks, connections per
client, the AUTH failure throttle, log lines, the Received: header) sees
the client, never the balancer. (Twisted's ``haproxy:`` endpoint wrapper
connects the session first and parses the header later, so the greeting
and the limits would all see the balancer.)

Only addresses in the listener's ``proxy_from`` may send a header: anyone
else could claim to be 127.0.0.1 and relay. A connection from elsewhere,
one without a valid header, or one whose header does not come within the
command timeout is dropped (closed without a reply) and logged. A header
without a client address (v2 ``LOCAL``, v1 ``UNKNOWN``: a balancer's
health check) gets a minimal SMTP answer -- greeting, HELO/EHLO, QUIT --
and is closed; it is not a client, so it is neither counted nor logged.

The parser is strict (the specification's formats only, nothing lenient)
and bounded: a v1 header is at most 107 bytes, a v2 header at most 16 +
65535; the protocol cannot make either grow further.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Callable

from twisted.internet import protocol
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IHandshakeListener
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from zope.interface import directlyProvides, implementer, providedBy

from relayd import maillog, replies

V1_PREFIX = b"PROXY "
V1_MAX_LENGTH = 107  # the whole line with its CRLF, as the specification bounds it
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED_LENGTH = 16

_V1_PORT = re.compile(r"0|[1-9][0-9]{0,4}")
_V2_TCP4, _V2_TCP6, _V2_UNSPEC = 0x11, 0x21, 0x00

# A health check's dialogue: at most this many lines of at most this length.
HEALTH_CHECK_LINES = 4
HEALTH_CHECK_LINE_LENGTH = 512


class ProxyHeaderError(ValueError):
    """The bytes are not a valid PROXY header; the message says why (no secrets: addresses only)."""


@dataclass(frozen=True)
class ProxyHeader:
    """
    A parsed header. ``source``/``destination`` are the client's and the
    balancer's listening address, or both None for a header that names no
    client (v2 LOCAL or UNSPEC, v1 UNKNOWN).
    """

    version: int
    source: IPv4Address | IPv6Address | None = None
    destination: IPv4Address | IPv6Address | None = None

    @property
    def local(self) -> bool:
        return self.source is None


def parseHeader(data: bytes) -> tuple[ProxyHeader, int] | None:
    """
    The header at the start of ``data`` and its length in bytes; None while
    more bytes are needed. Raises ProxyHeaderError as soon as the bytes
    cannot be a header (so a client talking SMTP is told apart at once).
    """
    if data[: len(V2_SIGNATURE)] == V2_SIGNATURE[: len(data)] and data[:1] == b"\r":
        return _parseV2(data)
    if data[: len(V1_PREFIX)] == V1_PREFIX[: len(data)]:
        return _parseV1(data)
    raise ProxyHeaderError("not a PROXY protocol header")


def _parseV1(data: bytes) -> tuple[ProxyHeader, int] | None:
    end = data.find(b"\r\n", 0, V1_MAX_LENGTH)
    if end < 0:
        if len(data) >= V1_MAX_LENGTH or b"\n" in data[:V1_MAX_LENGTH]:
            raise ProxyHeaderError(f"v1 header without CRLF in its first {V1_MAX_LENGTH} bytes")
        return None
    try:
        line = data[:end].decode("ascii")
    except UnicodeDecodeError:
        raise ProxyHeaderError("v1 header is not ASCII") from None
    fields = line.split(" ")
    if len(fields) >= 2 and fields[1] == "UNKNOWN":
        # The specification lets the sender put anything after UNKNOWN.
        return ProxyHeader(1), end + 2
    if len(fields) != 6 or fields[1] not in ("TCP4", "TCP6"):
        raise ProxyHeaderError("v1 header is not 'PROXY TCP4|TCP6 SOURCE DESTINATION SPORT DPORT'")
    family = ipaddress.IPv4Address if fields[1] == "TCP4" else ipaddress.IPv6Address
    addresses = []
    for text in fields[2:4]:
        try:
            addresses.append(str(family(text)))
        except ValueError:
            raise ProxyHeaderError(f"v1 {fields[1]} address {text[:45]!r} is not valid") from None
    ports = []
    for text in fields[4:6]:
        if not _V1_PORT.fullmatch(text) or int(text) > 65535:
            raise ProxyHeaderError(f"v1 port {text[:8]!r} is not a number from 0 to 65535")
        ports.append(int(text))
    make = IPv4Address if fields[1] == "TCP4" else IPv6Address
    return ProxyHeader(1, make("TCP", addresses[0], ports[0]),
                       make("TCP", addresses[1], ports[1])), end + 2


def _parseV2(data: bytes) -> tuple[ProxyHeader, int] | None:
    if len(data) < V2_FIXED_LENGTH:
        return None
    versionCommand, family = data[12], data[13]
    if versionCommand >> 4 != 2:
        raise ProxyHeaderError(f"v2 header with version {versionCommand >> 4}")
    command = versionCommand & 0x0F
    if command not in (0, 1):
        raise ProxyHeaderError(f"v2 header with unknown command {command}")
    length = int.from_bytes(data[14:16], "big")
    total = V2_FIXED_LENGTH + length
    if len(data) < total:
        return None
    block = data[V2_FIXED_LENGTH:total]
    if command == 0 or family == _V2_UNSPEC:
        # LOCAL: the balancer's own connection (a health check); the
        # address block, if any, is to be ignored.
        return ProxyHeader(2), total
    if family == _V2_TCP4:
        if length < 12:
            raise ProxyHeaderError(f"v2 TCP over IPv4 with a {length}-byte address block")
        source = IPv4Address("TCP", str(ipaddress.IPv4Address(block[0:4])),
                             int.from_bytes(block[8:10], "big"))
        destination = IPv4Address("TCP", str(ipaddress.IPv4Address(block[4:8])),
                                  int.from_bytes(block[10:12], "big"))
    elif family == _V2_TCP6:
        if length < 36:
            raise ProxyHeaderError(f"v2 TCP over IPv6 with a {length}-byte address block")
        source = IPv6Address("TCP", str(ipaddress.IPv6Address(block[0:16])),
                             int.from_bytes(block[32:34], "big"))
        destination = IPv6Address("TCP", str(ipaddress.IPv6Address(block[16:32])),
                                  int.from_bytes(block[34:36], "big"))
    else:
        raise ProxyHeaderError(f"v2 address family/protocol 0x{family:02x} is not TCP over IPv4 or IPv6")
    # TLVs after the addresses are skipped: relayd needs none of them.
    return ProxyHeader(2, source, destination), total


def mayProxy(host: str, networks) -> bool:
    """Whether a connection from ``host`` may send a PROXY header (``proxy_from``)."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in networks if net.version == ip.version)


@implementer(IHandshakeListener)
class ProxiedConnection(ProtocolWrapper):
    """
    One connection through the balancer: reads the PROXY header, then
    becomes a transparent wrapper around the session, which sees the
    header's addresses as its peer and host. Everything else a transport
    offers (STARTTLS, producers, TCP options) passes through to the TCP
    transport beneath, as ProtocolWrapper does.
    """

    def __init__(self, factory: "ProxyFactory"):
        super().__init__(factory, None)
        self._buffer = b""
        self._timer = None
        self._header: ProxyHeader | None = None
        self._healthCheck = False
        self._checkLines = 0
        self._done = False  # dropped or answered: further input is ignored
        # Bytes read with the header, held for the session while it has
        # paused its input (it does until its greeting is out).
        self._held = b""
        self._paused = False

    def makeConnection(self, transport) -> None:
        # The session is connected later, when the header has been read.
        directlyProvides(self, providedBy(transport))
        protocol.Protocol.makeConnection(self, transport)

    def connectionMade(self) -> None:
        self.factory.registerProtocol(self)
        peer = self.transport.getPeer()
        self._balancer = getattr(peer, "host", str(peer))
        if not mayProxy(self._balancer, self.factory.proxyFrom):
            self._drop("not in proxy_from")
            return
        self._timer = self.factory.clock.callLater(self.factory.timeout(), self._timedOut)

    def logPrefix(self) -> str:
        if self.wrappedProtocol is not None:
            return super().logPrefix()
        return self.__class__.__name__

    def getPeer(self):
        if self._header is not None and self._header.source is not None:
            return self._header.source
        return self.transport.getPeer()

    def getHost(self):
        if self._header is not None and self._header.destination is not None:
            return self._header.destination
        return self.transport.getHost()

    def dataReceived(self, data: bytes) -> None:
        if self.wrappedProtocol is not None:
            if self._held or self._paused:
                self._held += data
                self._deliverHeld()
            else:
                self.wrappedProtocol.dataReceived(data)
            return
        if self._done:
            return
        self._buffer += data
        if self._healthCheck:
            self._answerHealthCheck()
            return
        try:
            parsed = parseHeader(self._buffer)
        except ProxyHeaderError as e:
            self._drop(f"bad PROXY header: {e}")
            return
        if parsed is None:
            return
        header, used = parsed
        self._buffer = self._buffer[used:]
        if header.local:
            self._healthCheck = True
            self.transport.write(replies.GREETING.format(hostname=self.factory.hostname()).toBytes())
            self._answerHealthCheck()
            return
        self._cancelTimer()
        self._header = header
        session = self.factory.wrappedFactory.buildProtocol(header.source)
        if session is None:
            self._done = True
            self.transport.abortConnection()
            return
        self.wrappedProtocol = session
        self._held, self._buffer = self._buffer, b""
        session.makeConnection(self)
        self._deliverHeld()

    def _deliverHeld(self) -> None:
        while self._held and not self._paused and self.wrappedProtocol is not None:
            data, self._held = self._held, b""
            self.wrappedProtocol.dataReceived(data)

    # The session pauses and resumes its input through its transport, this
    # wrapper: bytes already read with the header must wait as the socket does.

    def pauseProducing(self) -> None:
        self._paused = True
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self._paused = False
        self.transport.resumeProducing()
        if self._held:
            # As a socket would: on a later turn of the reactor, never from
            # inside the session's own call (it resumes, then greets).
            self.factory.clock.callLater(0, self._deliverHeld)

    def stopProducing(self) -> None:
        self.transport.stopProducing()

    def _answerHealthCheck(self) -> None:
        """HELO/EHLO gets 250, anything else (QUIT first) 221 and the close."""
        hostname = self.factory.hostname()
        while not self._done:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > HEALTH_CHECK_LINE_LENGTH:
                    self._closeHealthCheck()
                return
            line, self._buffer = self._buffer[:end], self._buffer[end + 1:]
            self._checkLines += 1
            verb = line.split(b" ", 1)[0].strip().upper()
            if verb in (b"HELO", b"EHLO") and self._checkLines < HEALTH_CHECK_LINES:
                self.transport.write(replies.HELO_OK.format(hostname=hostname).toBytes())
            else:
                self._closeHealthCheck()

    def _closeHealthCheck(self) -> None:
        self._done = True
        self._cancelTimer()
        self.transport.write(replies.CLOSING.toBytes())
        self.transport.loseConnection()

    def _timedOut(self) -> None:
        self._timer = None
        if self._healthCheck:
            self._done = True
            self.transport.abortConnection()
        else:
            self._drop(f"no PROXY header within {self.factory.timeout():g} s")

    def _drop(self, reason: str) -> None:
        self._done = True
        self._cancelTimer()
        maillog.proxyDropped(self._balancer, reason)
        self.transport.abortConnection()

    def _cancelTimer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def handshakeCompleted(self) -> None:
        # STARTTLS puts the TLS layer beneath this wrapper, which then hears
        # of the finished handshake; the session wants to know too.
        if IHandshakeListener.providedBy(self.wrappedProtocol):
            self.wrappedProtocol.handshakeCompleted()

    def connectionLost(self, reason) -> None:
        self._cancelTimer()
        self.factory.unregisterProtocol(self)
        if self.wrappedProtocol is not None:
            session, self.wrappedProtocol = self.wrappedProtocol, None
            session.connectionLost(reason)
        elif not self._done and not self._healthCheck:
            self._done = True
            maillog.proxyDropped(self._balancer, "connection closed before the PROXY header")


class ProxyFactory(WrappingFactory):
    """
    A listener's factory behind a PROXY-protocol balancer: ``proxyFrom`` are
    the networks allowed to send the header; ``timeout()`` (seconds) bounds
    the wait for it and a health check's whole dialogue; ``hostname()``
    names relayd in a health check's answers. Both are read per connection,
    so a reloaded configuration applies to the next one.
    """

    protocol = ProxiedConnection
    noisy = False

    def __init__(self, wrappedFactory, proxyFrom, hostname: Callable[[], str],
                 timeout: Callable[[], float], clock):
        super().__init__(wrappedFactory)
        self.proxyFrom = tuple(proxyFrom)
        self.hostname = hostname
        self.timeout = timeout
        self.clock = clock

    def buildProtocol(self, addr) -> ProxiedConnection:
        return self.protocol(self)
