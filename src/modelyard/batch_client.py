"""`modelyard batch`: OpenAI's Batch API from the command line, against any server that speaks it
(a modelyard gateway, OpenAI): upload a JSONL file (`/files`, purpose "batch"), create the batch
(`/batches`), follow it with a progress bar on stderr, download its output and error files.

The routes and shapes are OpenAI's (shared/spec/openai/openapi.yaml), so this module is a plain
httpx client of them: cli.py parses argv and calls these functions.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable, TextIO

import httpx

from .errors import InvalidRequest, Upstream4xx, UpstreamError

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses")
TERMINAL = ("completed", "failed", "expired", "cancelled")
POLL_SECONDS = 2.0
# The most `follow` waits: OpenAI's only completion window (24 h) and an hour of finalizing.
MAX_WAIT_SECONDS = 25 * 3600.0
CHUNK = 1 << 16


class BatchClient:
    def __init__(self, base_url: str, api_key: str | None, *, timeout: float = 60.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout,
                                  transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "BatchClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, **kw) -> dict:
        try:
            r = self._http.request(method, path, **kw)
        except httpx.HTTPError as exc:
            raise UpstreamError(f"{method} {path}: {type(exc).__name__}: {exc}") from None
        _check(r, method, path)
        return r.json()

    def upload(self, path: Path) -> dict:
        """The file, streamed from disk (a 200 MB file never sits in memory), purpose "batch"."""
        with open(path, "rb") as f:
            return self._call("POST", "/files", data={"purpose": "batch"},
                              files={"file": (path.name, f, "application/jsonl")})

    def create(self, input_file_id: str, endpoint: str, metadata: dict[str, str] | None = None) -> dict:
        body = {"input_file_id": input_file_id, "endpoint": endpoint, "completion_window": "24h"}
        if metadata:
            body["metadata"] = metadata
        return self._call("POST", "/batches", json=body)

    def retrieve(self, batch_id: str) -> dict:
        return self._call("GET", f"/batches/{batch_id}")

    def cancel(self, batch_id: str) -> dict:
        return self._call("POST", f"/batches/{batch_id}/cancel")

    def download(self, file_id: str, to: Path) -> int:
        """The file's content into `to` (written beside it, then renamed): its size in bytes."""
        part = to.with_name(to.name + ".part")
        path = f"/files/{file_id}/content"
        size = 0
        try:
            with self._http.stream("GET", path) as r:
                if not r.is_success:
                    r.read()
                    _check(r, "GET", path)
                with open(part, "wb") as out:
                    for chunk in r.iter_bytes(CHUNK):
                        out.write(chunk)
                        size += len(chunk)
        except httpx.HTTPError as exc:
            part.unlink(missing_ok=True)
            raise UpstreamError(f"GET {path}: {type(exc).__name__}: {exc}") from None
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        part.replace(to)
        return size

    def follow(self, batch_id: str, bar: "ProgressBar", *, poll: float = POLL_SECONDS,
               max_wait: float = MAX_WAIT_SECONDS, sleep: Callable[[float], None] = time.sleep) -> dict:
        """Poll until the batch ends (a TERMINAL status), drawing its request_counts."""
        deadline = time.monotonic() + max_wait
        while True:
            batch = self.retrieve(batch_id)
            bar.show(batch)
            if batch["status"] in TERMINAL:
                bar.end()
                return batch
            if time.monotonic() >= deadline:
                bar.end()
                raise UpstreamError(f"batch {batch_id} is still {batch['status']} after {max_wait:g} s; "
                                    f"`modelyard batch status {batch_id}` follows it on")
            sleep(poll)


def _check(r: httpx.Response, method: str, path: str) -> None:
    if r.is_success:
        return
    try:
        message = r.json()["error"]["message"]
    except Exception:   # not OpenAI's error shape: the start of the body says what it was
        message = r.text[:300]
    if 400 <= r.status_code < 500:
        raise Upstream4xx(f"{method} {path}: {r.status_code}: {message}", upstream_status=r.status_code)
    raise UpstreamError(f"{method} {path}: {r.status_code}: {message}")


