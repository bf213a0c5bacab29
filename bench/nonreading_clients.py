"""
Benchmark (not a test): the daemon's memory while clients pipeline NOOPs
and never read a reply.

    .venv/bin/python bench/nonreading_clients.py [--clients 5] [--seconds 20]

Starts the installed ``twistd relayd`` (as tests/integration/harness.py
does, on 127.0.0.1), lets ``--clients`` connections send ``NOOP`` as fast
as the daemon reads them for ``--seconds``, never reading, and prints the
daemon's resident memory before and at the end, and how many bytes of
commands the clients got in (the kernel's socket buffers hold megabytes
before relayd's own bound applies). Run it from the checkout's root; it
needs relayd installed in the venv running it (``make install-test``).
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.integration.harness import HOST, freePort  # noqa: E402
from tests.integration.test_hostile_clients import HostileRelayd  # noqa: E402


def residentMB(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) // 1024
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()

    relay = HostileRelayd(Path(tempfile.mkdtemp()) / "relayd", freePort(),
                          f"connections_per_client: {max(20, args.clients)}")
    relay.start()
    try:
        pid = relay.process.pid
        before = residentMB(pid)
        sent = [0] * args.clients
        peaks: list[int] = []
        end = time.monotonic() + args.seconds

        def flood(i: int) -> None:
            with socket.create_connection((HOST, relay.port)) as sock:
                sock.settimeout(2.0)
                chunk = b"NOOP\r\n" * 10_000
                try:
                    while time.monotonic() < end:
                        sock.sendall(chunk)
                        sent[i] += len(chunk)
                except OSError:
                    pass  # every buffer is full: the daemon stopped reading
                time.sleep(max(0.0, end - time.monotonic()))
                peaks.append(residentMB(pid))

        threads = [threading.Thread(target=flood, args=(i,)) for i in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        print(f"{args.clients} clients, {args.seconds:g} s: daemon RSS {before} MB before, "
              f"{max(peaks)} MB at the end; commands sent: {sum(sent) / 1e6:.1f} MB")
    finally:
        relay.kill()


if __name__ == "__main__":
    main()
