"""EngineCore.step(): schedule, execute, update. Runs on the engine's one thread."""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from ..engine.types import ChoiceDelta, EngineOutput, FinishReason, TokenLogprobs, Usage, token_text
from ..errors import DeadlineExceeded, EngineError, ModelyardError
from .request import Request, RequestStatus, Sequence
from .runner import Logits, Runner, Vocab
from .sampling import log_softmax_at, top_k
from .scheduler import Batch, PrefillChunk, Scheduler

Emit = Callable[[list[tuple[Request, object]]], None]   # (request, outputs list | exception)


def _engine_error(exc: Exception) -> ModelyardError:
    if isinstance(exc, ModelyardError):
        return exc
    return EngineError(f"generation failed: {type(exc).__name__}: {exc}")


class EngineCore:
    def __init__(self, scheduler: Scheduler, runner: Runner, vocab: Vocab, emit: Emit) -> None:
        self.scheduler = scheduler
        self.runner = runner
        self.vocab = vocab
        self.emit = emit
        self._out: dict[Request, list[EngineOutput]] = {}
        self._failed: list[tuple[Request, ModelyardError]] = []     # requests to fail after an update
        self._early: set[Request] = set()      # requests of this step updated as their call returned

    def step(self) -> bool:
        """One engine iteration; False when there was nothing to do."""
        self._expire_deadlines()
        batch = self.scheduler.schedule()
        if batch is None:
            return False
        self._early = set()
        if not self._run(batch):
            # Which request broke the decode is unknown: retry each alone, fail only the guilty.
            # Those whose prompt chunk had returned were updated (and answered) already.
            for part in batch.split():
                if not part.requests & self._early:
                    self._run(part, last_try=True)
        self._flush()
        return True

    def _run(self, batch: Batch, last_try: bool = False) -> bool:
        """Execute and update one batch; False if the decode failed and may be retried."""
        try:
            logits = self.runner.execute(batch, self._prefilled_early)
        except Exception as exc:  # a C failure must fail its requests, not the engine
            if not last_try and len(batch.requests - self._early) > 1:
                return False
            self._fail(batch, _engine_error(exc))
            return True
        try:
            self._update(batch, logits)
        except Exception as exc:  # a bug in one request's update: fail the batch, keep serving
            self._fail(batch, _engine_error(exc))
        return True

    def _prefilled_early(self, chunk: PrefillChunk, logits: Logits) -> None:
        """A prompt chunk's llama_decode returned, and the step's other calls have yet to run:
        update its request now and send what it has (a finished prompt's first token). Each
        chunk is a call of its own (runner), so a prompt's first token no longer waits for the
        other prompts of its step and their decodes: two prompts arriving together were both
        answered after both prefills (bench/batch_priority: 80 ms instead of 40)."""
        self._early.add(chunk.request)
        try:
            self._prefilled(chunk, logits)
        except Exception as exc:  # as in _run, but this request alone: fail it, keep serving
            self._failed.append((chunk.request, _engine_error(exc)))
        self._settle_failed()
        self._flush()

    def abort(self, request_id: str, error: ModelyardError | None = None) -> None:
        req = self.scheduler.find(request_id)
        if req is not None:
            self._retire(req, RequestStatus.ABORTED)
            if error is not None:
                self.emit([(req, error)])

    def _retire(self, req: Request, status: RequestStatus) -> None:
        """Every way a request ends passes here, so its ledger is settled however it ended: the
        prompt tokens prefilled (a reused prefix counts: the usage a finished request reports)
        and the tokens generated."""
        self.scheduler.retire(req, status)
        if req.on_end is not None:
            req.on_end(req.num_computed, req.num_output)

    # -- update -------------------------------------------------------------------------

    def _update(self, batch: Batch, logits: Logits) -> None:
        for chunk in batch.prefills:
            if chunk.request not in self._early:
                self._prefilled(chunk, logits)
        for req, seq, row in batch.decodes:
            self._advance(req, seq, logits(row))
        self._settle_failed()

    def _settle_failed(self) -> None:
        failed, self._failed = self._failed, []
        for req, error in failed:
            if req.status is RequestStatus.RUNNING:
                self._out.pop(req, None)
                self.scheduler.discard_kv(req)
                self.abort(req.id, error)

    def _prefilled(self, chunk: PrefillChunk, logits: Logits) -> None:
        req = chunk.request
        req.num_computed = chunk.end
        if req.wants_prompt_logprobs:
            self._score_prompt(chunk, logits)
        if not req.prefilling:
            self.scheduler.prompt_done(req)
            row = logits(chunk.first_row + chunk.end - 1 - chunk.start)
            for seq in req.seqs:
                self._advance(req, seq, row)

    def _advance(self, req: Request, seq: Sequence, row: np.ndarray) -> None:
        """Sample seq's next token from its logits row and turn it into a delta."""
        grammar_done = False
        if seq.matcher is not None:
            # The mask comes first: logit_bias, penalties, temperature and top_p act on the
            # tokens the grammar allows, and logprobs are the constrained distribution's.
            row = seq.matcher.masked(row)
            sample = seq.sampler.sample(row)
            if not seq.matcher.consume(sample.token):
                # It sampled from the mask, so this is llguidance disagreeing with itself: fail
                # this request alone (after the update), never hand out unconstrained text.
                self._failed.append((req, EngineError(
                    f"structured output failed: the grammar refused token {sample.token} ({seq.matcher.error})")))
            grammar_done = seq.matcher.done
        else:
            sample = seq.sampler.sample(row)
        seq.output_ids.append(sample.token)
        eog = self.vocab.is_eog(sample.token)
        start = seq.detok.length
        text = seq.detok.flush() if eog else seq.detok.push(self.vocab.piece(sample.token))
        if sample.logprob is not None and not eog:
            top = {token_text(self.vocab.piece(t)): lp for t, lp in sample.top}
            seq.pending.append((token_text(self.vocab.piece(sample.token)), start, sample.logprob, top))
        out, stopped = seq.stop.push(text)
        if not stopped and (eog or grammar_done or len(seq.output_ids) >= req.max_tokens):
            tail, stopped = seq.stop.push(seq.detok.flush()) if not eog else ("", False)
            out += tail + ("" if stopped else seq.stop.flush())
        if stopped or eog or grammar_done:
            seq.finish = FinishReason.STOP
        elif len(seq.output_ids) >= req.max_tokens:
            seq.finish = FinishReason.LENGTH
        self._deliver(req, seq, out, stopped)

    def _deliver(self, req: Request, seq: Sequence, text: str, cut: bool) -> None:
        first = seq.emitted == 0 and len(seq.output_ids) == 1
        seq.emitted += len(text)
        lp = self._release_logprobs(req, seq, cut)
        if first and req.echo_text is not None:
            text = req.echo_text + text
            if req.prompt_logprobs is not None and lp is not None:
                echoed = TokenLogprobs(**{k: list(v) for k, v in req.prompt_logprobs.as_dict().items()})
                echoed.extend(lp)
                lp = echoed
        if text or seq.finish or (lp and lp.tokens):
            self._out.setdefault(req, []).append(ChoiceDelta(seq.index, text, lp, seq.finish,
                                                             stop_sequence=seq.stop.matched if cut else None))
        if seq.finished:
            self.scheduler.release(seq)
            if req.done:
                self._retire(req, RequestStatus.FINISHED)
                self._out.setdefault(req, []).append(Usage(req.num_prompt, req.num_output, req.cached_tokens))

    def _release_logprobs(self, req: Request, seq: Sequence, cut: bool) -> TokenLogprobs | None:
        """Logprobs travel with the text they belong to: a token's entry is sent once text
        from its start on has been sent; entries of a stop string's tokens are dropped."""
        if seq.sampler.params.logprobs is None:
            return None
        shift = len(req.echo_text) if req.echo_text is not None else 0
        everything = seq.finished and not cut
        ready = [e for e in seq.pending if everything or e[1] < seq.emitted]
        seq.pending = [] if seq.finished else seq.pending[len(ready):]
        return TokenLogprobs([e[0] for e in ready], [e[2] for e in ready], [e[3] for e in ready],
                             [e[1] + shift for e in ready])

    def _score_prompt(self, chunk: PrefillChunk, logits: Logits) -> None:
        """echo + logprobs: each prompt token's logprob given the tokens before it."""
        req = chunk.request
        lp = req.prompt_logprobs
        k = req.seqs[0].sampler.params.logprobs or 0
        for pos in range(chunk.start, chunk.end):
            if pos == 0:
                lp.token_logprobs.append(None)
                lp.top_logprobs.append(None)
                continue
            row = logits(chunk.first_row + pos - 1 - chunk.start) if pos > chunk.start else req.last_prompt_row
            token = req.prompt_ids[pos]
            ids = np.append(top_k(row, k), token) if k else np.array([token])
            lps = log_softmax_at(row, ids)
            lp.token_logprobs.append(float(lps[-1]))
            # the k best, then the prompt's own token if it is not among them (as for samples)
            top = {token_text(self.vocab.piece(int(t))): float(v) for t, v in zip(ids[:-1], lps[:-1])}
            if token not in ids[:-1]:
                top[token_text(self.vocab.piece(token))] = float(lps[-1])
            lp.top_logprobs.append(top)
        req.last_prompt_row = logits(chunk.first_row + chunk.end - 1 - chunk.start).copy()

    # -- failure, deadlines, output ----------------------------------------------------

    def _fail(self, batch: Batch, error: ModelyardError) -> None:
        for req in batch.requests - self._early:    # those answered already stand
            if req.status is RequestStatus.RUNNING:
                self.scheduler.discard_kv(req)
                self._retire(req, RequestStatus.ABORTED)
            self._out.pop(req, None)
            self.emit([(req, error)])

    def _expire_deadlines(self) -> None:
        now = time.monotonic()
        for req in [*self.scheduler.running, *self.scheduler.waiting, *self.scheduler.batch_waiting]:
            if req.deadline is not None and now >= req.deadline:
                self.abort(req.id, DeadlineExceeded(
                    f"request {req.id} exceeded its deadline after {now - req.arrival:.1f}s"))

    def _flush(self) -> None:
        if self._out:
            out = []
            for req, items in self._out.items():
                if req.batch:
                    # Held back until it finishes: a preempted batch request restarts from zero
                    # (Scheduler._preempt_for), and what it emitted before must not reach anyone.
                    req.held.extend(items)
                    if req.status is not RequestStatus.FINISHED:
                        continue
                    items, req.held = req.held, []
                out.append((req, items))
            self._out = {}
            if out:
                self.emit(out)
