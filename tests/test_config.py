"""
Tests for relayd.config and the ``relayd check-config`` command.

Broken configs live in tests/configs/bad/, one YAML file each beside a
``.err`` file holding the exact one-line error it must produce ("FILE"
stands for the path the file was loaded from), so the wording admins see
is reviewed like code.
"""

from __future__ import annotations

import ipaddress
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from relayd import config
from relayd.cli import main as cli
from relayd.config import (
    Config,
    ConfigError,
    Delivery,
    Limits,
    Listener,
    NextHop,
    Queue,
    Relay,
    Retry,
)

HERE = Path(__file__).resolve().parent
CONFIGS = HERE / "configs"
BAD = CONFIGS / "bad"
ROOT = HERE.parent
GOOD = CONFIGS / "good.yaml"
MINIMAL = CONFIGS / "minimal.yaml"


def _minimal(**replace: str) -> str:
    """The minimal config's text with top-level lines swapped or added."""
    lines = {
        "hostname": "hostname: relay.example.com",
        "listeners": 'listeners: [{endpoint: "tcp:25", tls: none, auth: none}]',
        "queue": "queue: {directory: /var/spool/relayd}",
        "delivery": "delivery: {smarthosts: [{host: smtp.example.net, tls: none}]}",
    }
    lines.update(replace)
    return "\n".join(line for line in lines.values() if line) + "\n"


# Good configs
def test_everything() -> None:
    """
    A file that sets every supported key to a non-default value loads
    into exactly those values.
    """
    path = str(GOOD)
    assert config.load(path) == Config(
        path=path,
        hostname="relay.example.com",
        listeners=(
            Listener("tcp:2525:interface=127.0.0.1", "none", "none"),
            Listener("tcp6:2525:interface=\\:\\:1", "none", "none"),
            Listener("systemd:domain=INET:name=relayd-smtp", "none", "none"),
            Listener("haproxy:tcp:2600:interface=127.0.0.1", "none", "none",
                     proxyFrom=(ipaddress.ip_network("10.0.0.5/32"),
                                ipaddress.ip_network("2001:db8::/64"))),
            Listener("unix:/run/relayd/smtp.sock", "none", "none"),
        ),
        relay=Relay(
            trustedNetworks=(
                ipaddress.ip_network("10.0.0.0/8"),
                ipaddress.ip_network("192.0.2.7/32"),
                ipaddress.ip_network("2001:db8::/32"),
            )
        ),
        limits=Limits(
            messageSize=25 * 2**20,
            recipients=50,
            connections=200,
            connectionsPerClient=5,
        ),
        queue=Queue(directory=str(CONFIGS / "spool"), retry=Retry(min=30.0, max=5400.0),
                    lifetime=3 * 86400.0, delayWarning=4 * 3600.0,
                    freeSpaceReserve=100_000_000, bounceSizeLimit=10_000,
                    controlSocket=str(CONFIGS / "run" / "control.sock")),
        postmaster="postmaster@example.com",
        delivery=Delivery(
            smarthosts=(
                NextHop("smtp.example.net", 587, "none"),
                NextHop("192.0.2.25", 25, "none"),
            ),
            concurrency=4,
            destinationConcurrency=2,
        ),
        shutdownGrace=120.0,
    )

def test_defaults() -> None:
    """
    Only the required keys given: the rest are the documented defaults.
    """
    c = config.load(str(MINIMAL))
    assert c.relay.trustedNetworks == (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    assert c.limits == Limits(
        messageSize=10_000_000, recipients=100, connections=100, connectionsPerClient=20
    )
    assert c.queue == Queue(directory="/var/spool/relayd", retry=Retry(min=300.0, max=3600.0))
    assert c.delivery == Delivery(
        smarthosts=(NextHop("smtp.example.net", 25, "none"),), concurrency=20
    )
    assert c.shutdownGrace == 30.0

def test_objects_are_frozen() -> None:
    c = config.load(str(MINIMAL))
    with pytest.raises(AttributeError):
        c.hostname = "other.example.com"  # type: ignore[misc]

def test_relative_queue_directory(tmp_path: Path) -> None:
    """
    A relative spool directory is anchored at the config file's
    directory, not at wherever the daemon was started.
    """
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "relayd.yaml").write_text(_minimal(queue="queue: {directory: ../var/spool}"))
    c = config.load(str(etc / "relayd.yaml"))
    assert c.queue.directory == str(tmp_path / "var" / "spool")

