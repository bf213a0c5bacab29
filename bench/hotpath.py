#!/usr/bin/env python3
"""
The Python cost of one message on the reactor thread, without sockets,
threads or a disk: what bench/throughput.py's relay CPU per message holds
besides its system calls, measured the same way every time, so that a
change to the per-message path shows against the noise of a shared machine.

Per message, as smtp-source and smtp-sink drive relayd: a client connects
(accept, greeting), says EHLO, MAIL, RCPT, DATA, a body of --size bytes in
one read, the final dot, QUIT and closes; the commit completes at once
(an in-memory spool); the scheduler starts the delivery at once, the
courier sends it over a kept connection to a peer that answers MAIL,
RCPT and DATA together (or DATA apart, for a courier that waits) and the
final dot; the message is removed. Every log
line goes through relayd.logformat.syslogStdout's formatting (written to
/dev/null), as in production.

    .venv/bin/python bench/hotpath.py --messages 2000 --repeat 7

Prints the CPU time of this thread per message (the best of --repeat runs:
the least disturbed by the other work on the machine) and checks that
every message was delivered and removed.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time

import yaml
from twisted.internet import address, defer
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogBeginner

from relayd import config, logformat, server
from relayd.courier import Courier
from relayd.queue import MessageLanes
from relayd.scheduler import Scheduler

CONFIG = {
    "hostname": "bench.localdomain",
    "listeners": [{"endpoint": "tcp:2525", "tls": "none", "auth": "none"}],
    "relay": {"trusted_networks": ["127.0.0.0/8"]},
    "limits": {"connections": 1000, "connections_per_client": 1000},
    "queue": {"directory": "/nonexistent", "free_space_reserve": 0},
    "delivery": {"concurrency": 20, "smarthosts": [{"host": "127.0.0.1", "port": 2526, "tls": "none"}]},
}


class MemoryWriter:
    """A body kept in memory; its commit completes at once."""

    buffered = 0

    def __init__(self, queueId: str):
        self.queueId = queueId
        self.chunks: list[bytes] = []
        self.size = 0
        self.body = b""

    def write(self, data) -> None:
        self.chunks.append(bytes(data))
        self.size += len(data)

    def commit(self, envelope) -> None:
        self.body = b"".join(self.chunks)

    def abort(self) -> None:
        pass


class MemorySpool:
    def __init__(self):
        self.removed = 0

    def receive(self, queueId: str) -> MemoryWriter:
        return MemoryWriter(queueId)

    def remove(self, queueId: str) -> None:  # relayd before removeEnvelope
        self.removed += 1

    def removeEnvelope(self, queueId: str) -> None:
        self.removed += 1

    def removeBody(self, queueId: str) -> None:
        pass

    def writeEnvelope(self, queueId: str, raw) -> None:
        pass

    def openBody(self, queueId: str):
        raise OSError("every body is kept in memory here")


class Peer:
    """The smarthost's side: one kept connection, its transport read by hand."""

    def __init__(self):
        self.session = None
        self.transport = None

    def endpoint(self, reactor, target, timeouts):
        peer = self

        class Endpoint:
            def connect(self, factory):
                proto = factory.buildProtocol(address.IPv4Address("TCP", "127.0.0.1", 2526))
                peer.session = proto
                peer.transport = StringTransport(
                    peerAddress=address.IPv4Address("TCP", "127.0.0.1", 2526))
                proto.makeConnection(peer.transport)
                proto.dataReceived(b"220 sink ESMTP\r\n")
                proto.dataReceived(b"250-sink\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 0\r\n")
                peer.transport.clear()
                return defer.succeed(proto)

        return Endpoint()

    def answer(self) -> None:
        """Answer the transaction the courier just began: MAIL, RCPT and DATA (one group with PIPELINING), then the body."""
        sent = self._take(b"RCPT TO")
        if b"\r\nDATA\r\n" in sent:
            self.session.dataReceived(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data\r\n")
        else:
            self.session.dataReceived(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n")
            self._take(b"DATA")
            self.session.dataReceived(b"354 End data with <CR><LF>.<CR><LF>\r\n")
        self._take(b"\r\n.\r\n")
        self.session.dataReceived(b"250 2.0.0 Ok: queued\r\n")

    def _take(self, expected: bytes) -> bytes:
        sent = self.transport.value()
        if expected not in sent:
            raise SystemExit(f"hotpath: the courier sent {sent[:200]!r}, expected {expected!r}")
        self.transport.clear()
        return sent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--profile", metavar="FILE", help="write a cProfile of one run here")
    args = parser.parse_args()

    sys.stdout = open(os.devnull, "w")
    observer = logformat.syslogStdout()
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)

    # The real reactor's timers (a heap), not task.Clock's sorted list;
    # never run: runUntilCurrent after each message does its timer work.
    from twisted.internet import reactor as clock
    settings = config.parse(yaml.safe_dump(CONFIG, sort_keys=False), "/etc/relayd/relayd.yaml")
    spool = MemorySpool()
    lanes = MessageLanes(defer.maybeDeferred)
    peer = Peer()
    courier = Courier(clock, settings.hostname, endpointFactory=peer.endpoint)
    scheduler = Scheduler(spool, courier, settings, clock, random=lambda: 0.5,
                          runInThread=defer.maybeDeferred, lanes=lanes)
    scheduler.startService()
    factory = server.SubmissionFactory(
        config=settings, spool=spool, commit=lambda writer, envelope: writer.commit(envelope),
        messageQueued=scheduler.add, clock=clock, lanes=lanes, bodyKept=scheduler.keepBody)

    line = b"x" * 70 + b"\r\n"
    body = (b"From: <sender@example.com>\r\nTo: <rcpt@example.org>\r\nSubject: bench\r\n\r\n"
            + line * max(1, args.size // len(line)) + b".\r\n")
    client = address.IPv4Address("TCP", "127.0.0.1", 40000)
    local = address.IPv4Address("TCP", "127.0.0.1", 2525)

    def message() -> None:
        transport = StringTransport(peerAddress=client, hostAddress=local)
        session = factory.buildProtocol(client)
        session.makeConnection(transport)
        for command in (b"EHLO bench.localdomain\r\n", b"MAIL FROM:<sender@example.com>\r\n",
                        b"RCPT TO:<rcpt@example.org>\r\n", b"DATA\r\n"):
            session.dataReceived(command)
        session.dataReceived(body)
        if peer.session is None or not peer.transport.value():
            raise SystemExit("hotpath: the message was not queued and sent: "
                             + transport.value()[-200:].decode(errors="replace"))
        peer.answer()
        session.dataReceived(b"QUIT\r\n")
        session.connectionLost(None)
        clock.runUntilCurrent()

    def run() -> float:
        removed = spool.removed
        start = time.thread_time()
        for _ in range(args.messages):
            message()
        spent = time.thread_time() - start
        if spool.removed - removed != args.messages:
            raise SystemExit(f"hotpath: {spool.removed - removed} of {args.messages} messages delivered")
        return spent

    run()  # warm up: the kept connection, caches
    calls, opcodes = counted(message, 100)
    if args.profile:
        import cProfile
        cProfile.runctx("run()", globals(), {"run": run}, args.profile)
    best = min(run() for _ in range(args.repeat))
    observer.writer.flush()
    sys.__stdout__.write(f"reactor-thread Python per message: {1e6 * best / args.messages:.1f} µs "
                         f"(best of {args.repeat} runs of {args.messages}); "
                         f"{calls:.0f} function calls (Python and C), "
                         f"{opcodes:.0f} Python bytecodes\n")


def counted(message, count: int) -> tuple[float, float]:
    """
    Function calls and bytecodes per message, over ``count`` messages: the
    same on a busy machine as on an idle one, where timings are not.
    """
    calls = opcodes = 0

    def profile(frame, event, arg):
        nonlocal calls
        if event in ("call", "c_call"):
            calls += 1

    def trace(frame, event, arg):
        nonlocal opcodes
        frame.f_trace_opcodes = True
        if event == "opcode":
            opcodes += 1
        return trace

    sys.setprofile(profile)
    try:
        for _ in range(count):
            message()
    finally:
        sys.setprofile(None)
    sys.settrace(trace)
    try:
        for _ in range(count):
            message()
    finally:
        sys.settrace(None)
    return calls / count, opcodes / count


if __name__ == "__main__":
    main()
