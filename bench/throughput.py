#!/usr/bin/env python3
"""
relayd against Postfix on the same machine, in the same run, with the same
durability (both fsync a message before answering 250 to DATA).

Each round runs both relays, alternately, each as a relay to one
smtp-sink on loopback:

    smtp-source --(N messages, S sessions)--> relay --> smtp-sink

and measures
  * accept rate: messages per second until smtp-source has its last 250;
  * end-to-end rate: messages per second until the sink has them all;
  * peak memory: the proportional set size (PSS) summed over all
    processes of each instance (relayd's master and intake workers;
    Postfix's master, smtpd, cleanup, qmgr, smtp, ...), sampled every 0.1 s;
  * CPU per message: the CPU time (user and system) of the same processes
    from the first message to the last delivered, per message, in ms (a
    process that exits between two samples loses its last 0.1 s); and the
    whole machine's busy time per message (the relay, smtp-source,
    smtp-sink, the bench itself and the kernel's interrupt work). Unlike
    rates, these change little with what else the machine runs.
It prints medians per relay and the ratios relayd/Postfix.

Needs root (Postfix), Debian's postfix package (smtp-source, smtp-sink)
and relayd installed in .venv (`make install`). Not part of the test suite.

    sudo .venv/bin/python bench/throughput.py --messages 2000 --sessions 10 --size 1024 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Not under /tmp (Postfix refuses world-writable parents), and under /var:
# Postfix writes maillog_file only below maillog_file_prefixes (/var).
# --workdir changes it, so two benches on one machine do not share it.
BASE = Path("/var/lib/relayd-bench")


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def waitListening(port: int, deadline: float = 20.0) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"bench: nothing listens on 127.0.0.1:{port} after {deadline} s")


class Sink:
    """smtp-sink with a running counter (-c) read from its stdout."""

    def __init__(self, port: int):
        self.count = 0
        args = ["smtp-sink", "-c", "127.0.0.1:%d" % port, "256"]
        if os.geteuid() == 0:
            args[1:1] = ["-u", "nobody"]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        threading.Thread(target=self._read, daemon=True).start()
        waitListening(port)

    def _read(self) -> None:
        buf = b""
        while True:
            data = self.proc.stdout.read1(4096)
            if not data:
                return
            buf = (buf + data)[-64:]
            numbers = re.findall(rb"\d+", buf)
            if numbers:
                self.count = int(numbers[-1])

    def waitFor(self, n: int, deadline: float) -> float | None:
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            if self.count >= n:
                return time.monotonic()
            time.sleep(0.01)
        return None

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def pss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def cpuTicks(pid: int) -> int:
    """User and system CPU time of ``pid`` so far, in clock ticks (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, IndexError, ValueError):
        return 0


