"""
What the command-line programs (relayd, relayd-passwd, relayctl) share: exit
statuses, a one-line usage error and a one-line refusal.
"""

from __future__ import annotations

import argparse

# The config file relayctl and relayd dkim read unless told otherwise ($RELAYD_CONFIG, --config).
DEFAULT_CONFIG = "/etc/relayd/relayd.yaml"

# Exit statuses.
OK = 0
FAILED = 1
USAGE = 2


class UsageError(Exception):
    """A command line that does not parse; exit 2."""


class Refusal(Exception):
    """One line for stderr; exit 1."""


class OneLineParser(argparse.ArgumentParser):
    """
    An ArgumentParser whose usage errors are one line ("relayd: ...; usage:
    ...") instead of argparse's usage block, so scripts and humans see the
    problem at a glance.
    """

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)
