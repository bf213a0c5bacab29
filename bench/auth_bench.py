"""
Benchmark (not a test) of relayd's AUTH path against the real daemon.

    .venv/bin/python bench/auth_bench.py [--logins 200] [--clients 8] [--burst 50]

For each password scheme relayd-passwd can write (bcrypt at its default
cost, sha512-crypt, argon2) it starts ``twistd relayd`` on 127.0.0.1 with a
loopback plaintext-AUTH listener (so TLS does not blur the figures) and
measures:

- logins per second: ``--logins`` AUTH PLAIN exchanges over ``--clients``
  parallel connections, with the verification cache off, and (bcrypt only)
  on (auth.cache: 10m);
- the latency another session sees: NOOP round trips in a separate
  connection while ``--burst`` AUTHs are being verified at once
  (median and max), beside the idle NOOP latency.

It needs relayd installed in the venv running it (``make install``).
"""

from __future__ import annotations

import argparse
import base64
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HOST = "127.0.0.1"
USER = "bench@example.com"
PASSWORD = "bench password 1234"


def freePort() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def readReply(sock: socket.socket) -> bytes:
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed after {data!r}")
        data += chunk
        lines = data.split(b"\r\n")
        if len(lines) > 1 and lines[-2][3:4] == b" ":
            return data


def session(port: int) -> socket.socket:
    s = socket.create_connection((HOST, port), timeout=120)
    readReply(s)
    s.sendall(b"EHLO bench.test\r\n")
    readReply(s)
    return s


AUTH_LINE = b"AUTH PLAIN " + base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()) + b"\r\n"


def login(port: int) -> None:
    with session(port) as s:
        s.sendall(AUTH_LINE)
        reply = readReply(s)
        assert reply.startswith(b"235"), reply


class Daemon:
    def __init__(self, directory: Path, scheme: str, cache: str):
        self.directory = directory
        self.port = freePort()
        passwd = directory / "passwd"
        subprocess.run([str(Path(sys.executable).parent / "relayd-passwd"), "-f", str(passwd),
                        "add", "--scheme", scheme, USER], input=PASSWORD + "\n", text=True,
                       check=True, capture_output=True)
        (directory / "spool").mkdir()
        (directory / "relayd.yaml").write_text(
            f"hostname: bench.test\n"
            f"listeners:\n"
            f'  - {{endpoint: "tcp:{self.port}:interface={HOST}", tls: none, auth: required, plaintext_auth: true}}\n'
            f"auth: {{password_file: passwd, cache: {cache}, failure_limit: 1000}}\n"
            f"limits: {{connections: 1000, connections_per_client: 1000}}\n"
            f"queue: {{directory: spool}}\n"
            f"delivery: {{smarthosts: [{{host: {HOST}, port: 9, tls: none}}]}}\n")
        self.log = open(directory / "relayd.log", "wb")
        self.process = subprocess.Popen(
            [str(Path(sys.executable).parent / "twistd"), "-n", "--pidfile=", "relayd",
             "--config", "relayd.yaml"], cwd=directory, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection((HOST, self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("relayd did not start")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(40)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


def loginsPerSecond(port: int, logins: int, clients: int) -> float:
    login(port)  # warm up (and fill the cache, when it is on)
    remaining = [logins]
    lock = threading.Lock()

    def worker():
        while True:
            with lock:
                if remaining[0] == 0:
                    return
                remaining[0] -= 1
            login(port)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return logins / (time.perf_counter() - start)


def noopLatencies(s: socket.socket, stop: threading.Event | None, count: int = 0) -> list[float]:
    out = []
    while (stop is not None and not stop.is_set()) or len(out) < count:
        t = time.perf_counter()
        s.sendall(b"NOOP\r\n")
        readReply(s)
        out.append((time.perf_counter() - t) * 1000)
        if stop is not None:
            time.sleep(0.005)
    return out


def latencyDuringBurst(port: int, burst: int) -> tuple[list[float], list[float], float]:
    observer = session(port)
    idle = noopLatencies(observer, None, count=50)
    sockets = [session(port) for _ in range(burst)]
    stop = threading.Event()
    result: list[float] = []
    watcher = threading.Thread(target=lambda: result.extend(noopLatencies(observer, stop)))
    watcher.start()
    start = time.perf_counter()
    for s in sockets:
        s.sendall(AUTH_LINE)
    for s in sockets:
        assert readReply(s).startswith(b"235")
        s.close()
    elapsed = time.perf_counter() - start
    stop.set()
    watcher.join()
    observer.close()
    return idle, result, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--logins", type=int, default=200)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--burst", type=int, default=50)
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs; "
          f"{args.logins} logins over {args.clients} connections; burst of {args.burst} AUTHs")
    runs = [("bcrypt", "0s"), ("bcrypt", "10m"), ("sha512_crypt", "0s"), ("argon2", "0s")]
    for scheme, cache in runs:
        with tempfile.TemporaryDirectory(prefix="relayd-auth-bench-") as tmp:
            daemon = Daemon(Path(tmp), scheme, cache)
            try:
                rate = loginsPerSecond(daemon.port, args.logins if cache == "0s" else args.logins * 10,
                                       args.clients)
                line = f"{scheme:13} cache {cache:3}: {rate:8.1f} logins/s"
                if cache == "0s":
                    idle, busy, elapsed = latencyDuringBurst(daemon.port, args.burst)
                    line += (f"; NOOP idle median {statistics.median(idle):.2f} ms; during "
                             f"{args.burst} AUTHs ({elapsed:.1f} s): median "
                             f"{statistics.median(busy):.2f} ms, max {max(busy):.1f} ms "
                             f"({len(busy)} NOOPs)")
                print(line, flush=True)
            finally:
                daemon.stop()


if __name__ == "__main__":
    main()
