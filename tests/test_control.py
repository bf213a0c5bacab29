"""
The control channel's wire: relayctl's blocking AMP client talking to the
daemon's ControlProtocol over StringTransport and over a real UNIX socket.
"""

from __future__ import annotations

import errno
import os
import stat

import pytest
from twisted.internet.testing import StringTransport

from relayd import control
from relayd.cli import relayctl
from tests.test_scheduler import envelope, result, rigWith, settings


class BufferSocket:
    def __init__(self, data: bytes):
        self.data = data

    def recv(self, n):
        chunk, self.data = self.data[:n], self.data[n:]
        return chunk


def ask(proto, transport, command, **arguments):
    """Send a command the way relayctl does; parse the answer the way relayctl does."""
    box = command.makeArguments(arguments, None)
    box[b"_command"] = command.commandName
    box[b"_ask"] = b"1"
    proto.dataReceived(box.serialize())
    answer = relayctl._readBox(BufferSocket(transport.value()))
    transport.clear()
    assert b"_error" not in answer, answer
    return command.parseResponse(answer, None)


@pytest.fixture
def rig():
    made = rigWith()
    proto = control.ControlProtocol(made.sched)
    transport = StringTransport()
    proto.makeConnection(transport)
    yield made.clock, made.spool, made.courier, made.sched, proto, transport, made.lines
    made.close()


def test_verbs_over_the_wire(rig):
    clock, spool, courier, sched, proto, transport, lines = rig
    courier.script = [[451], [451]]
    a, b = envelope(clock, "a@example.org"), envelope(clock, "b@example.org")
    sched.add(a)
    sched.add(b)

    answer = ask(proto, transport, control.Hold, ids=[a.queueId, "0000000000000000", "nonsense"])
    assert answer["outcomes"] == [
        {"id": a.queueId, "ok": True, "outcome": "placed on hold"},
        {"id": "0000000000000000", "ok": False, "outcome": "no such message in the queue"},
        {"id": "nonsense", "ok": False, "outcome": "not a queue id"},
    ]
    assert a.hold and spool.updated[-1][0] == a.queueId

    courier.script = [[451]]
    answer = ask(proto, transport, control.Flush, ids=[])
    assert answer["count"] == 1  # b only: a is on hold
    assert len(courier.calls) == 3

    answer = ask(proto, transport, control.DaemonStatus)
    assert answer["messages"] == 2 and answer["active"] == []

    courier.script = [[250]]
    answer = ask(proto, transport, control.Release, ids=[a.queueId])
    assert answer["outcomes"][0]["outcome"] == "released from hold"
    assert a.queueId not in sched.envelopes

    answer = ask(proto, transport, control.Requeue, ids=[b.queueId])
    assert answer["outcomes"][0]["outcome"] == "requeued"
    # The requeued attempt is now in flight (no script left): Status shows it.
    assert ask(proto, transport, control.DaemonStatus)["active"] == [b.queueId]
    answer = ask(proto, transport, control.Bounce, ids=[b.queueId])
    assert answer["outcomes"][0] == {
        "id": b.queueId, "ok": False,
        "outcome": "it is being delivered now; try again when the attempt ends"}
    d, rcpts = courier.pending.pop()
    d.callback(result(rcpts, [451]))
    answer = ask(proto, transport, control.Bounce, ids=[b.queueId])
    assert answer["outcomes"][0]["outcome"] == "returned to sender"
    [(notice, _)] = spool.notices
    assert notice.recipients[0].address == "a@example.com"

    c = envelope(clock, "c@example.org")
    courier.script = [[451]]
    sched.add(c)
    answer = ask(proto, transport, control.Delete, ids=[c.queueId])
    assert answer["outcomes"][0]["outcome"] == "removed"
    assert f"{c.queueId}: removed by admin" in lines


def test_many_ids_fit_in_one_call(rig):
    clock, spool, courier, sched, proto, transport, lines = rig
    ids = [f"{i:016d}" for i in range(control.MAX_IDS_PER_CALL)]
    answer = ask(proto, transport, control.Hold, ids=ids)
    assert len(answer["outcomes"]) == control.MAX_IDS_PER_CALL


