"""Valid and invalid instances of a JSON schema, deterministic: valid ones drawn by
hypothesis-jsonschema (derandomized), invalid ones made from those by one mutation each and
kept only where `jsonschema` says the result is invalid. Plus `grammar_json`, which writes an
instance the way modelyard's grammar does (local/grammar.JSON_OPTIONS).
"""

from __future__ import annotations

import copy
import json
import re
import warnings
from typing import Any, Iterator

import jsonschema
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.internal.conjecture import utils as cu
from hypothesis_jsonschema import _from_schema, from_schema


class _Many:
    """hypothesis-jsonschema 0.23.1 (its latest release) drives Hypothesis's internal `many`
    with `while elements.more(): ...`; Hypothesis 6.15x+ replaced that with a context manager
    iterated once. This is the old interface on top of the new one."""

    def __init__(self, data: Any, **kw: Any) -> None:
        self._many = cu.many(data, **kw)
        self._many.__enter__()
        self._it = iter(self._many)

    def more(self) -> bool:
        try:
            next(self._it)
            return True
        except StopIteration:
            self._many.__exit__(None, None, None)
            return False

    def reject(self, why: str | None = None) -> None:
        self._many.reject(why)


if not hasattr(cu.many, "more"):
    _from_schema.cu = type("cu", (), {"many": _Many})     # only the module's own reference


