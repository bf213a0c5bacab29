"""Shared pytest configuration for relayd's tests."""

from __future__ import annotations


def pytest_configure(config) -> None:
    # Integration tests run the installed daemon (the venv's twistd) and real
    # SMTP servers as subprocesses on 127.0.0.1; select or skip them with
    # ``-m integration`` / ``-m "not integration"``.
    config.addinivalue_line(
        "markers",
        "integration: runs real processes (twistd relayd, SMTP sinks) on 127.0.0.1",
    )