@pytest.mark.parametrize(
    "text, size",
    [("12345", 12345), ("25MB", 25_000_000), ("10MiB", 10 * 2**20), ("1GB", 10**9),
     ("512kB", 512_000), ("64KiB", 65536), ("1GiB", 2**30), ("100B", 100)],
)
def test_sizes(text: str, size: int) -> None:
    c = config.parse(_minimal(limits=f"limits: {{message_size: {text}}}"), "x.yaml")
    assert c.limits.messageSize == size

@pytest.mark.parametrize(
    "text, seconds",
    [("30s", 30), ("5m", 300), ("4h", 14400), ("5d", 432000), ("1h30m", 5400), ("0s", 0)],
)
def test_durations(text: str, seconds: float) -> None:
    c = config.parse(_minimal(grace=f"shutdown_grace: {text}"), "x.yaml")
    assert c.shutdownGrace == seconds

def test_implicit_smarthost_port_default() -> None:
    """
    The port default follows the TLS mode; with only "none" built this
    is 25 (465 for implicit arrives with TLS).
    """
    c = config.parse(_minimal(), "x.yaml")
    assert c.delivery.smarthosts[0].port == 25

def test_boolean_words_stay_strings() -> None:
    """
    YAML 1.1 would read "on" as true; relayd's loader keeps it a string,
    so it can be a host name.
    """
    c = config.parse(
        _minimal(delivery="delivery: {smarthosts: [{host: on, tls: none}]}"), "x.yaml"
    )
    assert c.delivery.smarthosts[0].host == "on"


# The effective config (toYAML, check-config --print)
def test_round_trip(tmp_path: Path) -> None:
    """
    toYAML() prints a config that loads back into the same values.
    """
    original = config.load(str(GOOD))
    printed = tmp_path / "effective.yaml"
    printed.write_text(original.toYAML())
    again = config.load(str(printed))
    assert again == Config(**{**vars(original), "path": str(printed)})

def test_computed_defaults_and_unset_keys_are_comments(tmp_path: Path) -> None:
    """
    What the daemon computes (free_space_reserve, control_socket) and
    what is not set (delay_warning, postmaster, dns.servers) shows as a
    comment saying so, and the output still loads back equal.
    """
    original = config.load(str(MINIMAL))
    text = original.toYAML()
    lines = text.splitlines()
    assert "  # free_space_reserve: 15MB  (computed: 1.5 x limits.message_size)" in lines
    assert (f"  # control_socket: {original.queue.directory}/control.sock  (computed: "
            "control.sock in queue.directory)") in lines
    assert '  # delay_warning:  (not set: no "delayed" notice is sent)' in lines
    assert ("# postmaster:  (not set: double bounces and quarantine notices are logged and "
            "dropped; RCPT TO:<postmaster> gets 550 5.1.1)") in lines
    assert "    # servers:  (not set: the name servers in /etc/resolv.conf)" in lines
    assert "__relayd_comment_" not in text
    printed = tmp_path / "effective.yaml"
    printed.write_text(text)
    assert config.load(str(printed)) == Config(**{**vars(original), "path": str(printed)})
    # Set explicitly, they are keys again.
    explicit = tmp_path / "explicit.yaml"
    explicit.write_text(text.replace("  # free_space_reserve: 15MB  (computed: 1.5 x limits.message_size)",
                                     "  free_space_reserve: 15MB"))
    again = config.load(str(explicit))
    assert again.queue.freeSpaceReserve == 15_000_000
    assert "  free_space_reserve: 15MB" in again.toYAML().splitlines()

def test_human_units_and_defaults() -> None:
    """
    Every key appears, defaults filled in, sizes and durations in the
    units an admin writes.
    """
    text = config.load(str(MINIMAL)).toYAML()
    for line in [
        "message_size: 10MB",
        "recipients: 100",
        "connections: 100",
        "connections_per_client: 20",
        "min: 5m",
        "max: 1h",
        "concurrency: 20",
        "port: 25",
        "shutdown_grace: 30s",
        "- 127.0.0.0/8",
        "- ::1/128",
        "directory: /var/spool/relayd",
    ]:
        assert line in [l.strip() for l in text.splitlines()], line

