#!/usr/bin/env python3
"""
The Python cost of one delivered message on the reactor thread, without
the noise of a shared machine: the scheduler, the courier and its SMTP
sessions, and the mail log, in one process, in-memory connections to a
sink that answers at once (no socket, no thread, no disk: the spool is a
fake). Timers go to a real reactor's heap (its loop's runUntilCurrent
between turns, not its poll): no deadline is reached in a round. Run from a worktree, with its venv (it imports that
worktree's relayd and tests):

    .venv/bin/python bench/delivery_cpu.py --messages 20000 --rounds 5

Prints the CPU microseconds per message of each round and their median.
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from twisted.internet import defer  # noqa: E402
from twisted.internet.selectreactor import SelectReactor  # noqa: E402
from twisted.internet.address import IPv4Address  # noqa: E402
from twisted.internet.testing import StringTransport  # noqa: E402
from twisted.logger import globalLogPublisher  # noqa: E402

from relayd.courier import Courier  # noqa: E402
from relayd.envelope import Envelope, Recipient, newQueueId  # noqa: E402
from relayd.scheduler import Scheduler  # noqa: E402
from tests.test_scheduler import FakeSpool, settings  # noqa: E402

EHLO = (b"250-sink.example\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-8BITMIME\r\n"
        b"250 ENHANCEDSTATUSCODES\r\n")


class SinkTransport(StringTransport):
    """The client's side of a connection to a sink; the sink answers when pumped."""

    def __init__(self, sink):
        super().__init__(peerAddress=IPv4Address("TCP", "127.0.0.1", 2525))
        self.sink = sink
        self.protocol = None
        self.inData = False
        self.buffer = b""

    def write(self, data):
        super().write(data)
        self.sink.ready.add(self)

    def answer(self):
        data = self.buffer + self.value()
        self.clear()
        lines = data.split(b"\r\n")
        self.buffer = lines.pop()
        replies = []
        for line in lines:
            if self.inData:
                if line == b".":
                    self.inData = False
                    replies.append(b"250 2.0.0 Ok: queued\r\n")
                continue
            verb = line[:4].upper()
            if verb == b"EHLO":
                replies.append(EHLO)
            elif verb == b"DATA":
                self.inData = True
                replies.append(b"354 End data with <CR><LF>.<CR><LF>\r\n")
            elif verb == b"QUIT":
                replies.append(b"221 2.0.0 Bye\r\n")
            else:
                replies.append(b"250 2.1.0 Ok\r\n")
        if replies:
            self.protocol.dataReceived(b"".join(replies))


class Sink:
    def __init__(self, clock):
        self.clock = clock
        self.ready = set()

    def endpoint(self, reactor, hop, timeouts):
        return self

    def connect(self, factory):
        protocol = factory.buildProtocol(None)
        transport = SinkTransport(self)
        transport.protocol = protocol
        protocol.makeConnection(transport)
        protocol.dataReceived(b"220 sink.example ESMTP\r\n")
        return defer.succeed(protocol)

    def pump(self):
        while self.ready:
            self.ready.pop().answer()
        self.clock.runUntilCurrent()  # as each turn of the reactor's loop


def oneRound(n: int, body: bytes) -> float:
    clock = SelectReactor()
    sink = Sink(clock)
    spool = FakeSpool()
    spool.bodies = {}
    courier = Courier(clock, "relay.example", endpointFactory=sink.endpoint)
    sched = Scheduler(spool, courier, settings(concurrency=20, destinationConcurrency=20), clock,
                      random=lambda: 0.5)
    envelopes = []
    for _ in range(n):
        queueId = newQueueId()
        spool.bodies[queueId] = body
        envelopes.append(Envelope(queueId=queueId, sender="a@example.com",
                                  recipients=[Recipient("b@example.org")],
                                  arrival=clock.seconds(), nextAttempt=clock.seconds(),
                                  size=len(body)))
    started = time.process_time()
    sched.startService()
    for e in envelopes:
        sched.add(e)
    while sched.queueLength():
        sink.pump()
    spent = time.process_time() - started
    assert len(spool.removed) == n, len(spool.removed)
    return spent


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size", type=int, default=2048)
    args = parser.parse_args(argv)
    line = b"x" * 70 + b"\r\n"
    body = b"Subject: bench\r\n\r\n" + line * (args.size // len(line))
    # The log goes nowhere but through the publisher, as with an observer.
    globalLogPublisher.addObserver(lambda event: None)
    results = []
    for _ in range(args.rounds):
        results.append(1e6 * oneRound(args.messages, body) / args.messages)
        print(f"round: {results[-1]:.1f} us/msg", flush=True)
    print(f"median {statistics.median(results):.1f} us/msg over {args.rounds} rounds "
          f"of {args.messages} messages")
    return 0


if __name__ == "__main__":
    sys.exit(main())
