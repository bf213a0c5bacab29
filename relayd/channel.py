"""
The local channel between the master process and its intake workers: AMP
commands over a socketpair the master creates for each worker (no path in
the file system, so nothing but the two processes can reach it).

Worker to master, on the intake path:
  ``Admit``       may this client address have a session (after its PROXY
                  header)? the master counts ``limits.connections`` and
                  ``connections_per_client`` over every process;
  ``Left``        a session admitted by ``Admit`` has ended;
  ``StartCheck``  may a password check for this address start now (the
                  AUTH failure throttle, with checks in flight counted)?
  ``CheckEnded``  a check started by ``StartCheck`` has ended (failed or not);
  ``Failed``      an AUTH failure that needed no check (authzid mismatch);
  ``Committing``  a message is about to be committed: if the worker dies
                  from here on, the master looks for it in the spool. With
                  the recipients' ``domains``, it also asks whether the
                  worker may make the first delivery attempt itself:
                  allowed, the master counts the slots it takes against
                  ``delivery.concurrency`` and ``destination_concurrency``
                  (and the message against ``messages_per_user_per_hour``,
                  for ``login``). Not allowed, the worker keeps the
                  message in its own line for a slot (``StartAttempt``)
                  or sends ``Queued`` once the commit is done;
  ``StartAttempt`` a message in that line asks again, when one of the
                  worker's attempts has ended: allowed, as for
                  ``Committing``; not allowed, it waits on (or is handed
                  over with ``Queued`` when the worker has no attempt left);
  ``Queued``      the message is committed: the master loads its envelope
                  from the spool and schedules it (also for the notices a
                  worker writes);
  ``AttemptEnded`` a message the worker was allowed to attempt is done
                  with: its slots are free, and it is gone from the spool
                  (delivered, or its commit failed: ``kept`` false) or
                  written back and the master's from now on (``kept``).

  ``MetricUpdates`` a batch of metric updates (relayd.metrics.UpdateBatch),
                  applied by the master to the daemon's one registry;
  ``Accepting``   the worker's listeners accept: the daemon is ready once
                  every worker has said so.

  ``RunningConfig``  the master's running configuration, as YAML, a page
                  at a time: what a worker runs with, at its start and at
                  each reload, whatever the file says by then.

Master to worker:
  ``Ping``        the heartbeat: answered by the worker's reactor thread;
  ``StallWorker`` for tests only (RELAYD_TEST_HOOKS=1): block the worker's
                  reactor thread, to show that the watchdog notices;
  ``ConfigChanged`` the master has applied a new configuration: fetch it;
  ``BlockStarted`` / ``BlockLifted``  the AUTH block list changed;
  ``RateLimited`` a login reached ``messages_per_user_per_hour`` until then.

Addresses are normalized client IP addresses; times are the master's clock
seconds (every process reads the same wall clock).

What the channel costs is mostly system calls, and above all the sends
that wake the other process (on a VM, tens of microseconds of system time
on both sides, per wake-up). So:

- a command whose responder answers at once (every responder of the
  intake path does) is answered in the same call, without the chain of
  Deferreds AMP builds for each command (most of the master's work per
  box); anything else takes AMP's own way;
- ``ChannelTransport`` sends a write at once when nothing is queued
  before it (as relayd.tcp does for TCP), instead of Twisted's register
  for writing, send on the next turn, unregister;
- the boxes a side writes during one turn of its reactor (the answers
  to several commands, the questions of several sessions) go out
  together at the end of the turn, in one send (as Twisted's buffer
  sends them, without registering for writing and unregistering);
- a worker lets the one-way notices that only give back what the master
  counted, or hand it a message (``WAITING_NOTICES``), wait up to
  ``NOTICE_WAIT`` (and at most ``NOTICE_WAIT_LIMIT`` of them): they go with
  the next box that must go at once (an ``Admit``, a ``Committing``, an
  answer), in the same send, or when the delay is up. The order of boxes
  on the wire is always the order they were written in; a notice is only
  late. A late ``Left`` or ``AttemptEnded`` makes the master count a
  session or a slot a few milliseconds longer: its limits are stricter
  for that time, never looser. A late ``Queued`` schedules the message a
  few milliseconds later. A worker that dies with notices waiting is as
  one that died a few milliseconds earlier: the master releases its
  sessions and slots and takes over its messages as always.
"""