def test_secret_keys_of_the_schema_are_printed_masked() -> None:
    """
    A key the schema marks secret prints as a mask in the effective
    config, whatever its value; its neighbours print as they are.
    """
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Upstream(config._Schema):
        user: str = config.setting("user", config._string)
        token: str = config.setting("token", config._string, secret=True)

    parsed = config._parseSection(Upstream, {"user": "relay", "token": "hunter2"}, "up", "")
    assert parsed.token == "hunter2"
    printed = config._tree(parsed, None, lambda text: {})
    assert printed == {"user": "relay", "token": "********"}

def test_mask_secrets() -> None:
    """
    Values of secret keys are masked at any depth; others are untouched.
    """
    tree = {
        "delivery": {"smarthosts": [{"host": "h", "password": "hunter2", "password_file": "/etc/s"}]},
        "auth": {"password_file": "/etc/relayd/passwd", "secret": "x"},
    }
    # A password_file is a path the admin needs to see, not a secret.
    assert config.maskSecrets(tree) == {
        "delivery": {"smarthosts": [{"host": "h", "password": "********", "password_file": "/etc/s"}]},
        "auth": {"password_file": "/etc/relayd/passwd", "secret": "********"},
    }

@pytest.mark.parametrize(
    "seconds, text", [(0, "0s"), (59, "59s"), (60, "1m"), (5400, "1h30m"), (86400 * 5, "5d")]
)
def test_format_duration(seconds: float, text: str) -> None:
    assert config.formatDuration(seconds) == text
    assert config.parseDuration(text) == seconds

@pytest.mark.parametrize("text", ["365d", "364d23h59m59s", "1s", "0s"])
def test_durations_within_the_bound_print_back(text: str) -> None:
    seconds = config.parseDuration(text)
    assert seconds <= config.MAX_DURATION
    assert config.parseDuration(config.formatDuration(seconds)) == seconds

def test_every_duration_at_the_bound_loads_back_equal(tmp_path: Path) -> None:
    """
    check-config prints every duration at the bound so that it loads
    back as the same value (past it, durations are refused).
    """
    year = "365d"
    path = tmp_path / "long.yaml"
    path.write_text(_minimal(
        queue=f"queue: {{directory: /var/spool/relayd, lifetime: {year}, "
              f"retry: {{min: {year}, max: {year}}}}}",
        delivery="delivery: {smarthosts: [{host: smtp.example.net, tls: none}], "
                 f"timeouts: {{connect: {year}, data_done: {year}}}, dns: {{timeout: {year}}}}}",
    ) + f"limits: {{command_timeout: {year}, data_timeout: {year}, greeting_delay: {year}}}\n"
        f"shutdown_grace: {year}\n")
    original = config.load(str(path))
    printed = tmp_path / "effective.yaml"
    printed.write_text(original.toYAML())
    assert config.load(str(printed)) == Config(**{**vars(original), "path": str(printed)})
    assert original.queue.lifetime == original.shutdownGrace == config.MAX_DURATION

@pytest.mark.parametrize("text", ["365d1s", "366d", "8761h", "99999999999999999999d",
                                  "9" * 5000 + "s"])
