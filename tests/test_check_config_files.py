"""
``relayd check-config`` opens every file the config names, as the daemon
will: the certificate and key, the AUTH password file, delivery password
and CA files, the spool directory. With ``--user`` it does so in a child
process running as that user, so a file only root can read is caught.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from relayd.cli import main as cli
from tests.test_tls import writeChain

ROOT = Path(__file__).resolve().parents[1]

CONFIG = """\
hostname: relay.test
listeners:
  - {{endpoint: "tcp:2587:interface=127.0.0.1", tls: starttls, auth: required}}
tls: {{certificate: {cert}, key: {key}}}
auth: {{password_file: {passwd}}}
queue: {{directory: {spool}}}
delivery:
  smarthosts:
    - {{host: smtp.example.net, port: 587, tls: starttls, ca_file: {ca},
       username: relay, password_file: {upstream}}}
"""


def checkConfig(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = cli.run(["check-config", *args], out, err)
    return status, out.getvalue(), err.getvalue()


@pytest.fixture
def layout():
    """Every file a config can name, in a directory other users can traverse (for --user)."""
    base = Path(tempfile.mkdtemp(prefix="relayd-check-"))
    base.chmod(0o755)
    ca, cert, key = writeChain(base)
    ca.cert_pem.write_to_path(str(base / "ca.pem"))
    (base / "passwd").write_text("alice@example.com:$2b$12$nQ7AsHi9K0mQBXJtBqWs7e87GK46BXomIWw.H6bVQpFV9221eiuRy\n")
    (base / "upstream.secret").write_text("secret\n")
    (base / "spool").mkdir(mode=0o700)
    files = {"cert": cert, "key": key, "passwd": str(base / "passwd"), "ca": str(base / "ca.pem"),
             "upstream": str(base / "upstream.secret"), "spool": str(base / "spool")}
    configPath = base / "relayd.yaml"
    configPath.write_text(CONFIG.format(**files))
    configPath.chmod(0o644)
    yield configPath, files
    shutil.rmtree(base, ignore_errors=True)


def test_the_unedited_example_fails_while_its_files_do_not_exist():
    status, out, err = checkConfig(str(ROOT / "etc" / "relayd.yaml"))
    if os.path.exists("/etc/relayd/tls/fullchain.pem"):
        pytest.skip("this machine has /etc/relayd/tls/fullchain.pem")
    assert status == 1 and out == ""
    assert ("relayd: tls.certificate /etc/relayd/tls/fullchain.pem: cannot read it: "
            "No such file or directory\n") in err


def test_every_named_file_is_opened_and_each_problem_is_the_daemons_line(layout):
    configPath, files = layout
    status, out, err = checkConfig(str(configPath))
    assert (status, err) == (0, ""), err
    assert "hostname: relay.test" in out

    for name in ("cert", "key", "passwd", "ca", "upstream"):
        os.rename(files[name], files[name] + ".away")
    status, out, err = checkConfig(str(configPath))
    assert status == 1 and out == ""
    missing = "No such file or directory"
    assert err.splitlines() == [
        f"relayd: {configPath}: delivery.smarthosts[0].password_file: cannot read {files['upstream']}: {missing}",
        f"relayd: {configPath}: ca_file {files['ca']}: {missing}",
        f"relayd: tls.certificate {files['cert']}: cannot read it: {missing}",
        f"relayd: auth.password_file {files['passwd']}: {missing}",
    ]


def test_a_spool_that_cannot_be_created_is_named(layout, tmp_path):
    configPath, files = layout
    blocker = Path(files["spool"]).parent / "blocker"
    blocker.write_text("a file where a directory should be")
    configPath.write_text(configPath.read_text().replace(files["spool"], str(blocker)))
    status, _, err = checkConfig(str(configPath))
    assert status == 1
    assert err == f"relayd: queue.directory {blocker}: not a directory\n"


needsRoot = pytest.mark.skipif(os.geteuid() != 0, reason="--user needs root to drop to another user (CI runs as root)")


@needsRoot
def test_as_another_user_a_file_only_root_can_read_is_caught(layout):
    configPath, files = layout
    # Root reads anything: checked as root, all is well.
    assert checkConfig(str(configPath))[0] == 0
    # As nobody: the key is root's alone (as keys usually are), the spool too.
    os.chmod(files["key"], 0o600)
    for name in ("cert", "passwd", "ca", "upstream"):
        os.chmod(files[name], 0o644)
    status, out, err = checkConfig("--user", "nobody", str(configPath))
    assert status == 1 and out == ""
    assert err.splitlines() == [
        f"relayd: tls.key {files['key']}: cannot read it: Permission denied",
        f"relayd: queue.directory {files['spool']}: {files['spool']}: Permission denied; "
        f"relayd runs as nobody: chown -R nobody: {files['spool']}, then restart relayd",
    ]

    # The fix the README gives: group-readable by the daemon's group.
    nogroup = os.getgrouplist("nobody", __import__("pwd").getpwnam("nobody").pw_gid)[0]
    os.chown(files["key"], 0, nogroup)
    os.chmod(files["key"], 0o640)
    os.chown(files["spool"], __import__("pwd").getpwnam("nobody").pw_uid, nogroup)
    status, out, err = checkConfig("--user", "nobody", str(configPath))
    assert (status, err) == (0, ""), err
    # And root now refuses the spool that belongs to nobody, as the daemon would.
    status, _, err = checkConfig(str(configPath))
    assert status == 1 and err.startswith(
        f"relayd: queue.directory {files['spool']} belongs to nobody and relayd runs as root")


@needsRoot
def test_as_another_user_the_config_file_itself_must_be_readable(layout):
    configPath, _ = layout
    configPath.chmod(0o600)
    status, _, err = checkConfig("--user", "nobody", str(configPath))
    assert status == 1
    assert err.startswith(f"relayd: {configPath}: ") and "Permission denied" in err


@needsRoot
def test_queued_messages_the_user_cannot_read_are_named(layout):
    configPath, files = layout
    spool = Path(files["spool"])
    nobody = __import__("pwd").getpwnam("nobody")
    (spool / "queue").mkdir(mode=0o700)
    (spool / "queue" / "K1ETWANE193MZRQ7.env").write_text("{}")
    (spool / "queue" / "K1ETWANE193MZRQ7.env").chmod(0o600)  # root's, as a root daemon leaves it
    for path in (spool, spool / "queue"):
        os.chown(path, nobody.pw_uid, nobody.pw_gid)
    status, _, err = checkConfig("--user", "nobody", str(configPath))
    assert status == 1
    assert err == (f"relayd: queue.directory {spool}: 1 queued message cannot be read (the first: "
                   f"{spool}/queue/K1ETWANE193MZRQ7.env: Permission denied) and would not be sent; "
                   f"relayd runs as nobody: chown -R nobody: {spool}, then restart relayd\n")


def test_user_errors_are_one_line(layout):
    configPath, _ = layout
    assert checkConfig("--user", "no-such-user-here", str(configPath)) == (
        1, "", "relayd: --user no-such-user-here: no such user\n")