from __future__ import annotations

import keyword
import socket
import struct

from twisted.internet import address, defer, posixbase, unix
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

from relayd.tcp import SendAtOnce

log = Logger()


def _pythonName(wireName: bytes) -> str:
    """The keyword AMP gives an argument named ``wireName`` on the wire."""
    name = wireName.replace(b"-", b"_").decode("ascii")
    return name.title() if keyword.iskeyword(name) else name


class _Table:
    """A command's arguments or answer: (wire name, keyword, Argument) each."""

    def __init__(self, arglist) -> None:
        self.entries = [(wire, _pythonName(wire), argument) for wire, argument in arglist]
        self.names = frozenset(name for _, name, _ in self.entries)
        self.required = [name for _, name, argument in self.entries if not argument.optional]
        # Arguments that convert themselves from and to a whole box (not
        # only their own value, as every type relayd uses does) are left to AMP.
        self.plain = all(type(argument).fromBox is amp.Argument.fromBox
                         and type(argument).toBox is amp.Argument.toBox
                         for _, _, argument in self.entries)

    def toBox(self, objects: dict, box, proto):
        for wire, name, argument in self.entries:
            value = objects.get(name) if argument.optional else objects[name]
            if value is not None or not argument.optional:
                box[wire] = argument.toStringProto(value, proto)
        return box

    def fromBox(self, box, proto) -> dict:
        objects = {}
        for wire, name, argument in self.entries:
            value = box.get(wire)
            if value is None:
                if not argument.optional:
                    raise KeyError(wire)
                objects[name] = None
            else:
                objects[name] = argument.fromStringProto(value, proto)
        return objects


class Lean(amp.Command):
    """
    An AMP command, converted as AMP converts it, with each argument's
    keyword worked out once per command instead of in every box (which was
    most of the cost of converting the boxes of the intake path).
    """

    _tables: dict = {}

    @classmethod
    def _table(cls, which: str) -> _Table | None:
        key = (cls, which)
        table = Lean._tables.get(key)
        if table is None:
            table = Lean._tables[key] = _Table(getattr(cls, which))
        return table if table.plain else None

    def __init__(self, **kw) -> None:
        table = self._table("arguments")
        if table is None:
            super().__init__(**kw)
            return
        self.structured = kw
        forgotten = [name for name in table.required if name not in kw]
        if forgotten:
            raise amp.InvalidSignature(
                "forgot {} for {}".format(", ".join(forgotten), self.commandName))

    @classmethod
    def responder(cls, methodfunc):
        """AMP's decorator; the method is also marked as this command's, for Quiet."""
        methodfunc.leanCommand = cls
        return super().responder(methodfunc)

    @classmethod
    def makeArguments(cls, objects, proto):
        table = cls._table("arguments")
        if table is None:
            return super().makeArguments(objects, proto)
        for name in objects:
            if name not in table.names:
                raise amp.InvalidSignature(f"{name} is not a valid argument")
        return table.toBox(objects, cls.commandType(), proto)

    @classmethod
    def parseArguments(cls, box, protocol):
        table = cls._table("arguments")
        if table is None:
            return super().parseArguments(box, protocol)
        return table.fromBox(box, protocol)

    @classmethod
    def makeResponse(cls, objects, proto):
        table = cls._table("response")
        if table is None:
            return super().makeResponse(objects, proto)
        return table.toBox(objects, cls.responseType(), proto)

    @classmethod
    def parseResponse(cls, box, protocol):
        table = cls._table("response")
        if table is None:
            return super().parseResponse(box, protocol)
        return table.fromBox(box, protocol)


# Admit's answers: admitted, or which limit refused the session.
ADMITTED = ""
REFUSED_CONNECTIONS = "connections"
REFUSED_PER_CLIENT = "connections_per_client"


class Admit(Lean):
    commandName = b"admit"
    arguments = [(b"address", amp.Unicode())]
    response = [(b"refusal", amp.Unicode())]


class Left(Lean):
    commandName = b"left"
    arguments = [(b"address", amp.Unicode())]
    requiresAnswer = False


class StartCheck(Lean):
    commandName = b"start-check"
    arguments = [(b"address", amp.Unicode())]
    response = [(b"allowed", amp.Boolean())]


