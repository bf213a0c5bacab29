"""
Two files or one per queued message? Measure it on the disk the spool lives on.

Compares relayd's layout (relayd.queue: ``<id>.eml`` body + ``<id>.env``
JSON envelope) with a one-file layout (an envelope header line followed by
the body, the whole file rewritten on each state update) for:

- commit, durable as before a 250 reply (fsync data, rename, fsync directory);
- a state update after a delivery attempt (atomic rename, no fsync, as
  relayd does; plus the one-file update with fsync, which that layout needs
  to be sure a crash cannot take the body with it).

Prints per-operation medians in milliseconds and the one-file / two-file
ratio (> 1: two files are faster). Standalone, stdlib only apart from
relayd itself; the default run takes well under a minute:

    .venv/bin/python bench/spool_format.py [--directory /var/spool] [--seconds 2]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from relayd.envelope import Envelope, Recipient, newQueueId  # noqa: E402
from relayd.queue import Spool  # noqa: E402

SIZES = [("1 KB", 1_000), ("100 KB", 100_000), ("5 MB", 5_000_000)]
CHUNK = 64 * 1024  # roughly what a DATA reader hands over at a time


def makeBody(size: int) -> bytes:
    """A CRLF body of ``size`` bytes: 76-character base64 lines, like an attachment."""
    raw = base64.b64encode(os.urandom(size)).decode("ascii")
    lines = [raw[i:i + 76] for i in range(0, len(raw), 76)]
    body = "\r\n".join(lines).encode("ascii")[:size]
    return body


def makeEnvelope(size: int) -> Envelope:
    return Envelope(
        queueId=newQueueId(),
        sender="alice@example.com",
        recipients=[Recipient(f"user{i}@example.org") for i in range(3)],
        arrival=time.time(),
        size=size,
        mailParams={"BODY": "8BITMIME", "SIZE": str(size)},
        clientAddress="127.0.0.1",
        clientName="localhost",
        helo="client.example.com",
    )


class TwoFiles:
    """relayd.queue itself."""

    def __init__(self, directory: str) -> None:
        self.spool = Spool(directory)
        self.spool.recover()

    def commit(self, envelope: Envelope, body: bytes) -> None:
        writer = self.spool.begin(envelope.queueId)
        for start in range(0, len(body), CHUNK):
            writer.write(body[start:start + CHUNK])
        writer.commit(envelope)

    def update(self, envelope: Envelope, fsync: bool) -> None:
        self.spool.update(envelope)

    def remove(self, queueId: str) -> None:
        self.spool.remove(queueId)


class OneFile:
    """
    ``queue/<id>``: one JSON header line, then the body. Every update copies
    the body into a new file and renames it over the old one.
    """

    def __init__(self, directory: str) -> None:
        self.tmp = os.path.join(directory, "tmp")
        self.queue = os.path.join(directory, "queue")
        os.makedirs(self.tmp, 0o700, exist_ok=True)
        os.makedirs(self.queue, 0o700, exist_ok=True)

    def _header(self, envelope: Envelope) -> bytes:
        return json.dumps(envelope.toJSON(), separators=(",", ":")).encode("ascii") + b"\n"

    def commit(self, envelope: Envelope, body: bytes) -> None:
        # Favourable to this layout: it assumes the envelope is known before
        # the body (in reality the size is only known at the end).
        temporary = os.path.join(self.tmp, envelope.queueId)
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb", buffering=CHUNK) as f:
            f.write(self._header(envelope))
            for start in range(0, len(body), CHUNK):
                f.write(body[start:start + CHUNK])
            f.flush()
            os.fsync(f.fileno())
        os.rename(temporary, os.path.join(self.queue, envelope.queueId))
        fsyncDirectory(self.queue)

    def update(self, envelope: Envelope, fsync: bool) -> None:
        path = os.path.join(self.queue, envelope.queueId)
        temporary = os.path.join(self.tmp, f"{envelope.queueId}.{os.urandom(4).hex()}")
        with open(path, "rb") as old:
            old.readline()  # the old header
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as new:
                new.write(self._header(envelope))
                shutil.copyfileobj(old, new, 1024 * 1024)
                if fsync:
                    new.flush()
                    os.fsync(new.fileno())
        os.replace(temporary, path)

    def remove(self, queueId: str) -> None:
        os.unlink(os.path.join(self.queue, queueId))


def fsyncDirectory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def measurePair(first, second, seconds: float, minimum: int, maximum: int) -> tuple[float, float]:
    """
    Median duration in ms of ``first()`` and ``second()``, run alternately
    (so neither profits from running later, on a warmer cache or a quieter
    disk) after one discarded warm-up each; at least ``minimum`` runs each,
    more while ``seconds`` allows.
    """
    first()
    second()
    samples: tuple[list[float], list[float]] = ([], [])
    deadline = time.perf_counter() + seconds
    while len(samples[0]) < maximum and (len(samples[0]) < minimum or time.perf_counter() < deadline):
        for operation, found in ((first, samples[0]), (second, samples[1])):
            start = time.perf_counter()
            operation()
            found.append(time.perf_counter() - start)
    return statistics.median(samples[0]) * 1000, statistics.median(samples[1]) * 1000


def benchCommit(two, one, body: bytes, args) -> tuple[float, float]:
    committed = []

    def committing(layout):
        def once():
            envelope = makeEnvelope(len(body))
            layout.commit(envelope, body)
            committed.append((layout, envelope.queueId))
            if len(committed) > 20:  # keep the scratch spool small
                layout_, queueId = committed.pop(0)
                layout_.remove(queueId)
        return once

    try:
        return measurePair(committing(two), committing(one), args.seconds, args.min_repeat, args.max_repeat)
    finally:
        for layout, queueId in committed:
            layout.remove(queueId)


def benchUpdate(two, one, body: bytes, fsyncOneFile: bool, args) -> tuple[float, float]:
    envelopes = []

    def updating(layout, fsync):
        envelope = makeEnvelope(len(body))
        layout.commit(envelope, body)
        envelopes.append((layout, envelope))

        def once():
            # What an attempt changes: one recipient done, a retry scheduled.
            envelope.attempts += 1
            envelope.recipients[envelope.attempts % 3].state = "sent"
            envelope.lastError = f"451 4.3.0 try {envelope.attempts}"
            envelope.nextAttempt = time.time() + 300
            layout.update(envelope, fsync)
        return once

    try:
        return measurePair(updating(two, False), updating(one, fsyncOneFile),
                           args.seconds, args.min_repeat, args.max_repeat)
    finally:
        for layout, envelope in envelopes:
            layout.remove(envelope.queueId)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--directory", default="/var/tmp",
                        help="where to create the scratch spools; use the spool's file system (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=2.0,
                        help="time budget per measurement (default: %(default)s)")
    parser.add_argument("--min-repeat", type=int, default=5)
    parser.add_argument("--max-repeat", type=int, default=200)
    args = parser.parse_args(argv)

    scratch = tempfile.mkdtemp(prefix="relayd-bench-", dir=args.directory)
    try:
        two = TwoFiles(os.path.join(scratch, "two"))
        one = OneFile(os.path.join(scratch, "one"))
        rows = []
        for label, size in SIZES:
            body = makeBody(size)
            rows.append((label, "commit (fsync)", *benchCommit(two, one, body, args)))
            rows.append((label, "update (no fsync)", *benchUpdate(two, one, body, False, args)))
            rows.append((label, "update (one-file fsynced)", *benchUpdate(two, one, body, True, args)))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    print(f"spool format benchmark in {args.directory} (medians, ms per operation)")
    header = f"{'size':>7}  {'operation':<26} {'two files':>10} {'one file':>10} {'one/two':>8}"
    print(header)
    print("-" * len(header))
    for label, operation, twoMs, oneMs in rows:
        print(f"{label:>7}  {operation:<26} {twoMs:>10.3f} {oneMs:>10.3f} {oneMs / twoMs:>8.2f}")
    print("one/two > 1: the two-file layout (relayd's) is faster for that operation.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
