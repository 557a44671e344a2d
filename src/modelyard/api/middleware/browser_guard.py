"""Web pages may not drive the server: Host, Origin and a browser's Content-Type are checked.

A keyless server on loopback trusts whoever reaches it, and any web page the user opens can
reach it: by DNS rebinding (evil.example resolves to 127.0.0.1, so the page's requests are
same-origin to the browser and it reads the answers) or by cross-site "simple" requests (a form
POST of text/plain that we would parse as JSON). The Ollama class of bug. So:

- Host (keyless servers only; a key is what a page cannot send): loopback names and addresses
  (`localhost`, `*.localhost`, 127.0.0.0/8, ::1), the configured bind host, and IP literals when
  bound beyond loopback. A rebinding page always sends its own domain name. Else 403.
- Origin (every server): a request that carries one is from a browser; it must be same-origin
  (the Origin's host:port is the Host) or listed in `[server] allowed_origins` ("*": any). A
  cross-site request without one (`Sec-Fetch-Site: cross-site`) is refused too. Else 403.
- A browser's POST (Origin or Sec-Fetch-Site present) must say `Content-Type: application/json`;
  other clients (curl -d sends application/x-www-form-urlencoded) keep being read as JSON. Else 403.

Allowed origins also get CORS answers (Starlette's CORSMiddleware, added by create_app).
"""

from __future__ import annotations

import ipaddress
import json
import logging
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

from ...errors import ConfigError
from ...settings import Settings

log = logging.getLogger("modelyard.api")

_DEFAULT_PORTS = {"http": 80, "https": 443}


def origin_key(origin: str) -> str | None:
    """`scheme://host[:port]` -> "host:port" (lowercase, default port made explicit); None if it
    is not an origin (a path, no host, "null")."""
    try:
        parts = urlsplit(origin.strip().lower())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname or parts.path not in ("", "/") \
            or parts.query or parts.username:
        return None
    return _netloc(parts.hostname, port or _DEFAULT_PORTS[parts.scheme])


def _netloc(host: str, port: int | None) -> str:
    host = host.strip("[]")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def allowed_origin_keys(origins: tuple[str, ...]) -> frozenset[str]:
    """The configured allowed origins as keys ("*" stays "*"); ConfigError naming a bad one."""
    keys = set()
    for o in origins:
        key = "*" if o == "*" else origin_key(o)
        if key is None:
            raise ConfigError(f"[server] allowed_origins: {o!r} is not an origin (scheme://host[:port], "
                              "e.g. \"http://localhost:3000\"), nor \"*\"")
        keys.add(key)
    return frozenset(keys)


def _split_host(header: str) -> tuple[str, int | None] | None:
    try:
        parts = urlsplit("//" + header.strip().lower())
        return (parts.hostname or "", parts.port)
    except ValueError:
        return None


def _is_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


class BrowserGuard:
    def __init__(self, app: ASGIApp, settings: Settings, keyless: bool) -> None:
        self.app = app
        self.keyless = keyless
        self.host = settings.host.lower().strip("[]")
        self.bound_beyond_loopback = not settings.loopback
        self.allowed = allowed_origin_keys(settings.allowed_origins)
        # A keyless server is open to whatever reaches it: behind a reverse proxy on the same
        # host, that is everyone the proxy serves. Said once, at the first proxied request.
        self.proxied_warned = False

    def host_allowed(self, host: str) -> bool:
        ip = _is_ip(host)
        if ip is not None:
            return ip.is_loopback or self.bound_beyond_loopback or str(ip) == self.host
        return host == "localhost" or host.endswith(".localhost") or host == self.host

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.keyless and not self.proxied_warned and "x-forwarded-for" in headers:
            self.proxied_warned = True
            log.warning("a request arrived through a proxy (X-Forwarded-For: %s): this server has no API keys "
                        "and trusts whoever reaches its loopback address, so everyone who reaches that proxy "
                        "uses it freely; set [server] api_keys or an admin token", headers["x-forwarded-for"][:100])
        why = self._refusal(scope["method"], headers)
        if why is None:
            return await self.app(scope, receive, send)
        code, message = why
        body = json.dumps({"error": {"message": message, "type": "permission_error", "param": None,
                                     "code": code}}).encode()
        await send({"type": "http.response.start", "status": 403,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    def _refusal(self, method: str, headers: dict[str, str]) -> tuple[str, str] | None:
        host_header = headers.get("host")
        split = _split_host(host_header) if host_header is not None else None
        if host_header is not None and split is None:
            return "forbidden_host", f"the Host header {host_header!r} is not a host name"
        if self.keyless and split is not None and not self.host_allowed(split[0]):
            return "forbidden_host", (
                f"Host {host_header!r} refused: this server has no API keys, so it answers only to "
                f"loopback names and addresses and its own host ({self.host}); a web page reaching it "
                "through another name (DNS rebinding) must not drive it")
        origin = headers.get("origin")
        fetch_site = headers.get("sec-fetch-site")
        if origin is not None:
            key = origin_key(origin)
            same = key is not None and split is not None and key == _netloc(
                split[0], split[1] or _DEFAULT_PORTS.get(urlsplit(origin.lower()).scheme))
            if not (same or "*" in self.allowed or key in self.allowed):
                return "forbidden_origin", (
                    f"cross-origin request from Origin {origin!r} refused; list the origin in "
                    "[server] allowed_origins to let its pages call this server")
        elif fetch_site == "cross-site" and "*" not in self.allowed:
            return "forbidden_origin", ("cross-site browser request refused (Sec-Fetch-Site: cross-site, "
                                        "no Origin); list its origin in [server] allowed_origins")
        browser = origin is not None or (fetch_site is not None and fetch_site != "none")
        if browser and method == "POST":
            ctype = headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if ctype != "application/json":
                return "unsupported_content_type", (
                    f"a browser's POST must send Content-Type: application/json, not {ctype or 'none'!r} "
                    "(form and text/plain bodies are how other sites' pages forge requests)")
        return None
