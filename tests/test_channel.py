"""
relayd.channel's way of writing between the master and its workers: a
worker's notices that only give back what the master counted wait briefly
for the next box that must go and go in the same send, in the order
written; the boxes written during one turn of the reactor go in one send
at its end; the channel's transport sends at once and still passes
descriptors; boxes are read as AMP reads them; the commands convert as
AMP converts them.

The master's side (relayd.master.WorkerLink) and the worker's
(relayd.worker.MasterLink) talk through AMP's real encoding over
StringTransports that count writes (a write to a sleeping peer wakes it),
with a Clock (``advance(0)``: the end of a turn of the reactor); the
transport runs on a real socketpair.
"""

from __future__ import annotations

import os
import select
import socket

import pytest
from twisted.internet import defer, task
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols import amp
from twisted.python.failure import Failure

from relayd import channel, server
from relayd.master import LimitsOwner, Worker, WorkerLink, WorkerPool
from relayd.worker import MasterLink
from tests.test_processes import FakeScheduler, FakeSpool
from tests.test_server_security import Harness as SecurityHarness


class Writes(StringTransport):
    """A StringTransport that keeps each write apart (one write: one send on the socket)."""

    def __init__(self):
        super().__init__()
        self.writes: list[bytes] = []

    def write(self, data):
        self.writes.append(data)
        super().write(data)


def boxes(data: bytes) -> list[dict]:
    return [dict(box) for box in amp.parseString(data)]


def names(data: bytes) -> list[bytes]:
    return [box.get(b"_command", b"answer") for box in boxes(data)]


def workerSide(clock=None):
    clock = clock or task.Clock()
    link = MasterLink(clock, lost=lambda: None, parse=None)
    transport = Writes()
    link.makeConnection(transport)
    return link, transport, clock


class Wire:
    """A worker's MasterLink and the master's WorkerLink; ``pump`` turns the reactor and delivers."""

    def __init__(self, tmp_path, limits=", connections_per_client: 1"):
        self.clock = task.Clock()
        cfg = SecurityHarness(tmp_path, limits=limits).config
        self.owner = LimitsOwner(cfg, self.clock, server._throttleSettings)
        self.pool = WorkerPool(1, None, self.clock, [], lambda: None, self.owner,
                               FakeScheduler(), FakeSpool(), defer.maybeDeferred)
        self.worker = Worker(1, 0.0)
        self.master = WorkerLink(self.pool, self.worker)
        self.master.clock = self.clock  # as WorkerPool.spawn sets it
        self.masterTransport = Writes()
        self.master.makeConnection(self.masterTransport)
        self.link, self.linkTransport, _ = workerSide(self.clock)

    def pump(self):
        moved = True
        while moved:
            moved = False
            self.clock.advance(0)  # the end of the turn: what was written goes
            for source, sink in ((self.linkTransport, self.master),
                                 (self.masterTransport, self.link)):
                data = source.value()
                if data:
                    source.clear()
                    sink.dataReceived(data)
                    moved = True


def test_a_question_goes_at_the_end_of_the_turn_with_the_turns_other_boxes():
    link, transport, clock = workerSide()
    link.callRemote(channel.Admit, address="192.0.2.1")
    link.callRemote(channel.Committing, queueId="4F2A9C31B7")
    assert transport.writes == []
    clock.advance(0)
    assert len(transport.writes) == 1
    assert names(transport.writes[0]) == [b"admit", b"committing"]
    assert clock.getDelayedCalls() == []


def test_a_notice_that_may_wait_goes_out_after_the_delay():
    link, transport, clock = workerSide()
    link.callRemote(channel.Left, address="192.0.2.1")
    clock.advance(0)
    assert transport.writes == []
    clock.advance(channel.NOTICE_WAIT / 2)
    link.callRemote(channel.AttemptEnded, queueId="4F2A9C31B7", kept=False)
    assert transport.writes == []
    # The delay counts from the first notice that waits.
    clock.advance(channel.NOTICE_WAIT / 2)
    assert len(transport.writes) == 1
    assert names(transport.writes[0]) == [b"left", b"attempt-ended"]
    assert clock.getDelayedCalls() == []