def machineBusyTicks() -> int:
    """Clock ticks every CPU spent busy (not idle, not waiting for I/O) since boot."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return sum(fields) - fields[3] - fields[4]


TICK = os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    """The child processes of ``pid`` (relayd's intake workers)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def postfixPids(queueDir: Path) -> list[int]:
    """Every process of this Postfix instance: the master and its children."""
    master = None
    pidFile = queueDir / "pid" / "master.pid"
    try:
        master = int(pidFile.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return []
    pids = [master]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if int(fields[1]) == master:
                    pids.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return pids


class PeakSampler:
    """Every 0.1 s: the relay's memory (its peak kept) and each of its processes' CPU time."""

    def __init__(self, relay):
        self.relay = relay
        self.peak = 0
        # pid -> CPU ticks when first seen (before the run for processes
        # that were there), and when last seen.
        self.first: dict[int, int] = {pid: cpuTicks(pid) for pid in relay.pids()}
        self.last: dict[int, int] = dict(self.first)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(0.1)

    def sample(self) -> None:
        try:
            pids = self.relay.pids()
            self.peak = max(self.peak, sum(pss(p) for p in pids))
        except OSError:
            return
        for pid in pids:
            ticks = cpuTicks(pid)
            self.first.setdefault(pid, 0)  # started during the run
            self.last[pid] = max(self.last.get(pid, 0), ticks)

    def cpuSeconds(self) -> float:
        """CPU time of the relay's processes since this sampler started."""
        self.sample()
        return sum(self.last[p] - self.first[p] for p in self.last) / TICK

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


class Relayd:
    name = "relayd"
    # relayd's processes setting (--processes).
    processes = "1"

    def __init__(self, sinkPort: int, sessions: int):
        self.port = freePort()
        self.dir = BASE / "relayd"
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        config = self.dir / "relayd.yaml"
        config.write_text(textwrap.dedent(f"""\
            hostname: bench.localdomain
            listeners:
              - {{endpoint: "tcp:{self.port}:interface=127.0.0.1:backlog=256", tls: none, auth: none}}
            limits: {{connections: 1000, connections_per_client: 1000}}
            processes: {self.processes}
            queue: {{directory: {self.dir / 'spool'}, retry: {{min: 5s, max: 1m}}}}
            delivery:
              concurrency: 20
              smarthosts: [{{host: 127.0.0.1, port: {sinkPort}, tls: none}}]
            """))
        twistd = Path(sys.executable).parent / "twistd"
        self.log = open(self.dir / "relayd.log", "wb")
        self.proc = subprocess.Popen(
            # Logging as in production (systemd/relayd.service logs through
            # relayd.logformat), to a file here, as Postfix's maillog_file.
            [str(twistd), "-n", "--pidfile=", "--logger", "relayd.logformat.syslogStdout",
             "relayd", "--config", str(config)],
            cwd=self.dir, stdout=self.log, stderr=subprocess.STDOUT)
        waitListening(self.port)

    def pids(self) -> list[int]:
        return [self.proc.pid, *children(self.proc.pid)]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self.log.flush()
        spread = connectionSpread((self.dir / "relayd.log").read_text(errors="replace"))
        if len(spread) > 1:
            print(f"  {self.name}: connections per intake process: "
                  + ", ".join(str(n) for n in sorted(spread.values(), reverse=True)), flush=True)
        self.log.close()


def connectionSpread(log: str) -> dict[str, int]:
    """The SMTP connections each relayd process accepted, by pid, from its log."""
    counts: dict[str, int] = {}
    for pid in re.findall(r"relayd/smtpd\[(\d+)\]: connect from", log):
        counts[pid] = counts.get(pid, 0) + 1
    return counts


def relaydWith(processes: str, several: bool) -> type:
    """The Relayd to run with this processes setting (named for it when several are compared)."""
    return type("Relayd", (Relayd,), {"processes": processes,
                                      "name": f"relayd-{processes}" if several else "relayd"})


class Postfix:
    name = "postfix"

    def __init__(self, sinkPort: int, sessions: int):
        self.port = freePort()
        self.dir = BASE / "postfix"
        if self.dir.exists():
            subprocess.run(["postfix", "-c", str(self.dir / "etc"), "stop"], capture_output=True)
            shutil.rmtree(self.dir)
        etc = self.dir / "etc"
        etc.mkdir(parents=True)
        (self.dir / "data").mkdir()
        (self.dir / "spool").mkdir()
        shutil.chown(self.dir / "data", "postfix")
        master = Path("/etc/postfix/master.cf").read_text()
        master = re.sub(r"(?m)^smtp(\s+)inet", f"{self.port}\\1inet", master, count=1)
        (etc / "master.cf").write_text(master)
        (etc / "main.cf").write_text(textwrap.dedent(f"""\
            compatibility_level = 3.6
            queue_directory = {self.dir / 'spool'}
            data_directory = {self.dir / 'data'}
            maillog_file = {self.dir / 'maillog'}
            inet_interfaces = 127.0.0.1
            inet_protocols = ipv4
            myhostname = bench.localdomain
            mydestination =
            relayhost = [127.0.0.1]:{sinkPort}
            mynetworks = 127.0.0.0/8
            smtpd_relay_restrictions = permit_mynetworks, reject
            smtp_tls_security_level = none
            default_process_limit = 100
            smtpd_client_connection_count_limit = 0
            """))
        # "postfix -c DIR" for a second instance must be allowed by the default main.cf.
        defaultMain = Path("/etc/postfix/main.cf")
        text = defaultMain.read_text() if defaultMain.exists() else "compatibility_level = 3.6\n"
        if str(etc) not in text:
            defaultMain.write_text(text + f"alternate_config_directories = {etc}\n")
        result = subprocess.run(["postfix", "-c", str(etc), "start"], capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"bench: postfix did not start: {result.stdout}{result.stderr}")
        waitListening(self.port)

    def pids(self) -> list[int]:
        return postfixPids(self.dir / "spool")

    def stop(self) -> None:
        subprocess.run(["postfix", "-c", str(self.dir / "etc"), "stop"], capture_output=True)


def runOnce(relayClass, args) -> dict:
    sinkPort = freePort()
    sink = Sink(sinkPort)
    try:
        relay = relayClass(sinkPort, args.sessions)
    except BaseException:
        sink.stop()
        raise
    sampler = PeakSampler(relay)
    try:
        start = time.monotonic()
        machineBefore = machineBusyTicks()
        source = subprocess.run(
            ["smtp-source", "-s", str(args.sessions), "-m", str(args.messages), "-l", str(args.size),
             "-f", "sender@example.com", "-t", "rcpt@example.org", "-M", "bench.localdomain",
             f"127.0.0.1:{relay.port}"],
            capture_output=True, text=True, timeout=args.deadline)
        accepted = time.monotonic()
        if source.returncode != 0:
            raise SystemExit(f"bench: smtp-source failed against {relay.name}: {source.stderr.strip()}")
        delivered = sink.waitFor(args.messages, args.deadline)
        if delivered is None:
            raise SystemExit(f"bench: {relay.name}: sink has {sink.count}/{args.messages} after {args.deadline} s")
        machine = (machineBusyTicks() - machineBefore) / TICK
        relayCpu = sampler.cpuSeconds()
    finally:
        peak = sampler.stop()
        relay.stop()
        sink.stop()
    return {
        "accept": args.messages / (accepted - start),
        "endToEnd": args.messages / (delivered - start),
        "peak": peak,
        "cpu": 1000 * relayCpu / args.messages,
        "machineCpu": 1000 * machine / args.messages,
    }


def main() -> None:
    global BASE
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--size", type=int, default=1024, help="message size in bytes (smtp-source -l)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--deadline", type=float, default=300.0, help="seconds per phase before giving up")
    parser.add_argument("--workdir", type=Path, default=BASE,
                        help=f"spools, configs and logs of both relays, under /var (default {BASE})")
    parser.add_argument("--processes", default="1",
                        help='relayd\'s processes setting: "auto" or a number, or several '
                             'separated by commas, compared in the same run (default 1)')
    args = parser.parse_args()
    settings = [p.strip() for p in args.processes.split(",") if p.strip()]
    relays = [relaydWith(p, len(settings) > 1) for p in settings]
    if os.geteuid() != 0:
        raise SystemExit("bench: run as root (it starts a Postfix instance)")
    for tool in ("smtp-source", "smtp-sink", "postfix"):
        if shutil.which(tool) is None:
            raise SystemExit(f"bench: {tool} not found (apt-get install postfix)")
    BASE = args.workdir.resolve()
    BASE.mkdir(parents=True, exist_ok=True)
    os.chmod(BASE, 0o755)
    loadBefore = os.getloadavg()
    names = [r.name for r in relays] + [Postfix.name]
    results: dict[str, list[dict]] = {name: [] for name in names}
    for round_ in range(args.rounds):
        order = [*relays, Postfix]
        if round_ % 2:
            order.reverse()
        for relayClass in order:
            r = runOnce(relayClass, args)
            results[relayClass.name].append(r)
            print(f"round {round_ + 1} {relayClass.name:10s} accept {r['accept']:8.1f} msg/s  "
                  f"end-to-end {r['endToEnd']:8.1f} msg/s  peak memory {r['peak'] / 1e6:7.1f} MB  "
                  f"CPU {r['cpu']:5.2f} ms/msg (machine {r['machineCpu']:5.2f})  "
                  f"load {os.getloadavg()[0]:.2f}", flush=True)

    def med(name, key):
        return statistics.median(r[key] for r in results[name])

    print()
    # The machine may be shared: the load says how much the figures can be trusted.
    print(f"{args.messages} messages of {args.size} bytes, {args.sessions} sessions, "
          f"{args.rounds} rounds, medians; relayd processes: {', '.join(settings)}; "
          f"{os.cpu_count()} CPUs; load average "
          f"{loadBefore[0]:.2f} before, {os.getloadavg()[0]:.2f} after")
    header = "".join(f"{n:>12s}" for n in names)
    ratios = "".join(f"{r.name + '/postfix':>18s}" for r in relays)
    versusOne = f"{relays[-1].name + '/' + relays[0].name:>20s}" if len(relays) > 1 else ""
    print(f"{'':22s}{header}{ratios}{versusOne}")
    for key, label, unit in (("accept", "accept rate", "msg/s"), ("endToEnd", "end-to-end rate", "msg/s"),
                             ("peak", "peak memory", "MB"), ("cpu", "relay CPU", "ms/msg"),
                             ("machineCpu", "machine CPU", "ms/msg")):
        scale = 1e6 if key == "peak" else 1
        values = "".join(f"{med(n, key) / scale:12.{2 if 'pu' in key else 1}f}" for n in names)
        line = "".join(f"{med(r.name, key) / med(Postfix.name, key):18.2f}" for r in relays)
        if len(relays) > 1:
            line += f"{med(relays[-1].name, key) / med(relays[0].name, key):20.2f}"
        print(f"{label + ' (' + unit + ')':22s}{values}{line}")


if __name__ == "__main__":
    main()
