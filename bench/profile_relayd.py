#!/usr/bin/env python3
"""
Where relayd's time goes: one bench/throughput.py workload against relayd
alone, with py-spy sampling the twistd process, and the hottest functions
of its busiest thread (by default the reactor's, "MainThread") printed.

    .venv/bin/pip install py-spy
    sudo .venv/bin/python bench/profile_relayd.py --messages 4000 --sessions 20 --size 2048

Writes the collapsed stacks (flamegraph.pl's input) to --out. Needs what
bench/throughput.py needs, as root (smtp-sink runs as nobody).
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput  # noqa: E402


def summarize(collapsed: Path, thread: str, top: int) -> None:
    """Self and inclusive sample shares of the functions on ``thread``'s stacks."""
    own: collections.Counter = collections.Counter()
    inclusive: collections.Counter = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if not frames or thread not in frames[0]:
            continue
        n = int(count)
        total += n
        names = [f.split(" (")[0] + " (" + f.split(" (")[-1].split(":")[0].rsplit("/", 1)[-1] + ")"
                 if " (" in f else f for f in frames[1:]]
        if names:
            own[names[-1]] += n
        for name in set(names):
            inclusive[name] += n
    print(f"{thread}: {total} samples")
    print("self:")
    for name, n in own.most_common(top):
        print(f"  {100 * n / max(total, 1):5.1f}%  {name}")
    print("inclusive:")
    for name, n in inclusive.most_common(top):
        print(f"  {100 * n / max(total, 1):5.1f}%  {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=4000)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/relayd-profile"))
    parser.add_argument("--out", type=Path, default=Path("relayd-profile.txt"))
    parser.add_argument("--thread", default="MainThread")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--idle", action="store_true", help="count samples of idle threads too")
    args = parser.parse_args()
    pySpy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    throughput.BASE = args.workdir.resolve()
    throughput.BASE.mkdir(parents=True, exist_ok=True)
    sinkPort = throughput.freePort()
    sink = throughput.Sink(sinkPort)
    relay = throughput.Relayd(sinkPort, args.sessions)
    spy = subprocess.Popen([pySpy, "record", "--pid", str(relay.proc.pid), "--format", "raw",
                            "--threads", "--rate", "200", "--output", str(args.out), "--nonblocking"]
                           + (["--idle"] if args.idle else []),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.0)
        start = time.monotonic()
        subprocess.run(
            ["smtp-source", "-s", str(args.sessions), "-m", str(args.messages), "-l", str(args.size),
             "-f", "sender@example.com", "-t", "rcpt@example.org", "-M", "bench.localdomain",
             f"127.0.0.1:{relay.port}"], check=True, capture_output=True, timeout=300)
        accepted = time.monotonic()
        delivered = sink.waitFor(args.messages, 300) or time.monotonic()
        print(f"accept {args.messages / (accepted - start):.1f} msg/s, "
              f"end-to-end {args.messages / (delivered - start):.1f} msg/s")
    finally:
        spy.send_signal(2)  # SIGINT: py-spy writes what it has
        spy.wait(30)
        relay.stop()
        sink.stop()
    summarize(args.out, args.thread, args.top)


if __name__ == "__main__":
    main()
