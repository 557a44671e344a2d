"""The corpus sample the matcher tests walk: schemas under MAX_SCHEMA_CHARS (hypothesis-jsonschema
takes seconds to minutes on the large ones), with VALID valid and INVALID invalid instances each,
written the grammar's way. Building it takes a minute or two; it is cached under
~/.cache/modelyard/structured/, keyed by the package versions and this code, so later runs
read it in a second."""

from __future__ import annotations

import hashlib
import json
import os
from importlib import metadata
from pathlib import Path

import llguidance

from modelyard.engine.types import Constraint
from modelyard.errors import InvalidRequest
from modelyard.local.grammar import LIMITS, grammar_text
from modelyard.settings import Settings

from corpus import Entry, corpus, sample
from instances import grammar_json, invalid_instances, valid_instances

SAMPLE = 48
MAX_SCHEMA_CHARS = 30_000
VALID = 6
INVALID = 6
HERE = Path(__file__).parent


def _key() -> str:
    h = hashlib.sha256()
    for pkg in ("check-jsonschema", "kubernetes-validate", "hypothesis-jsonschema", "hypothesis", "jsonschema"):
        h.update(f"{pkg}={metadata.version(pkg)};".encode())
    for name in ("corpus.py", "instances.py", "cases.py"):
        h.update((HERE / name).read_bytes())
    return h.hexdigest()[:16]


def _text(x: object, schema: dict) -> str | None:
    text = grammar_json(x, schema)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:         # a lone surrogate: no model can write it
        return None
    return text


def build(entries: tuple[Entry, ...]) -> list[dict]:
    cases = []
    for e in entries:
        valid = valid_instances(e.schema, VALID)
        invalid = invalid_instances(e.schema, valid, INVALID)
        cases.append({"name": e.name,
                      "valid": [t for t in (_text(x, e.schema) for x in valid) if t is not None],
                      "invalid": [t for t in (_text(x, e.schema) for x in invalid) if t is not None]})
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


def cases() -> list[tuple[Entry, list[str], list[str]]]:
    """(entry, valid texts, invalid texts) for the sample, from the cache when it is there."""
    entries = walk_sample()
    cache = Settings().store_dir / "structured" / f"cases-{_key()}.json"
    if cache.exists():
        built = json.loads(cache.read_text())
    else:
        built = build(entries)
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(built, ensure_ascii=False))
        tmp.replace(cache)
    by_name = {c["name"]: c for c in built}
    return [(e, by_name[e.name]["valid"], by_name[e.name]["invalid"]) for e in entries]
