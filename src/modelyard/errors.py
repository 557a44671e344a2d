"""One error tree for modelyard, translated to HTTP at exactly one place (api/errors).

    ModelyardError                      kind             HTTP  OpenAI type
    ├── InvalidRequest                  INVALID          400   invalid_request_error
    │   └── ContextOverflow             INVALID          400   invalid_request_error
    ├── LimitExceeded                   TOO_LARGE        413   invalid_request_error
    ├── Unauthorized                    AUTH             401   authentication_error
    ├── RateLimited                     RATE_LIMITED     429   rate_limit_error
    ├── ModelNotFound                   NOT_FOUND        404   not_found_error
    ├── ObjectNotFound                  NOT_FOUND        404   not_found_error  (control plane: a key, ...)
    ├── Forbidden                       FORBIDDEN        403   permission_error
    ├── Conflict                        CONFLICT         409   conflict_error
    ├── PreconditionFailed              PRECONDITION     412   precondition_failed  (If-Match)
    ├── EndpointNotReady                NOT_READY        400   model_not_ready
    ├── QueueFull                       OVERLOADED       503   server_overloaded
    ├── ControlStale                    CONTROL_STALE    503   control_store_unavailable  (stored keys and
    │                                                                          tokens refused: the control DB is silent)
    ├── Upstream4xx                     UPSTREAM_CLIENT  (its own status: 400, 413, 422, 429)
    ├── UpstreamError                   UPSTREAM         502   upstream_error  (also an upstream 401/403/404:
    │                                                                          our config, not the client's)
    │   └── UpstreamTimeout             TIMEOUT          504   upstream_timeout
    ├── DeadlineExceeded                DEADLINE         504   timeout_error
    ├── StoreError                      STORE            (CLI; 400 if seen by a request)
    │   ├── ChecksumMismatch
    │   └── StoreBusy                   CONFLICT         409   conflict_error  (a pull of that model runs)
    ├── DataCorrupt                     ENGINE           500   server_error  (a stored file's sha256 fails)
    ├── EngineError                     ENGINE           500   server_error
    └── ConfigError                     CONFIG           (CLI only)

Code raises these; nobody matches on message text.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .redact import mask_url_credentials


class ErrorKind(enum.Enum):
    INVALID = (400, "invalid_request_error")
    TOO_LARGE = (413, "invalid_request_error")
    AUTH = (401, "authentication_error")
    RATE_LIMITED = (429, "rate_limit_error")
    NOT_FOUND = (404, "not_found_error")
    FORBIDDEN = (403, "permission_error")
    CONFLICT = (409, "conflict_error")
    PRECONDITION = (412, "precondition_failed")
    NOT_READY = (400, "model_not_ready")
    OVERLOADED = (503, "server_overloaded")
    CONTROL_STALE = (503, "control_store_unavailable")
    UPSTREAM_CLIENT = (400, "invalid_request_error")
    UPSTREAM = (502, "upstream_error")
    TIMEOUT = (504, "upstream_timeout")
    DEADLINE = (504, "timeout_error")
    STORE = (400, "model_store_error")
    ENGINE = (500, "server_error")
    CONFIG = (500, "config_error")

    @property
    def status(self) -> int:
        return self.value[0]

    @property
    def type(self) -> str:
        return self.value[1]


@dataclass
class ModelyardError(Exception):
    message: str
    param: str | None = None
    code: str | None = None
    kind = ErrorKind.ENGINE
    retry_after: float | None = None
    # Why, for trusted callers only (it may name files, exception text, upstream hosts).
    detail: str | None = None

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message

    @property
    def status(self) -> int:
        return self.kind.status

    def body(self, detail: bool = False) -> dict:
        message = f"{self.message} ({self.detail})" if detail and self.detail else self.message
        return {"error": {"message": mask_url_credentials(message), "type": self.kind.type,
                          "param": self.param, "code": self.code}}


class InvalidRequest(ModelyardError):
    kind = ErrorKind.INVALID


class ContextOverflow(InvalidRequest):
    pass


class LimitExceeded(ModelyardError):
    kind = ErrorKind.TOO_LARGE


class Unauthorized(ModelyardError):
    kind = ErrorKind.AUTH


class RateLimited(ModelyardError):
    kind = ErrorKind.RATE_LIMITED


class ModelNotFound(ModelyardError):
    kind = ErrorKind.NOT_FOUND


class ObjectNotFound(ModelyardError):
    kind = ErrorKind.NOT_FOUND


class Forbidden(ModelyardError):
    kind = ErrorKind.FORBIDDEN


class Conflict(ModelyardError):
    kind = ErrorKind.CONFLICT


class PreconditionFailed(ModelyardError):
    kind = ErrorKind.PRECONDITION


class EndpointNotReady(ModelyardError):
    kind = ErrorKind.NOT_READY


class QueueFull(ModelyardError):
    kind = ErrorKind.OVERLOADED


class ControlStale(ModelyardError):
    """A stored key or admin token, refused because the control database has not answered within
    the fail-closed bound: a revocation made meanwhile could not have been seen (control/sync)."""
    kind = ErrorKind.CONTROL_STALE


@dataclass
class Upstream4xx(ModelyardError):
    """An upstream's own client error, passed on with its status and message."""

    upstream_status: int = 400
    kind = ErrorKind.UPSTREAM_CLIENT

    @property
    def status(self) -> int:
        return self.upstream_status


class UpstreamError(ModelyardError):
    kind = ErrorKind.UPSTREAM


class UpstreamTimeout(UpstreamError):
    kind = ErrorKind.TIMEOUT


class DeadlineExceeded(ModelyardError):
    kind = ErrorKind.DEADLINE


class StoreError(ModelyardError):
    kind = ErrorKind.STORE


class ChecksumMismatch(StoreError):
    pass


class StoreBusy(StoreError):
    kind = ErrorKind.CONFLICT


class DataCorrupt(ModelyardError):
    """Stored bytes that no longer match the sha256 recorded with them (control/files): a 500,
    never served as if they were what was stored."""


class EngineError(ModelyardError):
    kind = ErrorKind.ENGINE


class ConfigError(ModelyardError):
    kind = ErrorKind.CONFIG
