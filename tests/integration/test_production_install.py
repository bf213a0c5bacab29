"""
The README's production install, run as written, then the daemon run the
way systemd/relayd.service runs it: as the unprivileged user ``relayd``
with its groups and the unit's umask, reading files laid out by those
commands. A message submitted over STARTTLS with AUTH reaches the sink.

The commands come from README.rst itself (the literal block under
"Installing for production"), so README and test cannot drift. Paths under
``/opt/relayd``, ``/etc/relayd``, ``/var/spool/relayd`` and
``/etc/systemd/system`` are moved into a temporary directory that
``relayd`` can traverse; ``/path/to/`` is where the test keeps a copy of
this checkout and the certificate; ``systemctl`` is left out (the test
starts the unit's ExecStart itself). ``useradd`` runs as written when the
user does not exist yet (CI: a fresh machine).

Needs root, as the README's commands do; CI runs as root.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shlex
import shutil
import signal
import smtplib
import ssl
import subprocess
import sys
import tempfile
import time
from email.message import EmailMessage
from pathlib import Path

import pytest
import trustme
import yaml

from tests.integration.harness import (
    HOST,
    START_DEADLINE,
    STOP_DEADLINE,
    SMTP_TIMEOUT,
    Sink,
    exitStatusHint,
    freePort,
    tail,
    waitUntil,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason=(
        "runs the README's production commands (useradd, files owned by root:relayd) and the "
        "daemon as the user relayd, which needs root; CI runs as root")),
]

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.rst"
UNIT = ROOT / "systemd" / "relayd.service"
USER = "relayd"
PASSWORD = "correct horse battery"
HOSTNAME = "relay.example.com"
MOVED = ("/path/to/", "/opt/relayd", "/etc/relayd", "/var/spool/relayd", "/etc/systemd/system/")
# A path the README names, as a whole word (not "/etc/relayd" inside ".../relayd/etc/relayd.yaml").
_MOVED = re.compile(r"(?<![\w./-])(" + "|".join(re.escape(m) for m in MOVED) + ")")
# Every step of the install is bounded; pip may download dependencies on a fresh machine.
COMMAND_DEADLINE = 600
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def productionCommands() -> list[str]:
    """The command lines of README.rst's production block, comments and blank lines left out."""
    text = README.read_text()
    section = text.index("Installing for production\n=====")
    start = text.index("::\n\n", section) + 3
    end = text.index(".. end of the production commands", start)
    commands = []
    for line in text[start:end].splitlines():
        if not line.strip():
            continue
        assert line.startswith("    "), f"README production block: not an indented command: {line!r}"
        if not line.strip().startswith("#"):
            commands.append(line.strip())
    return commands


def unitSettings() -> dict[str, str]:
    """Key=value lines of the unit's [Service] section (the last value of a key wins)."""
    settings, inService = {}, False
    for line in UNIT.read_text().splitlines():
        if line.startswith("["):
            inService = line.strip() == "[Service]"
        elif inService and "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            settings[key.strip()] = value.strip()
    return settings


