"""
The scheduler with intake workers: a worker's makes only first attempts and
hands the rest to the master's; the workers' attempts take slots from the
master's, so delivery.concurrency and destination_concurrency stay global.
"""

from __future__ import annotations

from relayd.envelope import Status
from tests.test_scheduler import envelope, result, rigFactory, settings  # noqa: F401


class HandOff:
    """The worker's link as its scheduler uses it; records the spool's state at each call."""

    def __init__(self, spool):
        self.spool = spool
        self.calls = []

    def ended(self, queueId, kept):
        self.calls.append(("ended", queueId, kept, list(self.spool.events)))

    def notice(self, envelope):
        self.calls.append(("notice", envelope.queueId))


def workerRig(rigFactory, **kw):  # noqa: F811
    rig = rigFactory(**kw)
    rig.handOff = rig.sched.handOff = HandOff(rig.spool)
    return rig


def test_a_delivered_first_attempt_is_removed_and_the_master_told(rigFactory):  # noqa: F811
    rig = workerRig(rigFactory)
    rig.courier.script = [[250]]
    env = envelope(rig.clock, "b@example.org")
    rig.sched.add(env)
    assert rig.spool.removed == [env.queueId]
    assert rig.handOff.calls == [("ended", env.queueId, False, [("remove", env.queueId)])]
    assert rig.sched.queueLength() == 0


def test_a_deferred_first_attempt_is_written_then_handed_to_the_master(rigFactory):  # noqa: F811
    rig = workerRig(rigFactory)
    rig.courier.script = [[450]]
    env = envelope(rig.clock, "b@example.org")
    start = rig.clock.seconds()
    rig.sched.add(env)
    # Written first (the master loads it from the spool), then handed over.
    assert rig.spool.updated == [(env.queueId, start + 300, [Status.DEFERRED])]
    assert rig.handOff.calls == [("ended", env.queueId, True, [("update", env.queueId)])]
    assert rig.sched.queueLength() == 0
    # The worker's spool lets go of it too (the master removes its update file).
    assert rig.spool.forgotten == [env.queueId]
    rig.clock.advance(3600)
    assert len(rig.courier.calls) == 1  # never retried by the worker


def test_a_bounce_from_a_first_attempt_is_sent_by_the_master(rigFactory):  # noqa: F811
    rig = workerRig(rigFactory)
    rig.courier.script = [[550]]
    env = envelope(rig.clock, "gone@example.org")
    rig.sched.add(env)
    [(notice, _)] = rig.spool.notices
    assert ("notice", notice.queueId) in rig.handOff.calls
    assert rig.courier.noticeCalls == []  # not attempted by the worker
    assert rig.spool.removed == [env.queueId]
    assert rig.handOff.calls[-1][:3] == ("ended", env.queueId, False)


def test_workers_attempts_count_against_the_masters_destination_concurrency(rigFactory):  # noqa: F811
    master = rigFactory(destinationConcurrency=2)
    first = master.sched.takeSlots(["example.org"])
    assert first is not None
    queued = envelope(master.clock, "b@example.org")
    master.sched.add(queued)  # the master's own: a second slot
    assert len(master.courier.calls) == 1
    assert master.sched.takeSlots(["example.net"]) is None  # one smarthost: one destination
    waiting = envelope(master.clock, "c@example.org")
    master.sched.add(waiting)
    assert len(master.courier.calls) == 1  # waits for a slot
    master.sched.freeSlots(first)
    assert len(master.courier.calls) == 2  # the worker's slot went to the waiting one


def test_workers_attempts_count_against_the_masters_concurrency(rigFactory):  # noqa: F811
    master = rigFactory(concurrency=2)
    master.sched.reconfigure(settings(concurrency=2))
    slots = [master.sched.takeSlots(["example.org"]) for _ in range(3)]
    assert [s is not None for s in slots] == [True, True, False]
    env = envelope(master.clock, "b@example.org")
    master.sched.add(env)
    assert master.courier.calls == []
    master.sched.freeSlots(slots[0])
    assert len(master.courier.calls) == 1


def test_no_slots_while_the_master_stops(rigFactory):  # noqa: F811
    master = rigFactory()
    master.sched.stopService()
    assert master.sched.takeSlots(["example.org"]) is None
