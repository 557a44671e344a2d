"""Settings: the only reader of environment variables and config files.

Parsed once at the edge (cli), frozen, and passed down; nothing else reads os.environ.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import socket
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from .errors import ConfigError

DEFAULT_MODEL = "smollm2-135m"
# The longest routing name (`model` in a request, an endpoint's name): every request field that
# names an endpoint is checked against it before any work, and a config name above it is refused.
MAX_NAME = 256
ENGINES = ("llamacpp", "openai")
KINDS = ("completions", "embeddings")
# What an engine = "openai" endpoint's upstream is, so that structured-output requests are
# translated into the fields it takes (proxy/structured.py); "openai": response_format only.
UPSTREAM_SERVERS = ("openai", "vllm", "sglang", "llama-server", "ollama", "modelyard")
PREFIX_CACHE_SCOPES = ("key", "shared")
BALANCES = ("prefix", "least_in_flight")        # a remote endpoint's replica choice (proxy/routing)
MAX_PREFIX_BLOCKS = 10_000_000                  # block hashes kept per replica: ~100 bytes each
MAX_SESSION_HEADER = 100
# When an endpoint's model is loaded (registry/lifecycle): "always", at start (and again on its
# next request after an idle unload or an eviction); "on_demand", on its first request.
LOAD_POLICIES = ("always", "on_demand")
# keep_alive: seconds an idle endpoint stays loaded; -1 never unloads. Bounded (a year) so that a
# typo cannot pin a model for ever by accident, and the same bound holds for a request's field.
MAX_KEEP_ALIVE = 31_536_000
NEVER = -1


@dataclass(frozen=True)
class Limits:
    """Per-request limits; each names itself in the 4xx it causes."""

    max_body_bytes: int = 1_000_000
    max_n: int = 16
    max_stop: int = 4
    max_stop_chars: int = 200
    max_logprobs: int = 5
    max_prompts: int = 16
    max_embedding_inputs: int = 2048    # inputs per /embeddings request (OpenAI's limit)


def secret_digest(value: str) -> bytes:
    """A configured key or admin token ("sk-..." or "sha256:<hex>") -> the sha256 digest that
    is all anyone compares against."""
    return bytes.fromhex(value[7:]) if value.startswith("sha256:") else hashlib.sha256(value.encode()).digest()


@dataclass(frozen=True)
class KeySpec:
    """An API key ("sk-..." or "sha256:<hex>") with optional per-minute quotas (0: unlimited)."""

    key: str = field(repr=False)       # never in a repr (logs, tracebacks)
    rpm: int = 0          # requests per minute
    tpm: int = 0          # prompt + completion tokens per minute
    # the endpoints the key may see and use (others answer as unknown names); None: all
    endpoints: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.endpoints is not None:
            if not isinstance(self.endpoints, (list, tuple)) or not all(
                    isinstance(n, str) and 0 < len(n) <= MAX_NAME for n in self.endpoints):
                raise ConfigError(f"a key's endpoints must be a list of endpoint names (1 to {MAX_NAME} characters)",
                                  param="endpoints")
            object.__setattr__(self, "endpoints", tuple(self.endpoints))
        if self.key.startswith("sha256:"):
            digest = self.key[7:]
            if len(digest) != 64 or any(c not in "0123456789abcdefABCDEF" for c in digest):
                raise ConfigError("an API key given as sha256:<hex> needs 64 hex digits")
        elif not self.key:
            raise ConfigError("an API key must not be empty")
        if self.rpm < 0 or self.tpm < 0:
            raise ConfigError(f"quotas must be >= 0 (rpm={self.rpm}, tpm={self.tpm})")


@dataclass(frozen=True)
class EndpointSpec:
    name: str
    engine: str = "llamacpp"
    model: str = DEFAULT_MODEL          # a store ref (llamacpp)
    context: int = 2048                 # tokens per sequence
    parallel: int = 16                  # sequences decoded at once
    threads: int = 0                    # 0: all cores
    batch: int = 512                    # tokens per llama_decode step (prefill chunk budget)
    max_queue: int = 256                # requests waiting beyond `parallel`; past it: 503
    prefix_cache: bool = True
    prefix_cache_mib: int = 512         # host memory for prompt KV beyond the slots (LRU); 0: none
    # True: a request's output does not depend on what else runs (ggml's fixed-order kernels,
    # flash attention in one order; repacked weights only where a load-time probe finds their rows
    # independent of the batch, local/repacking); False trades that for llama.cpp's fastest
    # kernels (docs/performance.md).
    deterministic: bool = True
    convert: str | None = None          # opt-in: "q8_0" | "q4_0" (faster kernels, different output)
    chat_parse_special: bool = False    # special tokens written inside chat messages are parsed (HF's way)
    # What the endpoint serves: "completions" (completions and chat) or "embeddings". None: the
    # store's known model says, else the GGUF's header (llamacpp); a remote one is completions.
    kind: str | None = None
    # engine = "openai"
    urls: tuple[str, ...] = field(default=(), repr=False)     # may hold user:password@
    upstream_model: str | None = None
    upstream_server: str = "openai"       # one of UPSTREAM_SERVERS
    api_key: str | None = field(default=None, repr=False)
    timeout: float = 600.0
    # engine = "openai": the share of the endpoint's capacity (replicas x `parallel`, the requests
    # each replica is counted to serve at once) that batch-priority requests may hold; past it
    # they wait (proxy/batch_share). 0 < share <= 1: there is no "off".
    batch_share: float = 0.5
    # Replica choice (proxy/routing): "least_in_flight" (fewest requests in flight from this
    # gateway) or "prefix" (where the prompt's prefix was sent, unless that replica's load
    # exceeds the least-loaded one's by more than both thresholds: SGLang's rule).
    balance: str = "least_in_flight"
    balance_abs_threshold: float = 4.0      # requests running + waiting
    balance_rel_threshold: float = 1.5      # times the least-loaded replica's load
    prefix_blocks: int = 65_536             # block hashes remembered per replica (LRU)
    session_header: str = "x-session-id"    # a request header that pins a session like `user`; "": none
    # Lifecycle (registry/lifecycle): when the model loads, and how long it stays loaded idle.
    load: str = "always"                  # one of LOAD_POLICIES
    keep_alive: float = NEVER             # seconds idle before it is unloaded; -1: never

    def __post_init__(self) -> None:
        if len(self.name) > MAX_NAME:
            raise ConfigError(f"endpoint name is {len(self.name)} characters, above the limit of {MAX_NAME}: "
                              f"{self.name[:40]!r}...", param="name")
        if self.engine not in ENGINES:
            raise ConfigError(f"endpoint {self.name!r}: engine must be one of {ENGINES}, got {self.engine!r}",
                              param="engine")
        if not self.name or "/" in self.name:
            raise ConfigError(f"endpoint name must be non-empty and contain no '/', got {self.name!r}", param="name")
        for key in ("context", "parallel", "batch"):
            if getattr(self, key) < 1:
                raise ConfigError(f"endpoint {self.name!r}: {key} must be >= 1, got {getattr(self, key)}", param=key)
        if not 0 < self.batch_share <= 1:
            raise ConfigError(f"endpoint {self.name!r}: batch_share must be > 0 and <= 1, got {self.batch_share}",
                              param="batch_share")
        if self.prefix_cache_mib < 0:
            raise ConfigError(f"endpoint {self.name!r}: prefix_cache_mib must be >= 0, got {self.prefix_cache_mib}",
                              param="prefix_cache_mib")
        if self.kind is not None and self.kind not in KINDS:
            raise ConfigError(f"endpoint {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}", param="kind")
        if self.upstream_server not in UPSTREAM_SERVERS:
            raise ConfigError(f"endpoint {self.name!r}: upstream_server must be one of {UPSTREAM_SERVERS}, "
                              f"got {self.upstream_server!r}", param="upstream_server")
        if self.balance not in BALANCES:
            raise ConfigError(f"endpoint {self.name!r}: balance must be one of {BALANCES}, got {self.balance!r}",
                              param="balance")
        for key, low, high in (("balance_abs_threshold", 0, 1_000_000), ("balance_rel_threshold", 1, 1000),
                               ("prefix_blocks", 1, MAX_PREFIX_BLOCKS)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                raise ConfigError(f"endpoint {self.name!r}: {key} must be between {low} and {high}, got {value!r}",
                                  param=key)
        if not isinstance(self.session_header, str) or len(self.session_header) > MAX_SESSION_HEADER or \
                any(not (c.isascii() and (c.isalnum() or c in "-_")) for c in self.session_header):
            raise ConfigError(f"endpoint {self.name!r}: session_header must be a header name of at most "
                              f"{MAX_SESSION_HEADER} letters, digits, '-' or '_', got {self.session_header!r}",
                              param="session_header")
        if self.load not in LOAD_POLICIES:
            raise ConfigError(f"endpoint {self.name!r}: load must be one of {LOAD_POLICIES}, got {self.load!r}",
                              param="load")
        why = keep_alive_refusal(self.keep_alive)
        if why:
            raise ConfigError(f"endpoint {self.name!r}: {why}", param="keep_alive")
        if self.engine == "openai" and not self.urls:
            raise ConfigError(f"endpoint {self.name!r}: engine 'openai' needs urls = [...]", param="urls")

    @property
    def n_threads(self) -> int:
        return self.threads or (os.cpu_count() or 1)


def keep_alive_refusal(value: object) -> str | None:
    """Why `value` is not a keep_alive (None: it is): seconds from 0 to MAX_KEEP_ALIVE, or -1."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value \
            or not (value == NEVER or 0 <= value <= MAX_KEEP_ALIVE):
        return f"keep_alive must be -1 (never unload) or from 0 to {MAX_KEEP_ALIVE} seconds, got {value!r}"
    return None


