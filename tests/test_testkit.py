"""testkit's own promises, without a server: `until` returns the first truthy value or fails
naming what it waited for, and a server's environment carries none of the caller's MODELYARD_*
settings but the model store's."""

from __future__ import annotations

import itertools

import pytest

from testkit.servers import scrubbed_env
from testkit.until import until


def test_until_returns_the_first_truthy_value_and_polls_until_then():
    calls = itertools.count(1)
    assert until(lambda: (n := next(calls)) >= 3 and n, 5, "the third call", interval=0) == 3


def test_until_fails_naming_what_and_the_last_value():
    with pytest.raises(AssertionError, match=r"the answer: not within 0.05s \(last: \[\]\)"):
        until(lambda: [], 0.05, "the answer", interval=0.01)


def test_until_counts_retry_on_as_not_yet_and_lets_other_errors_through():
    tries = itertools.count(1)

    def flaky() -> bool:
        if next(tries) < 3:
            raise ConnectionError("not yet")
        return True
    assert until(flaky, 5, "connected", interval=0, retry_on=(ConnectionError,)) is True
    with pytest.raises(ValueError):
        until(lambda: int("x"), 5, "never", retry_on=(ConnectionError,))


def test_a_server_environment_keeps_only_the_store_of_the_callers_modelyard_settings(monkeypatch):
    monkeypatch.setenv("MODELYARD_API_KEYS", "leaked")
    monkeypatch.setenv("MODELYARD_DATABASE_URL", "sqlite:///leaked.db")
    monkeypatch.setenv("MODELYARD_HOME", "/models")
    monkeypatch.setenv("OTHER", "kept")
    monkeypatch.setenv("GGML_CPU_TILED_MM", "0")        # what an in-process choose_kernels sets
    monkeypatch.setenv("KEPT", "kept")
    env = scrubbed_env({"MODELYARD_API_KEYS": "given", "OTHER": None})
    assert env["MODELYARD_API_KEYS"] == "given" and env["MODELYARD_HOME"] == "/models"
    assert "MODELYARD_DATABASE_URL" not in env and "OTHER" not in env
    assert "GGML_CPU_TILED_MM" not in env and env["KEPT"] == "kept"
