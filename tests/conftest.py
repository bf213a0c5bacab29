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


def freeUDPPort() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