class Installation:
    def __init__(self, base: Path):
        self.base = base
        self.source = base / "src"
        self.ports = {"submission": freePort(), "submissions": freePort(), "local": freePort()}
        self.sink: Sink | None = None

    def moved(self, text: str) -> str:
        def replace(match: re.Match) -> str:
            where = match.group(1)
            return f"{self.source}/" if where == "/path/to/" else f"{self.base}{where}"
        return _MOVED.sub(replace, text)

    @property
    def config(self) -> Path:
        return Path(self.moved("/etc/relayd/relayd.yaml"))

    @property
    def spool(self) -> Path:
        return Path(self.moved("/var/spool/relayd"))

    def bin(self, name: str) -> str:
        return self.moved(f"/opt/relayd/venv/bin/{name}")

    def editConfig(self) -> None:
        """What the admin does after "then edit it": ports, the smarthost, and the moved paths."""
        text = self.moved(self.config.read_text())
        settings = yaml.safe_load(text)
        settings["hostname"] = HOSTNAME
        settings["listeners"] = [
            {"endpoint": f"tcp:{self.ports['submission']}:interface={HOST}", "tls": "starttls", "auth": "required"},
            {"endpoint": f"tcp:{self.ports['submissions']}:interface={HOST}", "tls": "implicit", "auth": "required"},
            {"endpoint": f"tcp:{self.ports['local']}:interface={HOST}", "tls": "none", "auth": "none"},
        ]
        settings["delivery"]["smarthosts"] = [{"host": HOST, "port": self.sink.port, "tls": "none"}]
        settings["queue"]["retry"] = {"min": "1s", "max": "5s"}
        settings["shutdown_grace"] = "5s"
        with open(self.config, "w") as f:  # in place: the file keeps root:relayd 0640
            yaml.safe_dump(settings, f, sort_keys=False)

    def run(self, command: str, stdin: str = "") -> subprocess.CompletedProcess:
        # A root login shell's PATH: python3 is the system's, which relayd can run (a
        # venv links to its interpreter, and one under /root, e.g. pyenv's, is not).
        env = {**os.environ, "PATH": SYSTEM_PATH, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
        result = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", command], cwd=self.base,
                                input=stdin, capture_output=True, text=True, timeout=COMMAND_DEADLINE,
                                env=env)
        assert result.returncode == 0, (
            f"README command failed ({result.returncode}): {command}\n{result.stdout}\n{result.stderr}")
        return result

    def install(self) -> None:
        for directory in ("opt", "etc/systemd/system", "var/spool"):
            (self.base / directory).mkdir(parents=True, exist_ok=True)
        for command in productionCommands():
            if command.startswith("systemctl "):
                continue  # no systemd here: the test runs the unit's ExecStart below
            if command.startswith("useradd "):
                try:
                    pwd.getpwnam(USER)
                except KeyError:
                    self.run(command)  # as written: the real system user
                continue
            stdin = f"{PASSWORD}\n" if "relayd-passwd" in command else ""
            self.run(self.moved(command), stdin)
            if "/etc/relayd/relayd.yaml" in command and command.startswith("install "):
                self.editConfig()

    def daemonCommand(self, asUnit: bool = True) -> tuple[list[str], dict]:
        """The unit's ExecStart and how systemd runs it (User=, Group=, UMask=, Environment=)."""
        unit = unitSettings()
        argv = [self.moved(a) for a in shlex.split(unit["ExecStart"])]
        # /dev/log may not exist here: the same lines on stdout, where the test reads them.
        argv = ["relayd.logformat.syslogStdout" if a == "relayd.logformat.syslogSocket" else a
                for a in argv]
        env = {"PATH": SYSTEM_PATH}
        for assignment in shlex.split(unit.get("Environment", "")):
            key, value = assignment.split("=", 1)
            env[key] = value
        options = {"env": env, "cwd": "/", "umask": int(unit.get("UMask", "0022"), 8)}
        if asUnit:
            user = pwd.getpwnam(unit["User"])
            group = grp.getgrnam(unit["Group"]).gr_gid
            options.update(user=user.pw_uid, group=group,
                           extra_groups=os.getgrouplist(user.pw_name, user.pw_gid))
        return argv, options


class Daemon:
    def __init__(self, installation: Installation, asUnit: bool = True):
        self.logPath = installation.base / f"relayd-{'unit' if asUnit else 'root'}.log"
        argv, options = installation.daemonCommand(asUnit)
        self.offset = self.logPath.stat().st_size if self.logPath.exists() else 0
        with open(self.logPath, "ab") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, **options)

    def log(self) -> str:
        with open(self.logPath, "rb") as f:
            f.seek(self.offset)
            return f.read().decode("utf-8", "replace")

    def describe(self) -> str:
        return f"--- relayd (exit {self.process.poll()}); {self.logPath}:\n{tail(self.logPath)}"

    def waitForLog(self, text: str, deadline: float = START_DEADLINE) -> None:
        waitUntil(lambda: text in self.log() or self.process.poll() is not None, deadline,
                  f"no {text!r} in the log", self.describe)
        assert text in self.log(), f"relayd exited before logging {text!r}\n{self.describe()}"

    def stop(self) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_DEADLINE)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
                return None
        return self.process.returncode


