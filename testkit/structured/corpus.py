"""A corpus of real-world JSON schemas, read at test time from installed packages (nothing is
vendored here; tests/structured/README.md lists the sources and their licences):

- SchemaStore's schemas as vendored in `check-jsonschema` (CI configs, compose, dependabot, ...);
  those under a copyleft licence (Renovate: AGPL-3.0, Snapcraft: GPL-3.0) and those that refer to
  a file beside them (drone-ci) are left out.
- Kubernetes' API schemas from `kubernetes-validate` (one version, the strict variant: no
  unknown fields), each bundled into one self-contained document with the `$defs` it reaches.

`corpus()` is deterministic: the same schemas in the same order on every machine with the same
package versions (pinned in pyproject.toml).
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any, Iterator

K8S_VERSION = "v1.37.0-local-strict"
SCHEMASTORE_LEFT_OUT = {
    "renovate.json": "AGPL-3.0",
    "snapcraft.json": "GPL-3.0",
    "drone-ci.json": "refers to kubernetes-definitions.json, a file not shipped beside it",
}
K8S_LEFT_OUT = {"_definitions.json", "all.json"}     # the shared definitions, and a oneOf of every kind
K8S_REF = "/api/_definitions.json#/$defs/"


@dataclass(frozen=True)
class Entry:
    """One schema of the corpus, held as its JSON text: `schema` parses a fresh copy on every
    read. corpus() is cached for the session, and a shared dict is not safe to hand out:
    hypothesis-jsonschema's from_schema rewrites the schema it is given in place (it adds
    `not` keywords while canonicalising), which made every later test see other schemas than
    the corpus holds (strict compiles then failed on `not`: issue 18)."""

    name: str           # "schemastore/codecov", "k8s/pod-v1"
    text: str           # compact JSON

    @classmethod
    def of(cls, name: str, schema: dict) -> "Entry":
        return cls(name, json.dumps(schema, separators=(",", ":")))

    @property
    def schema(self) -> dict:
        return json.loads(self.text)


def _schemastore() -> Iterator[Entry]:
    root = resources.files("check_jsonschema.builtin_schemas")
    for folder in ("vendor", "custom"):
        for f in sorted(root.joinpath(folder).iterdir(), key=lambda p: p.name):
            if f.name.endswith(".json") and f.name not in SCHEMASTORE_LEFT_OUT:
                yield Entry.of(f"schemastore/{f.name[:-5]}", json.loads(f.read_text()))


def _k8s_root():
    return resources.files("kubernetes_validate").joinpath("kubernetes-json-schema", K8S_VERSION)


@functools.lru_cache(maxsize=1)
def _k8s_defs() -> dict[str, Any]:
    return json.loads(_k8s_root().joinpath("_definitions.json").read_text())["$defs"]


def _rewrite(node: Any, reached: set[str]) -> Any:
    """`node` with references into _definitions.json made local (#/$defs/...), noting each name."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k == "$ref" and isinstance(v, str):
                for prefix in (K8S_REF, "#/$defs/"):
                    if v.startswith(prefix):
                        reached.add(v[len(prefix):])
                        v = "#/$defs/" + v[len(prefix):]
            out[k] = _rewrite(v, reached)
        return out
    if isinstance(node, list):
        return [_rewrite(v, reached) for v in node]
    return node


def bundle_k8s(schema: dict) -> dict:
    """One self-contained schema: the document, with every definition it reaches under $defs."""
    defs = _k8s_defs()
    todo: set[str] = set()
    out = _rewrite(schema, todo)
    bundled: dict[str, Any] = {}
    while todo:
        name = todo.pop()
        if name not in bundled:
            more: set[str] = set()
            bundled[name] = _rewrite(defs[name], more)
            todo |= more - set(bundled)
    out.pop("$id", None)
    if bundled:
        out["$defs"] = dict(sorted(bundled.items()))
    return out


def _k8s() -> Iterator[Entry]:
    for f in sorted(_k8s_root().iterdir(), key=lambda p: p.name):
        if f.name.endswith(".json") and f.name not in K8S_LEFT_OUT:
            yield Entry.of(f"k8s/{f.name[:-5]}", bundle_k8s(json.loads(f.read_text())))


@functools.lru_cache(maxsize=1)
def corpus() -> tuple[Entry, ...]:
    return tuple(_schemastore()) + tuple(_k8s())


def sample(entries: tuple[Entry, ...], n: int) -> tuple[Entry, ...]:
    """Every len/n-th entry: a spread over both sources, the same each run."""
    step = max(1, len(entries) // n)
    return entries[::step][:n]
