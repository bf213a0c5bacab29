"""
What every TCP connection of relayd gets, accepted or made: TCP_NODELAY,
and a transport that sends a write at once.

Nagle's algorithm holds back a short segment (a reply, a message's final
dot) until the peer acknowledges the previous one, and the peer delays
that acknowledgement by up to 40 ms: every SMTP round trip would wait for
it. relayd writes whole replies and whole body chunks, so it never needs
Nagle to coalesce small writes for it.

Twisted's TCP transport never sends from ``write``: it buffers the bytes,
registers the socket for writing (an epoll_ctl), sends on the reactor's
next turn and unregisters it (another epoll_ctl). SMTP is a dialogue of
short replies, so that is two epoll_ctl calls and one more turn of the
loop for every reply (on loopback, about 30 % of the server's CPU time
per exchange of a command and its reply).

``SendAtOnce`` sends at once when nothing is waiting to be sent (as asyncio
does) and falls back to Twisted's buffering for what the kernel did not
take, so ordering, the producer's pause and resume, ``loseConnection``
and ``abortConnection`` stay Twisted's. An error from that first send is
not raised into the protocol: the bytes go to Twisted's buffer, and its
next send fails the same way and ends the connection as it always does.
The price: replies to a pipelined group of commands, which Twisted's
buffer sent together on its next turn, are one send each; for the usual
group (MAIL, RCPT, DATA) that is as many system calls as the buffer's one
send and two epoll_ctl, and one turn of the loop fewer.

TLS writes its records through the TCP transport beneath it, so it gets
the same path: implicit TLS (a TLS protocol over this transport) as is,
STARTTLS through ``RawWrites``, the class Twisted's ``startTLS`` is given
for the writes beneath TLS (which still gathers a turn's small writes
into one record). Listeners get it through ``tcp.Port.transport``, the
documented way to choose the class of accepted connections; connections
made get it through ``ConnectingReactor``, whose ``connectTCP`` makes
them.
"""

from __future__ import annotations

from typing import Iterable

from twisted.internet import abstract, tcp
# Twisted's STARTTLS takes the class whose methods write beneath TLS as an
# argument; the transport's public startTLS hard-codes FileDescriptor's.
from twisted.internet._newtls import startTLS
from zope.interface import directlyProvides, providedBy


def setNoDelay(transport) -> None:
    """
    TCP_NODELAY on ``transport``'s socket. TLS and PROXY-protocol wrappers
    pass the call on to the TCP transport beneath; a transport that is not
    TCP (a UNIX socket listener) has no such option and is left as it is.
    """
    setter = getattr(transport, "setTcpNoDelay", None)
    if setter is None:
        return
    try:
        setter(True)
    except OSError:
        pass  # AF_UNIX: the option does not exist there


def sendAtOnce(transport, data: bytes) -> None:
    """
    Write ``data`` on ``transport`` (a ``SendAtOnce`` connection): straight
    to the socket when nothing is queued before it, else (and for what the
    kernel did not take) into Twisted's buffer.
    """
    if (transport.waitingToWrite or transport.aborted or transport.disconnecting
            or not transport.connected or type(data) is not bytes or not data
            # A pull producer is asked for more only when the buffer drains.
            or (transport.producer is not None and not transport.streamingProducer)):
        abstract.FileDescriptor.write(transport, data)
        return
    sent = transport.writeSomeData(data)
    if isinstance(sent, Exception):
        # The connection is gone: Twisted's own send finds out on the next
        # turn of the reactor and calls connectionLost from there.
        abstract.FileDescriptor.write(transport, data)
    elif sent < len(data):
        abstract.FileDescriptor.write(transport, data[sent:])


def _joined(iovec: Iterable[bytes]) -> bytes | None:
    chunks = list(iovec)
    if all(type(chunk) is bytes for chunk in chunks):
        return b"".join(chunks)
    return None


class RawWrites(abstract.FileDescriptor):
    """
    The methods STARTTLS's TLS layer calls (unbound, on the connection) to
    write beneath TLS: FileDescriptor's, with ``sendAtOnce`` for writing.
    """

    def write(self, data: bytes) -> None:
        sendAtOnce(self, data)

    def writeSequence(self, iovec: Iterable[bytes]) -> None:
        data = _joined(iovec)
        if data is None:
            abstract.FileDescriptor.writeSequence(self, iovec)  # raises TypeError as Twisted does
        else:
            sendAtOnce(self, data)


class SendAtOnce:
    """
    Mixed into Twisted's TCP ``Server`` and ``Client``. ``waitingToWrite``
    follows the transport's registration for writing, which Twisted holds
    from the first buffered byte until its buffer is empty (or the
    connection closes): while it is set, a write joins the queue.
    """

    waitingToWrite = False
    aborted = False

    def startWriting(self) -> None:
        self.waitingToWrite = True
        super().startWriting()

    def stopWriting(self) -> None:
        self.waitingToWrite = False
        super().stopWriting()

    def abortConnection(self) -> None:
        # Twisted stops writing and drops its buffer; nothing may go out after.
        self.aborted = True
        super().abortConnection()

    def write(self, data: bytes) -> None:
        if self.TLS:  # STARTTLS: through the TLS layer, which writes with RawWrites
            super().write(data)
        else:
            sendAtOnce(self, data)

    def writeSequence(self, iovec: Iterable[bytes]) -> None:
        if self.TLS:
            super().writeSequence(iovec)
        else:
            RawWrites.writeSequence(self, iovec)

    def startTLS(self, ctx, normal: bool = True) -> None:
        startTLS(self, ctx, normal, RawWrites)


class Server(SendAtOnce, tcp.Server):
    """An accepted connection."""


class Client(SendAtOnce, tcp.Client):
    """A connection relayd makes."""


def sendAtOnceOnAccept(port) -> None:
    """Connections ``port`` accepts from now on are ``Server``s (a UNIX port is left as it is)."""
    if isinstance(port, tcp.Port):
        port.transport = Server


class Connector(tcp.Connector):
    """reactor.connectTCP's connector, making a ``Client``."""

    def _makeTransport(self) -> Client:
        # The one hook Twisted has for the class of a connection it makes
        # (tests/test_twisted_internals.py pins it).
        return Client(self.host, self.port, self.bindAddress, self, self.reactor)


class ConnectingReactor:
    """
    ``reactor`` for client endpoints (TCP4ClientEndpoint, HostnameEndpoint):
    the same object in all but ``connectTCP``, which makes ``Client``
    connections.
    """

    def __init__(self, reactor):
        self.reactor = reactor
        directlyProvides(self, providedBy(reactor))

    def __getattr__(self, name: str):
        return getattr(self.reactor, name)

    def connectTCP(self, host, port, factory, timeout=30, bindAddress=None):
        connector = Connector(host, port, factory, timeout, bindAddress, self.reactor)
        connector.connect()
        return connector
