"""Which replica a request goes to: pure logic, no I/O (proxy/replicas feeds it replicas and
loads, and sends).

Two policies (EndpointSpec.balance):

- "least_in_flight": the replica with the fewest requests in flight from this gateway, ties
  taken in turn (what a remote endpoint always did).
- "prefix": the replica most likely to hold the request's prompt in its prefix cache, traded
  against load. The prompt's text (a completion's prompt, a chat's messages serialized in order)
  is cut into BLOCK_CHARS-character blocks whose hashes are chained (block i's hash covers blocks
  0..i), so one hash names a whole prefix. Each replica keeps the hashes of what was sent to it
  in an LRU of `prefix_blocks` entries (`PrefixIndex`); the cache-best replica is the one whose
  index holds the longest run of the request's leading hashes. A prompt no replica has seen is
  placed by rendezvous (highest-random-weight) hashing of its first block over the candidates:
  every gateway computes the same order from the same URLs, so identical system prompts meet on
  one replica without gateways talking (placement is unsalted: it depends on the text alone;
  matches are salted by the cache partition, so a tenant never matches another's history),
  and removing a replica moves only the keys it ranked first. A `session` (the request's
  `user`, or the endpoint's session header) is placed the same way by its own hash, so a
  conversation's turns stick while its replica is healthy and not overloaded.

The preferred replica is given up for the least-loaded one only when it is overloaded, by the
rule of SGLang's router (sgl-project/sglang, sgl-router's cache_aware policy): its load exceeds
the least-loaded one's by more than `abs_threshold` AND by more than `rel_threshold` times.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from ..settings import BALANCES

BLOCK_CHARS = 64            # characters per hashed block of prompt text
MAX_BLOCKS = 8192           # blocks hashed per request (512k characters): beyond, the tail is not routed on
_DIGEST = 8                 # bytes per block hash: collisions among 10^7 blocks are ~1e-5 likely


def block_hashes(text: str, salt: str = "", block: int = BLOCK_CHARS, limit: int = MAX_BLOCKS) -> list[bytes]:
    """Chained hashes of `text`'s whole blocks (a last partial block counts only when it is the
    only one, so a short prompt still has a first block to be placed by). `salt` separates cache
    partitions: one tenant's prompts never match another's (api/openai/cache_scope)."""
    out: list[bytes] = []
    prev = hashlib.blake2b(salt.encode(), digest_size=_DIGEST).digest()
    whole = min(len(text) // block, limit)
    ends = range(block, whole * block + 1, block) if whole else ([len(text)] if text else [])
    for end in ends:
        prev = hashlib.blake2b(prev + text[end - block if whole else 0:end].encode("utf-8", "surrogatepass"),
                               digest_size=_DIGEST).digest()
        out.append(prev)
    return out


def prompt_text(body: dict) -> str | None:
    """What an upstream body is routed by: a completion's prompt (token ids written out), a chat's
    messages each serialized on its own line in order, so that a conversation's next turn extends
    its last turn's text; None for anything else."""
    if "messages" in body:
        return "".join(json.dumps(m, sort_keys=True, separators=(",", ":")) + "\n" for m in body["messages"])
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        return ",".join(map(str, prompt)) + ","
    return None


def rendezvous(key: bytes, names: Iterable[str]) -> list[str]:
    """`names` ordered by highest random weight for `key`: the same order on every gateway, and
    removing a name only promotes the next one for the keys it ranked first."""
    return sorted(names, key=lambda n: hashlib.blake2b(key + b"\0" + n.encode(), digest_size=8).digest(),
                  reverse=True)


def overloaded(load: float, least: float, abs_threshold: float, rel_threshold: float) -> bool:
    """SGLang's imbalance rule: both the difference and the ratio over their thresholds."""
    return load - least > abs_threshold and load > rel_threshold * least


