"""
The mail log as admins' tools read it: relayd run with
``--logger relayd.logformat.syslogStdout``, its log fed to pflogsumm, to
fail2ban's stock postfix filter and to relayd's own fail2ban filter
(etc/fail2ban); and the syslog-socket logger when there is no socket.
"""

from __future__ import annotations

import io
import re
import shutil
import smtplib
import socket
import subprocess
from pathlib import Path

import pytest
from twisted.logger import globalLogPublisher

from relayd import logformat, maillog

from .harness import HOST, HOSTNAME, SMTP_TIMEOUT, Relayd, makeMessage, twistdPath

pytestmark = pytest.mark.integration


class SyslogRelayd(Relayd):
    def command(self) -> list[str]:
        return [str(twistdPath()), "-n", "--pidfile=", "--logger", "relayd.logformat.syslogStdout",
                "relayd", "--config", str(self.configPath)]


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (Debian package {tool.split('-')[0]}; .ci/run installs it)")
    return path


def test_pflogsumm_and_fail2ban_read_the_syslog_format(tmp_path, processes, sink):
    pflogsumm = need("pflogsumm")
    fail2banRegex = need("fail2ban-regex")

    relay = SyslogRelayd(tmp_path / "relay", sink.port)
    processes.append(relay)
    relay.start()
    relay.submit(makeMessage("counted", ["one message for pflogsumm"]))
    sink.waitForMessages(1, relay.describe)
    relay.waitForLog(r"relayd/qmgr\[\d+\]: [0-9A-Z]{16}: removed")

    refusing = SyslogRelayd(tmp_path / "refusing", sink.port, trustedNetworks=["10.9.8.0/24"])
    processes.append(refusing)
    refusing.start()
    with refusing.connect() as client:
        client.ehlo()
        client.mail("mallory@client.test")
        assert client.rcpt("victim@remote.test")[0] == 554
    refusing.waitForLog(r"relayd/smtpd\[\d+\]: NOQUEUE: reject: RCPT from ")

    log = tmp_path / "mail.log"
    lines = [line for path in (relay.logPath, refusing.logPath)
             for line in path.read_text().splitlines() if re.match(r"\w{3} [ \d]\d \d\d:\d\d:\d\d ", line)]
    # A password guess, in the exact words the server logs (the AUTH path
    # itself is covered by test_submission_security.py).
    out = io.StringIO()
    observer = logformat.syslogObserver(out, hostname="relay", pid=4242)
    globalLogPublisher.addObserver(observer)
    try:
        maillog.saslFailed("unknown", "192.0.2.4", "PLAIN", "authentication failure", "alice")
    finally:
        globalLogPublisher.removeObserver(observer)
    lines.append(out.getvalue().strip())
    log.write_text("\n".join(lines) + "\n")

    summary = subprocess.run([pflogsumm, "--syslog-name=relayd", str(log)], capture_output=True,
                             text=True, timeout=60).stdout
    counts = {m.group(2): int(m.group(1)) for m in re.finditer(r"(?m)^\s+(\d+)\s+(received|delivered|deferred|bounced|rejected)\b", summary)}
    assert counts == {"received": 1, "delivered": 1, "deferred": 0, "bounced": 0, "rejected": 1}, summary

    result = subprocess.run([fail2banRegex, "--print-all-matched", str(log),
                             'postfix[_daemon="relayd/smtpd"]'],
                            capture_output=True, text=True, timeout=60).stdout
    assert re.search(r"Lines: \d+ lines, 0 ignored, 1 matched", result), result
    assert re.search(r"NOQUEUE: reject: RCPT from [^\[\s]+\[127\.0\.0\.1\]: 554 5\.7\.1", result), result

    # The mode an admin would pick to catch password guessing as well.
    result = subprocess.run([fail2banRegex, str(log), 'postfix[_daemon="relayd/smtpd", mode=aggressive]'],
                            capture_output=True, text=True, timeout=60).stdout
    assert re.search(r"Lines: \d+ lines, 0 ignored, 2 matched", result), result


class SyslogSocketRelayd(Relayd):
    """relayd as systemd/relayd.service logs it: to the syslog socket."""

    def command(self) -> list[str]:
        return [str(twistdPath()), "-n", "--pidfile=", "--logger", "relayd.logformat.syslogSocket",
                "relayd", "--config", str(self.configPath)]


def test_syslog_socket_logger_without_the_socket_logs_to_stderr_with_one_warning(
        tmp_path, processes, sink, monkeypatch):
    socketPath = tmp_path / "no-syslog" / "log"
    monkeypatch.setenv("RELAYD_SYSLOG_SOCKET", str(socketPath))
    relay = SyslogSocketRelayd(tmp_path / "relay", sink.port)
    processes.append(relay)
    relay.start()  # waits for "daemon started", which must reach stderr
    queueId = relay.submit(makeMessage("kept", ["a line the log must not lose"]))
    relay.waitForLog(rf"relayd/qmgr\[\d+\]: {queueId}: removed")
    assert relay.terminate() == 0
    log = relay.log()
    warnings = [l for l in log.splitlines() if "syslog socket" in l]
    assert warnings == [f"relayd: warning: syslog socket {socketPath}: No such file or directory; "
                        "logging to stderr until it takes lines again"], log
    assert re.search(rf"<22>\w{{3}} [ \d]\d \d\d:\d\d:\d\d relayd/smtpd\[\d+\]: {queueId}: client=", log), log
    assert "daemon stopped" in log


ROOT = Path(__file__).resolve().parents[2]
STOCK_FILTERS = Path("/etc/fail2ban/filter.d")


