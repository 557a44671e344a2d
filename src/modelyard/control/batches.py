"""OpenAI's Batch API's store: batches, their input lines, the leases gateways hold on the lines
they run, and each line's result (docs/batches.md).

Exactly once, across crashes and gateways: a batch's input lines are rows keyed by
(batch_id, line). A gateway's runner (batch/runner) LEASES a few open lines at a time (an
expiry it renews while it runs them), runs each, and stores its result with
`UPDATE ... WHERE done = 0`: whoever finishes a line first stores it, a redo cannot add a
second result. A gateway killed with -9 stops renewing: its lines' leases pass and any runner
(another gateway, or the restarted one) leases them again. The output file is written once every
line is done, from the rows, in line order: every custom_id exactly once.

The same lease covers a batch's phases that one gateway does alone (validating, finalizing): a
batch whose phase's gateway died is taken up by the next runner that looks (`take`).

Blocking calls (control/db): callers run them on a worker thread.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Callable, Iterator

from ..errors import InvalidRequest, ObjectNotFound
from .db import Database
from .files import OUTPUT_PURPOSE, FileStore
from .records import audit, first_id_page, new_id
from .responses import owner

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses")
WINDOW = 86_400                 # "24h", the only completion_window (OpenAI's)
MAX_ERRORS = 1000               # line errors a failed batch lists (the count says how many more)
MAX_CUSTOM_ID = 512             # characters of a custom_id
MAX_LINE_BYTES = 1_000_000      # a line's bytes unless told (the route: [limits] max_body_bytes, what a body may be)
VALIDATING = 600                # seconds a gateway may take to validate a batch before another fails it
PAGE = 1000                     # lines read at once when the output files are written
ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
TIMES = ("created_at", "in_progress_at", "expires_at", "finalizing_at", "completed_at", "failed_at", "expired_at",
         "cancelling_at", "cancelled_at")


@dataclass(frozen=True)
class Line:
    """One leased input line: what the runner needs to run it."""
    batch_id: str
    line: int
    custom_id: str
    body: dict
    key_id: str
    endpoint: str


def line_error(line: int, code: str, message: str, param: str | None = None) -> dict:
    return {"code": code, "message": message, "param": param, "line": line}


def parse_lines(data: Iterator[bytes], endpoint: str, model_error: Callable[[str], tuple[str, str] | None],
                max_lines: int, sink: Callable[[str, dict], None] | None = None,
                max_line_bytes: int = MAX_LINE_BYTES) -> list[dict]:
    """Every error of the input file's lines (OpenAI's shape, 1-based line numbers): not JSON,
    not an object, custom_id missing or not a string or repeated, method not POST, url not the
    batch's endpoint, body not an object, body.model missing, unknown to this key or of the
    wrong kind (`model_error`: (code, message) or None). Each good line's (custom_id, body) goes
    to `sink` as it is read: nothing holds the whole file."""
    errors: list[dict] = []
    seen: set[str] = set()
    models: dict[str, tuple[str, str] | None] = {}
    count = 0
    for number, raw in split_lines(data, max_line_bytes):
        count += 1
        if count > max_lines:
            errors.append(line_error(number, "too_many_lines", f"a batch may hold at most {max_lines} lines "
                                     "([server] max_batch_lines)"))
            break
        if raw is None:
            errors.append(line_error(number, "line_too_large", f"line {number} is over {max_line_bytes} bytes, "
                                     "the most a request body may be ([limits] max_body_bytes)"))
            continue
        try:
            item = json.loads(raw)
        except ValueError as exc:
            errors.append(line_error(number, "invalid_json_line", f"line {number} is not JSON: {str(exc)[:200]}"))
            continue
        if not isinstance(item, dict):
            errors.append(line_error(number, "invalid_json_line", f"line {number} is not a JSON object"))
            continue
        custom_id = item.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            errors.append(line_error(number, "missing_custom_id", f"line {number} has no custom_id (a non-empty "
                                     "string)", "custom_id"))
        elif len(custom_id) > MAX_CUSTOM_ID:
            errors.append(line_error(number, "invalid_custom_id", f"line {number}'s custom_id is {len(custom_id)} "
                                     f"characters, above the limit of {MAX_CUSTOM_ID}", "custom_id"))
        elif custom_id in seen:
            errors.append(line_error(number, "duplicate_custom_id", f"line {number}'s custom_id {custom_id[:100]!r} "
                                     "is used by an earlier line; each must be unique", "custom_id"))
        else:
            seen.add(custom_id)
        if item.get("method") != "POST":
            errors.append(line_error(number, "invalid_method", f"line {number}'s method must be 'POST', got "
                                     f"{str(item.get('method'))[:50]!r}", "method"))
        if item.get("url") != endpoint:
            errors.append(line_error(number, "invalid_url", f"line {number}'s url must be the batch's endpoint "
                                     f"{endpoint!r}, got {str(item.get('url'))[:100]!r}", "url"))
        body = item.get("body")
        if not isinstance(body, dict):
            errors.append(line_error(number, "invalid_body", f"line {number}'s body must be a JSON object", "body"))
            continue
        model = body.get("model")
        if not isinstance(model, str) or not model:
            errors.append(line_error(number, "missing_model", f"line {number}'s body has no model", "body.model"))
            continue
        if model not in models:
            models[model] = model_error(model)
        if models[model] is not None:
            code, message = models[model]
            errors.append(line_error(number, code, f"line {number}: {message}", "body.model"))
            continue
        if sink is not None and isinstance(custom_id, str):
            sink(custom_id, body)
    if count == 0:
        errors.append(line_error(1, "empty_file", "the input file has no lines"))
    return errors


def split_lines(chunks: Iterator[bytes], max_line_bytes: int) -> Iterator[tuple[int, bytes | None]]:
    """(line number from 1, its bytes) for each non-blank line of a file read in chunks; None for a
    line over `max_line_bytes`, whose bytes are skipped rather than held."""
    number, rest, over = 1, bytearray(), False
    for chunk in chunks:
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            if not over:
                rest += chunk[start:] if end < 0 else chunk[start:end]
                if len(rest) > max_line_bytes:
                    over = True
                    rest.clear()
            if end < 0:
                break
            if over or rest.strip():
                yield number, None if over else bytes(rest)
            number += 1
            rest.clear()
            over = False
            start = end + 1
    if over or rest.strip():
        yield number, None if over else bytes(rest)


class BatchStore:
    def __init__(self, db: Database) -> None:
        self.db = db
        self.files = FileStore(db)

    # -- the API's calls -------------------------------------------------------------------------

    def create(self, key_id: str | None, input_file_id: str, endpoint: str, metadata: dict | None,
               lease: int) -> dict:
        """The batch, `validating` under a lease of this gateway (the route validates it next)."""
        row = self.files.record(key_id, input_file_id)      # another key's file: 404
        if row["purpose"] != "batch":
            raise InvalidRequest(f"input_file_id {input_file_id!r} has purpose {row['purpose']!r}; a batch's input "
                                 "must be uploaded with purpose 'batch'", param="input_file_id")
        now = int(time.time())
        batch_id = new_id("batch")
        self.db.execute(
            "INSERT INTO batches (id, key_id, endpoint, input_file_id, completion_window, status, metadata, total, "
            "lease_until, created_at, expires_at) VALUES (?, ?, ?, ?, '24h', 'validating', ?, 0, ?, ?, ?)",
            (batch_id, owner(key_id), endpoint, input_file_id, json.dumps(metadata) if metadata else None,
             now + lease, now, now + WINDOW))
        return self.get(key_id, batch_id)

    def validate(self, batch_id: str, endpoint: str, model_error: Callable[[str], tuple[str, str] | None],
                 max_lines: int, max_line_bytes: int = MAX_LINE_BYTES) -> None:
        """Check the batch's input file (a first read, keeping only the custom_ids), then store
        every line (a second read) and start the batch, or fail it with the errors."""
        batch, chunks = self.input_chunks(batch_id)
        errors = parse_lines(chunks, endpoint, model_error, max_lines, max_line_bytes=max_line_bytes)
        if errors:
            return self.validated(batch_id, None, errors)
        self.validated(batch_id, lambda sink: parse_lines(self.input_chunks(batch_id)[1], endpoint, model_error,
                                                          max_lines, sink, max_line_bytes), [])

    def validated(self, batch_id: str, lines: Callable[[Callable[[str, dict], None]], object] | None,
                  errors: list[dict]) -> None:
        """Validation's outcome: every line stored (`lines` hands them to its sink) and the batch
        in progress, or the batch failed with its errors (at most MAX_ERRORS listed), in one
        transaction."""
        now = int(time.time())
        with self.db.transaction() as tx:
            if errors:
                listed = errors[:MAX_ERRORS]
                if len(errors) > MAX_ERRORS:
                    listed.append(line_error(errors[MAX_ERRORS]["line"], "too_many_errors",
                                             f"{len(errors) - MAX_ERRORS} more errors not listed"))
                tx.execute("UPDATE batches SET status = 'failed', failed_at = ?, lease_until = NULL, errors = ? "
                           "WHERE id = ? AND status = 'validating'", (now, json.dumps(listed), batch_id))
                return
            count = 0

            def sink(custom_id: str, body: dict) -> None:
                nonlocal count
                tx.execute("INSERT INTO batch_lines (batch_id, line, custom_id, body, done) VALUES (?, ?, ?, ?, 0)",
                           (batch_id, count, custom_id, json.dumps(body)))
                count += 1
            if lines is not None:
                lines(sink)
            tx.execute("UPDATE batches SET status = 'in_progress', in_progress_at = ?, total = ?, lease_until = NULL "
                       "WHERE id = ? AND status = 'validating'", (now, count, batch_id))

    def input_chunks(self, batch_id: str) -> tuple[dict, Iterator[bytes]]:
        batch = self._row(None, batch_id, any_key=True)
        return batch, self.files.content(batch["key_id"], batch["input_file_id"])[1]

    def _row(self, key_id: str | None, batch_id: str, any_key: bool = False) -> dict:
        rows = (self.db.query("SELECT * FROM batches WHERE id = ?", (batch_id,)) if any_key else
                self.db.query("SELECT * FROM batches WHERE id = ? AND key_id = ?", (batch_id, owner(key_id))))
        if not rows:
            raise ObjectNotFound(f"no batch with id {batch_id!r}", param="batch_id")
        return rows[0]

    def get(self, key_id: str | None, batch_id: str) -> dict:
        return self.render(self._row(key_id, batch_id))

    def render(self, row: dict) -> dict:
        """OpenAI's Batch object; request_counts from the lines' rows."""
        counts = self.db.query("SELECT SUM(CASE WHEN done = 1 AND ok = 1 THEN 1 ELSE 0 END) AS completed, "
                               "SUM(CASE WHEN done = 1 AND ok = 0 THEN 1 ELSE 0 END) AS failed "
                               "FROM batch_lines WHERE batch_id = ?", (row["id"],))[0]
        errors = json.loads(row["errors"]) if row["errors"] else None
        return {"id": row["id"], "object": "batch", "endpoint": row["endpoint"],
                "errors": {"object": "list", "data": errors} if errors is not None else None,
                "input_file_id": row["input_file_id"], "completion_window": row["completion_window"],
                "status": row["status"], "output_file_id": row["output_file_id"],
                "error_file_id": row["error_file_id"], **{t: row[t] for t in TIMES},
                "request_counts": {"total": row["total"], "completed": int(counts["completed"] or 0),
                                   "failed": int(counts["failed"] or 0)},
                "metadata": json.loads(row["metadata"]) if row["metadata"] else None}

    def listed(self, key_id: str | None, limit: int, after: str | None, every_key: bool = False) -> dict:
        """Batches newest first (OpenAI's order), from the one after `after`."""
        where, params = [], []
        if not every_key or key_id is not None:
            where.append("key_id = ?")
            params.append(owner(key_id))
        if after is not None:
            where.append("id < ?")
            params.append(after)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        rows = self.db.query(f"SELECT * FROM batches {clause} ORDER BY id DESC LIMIT ?", (*params, limit + 1))
        return first_id_page(rows, limit, lambda r: {**self.render(r), **({"key_id": r["key_id"]} if every_key else {})})

    def cancel(self, key_id: str | None, batch_id: str) -> dict:
        """No line is leased from now on; runners abort the ones in flight at their next renewal
        (or here, by the caller), and the batch ends `cancelled` once none is."""
        row = self._row(key_id, batch_id)
        now = int(time.time())
        if row["status"] in ("validating", "in_progress"):
            self.db.execute("UPDATE batches SET status = 'cancelling', cancelling_at = ?, lease_until = NULL "
                            "WHERE id = ? AND status IN ('validating', 'in_progress')", (now, batch_id))
        return self.get(key_id, batch_id)

    def cancel_any(self, actor: str, batch_id: str) -> dict:
        """Any key's batch cancelled by an admin (the console), audited; the batch as its owner sees it."""
        owner_id = self._row(None, batch_id, any_key=True)["key_id"]
        answer = self.cancel(owner_id, batch_id)
        audit(self.db, actor, "batch.cancel", batch_id, {"key_id": owner_id, "status": answer["status"]})
        return answer

    # -- the runners' calls (batch/runner) ---------------------------------------------------------

    def lease_lines(self, token: str, n: int, lease: int, now: int | None = None) -> list[Line]:
        """Up to `n` open lines of in-progress batches (the oldest batch's first), leased to
        `token` until now + lease. Two runners racing for a line: the UPDATE's own WHERE is
        checked again on the row it writes (SQLite: one writer at a time; PostgreSQL: a row
        another transaction changed is re-read), so one of them gets it."""
        now = int(time.time()) if now is None else now
        rows = self.db.query(
            "SELECT l.batch_id, l.line FROM batch_lines l JOIN batches b ON b.id = l.batch_id "
            "WHERE b.status = 'in_progress' AND b.expires_at > ? AND l.done = 0 "
            "AND (l.lease_until IS NULL OR l.lease_until < ?) ORDER BY l.batch_id, l.line LIMIT ?", (now, now, n))
        taken = []
        for r in rows:
            if self.db.execute("UPDATE batch_lines SET lease_owner = ?, lease_until = ? WHERE batch_id = ? AND line = ? "
                               "AND done = 0 AND (lease_until IS NULL OR lease_until < ?)",
                               (token, now + lease, r["batch_id"], r["line"], now)):
                taken.append((r["batch_id"], r["line"]))
        lines = []
        for batch_id, line in taken:
            got = self.db.query("SELECT l.custom_id, l.body, b.key_id, b.endpoint FROM batch_lines l JOIN batches b "
                                "ON b.id = l.batch_id WHERE l.batch_id = ? AND l.line = ?", (batch_id, line))[0]
            lines.append(Line(batch_id, line, got["custom_id"], json.loads(got["body"]), got["key_id"],
                              got["endpoint"]))
        return lines

    def renew(self, token: str, lines: list[tuple[str, int]], until: int) -> set[str]:
        """Extend this runner's leases; the batches among them that are no longer in progress
        (cancelled, expired): their lines should stop."""
        stopped = set()
        for batch_id in {b for b, _ in lines}:
            if self.db.query("SELECT status FROM batches WHERE id = ?", (batch_id,))[0]["status"] != "in_progress":
                stopped.add(batch_id)
        for batch_id, line in lines:
            if batch_id not in stopped:
                self.db.execute("UPDATE batch_lines SET lease_until = ? WHERE batch_id = ? AND line = ? AND done = 0 "
                                "AND lease_owner = ?", (until, batch_id, line, token))
        return stopped

    def finish_line(self, line: Line, ok: bool, result: dict) -> bool:
        """The line's result, stored once: False when it was stored already (a redo)."""
        return bool(self.db.execute("UPDATE batch_lines SET done = 1, ok = ?, result = ?, lease_until = NULL "
                                    "WHERE batch_id = ? AND line = ? AND done = 0",
                                    (int(ok), json.dumps(result), line.batch_id, line.line)))

    def release_line(self, line: Line, token: str, retry_at: int | None) -> None:
        """A line not run to its end (its gateway stopping, the key's rate limit, an engine not
        ready): open again, at once or from `retry_at`."""
        self.db.execute("UPDATE batch_lines SET lease_until = ? WHERE batch_id = ? AND line = ? AND done = 0 "
                        "AND lease_owner = ?", (retry_at, line.batch_id, line.line, token))

    def leases_seen(self, batch_id: str) -> list[str]:
        """Who holds or last held a lease on the batch's lines (tests: both gateways ran some)."""
        return [r["lease_owner"] for r in self.db.query(
            "SELECT DISTINCT lease_owner FROM batch_lines WHERE batch_id = ? AND lease_owner IS NOT NULL", (batch_id,))]

    def take(self, lease: int, now: int | None = None) -> tuple[str, str] | None:
        """A batch with a phase to do here: (id, what) — "validate" (a validating batch whose
        gateway died: failed, its lines are unknown), "finalize" (every line done), "cancel"
        (cancelling, no line in flight anywhere), "expire" (past its 24 h); leased to this
        runner for `lease` seconds. None: nothing to do."""
        now = int(time.time()) if now is None else now
        rows = self.db.query("SELECT id, status, expires_at FROM batches WHERE status IN (?, ?, ?, ?) "
                             "AND (lease_until IS NULL OR lease_until < ?) ORDER BY id", (*ACTIVE, now))
        for r in rows:
            what = None
            if r["status"] == "validating":
                what = "validate"
            elif r["status"] == "finalizing":
                what = "finalize"
            elif r["expires_at"] <= now:
                what = "expire"
            elif r["status"] == "cancelling":
                busy = self.db.query("SELECT COUNT(*) AS n FROM batch_lines WHERE batch_id = ? AND done = 0 "
                                     "AND lease_until IS NOT NULL AND lease_until >= ?", (r["id"], now))[0]["n"]
                what = "cancel" if not busy else None
            elif r["status"] == "in_progress":
                open_ = self.db.query("SELECT COUNT(*) AS n FROM batch_lines WHERE batch_id = ? AND done = 0",
                                      (r["id"],))[0]["n"]
                what = "finalize" if not open_ else None
            if what is None:
                continue
            if self.db.execute("UPDATE batches SET lease_until = ? WHERE id = ? AND status = ? "
                               "AND (lease_until IS NULL OR lease_until < ?)", (now + lease, r["id"], r["status"], now)):
                return r["id"], what
        return None

    def fail_validation(self, batch_id: str) -> None:
        self.validated(batch_id, None, [line_error(0, "server_error", "the gateway validating this batch stopped; "
                                                   "create it again")])

    def finalize(self, batch_id: str, ending: str) -> None:
        """The output and error files from the lines' results, in line order, and the batch's
        end (`ending`: completed, cancelled or expired), in one transaction. An expired batch's
        lines that never ran are in the error file as `batch_expired`, as OpenAI writes them."""
        now = int(time.time())
        with self.db.transaction() as tx:
            row = tx.query("SELECT * FROM batches WHERE id = ?", (batch_id,))[0]
            if row["status"] not in ACTIVE:
                return
            if row["status"] == "in_progress" and ending == "completed":
                tx.execute("UPDATE batches SET status = 'finalizing', finalizing_at = ? WHERE id = ?", (now, batch_id))

            def results(ok: int) -> Iterator[bytes]:
                after = -1
                while True:
                    page = tx.query("SELECT line, custom_id, done, ok, result FROM batch_lines WHERE batch_id = ? "
                                    "AND line > ? ORDER BY line LIMIT ?", (batch_id, after, PAGE))
                    if not page:
                        return
                    after = page[-1]["line"]
                    out = []
                    for r in page:
                        if r["done"] and r["ok"] == ok:
                            out.append(r["result"])
                        elif not r["done"] and not ok and ending == "expired":
                            out.append(json.dumps({"id": f"batch_req_{batch_id[6:]}_{r['line']}",
                                                   "custom_id": r["custom_id"], "response": None, "error": {
                                                       "code": "batch_expired",
                                                       "message": "This line could not be executed before the "
                                                                  "completion window expired."}}))
                    if out:
                        yield ("\n".join(out) + "\n").encode()
            key = row["key_id"]
            output = self.files.write(key, OUTPUT_PURPOSE, f"{batch_id}_output.jsonl", results(1), tx=tx)
            error = self.files.write(key, OUTPUT_PURPOSE, f"{batch_id}_error.jsonl", results(0), tx=tx)
            stamp = {"completed": "completed_at", "cancelled": "cancelled_at", "expired": "expired_at"}[ending]
            tx.execute(f"UPDATE batches SET status = ?, {stamp} = ?, lease_until = NULL, output_file_id = ?, "
                       "error_file_id = ? WHERE id = ?",
                       (ending, now, output["id"] if output["bytes"] else None,
                        error["id"] if error["bytes"] else None, batch_id))
            for made in (output, error):
                if not made["bytes"]:          # an empty file is not kept (OpenAI gives no id then)
                    tx.execute("DELETE FROM files WHERE id = ?", (made["id"],))
