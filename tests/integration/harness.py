"""
Real processes for the integration tests: the installed daemon, SMTP sinks.

relayd runs as ``<venv>/bin/twistd -n --pidfile= relayd --config FILE``,
exactly as an admin starts it, so the plugin is found from the installed
package in site-packages (never from the source tree: the process runs with
its working directory in the test's temporary directory). The venv is the
one running pytest (``sys.executable``); ``RELAYD_TWISTD`` overrides the
twistd path.

Everything listens on 127.0.0.1 on ports picked free by the kernel, and
every wait has a deadline; a failed wait says what was expected and shows
the tail of the daemon's log.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

HOST = "127.0.0.1"
HOSTNAME = "relay.test.example"

# Bounds on every wait. None of them is a performance threshold: each is
# only there so that a broken daemon fails the test instead of hanging it.
START_DEADLINE = 20.0  # relayd (or a sink) listening after spawn
STOP_DEADLINE = 30.0  # process exited after SIGTERM (shutdown_grace is 5s here)
DELIVERY_DEADLINE = 60.0  # message at the sink / log line written
SMTP_TIMEOUT = 30.0  # per socket operation of a test's SMTP client

SHUTDOWN_GRACE = "5s"
RETRY_MIN = "1s"
RETRY_MAX = "5s"

QUEUED_REPLY = re.compile(rb"2\.0\.0 Ok: queued as ([0-9A-Z]{16})")

SINK_SCRIPT = Path(__file__).with_name("sink.py")
SMTP_SINK = "/usr/sbin/smtp-sink"

T = TypeVar("T")


class WaitTimeout(AssertionError):
    pass


def twistdPath() -> Path:
    override = os.environ.get("RELAYD_TWISTD")
    if override:
        return Path(override)
    return Path(sys.executable).parent / "twistd"


# The hosts file relayd's client-name lookups read first: the tests' own,
# empty, so that what the daemons log does not depend on this machine's
# /etc/hosts (test clients are unknown[127.0.0.1] unless a test says
# otherwise).
TEST_HOSTS = ""


def testHostsFile() -> str:
    path = Path(tempfile.gettempdir()) / f"relayd-test-hosts-{os.getpid()}"
    path.write_text(TEST_HOSTS)
    return str(path)


def childEnvironment() -> dict[str, str]:
    """The environment for child processes: unbuffered, no source-tree imports, the tests' hosts file."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("RELAYD_HOSTS_FILE", testHostsFile())
    return env


# Every port freePort() has handed out in this process. The kernel picks a
# bind(0) port at random among the free ones, and a port is free again as
# soon as the socket that found it is closed: two calls (a daemon's port and
# its sink's, say) return the same port about once in a few thousand pairs.
_handedOut: set[int] = set()


