"""The command line: pull, models, and serve's refusal to expose an unauthenticated server."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys


def run(*args: str, home) -> subprocess.CompletedProcess:
    env = {**os.environ, "MODELYARD_HOME": str(home)}
    env.pop("MODELYARD_API_KEYS", None)
    return subprocess.run([sys.executable, "-m", "modelyard", *args], capture_output=True, text=True,
                          env=env, timeout=60)


def test_models_on_an_empty_store_says_how_to_pull(tmp_path):
    out = run("models", home=tmp_path)
    assert out.returncode == 0 and "modelyard pull smollm2-135m" in out.stdout


def test_pull_a_local_file_prints_its_digest(tmp_path):
    model = tmp_path / "tiny.gguf"
    model.write_bytes(b"GGUF" + b"\0" * 60)
    out = run("pull", str(model), home=tmp_path / "store")
    assert out.returncode == 0, out.stderr
    assert hashlib.sha256(model.read_bytes()).hexdigest() in out.stdout


def test_pull_errors_name_the_file_and_exit_2(tmp_path):
    out = run("pull", str(tmp_path / "missing.gguf"), home=tmp_path)
    assert out.returncode == 2 and "missing.gguf" in out.stderr


def test_serve_refuses_a_public_address_without_keys(tmp_path):
    out = run("serve", "--host", "0.0.0.0", "--port", "1", home=tmp_path)
    assert out.returncode == 2 and "--insecure-no-auth" in out.stderr
