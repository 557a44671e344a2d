"""Every ```toml block in docs/scaling.md is a config modelyard accepts: it loads with
modelyard.settings.load, passes the check `modelyard serve` makes before binding (no keyless
server beyond loopback), and every engine = "openai" endpoint lists its urls."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from modelyard import settings as settings_mod
from modelyard.errors import ConfigError

DOC = Path(__file__).resolve().parents[2] / "docs" / "scaling.md"
FENCE = re.compile(r"^```toml[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


def toml_blocks(text: str | None = None) -> list[tuple[str, str]]:
    """(label, text) per block; the label names the block by number, line and first line."""
    text = DOC.read_text() if text is None else text
    blocks = []
    for i, m in enumerate(FENCE.finditer(text), 1):
        line = text.count("\n", 0, m.start()) + 1
        first = next((ln for ln in m.group(1).splitlines() if ln.strip()), "")
        blocks.append((f"block {i} (docs/scaling.md line {line}: {first[:60]!r})", m.group(1)))
    return blocks


BLOCKS = toml_blocks()


def test_the_doc_has_example_configs():
    assert len(BLOCKS) >= 4, f"expected several ```toml examples in {DOC}, found {len(BLOCKS)}"


@pytest.mark.parametrize("label, body", BLOCKS, ids=[label.split(" (")[0].replace(" ", "") for label, _ in BLOCKS])
def test_block_is_a_valid_config(label, body, tmp_path):
    path = tmp_path / "example.toml"
    path.write_text(body)
    try:
        doc = tomllib.loads(body)
    except tomllib.TOMLDecodeError as exc:
        pytest.fail(f"{label} is not TOML: {exc}")
    try:
        settings = settings_mod.load(path, env={})      # env={}: only the block counts
        settings.check_auth_policy()
    except ConfigError as exc:
        pytest.fail(f"{label} does not load: {exc}")
    assert settings.endpoints, f"{label} has no [[endpoints]]"
    raw = {e["name"]: e for e in doc.get("endpoints", [])}
    for spec in settings.endpoints:
        if spec.engine == "openai":
            assert raw[spec.name].get("urls"), f"{label}: endpoint {spec.name!r} (engine openai) has no urls"
            assert spec.urls and all(u.startswith(("http://", "https://")) for u in spec.urls), \
                f"{label}: endpoint {spec.name!r} urls must be http(s) base URLs, got {spec.urls}"


def test_a_broken_block_is_named(tmp_path):
    """The failure message names the block, so a bad example is easy to find."""
    bad = "Intro.\n\n```toml\n[[endpoints]]\nname = \"x\"\nengine = \"openai\"\n```\n"
    [(label, body)] = toml_blocks(bad)
    assert label == "block 1 (docs/scaling.md line 3: '[[endpoints]]')"
    with pytest.raises(pytest.fail.Exception, match=r"block 1 .*needs urls"):
        test_block_is_a_valid_config(label, body, tmp_path)


def test_documented_metrics_exist():
    """Every modelyard_* series the page names is one metrics.py exports (a counter by its name
    or with `_total`), and the engines' load series are the ones proxy/load reads."""
    from modelyard import metrics
    from modelyard.proxy.load import LOAD_SERIES

    source = Path(metrics.__file__).read_text()
    exported = {f"modelyard_replica_{k}" for k in (*metrics.REPLICA_SERIES, *metrics.REPLICA_CACHE_SERIES)}
    exported |= {f"modelyard_endpoint_{k}" for k in metrics.LIFECYCLE_SERIES}
    exported |= {f"modelyard_{k}" for k in metrics.GRAMMAR_COUNTERS}
    exported |= set(re.findall(r'"(modelyard_[a-z_]+)"', source))
    text = DOC.read_text()
    named = set(re.findall(r"\b(modelyard_[a-z_]+)\b", text))
    assert {"modelyard_replica_load", "modelyard_replica_overload_spills_total"} <= named
    missing = sorted(n for n in named if n not in exported and n.removesuffix("_total") not in exported)
    assert not missing, f"docs/scaling.md names metrics nobody exports: {missing}"
    for series in LOAD_SERIES.values():
        for name in series:
            assert f"`{name}`" in text, f"docs/scaling.md does not name the load series {name}"
    engine_series = set(re.findall(r"`((?:vllm|sglang|llamacpp):[a-z_]+)`", text))
    read = {n for series in LOAD_SERIES.values() for n in series}
    assert engine_series <= read, f"documented but not read: {sorted(engine_series - read)}"
