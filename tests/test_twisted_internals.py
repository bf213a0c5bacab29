"""
Fails when the Twisted internals relayd's server relies on move.

relayd subclasses twisted.mail.smtp.ESMTP but replaces its input path and
its replies (docs/twisted-traps.rst, "1. The ESMTP server's input path"). These tests pin what is still used from
the base classes, so a Twisted upgrade that changes them is caught here
rather than on a live relay.
"""

from __future__ import annotations

import inspect

from twisted.mail import smtp
from twisted.protocols import basic, policies

from relayd import server
from relayd.server import SubmissionServer


def test_server_replaces_the_line_reader_and_reply_path():
    # The stock reader splits lines itself (the smuggling and pipelining
    # bugs); relayd's dataReceived must be the one that runs.
    assert SubmissionServer.dataReceived is not basic.LineOnlyReceiver.dataReceived
    assert SubmissionServer.dataReceived.__module__ == "relayd.server"
    for name in ("lineReceived", "lineLengthExceeded", "sendCode", "connectionMade",
                 "connectionLost", "timeoutConnection", "do_DATA", "do_MAIL", "do_RCPT",
                 "do_EHLO", "do_HELO", "do_QUIT", "do_RSET"):
        owner = next(c for c in SubmissionServer.__mro__ if name in vars(c))
        if name in ("lineReceived", "lineLengthExceeded"):
            # Unused by relayd's reader; must stay reachable only through it.
            continue
        assert owner is SubmissionServer, f"{name} comes from {owner}"


def test_base_classes_relayd_builds_on():
    assert issubclass(smtp.ESMTP, smtp.SMTP)
    assert issubclass(smtp.SMTP, basic.LineOnlyReceiver)
    assert issubclass(smtp.SMTP, policies.TimeoutMixin)
    # ESMTP() takes no required argument and sets what later TLS/AUTH work uses.
    server = smtp.ESMTP()
    assert server.challengers == {} and server.ctx is None and server.authenticated is False
    # The host property accepts bytes (relayd sets it from the config).
    server.host = b"relay.test"
    assert server.host == b"relay.test"


def test_timeout_mixin_uses_overridable_calllater():
    # relayd points callLater at the clock it is given (task.Clock in tests).
    source = inspect.getsource(policies.TimeoutMixin.setTimeout)
    assert "self.callLater" in source
    assert hasattr(policies.TimeoutMixin, "resetTimeout")


def test_write_buffers_the_session_counts_and_bounds():
    # The session's bounds (README "Submission security") are computed from these.
    from twisted.internet import abstract
    from twisted.protocols import tls

    assert abstract.FileDescriptor.bufferSize == server.SOCKET_BUFFER
    assert tls.TLSMemoryBIOFactory.protocol is tls.BufferingTLSTransport

    class Reactor:
        def addWriter(self, _):
            pass

        def removeWriter(self, _):
            pass

    class Socket(abstract.FileDescriptor):
        """A socket whose peer reads nothing: every write stays buffered."""

        def writeSomeData(self, data):
            return 0

    socket = Socket(reactor=Reactor())
    socket.connected = True
    socket.write(b"x" * 10)
    socket.write(b"y" * 5)
    socket.doWrite()  # moves what was written into the public dataBuffer
    assert server.unsentBytes(socket) == 15  # dataBuffer past offset: public attributes only


def test_reactor_records_the_signal_twistd_reraises():
    # RelayService.stopService clears it so that a stop begun by the
    # reactor's own SIGTERM handler still exits 0 (relayd/tap.py).
    from twisted.application import app
    from twisted.internet import base

    assert base.ReactorBase._exitSignal is None
    assert "self._exitSignal = number" in inspect.getsource(base.ReactorBase.sigTerm)
    assert "reactor._exitSignal" in inspect.getsource(app.ApplicationRunner.startReactor)


def test_the_hooks_relayd_tcp_chooses_its_transport_class_with():
    # relayd.tcp: accepted connections through Port.transport, made ones
    # through Connector._makeTransport, STARTTLS's raw writes through the
    # class given to _newtls.startTLS, which its bypass calls unbound.
    from twisted.internet import _newtls, abstract, base, tcp

    assert tcp.Port.transport is tcp.Server
    assert "self.transport(" in inspect.getsource(tcp.Port.doRead)
    assert "self._makeTransport()" in inspect.getsource(base.BaseConnector.connect)
    assert "_makeTransport" in vars(tcp.Connector)
    assert list(inspect.signature(_newtls.startTLS).parameters) == [
        "transport", "contextFactory", "normal", "bypass"]
    assert "self._base.write(self._connection" in inspect.getsource(_newtls._BypassTLS.write)
    # Twisted's buffer: registered for writing from the first byte until it is empty.
    assert "self.startWriting()" in inspect.getsource(abstract.FileDescriptor.write)
    assert "self.stopWriting()" in inspect.getsource(abstract.FileDescriptor.doWrite)
