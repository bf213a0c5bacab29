"""
relayd.auth: sender binding and routing-trick policy (tables), the password
file and its reloading, verification (schemes, unknown users, bcrypt's
72-byte limit, the cache), failure throttling, the per-user message rate,
and the relayd-passwd command.
"""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from passlib.hash import argon2, bcrypt, sha512_crypt
from twisted.internet import task
from twisted.python import failure

from relayd import auth
from relayd.cli import passwd as passwdCLI

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("sender, login, entries, allowed", [
    ("", "alice@example.com", None, True),
    ("alice@example.com", "alice@example.com", None, True),
    ("Alice@Example.COM", "alice@example.com", None, True),
    ("bob@example.com", "alice@example.com", None, False),
    ("printer@example.com", "printer", None, False),  # a bare login owns no address
    ("x@example.org", "printer", ("@example.org",), True),
    ("x@EXAMPLE.org", "printer", ("@example.org",), True),
    ("x@sub.example.org", "printer", ("@example.org",), False),
    ("x@example.org.evil.test", "printer", ("@example.org",), False),
    ("scanner@example.com", "printer", ("scanner@example.com",), True),
    ("scanner2@example.com", "printer", ("scanner@example.com",), False),
    ("alice@example.com", "alice@example.com", ("@example.org",), False),  # an entry replaces the default
    ("a%b@example.org", "printer", ("@example.org",), False),
    ("b!a@example.org", "printer", ("@example.org",), False),
    ('"a@b"@example.org', "printer", ("@example.org",), False),
    ("", "printer", (), True),
    ("x@example.org", "printer", (), False),
])
def test_senderAllowed(sender, login, entries, allowed):
    assert auth.senderAllowed(sender, login, entries) is allowed


@pytest.mark.parametrize("address, tricky", [
    ("bob@example.org", False),
    ("bob.smith+tag@example.org", False),
    ("a%b@example.org", True),
    ("b!a@example.org", True),
    ('"a@b"@example.org', True),
    ("@hop:a@example.org", True),
    ("a@b@example.org", True),
    ("a!b", True),
])
def test_hasRoutingTricks(address, tricky):
    assert auth.hasRoutingTricks(address) is tricky


def test_parsePasswordFile_keeps_good_lines_and_reports_bad_ones():
    data = (b"# users\n\nalice:$2y$04$abc\n"
            b"no-colon\n"
            b"bad name:$2b$04$x\n"
            b"bob:$6$rounds=5000$s$h\r\n"
            b"empty:\n"
            b"\xff:x\n")
    entries, skipped = auth.parsePasswordFile(data)
    assert entries == {"alice": "$2y$04$abc", "bob": "$6$rounds=5000$s$h"}
    assert skipped == [4, 5, 7, 8]


class FakeNow:
    def __init__(self):
        self.value = 1000.0

    def __call__(self):
        return self.value


def write(path: Path, users: dict[str, str]) -> None:
    path.write_text("".join(f"{u}:{h}\n" for u, h in users.items()))


def test_password_file_is_reread_when_it_changes_at_most_once_a_second(tmp_path):
    path = tmp_path / "passwd"
    write(path, {"alice": "h1"})
    now = FakeNow()
    f = auth.PasswordFile(str(path), now)
    assert f.lookup("alice")[0] == "h1"
    write(path, {"alice": "h2-longer"})
    assert f.lookup("alice")[0] == "h1"  # within the second: not even stat()ed
    now.value += 1
    assert f.lookup("alice")[0] == "h2-longer"
    # Same size, new mtime; and invalidate() (SIGHUP) skips the wait.
    write(path, {"alice": "h3-longer"})
    os.utime(path, ns=(0, 1))
    f.invalidate()
    assert f.lookup("alice")[0] == "h3-longer"


def test_password_file_missing_is_an_error(tmp_path):
    f = auth.PasswordFile(str(tmp_path / "none"))
    with pytest.raises(auth.PasswordFileError):
        f.load()


