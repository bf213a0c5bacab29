#!/usr/bin/env python3
"""
relayd against Postfix: one command, one table.

    sudo .venv/bin/python bench/compare.py            # the whole table (about 20 minutes on 2 CPUs)
    sudo .venv/bin/python bench/compare.py --quick    # every row scaled down (a few minutes)
    sudo .venv/bin/python bench/compare.py --only small20,paced --rounds 5

Each row runs relayd (the copy installed in the venv running this script)
and a private Postfix instance on the same machine, in the same run, in
alternating order, and prints the medians over the rounds and the ratio
relayd/Postfix. Both relay to smtp-sink on loopback; both fsync a message
before the 250 (Postfix always does; so does relayd); both deliver over at
most 20 connections to the sink; neither throttles intake (Postfix:
in_flow_delay = 0, no anvil limits, process limits above the workload;
relayd: connection and per-user message limits above the workload). The
configurations used are printed after the table.

Rows (``--only`` takes their names, comma-separated):

  small20, small1, small100   4000 x 2 KB over 20, 1 and 100 sessions
                              (smtp-source): accept and end-to-end rate
  large     200 x 1 MB over 10 sessions: end-to-end rate
  paced     2 KB messages at a fixed 200 msg/s over 20 sessions: p50 and
            p99 from the end of the final dot to the 250
  tls       STARTTLS + AUTH PLAIN once per session, then 10 messages
            (2000 in all, 20 sessions at a time): accept rate. relayd
            checks a bcrypt hash with auth.cache on; Postfix uses Cyrus
            SASL with sasldb (plaintext secrets): both verify in
            microseconds after the first login
  backlog   20,000 messages queued while the smarthost is down, then
            `relayctl flush` / `postqueue -f`: drain time and rate
  spool     100,000 messages in the spool at start: time to listening,
            peak memory, drain rate. relayd's spool is written directly in
            its on-disk format (relayd.queue); Postfix's is filled through
            smtp-source with defer_transports = smtp, then Postfix is
            stopped; it is started without it and `postqueue -f` follows
            as soon as it listens
  scheduler relayd's scheduler alone (in this process, task.Clock, a
            courier that succeeds at once): cost per message with 10,000
            and 100,000 queued; relayd only
  idle      2,000 connections that got the banner and stay silent: PSS
            summed over every relayd process, and over Postfix's smtpd
            processes (and its whole instance)

Needs root (Postfix), Debian's postfix (smtp-source, smtp-sink), sasl2-bin
and libsasl2-modules (the tls row), openssl, and relayd installed in .venv
(`make install`). Not part of the test suite. The machine's load average
is printed with the table: the rates of a shared machine vary, read the
ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import math
import os
import re
import resource
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
# Not under /tmp (Postfix refuses world-writable parents), and under /var:
# Postfix writes maillog_file only below maillog_file_prefixes (/var).
BASE = Path("/var/lib/relayd-bench-compare")
HOST = "127.0.0.1"
SENDER = "bench@example.com"
RECIPIENT = "rcpt@example.org"
LOGIN = "bench@example.com"
PASSWORD = "bench password 1234"
# Connections towards the sink, for both relays.
DELIVERY_CONCURRENCY = 20
# Connection and message limits of both relays, above every workload here.
UNLIMITED_MESSAGES = 10_000_000


class BenchError(Exception):
    """A row could not be measured: printed as one line, the bench goes on."""


# Pure helpers (tests/test_bench_compare.py runs them)

def median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def percentile(values: list[float], p: float) -> float | None:
    """The nearest-rank percentile (p in 0..100) of ``values``; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def ratio(relayd: float | None, postfix: float | None) -> float | None:
    if relayd is None or postfix is None or postfix == 0:
        return None
    return relayd / postfix


