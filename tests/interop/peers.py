"""
Real peers for the interop tests, from Debian's packages: a private Postfix
instance (its own config and queue directory, loopback ports), Cyrus SASL's
sasldb2, msmtp and HAProxy. Each is started and stopped by the test, every
wait is bounded, and nothing touches the machine's own Postfix.

Postfix runs its ``master`` in the foreground (``-d``) in a session of its
own: on SIGTERM the master signals its whole process group, which must not
be pytest's.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

from tests.integration.harness import (
    DELIVERY_DEADLINE,
    HOST,
    HOSTNAME,
    RETRY_MAX,
    RETRY_MIN,
    SHUTDOWN_GRACE,
    START_DEADLINE,
    STOP_DEADLINE,
    Relayd,
    addUser,
    assertSameBytes,
    fieldName,
    freePort,
    portAcceptsConnections,
    splitMessage,
    tail,
    waitUntil,
    writeChain,
)

USER = "alice@client.test"
PASSWORD = "correct horse battery"

POSTFIX = "/usr/sbin/postfix"
POSTFIX_MASTER = "/usr/lib/postfix/sbin/master"
SASLPASSWD2 = "/usr/sbin/saslpasswd2"
SASL_PLAIN_PLUGIN_GLOB = "/usr/lib/*/sasl2/libplain.so*"
MSMTP = "/usr/bin/msmtp"
HAPROXY = "/usr/sbin/haproxy"

# master.cf of a private instance: nothing chrooted (the instance lives
# under /tmp), an smtpd on one loopback port, the services a relay needs.
MASTER_CF = """\
{host}:{port} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def missing(*paths: str) -> list[str]:
    return [p for p in paths if not os.access(p, os.X_OK)]