def test_durations_past_the_bound_are_refused(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.parse(_minimal() + f"shutdown_grace: {text}\n", "x.yaml")
    assert str(info.value).startswith(
        "x.yaml: shutdown_grace: expected a duration of at most 365d, got ")

@pytest.mark.parametrize(
    "size, text", [(10_000_000, "10MB"), (10 * 2**20, "10MiB"), (12345, 12345), (2**30, "1GiB")]
)
def test_format_size(size: int, text: object) -> None:
    assert config.formatSize(size) == text
    assert config.parseSize(text) == size


def _badCases() -> list[str]:
    return sorted(p.stem for p in BAD.glob("*.yaml"))


# Bad configs: one line naming the file and the key
def test_every_case_has_an_error() -> None:
    """
    Each broken config is paired with its expected message (and the
    folder covers the cases the project card lists).
    """
    stems = set(_badCases())
    assert stems == {p.stem for p in BAD.glob("*.err")}
    assert len(stems) >= 30

@pytest.mark.parametrize("name", _badCases())
def test_bad_config(name: str) -> None:
    path = str(BAD / f"{name}.yaml")
    expected = (BAD / f"{name}.err").read_text().strip().replace("FILE", path, 1)
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert str(info.value) == expected
    assert "\n" not in str(info.value)

def test_missing_config_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nowhere.yaml")
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert str(info.value) == f"{path}: cannot read the file: No such file or directory"

def test_unreadable_path() -> None:
    """
    The OS's reason is passed on, whatever it is.
    """
    path = f"{MINIMAL}/inside"
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert str(info.value) == f"{path}: cannot read the file: Not a directory"

def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"# ok\nhostname: caf\xe9.example\n")
    with pytest.raises(ConfigError) as info:
        config.load(str(path))
    assert str(info.value) == f"{path}: line 2: expected UTF-8 text, got byte 0xe9"

def test_control_characters_stay_on_one_line() -> None:
    """
    A value with a newline in it cannot split the error into two lines
    (log scrapers and the CLI promise one line).
    """
    with pytest.raises(ConfigError) as info:
        config.parse(_minimal(hostname='hostname: "relay\\nexample"'), "x.yaml")
    assert str(info.value) == (
        'x.yaml: hostname: expected a DNS name like "relay.example.com", '
        'got "relay\\x0aexample"'
    )

@pytest.mark.parametrize("value", ["010", "1:30", "2002-12-14", "0x10"])
def test_yaml11_scalars_stay_strings(value: str) -> None:
    """
    Octal, sexagesimal, hex and timestamp forms are not numbers or
    dates, so the error quotes exactly what the admin wrote.
    """
    with pytest.raises(ConfigError) as info:
        config.parse(_minimal(limits=f"limits: {{recipients: {value}}}"), "x.yaml")
    assert str(info.value) == (
        f'x.yaml: limits.recipients: expected a whole number of at least 1, got "{value}"'
    )

def test_no_python_tags() -> None:
    """
    The loader is a SafeLoader: Python object tags are refused.
    """
    with pytest.raises(ConfigError) as info:
        config.parse(_minimal(limits="limits: !!python/object/apply:os.getcwd []"), "x.yaml")
    assert str(info.value) == (
        "x.yaml: line 5, column 9: expected plain values (strings, numbers, true/false, "
        'lists, mappings), got the tag "!!python/object/apply:os.getcwd"')

@pytest.mark.parametrize("opening, closing", [("[", "]"), ("{a: ", "}")])
def test_nested_fifty_thousand_deep(opening: str, closing: str) -> None:
    """
    Nesting far past Python's recursion limit is one line, not a
    RecursionError.
    """
    text = _minimal(relay="relay: " + opening * 50_000 + closing * 50_000)
    with pytest.raises(ConfigError) as info:
        config.parse(text, "x.yaml")
    assert str(info.value).startswith("x.yaml: line 5, column ")
    assert str(info.value).endswith(
        f": expected lists and mappings nested at most {config.MAX_NESTING} deep, "
        "got deeper ones")

def test_nesting_up_to_the_bound_is_read() -> None:
    """The bound refuses nothing a config needs: 32 levels still read."""
    text = _minimal(relay="relay: {trusted_networks: " + "[" * 29 + "]" * 29 + "}")
    with pytest.raises(ConfigError) as info:
        config.parse(text, "x.yaml")
    assert str(info.value) == (
        "x.yaml: relay.trusted_networks[0]: expected a network like "
        '"192.0.2.0/24" or "2001:db8::/32", got a list')

@pytest.mark.parametrize("key", ["hostname", "postmaster", "queue.directory",
                                 "delivery.smarthosts[0].host"])