HASHES = {
    "bcrypt": bcrypt.using(rounds=4).hash("pw-bcrypt"),
    # What `htpasswd -B` writes: the $2y$ prefix.
    "htpasswd": bcrypt.using(rounds=4, ident="2y").hash("pw-htpasswd"),
    "sha512": sha512_crypt.using(rounds=5000).hash("pw-sha512"),
    "argon2": argon2.using(time_cost=1, memory_cost=1024).hash("pw-argon2"),
}


@pytest.fixture
def verifier(tmp_path):
    path = tmp_path / "passwd"
    write(path, HASHES)
    return auth.Verifier(auth.PasswordFile(str(path)))


@pytest.mark.parametrize("login", list(HASHES))
def test_every_scheme_verifies(verifier, login):
    assert HASHES["htpasswd"].startswith("$2y$")
    assert verifier.verify(login, f"pw-{login}") is True
    assert verifier.verify(login, "wrong") is False


def test_unknown_user_costs_a_verification(verifier, monkeypatch):
    calls = []
    original = verifier._context.verify
    monkeypatch.setattr(verifier._context, "verify", lambda p, h: calls.append(h) or original(p, h))
    assert verifier.verify("nobody", "pw-bcrypt") is False
    assert calls == [HASHES["bcrypt"]]  # checked against a real entry, result ignored


def test_unknown_user_is_checked_against_a_real_hash_not_a_locked_entry(tmp_path, monkeypatch):
    # A locked account ("!") first in the file must not become the stand-in:
    # its check fails at once and would time apart known and unknown logins.
    write(tmp_path / "passwd", {"disabled": "!", "broken": "not-a-hash", "alice": HASHES["bcrypt"]})
    v = auth.Verifier(auth.PasswordFile(str(tmp_path / "passwd")))
    calls = []
    original = v._context.verify
    monkeypatch.setattr(v._context, "verify", lambda p, h: calls.append(h) or original(p, h))
    assert v.verify("nosuchuser", "pw") is False
    assert calls == [HASHES["bcrypt"]]


def test_bcrypt_limit_is_a_clear_failure(verifier):
    with pytest.raises(auth.PasswordTooLong):
        verifier.verify("bcrypt", "x" * 73)
    # argon2 has no such limit.
    assert verifier.verify("argon2", "x" * 73) is False


def test_broken_hash_never_matches(tmp_path):
    write(tmp_path / "passwd", {"alice": "not-a-hash"})
    v = auth.Verifier(auth.PasswordFile(str(tmp_path / "passwd")))
    assert v.verify("alice", "not-a-hash") is False


def test_cache_hits_and_a_changed_password_or_removed_user_misses(tmp_path, monkeypatch):
    path = tmp_path / "passwd"
    write(path, {"alice": bcrypt.using(rounds=4).hash("one")})
    now = FakeNow()
    v = auth.Verifier(auth.PasswordFile(str(path), now), cacheSeconds=60, now=now)
    assert v.verify("alice", "one")
    calls = []
    original = v._context.verify
    monkeypatch.setattr(v._context, "verify", lambda p, h: calls.append(h) or original(p, h))
    assert v.verify("alice", "one") and calls == []  # from the cache
    assert not v.verify("alice", "two")  # a wrong password is never cached
    write(path, {"alice": bcrypt.using(rounds=4).hash("two")})
    now.value += 1
    assert not v.verify("alice", "one")  # the old password stops working at once
    assert v.verify("alice", "two")
    write(path, {"bob": bcrypt.using(rounds=4).hash("x")})
    now.value += 1
    assert not v.verify("alice", "two")
    now.value += 61
    write(path, {"alice": bcrypt.using(rounds=4).hash("three")})
    assert v.verify("alice", "three")


def test_failure_throttle():
    clock = task.Clock()
    t = auth.FailureThrottle(clock, limit=3, window=60)
    # The failure that starts a block says until when, once.
    assert [t.failed("192.0.2.1") for _ in range(3)] == [None, None, 60.0]
    assert t.blocked("192.0.2.1") and not t.blocked("192.0.2.2")
    assert t.failed("192.0.2.1") is None  # already blocked: no second block event
    clock.advance(59)
    assert t.blocked("192.0.2.1")
    clock.advance(1)
    assert not t.blocked("192.0.2.1")