class LoggingPeer:
    """A peer that writes its own log file (``logPath``), named ``label`` in failures."""

    label = "peer"

    def log(self) -> str:
        try:
            return self.logPath.read_text("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def waitForLog(self, pattern: str, deadline: float = DELIVERY_DEADLINE) -> re.Match:
        regex = re.compile(pattern, re.MULTILINE)
        return waitUntil(lambda: regex.search(self.log()), deadline,
                         f"no {self.label} log line matching {pattern!r}", self.describe)


class Postfix(LoggingPeer):
    """
    A Postfix instance of its own: ``main.cf`` and ``master.cf`` in a fresh
    directory under /tmp (world-traversable: Postfix's daemons drop to
    ``mail_owner``), its queue and data directories in it, and its log in
    ``maillog`` there (``maillog_file``, written by postlogd).

    ``settings`` are extra main.cf lines. Everything it relays goes to
    ``relayhost``; it delivers nothing locally.
    """

    def __init__(self, name: str, settings: dict[str, str], port: int | None = None) -> None:
        self.name = name
        self.port = port or freePort()
        self.directory = Path(tempfile.mkdtemp(prefix=f"relayd-postfix-{name}-"))
        self.directory.chmod(0o755)
        # main.cf and master.cf alone in a root-owned directory, as
        # `postfix check` wants; queue, data and sasldb beside it.
        self.configDirectory = self.directory / "etc"
        self.configDirectory.mkdir(mode=0o755)
        self.logPath = self.directory / "maillog"
        self.process: subprocess.Popen | None = None
        self.masterLog = self.directory / "master.out"
        owner = "postfix"
        self.uid = pwd.getpwnam(owner).pw_uid
        self.gid = pwd.getpwnam(owner).pw_gid
        main = {
            "compatibility_level": "3.6",
            "config_directory": str(self.configDirectory),
            "queue_directory": str(self.directory / "queue"),
            "data_directory": str(self.directory / "data"),
            "mail_owner": owner,
            "setgid_group": "postdrop",
            "syslog_name": f"postfix-{name}",
            "maillog_file": str(self.logPath),
            "maillog_file_prefixes": str(self.directory),
            "myhostname": f"{name}.test.example",
            "mydomain": "test.example",
            "myorigin": "$myhostname",
            "mydestination": "",
            "local_recipient_maps": "",
            "alias_maps": "",
            "alias_database": "",
            "inet_interfaces": HOST,
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "smtputf8_enable": "no",
            "biff": "no",
            # A refused next hop is retried at once when the test asks
            # (postqueue -f), and the queue manager never waits long.
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "5s",
            "queue_run_delay": "1s",
            "smtp_connect_timeout": "10s",
            "delay_warning_time": "0",
        }
        main.update(settings)
        self.writeMainCf(main)
        (self.configDirectory / "master.cf").write_text(MASTER_CF.format(host=HOST, port=self.port))

    def writeMainCf(self, settings: dict[str, str]) -> None:
        self.settings = settings
        (self.configDirectory / "main.cf").write_text(
            "".join(f"{k} = {v}\n" for k, v in settings.items()))

    def configure(self, **changes: str) -> None:
        """Change main.cf settings (of a stopped instance, or then ``postfix reload``)."""
        self.writeMainCf({**self.settings, **changes})

    def path(self, name: str) -> Path:
        return self.directory / name

    def postfix(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([POSTFIX, "-c", str(self.configDirectory), *args],
                              capture_output=True, text=True, timeout=60)

    def start(self) -> "Postfix":
        assert self.process is None or self.process.poll() is not None, "postfix already running"
        # The queue directory is root's; `postfix check` (post-install)
        # creates what is inside it, with mail_owner's ownership.
        (self.directory / "queue").mkdir(mode=0o755, exist_ok=True)
        check = self.postfix("check")
        assert check.returncode == 0, f"postfix check: {check.stdout}{check.stderr}"
        with open(self.masterLog, "ab") as out:
            self.process = subprocess.Popen(
                [POSTFIX_MASTER, "-c", str(self.configDirectory), "-d"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
        waitUntil(lambda: self.process.poll() is not None or portAcceptsConnections(self.port),
                  START_DEADLINE, f"postfix {self.name} did not listen on {HOST}:{self.port}",
                  self.describe)
        assert self.process.poll() is None, f"postfix master exited\n{self.describe()}"
        return self

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        """SIGTERM to the master (it stops its children), bounded, then SIGKILL to the group."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(STOP_DEADLINE)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        waitUntil(lambda: not portAcceptsConnections(self.port), 10,
                  f"postfix {self.name} port {self.port} still open after stop")

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    @property
    def label(self) -> str:
        return f"postfix {self.name}"

    def describe(self) -> str:
        state = "running" if self.running else "stopped"
        return (f"--- postfix {self.name} ({state}); tail of {self.logPath}:\n{tail(self.logPath)}"
                f"\n--- {self.masterLog}:\n{tail(self.masterLog, 20)}")

    # Cyrus SASL: the server side's accounts in a sasldb2 of this instance.

    def enableSaslServer(self, user: str, realm: str, password: str) -> None:
        """
        smtpd authenticates with Cyrus SASL against a sasldb2 of this
        instance holding one account, ``user@realm``.
        """
        saslDirectory = self.directory / "sasl"
        saslDirectory.mkdir(mode=0o755, exist_ok=True)
        db = saslDirectory / "sasldb2"
        result = subprocess.run([SASLPASSWD2, "-p", "-c", "-f", str(db), "-u", realm, user],
                                input=password, capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, f"saslpasswd2: {result.stdout}{result.stderr}"
        # smtpd opens it after dropping to mail_owner.
        os.chown(db, self.uid, self.gid)
        db.chmod(0o640)
        # Debian's Postfix reads smtpd.conf from <config_directory>/sasl
        # (cyrus_sasl_config_path is not enough there).
        configDirectory = self.configDirectory / "sasl"
        configDirectory.mkdir(mode=0o755, exist_ok=True)
        (configDirectory / "smtpd.conf").write_text(
            f"pwcheck_method: auxprop\nauxprop_plugin: sasldb\nmech_list: PLAIN LOGIN\n"
            f"sasldb_path: {db}\n")
        self.configure(smtpd_sasl_auth_enable="yes", smtpd_sasl_type="cyrus",
                       smtpd_sasl_path="smtpd", cyrus_sasl_config_path=str(configDirectory))


class HAProxy(LoggingPeer):
    """
    Debian's haproxy in the foreground (``-db``), TCP mode, one frontend on
    a loopback port balancing round-robin over ``servers`` (host, port),
    connecting to them from 127.0.0.1 with a PROXY v2 header, health checks
    (``check-send-proxy``: a v2 LOCAL header, then an SMTP check) every
    second. Its log goes to ``haproxy.log`` in ``directory``.
    """

    PROBE_SOURCE = "127.0.0.9"

    def __init__(self, directory: Path, servers: list[tuple[str, int]]) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.port = freePort()
        self.configPath = directory / "haproxy.cfg"
        self.logPath = directory / "haproxy.log"
        self.process: subprocess.Popen | None = None
        lines = [
            "global",
            "    log stdout format raw local0 info",
            "    maxconn 200",
            "defaults",
            "    mode tcp",
            "    log global",
            "    option tcplog",
            "    timeout connect 5s",
            "    timeout client 60s",
            "    timeout server 60s",
            # A check's connect is bounded by inter (1s); its exchange (the
            # LOCAL header, the banner, EHLO) by this. Without it inter
            # bounds the whole check, and with fall 1 one check slower than
            # a second on a busy machine takes a running instance out.
            "    timeout check 20s",
            "    retries 3",
            "    option redispatch",
            "frontend submission",
            f"    bind {HOST}:{self.port}",
            "    default_backend relays",
            "backend relays",
            "    balance roundrobin",
            f"    source {HOST}",
            "    option smtpchk EHLO haproxy.test.example",
        ]
        for index, (host, port) in enumerate(servers, 1):
            lines.append(f"    server relayd{index} {host}:{port} send-proxy-v2 check check-send-proxy "
                         f"inter 1s fall 1 rise 1")
        self.configPath.write_text("\n".join(lines) + "\n")

    def start(self) -> "HAProxy":
        check = subprocess.run([HAPROXY, "-c", "-f", str(self.configPath)],
                               capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, f"haproxy -c: {check.stdout}{check.stderr}"
        with open(self.logPath, "ab") as log:
            self.process = subprocess.Popen([HAPROXY, "-db", "-f", str(self.configPath)],
                                            stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        waitUntil(lambda: self.process.poll() is not None or self.accepts(),
                  START_DEADLINE, f"haproxy did not listen on {HOST}:{self.port}", self.describe)
        assert self.process.poll() is None, f"haproxy exited\n{self.describe()}"
        return self

    def accepts(self) -> bool:
        """
        Whether the frontend takes a connection. The probe comes from
        PROBE_SOURCE: HAProxy passes it on as a client, and no test's
        client nor the balancer itself uses that address.
        """
        try:
            with socket.create_connection((HOST, self.port), timeout=1.0,
                                          source_address=(self.PROBE_SOURCE, 0)):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(STOP_DEADLINE)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    label = "haproxy"

    def describe(self) -> str:
        return f"--- haproxy; tail of {self.logPath}:\n{tail(self.logPath)}"


# relayd as the interop tests run it


class SubmissionRelayd(Relayd):
    """
    relayd as a company relay: STARTTLS submission (``port``) and implicit
    TLS (``implicitPort``), AUTH required on both, a trustme chain
    (``ca``), one login (``USER``/``PASSWORD``), nobody trusted by address.
    ``smarthost`` is the YAML flow mapping of its one next hop.
    """

    def __init__(self, directory: Path, smarthost: str, extra: str = "",
                 proxyFrom: str | None = None, auth: str = "") -> None:
        """
        ``proxyFrom``: the submission port is a PROXY-protocol listener
        (``haproxy:``) accepting the header from this network. ``auth``:
        more keys for the auth section (``failure_limit: 2``).
        """
        self.proxyFrom = proxyFrom
        self.authSettings = auth
        directory.mkdir(parents=True, exist_ok=True)
        self.implicitPort = freePort()
        self.ca = writeChain(directory)
        self.ca.cert_pem.write_to_path(str(directory / "ca.pem"))
        self.passwordFile = directory / "passwd"
        addUser(self.passwordFile, USER, PASSWORD)
        self.smarthost = smarthost
        self.extra = extra
        super().__init__(directory, 0)

    def configText(self, smarthostPort, trustedNetworks=None, extra=""):
        submission = f"tcp:{self.port}:interface={HOST}"
        proxyFrom = ""
        if self.proxyFrom:
            submission = "haproxy:" + submission
            proxyFrom = f', proxy_from: ["{self.proxyFrom}"]'
        return (
            f"hostname: {HOSTNAME}\n"
            f"listeners:\n"
            f'  - {{endpoint: "{submission}", tls: starttls, auth: required{proxyFrom}}}\n'
            f'  - {{endpoint: "tcp:{self.implicitPort}:interface={HOST}", tls: implicit, auth: required}}\n'
            f"tls: {{certificate: cert.pem, key: key.pem}}\n"
            f"auth: {{password_file: passwd{', ' + self.authSettings if self.authSettings else ''}}}\n"
            f"relay: {{trusted_networks: []}}\n"
            f"queue:\n"
            f"  directory: {self.spool}\n"
            f"  retry: {{min: {RETRY_MIN}, max: {RETRY_MAX}}}\n"
            f"delivery:\n"
            f"  smarthosts: [{self.smarthost}]\n"
            f"shutdown_grace: {SHUTDOWN_GRACE}\n"
            f"{self.extra}"
        )


def arrivedIntact(arrived: bytes, sent: bytes, traceFields: int) -> list[bytes]:
    """
    The message as it arrived is ``traceFields`` trace header fields added on
    top of the bytes sent, which are there unchanged (header and body);
    returns the added fields, top first.
    """
    fields, _ = splitMessage(arrived)
    added = fields[:traceFields]
    assert all(fieldName(f) == b"received" for f in added), added
    assertSameBytes(arrived[sum(len(f) for f in added):], sent, "message after the trace fields")
    return added
