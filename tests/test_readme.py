"""The README's examples run, as written, against a live server (only its address and key
are substituted), so the docs cannot rot."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from testkit.servers import served
from testkit.until import until

pytestmark = pytest.mark.model

README = (Path(__file__).parent.parent / "README.md").read_text()
CONTROL_PLANE = (Path(__file__).parent.parent / "docs" / "control-plane.md").read_text()
DEFAULT_BASE = "http://127.0.0.1:8000"


def block(lang: str, containing: str = "", doc: str = README) -> str:
    found = [b for b in re.findall(rf"```{lang}\n(.*?)```", doc, re.S) if containing in b]
    assert found, f"the doc has no ```{lang} example" + (f" with {containing!r}" if containing else "")
    return found[0]


def test_readme_names_exactly_two_setup_commands():
    setup = README.split("## Set up", 1)[1].split("##", 1)[0]
    commands = [line.strip() for line in setup.splitlines() if line.startswith("    ")]
    assert commands == ["scripts/install && .venv/bin/modelyard serve",
                        "scripts/install --dev && .venv/bin/python -m pytest"]
    ci = (Path(__file__).parent.parent / ".ci" / "run").read_text()
    assert "scripts/install --dev" in ci and ".venv/bin/python -m pytest" in ci


def test_curl_example(server):
    script = block("sh").replace(DEFAULT_BASE, server.base)
    script = script.replace("curl -s ", f"curl -s -H 'Authorization: Bearer {server.key}' ", 1)
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120)
    body = json.loads(out.stdout)
    assert body["object"] == "text_completion" and body["model"] == "smollm2-135m"
    assert body["usage"]["completion_tokens"] == 8 and body["choices"][0]["text"]


def test_openai_example(server):
    code = block("python").replace(DEFAULT_BASE, server.base).replace('api_key="none"', f'api_key="{server.key}"')
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    first_line = out.stdout.splitlines()[0]
    assert "Paris" in first_line
    assert len(out.stdout) > len(first_line) + 10   # the streamed story followed


def test_anthropic_example(server):
    code = block("python", "import anthropic").replace(DEFAULT_BASE, server.base)
    code = code.replace('api_key="none"', f'api_key="{server.key}"')
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    # the reply's text in repr: one line, whatever the (sampled) answer holds
    reason, tokens, text = out.stdout.splitlines()[0].split(" ", 2)
    assert ast.literal_eval(text).strip() and reason in ("end_turn", "max_tokens") and int(tokens) > 0
    assert len(out.stdout.splitlines()[0]) < len(out.stdout)      # the streamed story followed


def test_responses_example(server):
    code = block("python", "previous_response_id").replace(DEFAULT_BASE, server.base)
    code = code.replace('api_key="none"', f'api_key="{server.key}"')
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    found = re.search(r"^resp_\w+ (\d+)\n(.+)", out.stdout, re.M | re.S)
    assert found and int(found.group(1)) > 0 and found.group(2).strip(), out.stdout   # the chain, then the story


def test_structured_output_example(server):
    code = block("python", "response_format").replace(DEFAULT_BASE, server.base)
    code = code.replace('api_key="none"', f'api_key="{server.key}"')
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    city, call = out.stdout.splitlines()
    assert set(ast.literal_eval(city)) == {"name", "country"}
    assert call.startswith("get_weather {'city': ")


def test_control_plane_example(tmp_path):
    """docs/control-plane.md's model-endpoints commands, as written, against a server with its admin token."""
    script = block("sh", "model-endpoints", CONTROL_PLANE)
    token = re.search(r"Bearer (\S+)'", script).group(1)
    cfg = (f'[server]\napi_keys = ["sk-readme"]\n\n[[admin_tokens]]\nname = "readme"\ntoken = "{token}"\n\n'
           f'[[endpoints]]\nname = "smollm2-135m"\ncontext = 256\nparallel = 1\nthreads = 1\n')
    with served(tmp_path, cfg, key="sk-readme") as srv:
        out = subprocess.run(["bash", "-c", script.replace(DEFAULT_BASE, srv.base)], capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        answers, text, decoder = [], out.stdout.strip(), json.JSONDecoder()
        while text:
            obj, end = decoder.raw_decode(text)
            answers.append(obj)
            text = text[end:].strip()
        got, unloaded, deleted = answers
        assert got["name"] == "small" and got["state"] in ("loading", "ready") and got["config"]["parallel"] == 4
        assert unloaded["desired"] == "unloaded" and deleted["desired"] == "deleted"
        until(lambda: "small" not in {e["name"] for e in httpx.get(  # it drains, then it is gone
            f"{srv.base}/api/v1/control/model-endpoints", headers={"Authorization": f"Bearer {token}"}).json()["data"]},
              30, "the deleted endpoint gone from the list")


def test_batches_example(server):
    code = block("python", "client.batches.create").replace(DEFAULT_BASE, server.base)
    code = code.replace('api_key="none"', f'api_key="{server.key}"')
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "completed 3", out.stdout
    # each answer's custom_id, then its text (which may hold line breaks of its own)
    assert sorted(re.findall(r"^(q\d) ", out.stdout, re.M)) == ["q0", "q1", "q2"], out.stdout
