"""The ledger's tests run the quota backends for real: Redis and PostgreSQL (testkit's
redis_server and pg)."""

from __future__ import annotations

from typing import Iterator

import pytest

from testkit.pg import fresh_database, postgres
from testkit.redis_server import redis_server


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