def test_block_ends_when_the_failures_that_made_it_age_out():
    clock = task.Clock()
    t = auth.FailureThrottle(clock, limit=2, window=60)
    t.failed("192.0.2.1")
    clock.advance(50)
    assert t.failed("192.0.2.1") == 60.0  # the first failure leaves the window at 60
    assert t.blockedClients() == [("192.0.2.1", 60.0)]
    clock.advance(10)
    assert t.blockedClients() == [] and t.mayCheck("192.0.2.1")


# Checks in flight: (limit, failures before, checks started at once) -> how many may start.
@pytest.mark.parametrize("limit, failures, attempts, started", [
    (5, 0, 20, 5),
    (5, 3, 20, 2),
    (5, 4, 1, 1),
    (5, 5, 1, 0),  # blocked
    (1, 0, 3, 1),
])
def test_checks_in_flight_count_against_the_limit(limit, failures, attempts, started):
    clock = task.Clock()
    t = auth.FailureThrottle(clock, limit=limit, window=60)
    for _ in range(failures):
        t.failed("192.0.2.1")
    assert sum(t.startCheck("192.0.2.1") for _ in range(attempts)) == started
    assert t.mayCheck("192.0.2.2")  # per address


def test_a_check_that_ends_frees_its_slot_and_counts_its_failure():
    clock = task.Clock()
    t = auth.FailureThrottle(clock, limit=2, window=60)
    assert t.startCheck("192.0.2.1") and t.startCheck("192.0.2.1")
    assert not t.startCheck("192.0.2.1")
    assert t.checkEnded("192.0.2.1", failed=False) is None
    assert t.startCheck("192.0.2.1")
    assert t.checkEnded("192.0.2.1", failed=True) is None
    assert t.checkEnded("192.0.2.1", failed=True) == 60.0  # the second failure blocks
    assert t.blocked("192.0.2.1") and not t.startCheck("192.0.2.1")


def test_a_changed_limit_or_window_keeps_blocks_as_they_are():
    clock = task.Clock()
    t = auth.FailureThrottle(clock, limit=2, window=60)
    t.failed("192.0.2.1")
    t.failed("192.0.2.1")
    t.failed("192.0.2.2")
    t.limit, t.window = 10, 3600  # a reload
    assert t.blocked("192.0.2.1") and t.blockedClients() == [("192.0.2.1", 60.0)]
    t.limit = 1
    assert not t.blocked("192.0.2.2")  # a lower limit creates no block by itself


def test_unblock_lifts_the_block_and_forgets_the_failures():
    clock = task.Clock()
    t = auth.FailureThrottle(clock, limit=2, window=60)
    t.failed("192.0.2.1")
    t.failed("192.0.2.1")
    assert t.unblock("192.0.2.1")
    assert not t.blocked("192.0.2.1") and t.blockedClients() == []
    assert t.failed("192.0.2.1") is None  # a fresh start, not one failure from a block
    assert not t.unblock("192.0.2.9")


def test_abandoned_credentials_are_never_verified(tmp_path):
    path = tmp_path / "passwd"
    path.write_text(f"alice:{bcrypt.using(rounds=4).hash('secret')}\n")
    verified = []

    class CountingVerifier(auth.Verifier):
        def verify(self, login, password):
            verified.append(login)
            return super().verify(login, password)

    class Pool:
        def callInThreadWithCallback(self, onResult, f, *a, **kw):
            try:
                onResult(True, f(*a, **kw))
            except BaseException:
                onResult(False, failure.Failure())

    class Reactor:
        def callFromThread(self, f, *a, **kw):
            f(*a, **kw)

    checker = auth.PasswordFileChecker(CountingVerifier(auth.PasswordFile(str(path))), Reactor(), Pool())
    creds = auth.ClientCredentials(b"alice", b"secret")
    creds.abandon()
    results = []
    checker.requestAvatarId(creds).addBoth(results.append)
    assert results[0].check(auth.CheckAbandoned) and verified == []
    assert "secret" not in repr(creds)
    results = []
    checker.requestAvatarId(auth.ClientCredentials(b"alice", b"secret")).addBoth(results.append)
    assert results == ["alice"] and verified == ["alice"]