@pytest.fixture(scope="module")
def installation():
    base = Path(tempfile.mkdtemp(prefix="relayd-production-"))
    base.chmod(0o755)  # relayd must reach its files inside
    inst = Installation(base)
    shutil.copytree(ROOT, inst.source / "relayd", ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "var", ".pytest_cache"))
    ca = trustme.CA()
    leaf = ca.issue_cert(HOSTNAME, HOST)
    (inst.source / "fullchain.pem").write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(inst.source / "privkey.pem"))
    (inst.source / "privkey.pem").chmod(0o600)  # as a CA's tooling leaves it: root's alone
    inst.ca = ca
    inst.sink = Sink(base / "sink")
    try:
        inst.sink.start()  # inside the try: stopped below even if its start-up check fails
        inst.install()
        yield inst
    finally:
        inst.sink.stop()
        shutil.rmtree(base, ignore_errors=True)


def submit(installation: Installation, subject: str, implicit: bool = False,
           login: str = "alice@example.com", password: str = PASSWORD) -> None:
    context = ssl.create_default_context()
    installation.ca.configure_trust(context)
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = login, "bob@remote.example", subject
    message.set_content("sent the way the README says\n")
    if implicit:
        client = smtplib.SMTP_SSL(HOST, installation.ports["submissions"], context=context,
                                  timeout=SMTP_TIMEOUT)
    else:
        client = smtplib.SMTP(HOST, installation.ports["submission"], timeout=SMTP_TIMEOUT)
    with client:
        client.ehlo("client.example")
        if not implicit:
            client.starttls(context=context)
            client.ehlo("client.example")
        client.login(login, password)
        client.send_message(message, "alice@example.com" if login == "alice@example.com" else login,
                            ["bob@remote.example"])


def ownership(path: Path) -> tuple[str, str, str]:
    st = path.stat()
    return pwd.getpwuid(st.st_uid).pw_name, grp.getgrgid(st.st_gid).gr_name, oct(st.st_mode & 0o7777)


def test_the_readme_install_runs_as_relayd_and_delivers(installation):
    inst = installation
    # The files as the README's table says.
    assert ownership(Path(inst.moved("/etc/relayd/passwd"))) == ("root", "relayd", "0o640")
    assert ownership(Path(inst.moved("/etc/relayd/tls/key.pem"))) == ("root", "relayd", "0o640")
    assert ownership(inst.config) == ("root", "relayd", "0o640")
    assert ownership(inst.spool) == ("relayd", "relayd", "0o700")

    daemon = Daemon(inst)
    try:
        daemon.waitForLog("daemon started")
        submit(inst, "over STARTTLS")
        submit(inst, "over implicit TLS", implicit=True)
        delivered = inst.sink.waitForMessages(2, daemon.describe)
        subjects = sorted(re.search(rb"Subject: (.*)\r\n", d.content).group(1) for d in delivered)
        assert subjects == [b"over STARTTLS", b"over implicit TLS"]

        # A user added while it runs (as root, the README's way) can log in within seconds:
        # the password file is re-read, and relayd-passwd kept it root:relayd 0640.
        inst.run(f"{inst.bin('relayd-passwd')} -f {inst.moved('/etc/relayd/passwd')} add carol@example.com",
                 "carol's secret\n")
        assert ownership(Path(inst.moved("/etc/relayd/passwd"))) == ("root", "relayd", "0o640")
        waitUntil(lambda: _loginWorks(inst, "carol@example.com", "carol's secret"), 10,
                  "the new user could not log in", daemon.describe)

        # A renewed certificate, installed the README's way, is served after a reload.
        renewed = inst.ca.issue_cert(HOSTNAME, HOST)
        (inst.source / "fullchain.pem").write_bytes(b"".join(b.bytes() for b in renewed.cert_chain_pems))
        renewed.private_key_pem.write_to_path(str(inst.source / "privkey.pem"))
        for command in productionCommands():
            if command.startswith("install ") and "/etc/relayd/tls/" in command:
                inst.run(inst.moved(command))
        # `systemctl reload`: the unit's ExecReload as systemd runs it (as relayd),
        # which returns once the reload is done, so the new certificate is served at once.
        _, options = inst.daemonCommand()
        reload = subprocess.run([inst.moved(a) for a in shlex.split(unitSettings()["ExecReload"])],
                                capture_output=True, text=True, timeout=60, **options)
        assert reload.returncode == 0, f"{reload.stderr}\n{daemon.describe()}"
        assert reload.stdout.startswith("reload: configuration ") and "applied" in reload.stdout
        assert _servedCertificate(inst) == renewed.cert_chain_pems[0].bytes()

        # Everything the daemon wrote is relayd's, so a restart as relayd reads it all.
        owners = {pwd.getpwuid(p.stat().st_uid).pw_name for p in inst.spool.rglob("*")}
        assert owners == {"relayd"}, owners
    finally:
        code = daemon.stop()
    assert code == 0, f"after SIGTERM: {exitStatusHint(code)}\n{daemon.describe()}"
    assert "Traceback" not in daemon.log(), daemon.describe()


