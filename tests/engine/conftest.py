"""One server holding the model matrix (matrix.py) for every engine test that needs it."""

from __future__ import annotations

from typing import Iterator

import pytest
from matrix import KEY, NAMES, config

from testkit.servers import ServerProcess, served


@pytest.fixture(scope="session")
def inv_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with served(tmp_path_factory.mktemp("matrix"), config(), key=KEY, endpoints=NAMES) as srv:
        yield srv