class ProgressBar:
    """`batch_abc  in_progress  42%  420/1000 (3 failed)` on stderr, redrawn in place with \\r
    when it changes (only for a terminal, as the store's pull bar); one line per change otherwise."""

    def __init__(self, out: TextIO | None = None, tty: bool | None = None) -> None:
        self.out = out or sys.stderr
        self.tty = self.out.isatty() if tty is None else tty
        self.last = ""

    def show(self, batch: dict) -> None:
        counts = batch.get("request_counts") or {}
        total, done, failed = counts.get("total", 0), counts.get("completed", 0), counts.get("failed", 0)
        pct = (done + failed) * 100 // total if total else 0
        line = f"{batch['id']}  {batch['status']}  {pct:3d}%  {done + failed}/{total}"
        if failed:
            line += f" ({failed} failed)"
        if line == self.last:
            return
        self.out.write(("\r" + line.ljust(len(self.last))) if self.tty else line + "\n")
        self.out.flush()
        self.last = line

    def end(self) -> None:
        if self.tty and self.last:
            self.out.write("\n")
            self.out.flush()


def errors_path(output: Path) -> Path:
    """Where the error file goes beside `output`: results.jsonl -> results.errors.jsonl."""
    return output.with_name(f"{output.stem}.errors{output.suffix or '.jsonl'}")


def fetch_results(client: BatchClient, batch: dict, output: Path, say: Callable[[str], None]) -> None:
    """The batch's output file to `output` and its error file beside it (errors_path), those it has."""
    for key, to in (("output_file_id", output), ("error_file_id", errors_path(output))):
        file_id = batch.get(key)
        if file_id:
            size = client.download(file_id, to)
            say(f"{key.split('_')[0]} file {file_id}: {size} bytes -> {to}")


def submit(client: BatchClient, path: Path, endpoint: str, output: Path | None, *, follow: bool = True,
           metadata: dict[str, str] | None = None, bar: ProgressBar | None = None,
           say: Callable[[str], None] = lambda s: print(s, file=sys.stderr), **follow_kw) -> dict:
    """Upload, create, and (follow) wait for the end and download the results. Checks what it
    can before uploading: the file exists, the endpoint is one the Batch API runs."""
    if endpoint not in ENDPOINTS:
        raise InvalidRequest(f"endpoint is {endpoint!r}; it must be one of {', '.join(ENDPOINTS)}", param="endpoint")
    if not path.is_file():
        raise InvalidRequest(f"input file {str(path)!r} does not exist or is not a file", param="file")
    uploaded = client.upload(path)
    say(f"uploaded {path} as {uploaded['id']} ({uploaded.get('bytes', '?')} bytes)")
    batch = client.create(uploaded["id"], endpoint, metadata)
    say(f"batch {batch['id']} created ({batch['status']})")
    if not follow:
        return batch
    batch = client.follow(batch["id"], bar or ProgressBar(), **follow_kw)
    if output is not None:
        fetch_results(client, batch, output, say)
    return batch


def summary(batch: dict) -> str:
    c = batch.get("request_counts") or {}
    line = (f"{batch['id']}  {batch['status']}  {c.get('completed', 0)} completed, {c.get('failed', 0)} failed "
            f"of {c.get('total', 0)}")
    for key in ("output_file_id", "error_file_id"):
        if batch.get(key):
            line += f"  {key}={batch[key]}"
    errors = (batch.get("errors") or {}).get("data") or []
    for e in errors[:20]:
        line += f"\n  line {e.get('line')}: {e.get('code')}: {e.get('message')}"
    if len(errors) > 20:
        line += f"\n  ... {len(errors) - 20} more errors"
    return line


def exit_code(batch: dict) -> int:
    """0 for a completed batch, 1 for one that ended otherwise (failed, expired, cancelled)."""
    return 0 if batch["status"] == "completed" else 1