def formatNumber(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def formatRatio(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if value >= 0.1 else f"{value:.2g}"


@dataclass
class Line:
    """One row of the table: a label, the medians, and which way is better."""

    label: str
    relayd: float | None
    postfix: float | None
    better: str = "higher"  # or "lower"
    note: str = ""


def formatTable(lines: list[Line]) -> str:
    width = max([len(line.label) for line in lines] + [8])
    out = [f"{'':{width}}  {'relayd':>10}  {'postfix':>10}  {'relayd/postfix':>14}  better",
           "-" * (width + 50)]
    for line in lines:
        r = ratio(line.relayd, line.postfix)
        out.append(f"{line.label:{width}}  {formatNumber(line.relayd):>10}  "
                   f"{formatNumber(line.postfix):>10}  {formatRatio(r):>14}  "
                   f"{line.better}{'  ' + line.note if line.note else ''}")
    return "\n".join(out)


def formatConfigs(configs: dict[str, list[str]]) -> str:
    """
    Each relay's first configuration whole, each further one as the lines
    it adds (+) to the first or lacks (-); ``configs`` maps "relay:\ntext"
    to the rows that used it.
    """
    out: list[str] = []
    first: dict[str, list[str]] = {}
    for text, used in configs.items():
        name, _, body = text.partition(":\n")
        rows = ", ".join(dict.fromkeys(used))
        lines = body.splitlines()
        if name not in first:
            first[name] = lines
            out.append(f"--- {name}, rows {rows}:")
            out += ["    " + line for line in lines]
        else:
            out.append(f"--- {name}, rows {rows}: as above, but")
            out += ["  - " + line for line in first[name] if line not in lines]
            out += ["  + " + line for line in lines if line not in first[name]]
    return "\n".join(out)


def message(size: int) -> bytes:
    """A CRLF message of about ``size`` bytes, without the final dot."""
    head = (f"From: <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nSubject: bench\r\n"
            f"Message-ID: <bench@bench.localdomain>\r\n\r\n").encode()
    line = b"x" * 76 + b"\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


# Processes, ports, memory

def freePort() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    try:
        socket.create_connection((HOST, port), timeout=0.5).close()
        return True
    except OSError:
        return False


def waitListening(port: int, deadline: float = 60.0) -> float:
    """Poll until ``port`` accepts a connection; return the monotonic time it did."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if listening(port):
            return time.monotonic()
        time.sleep(0.02)
    raise BenchError(f"nothing listens on {HOST}:{port} after {deadline:g} s")


def waitUntil(condition: Callable[[], bool], deadline: float, what: str) -> float:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if condition():
            return time.monotonic()
        time.sleep(0.01)
    raise BenchError(f"{what} after {deadline:g} s")


def procField(pid: int, name: str, key: str) -> int:
    """A 'Key:  N kB' field of /proc/PID/<name>, in bytes (0 when the process is gone)."""
    try:
        with open(f"/proc/{pid}/{name}") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def rss(pid: int) -> int:
    return procField(pid, "status", "VmRSS:")


def pss(pid: int) -> int:
    return procField(pid, "smaps_rollup", "Pss:")


def children() -> dict[int, list[int]]:
    found: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            found.setdefault(parent, []).append(int(entry))
    return found


def descendants(pid: int) -> list[int]:
    tree = children()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(tree.get(p, []))
    return out


def command(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


class PeakSampler:
    """The largest value of ``measure()``, sampled every 0.2 s in a thread."""

    def __init__(self, measure: Callable[[], int]):
        self.measure = measure
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.measure())
            except OSError:
                pass
            self._stop.wait(0.2)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


class LogCounter:
    """How many lines of a growing log file contain ``needle``."""

    def __init__(self, path: Path, needle: bytes):
        self.path, self.needle = path, needle
        self.offset, self.count = 0, 0

    def poll(self) -> int:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return self.count
        complete = data.rfind(b"\n") + 1  # a line being written is counted next time
        self.count += data[:complete].count(self.needle)
        self.offset += complete
        return self.count


class Sink:
    """smtp-sink with a running count of messages (-c) read from its stdout."""

    def __init__(self, port: int):
        self.count = 0
        self.port = port
        self.proc = subprocess.Popen(["smtp-sink", "-u", "nobody", "-c", f"{HOST}:{port}", "1024"],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
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

    def waitFor(self, n: int, deadline: float) -> float:
        return waitUntil(lambda: self.count >= n, deadline, f"the sink has {self.count}/{n} messages")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def smtpSource(port: int, messages: int, sessions: int, size: int, deadline: float) -> float:
    """Send with smtp-source; the monotonic time of its last 250."""
    result = subprocess.run(
        ["smtp-source", "-s", str(sessions), "-m", str(messages), "-l", str(size),
         "-f", SENDER, "-t", RECIPIENT, "-M", "bench.localdomain", f"{HOST}:{port}"],
        capture_output=True, text=True, timeout=deadline)
    if result.returncode != 0:
        raise BenchError(f"smtp-source failed: {(result.stderr or result.stdout).strip()[-300:]}")
    return time.monotonic()


# The two relays

@dataclass
class Profile:
    """What a row needs from a relay; each relay turns it into its own configuration."""

    connections: int = 200
    tls: bool = False
    holdRetries: bool = False  # retry only when flushed (backlog, spool rows)
    deferDelivery: bool = False  # Postfix only: queue without trying (filling the spool row)


class Relay:
    name = ""

    def __init__(self, base: Path, port: int, sinkPort: int, profile: Profile, tlsFiles: tuple[Path, Path]):
        self.port, self.sinkPort, self.profile = port, sinkPort, profile
        self.certificate, self.key = tlsFiles
        self.dir = base / self.name

    def memoryAll(self) -> int:
        return sum(pss(p) for p in self.pids())


class Relayd(Relay):
    name = "relayd"

    def config(self) -> str:
        p = self.profile
        spool = self.dir / "spool"
        if p.tls:
            listener = (f'{{endpoint: "tcp:{self.port}:interface={HOST}:backlog=1024", '
                        f'tls: starttls, auth: required}}')
            tls = (f"tls: {{certificate: {self.certificate}, key: {self.key}}}\n"
                   f"auth: {{password_file: {self.dir / 'passwd'}, cache: 10m, failure_limit: 1000}}\n")
        else:
            listener = f'{{endpoint: "tcp:{self.port}:interface={HOST}:backlog=1024", tls: none, auth: none}}'
            tls = ""
        retry = "{min: 1h, max: 1h}" if p.holdRetries else "{min: 5s, max: 1m}"
        return (f"hostname: bench.localdomain\n"
                f"listeners:\n  - {listener}\n{tls}"
                f"limits: {{connections: {p.connections}, connections_per_client: {p.connections}, "
                f"messages_per_user_per_hour: {UNLIMITED_MESSAGES}}}\n"
                f"queue: {{directory: {spool}, retry: {retry}}}\n"
                f"delivery:\n"
                f"  concurrency: {DELIVERY_CONCURRENCY}\n"
                f"  destination_concurrency: {DELIVERY_CONCURRENCY}\n"
                f"  smarthosts: [{{host: {HOST}, port: {self.sinkPort}, tls: none}}]\n")

    def prepare(self, fresh: bool = True) -> None:
        if fresh:
            shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.configPath = self.dir / "relayd.yaml"
        self.configPath.write_text(self.config())
        if self.profile.tls and not (self.dir / "passwd").exists():
            subprocess.run([str(Path(sys.executable).parent / "relayd-passwd"), "-f", str(self.dir / "passwd"),
                            "add", LOGIN], input=PASSWORD + "\n", text=True, check=True,
                           capture_output=True)
        self.log = self.dir / "relayd.log"

    def start(self) -> float:
        """Start the daemon; the monotonic time it was started."""
        twistd = Path(sys.executable).parent / "twistd"
        self.logFile = open(self.log, "ab")
        started = time.monotonic()
        self.proc = subprocess.Popen(
            # Logging as in production (systemd/relayd.service logs through
            # relayd.logformat), to a file here, as Postfix's maillog_file.
            [str(twistd), "-n", "--pidfile=", "--logger", "relayd.logformat.syslogStdout",
             "relayd", "--config", str(self.configPath)],
            cwd=self.dir, stdout=self.logFile, stderr=subprocess.STDOUT)
        return started

    def waitListening(self) -> float:
        end = time.monotonic() + 120
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise BenchError(f"relayd exited with {self.proc.returncode}; see {self.log}")
            if listening(self.port):
                return time.monotonic()
            time.sleep(0.02)
        raise BenchError("relayd does not listen after 120 s")

    def pids(self) -> list[int]:
        return descendants(self.proc.pid) if self.proc.poll() is None else []

    def memoryMain(self) -> int:
        return rss(self.proc.pid)

    def memoryListeners(self) -> int:
        return self.memoryAll()

    def deferredLog(self) -> LogCounter:
        return LogCounter(self.log, b"status=deferred")

    def flush(self) -> None:
        result = subprocess.run([str(Path(sys.executable).parent / "relayctl"), "-c", str(self.configPath),
                                 "flush"], capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise BenchError(f"relayctl flush: {(result.stderr or result.stdout).strip()}")

    def stop(self) -> None:
        if getattr(self, "proc", None) is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "logFile", None) is not None:
            self.logFile.close()
            self.logFile = None


def allowConfigDirectory(etc: Path, main: Path = Path("/etc/postfix/main.cf")) -> None:
    """
    ``postfix -c DIR`` and postqueue need DIR in the default main.cf's
    alternate_config_directories. One line listing every directory: each
    further line with that name would override the earlier ones.
    """
    text = main.read_text() if main.exists() else "compatibility_level = 3.6\n"
    pattern = re.compile(r"(?m)^alternate_config_directories\s*=\s*(.*)\n?")
    listed: list[str] = []
    for value in pattern.findall(text):
        listed += [d for d in re.split(r"[\s,]+", value.strip()) if d and d not in listed]
    if str(etc) in listed and len(pattern.findall(text)) == 1:
        return
    if str(etc) not in listed:
        listed.append(str(etc))
    text = pattern.sub("", text)
    text += ("" if text.endswith("\n") or not text else "\n")
    text += f"alternate_config_directories = {', '.join(listed)}\n"
    temporary = main.with_name("main.cf.relayd-bench")
    temporary.write_text(text)
    os.replace(temporary, main)


class Postfix(Relay):
    name = "postfix"

    def mainCf(self) -> str:
        p = self.profile
        text = textwrap.dedent(f"""\
            compatibility_level = 3.6
            queue_directory = {self.dir / 'spool'}
            data_directory = {self.dir / 'data'}
            maillog_file = {self.dir / 'maillog'}
            inet_interfaces = {HOST}
            inet_protocols = ipv4
            myhostname = bench.localdomain
            mydestination =
            relayhost = [{HOST}]:{self.sinkPort}
            mynetworks = 127.0.0.0/8
            smtpd_relay_restrictions = {'permit_sasl_authenticated' if p.tls else 'permit_mynetworks'}, reject
            smtp_tls_security_level = none
            alias_maps =
            alias_database =
            # no intake throttles
            in_flow_delay = 0
            default_process_limit = {p.connections + 100}
            smtpd_client_connection_count_limit = 0
            smtpd_client_connection_rate_limit = 0
            smtpd_client_message_rate_limit = 0
            # towards the sink: {DELIVERY_CONCURRENCY} connections, as relayd's delivery.concurrency
            default_destination_concurrency_limit = {DELIVERY_CONCURRENCY}
            initial_destination_concurrency = {DELIVERY_CONCURRENCY}
            """)
        if p.holdRetries:
            text += textwrap.dedent("""\
                # retry only when flushed
                minimal_backoff_time = 1h
                maximal_backoff_time = 1h
                queue_run_delay = 1h
                """)
        if p.deferDelivery:
            text += "defer_transports = smtp\n"
        if p.tls:
            text += textwrap.dedent(f"""\
                smtpd_tls_cert_file = {self.certificate}
                smtpd_tls_key_file = {self.key}
                smtpd_tls_security_level = may
                smtpd_tls_auth_only = yes
                smtpd_sasl_auth_enable = yes
                smtpd_sasl_type = cyrus
                smtpd_sasl_path = smtpd
                cyrus_sasl_config_path = {self.dir / 'etc' / 'sasl'}
                """)
        return text

    def masterCf(self) -> str:
        """Debian's master.cf, smtpd on our port, nothing chrooted (sasldb and /etc as they are)."""
        lines = []
        for line in Path("/etc/postfix/master.cf").read_text().splitlines():
            fields = line.split()
            if line and not line[0].isspace() and not line.startswith("#") and len(fields) >= 8:
                if fields[0] == "smtp" and fields[1] == "inet":
                    fields[0] = str(self.port)
                fields[4] = "n"
                line = " ".join(fields[:8]) + (" " + " ".join(fields[8:]) if fields[8:] else "")
            lines.append(line)
        return "\n".join(lines) + "\n"

    def config(self) -> str:
        smtpd = next(line for line in self.masterCf().splitlines() if line.startswith(f"{self.port} inet"))
        return self.mainCf() + f"# master.cf: Debian's, no chroot; smtpd:\n# {smtpd}\n"

    def prepare(self, fresh: bool = True) -> None:
        self.etc = self.dir / "etc"
        if fresh:
            if self.dir.exists():
                subprocess.run(["postfix", "-c", str(self.etc), "stop"], capture_output=True)
                shutil.rmtree(self.dir)
            self.etc.mkdir(parents=True)
            (self.dir / "data").mkdir()
            (self.dir / "spool").mkdir()
            shutil.chown(self.dir / "data", "postfix")
        (self.etc / "main.cf").write_text(self.mainCf())
        (self.etc / "master.cf").write_text(self.masterCf())
        if self.profile.tls and not (self.dir / "sasldb2").exists():
            # Debian's Postfix reads smtpd.conf from <config_directory>/sasl
            # (cyrus_sasl_config_path alone is not enough there).
            sasl = self.etc / "sasl"
            sasl.mkdir(exist_ok=True)
            (sasl / "smtpd.conf").write_text(
                f"pwcheck_method: auxprop\nauxprop_plugin: sasldb\nmech_list: PLAIN\n"
                f"sasldb_path: {self.dir / 'sasldb2'}\n")
            user, _, realm = LOGIN.partition("@")
            subprocess.run(["saslpasswd2", "-p", "-c", "-f", str(self.dir / "sasldb2"), "-u", realm, user],
                           input=PASSWORD, text=True, check=True, capture_output=True)
            shutil.chown(self.dir / "sasldb2", "postfix")
        allowConfigDirectory(self.etc)
        self.log = self.dir / "maillog"

    def start(self) -> float:
        started = time.monotonic()
        result = subprocess.run(["postfix", "-c", str(self.etc), "start"], capture_output=True, text=True)
        if result.returncode != 0:
            raise BenchError(f"postfix did not start: {(result.stdout + result.stderr).strip()[-300:]}")
        return started

    def waitListening(self) -> float:
        return waitListening(self.port, 120)

    def master(self) -> int | None:
        try:
            return int((self.dir / "spool" / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def pids(self) -> list[int]:
        master = self.master()
        return descendants(master) if master is not None and os.path.exists(f"/proc/{master}") else []

    def memoryListeners(self) -> int:
        return sum(pss(p) for p in self.pids() if command(p) == "smtpd")

    def deferredLog(self) -> LogCounter:
        return LogCounter(self.log, b"status=deferred")

    def queued(self, queue: str) -> int:
        return sum(len(files) for _, _, files in os.walk(self.dir / "spool" / queue))

    def flush(self) -> None:
        result = subprocess.run(["postqueue", "-c", str(self.etc), "-f"], capture_output=True, text=True,
                                timeout=120)
        if result.returncode != 0:
            raise BenchError(f"postqueue -f: {(result.stderr or result.stdout).strip()}")

    def stop(self) -> None:
        master = self.master()
        subprocess.run(["postfix", "-c", str(self.etc), "stop"], capture_output=True)
        if master is not None:
            try:
                waitUntil(lambda: not os.path.exists(f"/proc/{master}"), 30, "postfix still runs")
            except BenchError:
                pass


RELAYS = {"relayd": Relayd, "postfix": Postfix}


# SMTP clients for the rows smtp-source cannot do

async def readReply(reader: asyncio.StreamReader) -> bytes:
    lines = []
    while True:
        line = await reader.readline()
        if not line:
            raise BenchError(f"connection closed after {b''.join(lines)[-200:]!r}")
        lines.append(line)
        if line[3:4] != b"-":
            return b"".join(lines)


async def exchange(reader, writer, line: bytes | None, expect: bytes) -> bytes:
    if line is not None:
        writer.write(line)
    reply = await readReply(reader)
    if not reply.startswith(expect):
        raise BenchError(f"{(line or b'connect').split()[0].decode()}: {reply.strip()[:200].decode(errors='replace')}")
    return reply


async def connect(port: int):
    reader, writer = await asyncio.open_connection(HOST, port)
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    await exchange(reader, writer, None, b"220")
    await exchange(reader, writer, b"EHLO client.localdomain\r\n", b"250")
    return reader, writer


async def transaction(reader, writer, body: bytes) -> float:
    """One message; the seconds from the end of the final dot to the 250."""
    await exchange(reader, writer, f"MAIL FROM:<{SENDER}>\r\n".encode(), b"250")
    await exchange(reader, writer, f"RCPT TO:<{RECIPIENT}>\r\n".encode(), b"250")
    await exchange(reader, writer, b"DATA\r\n", b"354")
    writer.write(body + b".\r\n")
    await writer.drain()
    sent = time.perf_counter()
    await exchange(reader, writer, None, b"250")
    return time.perf_counter() - sent


async def closeSession(reader, writer) -> None:
    writer.write(b"QUIT\r\n")
    try:
        await readReply(reader)
    except (BenchError, ConnectionError):
        pass
    writer.close()


async def paced(port: int, messages: int, sessions: int, rate: float, body: bytes) -> tuple[list[float], float]:
    """``messages`` at ``rate`` per second in all, spread over ``sessions``: the dot-to-250 latencies, the rate achieved."""
    latencies: list[float] = []
    loop = asyncio.get_running_loop()
    period = sessions / rate
    start = loop.time() + 0.5

    async def session(index: int, count: int) -> None:
        reader, writer = await connect(port)
        for i in range(count):
            delay = start + index / rate + i * period - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            latencies.append(await transaction(reader, writer, body))
        await closeSession(reader, writer)

    counts = [messages // sessions + (1 if i < messages % sessions else 0) for i in range(sessions)]
    await asyncio.gather(*(session(i, n) for i, n in enumerate(counts)))
    # The rate achieved: from the first scheduled send until the last 250.
    return latencies, messages / (loop.time() - start)


async def authenticated(port: int, messages: int, sessions: int, perSession: int, body: bytes) -> None:
    """``messages`` in sessions of ``perSession``, each STARTTLS + AUTH PLAIN, ``sessions`` at a time."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    auth = b"AUTH PLAIN " + base64.b64encode(f"\0{LOGIN}\0{PASSWORD}".encode()) + b"\r\n"
    left = [messages]

    async def worker() -> None:
        while left[0] > 0:
            count = min(perSession, left[0])
            left[0] -= count
            reader, writer = await connect(port)
            await exchange(reader, writer, b"STARTTLS\r\n", b"220")
            await writer.start_tls(context)
            await exchange(reader, writer, b"EHLO client.localdomain\r\n", b"250")
            await exchange(reader, writer, auth, b"235")
            for _ in range(count):
                await transaction(reader, writer, body)
            await closeSession(reader, writer)

    await asyncio.gather(*(worker() for _ in range(sessions)))


def idleConnections(port: int, count: int, deadline: float) -> list[socket.socket]:
    """``count`` connections that got their banner (opened 50 at a time)."""
    sockets: list[socket.socket] = []
    end = time.monotonic() + deadline
    try:
        while len(sockets) < count:
            if time.monotonic() > end:
                raise BenchError(f"{len(sockets)}/{count} idle connections after {deadline:g} s")
            batch = []
            for _ in range(min(50, count - len(sockets))):
                s = socket.create_connection((HOST, port), timeout=60)
                batch.append(s)
                sockets.append(s)
            for s in batch:
                if not s.recv(1024).startswith(b"220"):
                    raise BenchError("an idle connection got no 220 banner")
    except BaseException:
        for s in sockets:
            s.close()
        raise
    return sockets


# relayd's spool, written directly in its on-disk format

def writeRelaydSpool(directory: Path, count: int, size: int) -> None:
    """
    ``count`` queued messages as the installed relayd writes them (its own
    encoders; without the fsync of each commit): one ``.msg`` file each, or
    an ``.eml`` and ``.env`` pair for a relayd from before one file per
    message, so a benchmark of either build drains what that build writes.
    """
    from relayd import queue as spool
    from relayd.envelope import Envelope, Recipient, newQueueId

    for name in (spool.QUEUE, spool.TMP, spool.QUARANTINE):
        (directory / name).mkdir(parents=True, mode=0o700, exist_ok=True)
    body = message(size) + b""
    now = time.time()
    queue = directory / spool.QUEUE
    oneFile = hasattr(spool, "encodeMessageEnd")
    for _ in range(count):
        envelope = Envelope(queueId=newQueueId(), sender=SENDER, recipients=[Recipient(RECIPIENT)],
                            arrival=now, size=len(body), clientAddress=HOST, clientName="localhost",
                            helo="client.localdomain", nextAttempt=now)
        encoded = spool.encodeEnvelope(envelope)
        if oneFile:
            with open(queue / (envelope.queueId + spool.MESSAGE_SUFFIX), "wb") as f:
                f.write(body + spool.encodeMessageEnd(len(body), encoded))
            continue
        with open(queue / (envelope.queueId + spool.BODY_SUFFIX), "wb") as f:
            f.write(body)
        with open(queue / (envelope.queueId + spool.ENVELOPE_SUFFIX), "wb") as f:
            f.write(encoded)
    os.sync()


# The rows

@dataclass
class Row:
    name: str
    title: str
    profile: Profile
    run: Callable  # (relay, args) -> dict of metric -> value
    metrics: list  # (key, label, better)
    rounds: int | None = None  # None: --rounds
    relays: tuple = ("relayd", "postfix")
    results: dict = field(default_factory=lambda: {"relayd": [], "postfix": []})


def withSink(relay, work, sinkUp: bool = True):
    """Start the sink (unless the row starts it) and the relay, run ``work``, stop both."""
    sink = Sink(relay.sinkPort) if sinkUp else None
    try:
        relay.prepare()
        return work(relay, sink)
    finally:
        relay.stop()
        if sink is not None:
            sink.stop()


def throughputRun(messages: int, sessions: int, size: int, deadline: float):
    def run(relay, args):
        def work(relay, sink):
            relay.start()
            relay.waitListening()
            start = time.monotonic()
            accepted = smtpSource(relay.port, messages, sessions, size, deadline)
            delivered = sink.waitFor(messages, deadline)
            return {"accept": messages / (accepted - start), "endToEnd": messages / (delivered - start)}
        return withSink(relay, work)
    return run


def pacedRun(messages: int, sessions: int, rate: float, size: int, deadline: float):
    def run(relay, args):
        def work(relay, sink):
            relay.start()
            relay.waitListening()
            latencies, achieved = asyncio.run(asyncio.wait_for(
                paced(relay.port, messages, sessions, rate, message(size)), deadline))
            sink.waitFor(messages, deadline)
            return {"p50": percentile(latencies, 50) * 1000, "p99": percentile(latencies, 99) * 1000,
                    "achieved": achieved}
        return withSink(relay, work)
    return run


def tlsRun(messages: int, sessions: int, perSession: int, size: int, deadline: float):
    def run(relay, args):
        def work(relay, sink):
            relay.start()
            relay.waitListening()
            start = time.monotonic()
            asyncio.run(asyncio.wait_for(
                authenticated(relay.port, messages, sessions, perSession, message(size)), deadline))
            accepted = time.monotonic()
            sink.waitFor(messages, deadline)
            return {"accept": messages / (accepted - start)}
        return withSink(relay, work)
    return run


def backlogRun(messages: int, size: int, deadline: float):
    def run(relay, args):
        def work(relay, _):
            deferred = relay.deferredLog()
            relay.start()
            relay.waitListening()
            smtpSource(relay.port, messages, 20, size, deadline)
            waitUntil(lambda: deferred.poll() >= messages, deadline,
                      f"{relay.name} logged {deferred.count}/{messages} deferrals")
            sink = Sink(relay.sinkPort)
            try:
                start = time.monotonic()
                relay.flush()
                done = sink.waitFor(messages, deadline)
            finally:
                sink.stop()
            return {"drainTime": done - start, "drainRate": messages / (done - start)}
        return withSink(relay, work, sinkUp=False)
    return run


def spoolRun(messages: int, size: int, deadline: float):
    def run(relay, args):
        def work(relay, sink):
            if isinstance(relay, Relayd):
                writeRelaydSpool(relay.dir / "spool", messages, size)
            else:
                # Filled through Postfix itself, delivery deferred, then stopped.
                relay.profile.deferDelivery = True
                relay.prepare(fresh=False)
                relay.start()
                relay.waitListening()
                smtpSource(relay.port, messages, 20, size, deadline)
                waitUntil(lambda: relay.queued("deferred") >= messages, deadline,
                          f"postfix deferred {relay.queued('deferred')}/{messages}")
                relay.stop()
                relay.profile.deferDelivery = False
                relay.prepare(fresh=False)
                os.sync()
            started = relay.start()
            sampler = PeakSampler(relay.memoryAll if isinstance(relay, Postfix) else relay.memoryMain)
            try:
                up = relay.waitListening()
                if isinstance(relay, Postfix):
                    relay.flush()
                atListening = (relay.memoryAll() if isinstance(relay, Postfix) else relay.memoryMain())
                done = sink.waitFor(messages, deadline)
            finally:
                peak = sampler.stop()
            return {"startup": up - started, "memoryUp": atListening / 1e6, "memoryPeak": peak / 1e6,
                    "drainRate": messages / (done - started)}
        return withSink(relay, work)
    return run


def idleRun(connections: int, deadline: float):
    def run(relay, args):
        def work(relay, sink):
            relay.start()
            relay.waitListening()
            time.sleep(1)
            before = relay.memoryAll()
            sockets = idleConnections(relay.port, connections, deadline)
            try:
                time.sleep(2)
                listeners, everything = relay.memoryListeners(), relay.memoryAll()
            finally:
                for s in sockets:
                    s.close()
            return {"listeners": listeners / 1e6, "all": everything / 1e6,
                    "perConnection": (everything - before) / connections / 1e3}
        return withSink(relay, work)
    return run


def schedulerCost(count: int) -> dict:
    """relayd's scheduler with ``count`` queued: microseconds per message to load and to drain."""
    import io

    from twisted.internet import defer, task

    from relayd import config
    from relayd.delivery import AttemptResult, RecipientResult
    from relayd.envelope import Envelope, Recipient, Status, newQueueId
    from relayd.scheduler import Scheduler

    settings = config.parse(Relayd(BASE, 25, 2525, Profile(), (Path("c"), Path("k"))).config(), "bench.yaml")
    body = message(2048)

    class Spool:
        def openBody(self, queueId):
            return io.BytesIO(body)

        def update(self, envelope):
            pass

        def remove(self, queueId):  # relayd before removeEnvelope
            pass

        def removeEnvelope(self, queueId):
            pass

        def removeBody(self, queueId):
            pass

    delivered = [0]

    class Courier:
        def deliver(self, destination, sender, mailParams, recipients, openBody, size, **options):
            delivered[0] += len(recipients)
            return defer.succeed(AttemptResult(
                relay="sink[127.0.0.1]:25", connectSeconds=0.0, transmitSeconds=0.0,
                results=tuple(RecipientResult(address=r, code=250, dsn="2.0.0", text="250 ok",
                                              status=Status.SENT) for r in recipients)))

    clock = task.Clock()
    clock.advance(time.time())
    scheduler = Scheduler(Spool(), Courier(), settings, clock)
    envelopes = [Envelope(queueId=newQueueId(), sender=SENDER, recipients=[Recipient(RECIPIENT)],
                          arrival=clock.seconds(), size=len(body), nextAttempt=clock.seconds())
                 for _ in range(count)]
    start = time.perf_counter()
    for envelope in envelopes:
        scheduler.add(envelope)
    loaded = time.perf_counter()
    scheduler.startService()
    drained = time.perf_counter()
    if delivered[0] != count or scheduler.queueLength() != 0:
        raise BenchError(f"scheduler delivered {delivered[0]}/{count}, {scheduler.queueLength()} left")
    return {"load": (loaded - start) / count * 1e6, "drain": (drained - loaded) / count * 1e6}


def makeRows(args) -> list[Row]:
    s = args.scale

    def n(full: int, least: int) -> int:
        return max(least, int(full * s))

    d = args.deadline
    small = n(4000, 200)
    rate = args.rate
    paced_ = n(int(rate * 10), 100)
    return [
        Row("small20", f"{small} x 2 KB, 20 sessions", Profile(), throughputRun(small, 20, 2048, d),
            [("accept", "accept rate (msg/s)", "higher"), ("endToEnd", "end-to-end rate (msg/s)", "higher")]),
        Row("small1", f"{small} x 2 KB, 1 session", Profile(), throughputRun(small, 1, 2048, d),
            [("accept", "accept rate (msg/s)", "higher"), ("endToEnd", "end-to-end rate (msg/s)", "higher")]),
        Row("small100", f"{small} x 2 KB, 100 sessions", Profile(), throughputRun(small, 100, 2048, d),
            [("accept", "accept rate (msg/s)", "higher"), ("endToEnd", "end-to-end rate (msg/s)", "higher")]),
        Row("large", f"{n(200, 20)} x 1 MB, 10 sessions", Profile(), throughputRun(n(200, 20), 10, 1_000_000, d),
            [("endToEnd", "end-to-end rate (msg/s)", "higher")]),
        Row("paced", f"{paced_} x 2 KB paced at {rate:g} msg/s, 20 sessions", Profile(),
            pacedRun(paced_, 20, rate, 2048, d),
            [("p50", "dot to 250, p50 (ms)", "lower"), ("p99", "dot to 250, p99 (ms)", "lower"),
             ("achieved", "rate achieved (msg/s)", "higher")]),
        Row("tls", f"{n(2000, 100)} x 2 KB, STARTTLS + AUTH PLAIN per 10 messages, 20 sessions",
            Profile(tls=True), tlsRun(n(2000, 100), 20, 10, 2048, d),
            [("accept", "accept rate (msg/s)", "higher")]),
        Row("backlog", f"{n(20000, 1000)} x 2 KB queued while the sink is down, then flushed",
            Profile(holdRetries=True), backlogRun(n(20000, 1000), 2048, d),
            [("drainTime", "drain time (s)", "lower"), ("drainRate", "drain rate (msg/s)", "higher")],
            rounds=args.heavy_rounds),
        Row("spool", f"{n(100000, 5000)} x 2 KB in the spool at start", Profile(holdRetries=True),
            spoolRun(n(100000, 5000), 2048, d),
            [("startup", "start-up to listening (s)", "lower"),
             ("memoryUp", "memory when listening (MB; relayd RSS, Postfix PSS)", "lower"),
             ("memoryPeak", "peak memory (MB; relayd RSS, Postfix PSS)", "lower"),
             ("drainRate", "drain rate from start (msg/s)", "higher")],
            rounds=args.heavy_rounds),
        Row("scheduler", "relayd's scheduler alone (us per message)", Profile(), None, [], relays=("relayd",)),
        Row("idle", f"{n(2000, 200)} idle connections", Profile(connections=n(2000, 200) + 100),
            idleRun(n(2000, 200), d),
            [("listeners", "PSS (MB; relayd all, Postfix smtpd)", "lower"),
             ("all", "PSS of every process (MB)", "lower"),
             ("perConnection", "per connection (kB of all PSS)", "lower")],
            rounds=args.heavy_rounds),
    ]


def makeTlsFiles(base: Path) -> tuple[Path, Path]:
    certificate, key = base / "cert.pem", base / "key.pem"
    if not certificate.exists():
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                        "-out", str(certificate), "-days", "30", "-subj", "/CN=bench.localdomain"],
                       check=True, capture_output=True)
    return certificate, key


def runRows(rows: list[Row], args, tlsFiles) -> tuple[list[Line], dict[str, list[str]]]:
    lines: list[Line] = []
    configs: dict[str, list[str]] = {}  # each distinct configuration text -> the rows that used it
    ports = {"relayd": freePort(), "postfix": freePort()}
    sinkPort = freePort()
    for row in rows:
        print(f"== {row.name}: {row.title}", flush=True)
        if row.name == "scheduler":
            sizes = (max(1000, int(10000 * args.scale)), max(10000, int(100000 * args.scale)))
            for count in sizes:
                cost = schedulerCost(count)
                print(f"   {count} queued: load {cost['load']:.1f} us, drain {cost['drain']:.1f} us per message",
                      flush=True)
                lines.append(Line(f"scheduler, {count:,} queued: load (us/msg)", cost["load"], None, "lower"))
                lines.append(Line(f"scheduler, {count:,} queued: drain (us/msg)", cost["drain"], None, "lower"))
            continue
        rounds = row.rounds or args.rounds
        failed = None
        for round_ in range(rounds):
            order = row.relays if round_ % 2 == 0 else tuple(reversed(row.relays))
            for name in order:
                relay = RELAYS[name](args.workdir, ports[name], sinkPort,
                                     Profile(**vars(row.profile)), tlsFiles)
                configs.setdefault(f"{name}:\n{relay.config()}", []).append(row.name)
                try:
                    result = row.run(relay, args)
                except (BenchError, subprocess.TimeoutExpired, asyncio.TimeoutError, OSError) as e:
                    failed = f"{name}: {e or type(e).__name__}"
                    print(f"   round {round_ + 1} {name}: FAILED: {failed}", flush=True)
                    break
                row.results[name].append(result)
                print(f"   round {round_ + 1} {name:8s} " + "  ".join(
                    f"{key} {formatNumber(value)}" for key, value in result.items()), flush=True)
            if failed:
                break
        for key, label, better in row.metrics:
            lines.append(Line(f"{row.title}: {label}",
                              median([r[key] for r in row.results["relayd"]]),
                              median([r[key] for r in row.results["postfix"]]), better,
                              f"FAILED ({failed})" if failed else ""))
    return lines, configs


def stopped(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="every row scaled down (--scale 0.1 --rounds 1): a check in a few minutes")
    parser.add_argument("--scale", type=float, default=None, help="multiply every row's size (default 1)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per relay, alternating (default 3)")
    parser.add_argument("--heavy-rounds", type=int, default=1,
                        help="rounds for the backlog, spool and idle rows (default 1)")
    parser.add_argument("--only", default="", help="comma-separated row names (default: all)")
    parser.add_argument("--rate", type=float, default=200.0, help="the paced row's rate (msg/s)")
    parser.add_argument("--deadline", type=float, default=1800.0, help="seconds per phase before giving up")
    parser.add_argument("--workdir", type=Path, default=BASE,
                        help=f"spools, configs and logs of both relays, under /var (default {BASE})")
    args = parser.parse_args(argv)
    args.scale = args.scale if args.scale is not None else (0.1 if args.quick else 1.0)
    args.rounds = args.rounds if args.rounds is not None else (1 if args.quick else 3)
    rows = makeRows(args)
    names = [r.name for r in rows]
    wanted = [w for w in args.only.split(",") if w]
    unknown = [w for w in wanted if w not in names]
    if unknown:
        parser.error(f"unknown row {', '.join(unknown)}; rows: {', '.join(names)}")
    rows = [r for r in rows if not wanted or r.name in wanted]
    if os.geteuid() != 0:
        raise SystemExit("bench: run as root (it starts a Postfix instance)")
    for tool in ("smtp-source", "smtp-sink", "postfix", "postqueue", "saslpasswd2", "openssl"):
        if shutil.which(tool) is None:
            raise SystemExit(f"bench: {tool} not found (apt-get install postfix sasl2-bin libsasl2-modules openssl)")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 20000:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (20000, 20000))
        except (ValueError, OSError):
            pass
    else:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 65536, hard))
    # Stopped with SIGTERM: stop the relays and sinks of the running row too.
    signal.signal(signal.SIGTERM, stopped)
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    os.chmod(args.workdir, 0o755)
    tlsFiles = makeTlsFiles(args.workdir)
    loadBefore = os.getloadavg()
    began = time.monotonic()
    lines, configs = runRows(rows, args, tlsFiles)
    loadAfter = os.getloadavg()

    print()
    print(f"relayd vs Postfix {subprocess.run(['postconf', '-d', '-h', 'mail_version'], capture_output=True, text=True).stdout.strip()}"
          f", medians of {args.rounds} rounds ({args.heavy_rounds} for backlog, spool, idle), scale {args.scale:g}; "
          f"{os.cpu_count()} CPUs; load average {loadBefore[0]:.2f} {loadBefore[1]:.2f} {loadBefore[2]:.2f} "
          f"before, {loadAfter[0]:.2f} {loadAfter[1]:.2f} {loadAfter[2]:.2f} after; "
          f"{(time.monotonic() - began) / 60:.1f} minutes")
    print(formatTable(lines))
    print()
    print("Configurations (ports and paths of this run):")
    print(formatConfigs(configs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
