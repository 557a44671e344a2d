"""A fleet: three real upstream servers (testkit.upstream's scripted one, each on its own loopback
port, reporting a settable load on /metrics as vLLM does) behind TWO `modelyard serve` gateways
with `balance = "prefix"`, which never talk to each other. Requests go through the official
openai client; which upstream got a request is read from the bodies each upstream kept.

- the same system prompt, sent through either gateway, lands on one upstream;
- a conversation (`user`, or the session header) sticks to one upstream across gateways;
- an upstream whose engine reports itself overloaded gets no more of its prompts: they spill, all
  to the same other upstream, and both gateways count the spill;
- a killed upstream's requests move to the next upstream without one being lost, and the prompts
  that lived elsewhere stay where they were.

The kill is the last test: the module's fleet has two upstreams after it.
"""

from __future__ import annotations

import re
from contextlib import ExitStack
from typing import Iterator

import httpx
import openai
import pytest

from testkit.servers import served
from testkit.until import until
from testkit.upstream import Load, ok_answer, upstream

KEY = "fleet-key"
FLEET = "fleet"
N = 3


class Fleet:
    def __init__(self, stack: ExitStack, tmp) -> None:
        self.loads = [Load() for _ in range(N)]
        self.stacks = [ExitStack() for _ in range(N)]
        self.urls, self.seen = [], []
        for i in range(N):
            url, seen = self.stacks[i].enter_context(upstream(ok_answer, load=self.loads[i]))
            stack.callback(self.stacks[i].close)
            self.urls.append(url)
            self.seen.append(seen)
        urls = ", ".join(f'"{u}"' for u in self.urls)
        config = (f'[server]\napi_keys = ["{KEY}"]\nlog_level = "info"\n\n'
                  f'[[endpoints]]\nname = "{FLEET}"\nengine = "openai"\nurls = [{urls}]\n'
                  f'upstream_model = "org/model"\nupstream_server = "vllm"\nbalance = "prefix"\n'
                  f'balance_abs_threshold = 2\nbalance_rel_threshold = 1.5\n')
        self.gateways = [stack.enter_context(served(tmp, config, name=f"gateway-{g}", key=KEY)) for g in range(2)]
        self.clients = [openai.OpenAI(base_url=g.api, api_key=KEY, max_retries=0, timeout=30) for g in self.gateways]

    def where(self, needle: str) -> list[int]:
        """The upstreams (indexes) that were sent a body containing `needle`, once per body."""
        return [i for i, seen in enumerate(self.seen) for body in list(seen) if needle in str(body)]

    def chat(self, g: int, messages: list[dict], **extra) -> str:
        out = self.clients[g].chat.completions.create(model=FLEET, messages=messages, max_tokens=4, **extra)
        return out.choices[0].message.content

    def metric(self, g: int, name: str, replica: int) -> float:
        text = httpx.get(self.gateways[g].base + "/metrics", timeout=10).text
        m = re.search(rf'^{name}{{endpoint="{FLEET}",replica="{replica}"}} (\S+)$', text, re.MULTILINE)
        return float(m.group(1)) if m else -1.0

    def kill(self, i: int) -> None:
        self.stacks[i].close()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> Iterator[Fleet]:
    with ExitStack() as stack:
        yield Fleet(stack, tmp_path_factory.mktemp("fleet"))


def system(tag: str) -> str:
    return f"[{tag}] You are a meticulous assistant for the {tag} team; answer briefly and cite sources. " * 5


def test_the_same_system_prompt_lands_on_one_upstream_from_both_gateways(fleet):
    for q in range(10):
        assert fleet.chat(q % 2, [{"role": "system", "content": system("shared")},
                                  {"role": "user", "content": f"question {q}: what is {q} squared?"}]) == "ok"
    assert len(fleet.where("[shared]")) == 10
    assert len(set(fleet.where("[shared]"))) == 1, fleet.where("[shared]")
    # different system prompts are placed by their own hash: they spread over the upstreams
    for t in range(12):
        fleet.chat(t % 2, [{"role": "system", "content": system(f"team-{t}")}, {"role": "user", "content": "hi"}])
    homes = {t: set(fleet.where(f"[team-{t}]")) for t in range(12)}
    assert all(len(h) == 1 for h in homes.values()), homes
    assert len(set.union(*homes.values())) >= 2, homes


