"""
An IPv6 listener written as the README shows it (escaped colons, single
quotes in YAML): it parses, the daemon listens on ::1, and a client there
submits a message that is delivered.
"""

from __future__ import annotations

import re
import smtplib
import socket
from pathlib import Path

import pytest

from tests.integration.harness import SMTP_TIMEOUT, Relayd, makeMessage

pytestmark = pytest.mark.integration

README = Path(__file__).resolve().parents[2] / "README.rst"


def readmeLoopbackListener() -> str:
    """The README's IPv6 loopback listener line, as an admin would copy it."""
    lines = [l.strip() for l in README.read_text().splitlines() if "interface=\\:\\:1'" in l]
    assert lines, "README.rst has no IPv6 loopback listener example ('tcp6:...:interface=\\:\\:1')"
    return lines[0]


def freePort6() -> int:
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
        s.bind(("::1", 0))
        return s.getsockname()[1]


class IPv6Relayd(Relayd):
    def configText(self, smarthostPort, trustedNetworks=None, extra=""):
        self.port6 = getattr(self, "port6", None) or freePort6()
        line = re.sub(r"tcp6:\d+:", f"tcp6:{self.port6}:", readmeLoopbackListener())
        text = super().configText(smarthostPort, trustedNetworks, extra)
        # The harness's IPv4 listener stays first (it waits on it); the README's line follows.
        return text.replace("    auth: none\n", f"    auth: none\n  {line}\n", 1)


def test_readme_ipv6_listener_listens_on_loopback_and_relays(tmp_path, processes, sink):
    try:
        freePort6()
    except OSError:
        pytest.skip("no IPv6 loopback (::1) on this machine")
    relay = IPv6Relayd(tmp_path / "relay", sink.port)
    processes.append(relay)
    relay.start()
    assert re.search(rf"listening on tcp6:{relay.port6}:interface=\\:\\:1 \(::1:{relay.port6}\)",
                     relay.log()), relay.describe()
    with smtplib.SMTP("::1", relay.port6, local_hostname="client.test", timeout=SMTP_TIMEOUT) as client:
        client.sendmail("alice@client.test", ["bob@remote.test"], makeMessage("over IPv6", ["hi"]))
    relay.waitForLog(r"client=[^\[\s]+\[::1\]")
    [delivered] = sink.waitForMessages(1, relay.describe)
    assert b"over IPv6" in delivered.content