class CheckEnded(Lean):
    """The answer: when the block this failure started ends (absent: no new block)."""

    commandName = b"check-ended"
    arguments = [(b"address", amp.Unicode()), (b"failed", amp.Boolean())]
    response = [(b"blockedUntil", amp.Float(optional=True))]


class Failed(Lean):
    commandName = b"failed"
    arguments = [(b"address", amp.Unicode())]
    response = [(b"blockedUntil", amp.Float(optional=True))]


class Committing(Lean):
    commandName = b"committing"
    arguments = [(b"queueId", amp.Unicode()), (b"login", amp.Unicode(optional=True)),
                 (b"domains", amp.ListOf(amp.Unicode(), optional=True))]
    response = [(b"allowed", amp.Boolean(optional=True))]


# The most bytes of recipient domains a Committing carries (within one
# AMP value); a message with more is handed to the master after its commit.
DOMAINS_BYTES = 60_000
assert DOMAINS_BYTES < amp.MAX_VALUE_LENGTH


class Queued(Lean):
    commandName = b"queued"
    arguments = [(b"queueId", amp.Unicode()), (b"login", amp.Unicode(optional=True))]
    requiresAnswer = False


class StartAttempt(Lean):
    commandName = b"start-attempt"
    arguments = [(b"queueId", amp.Unicode()), (b"domains", amp.ListOf(amp.Unicode()))]
    response = [(b"allowed", amp.Boolean())]


class AttemptEnded(Lean):
    commandName = b"attempt-ended"
    arguments = [(b"queueId", amp.Unicode()), (b"kept", amp.Boolean())]
    requiresAnswer = False


class MetricUpdates(Lean):
    """relayd.metrics updates (metric, label values, amount), one batch (bounded by UpdateBatch)."""

    commandName = b"metric-updates"
    arguments = [(b"updates", amp.AmpList([(b"name", amp.Unicode()),
                                           (b"labels", amp.ListOf(amp.Unicode())),
                                           (b"amount", amp.Float())]))]
    response = []


class Accepting(Lean):
    commandName = b"accepting"
    arguments = []
    requiresAnswer = False


# Characters per RunningConfig page: at most 4 bytes of UTF-8 each, within one AMP value.
CONFIG_PAGE = 16_000
assert CONFIG_PAGE * 4 < amp.MAX_VALUE_LENGTH


class RunningConfig(Lean):
    commandName = b"running-config"
    arguments = [(b"offset", amp.Integer())]
    response = [(b"text", amp.Unicode()), (b"total", amp.Integer()), (b"path", amp.Unicode())]


class Ping(Lean):
    commandName = b"ping"
    arguments = []
    response = [(b"sessions", amp.Integer())]


class StallWorker(Lean):
    """For tests only: the worker's reactor thread sleeps ``seconds`` (refused unless enabled)."""

    commandName = b"test-stall"
    arguments = [(b"seconds", amp.Float())]
    response = []
    errors = {ValueError: b"NOT_ENABLED"}


class ConfigChanged(Lean):
    commandName = b"config-changed"
    arguments = []
    response = []


class BlockStarted(Lean):
    commandName = b"blocked"
    arguments = [(b"address", amp.Unicode()), (b"until", amp.Float())]
    requiresAnswer = False


class BlockLifted(Lean):
    commandName = b"unblocked"
    arguments = [(b"address", amp.Unicode())]
    requiresAnswer = False


class RateLimited(Lean):
    commandName = b"rate-limited"
    arguments = [(b"login", amp.Unicode()), (b"until", amp.Float())]
    requiresAnswer = False


# AMP's length prefix of a key or value.
_LENGTH = struct.Struct("!H")

# How long a worker's one-way notice may wait for the next box that goes at
# once, and how many may wait.
NOTICE_WAIT = 0.005
NOTICE_WAIT_LIMIT = 64

# The notices that may wait (relayd.worker's): each gives back a session or
# slots, or hands over a committed message. A ``Queued`` that counts a
# login (``messages_per_user_per_hour``) goes at once.
WAITING_NOTICES = frozenset({Left.commandName, AttemptEnded.commandName, Queued.commandName})


