#!/usr/bin/env python3
"""
How fast relayd (one process) drains a spool written before it starts, and
what each delivered message costs it: the delivery side alone, no intake.

    sudo .venv/bin/python bench/drain.py --messages 20000 --workdir /var/tmp/drain

The spool is written in relayd's on-disk format (bench/compare.py's
writeRelaydSpool), every message due at once; relayd (the copy installed in
the venv running this script) starts and delivers to smtp-sink over 20
connections, as in bench/compare.py. Timed from the sink's first message to
its last: the rate, the relay's CPU time per message (user and system, every
thread), its context switches per message (voluntary ones are waits: a
thread hand-off or a wait for the disk), and its threads. ``--profile FILE``
also runs py-spy on it during the drain (raw collapsed stacks).
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def cpuSeconds(pid: int | str) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def threadCounts(pid: int) -> dict[int, tuple[int, int, float]]:
    """Per thread: voluntary and involuntary context switches, CPU seconds."""
    found = {}
    for task in os.listdir(f"/proc/{pid}/task"):
        voluntary = involuntary = 0
        try:
            with open(f"/proc/{pid}/task/{task}/status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches"):
                        voluntary = int(line.split()[1])
                    elif line.startswith("nonvoluntary_ctxt_switches"):
                        involuntary = int(line.split()[1])
            cpu = cpuSeconds(f"{pid}/task/{task}")
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                waited = int(f.read().split()[1]) / 1e9  # runnable, waiting for a CPU
        except OSError:
            continue
        found[int(task)] = (voluntary, involuntary, cpu, waited)
    return found


def difference(before: dict, after: dict, pid: int) -> tuple[tuple, tuple]:
    """(reactor thread's, the other threads' summed) switches and CPU between two threadCounts."""
    def delta(tid):
        b = before.get(tid, (0, 0, 0.0, 0.0))
        return tuple(a - c for a, c in zip(after[tid], b))
    reactor = delta(pid)
    others = [delta(tid) for tid in after if tid != pid]
    return reactor, tuple(sum(x) for x in zip(*others)) if others else (0, 0, 0.0, 0.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--profile", type=Path, help="py-spy raw output (collapsed stacks)")
    parser.add_argument("--profile-seconds", type=int, default=10)
    parser.add_argument("--deadline", type=float, default=600.0)
    args = parser.parse_args(argv)
    n = args.messages
    base = args.workdir.resolve()
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    relay = compare.Relayd(base, compare.freePort(), compare.freePort(), compare.Profile(),
                           (base / "none.pem", base / "none.key"))
    relay.prepare()
    compare.writeRelaydSpool(relay.dir / "spool", n, args.size)
    sink = compare.Sink(relay.sinkPort)
    spy = None
    try:
        relay.start()
        pid = relay.proc.pid
        first = compare.waitUntil(lambda: sink.count > 0, args.deadline, "nothing delivered")
        cpu0, counts0 = cpuSeconds(pid), threadCounts(pid)
        count0 = sink.count
        if args.profile:
            pySpy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
            spy = subprocess.Popen([pySpy, "record", "-p", str(pid), "-d", str(args.profile_seconds),
                                    "-r", "200", "-f", "raw", "-o", str(args.profile)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        threads = len(os.listdir(f"/proc/{pid}/task"))
        done = sink.waitFor(n, args.deadline)
        cpu1, counts1 = cpuSeconds(pid), threadCounts(pid)
        threads = max(threads, len(os.listdir(f"/proc/{pid}/task")))
        delivered = sink.count - count0
        seconds = done - first
        reactor, others = difference(counts0, counts1, pid)
        print(f"drain {n} x {args.size} B: {delivered / seconds:.0f} msg/s over {seconds:.2f} s; "
              f"relay CPU {1000 * (cpu1 - cpu0) / delivered:.3f} ms/msg "
              f"(reactor thread {1000 * reactor[2] / delivered:.3f}, busy {100 * reactor[2] / seconds:.0f}%, "
              f"waiting for a CPU {100 * reactor[3] / seconds:.0f}%); "
              f"context switches/msg: reactor thread {reactor[0] / delivered:.2f} voluntary, "
              f"{reactor[1] / delivered:.2f} involuntary; other threads {others[0] / delivered:.2f} "
              f"voluntary, {others[1] / delivered:.2f} involuntary; {threads} threads; "
              f"load {os.getloadavg()[0]:.2f}")
    finally:
        if spy is not None:
            spy.wait(60)
        relay.stop()
        sink.stop()
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
