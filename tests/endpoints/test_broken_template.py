"""A GGUF whose chat template does not compile (the real smollm2 file, its
`tokenizer.chat_template` rewritten) served over HTTP: the endpoint is ready, completions
work, and chat answers 400 naming the template's problem."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import httpx
import pytest

from testkit.servers import served

from modelyard import settings as settings_mod
from modelyard.store import ModelStore

pytestmark = pytest.mark.model

KEY = "tpl-key"
BROKEN = "{% for message in messages %}{{ message['content'] }}{% endfor"      # unclosed tag
_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}   # GGUF scalar types


def with_chat_template(src: Path, dst: Path, template: str) -> None:
    """Copy the GGUF `src` to `dst` with tokenizer.chat_template set to `template` (GGUF v3:
    header, key/values, tensor infos, padding to general.alignment, tensor data)."""
    data = src.read_bytes()
    magic, version, n_tensors, n_kv = struct.unpack_from("<4sIQQ", data, 0)
    assert magic == b"GGUF" and version == 3

    def skip_string(at: int) -> int:
        (n,) = struct.unpack_from("<Q", data, at)
        return at + 8 + n

    def skip_value(kind: int, at: int) -> int:
        if kind == 8:
            return skip_string(at)
        if kind == 9:
            item, count = struct.unpack_from("<IQ", data, at)
            at += 12
            if item in _SIZES:
                return at + _SIZES[item] * count
            for _ in range(count):
                at = skip_value(item, at)
            return at
        return at + _SIZES[kind]

    at, alignment = 24, 32
    kvs: list[bytes] = []
    for _ in range(n_kv):
        start = at
        (n,) = struct.unpack_from("<Q", data, at)
        key = data[at + 8:at + 8 + n].decode()
        at += 8 + n
        (kind,) = struct.unpack_from("<I", data, at)
        value_at = at + 4
        at = skip_value(kind, value_at)
        if key == "general.alignment":
            (alignment,) = struct.unpack_from("<I", data, value_at)
        if key != "tokenizer.chat_template":
            kvs.append(data[start:at])
    name, text = b"tokenizer.chat_template", template.encode()
    kvs.append(struct.pack("<Q", len(name)) + name + struct.pack("<IQ", 8, len(text)) + text)
    infos_start = at
    for _ in range(n_tensors):
        at = skip_string(at)
        (n_dims,) = struct.unpack_from("<I", data, at)
        at += 4 + 8 * n_dims + 4 + 8
    tensor_data = data[-(-at // alignment) * alignment:]
    head = struct.pack("<4sIQQ", magic, version, n_tensors, len(kvs)) + b"".join(kvs) + data[infos_start:at]
    dst.write_bytes(head + b"\0" * (-len(head) % alignment) + tensor_data)


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("broken-template")
    src = ModelStore(settings_mod.load(env=os.environ).store_dir, progress=False).resolve("smollm2-135m")
    model = tmp / "smol-broken-template.gguf"
    with_chat_template(src, model, BROKEN)
    cfg = (f'[server]\napi_keys = ["{KEY}"]\n\n[[endpoints]]\nname = "smol"\nmodel = "{model}"\n'
           "context = 256\nparallel = 1\nthreads = 1\n")
    with served(tmp, cfg, key=KEY) as s:
        yield s


def test_completions_work_and_chat_names_the_template(srv):
    ep = httpx.get(f"{srv.base}/api/v1/endpoints/smol", headers=srv.headers, timeout=10).json()
    assert ep["state"] == "ready", ep
    r = httpx.post(f"{srv.api}/completions", headers=srv.headers, timeout=60,
                   json={"model": "smol", "prompt": "The capital of France is", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["choices"][0]["text"], r.text
    r = httpx.post(f"{srv.api}/chat/completions", headers=srv.headers, timeout=60,
                   json={"model": "smol", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "messages" and err["code"] == "chat_template_error", err
    assert "chat template does not compile" in err["message"] and "/completions" in err["message"], err
