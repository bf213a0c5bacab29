"""
One file or two per queued message? Measure it on the disk the spool lives on.

Compares three layouts:

- relayd's (relayd.queue itself): one ``<id>.msg`` file per message (body,
  envelope, trailer), updates in an ``<id>.upd`` file beside it;
- the two-file layout relayd used before (``<id>.eml`` body written in
  queue/ + ``<id>.env`` JSON envelope renamed in from tmp/, both fsynced
  at once), which a spool may still hold;
- one file rewritten on each update (a JSON header line followed by the
  body: every update copies the body).

for:

- commit, durable as before a 250 reply (fsync data, rename, fsync directory);
- a state update after a delivery attempt (atomic rename, no fsync, as
  relayd does; plus the rewriting layout's update with fsync, which it
  needs to be sure a crash cannot take the body with it);
- the removal of a delivered message (every unlink it takes).

Prints per-operation medians in milliseconds and each layout's ratio to
relayd's (> 1: relayd's layout is faster). Standalone, stdlib only apart
from relayd itself; the default run takes about a minute:

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
from concurrent.futures import ThreadPoolExecutor

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


class Relayd:
    """relayd.queue itself: one file per message, update files beside it."""

    def __init__(self, directory: str) -> None:
        self.spool = Spool(directory)
        self.spool.recover()

    def commit(self, envelope: Envelope, body: bytes) -> None:
        writer = self.spool.begin(envelope.queueId)
        for start in range(0, len(body), CHUNK):
            writer.write(body[start:start + CHUNK])
            writer.writeOut(writer.takeBuffered())
        writer.commit(envelope)

    def update(self, envelope: Envelope, fsync: bool) -> None:
        self.spool.update(envelope)

    def remove(self, queueId: str) -> None:
        self.spool.remove(queueId)


class TwoFiles:
    """
    relayd's older layout: the body written straight into ``queue/<id>.eml``,
    the envelope into ``tmp/<id>.env``, both fsynced at once (two threads),
    the envelope renamed into queue/, the directory fsynced. Updates replace
    the envelope; a removal unlinks the envelope, then the body.
    """

    def __init__(self, directory: str) -> None:
        self.tmp = os.path.join(directory, "tmp")
        self.queue = os.path.join(directory, "queue")
        os.makedirs(self.tmp, 0o700, exist_ok=True)
        os.makedirs(self.queue, 0o700, exist_ok=True)
        self.fsyncs = ThreadPoolExecutor(max_workers=1)

    def commit(self, envelope: Envelope, body: bytes) -> None:
        bodyFd = os.open(os.path.join(self.queue, envelope.queueId + ".eml"),
                         os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        temporary = os.path.join(self.tmp, envelope.queueId + ".env")
        try:
            for start in range(0, len(body), CHUNK):
                os.write(bodyFd, body[start:start + CHUNK])
            envelopeFd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(envelopeFd, json.dumps(envelope.toJSON(), separators=(",", ":")).encode("ascii"))
                bodySynced = self.fsyncs.submit(os.fsync, bodyFd)
                os.fsync(envelopeFd)
                bodySynced.result()
            finally:
                os.close(envelopeFd)
        finally:
            os.close(bodyFd)
        os.rename(temporary, os.path.join(self.queue, envelope.queueId + ".env"))
        fsyncDirectory(self.queue)

    def update(self, envelope: Envelope, fsync: bool) -> None:
        temporary = os.path.join(self.tmp, f"{envelope.queueId}.env.{os.urandom(4).hex()}")
        with open(temporary, "wb") as f:
            f.write(json.dumps(envelope.toJSON(), separators=(",", ":")).encode("ascii"))
        os.replace(temporary, os.path.join(self.queue, envelope.queueId + ".env"))

    def remove(self, queueId: str) -> None:
        os.unlink(os.path.join(self.queue, queueId + ".env"))
        os.unlink(os.path.join(self.queue, queueId + ".eml"))


class Rewritten:
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


def measureEach(operations, seconds: float, minimum: int, maximum: int) -> list[float]:
    """
    Median duration in ms of each of ``operations``, run in turn (so none
    profits from running later, on a warmer cache or a quieter disk) after
    one discarded warm-up each; at least ``minimum`` runs each, more while
    ``seconds`` allows.
    """
    for operation in operations:
        operation()
    samples: list[list[float]] = [[] for _ in operations]
    deadline = time.perf_counter() + seconds
    while len(samples[0]) < maximum and (len(samples[0]) < minimum or time.perf_counter() < deadline):
        for operation, found in zip(operations, samples):
            start = time.perf_counter()
            operation()
            found.append(time.perf_counter() - start)
    return [statistics.median(found) * 1000 for found in samples]


def benchCommit(layouts, body: bytes, args) -> list[float]:
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
        return measureEach([committing(layout) for layout in layouts],
                           args.seconds, args.min_repeat, args.max_repeat)
    finally:
        for layout, queueId in committed:
            layout.remove(queueId)


def benchUpdate(layouts, body: bytes, fsyncRewritten: bool, args) -> list[float]:
    envelopes = []

    def updating(layout):
        envelope = makeEnvelope(len(body))
        layout.commit(envelope, body)
        envelopes.append((layout, envelope))

        def once():
            # What an attempt changes: one recipient done, a retry scheduled.
            envelope.attempts += 1
            envelope.recipients[envelope.attempts % 3].state = "sent"
            envelope.lastError = f"451 4.3.0 try {envelope.attempts}"
            envelope.nextAttempt = time.time() + 300
            layout.update(envelope, fsyncRewritten)
        return once

    try:
        return measureEach([updating(layout) for layout in layouts],
                           args.seconds, args.min_repeat, args.max_repeat)
    finally:
        for layout, envelope in envelopes:
            layout.remove(envelope.queueId)


def benchRemove(layouts, body: bytes, args) -> list[float]:
    """The removal of a delivered message, committed (untimed) just before."""
    durations: list[list[float]] = [[] for _ in layouts]
    deadline = time.perf_counter() + args.seconds
    while len(durations[0]) < args.max_repeat and (
            len(durations[0]) < args.min_repeat or time.perf_counter() < deadline):
        for layout, found in zip(layouts, durations):
            envelope = makeEnvelope(len(body))
            layout.commit(envelope, body)
            start = time.perf_counter()
            layout.remove(envelope.queueId)
            found.append(time.perf_counter() - start)
    return [statistics.median(found) * 1000 for found in durations]


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
        layouts = [Relayd(os.path.join(scratch, "relayd")), TwoFiles(os.path.join(scratch, "two")),
                   Rewritten(os.path.join(scratch, "rewritten"))]
        rows = []
        for label, size in SIZES:
            body = makeBody(size)
            rows.append((label, "commit (fsync)", *benchCommit(layouts, body, args)))
            rows.append((label, "update (no fsync)", *benchUpdate(layouts, body, False, args)))
            rows.append((label, "update (rewrite fsynced)", *benchUpdate(layouts, body, True, args)))
            rows.append((label, "remove", *benchRemove(layouts, body, args)))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    print(f"spool format benchmark in {args.directory} (medians, ms per operation)")
    header = (f"{'size':>7}  {'operation':<26} {'relayd':>9} {'two files':>10} {'rewritten':>10}"
              f" {'two/relayd':>11} {'rewr/relayd':>12}")
    print(header)
    print("-" * len(header))
    for label, operation, relaydMs, twoMs, rewrittenMs in rows:
        print(f"{label:>7}  {operation:<26} {relaydMs:>9.3f} {twoMs:>10.3f} {rewrittenMs:>10.3f}"
              f" {twoMs / relaydMs:>11.2f} {rewrittenMs / relaydMs:>12.2f}")
    print("relayd: one file per message plus update files (relayd.queue); two files: the older "
          "layout; rewritten: one file rewritten on each update. A ratio > 1: relayd's is faster.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