@pytest.mark.parametrize("value, found", [
    ("2001-01-01", None), ("!!timestamp 2001-01-01", "tag"), ("!!binary aGk=", "tag"),
    ("!!set {a: null}", "tag"), ("12", "12"), ("1.5", "1.5"), ("true", "true"),
    ("[a]", "a list"), ("{a: b}", "a mapping"),
])
def test_non_strings_where_strings_are_expected(key: str, value: str, found: str | None) -> None:
    """No date, bytes, set, number, boolean or collection passes as a string."""
    lines = {
        "hostname": f"hostname: {value}",
        "postmaster": f"postmaster: {value}",
        "queue.directory": f"queue: {{directory: {value}}}",
        "delivery.smarthosts[0].host": f"delivery: {{smarthosts: [{{host: {value}, tls: none}}]}}",
    }
    key0 = key.split(".")[0]
    if key in ("queue.directory", "delivery.smarthosts[0].host") and value == "2001-01-01":
        # A string: a directory, or a host on the local network, may be
        # named like a date; the HELO name is a full domain name.
        config.parse(_minimal(**{key0: lines[key]}), "x.yaml")
        return
    with pytest.raises(ConfigError) as info:
        config.parse(_minimal(**{key0: lines[key]}), "x.yaml")
    message = str(info.value)
    if found == "tag":
        assert "expected plain values" in message
    else:
        assert message.startswith(f"x.yaml: {key}: expected ")
        if found is not None:
            assert message.endswith(f", got {found}")


# The shipped example configs
@pytest.mark.parametrize("name", ["relayd.yaml", "relayd.local.yaml"])
def test_shipped_config_loads(name: str) -> None:
    config.load(str(ROOT / "etc" / name))

def test_example_senders_are_logins_the_readme_creates() -> None:
    """
    Every auth.senders login of the production example is one the
    README's relayd-passwd commands add: an entry for a login the
    password file lacks never applies.
    """
    import re

    readme = (ROOT / "README.rst").read_text()
    added = set(re.findall(r"relayd-passwd -f /etc/relayd/passwd add (\S+)", readme))
    assert added, "README.rst shows no `relayd-passwd ... add LOGIN`"
    example = config.load(str(ROOT / "etc" / "relayd.yaml"))
    assert {login for login, _ in example.auth.senders} <= added

def test_local_spool_in_repository() -> None:
    """
    The quick-start spool lands in the repository's var/ (git-ignored),
    whatever directory relayd is started from.
    """
    c = config.load(str(ROOT / "etc" / "relayd.local.yaml"))
    assert c.queue.directory == str(ROOT / "var" / "spool")
    assert c.listeners == (Listener("tcp:2525:interface=127.0.0.1", "none", "none"),)
    assert c.delivery.smarthosts == (NextHop("127.0.0.1", 2526, "none"),)
    assert c.hostname == "localhost"

def test_production_example_comments_every_key() -> None:
    """
    The production example mentions every key the loader knows,
    including the not-supported-yet ones.
    """
    text = (ROOT / "etc" / "relayd.yaml").read_text()
    for key in [
        "hostname:", "listeners:", "endpoint:", "tls:", "auth:", "relay:",
        "trusted_networks:", "limits:", "message_size:", "recipients:",
        "connections:", "connections_per_client:", "queue:", "directory:",
        "lifetime:", "retry:", "min:", "max:", "postmaster:", "delivery:",
        "mx_port:", "concurrency:", "smarthosts:", "host:", "port:",
        "verify:", "ca_file:", "username:", "password_file:", "routes:",
        "metrics:", "shutdown_grace:",
    ]:
        assert key in text, key

def test_production_example_has_every_key_of_the_schema() -> None:
    """
    Every key the schema knows (derived, so a new key cannot be
    forgotten) is in the production example, set or commented, under
    its section's key.
    """
    text = (ROOT / "etc" / "relayd.yaml").read_text()
    keys = config.schemaKeys()
    assert "delivery.timeouts.data_done" in keys and "listeners[].plaintext_auth" in keys
    for path in keys:
        name = path.rsplit(".", 1)[-1]
        assert re.search(rf"(?m)^ *(?:# *)?(?:- *)?(?:{{ *)?{re.escape(name)}:", text) or (
            re.search(rf"[{{,] *{re.escape(name)}:", text)), path