def test_a_conversation_sticks_to_one_upstream(fleet):
    for s in range(3):
        history = [{"role": "system", "content": f"conversation {s}"}]
        for turn in range(4):
            # every turn's text is new (nothing to match): the session alone keeps it in place
            history.append({"role": "user", "content": f"session-{s} turn {turn} {'xyz' * turn * 40}"})
            history.append({"role": "assistant", "content": fleet.chat(turn % 2, history, user=f"user-{s}")})
        assert len(set(fleet.where(f"session-{s} turn 0"))) == 1
    # the configured header does the same for completions without `user`
    for turn in range(4):
        fleet.clients[turn % 2].completions.create(model=FLEET, prompt=f"headed turn {turn} " + "q" * turn * 90,
                                                   max_tokens=4, extra_headers={"x-session-id": "abc"})
    assert len(fleet.where("headed turn")) == 4 and len(set(fleet.where("headed turn"))) == 1
    # bounded as `user` is, refused before any work
    with pytest.raises(openai.BadRequestError) as err:
        fleet.clients[0].completions.create(model=FLEET, prompt="too long a session", max_tokens=4,
                                            extra_headers={"x-session-id": "s" * 300})
    assert err.value.body["param"] == "x-session-id" and "256" in err.value.body["message"]
    assert not fleet.where("too long a session")


def test_an_overloaded_upstream_spills_to_one_other(fleet):
    fleet.chat(0, [{"role": "system", "content": system("hot")}, {"role": "user", "content": "first"}])
    [home] = fleet.where("[hot]")
    fleet.loads[home].running = 20
    for g in range(2):        # both gateways have read the engine's figure on their next probe
        until(lambda: fleet.metric(g, "modelyard_replica_load", home) >= 20, 30, f"gateway {g} sees load 20")
    spills = [fleet.metric(g, "modelyard_replica_overload_spills_total", home) for g in range(2)]
    for q in range(6):
        fleet.chat(q % 2, [{"role": "system", "content": system("hot")}, {"role": "user", "content": f"more {q}"}])
    placed = fleet.where("[hot]")        # by upstream, not in time order
    assert len(placed) == 7 and placed.count(home) == 1, placed
    assert len(set(placed) - {home}) == 1, placed     # both gateways spill to the same next replica
    for g in range(2):      # at least its first: later ones may find the spilled-to replica cache-best already
        assert fleet.metric(g, "modelyard_replica_overload_spills_total", home) >= spills[g] + 1
    fleet.loads[home].running = 0
    for g in range(2):
        until(lambda: fleet.metric(g, "modelyard_replica_load", home) == 0, 30, f"gateway {g} sees load 0")
    # gateway 0 sent the prompt to both: equal matches go by placement, home again
    fleet.chat(0, [{"role": "system", "content": system("hot")}, {"role": "user", "content": "cooled"}])
    assert fleet.where("cooled") == [home]


def test_a_killed_upstream_moves_only_its_requests_and_loses_none(fleet):
    tags = [f"k{t}" for t in range(15)]
    for t in tags:
        fleet.chat(0, [{"role": "system", "content": system(t)}, {"role": "user", "content": "before"}])
    before = {t: fleet.where(f"[{t}]")[0] for t in tags}
    victim = before[tags[0]]
    fleet.kill(victim)
    # sent at once, before any probe noticed: each send fails over on its connect error
    answers = [fleet.chat(i % 2, [{"role": "system", "content": system(t)}, {"role": "user", "content": "after"}])
               for i, t in enumerate(tags)]
    assert answers == ["ok"] * len(tags)
    after = {t: [i for i in fleet.where(f"[{t}]") if i != victim][-1] for t in tags}
    for t in tags:
        if before[t] != victim:
            assert after[t] == before[t], (t, before[t], after[t])
    moved = {after[t] for t in tags if before[t] == victim}
    assert moved and victim not in moved
    # a gateway counted the failed replica down, and keeps serving
    until(lambda: all(fleet.metric(g, "modelyard_replica_healthy", victim) == 0 for g in range(2)), 30,
          "both gateways mark the killed upstream down")