def test_waiting_notices_go_with_the_next_question_in_one_send_in_the_order_written():
    link, transport, clock = workerSide()
    link.callRemote(channel.Left, address="192.0.2.1")
    link.callRemote(channel.Queued, queueId="4F2A9C31B7")
    clock.advance(channel.NOTICE_WAIT / 2)
    link.callRemote(channel.Admit, address="192.0.2.2")
    link.callRemote(channel.AttemptEnded, queueId="4F2A9C31B8", kept=True)
    clock.advance(0)
    assert len(transport.writes) == 1
    assert names(transport.writes[0]) == [b"left", b"queued", b"admit", b"attempt-ended"]
    # Nothing left to go when the delay is up.
    assert clock.getDelayedCalls() == []
    clock.advance(1)
    assert len(transport.writes) == 1


@pytest.mark.parametrize("command, arguments, waits", [
    (channel.Left, {"address": "192.0.2.1"}, True),
    (channel.AttemptEnded, {"queueId": "4F2A9C31B7", "kept": True}, True),
    (channel.Queued, {"queueId": "4F2A9C31B7"}, True),
    # Counts against messages_per_user_per_hour: a late one would count too late.
    (channel.Queued, {"queueId": "4F2A9C31B7", "login": "alice"}, False),
    (channel.Accepting, {}, False),
    (channel.Admit, {"address": "192.0.2.1"}, False),
    (channel.StartCheck, {"address": "192.0.2.1"}, False),
    (channel.CheckEnded, {"address": "192.0.2.1", "failed": True}, False),
    (channel.Failed, {"address": "192.0.2.1"}, False),
    (channel.Committing, {"queueId": "4F2A9C31B7", "domains": ["example.org"]}, False),
    (channel.StartAttempt, {"queueId": "4F2A9C31B7", "domains": ["example.org"]}, False),
])
def test_which_of_a_workers_boxes_wait(command, arguments, waits):
    link, transport, clock = workerSide()
    link.callRemote(command, **arguments)
    clock.advance(0)
    assert (transport.writes == []) is waits


def test_the_master_sends_its_notices_at_the_end_of_the_turn(tmp_path):
    wire = Wire(tmp_path)
    wire.master.callRemote(channel.BlockStarted, address="192.0.2.1", until=5.0)
    wire.clock.advance(0)
    assert names(wire.masterTransport.value()) == [b"blocked"]


def test_without_a_clock_each_box_goes_at_once():
    proto = channel.Quiet()
    transport = Writes()
    proto.makeConnection(transport)
    proto.callRemote(channel.Left, address="192.0.2.1")
    proto.callRemote(channel.Admit, address="192.0.2.1")
    assert [names(w) for w in transport.writes] == [[b"left"], [b"admit"]]


def test_no_more_than_the_limit_of_notices_wait():
    link, transport, clock = workerSide()
    for n in range(channel.NOTICE_WAIT_LIMIT - 1):
        link.callRemote(channel.Left, address=f"192.0.2.{n % 250}")
    clock.advance(0)
    assert transport.writes == []
    link.callRemote(channel.Left, address="192.0.2.251")
    clock.advance(0)
    assert len(transport.writes) == 1
    assert len(boxes(transport.writes[0])) == channel.NOTICE_WAIT_LIMIT


def test_the_answers_to_one_turn_go_in_one_send(tmp_path):
    wire = Wire(tmp_path, limits="")
    wire.link.callRemote(channel.Admit, address="192.0.2.1")
    wire.link.callRemote(channel.Admit, address="192.0.2.2")
    wire.link.callRemote(channel.Committing, queueId="4F2A9C31B7")
    wire.clock.advance(0)
    assert len(wire.linkTransport.writes) == 1
    wire.master.dataReceived(wire.linkTransport.value())
    assert wire.masterTransport.writes == []
    wire.clock.advance(0)
    assert len(wire.masterTransport.writes) == 1
    assert len(boxes(wire.masterTransport.writes[0])) == 3


def test_a_workers_next_admit_carries_its_waiting_left_before_it(tmp_path):
    """connections_per_client 1: this worker's next session from the address is admitted as before."""
    wire = Wire(tmp_path)
    answers = []
    wire.link.callRemote(channel.Admit, address="192.0.2.1").addCallback(answers.append)
    wire.pump()
    wire.link.callRemote(channel.Left, address="192.0.2.1")
    wire.pump()
    # Another process's session from the address meanwhile: still counted, refused.
    assert wire.owner.sessions.admit(object(), "192.0.2.1") == "connections_per_client"
    wire.link.callRemote(channel.Admit, address="192.0.2.1").addCallback(answers.append)
    wire.pump()
    assert [a["refusal"] for a in answers] == ["", ""]


