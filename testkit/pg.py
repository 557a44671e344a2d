"""A real PostgreSQL server for the tests: initdb + pg_ctl into a temporary directory, a unix
socket only (no TCP listener), stopped by its PID. initdb refuses to run as root, so as root it
runs as the `postgres` user that Debian's package creates (.ci/run installs postgresql-15).
The control plane's tests, the ledger's and bench/usage_flush.py use it."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from testkit.until import until


def _bindir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    assert initdb, "PostgreSQL is not installed: .ci/run installs postgresql-15 (apt)"
    return Path(initdb).parent


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _as_owner(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@contextmanager
def postgres() -> Iterator[str]:
    """Yields a libpq URL of the running server's `postgres` database (superuser `modelyard`)."""
    bindir = _bindir()
    root = Path(tempfile.mkdtemp(prefix="modelyard-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
    data, log = root / "data", root / "server.log"
    pid = None
    try:
        subprocess.run(_as_owner([str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "modelyard",
                                  "--no-sync", "-E", "UTF8"]), check=True, capture_output=True, timeout=120)
        subprocess.run(_as_owner([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60",
                                  "-o", f"-k {root} -c listen_addresses='' -c fsync=off -c max_connections=50",
                                  "start"]), check=True, capture_output=True, timeout=90)
        pid = int((data / "postmaster.pid").read_text().split()[0])
        yield f"postgresql://modelyard@/postgres?host={root}"
    finally:
        if pid is not None:
            os.kill(pid, signal.SIGINT)             # "fast" shutdown
            try:
                until(lambda: not _alive(pid), 30, "postgres stopped")
            except AssertionError:
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)


def fresh_database(url: str, name: str) -> str:
    """A new empty database on the server at `url`; its URL."""
    import psycopg
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    return url.replace("/postgres?", f"/{name}?")