ADMIN_ROLES = ("admin", "viewer")


@dataclass(frozen=True)
class AdminToken:
    """A control-plane token (`[[admin_tokens]]` or MODELYARD_ADMIN_TOKEN): admin changes,
    viewer reads. It is not an inference key, and an inference key is not one of these."""
    name: str                               # who, in the audit log
    token: str = field(repr=False)          # or "sha256:<hex>"
    role: str = "admin"

    def __post_init__(self) -> None:
        if self.role not in ADMIN_ROLES:
            raise ConfigError(f"admin token {self.name!r}: role must be one of {ADMIN_ROLES}, got {self.role!r}")
        if not self.name or not self.token:
            raise ConfigError("every admin token needs a name and a token")


# Hosts an upstream URL may not name: cloud metadata services (AWS, GCP, Azure, OpenStack answer
# on 169.254.169.254, AWS also on fd00:ec2::254) and link-local addresses generally. An endpoint
# pointed there makes the gateway fetch the host's own credentials for whoever may create
# endpoints (an admin token), and pass the answers on in error texts.
METADATA_HOSTS = frozenset({"metadata", "metadata.google.internal", "metadata.azure.com"})
METADATA_ADDRESSES = frozenset({ipaddress.ip_address("fd00:ec2::254")})


def upstream_refusal(url: str) -> str | None:
    """Why `url` may not be an upstream (None: it may): a link-local or metadata address,
    written in any form getaddrinfo accepts (2852039166 and 0xa9fea9fe are 169.254.169.254).
    A name that resolves there is not looked up: allow_private_upstreams stays the operator's
    decision, and DNS can change after the check anyway."""
    host = (urlsplit(url).hostname or "").rstrip(".").lower()
    if host in METADATA_HOSTS:
        return f"upstream {host!r} is a cloud metadata service; [server] allow_private_upstreams = true allows it"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        try:
            ip = ipaddress.IPv4Address(socket.inet_aton(host))     # the legacy forms
        except OSError:
            return None                                            # a name
    mapped = getattr(ip, "ipv4_mapped", None)
    ip = mapped or ip
    if ip.is_link_local or ip in METADATA_ADDRESSES:
        return (f"upstream address {host} is link-local (cloud metadata services answer there); "
                "[server] allow_private_upstreams = true allows it")
    return None