class AuthSyslogRelayd(SyslogRelayd):
    """
    A loopback listener with AUTH (plaintext, allowed on loopback only) and
    a greeting delay; trusted networks that exclude the test client, so an
    unauthenticated RCPT is a relay probe.
    """

    def configText(self, smarthostPort, trustedNetworks=None, extra=""):
        from passlib.hash import bcrypt

        (self.directory / "passwd").write_text(f"alice:{bcrypt.using(rounds=4).hash('right')}\n")
        return (
            f"hostname: {HOSTNAME}\n"
            f"listeners:\n"
            f'  - {{endpoint: "tcp:{self.port}:interface={HOST}", tls: none, auth: optional,'
            f" plaintext_auth: true}}\n"
            f"auth: {{password_file: passwd, senders: {{alice: [alice@client.test]}}}}\n"
            f'relay: {{trusted_networks: ["10.9.8.0/24"]}}\n'
            f"limits: {{greeting_delay: 1s}}\n"
            f"queue: {{directory: {self.spool}}}\n"
            f"delivery: {{smarthosts: [{{host: {HOST}, port: {smarthostPort}, tls: none}}]}}\n"
        )


def test_relayd_fail2ban_filter_bans_password_guesses_relay_probes_and_pregreeting(
        tmp_path, processes, sink):
    fail2banRegex = need("fail2ban-regex")
    fail2banClient = need("fail2ban-client")
    relay = AuthSyslogRelayd(tmp_path / "relay", sink.port)
    processes.append(relay)
    relay.start()

    # Two password guesses (PLAIN, LOGIN), then the right password and a
    # message: only the guesses count.
    for mechanism, password in (("PLAIN", "guess1"), ("LOGIN", "guess2")):
        with relay.connect() as client:
            client.ehlo()
            client.user, client.password = "alice", password
            with pytest.raises(smtplib.SMTPAuthenticationError):
                client.auth(mechanism, getattr(client, f"auth_{mechanism.lower()}"))
    with relay.connect() as client:
        client.ehlo()
        client.login("alice", "right")
        client.sendmail("alice@client.test", ["bob@remote.test"], makeMessage("ok", ["fine"]))
    # A relay probe without AUTH.
    with relay.connect() as client:
        client.ehlo()
        client.mail("mallory@client.test")
        assert client.rcpt("victim@remote.test")[0] == 554
    # A bot that talks before the banner.
    with socket.create_connection((HOST, relay.port), timeout=SMTP_TIMEOUT) as bot:
        bot.sendall(b"EHLO bot\r\n")
        assert bot.recv(1024).startswith(b"554 5.5.1")
    # A web scanner: waits for the banner, then speaks HTTP.
    with socket.create_connection((HOST, relay.port), timeout=SMTP_TIMEOUT) as scanner:
        assert scanner.recv(1024).startswith(b"220 ")
        scanner.sendall(b"GET / HTTP/1.1\r\nHost: relay\r\n\r\n")
        assert scanner.recv(1024).startswith(b"221 2.7.0")
    relay.waitForLog(r"NOQUEUE: reject: CONNECT from ")
    relay.waitForLog(r"warning: non-SMTP command from ")
    sink.waitForMessages(1, relay.describe)
    relay.waitForLog(r"relayd/qmgr\[\d+\]: [0-9A-Z]{16}: removed")
    log = tmp_path / "mail.log"
    log.write_text("".join(line + "\n" for line in relay.log().splitlines()
                           if re.match(r"\w{3} [ \d]\d \d\d:\d\d:\d\d ", line)))

    # The filter as an admin installs it: beside fail2ban's own common.conf.
    config = tmp_path / "fail2ban"
    shutil.copytree("/etc/fail2ban", config)
    for jail in (config / "jail.d").iterdir():
        jail.unlink()
    shutil.copy(ROOT / "etc/fail2ban/filter.d/relayd.conf", config / "filter.d")
    shutil.copy(ROOT / "etc/fail2ban/jail.d/relayd.conf", config / "jail.d")
    result = subprocess.run([fail2banRegex, "--print-all-matched", str(log),
                             str(config / "filter.d/relayd.conf")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert re.search(r"Lines: \d+ lines, 0 ignored, 5 matched", out), out
    matched = out.split("Matched line(s):", 1)[1].split("`-", 1)[0]
    for mechanism in ("PLAIN", "LOGIN"):
        assert len(re.findall(rf"SASL {mechanism} authentication failed: authentication "
                              r"failure, sasl_username=alice", matched)) == 1, out
    assert "Relay access denied" in matched and "SMTP protocol synchronization" in matched, out
    assert "non-SMTP command from unknown[127.0.0.1]: GET / HTTP/1.1" in matched, out
    assert "[127.0.0.1]" in matched

    # Debian's stock SASL jail (postfix[mode=auth]) sees none of it: why relayd ships a filter.
    stock = subprocess.run([fail2banRegex, str(log), str(STOCK_FILTERS / "postfix.conf[mode=auth]")],
                           capture_output=True, text=True, timeout=60).stdout
    assert re.search(r"Lines: \d+ lines, 0 ignored, 0 matched", stock), stock

    # The jail example (journald backend) is a configuration fail2ban accepts.
    check = subprocess.run([fail2banClient, "-c", str(config), "-t"], capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    dump = subprocess.run([fail2banClient, "-c", str(config), "-d"], capture_output=True,
                          text=True, timeout=60).stdout
    assert "['add', 'relayd', 'systemd']" in dump, dump
    assert "['set', 'relayd', 'addjournalmatch', 'SYSLOG_IDENTIFIER=relayd/smtpd']" in dump, dump
