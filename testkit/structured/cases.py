"""The corpus sample the matcher tests walk: schemas under MAX_SCHEMA_CHARS (hypothesis-jsonschema
takes seconds to minutes on the large ones), with VALID valid and INVALID invalid instances each,
written the grammar's way.

Built once per test session, in memory (seconds): nothing is read from an earlier run. An
on-disk cache of these cases used to hide a bug that only a cold build showed (issue 18: the
build rewrote the shared schemas), so a machine with a warm ~/.cache passed and a fresh one did
not. The build is deterministic (hypothesis derandomized, pinned package versions)."""

from __future__ import annotations

import functools

import llguidance

from modelyard.engine.types import Constraint
from modelyard.errors import InvalidRequest
from modelyard.local.grammar import LIMITS, grammar_text

from testkit.structured.corpus import Entry, corpus, sample
from testkit.structured.instances import grammar_json, invalid_instances, valid_instances

SAMPLE = 48
MAX_SCHEMA_CHARS = 30_000
VALID = 6
INVALID = 6


def _text(x: object, schema: dict) -> str | None:
    text = grammar_json(x, schema)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:         # a lone surrogate: no model can write it
        return None
    return text


def build(entries: tuple[Entry, ...]) -> list[tuple[Entry, list[str], list[str]]]:
    cases = []
    for e in entries:
        schema = e.schema
        valid = valid_instances(schema, VALID)
        invalid = invalid_instances(schema, valid, INVALID)
        cases.append((e, [t for t in (_text(x, schema) for x in valid) if t is not None],
                      [t for t in (_text(x, schema) for x in invalid) if t is not None]))
    return cases


def strict_compiles(e: Entry) -> bool:
    """Compiles with strict on (no tokenizer needed): every keyword in it is enforced."""
    try:
        text = grammar_text(Constraint("json_schema", e.text, "schema", True))
    except InvalidRequest:
        return False
    is_error, _ = llguidance.LLMatcher.validate_grammar_with_warnings(text, limits=LIMITS)
    return not is_error


def walk_sample() -> tuple[Entry, ...]:
    """SAMPLE schemas, spread over the corpus, that compile with strict on (so that no keyword is
    ignored and an invalid instance must be refused)."""
    small = tuple(e for e in corpus() if len(e.text) < MAX_SCHEMA_CHARS and strict_compiles(e))
    return sample(small, SAMPLE)


@functools.lru_cache(maxsize=1)
def cases() -> list[tuple[Entry, list[str], list[str]]]:
    """(entry, valid texts, invalid texts) for the sample, built on first use in this session."""
    return build(walk_sample())
