"""
``relayd-passwd``: manage relayd's password file (htpasswd format).

    relayd-passwd [-f FILE] add [--scheme bcrypt|sha512_crypt|argon2] LOGIN
    relayd-passwd [-f FILE] remove LOGIN
    relayd-passwd [-f FILE] list
    relayd-passwd [-f FILE] check LOGIN

Passwords are never taken from the command line (other users can read it
in ps and it lands in shell history): ``add`` and ``check`` prompt on the
terminal, or read one line from stdin when it is not a terminal
(``printf '%s\\n' "$PW" | relayd-passwd add printer``).

Edits are atomic: a temporary file in the same directory, fsynced, renamed
over the old one, the directory fsynced; the file keeps its mode, owner and
group, comments and lines relayd-passwd does not understand are kept as
they are. A running relayd notices the change within a second.

A new file is made for the daemon to read: mode 0640 with group
``relayd`` when that group exists (the daemon's user, ``useradd --system
relayd``), else 0600 with a line saying how to give the daemon access.
"""

from __future__ import annotations

import argparse
import fcntl
import getpass
import grp
import os
import sys
import tempfile
from contextlib import contextmanager
from typing import Sequence, TextIO

from relayd.auth import (
    BCRYPT_MAX_PASSWORD, SCHEMES, PasswordFile, PasswordFileError, PasswordTooLong, Verifier,
    cryptContext, isValidLogin, parsePasswordFile, schemeProblem, skippedLines,
)
from relayd.cli.common import FAILED, OK, USAGE, OneLineParser, Refusal, UsageError

PROG = "relayd-passwd"
DEFAULT_FILE = "/etc/relayd/passwd"
# The daemon's group (systemd/relayd.service: Group=relayd): a new file is
# readable by it, writable by its owner only.
DAEMON_GROUP = "relayd"
NEW_FILE_MODE = 0o640

def readPassword(stdin: TextIO, prompt: str, confirm: bool) -> str:
    """From the terminal (twice when ``confirm``), else one line of stdin."""
    if stdin.isatty():
        first = getpass.getpass(prompt)
        if confirm and getpass.getpass("Again: ") != first:
            raise Refusal("the passwords differ; nothing changed")
        return first
    line = stdin.readline()
    return line[:-1] if line.endswith("\n") else line


@contextmanager
def _locked(path: str):
    """Serialise editors: an flock on the directory (the file itself is replaced by rename)."""
    directory = os.path.dirname(os.path.abspath(path))
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _readLines(path: str) -> list[bytes]:
    try:
        with open(path, "rb") as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []
    except OSError as e:
        raise Refusal(f"{path}: {e.strerror}") from None


def _lineLogin(line: bytes) -> str | None:
    entries, _ = parsePasswordFile(line)
    return next(iter(entries), None)


def _daemonGroup() -> int | None:
    try:
        return grp.getgrnam(DAEMON_GROUP).gr_gid
    except KeyError:
        return None


def _setOwnership(fd: int, path: str, st: os.stat_result | None, stderr: TextIO) -> None:
    """
    The temporary file takes the old file's mode, owner and group (often
    root:relayd 0640), or, for a new file, group relayd and 0640 (so the
    daemon can read it) when that group exists and may be given.
    """
    if st is not None:
        try:
            if os.geteuid() == 0:
                os.fchown(fd, st.st_uid, st.st_gid)
            elif os.fstat(fd).st_gid != st.st_gid:
                os.fchown(fd, -1, st.st_gid)
        except PermissionError:
            raise Refusal(f"{path}: cannot keep its group {st.st_gid} (not a member); "
                           "run relayd-passwd as root or as the file's owner in that group; "
                           "nothing changed") from None
        os.fchmod(fd, st.st_mode & 0o7777)
        return
    gid = _daemonGroup()
    if gid is not None:
        try:
            os.fchown(fd, -1, gid)
        except PermissionError:
            gid = None
    if gid is not None:
        os.fchmod(fd, NEW_FILE_MODE)
        return
    os.fchmod(fd, 0o600)
    stderr.write(f"{PROG}: note: created {path} mode 0600: the daemon's user must be able to read "
                 f"it (e.g. chgrp {DAEMON_GROUP} {path} && chmod 0640 {path})\n")


def _writeAtomically(path: str, lines: list[bytes], stderr: TextIO | None = None) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    try:
        fd, temp = tempfile.mkstemp(prefix=".relayd-passwd.", dir=directory)
    except OSError as e:
        raise Refusal(f"{directory}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            _setOwnership(f.fileno(), path, st, stderr or sys.stderr)
            f.write(b"".join(line + b"\n" for line in lines))
            f.flush()
            os.fsync(f.fileno())
        os.rename(temp, path)
        dirfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)
    except (OSError, Refusal) as e:
        try:
            os.unlink(temp)
        except OSError:
            pass
        if isinstance(e, Refusal):
            raise
        raise Refusal(f"{path}: {e.strerror}") from None


