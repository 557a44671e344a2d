from __future__ import annotations

from typing import Iterator

import pytest

from testkit.redis_server import redis_server


@pytest.fixture
def redis_url() -> Iterator[tuple[str, int]]:
    """A fresh redis-server per test: quota windows are a minute long and must start empty."""
    with redis_server() as server:
        yield server
