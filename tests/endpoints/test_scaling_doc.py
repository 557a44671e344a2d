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