def test_a_late_left_arrives_within_the_delay(tmp_path):
    wire = Wire(tmp_path)
    wire.link.callRemote(channel.Admit, address="192.0.2.1")
    wire.pump()
    wire.link.callRemote(channel.Left, address="192.0.2.1")
    wire.pump()
    assert wire.owner.sessions.admit(object(), "192.0.2.1") == "connections_per_client"
    wire.clock.advance(channel.NOTICE_WAIT)
    wire.pump()
    assert wire.owner.sessions.admit(object(), "192.0.2.1") == ""


def test_waiting_notices_go_before_the_process_ends_and_not_after_the_connection():
    link, transport, clock = workerSide()
    link.callRemote(channel.AttemptEnded, queueId="4F2A9C31B7", kept=True)
    link.flush()
    assert names(transport.value()) == [b"attempt-ended"]
    link.callRemote(channel.Left, address="192.0.2.1")
    link.callRemote(channel.Admit, address="192.0.2.1").addErrback(lambda f: None)
    link.connectionLost(Failure(ConnectionError()))
    assert clock.getDelayedCalls() == []
    link.flush()
    assert len(transport.writes) == 1


def test_a_worker_answers_the_heartbeat_and_takes_waiting_notices_along():
    link, transport, clock = workerSide()
    link.callRemote(channel.Left, address="192.0.2.1")
    ping = channel.Ping.makeArguments({}, None)
    ping[b"_command"], ping[b"_ask"] = channel.Ping.commandName, b"1"
    link.dataReceived(ping.serialize())
    clock.advance(0)
    assert len(transport.writes) == 1
    assert names(transport.writes[0]) == [b"left", b"answer"]


# The channel's transport, on a real socketpair

class Recorder(amp.AMP):
    pass


def channelPair():
    reactor = MemoryReactorClock()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.setblocking(False)
    proto = channel.Quiet()
    transport = channel.ChannelTransport(ours, proto, None, None, 0, reactor)
    proto.makeConnection(transport)
    return reactor, transport, proto, theirs


def test_the_channel_sends_a_box_during_the_write_without_registering_for_writing():
    reactor, transport, proto, peer = channelPair()
    proto.callRemote(channel.Accepting)
    assert transport not in reactor.getWriters()
    assert names(peer.recv(65536)) == [b"accepting"]


def test_a_descriptor_is_still_passed_in_order_with_the_bytes():
    reactor, transport, proto, peer = channelPair()
    readEnd, writeEnd = os.pipe()
    try:
        transport.sendFileDescriptor(readEnd)
        proto.callRemote(channel.Accepting)
        # Waits behind the descriptor, in Twisted's buffer, for the next turn.
        assert transport in reactor.getWriters()
        assert select.select([peer], [], [], 0)[0] == []
        transport.doWrite()
        transport.doWrite()
        # The descriptor comes with the box's first byte.
        first, fds, _, _ = socket.recv_fds(peer, 65536, 4)
        assert len(fds) == 1
        assert names(first + peer.recv(65536)) == [b"accepting"]
        os.write(writeEnd, b"x")
        assert os.read(fds[0], 1) == b"x"
        os.close(fds[0])
        assert transport not in reactor.getWriters()
        # Nothing waits now: the next box goes at once again.
        proto.callRemote(channel.Accepting)
        assert names(peer.recv(65536)) == [b"accepting"]
    finally:
        os.close(readEnd)
        os.close(writeEnd)


def test_adopt_makes_a_channel_transport_on_a_real_reactor():
    from twisted.internet import reactor as globalReactor
    from twisted.internet.protocol import Factory

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.setblocking(False)
    factory = Factory.forProtocol(channel.Quiet)
    transport = channel.adopt(globalReactor, ours.fileno(), factory)
    try:
        assert isinstance(transport, channel.ChannelTransport)
        transport.protocol.callRemote(channel.Accepting)
        assert names(theirs.recv(65536)) == [b"accepting"]
    finally:
        transport.stopReading()
        transport.socket.close()
        ours.close()
        theirs.close()