# [server] bounds on what one client connection may hold (connections.py): setting ->
# (lowest, highest, unit). Each fails closed: there is no "off".
CONNECTION_LIMITS: dict[str, tuple[float, float, str]] = {
    "header_timeout": (0.1, 300.0, "seconds"),        # to send a complete request head
    "keep_alive_timeout": (0.1, 300.0, "seconds"),    # an idle connection between requests
    "max_connections": (1, 100_000, "connections"),   # open at once; one more is answered 503
    "max_header_bytes": (1024, 1_048_576, "bytes"),   # a request head (line and headers)
}

# [server] bounds of the control plane (issue 19, items 11 to 13): setting -> (lowest, highest,
# unit), each failing closed like the connection limits.
CONTROL_LIMITS: dict[str, tuple[float, float, str]] = {
    # how long stored keys and admin tokens stay valid after the last successful read of the
    # control database (control/sync); past it they are refused until it answers again
    "control_fail_closed_after": (1.0, 86_400.0, "seconds"),
    # failed console sign-ins per client address per minute; the next is answered 429
    "login_failures_per_minute": (1, 10_000, "failures"),
    # server-sent-event streams one admin token (or console session's token) may hold open
    "max_streams_per_token": (1, 1000, "streams"),
    # seconds between writes of the usage table (control/usage): the most a killed process loses
    "usage_flush_interval": (0.05, 300.0, "seconds"),
    # days a stored response (OpenAI's Responses API, control/responses) is kept, then swept
    "responses_retention_days": (1, 3650, "days"),
    # Files and Batches (control/files, control/batches, batch/runner; docs/batches.md): a file's
    # size (refused while it streams in), a batch input's lines, the lease a gateway holds on
    # the lines it runs (a gateway killed holds them this long at most), lines one gateway runs at once
    "max_file_bytes": (1, 10_000_000_000, "bytes"),
    "max_batch_lines": (1, 1_000_000, "lines"),
    "batch_lease_seconds": (2.0, 3600.0, "seconds"),
    "batch_concurrency": (1, 1024, "lines"),
}


