"""
Client names in the real daemon's log, as Postfix writes them: the client's
PTR name confirmed by its A record (from a DNS server under the test's
control, tests/dnsserver.py), else ``unknown``; and after SIGHUP, a new
DNS server and timeout apply, without "resolv.conf changed" lines.
"""

from __future__ import annotations

import signal

import pytest

from tests.integration.harness import HOST, Relayd, freePort, makeMessage

pytestmark = pytest.mark.integration

REVERSE = "1.0.0.127.in-addr.arpa"


def withDNS(daemon: Relayd, sinkPort: int, dnsPort: int, timeout: str) -> str:
    return daemon.configText(sinkPort, extra=(
        f"limits: {{client_name_timeout: {timeout}}}\n")).replace(
        "      tls: none\n", f"      tls: none\n  dns: {{servers: [\"{HOST}:{dnsPort}\"]}}\n", 1)


def relayWithNamedClient(tmp_path, processes, sink, dnsServer, monkeypatch, hosts: str):
    """
    A daemon whose DNS names 127.0.0.1 laptop.client.test (confirmed), with
    ``hosts`` as its hosts file, after one message; (daemon, queue id, log).
    """
    (tmp_path / "hosts").write_text(hosts)
    monkeypatch.setenv("RELAYD_HOSTS_FILE", str(tmp_path / "hosts"))
    named = dnsServer({REVERSE: {"PTR": ["laptop.client.test"]},
                       "laptop.client.test": {"A": ["127.0.0.1"]}})
    daemon = Relayd(tmp_path / "relayd", sink.port)
    daemon.writeConfig(withDNS(daemon, sink.port, named, "5s"))
    processes.append(daemon)
    daemon.start()
    queueId = daemon.submit(makeMessage("named", ["hello"]))
    daemon.waitForLog(rf"{queueId}: removed")
    return daemon, queueId, daemon.log()


def test_daemon_logs_confirmed_client_names_and_reload_applies_new_dns(
        tmp_path, processes, sink, dnsServer, monkeypatch):
    # No hosts file entry for 127.0.0.1: the name comes from the DNS.
    daemon, queueId, log = relayWithNamedClient(tmp_path, processes, sink, dnsServer,
                                                monkeypatch, hosts="")
    assert "connect from laptop.client.test[127.0.0.1]" in log, daemon.describe()
    assert f"{queueId}: client=laptop.client.test[127.0.0.1]" in log, daemon.describe()
    daemon.waitForLog(r"disconnect from laptop\.client\.test\[127\.0\.0\.1\]")

    # A DNS server that never answers, and a short timeout: after SIGHUP
    # the banner still comes, and the name is "unknown".
    silent = dnsServer({REVERSE: "TIMEOUT"})
    offset = daemon.logOffset()
    daemon.writeConfig(withDNS(daemon, sink.port, silent, "1s"))
    daemon.signal(signal.SIGHUP)
    daemon.waitForLog(r"reload: configuration .* applied", since=offset)
    with daemon.connect() as client:
        assert client.noop()[0] == 250
    daemon.waitForLog(r"disconnect from unknown\[127\.0\.0\.1\]", since=offset)
    assert "connect from unknown[127.0.0.1]" in daemon.log(offset)
    assert daemon.terminate() == 0


def test_start_and_reload_with_resolv_conf_say_nothing_about_it(tmp_path, processes, sink):
    # No delivery.dns.servers: the name servers of /etc/resolv.conf. Twisted's
    # own reading of it logged "/etc/resolv.conf changed, reparsing" and
    # "Resolver added ..." at every start and SIGHUP, smarthosts only or not.
    daemon = Relayd(tmp_path / "relayd", sink.port)
    processes.append(daemon)
    daemon.start()
    offset = daemon.logOffset()
    daemon.signal(signal.SIGHUP)
    daemon.waitForLog(r"reload: configuration .* applied", since=offset)
    log = daemon.log()
    assert "resolv.conf" not in log and "Resolver added" not in log, daemon.describe()
    assert daemon.terminate() == 0


def test_a_client_in_the_hosts_file_is_named_from_it_without_asking_the_dns(
        tmp_path, processes, sink, dnsServer, monkeypatch):
    # As Postfix through the system's resolver: the hosts file first.
    daemon, queueId, log = relayWithNamedClient(
        tmp_path, processes, sink, dnsServer, monkeypatch,
        hosts="# the office\n127.0.0.1   printer.office.test printer\n")
    assert f"{queueId}: client=printer.office.test[127.0.0.1]" in log, daemon.describe()
    assert "laptop.client.test" not in log, daemon.describe()
    assert daemon.terminate() == 0
