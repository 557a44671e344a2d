"""Fixtures of the console's in-process tests (consoleapp.py has the app and the sign-in)."""

from __future__ import annotations

from typing import Iterator

import pytest
from fastapi.testclient import TestClient

from consoleapp import BASE, make_settings
from modelyard import create_app


@pytest.fixture
def app(tmp_path):
    return create_app(make_settings(tmp_path))


@pytest.fixture
def client(app) -> Iterator[TestClient]:
    with TestClient(app, base_url=BASE) as c:
        yield c
