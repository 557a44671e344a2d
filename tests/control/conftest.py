"""The control plane's stores, each backend real: a SQLite file and a PostgreSQL server."""

from __future__ import annotations

import itertools
from typing import Iterator

import pytest

from testkit.pg import fresh_database, postgres
from modelyard.control.db import Database, open_database

_count = itertools.count()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    with postgres() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path) -> Iterator[Database]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'control.db'}"
    else:
        url = fresh_database(request.getfixturevalue("pg_server"), f"t{next(_count)}")
    database = open_database(url)
    try:
        yield database
    finally:
        database.close()
