"""Which tokens go into the next llama_decode.

NOTE: there is no prefill phase and no decode phase. Each step builds ONE batch: a decode
token for every running sequence first (so streams keep flowing), then prompt chunks of
admitted requests in arrival order, up to the step's token budget. A prompt longer than the
budget is prefilled over several steps, and running streams never wait more than one step.

Priority (issue 23): batch-priority requests wait in their own FIFO and are admitted only into
slots interactive requests leave free (less those they held in the last few steps, and one spare
slot: INTERACTIVE_SPARE_SLOTS), and only while no interactive request waits; beside
interactive requests they get a few rows of each step (BATCH_ROWS_BESIDE_INTERACTIVE), alone the
whole budget. When an interactive request waits and no slot is free, running batch requests are
preempted (the one whose slot holds the most of its prompt, then the youngest) and go back to the
head of their queue to restart from zero (Request.restart): on a deterministic endpoint the output does
not depend on what ran beside it, so the rerun gives the same answer, and a batch request's
output is held back until it finishes (EngineCore), so nobody sees the discarded attempt. A
batch request waits only while interactive requests do: when interactive traffic stops, it runs.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .prefix_cache import MIN_TOKENS, Entry, HostCache
from .request import Request, RequestStatus, Sequence
from .slots import SlotPool

# echo + logprobs needs a logits row per prompt token, and llama.cpp's output buffer keeps the
# largest size any decode asked for: 512 rows of gemma3's 262,144-token vocabulary are 512 MiB
# (and as much again for the runner's copies, which a step holds until it is scored). So a STEP
# prefills at most this many such prompt tokens, over all its requests: 16 prompts with echo +
# logprobs are scored 32 rows a step in all, not 32 each (512 rows, 1 GiB on gemma3). What one
# step holds is then bounded whatever the requests: these rows, plus one row per other prompt
# chunk (its last token) and per echo request between chunks (Request.last_prompt_row), at most
# 32 + 2 x parallel rows of the vocabulary's width (gemma3, parallel 16: 64 rows, 64 MiB).
PROMPT_LOGITS_ROWS = 32

# While interactive requests run or wait, batch work takes at most this many rows of a step
# (decode tokens, then prompt tokens), and none in a step that prefills an interactive prompt: on
# a CPU a step's time grows with its rows, and an interactive request that arrives waits for the
# step under way, then for the step of its prompt (issue 23's TTFT bound). Batch work alone takes
# the whole budget, so its throughput when interactive traffic stops is any request's. Neither
# chunking nor a skipped step shows in the output (a sequence's next token waits in its list).
BATCH_ROWS_BESIDE_INTERACTIVE = 3     # the least that lets any prompt progress (a 3-token chunk)
INTERACTIVE_GRACE_STEPS = 8     # ...and for this many steps after the last interactive request left
# While interactive requests run, or ran in the last grace steps, batch work is admitted only while
# the slots they held then, and this many more, stay free: an interactive client's next request, a
# moment after its last answer, finds a slot instead of waiting for a preemption (bench/
# batch_priority: 52-62 preemptions a round with no spare slot, 27-90 with one spare slot beside
# running interactive requests only, 2 with the slots of the grace steps kept too).
INTERACTIVE_SPARE_SLOTS = 1


@dataclass
class PrefillChunk:
    request: Request
    start: int           # prompt positions [start, end)
    end: int
    first_row: int       # batch row of prompt position `start`


@dataclass
class Batch:
    tokens: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    logits: list[bool] = field(default_factory=list)
    # KV work before the decode, applied in this order (see LlamaCppRunner.execute):
    copies: list[tuple[int, int]] = field(default_factory=list)        # (src, dst)
    saves: list[tuple[int, tuple[int, ...], str]] = field(default_factory=list)   # (slot, prefix, partition) to host
    restores: list[tuple[int, Entry]] = field(default_factory=list)    # (slot, host entry)
    truncations: list[tuple[int, int]] = field(default_factory=list)   # (slot, keep)
    decodes: list[tuple[Request, Sequence, int]] = field(default_factory=list)  # + logits row
    prefills: list[PrefillChunk] = field(default_factory=list)

    def add(self, token: int, pos: int, slot: int, logits: bool) -> int:
        self.tokens.append(token)
        self.positions.append(pos)
        self.slots.append(slot)
        self.logits.append(logits)
        return len(self.tokens) - 1

    def split(self) -> list["Batch"]:
        """One batch per request, each first rolling its slots back to where this batch began:
        after a failed decode (which may have written part of the KV) each request is retried
        alone, so only the one at fault fails."""
        parts: dict[Request, Batch] = {}
        for req, seq, row in self.decodes:
            part = parts.setdefault(req, Batch())
            part.truncations.append((seq.slot, self.positions[row]))
            part.decodes.append((req, seq, part.add(self.tokens[row], self.positions[row], seq.slot, True)))
        for chunk in self.prefills:
            part = parts.setdefault(chunk.request, Batch())
            slot = chunk.request.seqs[0].slot
            part.truncations.append((slot, chunk.start))
            first = len(part.tokens)
            for row in range(chunk.first_row, chunk.first_row + chunk.end - chunk.start):
                part.add(self.tokens[row], self.positions[row], slot, self.logits[row])
            part.prefills.append(PrefillChunk(chunk.request, chunk.start, chunk.end, first))
        for req, part in parts.items():
            mine = {seq.slot for seq in req.seqs}
            part.copies = [(src, dst) for src, dst in self.copies if dst in mine]
            # Saves are not retried: the first try ran them before any decode, and a slot may
            # hold a restored entry since. Restores are: set_data replaces the whole slot.
            part.restores = [(slot, e) for slot, e in self.restores if slot in mine]
        return list(parts.values())

    @property
    def requests(self) -> set[Request]:
        return {r for r, _, _ in self.decodes} | {c.request for c in self.prefills}


class Scheduler:
    def __init__(self, slots: SlotPool, step_tokens: int, prefix_cache: bool = True,
                 host_cache: HostCache | None = None, window: int = 0) -> None:
        # Room for a decode token per slot, and for a prompt chunk of >= 2 tokens that never
        # leaves a single token behind (so every prompt makes progress).
        assert step_tokens >= slots.n + 2, "a step must fit a decode per slot and a 3-token chunk"
        self.slots = slots
        self.step_tokens = step_tokens
        self.prefix_cache = prefix_cache
        self.waiting: deque[Request] = deque()          # interactive, FIFO
        self.batch_waiting: deque[Request] = deque()    # batch priority, FIFO
        self.running: list[Request] = []
        self._truncations: list[tuple[int, int]] = []
        self._copies: list[tuple[int, int]] = []
        self._saves: list[tuple[int, tuple[int, ...], str]] = []
        self._restores: list[tuple[int, Entry]] = []
        self.host_cache = host_cache if prefix_cache else None
        self.window = window        # the model's sliding window (tokens; 0: none): see _floor
        self.reused_tokens = 0      # prompt tokens whose prefill a cached prefix saved, in all
        self.preemptions = 0        # batch requests sent back to restart, in all
        self._batch_turn = 0        # which batch decodes go next beside interactive work
        # Slots interactive requests held (or waited for) in this step and each of the last grace
        # steps: interactive traffic counts as present while any of them is non-zero.
        self._interactive_held: deque[int] = deque(maxlen=INTERACTIVE_GRACE_STEPS + 1)

    def add(self, req: Request) -> None:
        """Called when a request arrives (engine thread, from the inbox)."""
        (self.batch_waiting if req.batch else self.waiting).append(req)

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting or self.batch_waiting)

    def schedule(self) -> Batch | None:
        """Called once per engine step: admit what fits, then fill one batch."""
        self._admit()
        # Saves and restores are decided at admission, which always adds a prompt chunk, so
        # they never wait for a later batch (copies and truncations may).
        batch = Batch(truncations=self._truncations, copies=self._copies, saves=self._saves,
                      restores=self._restores)
        self._truncations, self._copies, self._saves, self._restores = [], [], [], []
        # In slot order: with a KV stream per sequence, llama.cpp puts only consecutive,
        # increasing sequence ids into one ubatch, and each ubatch reads all the weights again
        # (16 decodes in admission order cost 1.6-1.8x the same in slot order).
        decoding = every = [(req, seq) for req in self.running if not req.prefilling
                            for seq in req.seqs if not seq.finished]
        # Interactive traffic counts as present for a few steps after its last request left: a
        # client's next request arrives a moment after its last answer, and must not find a
        # full step of batch prompt under way.
        self._interactive_held.append(self._interactive_slots())
        interactive = any(self._interactive_held)
        batch_rows = self.step_tokens
        if interactive:
            # Beside interactive requests batch work gets BATCH_ROWS_BESIDE_INTERACTIVE rows a
            # step (decode tokens first, in turn, then prompt tokens), and none in a step that
            # prefills an interactive prompt: on a CPU a step's time grows with its rows, and an
            # interactive request waits for the step under way, then for its prompt's step.
            prefilling = any(not r.batch and r.prefilling for r in self.running)
            batch_rows = 0 if prefilling else BATCH_ROWS_BESIDE_INTERACTIVE
            decoding = self._batch_in_turn(decoding, batch_rows)
            batch_rows -= sum(1 for req, _ in decoding if req.batch)
        for req, seq in sorted(decoding, key=lambda rs: rs[1].slot):
            self._add_decode(batch, req, seq)
        scored = PROMPT_LOGITS_ROWS       # echo + logprobs rows this step may still take
        for req in self.running:          # interactive prompt chunks first, in arrival order
            if not req.batch and req.prefilling and len(batch.tokens) < self.step_tokens:
                scored -= self._add_prefill(batch, req, scored)
        budget = min(self.step_tokens, len(batch.tokens) + batch_rows)
        for req in self.running:
            if req.batch and req.prefilling and budget - len(batch.tokens) >= 2:
                scored -= self._add_prefill(batch, req, scored, budget)
        if not batch.tokens and every:         # never a step without progress (not expected)
            for req, seq in sorted(every, key=lambda rs: rs[1].slot):
                self._add_decode(batch, req, seq)
        if not batch.tokens:   # nothing to decode: KV work waits for the next batch
            self._truncations, self._copies = batch.truncations, batch.copies
            return None
        return batch

    def _batch_in_turn(self, decoding: list[tuple[Request, Sequence]], rows: int) -> list[tuple[Request, Sequence]]:
        """Every interactive decode, and `rows` of the batch ones, taken in turn from step to
        step so that every batch stream moves while interactive traffic lasts."""
        batch = [rs for rs in decoding if rs[0].batch]
        if len(batch) <= rows:
            return decoding
        start = self._batch_turn % len(batch)
        chosen = {id(rs[1]) for rs in (batch[start:] + batch[:start])[:rows]}
        self._batch_turn += rows
        return [rs for rs in decoding if not rs[0].batch or id(rs[1]) in chosen]

    def _admit(self) -> None:
        # FIFO per class: the head waits until its n slots are free, and nobody overtakes it. An
        # interactive head that does not fit takes slots from running batch requests if that
        # makes room; batch requests are admitted only while no interactive request waits.
        while True:
            if self.waiting:
                head = self.waiting[0]
                if head.n > self.slots.n_free:
                    if not self._preempt_for(head):
                        return
                self._start(self.waiting.popleft())
            elif self.batch_waiting and self.batch_waiting[0].n <= self.slots.n_free - self._spare():
                self._start(self.batch_waiting.popleft())
            else:
                return

    def _interactive_slots(self) -> int:
        return (sum(1 for r in self.running if not r.batch for seq in r.seqs if not seq.finished)
                + sum(r.n for r in self.waiting))

    def _spare(self) -> int:
        """Slots batch admission leaves free: those interactive requests held at most over the last
        grace steps and do not hold now, plus INTERACTIVE_SPARE_SLOTS. A closed-loop client's next
        request comes a moment after its last answer, and two clients whose answers ended in the
        same step would otherwise find their slots taken and both wait for a preemption. Only
        while something runs: the grace steps age only as steps come (a batch request held back
        with nothing running would wait for steps that never come)."""
        if not self.running:
            return 0
        now = self._interactive_slots()
        recent = max(now, *self._interactive_held) if self._interactive_held else now
        return recent - now + INTERACTIVE_SPARE_SLOTS if recent else 0

    def _preempt_for(self, head: Request) -> bool:
        """Free head.n slots by preempting running batch requests: first those whose slot holds
        the longest reusable prefix of the head's prompt (it takes that slot: what the batch
        request computed saves it prefill), then the youngest (the least work lost). None is
        preempted unless together they make enough room (else the head waits for interactive
        requests to finish, and batch work goes on meanwhile)."""
        held = lambda r: sum(1 for seq in r.seqs if not seq.finished)   # noqa: E731
        batch = [r for r in self.running if r.batch]
        if self.slots.n_free + sum(held(r) for r in batch) < head.n:
            return False
        reuse = self.prefix_cache and not head.wants_prompt_logprobs

        def affinity(r: Request) -> int:
            return max((self.slots.reusable_prefix(seq.slot, head.prompt_ids, head.cache_partition)
                        for seq in r.seqs if not seq.finished), default=0) if reuse else 0
        order = sorted(reversed(batch), key=affinity, reverse=True)    # stable: youngest first among equals
        victims = []
        for req in order:
            if self.slots.n_free + sum(held(v) for v in victims) >= head.n:
                break
            victims.append(req)
        victims.sort(key=lambda r: self.running.index(r), reverse=True)
        for req in victims:       # the oldest ends up first in its queue again, as it was
            self.running.remove(req)
            for seq in req.seqs:
                if not seq.finished:
                    # Its KV stays in the slot as a cache: the restart may reuse its prompt.
                    # A copy still queued into a sibling's slot runs before anything else
                    # touches that slot (runner order), so the pool's record of it holds.
                    self.slots.release(seq.slot)
            req.restart()
            self.batch_waiting.appendleft(req)
            self.preemptions += 1
        return True

    def _start(self, req: Request) -> None:
        reuse = self.prefix_cache and not req.wants_prompt_logprobs
        part = req.cache_partition
        slots, shared = self.slots.acquire(req.prompt_ids, req.n, reuse, part)
        entry, from_host = self.host_cache.best(req.prompt_ids, part) if reuse and self.host_cache else (None, 0)
        # Compute at least the last two prompt tokens: the last one's logits start the
        # generation, and a chunk of one token would take another kernel path than the
        # same prompt prefilled without a cache (see slots.reusable).
        keep = self.slots.cuttable(slots[0], max(0, min(shared, req.num_prompt - 2)))
        host_keep = min(from_host, req.num_prompt - 2)
        # A restore copies the entry's whole KV in: worth it only for as many tokens as a save is
        # (a prompt sharing just its BOS with an entry restored it, for one token).
        restore = entry is not None and host_keep - keep >= MIN_TOKENS and self._floor(entry) <= host_keep
        self._save_overwritten(slots, 0 if restore or not keep else shared)
        if restore:
            self._restore(slots[0], entry, from_host)
            keep = host_keep
        req.num_computed = keep
        req.cached_tokens = req.num_computed        # its usage says so (OpenAI's cached_tokens)
        self.reused_tokens += req.num_computed
        self._truncations.append((slots[0], req.num_computed))
        self.slots.truncate(slots[0], req.num_computed)
        for seq, slot in zip(req.seqs, slots):
            seq.slot = slot
            self.slots.claim(slot, part)
        for slot in slots[1:]:
            self.slots.forget(slot)     # refilled by a copy when the prompt is done
        req.set_status(RequestStatus.RUNNING)
        self.running.append(req)

    def _save_overwritten(self, slots: list[int], first_keeps: int) -> None:
        """Before a new prompt takes these slots, keep the prompt-computed prefixes it would
        overwrite in the host cache (the first slot keeps `first_keeps` of its tokens)."""
        if self.host_cache is None:
            return
        for i, slot in enumerate(slots):
            prefix = tuple(self.slots.cached[slot][: self.slots.reusable[slot]])
            part = self.slots.partition[slot]       # the slot's old owner's, not the new prompt's
            if len(prefix) > (first_keeps if i == 0 else 0) and self.host_cache.worth_saving(prefix, part):
                self._saves.append((slot, prefix, part))

    def _floor(self, entry: Entry) -> int:
        """The shortest prefix a restore of `entry` may be cut to. On a model with sliding-window
        layers, llama.cpp saves of those layers only the cells of the positions in the window of
        the entry's last one (llama_kv_cache::state_write), so an entry longer than the window
        can be cut at its last position at most: cut shorter, the next tokens' window would reach
        positions it lacks, and their logits would differ from a fresh prefill's
        (tests/local/test_window_restore.py). A prompt that continues the entry (a chat's next
        turn) restores it."""
        n = len(entry.tokens)
        return n - 1 if self.window and n > self.window else 0

    def _restore(self, slot: int, entry: Entry, shared: int) -> None:
        # set_data replaces the slot's whole KV: earlier truncations of it have no object.
        self._truncations = [(s, k) for s, k in self._truncations if s != slot]
        self._restores.append((slot, entry))
        self.slots.cached[slot] = list(entry.tokens)
        self.slots.reusable[slot] = len(entry.tokens)
        # ...and may not be cut below its last position again while it holds this KV.
        self.slots.floor[slot] = self._floor(entry)
        self.host_cache.use(entry, shared)

    def _add_decode(self, batch: Batch, req: Request, seq: Sequence) -> None:
        token = seq.output_ids[-1]
        row = batch.add(token, req.num_prompt + len(seq.output_ids) - 1, seq.slot, True)
        self.slots.append_decoded(seq.slot, token)
        batch.decodes.append((req, seq, row))

    def _add_prefill(self, batch: Batch, req: Request, scored: int, budget: int | None = None) -> int:
        """Add req's next prompt chunk, within `budget` tokens in the batch (the step's); returns
        the rows it scores (echo + logprobs), of the `scored` rows the step has left."""
        start = req.num_computed
        end = min(req.num_prompt, start + (self.step_tokens if budget is None else budget) - len(batch.tokens))
        if req.wants_prompt_logprobs:
            end = min(end, start + scored)
        # Chunks of one token take another kernel path than chunks of two or more: never cut
        # a prompt into one, whatever room this step has, so chunking never shows in the output.
        if req.num_prompt - end == 1:
            end -= 1
        if end - start < min(2, req.num_prompt - start):
            return 0
        slot = req.seqs[0].slot
        all_logits = req.wants_prompt_logprobs
        first = len(batch.tokens)
        for pos in range(start, end):
            batch.add(req.prompt_ids[pos], pos, slot, all_logits or pos == req.num_prompt - 1)
        self.slots.extend_prompt(slot, req.prompt_ids[start:end])
        batch.prefills.append(PrefillChunk(req, start, end, first))
        return end - start if all_logits else 0

    def prompt_done(self, req: Request) -> None:
        """Called after the step that computed a request's last prompt token: its siblings
        get copies of the prompt's KV before their first decode."""
        src = req.seqs[0].slot
        for seq in req.seqs[1:]:
            self._copies.append((src, seq.slot))
            self.slots.copy(src, seq.slot)

    def release(self, seq: Sequence) -> None:
        """Called when a sequence finishes: its slot (and KV, kept as cache) is free."""
        self.slots.release(seq.slot)

    def retire(self, req: Request, status: RequestStatus) -> None:
        """Called when a request is done, aborted or failed; frees any slots it still holds."""
        if req.status is RequestStatus.WAITING:
            (self.batch_waiting if req.batch else self.waiting).remove(req)
        elif req.status is RequestStatus.RUNNING:
            self.running.remove(req)
            for seq in req.seqs:
                if not seq.finished:
                    self.slots.release(seq.slot)
        req.set_status(status)

    def discard_kv(self, req: Request) -> None:
        """After a failed decode, nothing in this request's slots can be trusted."""
        for seq in req.seqs:
            if seq.slot >= 0 and not seq.finished:   # a finished choice's slot may be another's now
                self.slots.forget(seq.slot)

    def find(self, request_id: str) -> Request | None:
        for req in self.running:
            if req.id == request_id:
                return req
        for req in (*self.waiting, *self.batch_waiting):
            if req.id == request_id:
                return req
        return None