def add(args, stdin: TextIO, stdout: TextIO) -> int:
    if not isValidLogin(args.login):
        raise Refusal(f"{args.login!r} is not a valid login (no spaces, colons or control characters)")
    password = readPassword(stdin, f"Password for {args.login}: ", confirm=True)
    if not password:
        raise Refusal("an empty password is refused; nothing changed")
    if args.scheme == "bcrypt" and len(password.encode("utf-8")) > BCRYPT_MAX_PASSWORD:
        raise Refusal("bcrypt checks at most 72 bytes of a password; use a shorter one "
                       "or --scheme argon2; nothing changed")
    try:
        hashed = cryptContext().handler(args.scheme).hash(password)
    except Exception as e:  # e.g. argon2-cffi missing
        raise Refusal(f"cannot hash with {args.scheme}: {e}") from None
    entry = f"{args.login}:{hashed}".encode("utf-8")
    with _locked(args.file):
        lines = _readLines(args.file)
        replaced = False
        for i, line in enumerate(lines):
            if _lineLogin(line) == args.login:
                lines[i] = entry
                replaced = True
        if not replaced:
            lines.append(entry)
        _writeAtomically(args.file, lines, getattr(args, "stderr", None))
    stdout.write(f"{'changed' if replaced else 'added'} {args.login} in {args.file}\n")
    return OK


def remove(args, stdin: TextIO, stdout: TextIO) -> int:
    with _locked(args.file):
        lines = _readLines(args.file)
        kept = [line for line in lines if _lineLogin(line) != args.login]
        if len(kept) == len(lines):
            raise Refusal(f"{args.login!r} is not in {args.file}")
        _writeAtomically(args.file, kept, getattr(args, "stderr", None))
    stdout.write(f"removed {args.login} from {args.file}\n")
    return OK


def _readEntries(path: str) -> dict[str, str]:
    """The file's login -> hash entries; lines that are not login:hash are named on stderr."""
    try:
        with open(path, "rb") as f:
            entries, skipped = parsePasswordFile(f.read())
    except OSError as e:
        raise Refusal(f"{path}: {e.strerror}") from None
    if skipped:
        sys.stderr.write(f"{PROG}: warning: {path}: {skippedLines(skipped)}\n")
    return entries


def list_(args, stdin: TextIO, stdout: TextIO) -> int:
    entries = _readEntries(args.file)
    context = cryptContext()
    for login, hashed in entries.items():
        problem = schemeProblem(hashed)
        if problem is None:
            stdout.write(f"{login} {context.identify(hashed)}\n")
        elif problem == "locked":
            stdout.write(f"{login} locked\n")
        else:
            stdout.write(f"{login} unusable: {problem}; reset with {PROG} add {login}\n")
    return OK


def check(args, stdin: TextIO, stdout: TextIO) -> int:
    _readEntries(args.file)  # a missing file fails before the prompt
    password = readPassword(stdin, f"Password for {args.login}: ", confirm=False)
    # The daemon's own verifier, so the answer is the one AUTH would give.
    try:
        ok = bool(password) and Verifier(PasswordFile(args.file)).verify(args.login, password)
    except PasswordTooLong:
        raise Refusal("the password is longer than bcrypt's 72 bytes: it never matches") from None
    except PasswordFileError as e:
        raise Refusal(str(e)) from None
    stdout.write("ok\n" if ok else "wrong login or password\n")
    return OK if ok else FAILED


def makeParser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog=PROG, description="manage relayd's password file")
    parser.add_argument("-f", "--file", default=DEFAULT_FILE,
                        help=f"the password file (default {DEFAULT_FILE})")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    p = sub.add_parser("add", help="add a login or change its password (prompted, or from stdin)")
    p.add_argument("--scheme", choices=SCHEMES, default=SCHEMES[0])
    p.add_argument("login")
    p.set_defaults(function=add)
    p = sub.add_parser("remove", help="remove a login")
    p.add_argument("login")
    p.set_defaults(function=remove)
    p = sub.add_parser("list", help="list logins and their hash schemes")
    p.set_defaults(function=list_)
    p = sub.add_parser("check", help="check a password (prompted, or from stdin); exit 1 if wrong")
    p.add_argument("login")
    p.set_defaults(function=check)
    return parser


USAGE_LINE = (f"{PROG} [-f FILE] add [--scheme SCHEME] LOGIN | remove LOGIN | list | check LOGIN")


def run(argv: Sequence[str], stdin: TextIO, stdout: TextIO, stderr: TextIO) -> int:
    try:
        args = makeParser().parse_args(list(argv))
        if args.command is None:
            raise UsageError("no command given")
    except UsageError as e:
        stderr.write(f"{PROG}: {' '.join(str(e).split())}; usage: {USAGE_LINE}\n")
        return USAGE
    args.stderr = stderr
    try:
        return args.function(args, stdin, stdout)
    except Refusal as e:
        stderr.write(f"{PROG}: {e}\n")
        return FAILED
    except (KeyboardInterrupt, EOFError):
        stderr.write(f"{PROG}: interrupted; nothing changed\n")
        return FAILED


def main(argv: Sequence[str] | None = None) -> None:
    sys.exit(run(sys.argv[1:] if argv is None else argv, sys.stdin, sys.stdout, sys.stderr))


if __name__ == "__main__":
    main()