def test_message_rate():
    clock = task.Clock()
    r = auth.MessageRate(clock, limit=2)
    r.queued("alice")
    clock.advance(1000)
    r.queued("alice")
    assert r.exceeded("alice") and not r.exceeded("bob")
    clock.advance(2600)
    assert not r.exceeded("alice")


# relayd-passwd


class TTYless(io.StringIO):
    def isatty(self):
        return False


def runPasswd(*args, stdin=""):
    out, err = io.StringIO(), io.StringIO()
    code = passwdCLI.run(list(args), TTYless(stdin), out, err)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def daemonGroup(monkeypatch):
    """The group new password files are given: here, one this process may give."""
    import grp

    name = grp.getgrgid(os.getegid()).gr_name
    monkeypatch.setattr(passwdCLI, "DAEMON_GROUP", name)
    return os.getegid()


def test_passwd_add_list_check_remove(tmp_path, daemonGroup):
    path = str(tmp_path / "passwd")
    assert runPasswd("-f", path, "add", "alice@example.com", stdin="s3cret\n") == (
        0, f"added alice@example.com in {path}\n", "")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    assert runPasswd("-f", path, "add", "--scheme", "argon2", "printer", stdin="p\n")[0] == 0
    assert runPasswd("-f", path, "list") == (0, "alice@example.com bcrypt\nprinter argon2\n", "")
    assert runPasswd("-f", path, "check", "alice@example.com", stdin="s3cret\n") == (0, "ok\n", "")
    assert runPasswd("-f", path, "check", "alice@example.com", stdin="nope\n") == (
        1, "wrong login or password\n", "")
    # Changing a password keeps the file's mode and the other lines.
    os.chmod(path, 0o600)
    assert runPasswd("-f", path, "add", "alice@example.com", stdin="new\n")[1].startswith("changed")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert runPasswd("-f", path, "check", "alice@example.com", stdin="new\n")[0] == 0
    assert runPasswd("-f", path, "remove", "printer") == (0, f"removed printer from {path}\n", "")
    assert runPasswd("-f", path, "list")[1] == "alice@example.com bcrypt\n"
    assert runPasswd("-f", path, "remove", "printer") == (
        1, "", f"relayd-passwd: 'printer' is not in {path}\n")
    # What the daemon reads is what relayd-passwd wrote.
    assert auth.Verifier(auth.PasswordFile(path)).verify("alice@example.com", "new")
    assert [p.name for p in tmp_path.iterdir()] == ["passwd"]  # no temp file left


def test_passwd_makes_a_new_file_the_daemon_can_read(tmp_path, monkeypatch):
    """Group relayd (when it exists) and 0640: the unit runs the daemon as relayd:relayd."""
    import grp

    group = "nogroup" if os.geteuid() == 0 else grp.getgrgid(os.getegid()).gr_name
    gid = grp.getgrnam(group).gr_gid
    monkeypatch.setattr(passwdCLI, "DAEMON_GROUP", group)
    path = tmp_path / "passwd"
    assert runPasswd("-f", str(path), "add", "alice@example.com", stdin="s3cret\n")[0] == 0
    st = os.stat(path)
    assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o640, gid)

    # Without such a group: the owner's alone, and a line says how to let the daemon in.
    monkeypatch.setattr(passwdCLI, "DAEMON_GROUP", "no-such-group-for-relayd-tests")
    other = tmp_path / "other"
    code, _, err = runPasswd("-f", str(other), "add", "alice@example.com", stdin="s3cret\n")
    assert code == 0 and stat.S_IMODE(os.stat(other).st_mode) == 0o600
    assert err == (f"relayd-passwd: note: created {other} mode 0600: the daemon's user must be able "
                   f"to read it (e.g. chgrp no-such-group-for-relayd-tests {other} && chmod 0640 {other})\n")


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another owner needs root (CI runs as root)")
def test_passwd_rewrite_keeps_owner_group_and_mode(tmp_path):
    """The README's root:relayd 0640 (here nobody:nogroup 0604) survives an edit as root."""
    import grp
    import pwd

    path = tmp_path / "passwd"
    path.write_text("# users\n")
    os.chown(path, pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid)
    os.chmod(path, 0o604)
    assert runPasswd("-f", str(path), "add", "alice@example.com", stdin="s3cret\n")[0] == 0
    assert runPasswd("-f", str(path), "remove", "alice@example.com")[0] == 0
    st = os.stat(path)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (
        pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid, 0o604)
    assert path.read_text() == "# users\n"