class PrefixIndex:
    """The block hashes recently sent to one replica, at most `capacity`, least recently used
    evicted first. A request's hashes are touched last block first, so a shared head (a system
    prompt) is the most recent and outlives the tails that hang off it: a prefix is never held
    without its own head, and `match` can stop at the first miss."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._blocks: OrderedDict[bytes, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def match(self, hashes: Sequence[bytes]) -> int:
        n = 0
        for h in hashes:
            if h not in self._blocks:
                break
            n += 1
        return n

    def add(self, hashes: Sequence[bytes]) -> None:
        blocks = self._blocks
        for h in reversed(hashes[:self.capacity]):
            blocks[h] = None
            blocks.move_to_end(h)
        while len(blocks) > self.capacity:
            blocks.popitem(last=False)


@dataclass(frozen=True)
class Candidate:
    name: str           # the stable name rendezvous hashes (the replica's URL: the same on every gateway)
    load: float         # requests running and waiting there (engine-reported, else this gateway's in flight)
    in_flight: int = 0  # this gateway's own


@dataclass
class Decision:
    order: list[str]                    # the chosen replica first, then where to go should it fail to connect
    hashes: list[bytes] = field(default_factory=list)    # to record once it was sent
    matched_blocks: int = 0             # of the chosen replica
    reason: str = "load"                # "prefix" | "placement" | "session" | "spill" | "load"
    spilled_from: str | None = None     # the overloaded preferred replica, on a spill


class Router:
    """One endpoint's routing state: a PrefixIndex per replica name and the tie-breaking turn."""

    def __init__(self, balance: str, *, abs_threshold: float, rel_threshold: float, capacity: int) -> None:
        if balance not in BALANCES:
            raise ValueError(f"balance must be one of {BALANCES}, got {balance!r}")
        self.balance = balance
        self.abs_threshold, self.rel_threshold = abs_threshold, rel_threshold
        self.capacity = capacity
        self._index: dict[str, PrefixIndex] = {}
        self._turn = itertools.count()

    def index(self, name: str) -> PrefixIndex:
        if name not in self._index:
            self._index[name] = PrefixIndex(self.capacity)
        return self._index[name]

    def forget(self, name: str) -> None:
        """A replica removed: what it held is gone with it."""
        self._index.pop(name, None)

    def blocks(self, name: str) -> int:
        return len(self._index[name]) if name in self._index else 0

    def choose(self, candidates: Sequence[Candidate], text: str | None = None, *, session: str | None = None,
               salt: str = "") -> Decision:
        if not candidates:
            return Decision([])
        if self.balance == "least_in_flight" or (text is None and session is None):
            return self._least(candidates)
        hashes = block_hashes(text, salt) if text is not None else []
        by_name = {c.name: c for c in candidates}
        matched = {c.name: self._index[c.name].match(hashes) if c.name in self._index else 0 for c in candidates}
        # Placement is by unsalted hashes: it depends on the text alone, never on what was sent
        # before, so it tells no one about other tenants' prompts, and every gateway computes it
        # alike (a key's partition id may differ between gateways with their own databases).
        if session is not None:
            placed = rendezvous(b"session\0" + session.encode(), by_name)
            preferred, reason = placed[0], "session"
        else:
            first = block_hashes(text[:BLOCK_CHARS])[:1] if text else []
            placed = rendezvous(first[0] if first else b"", by_name)
            best = max(matched.values())
            # the longest match; equal matches go by rendezvous rank, so gateways agree
            preferred = next(n for n in placed if matched[n] == best)
            reason = "prefix" if best else "placement"
        least = min(c.load for c in candidates)
        spilled_from = None
        if overloaded(by_name[preferred].load, least, self.abs_threshold, self.rel_threshold):
            spilled_from = preferred
            rank = {n: i for i, n in enumerate(placed)}
            preferred = min((c.name for c in candidates if c.load == least),
                            key=lambda n: (-matched[n], rank[n]))
            reason = "spill"
        order = [preferred] + [n for n in placed if n != preferred]
        return Decision(order, hashes, matched[preferred], reason, spilled_from)

    def record(self, name: str, hashes: Sequence[bytes]) -> None:
        """`hashes` were sent to `name`: its engine now likely caches that prefix."""
        if hashes and self.balance == "prefix":
            self.index(name).add(hashes)

    def _least(self, candidates: Sequence[Candidate]) -> Decision:
        least = min(c.in_flight for c in candidates)
        tied = [c.name for c in candidates if c.in_flight == least]
        first = tied[next(self._turn) % len(tied)]
        rest = sorted((c for c in candidates if c.name != first), key=lambda c: c.in_flight)
        return Decision([first] + [c.name for c in rest])
