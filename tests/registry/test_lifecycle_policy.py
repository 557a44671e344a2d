"""The lifecycle's pure decisions (registry/lifecycle), no model: which endpoints a load evicts
(least recently used idle ones, never a busy one, nothing when nothing would make room), how long
an idle endpoint stays (the longest keep_alive a pending request sent), and the settings' bounds."""

from __future__ import annotations

import pytest

from modelyard.errors import ConfigError
from modelyard.registry.endpoint import Endpoint
from modelyard.registry.lifecycle import Lifecycle, Loaded, keep_alive_after, plan_room
from modelyard.settings import MAX_KEEP_ALIVE, EndpointSpec, Settings


def loaded(name: str, size: int, last_used: float, busy: bool = False) -> Loaded:
    return Loaded(name, size, last_used, busy)


def test_room_comes_from_the_least_recently_used_idle_endpoints():
    held = [loaded("c", 30, 3.0), loaded("a", 30, 1.0), loaded("b", 30, 2.0)]
    assert plan_room(10, held, 100, 0) == []                # 90 + 10 fits
    assert plan_room(20, held, 100, 0) == ["a"]
    assert plan_room(50, held, 100, 0) == ["a", "b"]
    assert plan_room(10, held, 0, 3) == ["a"]               # the count bound alone
    assert plan_room(10, held, 0, 0) == []                  # no bound


def test_a_busy_endpoint_is_never_evicted_and_nothing_goes_in_vain():
    held = [loaded("a", 50, 1.0, busy=True), loaded("b", 30, 2.0)]
    assert plan_room(30, held, 100, 0) == ["b"]             # a is older, but busy
    assert plan_room(60, held, 100, 0) is None              # b alone would not make room: keep it
    assert plan_room(10, [], 5, 0) is None                  # more than the whole budget


def test_the_longest_pending_keep_alive_wins_and_never_is_the_longest():
    ep = Endpoint(EndpointSpec(name="x", keep_alive=30))
    assert keep_alive_after(ep) == 30
    for asked in (5, 600, 0):
        Lifecycle.hold(ep, asked)
    assert keep_alive_after(ep) == 600
    Lifecycle.hold(ep, -1)
    assert keep_alive_after(ep) == -1
    for _ in range(4):
        Lifecycle.release(ep)
    assert ep.pending == 0 and ep.expires_at is None and ep.asked_keep_alive is None
    Lifecycle.hold(ep, None)
    Lifecycle.release(ep)
    assert ep.expires_at == pytest.approx(ep.last_used + 30)


@pytest.mark.parametrize("value", [-2, -0.5, MAX_KEEP_ALIVE + 1, float("nan"), True, "5m"])
def test_a_bad_keep_alive_names_the_field(value):
    with pytest.raises(ConfigError) as err:
        EndpointSpec(name="x", keep_alive=value)
    assert err.value.param == "keep_alive" and "keep_alive must be -1" in err.value.message


@pytest.mark.parametrize("field, value", [("memory_budget_mib", -1), ("max_loaded_models", 10_001),
                                          ("load_timeout", 0), ("memory_budget_mib", 1.5)])
def test_lifecycle_settings_are_bounded(field, value):
    with pytest.raises(ConfigError) as err:
        Settings(**{field: value})
    assert err.value.param == field


def test_load_is_one_of_the_policies():
    with pytest.raises(ConfigError) as err:
        EndpointSpec(name="x", load="lazy")
    assert err.value.param == "load"
