"""A real redis-server for the tests: a unix socket in a temporary directory (no TCP port),
no persistence, stopped by its PID. Debian's redis-server package (scripts/install --dev).
The quota tests, the ledger's and bench/proxy.py --quotas use it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from testkit.until import until


@contextmanager
def redis_server() -> Iterator[tuple[str, int]]:
    """Yields (url, pid)."""
    binary = shutil.which("redis-server")
    assert binary, "redis-server is not installed: scripts/install --dev installs it (apt)"
    root = Path(tempfile.mkdtemp(prefix="modelyard-redis-"))
    sock = root / "redis.sock"
    proc = subprocess.Popen([binary, "--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700",
                             "--save", "", "--appendonly", "no", "--dir", str(root)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def listening() -> bool:
            assert proc.poll() is None, f"redis-server exited with {proc.returncode}"
            return sock.exists()
        until(listening, 20, "redis-server listening", interval=0.05)
        yield f"unix://{sock}", proc.pid
    finally:
        try:
            os.kill(proc.pid, signal.SIGCONT)      # a test may have stopped it
        except ProcessLookupError:
            pass
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        shutil.rmtree(root, ignore_errors=True)
