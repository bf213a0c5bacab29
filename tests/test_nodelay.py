"""
TCP_NODELAY on every TCP connection relayd accepts or makes, read back with
getsockopt on real loopback sockets: the daemon's own listeners as tap.py
wires them (plain, implicit TLS, PROXY protocol), and the courier's connections (plain
and implicit TLS); and that each of them has relayd.tcp's transport,
which sends a write at once, also in an intake worker's adopted listener. The real reactor runs in a subprocess, so
the test process never runs the global reactor.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEADLINE = 60


def socketOf(transport) -> socket.socket:
    """The TCP socket under a transport and whatever wraps it (TLS, PROXY protocol)."""
    for _ in range(5):
        handle = transport.getHandle()
        if isinstance(handle, socket.socket):
            return handle
        transport = transport.transport  # a TLSMemoryBIOProtocol's handle is its SSL connection
    raise AssertionError(f"no socket under {transport!r}")


def noDelay(transport) -> int:
    return socketOf(transport).getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


def sendsAtOnce(transport) -> bool:
    """Whether the TCP transport under ``transport`` is relayd.tcp's (a write goes out at once)."""
    from relayd.tcp import SendAtOnce

    for _ in range(5):
        if isinstance(transport, SendAtOnce):
            return True
        transport = getattr(transport, "transport", None)
    return False