# [server] bounds of the models' lifecycle (registry/lifecycle): setting -> (lowest, highest, unit).
# The budget and the count take 0 for "no bound" (the default: one model per server needs none).
LIFECYCLE_LIMITS: dict[str, tuple[float, float, str]] = {
    # how long a request waits for its endpoint's model to load (on demand) before a 503
    "load_timeout": (1.0, 3600.0, "seconds"),
    # MiB the loaded models may need together (weights, KV cache, compute buffers, host prefix
    # cache); a load past it evicts the least recently used idle endpoint first
    "memory_budget_mib": (0, 16_777_216, "MiB"),
    # models loaded at once; a load past it evicts likewise
    "max_loaded_models": (0, 10_000, "models"),
}


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    keys: tuple[KeySpec, ...] = ()      # [[keys]]: keys with quotas
    insecure_no_auth: bool = False
    store_dir: Path = field(default_factory=lambda: Path.home() / ".cache" / "modelyard")
    endpoints: tuple[EndpointSpec, ...] = (EndpointSpec(name=DEFAULT_MODEL),)
    limits: Limits = Limits()
    log_level: str = "info"
    request_timeout: float = 0.0        # seconds per request; 0: none (X-Request-Timeout may set one)
    grace_period: float = 30.0          # seconds in-flight requests get to finish on shutdown
    allowed_origins: tuple[str, ...] = ()   # web origins whose pages may call the server ("*": any)
    # Prefix-cache counters tell whether someone's prompt is cached (registry/render.CACHE_COUNTERS):
    # admin tokens see them; true shows them to every key and on the open /metrics (one tenant).
    public_cache_counters: bool = False
    # Whose cached prompts a request may reuse (api/openai/cache_scope): "key", each API key its own
    # prefix cache partition, so that the time to a first token says nothing about another key's
    # prompts; "shared", one partition for every key (one tenant: more reuse). A keyless server
    # is one tenant either way.
    prefix_cache_scope: str = "key"
    # Upstream URLs at link-local addresses (cloud metadata services live there) are refused
    # unless this is true (upstream_refusal).
    allow_private_upstreams: bool = False
    # The control plane (/api/v1/control): on when an admin token exists, here or (made by
    # `modelyard admin create-token`) in its store: this URL, or a SQLite file in the store directory.
    admin_tokens: tuple[AdminToken, ...] = ()
    stored_admin_tokens: bool = False   # the store holds active ones (`modelyard serve` checks at start)
    # [quota]: where per-key windows live. "memory": this process; "redis": shared by every
    # process on `redis_url`; "postgres": blocks leased from `database_url` (quota/postgres);
    # `processes` is how many share it (the fallback's divisor, and the blocks' size).
    quota_backend: str = "memory"
    redis_url: str | None = field(default=None, repr=False)       # may hold a password
    quota_processes: int = 1
    database_url: str | None = field(default=None, repr=False)    # may hold a password
    # Slow or greedy clients (CONNECTION_LIMITS has the ranges; README, "Configuration").
    header_timeout: float = 10.0
    keep_alive_timeout: float = 5.0
    max_connections: int = 1000        # below a default `ulimit -n` of 1024, with room for the rest
    max_header_bytes: int = 16_384     # h11's own default
    # The control plane's bounds (CONTROL_LIMITS has the ranges; docs/control-plane.md).
    control_fail_closed_after: float = 60.0
    login_failures_per_minute: int = 10
    max_streams_per_token: int = 8
    usage_flush_interval: float = 5.0
    responses_retention_days: int = 30
    max_file_bytes: int = 200_000_000       # OpenAI's 200 MB a file
    max_batch_lines: int = 50_000           # OpenAI's 50,000 requests a batch
    batch_lease_seconds: float = 60.0
    batch_concurrency: int = 4
    # The models' lifecycle (LIFECYCLE_LIMITS has the ranges; README, "Models that come and go").
    load_timeout: float = 300.0
    memory_budget_mib: int = 0
    max_loaded_models: int = 0

    @property
    def control_enabled(self) -> bool:
        return bool(self.admin_tokens) or self.stored_admin_tokens

    @property
    def database(self) -> str:
        return self.database_url or f"sqlite:///{self.store_dir / 'control.db'}"

    def __post_init__(self) -> None:
        for name, (low, high, unit) in (*CONNECTION_LIMITS.items(), *CONTROL_LIMITS.items(),
                                        *LIFECYCLE_LIMITS.items()):
            value = getattr(self, name)
            whole = isinstance(low, int)
            if isinstance(value, bool) or not isinstance(value, int if whole else (int, float)) \
                    or not low <= value <= high:
                raise ConfigError(f"[server] {name} must be {'a whole number ' if whole else ''}from {low} to "
                                  f"{high} {unit}, got {value!r}", param=name)
        if self.quota_backend not in ("memory", "redis", "postgres"):
            raise ConfigError(f"[quota] backend must be 'memory', 'redis' or 'postgres', got {self.quota_backend!r}")
        if self.quota_backend == "postgres" and not (self.database_url or "").startswith(("postgresql://", "postgres://")):
            raise ConfigError("[quota] backend = 'postgres' needs database_url = 'postgresql://...' (the control "
                              "store's PostgreSQL holds the quota blocks)")
        if self.quota_backend == "redis" and not self.redis_url:
            raise ConfigError("[quota] backend = 'redis' needs redis_url (redis://host:port/0 or unix:///path.sock)")
        if not isinstance(self.allow_private_upstreams, bool):
            raise ConfigError(f"[server] allow_private_upstreams must be true or false, got "
                              f"{self.allow_private_upstreams!r}")
        for spec in self.endpoints:
            for url in spec.urls:
                why = None if self.allow_private_upstreams else upstream_refusal(url)
                if why:
                    raise ConfigError(f"endpoint {spec.name!r}: {why}", param="urls")
        if not isinstance(self.public_cache_counters, bool):
            raise ConfigError(f"[server] public_cache_counters must be true or false, got {self.public_cache_counters!r}")
        if self.prefix_cache_scope not in PREFIX_CACHE_SCOPES:
            raise ConfigError(f"[server] prefix_cache_scope must be one of {PREFIX_CACHE_SCOPES}, got "
                              f"{self.prefix_cache_scope!r}", param="prefix_cache_scope")
        if self.quota_processes < 1:
            raise ConfigError(f"[quota] processes must be >= 1, got {self.quota_processes}")
        names = [e.name for e in self.endpoints]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise ConfigError(f"endpoint names must be unique; repeated: {sorted(dupes)}")

    @property
    def loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    @property
    def all_keys(self) -> tuple[KeySpec, ...]:
        return tuple(KeySpec(k) for k in self.api_keys) + self.keys

    def check_auth_policy(self) -> None:
        """Refuse to expose an unauthenticated server beyond this machine."""
        if not self.all_keys and not self.control_enabled and not self.loopback and not self.insecure_no_auth:
            raise ConfigError(
                f"refusing to serve on {self.host} with no API keys: set [server] api_keys or "
                "MODELYARD_API_KEYS, or pass --insecure-no-auth")