def mayWait(box) -> bool:
    """Whether ``box`` (as AMP sends it) is a notice that may wait (WAITING_NOTICES)."""
    name = box.get(amp.COMMAND)
    if name not in WAITING_NOTICES or amp.ASK in box:
        return False
    return name != Queued.commandName or b"login" not in box


_respondersByClass: dict = {}


def _responders(protocolClass) -> dict:
    """A protocol class's Lean responders: command name -> (command, function), looked up once."""
    table = _respondersByClass.get(protocolClass)
    if table is None:
        table = {}
        for klass in reversed(protocolClass.__mro__):
            for function in vars(klass).values():
                command = getattr(function, "leanCommand", None)
                if command is not None and command._table("response") is not None:
                    table[command.commandName] = (command, function)
        _respondersByClass[protocolClass] = table
    return table


class Quiet(amp.AMP):
    """
    AMP without its log lines for every connection made and lost, and
    with the channel's way of writing (the module's docstring). With a
    ``clock`` (the reactor), the boxes written during one turn of the
    reactor go out together at its end, in one send; with ``noticeDelay``
    too, notices that may wait do. Without one, each box goes at once.
    """

    noticeDelay = 0.0
    noticeLimit = NOTICE_WAIT_LIMIT
    clock = None

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._unsent: list[bytes] = []  # serialized boxes, in the order written
        self._turnEnd = None  # the call at the end of this turn that sends them
        self._noticeTimer = None  # the call that sends waiting notices
        self._partial = b""  # the start of a box not yet whole
        self._tooLong = False  # a key over AMP's limit came: the rest is not read

    def makeConnection(self, transport) -> None:
        amp.BinaryBoxProtocol.makeConnection(self, transport)

    def ampBoxReceived(self, box) -> None:
        """
        AMP's dispatch of a box, with a shorter way for a Lean command: its
        responder is called and its answer sent in this call, without the
        chain of Deferreds AMP builds for each command (the responder's
        result, its conversion, the answer's key, its sending), which
        costs more than the channel's responders themselves. The boxes
        sent, answers and errors, are those AMP sends; a box that is not a
        Lean command, or whose arguments do not convert, takes AMP's way.
        """
        name = box.get(amp.COMMAND)
        entry = None if name is None or amp.ANSWER in box or amp.ERROR in box else (
            _responders(type(self)).get(name))
        if entry is None:
            super().ampBoxReceived(box)
            return
        command, responder = entry
        try:
            arguments = command.parseArguments(box, self)
        except Exception:
            super().ampBoxReceived(box)  # AMP's parsing fails again, and is answered as AMP does
            return
        try:
            objects = responder(self, **arguments)
        except Exception:
            self._failed(box, command, Failure())
            return
        if type(objects) is dict:
            self._answer(box, command, objects)
            return
        d = objects if isinstance(objects, defer.Deferred) else defer.succeed(objects)
        d.addCallbacks(lambda result: self._answer(box, command, result),
                       lambda failure: self._failed(box, command, failure))

    def _answer(self, box, command, objects) -> None:
        """Send the answer to ``box``, when it asks for one."""
        try:
            answer = command.makeResponse(objects, self)
        except Exception:
            self._failed(box, command, Failure())  # AMP's BadLocalReturn
            return
        ask = box.get(amp.ASK)
        if ask is not None:
            answer[amp.ANSWER] = ask
            self._send(answer)

    def _failed(self, box, command, failure: Failure) -> None:
        """A responder failed: AMP's error box (or its end of the connection), as AMP sends it."""
        known = failure.check(*command.allErrors)
        ask = box.get(amp.ASK)
        if ask is None:
            if known:
                failure = Failure(amp.RemoteAmpError(command.allErrors[known], str(failure.value),
                                                     known in command.fatalErrors, local=failure))
            self.unhandledError(failure)
            return
        if known:
            code = command.allErrors[known]
            description = str(failure.value).encode("utf-8", "replace")
            error = amp.QuitBox() if known in command.fatalErrors else amp.AmpBox()
        else:
            log.failure("while receiving response to command", failure)
            code, description, error = amp.UNKNOWN_ERROR_CODE, b"Unknown Error", amp.QuitBox()
        error[amp.ERROR] = ask
        error[amp.ERROR_DESCRIPTION] = description
        error[amp.ERROR_CODE] = code
        self._send(error)
        if isinstance(error, amp.QuitBox) and self.transport is not None:
            self.transport.loseConnection()

    def _send(self, box) -> None:
        try:
            self.sendBox(box)
        except (amp.ProtocolSwitched, amp.ConnectionLost):
            pass

    def sendBox(self, box) -> None:
        # (The channel never switches protocols nor starts TLS, which
        # BinaryBoxProtocol.sendBox also looks after.)
        if self.transport is None:
            raise amp.ConnectionLost()
        self._unsent.append(box.serialize())
        if self.clock is None:
            self.flush()
        elif self.noticeDelay and mayWait(box) and len(self._unsent) < self.noticeLimit:
            if self._noticeTimer is None and self._turnEnd is None:
                self._noticeTimer = self.clock.callLater(self.noticeDelay, self.flush)
        elif self._turnEnd is None:
            # A call due now runs once the reactor has handled this turn's events.
            self._turnEnd = self.clock.callLater(0, self.flush)

    def flush(self) -> None:
        """Write every box not yet written, in one write."""
        for call in (self._turnEnd, self._noticeTimer):
            if call is not None and call.active():
                call.cancel()
        self._turnEnd = self._noticeTimer = None
        unsent, self._unsent = self._unsent, []
        if unsent and self.transport is not None:
            self.transport.write(unsent[0] if len(unsent) == 1 else b"".join(unsent))

    def dataReceived(self, data: bytes) -> None:
        """
        AMP's parsing, read straight off the buffer (AMP's own parser
        handles each key and value as a string received, by a state machine
        of method calls, which cost more than the boxes' handling): each
        whole box to ``ampBoxReceived``; a partial one waits for the rest.
        """
        if self._tooLong:
            return
        buffer = self._partial + data if self._partial else data
        end = len(buffer)
        done = 0
        unpack = _LENGTH.unpack_from
        while True:
            box = amp.AmpBox()
            at = done
            while at + 2 <= end:
                (keyLength,) = unpack(buffer, at)
                if keyLength == 0:
                    at += 2
                    break
                if keyLength > amp.MAX_KEY_LENGTH:
                    self._tooLong = True
                    self._partial = b""
                    self.lengthLimitExceeded(keyLength)  # disconnects, with TooLong
                    return
                keyEnd = at + 2 + keyLength
                if keyEnd + 2 > end:
                    at = end + 1
                    break
                (valueLength,) = unpack(buffer, keyEnd)
                valueEnd = keyEnd + 2 + valueLength
                if valueEnd > end:
                    at = end + 1
                    break
                box[buffer[at + 2:keyEnd]] = buffer[keyEnd + 2:valueEnd]
                at = valueEnd
            else:
                at = end + 1
            if at > end:  # not whole yet
                self._partial = buffer[done:]
                return
            done = at
            self.boxReceiver.ampBoxReceived(box)
            if done == end:
                self._partial = b""
                return

    def connectionLost(self, reason) -> None:
        amp.BinaryBoxProtocol.connectionLost(self, reason)
        for call in (self._turnEnd, self._noticeTimer):
            if call is not None and call.active():
                call.cancel()
        self._turnEnd = self._noticeTimer = None
        self._unsent = []
        self.transport = None


class ChannelTransport(SendAtOnce, unix.Server):
    """
    A channel's end: Twisted's UNIX connection (descriptors can still be
    passed: while one waits to be sent, Twisted's buffer holds every write
    behind it), sending a write at once when nothing waits before it.
    """


def adopt(reactor, fd: int, factory):
    """
    ``reactor.adoptStreamConnection(fd, AF_UNIX, factory)`` for a channel's
    end (a connected socket; ``fd`` is duplicated, and stays the caller's
    to close), as a ChannelTransport; on a reactor that is not a real one
    (a test's), as is.
    """
    if not isinstance(reactor, posixbase.PosixReactorBase):
        return reactor.adoptStreamConnection(fd, socket.AF_UNIX, factory)
    sock = socket.fromfd(fd, socket.AF_UNIX, socket.SOCK_STREAM)
    proto = factory.buildProtocol(address.UNIXAddress(sock.getsockname()))
    transport = ChannelTransport(sock, proto, sock.getpeername(), None, 0, reactor)
    transport.repstr = transport.logstr = f"<{type(proto).__name__} channel>"
    proto.makeConnection(transport)
    return transport
