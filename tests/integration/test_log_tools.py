"""
The mail log as admins' tools read it: relayd run with
``--logger relayd.logformat.syslogStdout``, its log fed to pflogsumm and to
fail2ban's stock postfix filter.
"""

from __future__ import annotations

import io
import re
import shutil
import subprocess

import pytest
from twisted.logger import globalLogPublisher

from relayd import logformat, maillog

from .harness import Relayd, makeMessage, twistdPath

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
    assert "NOQUEUE: reject: RCPT from unknown[127.0.0.1]: 554 5.7.1" in result, result

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
