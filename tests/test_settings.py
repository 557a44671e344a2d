"""Settings: parsed once from TOML + env + flags, frozen, validated with errors naming the key."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

import modelyard
from modelyard.errors import ConfigError
from modelyard import settings as settings_mod
from modelyard.settings import DEFAULT_MODEL, EndpointSpec, load


def write(tmp_path, text: str):
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_defaults_serve_the_default_model_on_loopback():
    s = load(env={})
    assert (s.host, s.port) == ("127.0.0.1", 8000)
    assert [e.name for e in s.endpoints] == [DEFAULT_MODEL]
    assert s.endpoints[0].model == DEFAULT_MODEL and s.loopback


def test_config_file_env_and_flags_in_rising_priority(tmp_path):
    cfg = write(tmp_path, """
[server]
host = "127.0.0.2"
port = 9000
api_keys = ["k1"]
[[endpoints]]
name = "a"
model = "/m/a.gguf"
context = 1024
parallel = 4
[[endpoints]]
name = "b"
engine = "openai"
urls = ["http://127.0.0.1:1/v1"]
""")
    s = load(cfg, env={"MODELYARD_API_KEYS": "k2, k3"}, port=9001)
    assert s.host == "127.0.0.2" and s.port == 9001
    assert s.api_keys == ("k1", "k2", "k3")
    assert [(e.name, e.engine, e.context, e.parallel) for e in s.endpoints] == [
        ("a", "llamacpp", 1024, 4), ("b", "openai", 2048, 16)]
    assert s.endpoints[1].urls == ("http://127.0.0.1:1/v1",)


def test_model_flag_serves_that_one_model(tmp_path):
    s = load(env={}, model=str(tmp_path / "tiny.gguf"))
    assert [(e.name, e.model) for e in s.endpoints] == [("tiny", str(tmp_path / "tiny.gguf"))]


@pytest.mark.parametrize("text, words", [
    ('[[endpoints]]\nname = "a"\nbogus = 1', "bogus"),
    ('[[endpoints]]\nname = "a"\nengine = "vllm"', "engine"),
    ('[[endpoints]]\nname = "a"\ncontext = 0', "context"),
    ('[[endpoints]]\nname = "a"\nengine = "openai"', "urls"),
    ('[[endpoints]]\nname = "a"\n[[endpoints]]\nname = "a"', "unique"),
    ('[[keys]]\nkey = "sha256:abc"', "64 hex"),
    ('[[keys]]\nkey = "sk-a"\nendpoints = "one"', "list of endpoint names"),
    ('[[keys]]\nkey = "sk-a"\nendpoints = [""]', "list of endpoint names"),
    ("not toml [", "cannot read"),
    ('[server]\npublic_cache_counters = "yes"', "public_cache_counters must be true or false"),
    ('[server]\nprefix_cache_scope = "endpoint"', "prefix_cache_scope must be one of"),
    ('[[endpoints]]\nname = "' + "n" * 257 + '"', "257 characters, above the limit of 256"),
    ('[[endpoints]]\nname = "r"\nengine = "openai"\nurls = ["http://169.254.169.254/v1"]', "link-local"),
    ('[server]\nallow_private_upstreams = 1', "allow_private_upstreams must be true or false"),
    ('[server]\nmax_file_bytes = 0', "max_file_bytes must be a whole number from 1"),
    ('[server]\nmax_batch_lines = 2000000', "max_batch_lines must be a whole number from 1 to 1000000"),
    ('[server]\nbatch_lease_seconds = 1', "batch_lease_seconds must be from 2.0"),
    ('[server]\nbatch_concurrency = 0', "batch_concurrency must be a whole number"),
])
def test_bad_config_names_the_problem(tmp_path, text, words):
    with pytest.raises(ConfigError, match=words):
        load(write(tmp_path, text), env={})


def test_no_keys_beyond_loopback_is_refused_unless_insecure():
    with pytest.raises(ConfigError, match="--insecure-no-auth"):
        load(env={}, host="0.0.0.0").check_auth_policy()
    load(env={}, host="0.0.0.0", insecure_no_auth=True).check_auth_policy()
    load(env={"MODELYARD_API_KEYS": "k"}, host="0.0.0.0").check_auth_policy()
    load(env={}, host="::1").check_auth_policy()


def test_keys_table_with_quotas_and_hashes(tmp_path):
    digest = hashlib.sha256(b"sk-b").hexdigest()
    s = load(write(tmp_path, f'[[keys]]\nkey = "sk-a"\nrpm = 3\n[[keys]]\nkey = "sha256:{digest}"\ntpm = 20'), env={})
    assert [(k.key, k.rpm, k.tpm) for k in s.all_keys] == [("sk-a", 3, 0), (f"sha256:{digest}", 0, 20)]


def test_a_configured_key_may_be_limited_to_some_endpoints(tmp_path):
    s = load(write(tmp_path, '[[keys]]\nkey = "sk-a"\nendpoints = ["one", "two"]\n[[keys]]\nkey = "sk-b"'), env={})
    assert [k.endpoints for k in s.all_keys] == [("one", "two"), None]


def test_public_surface_is_exactly_all():
    public = {name for name in vars(modelyard) if not name.startswith("_")}
    modules = {"api", "batch", "batch_client", "bert_gguf", "cli", "console", "control", "engine", "errors", "local", "metrics", "periodic", "proxy", "quota", "redact",
               "registry", "server", "settings", "store"}
    assert public - modules == set(modelyard.__all__)
    for name in modelyard.__all__:
        assert getattr(modelyard, name) is not None


def test_reprs_hold_no_secrets():
    s = settings_mod.Settings(
        api_keys=("sk-plain-secret",), keys=(settings_mod.KeySpec("sk-quota-secret", rpm=5),),
        endpoints=(settings_mod.EndpointSpec(name="r", engine="openai", urls=("http://u:pw-secret@h/v1",),
                                             api_key="sk-upstream-secret"),),
        admin_tokens=(settings_mod.AdminToken("ops", "adm-token-secret"),),
        database_url="postgresql://u:db-secret@h/db", quota_backend="redis", redis_url="redis://:redis-secret@h/0")
    text = repr(s) + repr(s.endpoints[0]) + repr(s.keys[0]) + repr(s.admin_tokens[0]) + str(s)
    for secret in ("sk-plain-secret", "sk-quota-secret", "pw-secret", "sk-upstream-secret", "adm-token-secret",
                   "db-secret", "redis-secret"):
        assert secret not in text, secret
    assert "rpm=5" in text and "name='r'" in text      # the rest is still there to debug with



def test_a_link_local_upstream_is_the_operators_choice(tmp_path):
    text = '[server]\nallow_private_upstreams = true\n[[endpoints]]\nname = "r"\nengine = "openai"\n' \
           'urls = ["http://169.254.169.254/v1"]'
    assert load(write(tmp_path, text), env={}).endpoints[0].urls == ("http://169.254.169.254/v1",)


def test_the_readmes_config_examples_load(tmp_path):
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    blocks = re.findall(r"```toml\n(.*?)```", readme, re.S)
    assert any("[[keys]]" in b for b in blocks)
    for block in blocks:
        load(write(tmp_path, block), env={})


@pytest.mark.parametrize("field, value", [("balance", "random"), ("balance_abs_threshold", -1),
                                          ("balance_rel_threshold", 0.5), ("prefix_blocks", 0),
                                          ("prefix_blocks", 10_000_001), ("balance_abs_threshold", True),
                                          ("session_header", "x session"), ("session_header", "x" * 101)])
def test_routing_fields_are_checked_naming_the_field(field, value):
    with pytest.raises(ConfigError) as err:
        EndpointSpec(name="r", engine="openai", urls=("http://h/v1",), **{field: value})
    assert err.value.param == field and field in err.value.message


def test_routing_defaults():
    spec = EndpointSpec(name="r", engine="openai", urls=("http://h/v1",))
    assert (spec.balance, spec.balance_abs_threshold, spec.balance_rel_threshold, spec.session_header) == \
        ("least_in_flight", 4.0, 1.5, "x-session-id")
    assert EndpointSpec(name="r", engine="openai", urls=("http://h/v1",), balance="prefix", session_header="").balance \
        == "prefix"
