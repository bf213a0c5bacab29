"""Shared pytest configuration for relayd's tests."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config) -> None:
    # Integration tests run the installed daemon (the venv's twistd) and real
    # SMTP servers as subprocesses on 127.0.0.1; select or skip them with
    # ``-m integration`` / ``-m "not integration"``.
    config.addinivalue_line(
        "markers",
        "integration: runs real processes (twistd relayd, SMTP sinks) on 127.0.0.1",
    )


# UDP ports freeUDPPort() has handed out: two bind(0) picks, each closed at
# once, can return the same port (two DNS servers of one test, say).
_handedOutUDP: set[int] = set()


def freeUDPPort() -> int:
    for _ in range(1000):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _handedOutUDP:
            _handedOutUDP.add(port)
            return port
    raise AssertionError(f"no free UDP port not handed out before ({len(_handedOutUDP)} were)")


@pytest.fixture
def dnsServer():
    """Factory: tests/dnsserver.py serving a zone on 127.0.0.1; returns its port."""
    procs = []

    def start(zone):
        port = freeUDPPort()
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "dnsserver.py"), "--port", str(port),
             "--zone", json.dumps(zone)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        procs.append(proc)
        assert b"listening" in proc.stdout.readline()
        return port

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(timeout=10)
