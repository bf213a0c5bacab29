#!/usr/bin/env python3
"""
The cost of asking the master, on the intake path of ``processes`` > 1.

1. The AMP round trip itself: a forked "master" (relayd.master's
   WorkerLink and LimitsOwner) answers ``Admit`` and ``StartCheck`` over a
   socketpair to a "worker" that asks them one after the other, as a
   session does; percentiles of the round trip.
2. What a client sees: connect to the 220 banner of the real daemon
   (installed in .venv), with ``processes: 1`` and ``processes: 2``,
   sequential connections; percentiles of each.

    .venv/bin/python bench/admission.py --calls 5000 --connections 500
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path


def percentiles(samples: list[float]) -> str:
    ordered = sorted(samples)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e6

    return (f"median {statistics.median(ordered) * 1e6:7.1f} us  p90 {at(0.9):7.1f} us  "
            f"p99 {at(0.99):7.1f} us  (n={len(ordered)})")


def roundTrips(calls: int) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:  # the master
        ours.close()
        from twisted.internet import protocol, reactor

        from relayd import config, server
        from relayd.master import LimitsOwner, Worker, WorkerLink, WorkerPool

        cfg = config.parse('hostname: relay.test\nlisteners: [{endpoint: "tcp:25", tls: none, '
                           'auth: none}]\nqueue: {directory: /nonexistent}\n'
                           'limits: {connections: 100000, connections_per_client: 100000}\n',
                           "bench.yaml")
        owner = LimitsOwner(cfg, reactor, server._throttleSettings)
        pool = WorkerPool(1, None, reactor, [], lambda: None, owner, None, None, None)
        link = WorkerLink(pool, Worker(1, 0.0))
        pool.release = lambda worker: reactor.stop()
        factory = protocol.Factory()
        factory.noisy = False
        factory.buildProtocol = lambda addr: link
        reactor.adoptStreamConnection(theirs.fileno(), socket.AF_UNIX, factory)
        theirs.close()
        reactor.run()
        os._exit(0)
    theirs.close()
    from twisted.internet import defer, protocol, reactor

    from relayd import channel

    link = channel.Quiet()
    factory = protocol.Factory()
    factory.noisy = False
    factory.buildProtocol = lambda addr: link
    reactor.adoptStreamConnection(ours.fileno(), socket.AF_UNIX, factory)
    ours.close()
    admit: list[float] = []
    check: list[float] = []

    @defer.inlineCallbacks
    def run():
        for n in range(calls):
            address = f"192.0.2.{n % 250}"
            start = time.perf_counter()
            yield link.callRemote(channel.Admit, address=address)
            admit.append(time.perf_counter() - start)
            link.callRemote(channel.Left, address=address)
            start = time.perf_counter()
            yield link.callRemote(channel.StartCheck, address=address)
            check.append(time.perf_counter() - start)
            yield link.callRemote(channel.CheckEnded, address=address, failed=False)
        link.transport.loseConnection()
        reactor.stop()

    reactor.callWhenRunning(run)
    reactor.run()
    os.waitpid(pid, 0)
    print(f"AMP round trip, Admit       {percentiles(admit[100:])}")
    print(f"AMP round trip, StartCheck  {percentiles(check[100:])}")


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def banners(processes: str, connections: int, workdir: Path) -> list[float]:
    port = freePort()
    directory = workdir / f"processes-{processes}"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    configPath = directory / "relayd.yaml"
    configPath.write_text(textwrap.dedent(f"""\
        hostname: bench.localdomain
        listeners: [{{endpoint: "tcp:{port}:interface=127.0.0.1", tls: none, auth: none}}]
        limits: {{connections: 1000, connections_per_client: 1000}}
        queue: {{directory: {directory / 'spool'}}}
        delivery: {{smarthosts: [{{host: 127.0.0.1, port: 9, tls: none}}]}}
        processes: {processes}
        """))
    twistd = Path(sys.executable).parent / "twistd"
    log = open(directory / "relayd.log", "wb")
    env = dict(os.environ, RELAYD_HOSTS_FILE=str(directory / "hosts"))
    (directory / "hosts").write_text("")
    daemon = subprocess.Popen([str(twistd), "-n", "--pidfile=", "--logger",
                               "relayd.logformat.syslogStdout", "relayd", "--config",
                               str(configPath)], cwd=directory, stdout=log,
                              stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 30
        while b"daemon started" not in (directory / "relayd.log").read_bytes():
            if time.monotonic() > deadline or daemon.poll() is not None:
                raise SystemExit(f"bench: relayd (processes {processes}) did not start")
            time.sleep(0.1)
        time.sleep(2.0)  # the workers adopt the sockets
        samples = []
        for _ in range(connections):
            start = time.perf_counter()
            with socket.create_connection(("127.0.0.1", port)) as s:
                data = b""
                while not data.endswith(b"\r\n"):
                    chunk = s.recv(1024)
                    if not chunk:
                        break
                    data += chunk
                samples.append(time.perf_counter() - start)
                s.sendall(b"QUIT\r\n")
                s.recv(1024)
        return samples
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(60)
        log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--connections", type=int, default=500)
    args = parser.parse_args()
    roundTrips(args.calls)
    with tempfile.TemporaryDirectory(prefix="relayd-admission-") as workdir:
        for processes in ("1", "2"):
            samples = banners(processes, args.connections, Path(workdir))
            print(f"connect to 220, processes {processes}  {percentiles(samples[50:])}")


if __name__ == "__main__":
    main()