def test_uncommented_not_supported_keys_are_refused(tmp_path: Path) -> None:
    """
    Each commented-out "not supported yet" line in the production
    example, uncommented, makes the config fail with that phrase: the
    comments tell the truth.
    """
    lines = (ROOT / "etc" / "relayd.yaml").read_text().splitlines()
    def isCommentedSetting(line: str) -> bool:
        words = line.lstrip()[2:].split()
        return line.lstrip().startswith("# ") and bool(words) and (
            words[0] == "-" or words[0].endswith(":")
        )

    candidates = [
        i for i, line in enumerate(lines)
        if isCommentedSetting(line)
        and ("not supported yet" in line or "Not supported yet" in lines[i - 1])
    ]
    # As many such lines as keys the schema refuses (none, now that metrics are built).
    def refusedKeys(cls):
        for _, k in config.keysOf(cls):
            if k.notSupported is not None:
                yield k.name
            for inner in (k.section, k.items):
                if inner is not None:
                    yield from refusedKeys(inner)
    refused = list(refusedKeys(config.Config))
    assert len(candidates) == len(refused), (candidates, refused)
    for i in candidates:
        edited = list(lines)
        edited[i] = edited[i].replace("# ", "", 1)
        path = tmp_path / "edited.yaml"
        path.write_text("\n".join(edited) + "\n")
        with pytest.raises(ConfigError) as info:
            config.load(str(path))
        assert "not supported yet" in str(info.value), edited[i]


