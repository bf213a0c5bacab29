"""
bench/compare.py's own parts that need neither root nor Postfix: the
statistics and the table it prints, the relayd configurations and spool it
writes (read back by relayd's own parser and spool), and the scheduler
measurement. The benchmark itself is not part of the test suite.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from relayd import config
from relayd.queue import Spool

ROOT = Path(__file__).resolve().parents[1]


def loadCompare():
    spec = importlib.util.spec_from_file_location("bench_compare", ROOT / "bench" / "compare.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


compare = loadCompare()


@pytest.mark.parametrize("values, p, expected", [
    ([], 50, None),
    ([7.0], 99, 7.0),
    ([3.0, 1.0, 2.0], 50, 2.0),
    (list(range(1, 101)), 50, 50),
    (list(range(1, 101)), 99, 99),
    (list(range(1, 101)), 100, 100),
    (list(range(100, 0, -1)), 99, 99),  # order of arrival does not matter
    ([1.0, 2.0], 1, 1.0),
])
def test_percentile_is_the_nearest_rank(values, p, expected):
    assert compare.percentile(values, p) == expected


@pytest.mark.parametrize("values, expected", [
    ([], None),
    ([None, None], None),  # every round failed
    ([5.0], 5.0),
    ([3.0, 1.0, 2.0], 2.0),
    ([4.0, 1.0, 2.0, 3.0], 2.5),
    ([1.0, None, 3.0], 2.0),
])
def test_median_of_the_rounds(values, expected):
    assert compare.median(values) == expected


@pytest.mark.parametrize("relayd, postfix, expected", [
    (300.0, 200.0, 1.5),
    (100.0, 400.0, 0.25),
    (None, 200.0, None),
    (300.0, None, None),
    (300.0, 0.0, None),
])
def test_ratio(relayd, postfix, expected):
    assert compare.ratio(relayd, postfix) == expected


@pytest.mark.parametrize("value, expected", [
    (None, "-"), (0.0036, "0.0036"), (0.5, "0.50"), (1.234, "1.23"), (12.0, "12.00"),
])
def test_ratio_keeps_two_significant_digits_below_a_tenth(value, expected):
    assert compare.formatRatio(value) == expected


def test_table_has_one_line_per_measure_with_ratio_and_direction():
    table = compare.formatTable([
        compare.Line("4000 x 2 KB, 20 sessions: end-to-end rate (msg/s)", 1234.5, 987.6, "higher"),
        compare.Line("paced: dot to 250, p99 (ms)", 3.25, 12.5, "lower"),
        compare.Line("scheduler, 10,000 queued: drain (us/msg)", 40.0, None, "lower"),
        compare.Line("tls: accept rate (msg/s)", 140.0, None, "higher", "FAILED (postfix: AUTH: 454)"),
    ]).splitlines()
    assert table[0].split() == ["relayd", "postfix", "relayd/postfix", "better"]
    assert len(table) == 6
    assert table[2].split()[-4:] == ["1,234", "988", "1.25", "higher"]
    assert table[3].split()[-4:] == ["3.25", "12.5", "0.26", "lower"]
    assert table[4].split()[-4:] == ["40.0", "-", "-", "lower"]
    assert table[5].endswith("higher  FAILED (postfix: AUTH: 454)")
    # The numbers line up under their headings.
    assert len({len(line.split("  higher")[0].split("  lower")[0]) for line in table[2:]}) == 1


def test_log_counter_counts_only_complete_lines(tmp_path):
    log = tmp_path / "maillog"
    counter = compare.LogCounter(log, b"status=deferred")
    assert counter.poll() == 0  # no file yet
    log.write_bytes(b"a status=deferred (x)\nb status=sent\nc status=def")
    assert counter.poll() == 1
    with open(log, "ab") as f:
        f.write(b"erred (y)\n")
    assert counter.poll() == 2
    assert counter.poll() == 2


def test_alternate_config_directories_become_one_line_listing_all(tmp_path):
    main = tmp_path / "main.cf"
    main.write_text("compatibility_level = 3.6\n"
                    "alternate_config_directories = /var/a/etc\n"
                    "alternate_config_directories = /var/b/etc, /var/c/etc\n")
    compare.allowConfigDirectory(Path("/var/bench/etc"), main)
    assert main.read_text() == ("compatibility_level = 3.6\n"
                                "alternate_config_directories = /var/a/etc, /var/b/etc, /var/c/etc, "
                                "/var/bench/etc\n")
    compare.allowConfigDirectory(Path("/var/b/etc"), main)
    assert main.read_text().count("/var/b/etc") == 1


@pytest.mark.parametrize("profile", [
    compare.Profile(),
    compare.Profile(tls=True),
    compare.Profile(holdRetries=True),
    compare.Profile(connections=2100),
], ids=["plain", "tls", "hold", "idle"])
def test_relayd_configurations_are_accepted_by_relayd(tmp_path, profile):
    relay = compare.Relayd(tmp_path, 2525, 2526, profile, (tmp_path / "cert.pem", tmp_path / "key.pem"))
    settings = config.parse(relay.config(), str(tmp_path / "relayd.yaml"))
    assert settings.limits.connections == profile.connections
    assert settings.limits.messagesPerUserPerHour > 1_000_000
    assert settings.delivery.concurrency == compare.DELIVERY_CONCURRENCY


def test_spool_written_directly_is_read_back_by_relayd(tmp_path):
    compare.writeRelaydSpool(tmp_path / "spool", 25, 2048)
    spool = Spool(str(tmp_path / "spool"))
    envelopes = spool.recover()
    assert len(envelopes) == 25
    assert spool.quarantinedIds() == []
    first = envelopes[0]
    assert [r.address for r in first.pending()] == [compare.RECIPIENT]
    with spool.openBody(first.queueId) as body:
        content = body.read()
    assert content.startswith(b"From: <bench@example.com>\r\n") and len(content) == first.size


def test_scheduler_measurement_delivers_every_message():
    cost = compare.schedulerCost(500)
    assert set(cost) == {"load", "drain"}
    assert cost["load"] > 0 and cost["drain"] > 0


def test_only_names_rows_that_exist(capsys):
    with pytest.raises(SystemExit):
        compare.main(["--only", "small20,nonsense"])
    assert "unknown row nonsense" in capsys.readouterr().err


def test_configurations_after_the_first_are_printed_as_differences():
    text = compare.formatConfigs({
        "relayd:\nhostname: a\nretry: 5s\n": ["small20", "small1", "small20"],
        "postfix:\nin_flow_delay = 0\n": ["small20"],
        "relayd:\nhostname: a\nretry: 1h\n": ["backlog"],
    })
    assert text.splitlines() == [
        "--- relayd, rows small20, small1:",
        "    hostname: a",
        "    retry: 5s",
        "--- postfix, rows small20:",
        "    in_flow_delay = 0",
        "--- relayd, rows backlog: as above, but",
        "  - retry: 5s",
        "  + retry: 1h",
    ]
