"""
msmtp (Debian's msmtp) as the sendmail replacement of a host without an
MTA: ``msmtp -t`` reads the recipients from the message's header and submits
it to relayd with STARTTLS and AUTH on the submission port, or over implicit
TLS on port 465, checking relayd's certificate against the test CA.
"""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.integration.harness import HOST, makeMessage
from tests.interop.peers import MSMTP, PASSWORD, USER, SubmissionRelayd, arrivedIntact, missing

pytestmark = pytest.mark.integration


@pytest.fixture
def relay(tmp_path, processes, sink):
    if missing(MSMTP):
        pytest.skip(f"{MSMTP} not installed (Debian package msmtp; .ci/run installs it)")
    daemon = SubmissionRelayd(tmp_path / "relayd", f"{{host: {HOST}, port: {sink.port}, tls: none}}")
    processes.append(daemon)
    return daemon.start()


def msmtp(relay: SubmissionRelayd, tmp_path, port: int, starttls: bool, message: bytes) -> str:
    """Runs ``msmtp -t`` with the message on stdin as a local program would (LF line ends); its log line."""
    log = tmp_path / "msmtp.log"
    config = tmp_path / "msmtprc"
    config.write_text(
        "defaults\n"
        "tls on\n"
        f"tls_trust_file {relay.directory / 'ca.pem'}\n"
        f"tls_starttls {'on' if starttls else 'off'}\n"
        f"logfile {log}\n"
        "account relay\n"
        f"host {HOST}\n"
        f"port {port}\n"
        f"from {USER}\n"
        "auth on\n"
        f"user {USER}\n"
        f"password {PASSWORD}\n"
        "account default : relay\n")
    config.chmod(0o600)  # msmtp refuses a password in a file others can read
    result = subprocess.run([MSMTP, "-C", str(config), "-t"],
                            input=message.replace(b"\r\n", b"\n"), capture_output=True, timeout=60)
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr,
                                    log.read_text() if log.exists() else "")
    [line] = log.read_text().splitlines()
    return line


@pytest.mark.parametrize("starttls", [True, False], ids=["starttls-587", "implicit-465"])
def test_msmtp_as_sendmail_submits_with_tls_and_auth(relay, sink, tmp_path, starttls):
    sent = makeMessage("via msmtp", ["Sent by msmtp -t.", ".dot", "end"],
                       recipient="carol@remote.test")
    port = relay.port if starttls else relay.implicitPort
    line = msmtp(relay, tmp_path, port, starttls, sent)
    assert f"host={HOST} tls=on auth=on user={USER} from={USER} recipients=carol@remote.test" in line, line
    qid = re.search(r"smtpstatus=250 smtpmsg='250 2\.0\.0 Ok: queued as ([0-9A-Z]{16})' exitcode=EX_OK",
                    line).group(1)

    relay.waitForLog(rf"\b{qid}: client=\S*\[{re.escape(HOST)}\], sasl_method=(PLAIN|LOGIN|SCRAM\S*), "
                     rf"sasl_username={re.escape(USER)}$")
    relay.waitForLog(rf"\b{qid}: to=<carol@remote\.test>, relay={re.escape(HOST)}\[{re.escape(HOST)}\]:"
                     rf"{sink.port}, .*status=sent")
    [arrived] = sink.waitForMessages(1)
    assert arrived.envelope["mail_from"] == USER
    assert arrived.envelope["rcpt_tos"] == ["carol@remote.test"]
    [received] = arrivedIntact(arrived.content, sent, 1)
    assert f"(relayd) with ESMTPSA id {qid}".encode() in received, received
    assert b"(using TLSv1." in received, received