def test_service_listens_0600_and_replaces_a_stale_socket(tmp_path):
    from twisted.internet import reactor
    import socket

    path = str(tmp_path / "control.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # a socket file nobody answers on, as a SIGKILL leaves it
    service = control.ControlService(path, sched := object(), reactor)
    service.startService()
    try:
        assert service.port is not None
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert control._inUse(path)
        # A second daemon configured with the same socket does not steal it.
        other = control.ControlService(path, sched, reactor)
        other.startService()
        assert other.port is None
    finally:
        service.stopService()
    # (The port removes the file once the reactor has closed it: see the integration test.)


def test_not_running(tmp_path):
    with pytest.raises(relayctl.NotRunning) as info:
        relayctl.callDaemon(str(tmp_path / "control.sock"), control.DaemonStatus)
    assert "relayd is not running" in str(info.value)


def test_write_failure_is_answered_per_id(rig):
    clock, spool, courier, sched, proto, transport, lines = rig
    courier.script = [[451], [451]]
    a, b = envelope(clock, "a@example.org"), envelope(clock, "b@example.org")
    sched.add(a)
    sched.add(b)
    spool.updateError = OSError(errno.ENOSPC, "No space left on device")
    full = "cannot write the queue: No space left on device"
    answer = ask(proto, transport, control.Hold, ids=[a.queueId, b.queueId])
    assert answer["outcomes"] == [{"id": a.queueId, "ok": False, "outcome": full},
                                  {"id": b.queueId, "ok": False, "outcome": full}]
    assert not a.hold and not b.hold  # memory as on disk
    spool.updateError = None
    ask(proto, transport, control.Hold, ids=[a.queueId])
    spool.updateError = OSError(errno.ENOSPC, "No space left on device")
    answer = ask(proto, transport, control.Release, ids=[a.queueId])
    assert answer["outcomes"] == [{"id": a.queueId, "ok": False, "outcome": full}]
    answer = ask(proto, transport, control.Requeue, ids=[a.queueId])
    assert answer["outcomes"] == [{"id": a.queueId, "ok": False, "outcome": full}]
    # The whole queue: b needs no write and is requeued; a is reported.
    answer = ask(proto, transport, control.Requeue, ids=[])
    assert answer["count"] == 1
    assert answer["outcomes"] == [{"id": a.queueId, "ok": False, "outcome": full}]
    assert a.hold


def test_flush_of_a_waiting_message_says_so(rig):
    clock, spool, courier, sched, proto, transport, lines = rig
    sched.reconfigure(settings(destinationConcurrency=1))
    a, b = envelope(clock, "a@example.org"), envelope(clock, "b@example.org")
    sched.add(a)
    sched.add(b)
    answer = ask(proto, transport, control.Flush, ids=[a.queueId, b.queueId])
    assert [o["outcome"] for o in answer["outcomes"]] == [
        "being delivered now", "waiting for a free slot at its destination"]


# The AUTH throttle's blocks: relayctl blocked / unblock


@pytest.fixture
def blocks():
    from twisted.internet import task

    from relayd.auth import FailureThrottle

    clock = task.Clock()
    clock.advance(1_800_000_000)
    throttle = FailureThrottle(clock, limit=2, window=600)
    proto = control.ControlProtocol(scheduler=None, throttle=throttle)
    transport = StringTransport()
    proto.makeConnection(transport)
    return clock, throttle, proto, transport


def block(throttle, address):
    while throttle.failed(address) is None:
        pass


def test_blocked_lists_addresses_and_until_when(blocks):
    clock, throttle, proto, transport = blocks
    assert ask(proto, transport, control.Blocked, start=0) == {"clients": [], "total": 0}
    block(throttle, "192.0.2.4")
    clock.advance(10)
    block(throttle, "2001:db8::1")
    assert ask(proto, transport, control.Blocked, start=0) == {"clients": [
        {"address": "192.0.2.4", "until": 1_800_000_600.0},
        {"address": "2001:db8::1", "until": 1_800_000_610.0}], "total": 2}


def test_blocked_answers_in_pages_that_fit_amp(blocks):
    clock, throttle, proto, transport = blocks
    for i in range(control.MAX_BLOCKED_PER_CALL + 3):
        block(throttle, f"2001:db8:ffff:ffff:ffff:ffff:{i // 65536:x}:{i % 65536:x}")
    first = ask(proto, transport, control.Blocked, start=0)
    assert len(first["clients"]) == control.MAX_BLOCKED_PER_CALL and first["total"] == 503
    second = ask(proto, transport, control.Blocked, start=control.MAX_BLOCKED_PER_CALL)
    assert len(second["clients"]) == 3


def test_unblock_lifts_a_block_and_logs_it(blocks):
    from twisted.logger import globalLogPublisher

    clock, throttle, proto, transport = blocks
    block(throttle, "192.0.2.4")
    lines = []
    observer = lambda e: lines.append(e.get("log_line"))  # noqa: E731
    globalLogPublisher.addObserver(observer)
    try:
        # An IPv4-mapped address is the IPv4 client it stands for.
        assert ask(proto, transport, control.Unblock, address="::ffff:192.0.2.4") == {
            "address": "192.0.2.4", "wasBlocked": True}
        assert ask(proto, transport, control.Unblock, address="192.0.2.4") == {
            "address": "192.0.2.4", "wasBlocked": False}
    finally:
        globalLogPublisher.removeObserver(observer)
    assert not throttle.blocked("192.0.2.4")
    assert lines == ["192.0.2.4: AUTH block lifted by admin"]


def test_unblock_refuses_what_is_not_an_address(blocks):
    clock, throttle, proto, transport = blocks
    box = control.Unblock.makeArguments({"address": "relay.example"}, None)
    box[b"_command"], box[b"_ask"] = control.Unblock.commandName, b"1"
    proto.dataReceived(box.serialize())
    answer = relayctl._readBox(BufferSocket(transport.value()))
    assert answer[b"_error_code"] == b"BAD_ADDRESS"
    assert answer[b"_error_description"] == b"'relay.example' is not an IP address"


def rawRequest(command: bytes, items: list[bytes]) -> bytes:
    """An AMP request box built byte by byte, as any client could send it."""
    import struct

    def pair(key: bytes, value: bytes) -> bytes:
        return struct.pack("!H", len(key)) + key + struct.pack("!H", len(value)) + value

    ids = b"".join(struct.pack("!H", len(i)) + i for i in items)
    return pair(b"_command", command) + pair(b"_ask", b"7") + pair(b"ids", ids) + b"\0\0"


@pytest.mark.parametrize("items", [
    [f"{i:016d}".encode() for i in range(3000)],  # the queue ids a script might send
    [b""] * 30000,  # as many as one AMP value holds
])
@pytest.mark.parametrize("command", [b"hold", b"release", b"delete", b"bounce", b"flush",
                                     b"requeue"])
def test_request_with_too_many_ids_is_refused_with_a_clear_error(rig, items, command):
    """
    A raw client naming thousands of ids gets one AMP error saying the
    limit, nothing is changed, no traceback is logged, and the connection
    stays usable.
    """
    clock, spool, courier, sched, proto, transport, lines = rig
    proto.dataReceived(rawRequest(command, items))
    answer = relayctl._readBox(BufferSocket(transport.value()))
    transport.clear()
    assert answer[b"_error"] == b"7"
    assert answer[b"_error_code"] == b"TOO_MANY_IDS"
    assert answer[b"_error_description"].decode() == (
        f"{len(items)} ids in one request; at most {control.MAX_IDS_PER_CALL} "
        "(relayctl sends larger lists in batches)")
    assert not transport.disconnecting
    assert spool.updated == [] and spool.removed == []
    assert not any("Traceback" in l or "Unhandled" in l for l in lines)
    assert ask(proto, transport, control.DaemonStatus)["messages"] == 0


def test_longest_possible_answer_fits_in_one_amp_value(rig):
    """
    MAX_IDS_PER_CALL ids that each answer with the longest entry: long
    non-ASCII junk for ids, and the longest outcome (a write error whose
    text is cut) still make an answer AMP can send.
    """
    clock, spool, courier, sched, proto, transport, lines = rig
    junk = ["\u00e9" * 200 + str(i) for i in range(control.MAX_IDS_PER_CALL // 2)]
    courier.script = [[451]] * (control.MAX_IDS_PER_CALL // 2)
    queued = []
    for _ in range(control.MAX_IDS_PER_CALL // 2):
        env = envelope(clock, "a@example.org")
        sched.add(env)
        queued.append(env.queueId)
    spool.updateError = OSError(errno.EIO, "x" * 1000)
    proto.dataReceived(rawRequest(b"hold", [i.encode() for i in junk + queued]))
    answer = relayctl._readBox(BufferSocket(transport.value()))
    assert b"_error" not in answer, answer
    assert len(answer[b"outcomes"]) <= control.answerBound() <= control.AMP_VALUE_LIMIT
    outcomes = control.Hold.parseResponse(answer, None)["outcomes"]
    assert len(outcomes) == control.MAX_IDS_PER_CALL
    assert all(len(o["id"].encode()) <= control.MAX_ECHOED_ID_BYTES for o in outcomes)
    assert outcomes[-1]["outcome"].startswith("cannot write the queue: xxx")
    assert outcomes[-1]["outcome"].endswith("...")
    assert len(outcomes[-1]["outcome"].encode()) == control.MAX_OUTCOME_BYTES


def test_whole_queue_requeue_lists_a_bounded_number_of_failures(rig):
    clock, spool, courier, sched, proto, transport, lines = rig
    count = control.MAX_IDS_PER_CALL + 100
    courier.script = [[451]] * count
    for _ in range(count):
        env = envelope(clock, "a@example.org")
        env.hold = True
        sched.add(env)
    spool.updateError = OSError(errno.ENOSPC, "No space left on device")
    answer = ask(proto, transport, control.Requeue, ids=[])
    assert answer["count"] == 0
    assert len(answer["outcomes"]) == control.MAX_IDS_PER_CALL
    assert answer["unlisted"] == 100


def test_status_lists_a_bounded_number_of_active_ids(rig):
    clock, spool, courier, sched, proto, transport, lines = rig
    sched.reconfigure(settings(concurrency=5000, destinationConcurrency=5000))
    for _ in range(control.MAX_ACTIVE_LISTED + 10):
        sched.add(envelope(clock, "a@example.org"))
    assert len(sched.activeIds()) == control.MAX_ACTIVE_LISTED + 10
    answer = ask(proto, transport, control.DaemonStatus)
    assert len(answer["active"]) == control.MAX_ACTIVE_LISTED


def test_relayctl_batches_stay_within_the_limit(monkeypatch, tmp_path):
    calls = []

    def fake(path, command, timeout=relayctl.TIMEOUT, **arguments):
        calls.append(len(arguments["ids"]))
        return {"outcomes": [{"id": i, "ok": True, "outcome": "placed on hold"}
                             for i in arguments["ids"]]}
    monkeypatch.setattr(relayctl, "callDaemon", fake)
    configPath = tmp_path / "relayd.yaml"
    configPath.write_text(
        "hostname: relay.test\n"
        'listeners: [{endpoint: "tcp:2525", tls: none, auth: none}]\n'
        "queue: {directory: spool}\n"
        "delivery: {smarthosts: [{host: smtp.example.net, tls: none}]}\n")
    import io

    ids = [f"{i:016d}" for i in range(2 * control.MAX_IDS_PER_CALL + 1)]
    status = relayctl.run(["-c", str(configPath), "hold", *ids], io.StringIO(), io.StringIO())
    assert status == 0
    assert calls == [control.MAX_IDS_PER_CALL, control.MAX_IDS_PER_CALL, 1]


def test_reload_answers_with_the_reloads_outcome():
    outcomes = [(True, "reload: configuration /etc/relayd.yaml applied"),
                (False, "reload failed, keeping the running configuration: x: y: z")]
    proto = control.ControlProtocol(None, reload=lambda: outcomes.pop(0))
    transport = StringTransport()
    proto.makeConnection(transport)
    assert ask(proto, transport, control.Reload) == {
        "ok": True, "message": "reload: configuration /etc/relayd.yaml applied"}
    assert ask(proto, transport, control.Reload) == {
        "ok": False, "message": "reload failed, keeping the running configuration: x: y: z"}


def test_the_test_only_stall_is_refused_unless_enabled():
    proto = control.ControlProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    box = control.Stall.makeArguments({"seconds": 5.0}, None)
    box[b"_command"], box[b"_ask"] = control.Stall.commandName, b"1"
    proto.dataReceived(box.serialize())
    answer = relayctl._readBox(BufferSocket(transport.value()))
    assert answer[b"_error_code"] == b"NOT_ENABLED"

    stalled = []
    proto = control.ControlProtocol(None, stall=stalled.append)
    transport = StringTransport()
    proto.makeConnection(transport)
    assert ask(proto, transport, control.Stall, seconds=1e9) == {}
    assert stalled == [control.MAX_STALL]