def test_passwd_keeps_comments(tmp_path):
    path = tmp_path / "passwd"
    path.write_text("# managed by hand too\nbob:$2y$04$x\n")
    runPasswd("-f", str(path), "add", "alice", stdin="pw\n")
    lines = path.read_text().splitlines()
    assert lines[:2] == ["# managed by hand too", "bob:$2y$04$x"]
    assert lines[2].startswith("alice:$2b$")


@pytest.mark.parametrize("args, stdin, message", [
    (("add", "alice"), "\n", "relayd-passwd: an empty password is refused; nothing changed\n"),
    (("add", "alice"), "x" * 73 + "\n",
     "relayd-passwd: bcrypt checks at most 72 bytes of a password; use a shorter one or "
     "--scheme argon2; nothing changed\n"),
    (("add", "al:ice"), "pw\n",
     "relayd-passwd: 'al:ice' is not a valid login (no spaces, colons or control characters)\n"),
])
def test_passwd_refusals(tmp_path, args, stdin, message):
    path = str(tmp_path / "passwd")
    assert runPasswd("-f", path, *args, stdin=stdin) == (1, "", message)
    assert not os.path.exists(path)


def test_passwd_never_takes_a_password_argument(tmp_path):
    code, out, err = runPasswd("-f", str(tmp_path / "p"), "add", "alice", "s3cret")
    assert code == 2 and "unrecognized arguments: s3cret" in err