def _servedCertificate(inst: Installation) -> bytes:
    """The leaf certificate (PEM) the implicit-TLS listener serves now."""
    pem = ssl.get_server_certificate((HOST, inst.ports["submissions"]), timeout=SMTP_TIMEOUT)
    return ssl.DER_cert_to_PEM_cert(ssl.PEM_cert_to_DER_cert(pem)).encode("ascii")


def _loginWorks(inst: Installation, login: str, password: str) -> bool:
    try:
        submit(inst, f"from {login}", login=login, password=password)
    except smtplib.SMTPAuthenticationError:
        return False
    return True


def test_root_is_refused_on_relayds_spool_and_unreadable_mail_is_named_not_hidden(installation):
    inst = installation
    # The ExecStart run by hand as root: one line saying what to do, nothing written.
    before = sorted(inst.spool.rglob("*"))
    root = Daemon(inst, asUnit=False)
    try:
        code = root.process.wait(START_DEADLINE)
    except subprocess.TimeoutExpired:
        root.stop()
        raise AssertionError(f"relayd as root on relayd's spool did not stop\n{root.describe()}")
    assert code == 1, root.describe()
    lines = [l for l in root.log().splitlines() if "queue.directory" in l or "Traceback" in l]
    assert len(lines) == 1 and lines[0].endswith(
        f"relayd: queue.directory {inst.spool} belongs to relayd and relayd runs as root, which "
        f"would leave mail relayd cannot read: run relayd as relayd (User=relayd in the systemd "
        f"unit), or chown -R root: {inst.spool} to run it as root from now on"), root.describe()
    assert sorted(inst.spool.rglob("*")) == before

    # A message queued while the smarthost is down, then made root's as a root daemon
    # would have left it: the next start says so and what to run, and keeps the file.
    inst.sink.stop()
    daemon = Daemon(inst)
    try:
        daemon.waitForLog("daemon started")
        submit(inst, "kept through a chown")
        daemon.waitForLog("status=deferred", deadline=60)
    finally:
        assert daemon.stop() == 0, daemon.describe()
    [envelope] = list((inst.spool / "queue").glob("*.msg"))
    queueId = envelope.stem
    for path in (inst.spool / "queue").glob(f"{queueId}.*"):  # the message and its update file
        os.chown(path, 0, 0)
    daemon = Daemon(inst)
    try:
        daemon.waitForLog("daemon started")
        log = daemon.log()
        assert re.search(rf"{queueId}: error: cannot read {re.escape(str(envelope))} \(owned by root\): "
                         rf"Permission denied; not queued, left in place: relayd runs as relayd: "
                         rf"chown -R relayd: {re.escape(str(inst.spool))}", log), daemon.describe()
        assert "0 messages in queue, 1 unreadable" in log
        assert "quarantined" not in log
    finally:
        assert daemon.stop() == 0, daemon.describe()
    assert envelope.exists() and not list((inst.spool / "quarantine").iterdir())
    # check-config as relayd says the same before a start would.
    result = subprocess.run([inst.bin("relayd"), "check-config", "--user", "relayd", str(inst.config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "1 queued message cannot be read" in result.stderr, result.stderr

    # The fix the line names, and the message goes out.
    inst.run(f"chown -R relayd: {inst.spool}")
    inst.sink.start()
    daemon = Daemon(inst)
    try:
        daemon.waitForLog(f"{queueId}: removed", deadline=60)
    finally:
        assert daemon.stop() == 0, daemon.describe()
