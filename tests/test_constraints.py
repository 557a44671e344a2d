"""The install is reproducible: every package pyproject.toml names (the server's and the tests')
is pinned in constraints/dev.txt, which scripts/install passes to pip, and this environment holds
exactly those versions. A dependency added without a pin, or an install that ignored the pins,
fails here instead of resolving to whatever is newest on a fresh machine."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:                                   # pragma: no cover - 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
CLIENTS = Path(os.environ.get("MODELYARD_CLIENTS_VENV", ROOT / ".venv-clients"))   # as scripts/install
BUILT_HERE = {"llama-cpp-python"}       # scripts/install builds it for this CPU, pinned there


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"{path.name}: {line!r} is not pinned with =="
            pins[_norm(name)] = version
    return pins


def _declared() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"]) + [r for extra in project["optional-dependencies"].values() for r in extra]
    return [r for r in reqs if "python_version < '3.11'" not in r or sys.version_info < (3, 11)]


def test_every_declared_dependency_is_pinned() -> None:
    pins = _pins(ROOT / "constraints" / "dev.txt")
    declared = {_norm(_name(r)) for r in _declared()} - BUILT_HERE
    assert len(declared) > 15
    assert sorted(declared - pins.keys()) == []


INSTALLED = "import json, importlib.metadata as m; print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))"


@pytest.mark.parametrize("lock, python", [("dev.txt", sys.executable),
                                          ("clients.txt", str(CLIENTS / "bin" / "python"))])
def test_each_environment_is_the_pinned_one(lock: str, python: str) -> None:
    """What scripts/install --dev put in the server's environment and in the real clients' one
    is what the lock says: every pinned package at its pinned version (the pins are in force,
    not only written down)."""
    pins = _pins(ROOT / "constraints" / lock)
    out = subprocess.run([python, "-c", INSTALLED], capture_output=True, text=True, check=True).stdout
    installed = {_norm(name): version for name, version in json.loads(out).items()}
    assert len(pins) > 20
    assert {n: (v, installed.get(n)) for n, v in pins.items() if installed.get(n) != v} == {}