def test_passwd_console_script_entry_point():
    result = subprocess.run([sys.executable, "-m", "relayd.cli.passwd"], capture_output=True,
                            text=True, timeout=60, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 2
    assert result.stderr == ("relayd-passwd: no command given; usage: relayd-passwd [-f FILE] add "
                             "[--scheme SCHEME] LOGIN | remove LOGIN | list | check LOGIN\n")


def test_passwd_names_lines_it_cannot_read_and_checks_like_the_daemon(tmp_path, capsys):
    path = tmp_path / "passwd"
    write(path, {"alice": HASHES["bcrypt"]})
    path.write_text(path.read_text() + "carol $2y$05$typo-with-a-space\n")
    assert runPasswd("-f", str(path), "list")[:2] == (0, "alice bcrypt\n")
    assert capsys.readouterr().err == f"relayd-passwd: warning: {path}: line 2 skipped (not login:hash)\n"
    # Over bcrypt's 72 bytes: the daemon's answer, in words, not the library's advice.
    assert runPasswd("-f", str(path), "check", "alice", stdin="x" * 73 + "\n") == (
        1, "", "relayd-passwd: the password is longer than bcrypt's 72 bytes: it never matches\n")
    assert runPasswd("-f", str(path), "check", "alice", stdin="pw-bcrypt\n") == (0, "ok\n", "")


# Entries relayd cannot verify (htpasswd -m, -s, -d, -2, -p): named, never silent


def htpasswdLine(flag: str, login: str, password: str = "pw") -> str:
    """One entry as Apache's htpasswd writes it (Debian package apache2-utils)."""
    tool = shutil.which("htpasswd")
    if tool is None:
        pytest.skip("htpasswd is not installed (Debian package apache2-utils; .ci/run installs it)")
    result = subprocess.run([tool, "-nb", flag, login, password], capture_output=True, text=True,
                            timeout=60, check=True)
    return result.stdout.strip()


@pytest.fixture
def mixedFile(tmp_path):
    """A password file as an admin ends up with: htpasswd's schemes, relayd's, a locked entry."""
    path = tmp_path / "passwd"
    path.write_text("\n".join([
        "# users",
        htpasswdLine("-B", "alice"),       # line 2: bcrypt, verified
        htpasswdLine("-m", "bob"),         # line 3: apr1
        htpasswdLine("-s", "carol"),       # line 4: {SHA}
        htpasswdLine("-d", "dave"),        # line 5: DES crypt
        htpasswdLine("-5", "erin"),        # line 6: sha512-crypt, verified
        htpasswdLine("-2", "frank"),       # line 7: sha256-crypt
        "gina:$1$saltsalt$2vnaRpHa6Jxjz5n83ok8Z0",  # line 8: md5-crypt, by hand
        "hal:plain-text-password",         # line 9: plaintext, by hand
        "ivan:!" + HASHES["bcrypt"],       # line 10: locked on purpose
    ]) + "\n")
    return path


EXPECTED_UNUSABLE = [
    (3, "bob", "apr1 (htpasswd -m) is not supported"),
    (4, "carol", "{SHA} (htpasswd -s) is not supported"),
    (5, "dave", "crypt (htpasswd -d) is not supported"),
    (7, "frank", "sha256-crypt (htpasswd -2) is not supported"),
    (8, "gina", "md5-crypt ($1$) is not supported"),
    (9, "hal", "not a hash relayd knows (bcrypt, sha512-crypt or argon2); "
               "plaintext (htpasswd -p) is not supported"),
]


def test_unusable_entries_are_found_with_line_and_login(mixedFile):
    found = auth.unusableEntries(mixedFile.read_bytes())
    assert [(e.line, e.login, e.reason) for e in found] == EXPECTED_UNUSABLE
    passwords = auth.PasswordFile(str(mixedFile))
    passwords.load()
    assert [(e.line, e.login, e.reason) for e in passwords.unusable] == EXPECTED_UNUSABLE
    # The supported ones do log in; the others never can.
    verifier = auth.Verifier(passwords)
    assert verifier.verify("alice", "pw") and verifier.verify("erin", "pw")
    assert not verifier.verify("bob", "pw") and not verifier.verify("carol", "pw")


def test_unusable_entry_description_names_file_line_login_never_the_hash(mixedFile):
    data = mixedFile.read_bytes()
    bob = auth.unusableEntries(data)[0]
    text = bob.describe(str(mixedFile))
    assert text == (f"{mixedFile}: line 3: bob: apr1 (htpasswd -m) is not supported, so bob can "
                    "never log in; reset with relayd-passwd add bob")
    hashed = data.splitlines()[2].split(b":", 1)[1].decode()
    assert hashed not in text and hashed[6:] not in text


def test_passwd_list_says_why_an_entry_is_unusable(mixedFile):
    code, out, err = runPasswd("-f", str(mixedFile), "list")
    assert code == 0 and err == ""
    assert out.splitlines() == [
        "alice bcrypt",
        "bob unusable: apr1 (htpasswd -m) is not supported; reset with relayd-passwd add bob",
        "carol unusable: {SHA} (htpasswd -s) is not supported; reset with relayd-passwd add carol",
        "dave unusable: crypt (htpasswd -d) is not supported; reset with relayd-passwd add dave",
        "erin sha512_crypt",
        "frank unusable: sha256-crypt (htpasswd -2) is not supported; reset with relayd-passwd add frank",
        "gina unusable: md5-crypt ($1$) is not supported; reset with relayd-passwd add gina",
        "hal unusable: not a hash relayd knows (bcrypt, sha512-crypt or argon2); plaintext "
        "(htpasswd -p) is not supported; reset with relayd-passwd add hal",
        "ivan locked",
    ]


def test_senders_entries_for_logins_not_in_the_file():
    assert auth.sendersWithoutLogin(
        (("alice", ("alice@example.com",)), ("alice@example.com", ("@example.org",))),
        {"alice@example.com"}, "/etc/relayd/passwd") == [
        "auth.senders.alice: /etc/relayd/passwd has no login 'alice', so this entry never applies"]