# The commands' conversions: Lean converts as AMP's Command does

def _stock(command, method):
    return getattr(amp.Command, method).__func__.__get__(command)


SAMPLES = [
    (channel.Admit, {"address": "192.0.2.1"}, {"refusal": "connections_per_client"}),
    (channel.Left, {"address": "2001:db8::1"}, {}),
    (channel.CheckEnded, {"address": "192.0.2.1", "failed": True}, {"blockedUntil": 1.8e9}),
    (channel.CheckEnded, {"address": "192.0.2.1", "failed": False}, {}),
    (channel.Committing, {"queueId": "4F2A9C31B7", "login": "älice",
                          "domains": ["example.org", "bücher.example"]}, {"allowed": True}),
    (channel.Committing, {"queueId": "4F2A9C31B7"}, {}),
    (channel.Queued, {"queueId": "4F2A9C31B7", "login": None}, {}),
    (channel.AttemptEnded, {"queueId": "4F2A9C31B7", "kept": False}, {}),
    (channel.MetricUpdates, {"updates": [{"name": "relayd_auth_total", "labels": ["failure"],
                                          "amount": 1.0}]}, {}),
    (channel.RunningConfig, {"offset": 16000}, {"text": "hostname: x\n", "total": 12,
                                                "path": "/etc/relayd/relayd.yaml"}),
    (channel.Ping, {}, {"sessions": 3}),
]


@pytest.mark.parametrize("command, arguments, answer", SAMPLES)
def test_lean_commands_convert_as_amp_does(command, arguments, answer):
    assert issubclass(command, channel.Lean)
    box = command.makeArguments(arguments, None)
    stock = _stock(command, "makeArguments")(arguments, None)
    assert type(box) is type(stock) and dict(box) == dict(stock)
    assert command.parseArguments(box, None) == _stock(command, "parseArguments")(box, None)
    answerBox = command.makeResponse(answer, None)
    assert dict(answerBox) == dict(_stock(command, "makeResponse")(answer, None))
    answerBox[b"_answer"] = b"7"
    assert command.parseResponse(answerBox, None) == _stock(command, "parseResponse")(
        answerBox, None)


def test_lean_commands_refuse_what_amp_refuses():
    with pytest.raises(amp.InvalidSignature, match="forgot queueId for b'committing'"):
        channel.Committing(login="alice")
    with pytest.raises(amp.InvalidSignature, match="queue is not a valid argument"):
        channel.Committing.makeArguments({"queue": "4F2A9C31B7", "queueId": "X"}, None)
    with pytest.raises(KeyError):
        channel.Admit.parseArguments(amp.AmpBox(), None)
    with pytest.raises(KeyError):
        channel.Admit.makeResponse({}, None)


def test_an_argument_that_converts_itself_is_left_to_amp():
    class Custom(amp.Unicode):
        def fromBox(self, name, strings, objects, proto):
            objects["custom"] = "from the box itself"

    class WithCustom(channel.Lean):
        commandName = b"with-custom"
        arguments = [(b"custom", Custom()), (b"note", amp.Unicode())]

    assert WithCustom._table("arguments") is None
    box = WithCustom.makeArguments({"custom": "x", "note": "y"}, None)
    assert WithCustom.parseArguments(box, None) == {"custom": "from the box itself", "note": "y"}


# Reading: AMP's boxes off the buffer

class Collect(channel.Quiet):
    def __init__(self):
        super().__init__()
        self.received = []

    def ampBoxReceived(self, box):
        self.received.append(dict(box))


def _wire():
    first = channel.Committing.makeArguments(
        {"queueId": "4F2A9C31B7", "domains": ["example.org"]}, None)
    first[b"_command"], first[b"_ask"] = b"committing", b"1"
    second = amp.AmpBox({b"_answer": b"2", b"refusal": b""})
    third = amp.AmpBox({b"_command": b"left", b"address": "é".encode() * 30000})
    return [dict(first), dict(second), dict(third)], b"".join(
        box.serialize() for box in (first, second, third))


