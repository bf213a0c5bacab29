"""
The limits that count across every intake process, kept by their one owner
(the master process) and asked over the workers' channel (relayd.channel):
the session counts (``limits.connections``, ``connections_per_client``);
the AUTH failure throttle and the per-login message rate are
relayd.auth's FailureThrottle and MessageRate, held beside them.

Each count remembers which worker holds it, so that a worker that dies
gives its sessions and its password checks in flight back at once.
"""

from __future__ import annotations

from collections import Counter

from relayd.channel import ADMITTED, REFUSED_CONNECTIONS, REFUSED_PER_CLIENT


class SessionCounts:
    """Live sessions per worker and client address, against the two connection limits."""

    def __init__(self, connections: int, perClient: int) -> None:
        self.connections = connections
        self.perClient = perClient
        self._byWorker: dict[object, Counter] = {}
        self._byClient: Counter = Counter()
        self.total = 0

    def reconfigure(self, config) -> None:
        self.connections = config.limits.connections
        self.perClient = config.limits.connectionsPerClient

    def admit(self, worker: object, address: str) -> str:
        """Count a session of ``worker`` for ``address``; ADMITTED, or the limit that refused it."""
        if self.total + 1 > self.connections:
            return REFUSED_CONNECTIONS
        if self._byClient[address] + 1 > self.perClient:
            return REFUSED_PER_CLIENT
        self._byWorker.setdefault(worker, Counter())[address] += 1
        self._byClient[address] += 1
        self.total += 1
        return ADMITTED

    def left(self, worker: object, address: str) -> None:
        """A session counted by ``admit`` has ended (anything else is ignored)."""
        mine = self._byWorker.get(worker)
        if not mine or mine[address] <= 0:
            return
        self._take(mine, address, 1)

    def forget(self, worker: object) -> int:
        """``worker`` is gone, and its sessions with it; how many it held."""
        mine = self._byWorker.pop(worker, Counter())
        held = 0
        for address, count in list(mine.items()):
            held += count
            self._take(mine, address, count)
        return held

    def _take(self, mine: Counter, address: str, count: int) -> None:
        mine[address] -= count
        if mine[address] <= 0:
            del mine[address]
        self._byClient[address] -= count
        if self._byClient[address] <= 0:
            del self._byClient[address]
        self.total -= count
