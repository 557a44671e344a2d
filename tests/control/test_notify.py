"""Another process's change wakes the sync loop without waiting for the poll: PostgreSQL's
NOTIFY (a real server) and SQLite's data_version (a real file), each seen through a second,
independent connection, as another gateway process would see it."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from testkit.pg import fresh_database
from modelyard.control.db import open_database
from modelyard.control.keys import KeyStore
from modelyard.control.notify import ChangeFeed

_count = itertools.count()


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'control.db'}"
    return fresh_database(request.getfixturevalue("pg_server"), f"n{next(_count)}")


def test_a_write_elsewhere_wakes_the_feed_and_a_quiet_store_does_not(url):
    writer, reader = open_database(url), open_database(url)

    async def scenario() -> None:
        feed = ChangeFeed(reader, url)
        feed.start()
        try:
            await feed.wait(1.5)                  # let the listener connect; nothing happened
            assert feed.notifications == 0
            await asyncio.to_thread(KeyStore(writer).create, "test", name="k")
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 5
            while feed.notifications == 0:
                assert loop.time() < deadline, "no wake-up for a committed change"
                await feed.wait(0.1)
            woke = feed.notifications
            await asyncio.sleep(1.5)              # no more writes: no more wake-ups
            assert feed.notifications == woke
        finally:
            await feed.stop()

    try:
        asyncio.run(scenario())
    finally:
        writer.close()
        reader.close()