def _runCLI(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relayd.cli.main", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


# relayd check-config
def test_check_config_valid() -> None:
    result = _runCLI("check-config", str(GOOD))
    assert result.returncode == 0, result.stderr
    # good.yaml has plain listeners that other machines can reach (systemd,
    # haproxy): valid, with a warning each, and the status stays 0.
    assert result.stderr == "".join(
        f"relayd: warning: {GOOD}: listeners[{i}]: neither TLS nor AUTH on \"{e}\", which "
        "other machines can reach: only relay.trusted_networks can relay through it, and "
        "their mail crosses the network in plaintext\n"
        for i, e in ((2, "systemd:domain=INET:name=relayd-smtp"),
                     (3, "haproxy:tcp:2600:interface=127.0.0.1")))
    assert result.stdout == config.load(str(GOOD)).toYAML()
    assert "message_size: 25MiB" in result.stdout

def test_check_config_invalid() -> None:
    path = str(BAD / "queue-lifetime-bad.yaml")
    result = _runCLI("check-config", path)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == (
        f'relayd: {path}: queue.lifetime: expected a duration like "5d", got "5 days"\n'
    )

def test_check_config_on_a_missing_file(tmp_path: Path) -> None:
    result = _runCLI("check-config", str(tmp_path / "none.yaml"))
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("relayd: ")
    assert "Traceback" not in result.stderr

@pytest.mark.parametrize(
    "args", [(), ("frobnicate",), ("check-config",), ("check-config", "a", "b")]
)
def test_check_config_usage(args: tuple[str, ...]) -> None:
    result = _runCLI(*args)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("relayd: ")
    assert "; usage: relayd check-config [--user USER] FILE | relayd dkim keygen " in result.stderr
    assert result.stderr.endswith(" | relayd dkim check [--config FILE] [--selector SELECTOR] "
                                  "DOMAIN\n")

def test_warns_about_password_entries_that_can_never_log_in(tmp_path: Path) -> None:
    passwd = tmp_path / "passwd"
    passwd.write_text(
        "printer:$2y$05$F9e6KRzYAKXoytB07fLqaebMseKE5q3Wl6hZeqIeR6qK5olCQybd.\n"
        "# carol uses -s\n"
        "carol:{SHA}GpHWL3ymc5liWkNopqtdSjuqYHM=\n")
    path = tmp_path / "relayd.yaml"
    path.write_text(
        "hostname: relay.example\n"
        "listeners: [{endpoint: \"tcp:2525:interface=127.0.0.1\", tls: none, auth: required,"
        " plaintext_auth: true}]\n"
        f"auth: {{password_file: {passwd}, senders: {{alice: [alice@example.com]}}}}\n"
        "queue: {directory: spool}\n"
        "delivery: {smarthosts: [{host: 127.0.0.1, port: 2526, tls: none}]}\n")
    result = _runCLI("check-config", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stderr == (
        f"relayd: warning: {passwd}: line 3: carol: {{SHA}} (htpasswd -s) is not supported, "
        "so carol can never log in; reset with relayd-passwd add carol\n"
        f"relayd: warning: {path}: auth.senders.alice: {passwd} has no login 'alice', so this "
        "entry never applies\n")

def test_version() -> None:
    import relayd

    result = _runCLI("--version")
    assert (result.returncode, result.stdout, result.stderr) == (
        0, f"relayd {relayd.__version__}\n", "")

def test_check_config_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    """
    main() is what the console script calls: it exits with the status.
    """
    with pytest.raises(SystemExit) as info:
        cli.main(["check-config", str(BAD / "tls-min-version.yaml")])
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert err == f"relayd: {BAD / 'tls-min-version.yaml'}: tls.min_version: expected one of \"1.2\", \"1.3\", got \"1.1\"\n"


# delivery: next hops with TLS and AUTH, routes, MX, timeouts, DNS

DELIVERY_TEXT = """
hostname: relay.example.com
listeners: [{endpoint: "tcp:25", tls: none, auth: none}]
queue: {directory: /var/spool/relayd}
delivery:
  mx_port: 2525
  smarthosts:
    - {host: smtp.example.net, port: 587, username: relay, password_file: upstream.secret}
    - {host: backup.example.net, tls: implicit, verify: false, ca_file: ca.pem}
    - {host: 192.0.2.25, tls: may}
  routes:
    Example.ORG: [{host: mx.internal.example.org, tls: none}]
    partner.example: [{mx: true, tls: starttls}]
    "*": [{mx: true}]
  timeouts: {connect: 10s, data_done: 20m}
  dns: {servers: ["127.0.0.1:5353", "[::1]:53", "192.0.2.53"], timeout: 3s}
"""

def loadDelivery(tmp_path: Path) -> Config:
    path = tmp_path / "relayd.yaml"
    path.write_text(DELIVERY_TEXT)
    return config.load(str(path))

def test_delivery_values(tmp_path: Path) -> None:
    from relayd.config import DNS, DeliveryTimeouts

    d = loadDelivery(tmp_path).delivery
    assert d.smarthosts == (
        NextHop("smtp.example.net", 587, "starttls", True, None, "relay",
                str(tmp_path / "upstream.secret")),
        NextHop("backup.example.net", 465, "implicit", False, str(tmp_path / "ca.pem")),
        NextHop("192.0.2.25", 25, "may"),
    )
    assert d.routes == {
        "example.org": (NextHop("mx.internal.example.org", 25, "none"),),
        "partner.example": (NextHop("", 0, "starttls", mx=True),),
        "*": (NextHop("", 0, "may", mx=True),),
    }
    assert d.mxPort == 2525
    assert d.timeouts == DeliveryTimeouts(connect=10.0, dataDone=1200.0)
    assert d.dns == DNS((("127.0.0.1", 5353), ("::1", 53), ("192.0.2.53", 53)), 3.0)
    assert d.passwordFiles() == [
        ("delivery.smarthosts[0].password_file", str(tmp_path / "upstream.secret"))]

def test_delivery_defaults() -> None:
    from relayd.config import DNS, DeliveryTimeouts

    c = config.parse(_minimal(delivery=""), "x.yaml")
    assert c.delivery.smarthosts == ()  # MX delivery
    assert (c.delivery.mxPort, c.delivery.routes) == (25, {})
    assert c.delivery.timeouts == DeliveryTimeouts(30.0, 300.0, 300.0, 300.0, 120.0, 180.0, 600.0)
    assert c.delivery.dns == DNS((), 10.0)
    hop = config.parse(_minimal(delivery="delivery: {smarthosts: [{host: h.example}]}"),
                       "x.yaml").delivery.smarthosts[0]
    assert (hop.port, hop.tls, hop.verify) == (25, "starttls", True)

def test_delivery_round_trip(tmp_path: Path) -> None:
    original = loadDelivery(tmp_path)
    printed = tmp_path / "effective.yaml"
    text = original.toYAML()
    assert f"password_file: {tmp_path / 'upstream.secret'}" in text
    # The printed effective config loads back as it is.
    printed.write_text(text)
    assert config.load(str(printed)) == Config(**{**vars(original), "path": str(printed)})
