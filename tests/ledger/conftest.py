"""The ledger's tests run the quota backends for real: Redis (tests/quota/redis_server.py) and
PostgreSQL (tests/control/pg.py), whose helpers live beside their own tests."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterator

import pytest

HERE = Path(__file__).resolve().parent
for folder in ("quota", "control"):
    if str(HERE.parent / folder) not in sys.path:
        sys.path.insert(0, str(HERE.parent / folder))

from pg import fresh_database, postgres  # noqa: E402
from redis_server import redis_server  # noqa: E402


@pytest.fixture(params=["memory", "redis", "postgres"])
def backend(request, tmp_path) -> Iterator[tuple[str, str]]:
    """(the [quota] backend, the TOML lines that choose it and its stores)."""
    if request.param == "memory":
        yield "memory", f'database_url = "sqlite:///{tmp_path / "control.db"}"\n'
    elif request.param == "redis":
        with redis_server() as (url, _):
            yield "redis", (f'database_url = "sqlite:///{tmp_path / "control.db"}"\n\n'
                            f'[quota]\nbackend = "redis"\nredis_url = "{url}"\n')
    else:
        with postgres() as server:
            url = fresh_database(server, "ledger")
            yield "postgres", f'database_url = "{url}"\n\n[quota]\nbackend = "postgres"\n'