@pytest.mark.parametrize("piece", [1, 2, 3, 7, 1000, 1 << 20])
def test_boxes_are_read_whole_however_the_bytes_arrive(piece):
    expected, wire = _wire()
    proto = Collect()
    proto.makeConnection(StringTransport())
    for at in range(0, len(wire), piece):
        proto.dataReceived(wire[at:at + piece])
    assert proto.received == expected
    # As AMP's own parser reads them.
    assert [dict(box) for box in amp.parseString(wire)] == expected


def test_a_key_over_amps_limit_ends_the_channel_with_too_long():
    proto = channel.Quiet()
    transport = StringTransport()
    proto.makeConnection(transport)
    asked = proto.callRemote(channel.Ping)
    failures = []
    asked.addErrback(failures.append)
    proto.dataReceived(b"\x01\x00" + b"k" * 256)
    assert transport.disconnecting
    proto.dataReceived(b"\x00\x01k\x00\x01v\x00\x00")  # nothing more is read
    proto.connectionLost(Failure(ConnectionError()))
    assert failures and failures[0].check(amp.TooLong)


# Answering: a responder that answers at once, without AMP's chain of Deferreds

class Responders(channel.Quiet):
    """The channel's responders, in each way a responder can answer."""

    def __init__(self):
        super().__init__()
        self.later = None
        self.gone = []

    @channel.Admit.responder
    def admit(self, address):
        if address == "raises":
            raise RuntimeError("a bug")
        if address == "later":
            self.later = defer.Deferred()
            return self.later
        if address == "unconvertible":
            return {"refusal": 5}
        if address == "fails later":
            return defer.fail(RuntimeError("a bug, later"))
        if address == "refused later":
            return defer.fail(ValueError("a known error, later"))
        return {"refusal": address.upper()}

    @channel.StallWorker.responder
    def stall(self, seconds):
        if seconds == 2.0:
            return defer.fail(ValueError("not enabled, later"))
        raise ValueError("test hooks are not enabled")

    @channel.Left.responder
    def left(self, address):
        if address == "raises":
            raise RuntimeError("a bug in a notice")
        self.gone.append(address)
        return {}


class StockResponders(Responders):
    """The same, dispatched by AMP's own code."""

    ampBoxReceived = amp.AMP.ampBoxReceived


def _asked(command, ask=b"7", **arguments):
    box = command.makeArguments(arguments, None)
    box[b"_command"] = command.commandName
    if ask is not None:
        box[b"_ask"] = ask
    return box.serialize()


def _answered(protoClass, data):
    proto = protoClass()
    transport = StringTransport()
    proto.makeConnection(transport)
    proto.dataReceived(data)
    if proto.later is not None:
        proto.later.callback({"refusal": "LATE"})
    return transport.value(), transport.disconnecting, proto.gone


@pytest.mark.parametrize("data", [
    _asked(channel.Admit, address="192.0.2.1"),
    _asked(channel.Admit, address="later"),
    _asked(channel.Admit, address="raises"),
    _asked(channel.Admit, address="unconvertible"),
    _asked(channel.StallWorker, seconds=1.0),
    _asked(channel.StallWorker, seconds=2.0),
    _asked(channel.Admit, address="fails later"),
    _asked(channel.Admit, address="refused later"),
    _asked(channel.Left, ask=None, address="raises"),
    _asked(channel.Left, ask=None, address="192.0.2.1"),
    _asked(channel.Admit, address="192.0.2.1") + _asked(channel.Left, ask=None, address="x")
    + _asked(channel.Admit, ask=b"8", address="192.0.2.2"),
    b"\x00\x08_command\x00\x05admit\x00\x04_ask\x00\x019\x00\x00",  # no address
    _asked(channel.Ping),  # no responder here
])
def test_every_command_is_answered_as_amp_answers_it(data):
    assert _answered(Responders, data) == _answered(StockResponders, data)


def test_an_answer_at_once_takes_no_deferred(monkeypatch):
    made = []
    original = defer.maybeDeferred

    def maybeDeferred(*args, **kwargs):
        made.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(amp, "maybeDeferred", maybeDeferred)
    monkeypatch.setattr(defer, "maybeDeferred", maybeDeferred)
    answer, _, gone = _answered(Responders, _asked(channel.Admit, address="192.0.2.1")
                                + _asked(channel.Left, ask=None, address="192.0.2.1"))
    assert boxes(answer) == [{b"_answer": b"7", b"refusal": b"192.0.2.1"}]
    assert gone == ["192.0.2.1"]
    assert made == []
