"""
Benchmark (not a test): what DKIM signing costs the reactor thread.

    .venv/bin/python bench/dkim_signing.py [--sizes 10000,1000000,10000000] [--workers 0,2]

For each message size (a text body: words and spaces, the costly case for
relaxed canonicalization) and each worker count, relayd.dkim.Signer signs
one message with an RSA 2048 and an Ed25519 key, as the daemon does before
a first delivery attempt, while a LoopingCall ticks every 5 ms on the
reactor; it prints how long the signing took and the longest gap between
two ticks (how long every session would have waited). ``workers`` 0 signs
in a thread of the daemon's process; the daemon uses worker processes.
Each figure is from the second message (the first starts the workers).
Compare with the gap of an idle reactor on the same machine (printed
first): on a loaded machine that alone can be tens of milliseconds.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LINE = b"The quick brown fox jumps over the lazy dog, again and again and again.\r\n"


def main() -> None:
    from twisted.internet import reactor, task, threads

    from relayd import dkim
    from relayd.envelope import Envelope, Recipient
    from tests.builders import testConfig

    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="10000,1000000,10000000")
    parser.add_argument("--workers", default="0,2")
    args = parser.parse_args()
    runs = [(int(s), int(w)) for s in args.sizes.split(",") for w in args.workers.split(",")]

    directory = tempfile.mkdtemp()
    for name, kind in (("r", "rsa"), ("e", "ed25519")):
        with open(os.path.join(directory, f"{name}.key"), "wb") as f:
            f.write(dkim.newPrivateKey(kind))
    config = testConfig(path=os.path.join(directory, "relayd.yaml"), dkim={"domains": {
        "example.com": [{"selector": "r", "key": "r.key"}, {"selector": "e", "key": "e.key"}]}})

    worst, last = [0.0], [time.perf_counter()]

    def tick() -> None:
        now = time.perf_counter()
        worst[0] = max(worst[0], now - last[0])
        last[0] = now

    task.LoopingCall(tick).start(0.005)

    def idle() -> None:
        worst[0] = 0.0
        reactor.callLater(2.0, lambda: (
            print(f"idle reactor, 2 s: longest gap {worst[0] * 1000:.0f} ms", flush=True),
            nextRun()))

    def nextRun() -> None:
        if not runs:
            reactor.stop()
            return
        size, workers = runs.pop(0)
        message = b"From: a@example.com\r\nTo: b@x.test\r\nSubject: s\r\n\r\n" + LINE * (size // len(LINE))
        signer = dkim.Signer(config, lambda f, *a: threads.deferToThread(f, *a), workers=workers,
                             callFromThread=reactor.callFromThread)

        def one(then) -> None:
            envelope = Envelope(queueId="0123456789ABCDEF", sender="a@example.com",
                                recipients=[Recipient("b@x.test")], arrival=0.0)
            worst[0] = 0.0
            started = time.perf_counter()

            def done(_) -> None:
                then(time.perf_counter() - started, worst[0])

            signer.sign(envelope, lambda: io.BytesIO(message)).addCallback(done)

        def second(took: float, gap: float) -> None:
            print(f"{len(message)} bytes, workers={workers}: signed in {took * 1000:.0f} ms; "
                  f"longest reactor gap {gap * 1000:.0f} ms", flush=True)
            signer.stop()
            reactor.callLater(0.2, nextRun)

        one(lambda *_: reactor.callLater(0.2, one, second))

    reactor.callLater(0.2, idle)
    reactor.run()


if __name__ == "__main__":
    main()