def endpoint_spec(raw: Mapping[str, Any]) -> EndpointSpec:
    """An [[endpoints]] table (or a stored run-time endpoint) -> a checked EndpointSpec."""
    known = set(EndpointSpec.__dataclass_fields__)
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"[[endpoints]] {raw.get('name')!r}: unknown keys {sorted(unknown)}")
    if "name" not in raw:
        raise ConfigError("every [[endpoints]] needs a name")
    data = dict(raw)
    if "urls" in data:
        data["urls"] = tuple(data["urls"])
    try:
        return EndpointSpec(**data)
    except TypeError as exc:
        raise ConfigError(f"[[endpoints]] {raw['name']!r}: {exc}") from None


def load(config: Path | None = None, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Build Settings from a TOML file, the environment and CLI overrides (in rising priority)."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    if config is not None:
        try:
            doc = tomllib.loads(Path(config).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config {config}: {exc}") from None
        server = doc.get("server", {})
        for key in ("host", "port", "log_level", "request_timeout", "grace_period", "public_cache_counters",
                    "prefix_cache_scope", "allow_private_upstreams", *CONNECTION_LIMITS, *CONTROL_LIMITS,
                    *LIFECYCLE_LIMITS):
            if key in server:
                values[key] = server[key]
        if "api_keys" in server:
            values["api_keys"] = tuple(server["api_keys"])
        if "allowed_origins" in server:
            values["allowed_origins"] = tuple(server["allowed_origins"])
        if "store_dir" in server:
            values["store_dir"] = Path(server["store_dir"]).expanduser()
        if "database_url" in server:
            values["database_url"] = server["database_url"]
        quota = doc.get("quota", {})
        unknown = set(quota) - {"backend", "redis_url", "processes"}
        if unknown:
            raise ConfigError(f"[quota]: unknown keys {sorted(unknown)}")
        for key, name in (("backend", "quota_backend"), ("redis_url", "redis_url"), ("processes", "quota_processes")):
            if key in quota:
                values[name] = quota[key]
        if "admin_tokens" in doc:
            try:
                values["admin_tokens"] = tuple(AdminToken(**t) for t in doc["admin_tokens"])
            except TypeError as exc:
                raise ConfigError(f"[[admin_tokens]]: {exc}") from None
        if "keys" in doc:
            try:
                values["keys"] = tuple(KeySpec(**k) for k in doc["keys"])
            except TypeError as exc:
                raise ConfigError(f"[[keys]]: {exc}") from None
        if "limits" in doc:
            values["limits"] = Limits(**doc["limits"])
        if "endpoints" in doc:
            values["endpoints"] = tuple(endpoint_spec(e) for e in doc["endpoints"])
    if env.get("MODELYARD_API_KEYS"):
        keys = tuple(k.strip() for k in env["MODELYARD_API_KEYS"].split(",") if k.strip())
        values["api_keys"] = tuple(values.get("api_keys", ())) + keys
    if env.get("MODELYARD_ADMIN_TOKEN"):
        values["admin_tokens"] = tuple(values.get("admin_tokens", ())) + (
            AdminToken("env", env["MODELYARD_ADMIN_TOKEN"], "admin"),)
    if env.get("MODELYARD_DATABASE_URL"):
        values["database_url"] = env["MODELYARD_DATABASE_URL"]
    if env.get("MODELYARD_HOME"):
        values["store_dir"] = Path(env["MODELYARD_HOME"]).expanduser()
    model = overrides.pop("model", None)
    values.update({k: v for k, v in overrides.items() if v is not None})
    settings = Settings(**values)
    if model is not None:
        # --model REF: serve that one model under a name derived from it.
        settings = replace(settings, endpoints=(EndpointSpec(name=endpoint_name_for(model), model=model),))
    return settings


def spec_fields(spec: EndpointSpec) -> dict[str, Any]:
    """The inverse of `endpoint_spec`: every field, JSON-ready (what the control store keeps)."""
    fields = {name: getattr(spec, name) for name in EndpointSpec.__dataclass_fields__}
    fields["urls"] = list(spec.urls)
    return fields


def endpoint_name_for(ref: str) -> str:
    """The routing name for `--model REF`: the ref itself for store names, else the file stem."""
    name = ref.rstrip("/").rsplit("/", 1)[-1]
    return name[:-5] if name.endswith(".gguf") else name