def scenarioMain(configPath: str, bodyPath: str) -> None:
    """
    Start the daemon's service from ``configPath``; connect to every
    listener with a plain socket and have a Courier deliver to each of
    them; print TCP_NODELAY of every accepted and every made connection.
    """
    from twisted.internet import defer, task

    from relayd import config, tap
    from relayd.config import NextHop
    from relayd.courier import Courier
    from relayd.delivery import Destination
    from relayd.smtpclient import OutboundSession
    from relayd.proxy import ProxyFactory

    made = []
    connectionMade = OutboundSession.connectionMade

    def recordingConnectionMade(self):
        connectionMade(self)
        made.append({"tls": self.tlsMode, "nodelay": noDelay(self.transport),
                     "atOnce": sendsAtOnce(self.transport)})

    OutboundSession.connectionMade = recordingConnectionMade

    async def main(reactor):
        # A hang ends the run (no output) well before the test gives up.
        reactor.callLater(DEADLINE / 2, reactor.stop)
        relay = tap.makeService({"loaded": config.load(configPath)}, reactor)
        relay.startService()
        # (port, PROXY header first, implicit TLS) of every listener.
        listening = [(l.port.getHost().port, isinstance(l.factory, ProxyFactory),
                      l.description in IMPLICIT) for l in relay.listeners]
        accepted = []
        factory = relay.factory
        seen = set()

        async def collect(count):
            for _ in range(200):
                for session in list(factory.sessions):
                    if session not in seen:
                        seen.add(session)
                        accepted.append({"tls": session.listener.tls,
                                         "proxied": session.listener.endpoint.startswith("haproxy:"),
                                         "nodelay": noDelay(session.transport),
                                         "atOnce": sendsAtOnce(session.transport)})
                if len(seen) >= count:
                    return
                await task.deferLater(reactor, 0.05, lambda: None)

        # A plain client socket to every listener (TLS or not: the server
        # side is checked as soon as the session exists; behind a PROXY
        # header, once the header is read).
        clients = []
        for port, proxied, _ in listening:
            client = socket.create_connection(("127.0.0.1", port))
            if proxied:
                client.sendall(b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 25\r\n")
            clients.append(client)
        await collect(len(clients))

        courier = Courier(reactor, "client.test")
        for port, proxied, implicit in listening:
            if proxied:
                continue  # the courier sends no PROXY header
            tls = "implicit" if implicit else "none"
            await courier.deliver(Destination((NextHop("127.0.0.1", port, tls=tls, verify=False),)),
                                  "sender@example.com", {}, ["rcpt@example.org"],
                                  lambda: open(bodyPath, "rb"), 30)
        await collect(len(clients) + len(listening) - 1)
        await courier.closeIdle()
        for c in clients:
            c.close()
        print(json.dumps({"accepted": accepted, "made": made}))
        await relay.stopService()

    IMPLICIT = {l.endpoint for l in config.load(configPath).listeners if l.tls == "implicit"}
    task.react(lambda reactor: defer.ensureDeferred(main(reactor)))


CONFIG = """\
hostname: relay.test
listeners:
  - {{endpoint: "tcp:0:interface=127.0.0.1", tls: none, auth: none}}
  - {{endpoint: "tcp:0:interface=127.0.0.1:backlog=50", tls: implicit, auth: none}}
  - {{endpoint: "haproxy:tcp:0:interface=127.0.0.1", tls: none, auth: none, proxy_from: ["127.0.0.1/32"]}}
tls: {{certificate: {cert}, key: {key}}}
relay: {{trusted_networks: ["127.0.0.0/8"]}}
limits: {{client_name_timeout: 0s}}  # no DNS: the tests stay on loopback
queue: {{directory: {spool}}}
delivery:
  smarthosts: [{{host: 127.0.0.1, port: 9, tls: none}}]
"""


def test_every_connection_accepted_and_made_sets_tcp_nodelay(tmp_path):
    trustme = pytest.importorskip("trustme")
    cert = trustme.CA().issue_cert("relay.test")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    configPath = tmp_path / "relayd.yaml"
    configPath.write_text(CONFIG.format(cert=tmp_path / "cert.pem", key=tmp_path / "key.pem",
                                        spool=tmp_path / "spool"))
    bodyPath = tmp_path / "body"
    bodyPath.write_bytes(b"Subject: hi\r\n\r\nhello\r\n")
    code = ("import sys; from tests.test_nodelay import scenarioMain; "
            "scenarioMain(sys.argv[1], sys.argv[2])")
    proc = subprocess.run([sys.executable, "-c", code, str(configPath), str(bodyPath)],
                          cwd=ROOT, capture_output=True, timeout=DEADLINE)
    assert proc.returncode == 0, proc.stderr.decode()
    result = json.loads(proc.stdout.decode().strip().splitlines()[-1])

    # A plain socket to each listener, a courier connection to each but the PROXY one.
    accepted = sorted((a["tls"], a["proxied"], bool(a["nodelay"])) for a in result["accepted"])
    assert accepted == ([("implicit", False, True)] * 2 + [("none", False, True)] * 2
                        + [("none", True, True)])
    made = sorted((m["tls"], bool(m["nodelay"])) for m in result["made"])
    assert made == [("implicit", True), ("none", True)]
    # And each is relayd.tcp's transport, which sends a write at once.
    assert all(c["atOnce"] for c in result["accepted"] + result["made"]), result


def workerScenarioMain() -> None:
    """
    An intake worker's service adopting a listening socket it inherited:
    print whether the connection it accepts is relayd.tcp's transport.
    """
    from twisted.internet import defer, protocol, task
    from twisted.python import threadpool

    from relayd.worker import WorkerService

    accepted = []

    class Recording(protocol.Protocol):
        def connectionMade(self):
            accepted.append(sendsAtOnce(self.transport))

    async def main(reactor):
        reactor.callLater(DEADLINE / 2, reactor.stop)
        listening = socket.socket()
        listening.bind(("127.0.0.1", 0))
        listening.listen(5)
        listening.setblocking(False)  # as the master hands them over
        port = listening.getsockname()[1]
        fd = listening.detach()  # the worker closes the inherited descriptor
        worker = WorkerService(None, reactor, None, [protocol.Factory.forProtocol(Recording)],
                               [fd], threadpool.ThreadPool(0, 1), None, [], None, None)
        worker.startService()
        client = socket.create_connection(("127.0.0.1", port))
        for _ in range(200):
            if accepted:
                break
            await task.deferLater(reactor, 0.05, lambda: None)
        client.close()
        print(json.dumps({"accepted": accepted}))
        for adopted in worker.ports:
            await adopted.stopListening()
        worker.pool.stop()

    task.react(lambda reactor: defer.ensureDeferred(main(reactor)))


def test_an_intake_workers_adopted_listener_accepts_with_the_send_at_once_transport():
    """Intake workers adopt the master's sockets; what they accept sends at once too."""
    code = "from tests.test_nodelay import workerScenarioMain; workerScenarioMain()"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          timeout=DEADLINE)
    assert proc.returncode == 0, proc.stderr.decode()
    result = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    assert result == {"accepted": [True]}