def validator(schema: dict) -> jsonschema.protocols.Validator:
    cls = jsonschema.validators.validator_for(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def valid_instances(schema: dict, n: int) -> list[Any]:
    """Up to n distinct instances valid under `schema` (fewer if hypothesis-jsonschema cannot
    model it: recursive $refs, some regexes); the same ones on every run."""
    out: list[Any] = []
    seen: set[str] = set()
    check = validator(schema)
    # from_schema rewrites the schema it is given in place: it gets its own copy
    strategy = from_schema(copy.deepcopy(schema))

    @settings(derandomize=True, max_examples=n, database=None, deadline=None,
              suppress_health_check=list(HealthCheck), phases=[Phase.generate])
    @given(strategy)
    def collect(x: Any) -> None:
        key = json.dumps(x, sort_keys=True)
        if key not in seen and check.is_valid(x):
            seen.add(key)
            out.append(x)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            collect()
        except Exception:       # noqa: BLE001 - hypothesis-jsonschema does not model every schema
            pass                # (recursive $refs, some regexes): what it drew before stands
    return out


WRONG_TYPES = (None, True, 0, 1.5, "x", [], {})


def _mutations(x: Any) -> Iterator[Any]:
    """One-change variants of x: a value of each other type at the root, each object member
    dropped, an extra member, each element dropped, each leaf replaced; nested one level down."""
    for w in WRONG_TYPES:
        if type(w) is not type(x):
            yield w
    if isinstance(x, dict):
        for k in x:
            yield {kk: v for kk, v in x.items() if kk != k}
        yield {**x, "zz_unexpected": 1}
        for k, v in x.items():
            for m in _mutations_shallow(v):
                yield {**x, k: m}
    elif isinstance(x, list):
        if x:
            yield x[1:]
        yield x + [x[0] if x else None, {"zz": 1}]
        for i, v in enumerate(x):
            for m in _mutations_shallow(v):
                yield x[:i] + [m] + x[i + 1:]
    elif isinstance(x, str):
        yield x + "\u00e9~ZZ"
        yield ""
    elif isinstance(x, bool):
        yield not x
    elif isinstance(x, (int, float)):
        yield x + 1
        yield -x - 1e9
        yield x + 0.5


def _mutations_shallow(v: Any) -> Iterator[Any]:
    for w in WRONG_TYPES:
        if type(w) is not type(v):
            yield w
    if isinstance(v, dict):
        for k in v:
            yield {kk: vv for kk, vv in v.items() if kk != k}
        yield {**v, "zz_unexpected": 1}
    elif isinstance(v, str):
        yield v + "\u00e9~ZZ"
    elif isinstance(v, (int, float)) and not isinstance(v, bool):
        yield v + 0.5
        yield -v - 1e9


def invalid_instances(schema: dict, valid: list[Any], n: int) -> list[Any]:
    """Up to n distinct instances one mutation away from a valid one and invalid under `schema`."""
    check = validator(schema)
    out: list[Any] = []
    seen: set[str] = set()
    for x in valid:
        for m in _mutations(x):
            key = json.dumps(m, sort_keys=True)
            if key not in seen and not check.is_valid(m):
                seen.add(key)
                out.append(m)
                if len(out) >= n:
                    return out
    return out


# -- writing JSON the grammar's way ---------------------------------------------------------------

def _dumps(v: Any) -> str:
    # llguidance's JSON strings take characters as UTF-8, and escapes only for what must be
    # escaped: a "\u00e9" is refused (the model writes "é"), and so is a raw DEL (U+007F),
    # which JSON allows but llguidance wants escaped.
    return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")


def grammar_json(x: Any, schema: dict) -> str:
    """`x` as the grammar writes it: ", " and ": " separators, no other whitespace, strings as
    in _dumps, and each object's members in the order its schema declares them (llguidance
    keeps `properties` order; members the schema does not name follow, in the instance's order)."""
    root = schema

    def resolve(s: Any) -> Any:
        for _ in range(64):                   # a chain of $refs, bounded
            if not (isinstance(s, dict) and isinstance(s.get("$ref"), str) and s["$ref"].startswith("#")):
                return s
            target: Any = root
            for part in s["$ref"][1:].split("/")[1:]:
                part = part.replace("~1", "/").replace("~0", "~")
                target = target[int(part)] if isinstance(target, list) else target[part]
            s = target
        return s

    def order(s: Any, value: dict, depth: int = 0) -> list[str]:
        """Property names in declaration order for `value` under `s` (allOf merged, the first
        anyOf/oneOf branch that `value` satisfies)."""
        s = resolve(s)
        if not isinstance(s, dict) or depth > 32:
            return []
        names = list(s.get("properties", {}))
        for sub in s.get("allOf", []):
            names += [k for k in order(sub, value, depth + 1) if k not in names]
        for key in ("anyOf", "oneOf"):
            for sub in s.get(key, []):
                if _matches(sub, value):
                    names += [k for k in order(sub, value, depth + 1) if k not in names]
                    break
        return names

    def _matches(sub: Any, value: Any) -> bool:
        try:
            target = resolve(sub)
            if isinstance(target, bool):
                return target
            defs = {k: root[k] for k in ("$defs", "definitions", "$schema") if k in root}
            return validator({**defs, **target}).is_valid(value)
        except (jsonschema.exceptions.SchemaError, jsonschema.exceptions.RefResolutionError, TypeError):
            return False

    def subschema_for(s: Any, key: str, value: dict) -> list[Any]:
        s = resolve(s)
        if not isinstance(s, dict):
            return []
        found = []
        if key in s.get("properties", {}):
            found.append(s["properties"][key])
        for sub in s.get("allOf", []):
            found += subschema_for(sub, key, value)
        for k in ("anyOf", "oneOf"):
            for sub in s.get(k, []):
                if _matches(sub, value):
                    found += subschema_for(sub, key, value)
                    break
        if not found:
            for pattern, sub in s.get("patternProperties", {}).items():
                if re.search(pattern, key):
                    found.append(sub)
            if not found and isinstance(s.get("additionalProperties"), dict):
                found.append(s["additionalProperties"])
        return found

    def items_for(s: Any, i: int, value: list) -> list[Any]:
        s = resolve(s)
        if not isinstance(s, dict):
            return []
        found = []
        prefix = s.get("prefixItems") or (s.get("items") if isinstance(s.get("items"), list) else None)
        if prefix is not None and i < len(prefix):
            found.append(prefix[i])
        elif isinstance(s.get("items"), dict):
            found.append(s["items"])
        for sub in s.get("allOf", []):
            found += items_for(sub, i, value)
        for k in ("anyOf", "oneOf"):
            for sub in s.get(k, []):
                if _matches(sub, value):
                    found += items_for(sub, i, value)
                    break
        return found

    def write(v: Any, schemas: list[Any]) -> str:
        if isinstance(v, dict):
            names: list[str] = []
            for s in schemas:
                names += [k for k in order(s, v) if k not in names]
            keys = [k for k in names if k in v] + [k for k in v if k not in names]
            return "{" + ", ".join(
                _dumps(k) + ": " + write(v[k], [sub for s in schemas for sub in subschema_for(s, k, v)])
                for k in keys) + "}"
        if isinstance(v, list):
            return "[" + ", ".join(write(e, [sub for s in schemas for sub in items_for(s, i, v)])
                                   for i, e in enumerate(v)) + "]"
        return _dumps(v)

    return write(x, [schema])