def freePort() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now, never the same one twice."""
    for _ in range(1000):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        if port not in _handedOut:
            _handedOut.add(port)
            return port
    raise AssertionError(f"no free port not handed out before ({len(_handedOut)} were)")


def waitUntil(check: Callable[[], T | None], deadline: float, what: str,
              describe: Callable[[], str] = lambda: "") -> T:
    """
    Poll ``check`` until it returns something other than None/False, for at
    most ``deadline`` seconds; then fail saying ``what`` was awaited.
    """
    end = time.monotonic() + deadline
    while True:
        result = check()
        if result is not None and result is not False:
            return result
        if time.monotonic() >= end:
            detail = describe()
            raise WaitTimeout(f"{what} within {deadline:g} s" + (f"\n{detail}" if detail else ""))
        time.sleep(0.1)


def portAcceptsConnections(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=1.0):
            return True
    except OSError:
        return False


def tail(path: Path, lines: int = 60) -> str:
    try:
        text = path.read_text("utf-8", "replace")
    except FileNotFoundError:
        return f"({path} does not exist)"
    return "\n".join(text.splitlines()[-lines:])


def stopProcess(process: subprocess.Popen, deadline: float = STOP_DEADLINE) -> int | None:
    """SIGTERM, wait up to ``deadline``, then SIGKILL. Returns the exit code of the SIGTERM stop, or None if it had to be killed."""
    if process.poll() is not None:
        return process.returncode
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(deadline)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)
        return None


def exitStatusHint(code: int | None) -> str:
    if code is not None and code < 0:
        return (f"killed by signal {-code}: stock twistd re-raises the signal that stopped "
                f"the reactor (twisted/scripts/twistd.py, app._exitWithSignal); relayd must exit 0")
    return f"exit status {code}"


# Messages


def makeMessage(subject: str, bodyLines: list[str], *, messageId: bool = True,
                date: bool = True, sender: str = "alice@client.test",
                recipient: str = "bob@remote.test") -> bytes:
    """A submitted message in wire form (CRLF, not dot-stuffed)."""
    header = [f"From: Alice <{sender}>", f"To: Bob <{recipient}>", f"Subject: {subject}"]
    if date:
        header.append("Date: Mon, 01 Jan 2024 12:00:00 +0000")
    if messageId:
        header.append(f"Message-ID: <{subject.replace(' ', '-')}@client.test>")
    header.append("MIME-Version: 1.0")
    header.append("Content-Type: text/plain; charset=us-ascii")
    return ("\r\n".join(header + [""] + bodyLines) + "\r\n").encode("ascii")


def splitMessage(message: bytes) -> tuple[list[bytes], bytes]:
    """
    Header fields (each with its folded continuation lines and CRLFs, so that
    joining them gives back the exact bytes) and the rest (from the empty
    line on).
    """
    end = message.find(b"\r\n\r\n")
    assert end >= 0, f"message has no end of header: {message[:200]!r}"
    header, rest = message[: end + 2], message[end + 2:]
    fields: list[bytes] = []
    for line in header.split(b"\r\n")[:-1]:
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line + b"\r\n"
        else:
            fields.append(line + b"\r\n")
    return fields, rest


def fieldName(field: bytes) -> bytes:
    return field.split(b":", 1)[0].strip().lower()


def assertSameBytes(actual: bytes, expected: bytes, what: str) -> None:
    """Byte equality with a short, useful message (never a 5 MB diff)."""
    if actual == expected:
        return
    at = next((i for i, (a, b) in enumerate(zip(actual, expected)) if a != b),
              min(len(actual), len(expected)))
    lo = max(0, at - 40)
    raise AssertionError(
        f"{what}: differs at byte {at} (lengths: got {len(actual)}, sent {len(expected)})\n"
        f"  got:  {actual[lo:at + 40]!r}\n  sent: {expected[lo:at + 40]!r}"
    )


@dataclass
class Delivered:
    content: bytes
    envelope: dict
    path: Path


# Sinks


class Sink:
    """tests/integration/sink.py as a subprocess: records each message's DATA bytes."""

    def __init__(self, directory: Path, port: int | None = None, dsn: bool = False,
                 smtputf8: bool = True) -> None:
        self.directory = directory
        self.port = port or freePort()
        self.dsn = dsn  # advertise and accept DSN (RFC 3461)
        self.smtputf8 = smtputf8  # offer SMTPUTF8
        self.logPath = directory.with_name(directory.name + ".log")
        self.process: subprocess.Popen | None = None
        directory.mkdir(parents=True, exist_ok=True)

    def start(self) -> "Sink":
        assert self.process is None or self.process.poll() is not None, "sink already running"
        log = open(self.logPath, "ab")
        self.process = subprocess.Popen(
            [sys.executable, str(SINK_SCRIPT), "--port", str(self.port),
             "--directory", str(self.directory), *(["--dsn"] if self.dsn else []),
             *([] if self.smtputf8 else ["--no-smtputf8"])],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=childEnvironment(),
        )
        log.close()
        waitUntil(lambda: self.process.poll() is not None or portAcceptsConnections(self.port),
                  START_DEADLINE, f"sink did not listen on {HOST}:{self.port}",
                  lambda: tail(self.logPath))
        assert self.process.poll() is None, f"sink exited at start-up:\n{tail(self.logPath)}"
        return self

    def stop(self) -> None:
        if self.process is not None:
            stopProcess(self.process, 10)
            # The port must really be closed before a test relies on an outage.
            waitUntil(lambda: not portAcceptsConnections(self.port), 10,
                      f"sink port {self.port} still open after stop")

    def messages(self) -> list[Delivered]:
        found = []
        for meta in sorted(self.directory.glob("*.json"), key=lambda p: int(p.stem)):
            eml = meta.with_suffix(".eml")
            found.append(Delivered(eml.read_bytes(), json.loads(meta.read_text()), eml))
        return found

    def waitForMessages(self, count: int, describe: Callable[[], str] = lambda: "",
                        deadline: float = DELIVERY_DEADLINE) -> list[Delivered]:
        def check():
            got = self.messages()
            return got if len(got) >= count else None
        return waitUntil(check, deadline,
                         f"sink did not receive {count} message(s) (has {len(self.messages())})",
                         describe)


class PostfixSink:
    """Postfix's smtp-sink, dumping each transaction to a file."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or freePort()
        self.process: subprocess.Popen | None = None
        asRoot = os.geteuid() == 0
        # As root smtp-sink must drop to another user (-u), which must be able
        # to write the dump directory: pytest's tmp_path is 0700, so use a
        # world-writable directory of our own under /tmp.
        self.directory = Path(tempfile.mkdtemp(prefix="relayd-smtp-sink-"))
        if asRoot:
            self.directory.chmod(0o777)
        self.logPath = self.directory / "smtp-sink.log"
        self.command = [SMTP_SINK] + (["-u", "nobody"] if asRoot else []) + [
            "-d", f"{self.directory}/%Y%m%d%H%M%S.", f"{HOST}:{self.port}", "10"]

    def start(self) -> "PostfixSink":
        log = open(self.logPath, "ab")
        self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL)
        log.close()
        waitUntil(lambda: self.process.poll() is not None or portAcceptsConnections(self.port),
                  START_DEADLINE, f"smtp-sink did not listen on {HOST}:{self.port}",
                  lambda: tail(self.logPath))
        assert self.process.poll() is None, f"smtp-sink exited: {tail(self.logPath)}"
        return self

    def dumps(self) -> list[bytes]:
        return [p.read_bytes() for p in sorted(self.directory.iterdir())
                if p.name != self.logPath.name]

    def stop(self) -> None:
        if self.process is not None:
            stopProcess(self.process, 10)
        shutil.rmtree(self.directory, ignore_errors=True)


# Certificates and passwords


def writeChain(directory: Path) -> "trustme.CA":
    """
    A trustme CA whose leaf (for HOSTNAME and HOST) is issued by an
    intermediate: cert.pem (leaf first, then the intermediate) and key.pem
    in ``directory``. A client that trusts only the root proves the whole
    chain is served.
    """
    import trustme

    ca = trustme.CA()
    leaf = ca.create_child_ca().issue_cert(HOSTNAME, HOST)
    (directory / "cert.pem").write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(directory / "key.pem"))
    return ca


def relaydPasswd() -> Path:
    return Path(sys.executable).parent / "relayd-passwd"


def addUser(path: Path, user: str, password: str) -> None:
    """Add a login to a relayd password file with the installed relayd-passwd."""
    result = subprocess.run([str(relaydPasswd()), "-f", str(path), "add", user],
                            input=password + "\n", capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


# The daemon


# RELAYD_TEST_PROCESSES=N (or auto): every config the tests write gets
# "processes: N", unless it sets processes itself (a test about one mode).
TEST_PROCESSES = os.environ.get("RELAYD_TEST_PROCESSES")
PROCESSES_KEY = re.compile(r"(?m)^processes:[ \t]*([^\s#]+)")


def withTestProcesses(text: str) -> str:
    """A config's text with RELAYD_TEST_PROCESSES's ``processes:`` added, when it has none."""
    if TEST_PROCESSES and not PROCESSES_KEY.search(text):
        text += ("" if text.endswith("\n") or not text else "\n") + f"processes: {TEST_PROCESSES}\n"
    return text


def intakeProcesses(configText: str) -> int:
    """How many intake processes a config asks for (relayd's own rule: auto is one per core)."""
    match = PROCESSES_KEY.search(configText)
    value = match.group(1).strip("'\"") if match else "1"
    if value == "auto":
        return os.cpu_count() or 1
    try:
        return int(value)
    except ValueError:
        return 1  # a test of a bad value: the daemon refuses it


# What the daemons started by the tests ran as, for the session's summary:
# "intake workers" or "one process", counted per start.
DAEMON_STARTS: dict[str, int] = {}


def workerPids(masterPid: int) -> list[int]:
    """The intake workers (``python -m relayd.worker``) whose parent is ``masterPid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            # Field 4, after the command in parentheses (which may hold spaces).
            parent = int(stat[stat.rindex(")") + 2:].split()[1])
            if parent != masterPid:
                continue
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        if b"relayd.worker" in argv:
            found.append(int(entry.name))
    return sorted(found)


def relaydConfig(*, port: int, spool: Path, smarthostPort: int,
                 trustedNetworks: list[str] | None = None, extra: str = "") -> str:
    relay = ""
    if trustedNetworks is not None:
        relay = "relay:\n  trusted_networks: [" + ", ".join(f'"{n}"' for n in trustedNetworks) + "]\n"
    return (
        f"hostname: {HOSTNAME}\n"
        f"listeners:\n"
        f'  - endpoint: "tcp:{port}:interface={HOST}"\n'
        f"    tls: none\n"
        f"    auth: none\n"
        f"{relay}"
        f"queue:\n"
        f"  directory: {spool}\n"
        f"  retry: {{min: {RETRY_MIN}, max: {RETRY_MAX}}}\n"
        f"delivery:\n"
        f"  smarthosts:\n"
        f"    - host: {HOST}\n"
        f"      port: {smarthostPort}\n"
        f"      tls: none\n"
        f"shutdown_grace: {SHUTDOWN_GRACE}\n"
        f"{withTestProcesses(extra)}"
    )


class Relayd:
    """
    One relayd instance: its config file, spool and log (appended across
    restarts, so offsets into it separate one run's lines from the next).
    """

    def __init__(self, directory: Path, smarthostPort: int,
                 trustedNetworks: list[str] | None = None) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.port = freePort()
        self.spool = directory / "spool"
        self.spool.mkdir(exist_ok=True)
        self.configPath = directory / "relayd.yaml"
        self.logPath = directory / "relayd.log"
        # Where the daemon's stdout and stderr go: its log, unless a test
        # gives twistd a --logfile (and sets logPath to it).
        self.outputPath = self.logPath
        self.smarthostPort = smarthostPort
        self.writeConfig(self.configText(smarthostPort, trustedNetworks))
        self.process: subprocess.Popen | None = None
        self.runs = 0
        self.workers: list[int] = []  # the intake workers' pids at the last start

    def writeConfig(self, text: str) -> None:
        """Write the config file (every test writes it here: RELAYD_TEST_PROCESSES applies)."""
        self.configPath.write_text(withTestProcesses(text))

    def checkConfigWritten(self) -> None:
        """Fail a test that wrote its config around writeConfig, so ran without RELAYD_TEST_PROCESSES."""
        text = self.configPath.read_text()
        assert withTestProcesses(text) == text, (
            f"{self.configPath} has no processes: key although RELAYD_TEST_PROCESSES="
            f"{TEST_PROCESSES}: write it with Relayd.writeConfig")

    def configText(self, smarthostPort: int, trustedNetworks: list[str] | None = None,
                   extra: str = "") -> str:
        return relaydConfig(port=self.port, spool=self.spool, smarthostPort=smarthostPort,
                            trustedNetworks=trustedNetworks, extra=extra)

    def command(self) -> list[str]:
        return [str(twistdPath()), "-n", "--pidfile=", "relayd", "--config", str(self.configPath)]

    def start(self) -> "Relayd":
        assert self.process is None or self.process.poll() is not None, "relayd already running"
        self.checkConfigWritten()
        self.runs += 1
        with open(self.outputPath, "ab") as log:
            log.write(f"=== harness: run {self.runs}: {' '.join(self.command())}\n".encode())
            log.flush()
            startOffset = self.logOffset()
            self.process = subprocess.Popen(
                self.command(), cwd=self.directory, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, env=self.environment(),
            )
        waitUntil(lambda: self.process.poll() is not None or portAcceptsConnections(self.port),
                  START_DEADLINE, f"relayd did not start listening on {HOST}:{self.port}",
                  self.describe)
        assert self.process.poll() is None, (
            f"relayd exited with status {self.process.returncode} at start-up\n{self.describe()}")
        # The port listens before start-up ends (signal handlers, control
        # socket): a test that signals or uses relayctl at once must wait.
        waitUntil(lambda: self.process.poll() is not None
                  or "daemon started" in self.log(startOffset),
                  START_DEADLINE, "relayd did not log 'daemon started'", self.describe)
        self.waitForWorkers()
        return self

    def waitForWorkers(self) -> list[int]:
        """
        With intake processes in the config, wait until that many workers
        run as the daemon's children (their pids); fails if they do not.
        Sessions are served by the workers alone, so a test starts with all
        of them accepting.
        """
        wanted = intakeProcesses(self.configPath.read_text())
        if wanted > 1 and self.running:
            def started() -> bool:
                self.workers = workerPids(self.process.pid)
                return not self.running or len(self.workers) == wanted
            waitUntil(started, START_DEADLINE, f"relayd did not run {wanted} intake workers "
                      f"(its children running relayd.worker: {self.workers})", self.describe)
            assert self.running, f"relayd exited while its workers started\n{self.describe()}"
        else:
            self.workers = []
        kind = "intake workers" if self.workers else "one process"
        DAEMON_STARTS[kind] = DAEMON_STARTS.get(kind, 0) + 1
        return self.workers

    def environment(self) -> dict[str, str]:
        """The daemon's environment (a subclass adds systemd's variables, say)."""
        return childEnvironment()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, signum: int) -> None:
        assert self.running, f"relayd is not running\n{self.describe()}"
        if signum == signal.SIGHUP:
            self.checkConfigWritten()
        self.process.send_signal(signum)

    def terminate(self) -> int:
        """SIGTERM and wait; the exit code (fails if it had to be killed)."""
        assert self.process is not None
        code = stopProcess(self.process)
        assert code is not None, (
            f"relayd did not exit within {STOP_DEADLINE:g} s of SIGTERM (killed)\n{self.describe()}")
        return code

    def waitForExit(self, deadline: float = STOP_DEADLINE) -> int:
        """Wait for an exit already under way (no signal sent); the exit code."""
        assert self.process is not None
        try:
            return self.process.wait(deadline)
        except subprocess.TimeoutExpired:
            stopProcess(self.process, 5)
            raise AssertionError(
                f"relayd did not exit within {deadline:g} s (killed)\n{self.describe()}") from None

    def kill(self) -> None:
        if self.process is not None:
            stopProcess(self.process)

    # The log

    def log(self, since: int = 0) -> str:
        try:
            with open(self.logPath, "rb") as f:
                f.seek(since)
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def logOffset(self) -> int:
        try:
            return self.logPath.stat().st_size
        except FileNotFoundError:
            return 0

    def waitForLog(self, pattern: str, since: int = 0, deadline: float = DELIVERY_DEADLINE,
                   flags: int = 0) -> re.Match:
        """The first log line (after byte offset ``since``) matching ``pattern``."""
        regex = re.compile(pattern, flags | re.MULTILINE)
        return waitUntil(lambda: regex.search(self.log(since)), deadline,
                         f"no relayd log line matching {pattern!r}", self.describe)

    def describe(self) -> str:
        state = "running" if self.running else (
            f"exited with {self.process.returncode}" if self.process else "never started")
        return f"--- relayd ({state}); tail of {self.logPath}:\n{tail(self.logPath)}"

    # Submission

    def connect(self) -> smtplib.SMTP:
        return smtplib.SMTP(HOST, self.port, local_hostname="client.test", timeout=SMTP_TIMEOUT)

    def submit(self, message: bytes, sender: str = "alice@client.test",
               recipients: tuple[str, ...] = ("bob@remote.test",)) -> str:
        """Submit one message the way a client does; the queue id from the 250 reply."""
        with self.connect() as client:
            code, reply = client.ehlo()
            assert code == 250, f"EHLO: {code} {reply!r}\n{self.describe()}"
            code, reply = client.mail(sender)
            assert code == 250, f"MAIL FROM:<{sender}>: {code} {reply!r}\n{self.describe()}"
            for rcpt in recipients:
                code, reply = client.rcpt(rcpt)
                assert code == 250, f"RCPT TO:<{rcpt}>: {code} {reply!r}\n{self.describe()}"
            code, reply = client.data(message)
            assert code == 250, f"end of DATA: {code} {reply!r}\n{self.describe()}"
            match = QUEUED_REPLY.fullmatch(reply)
            assert match, (f"end of DATA: expected '250 2.0.0 Ok: queued as <16-character id>', "
                           f"got {code} {reply!r}")
            return match.group(1).decode("ascii")
