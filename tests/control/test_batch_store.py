"""The Files and Batches store on a real SQLite file and a real PostgreSQL (control/files,
control/batches): chunked files and their sha256 check, line leases (exclusive, re-leased once
they pass), a line's result stored once, cancel and expiry."""

from __future__ import annotations

import io
import json
import threading
import time

import pytest

from modelyard.control.batches import BatchStore, WINDOW
from modelyard.control.files import CHUNK, ORPHAN_SECONDS, UPLOAD_CHUNKS_PER_TX, FileStore
from modelyard.errors import DataCorrupt, InvalidRequest, ObjectNotFound

KEY = "key-a"


def jsonl(n: int) -> bytes:
    return "".join(json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions",
                               "body": {"model": "m", "prompt": str(i)}}) + "\n" for i in range(n)).encode()


def started(db, n: int = 10) -> tuple[BatchStore, str]:
    store = BatchStore(db)
    f = store.files.upload(KEY, "batch", "in.jsonl", io.BytesIO(jsonl(n)), 10_000_000, 1000)
    b = store.create(KEY, f["id"], "/v1/completions", {"team": "x"}, 60)
    store.validate(b["id"], "/v1/completions", lambda model: None, 1000)
    assert store.get(KEY, b["id"])["status"] == "in_progress"
    return store, b["id"]


def test_a_file_is_chunked_and_checked(db):
    files = FileStore(db)
    data = bytes(range(256)) * (CHUNK // 256 * 2 + 10)         # a little over two chunks
    f = files.upload(KEY, "user_data", "x.bin", io.BytesIO(data), len(data), 10)
    assert f["bytes"] == len(data)
    assert [r["n"] for r in db.query("SELECT COUNT(*) AS n FROM file_chunks WHERE file_id = ?", (f["id"],))] == [3]
    assert b"".join(files.content(KEY, f["id"])[1]) == data
    with pytest.raises(ObjectNotFound):
        files.get("key-b", f["id"])
    # one byte changed in the database: an error before anything is served
    db.execute("UPDATE file_chunks SET data = ? WHERE file_id = ? AND seq = 1", (b"\x00" * CHUNK, f["id"]))
    with pytest.raises(DataCorrupt):
        files.verified(KEY, f["id"])
    with pytest.raises(InvalidRequest, match="max_file_bytes"):
        files.upload(KEY, "user_data", "big.bin", io.BytesIO(data), len(data) - 1, 10)
    with pytest.raises(InvalidRequest, match="max_batch_lines"):
        files.upload(KEY, "batch", "many.jsonl", io.BytesIO(jsonl(11)), 10_000_000, 10)


class Watched(io.BytesIO):
    """An upload's source that, at each read, asks from another thread whether the database's
    connection is free: a gateway has one (control/db), and every request's reads and writes
    wait for it."""

    def __init__(self, data: bytes, db) -> None:
        super().__init__(data)
        self.db, self.reads, self.held = db, 0, 0

    def read(self, n: int = -1) -> bytes:
        free: list[bool] = []

        def probe() -> None:
            got = self.db._lock.acquire(blocking=False)
            free.append(got)
            if got:
                self.db._lock.release()
        t = threading.Thread(target=probe)
        t.start()
        t.join()
        self.reads += 1
        self.held += not free[0]
        return super().read(n)


def test_an_upload_holds_the_database_a_few_chunks_at_a_time(db):
    """Each group of chunks is read before its transaction opens: the connection is free at
    every read of the source (in one transaction it was held from the first chunk to the row)."""
    files = FileStore(db)
    data = bytes(range(256)) * (CHUNK // 256) * (3 * UPLOAD_CHUNKS_PER_TX) + b"tail"
    source = Watched(data, db)
    f = files.upload(KEY, "user_data", "big.bin", source, len(data), 10)
    assert source.reads > 3 * UPLOAD_CHUNKS_PER_TX and source.held == 0, (source.reads, source.held)
    assert b"".join(files.content(KEY, f["id"])[1]) == data


def test_a_refused_upload_leaves_no_chunks_and_a_dead_ones_are_swept(db):
    files = FileStore(db)
    data = b"x" * (CHUNK * (2 * UPLOAD_CHUNKS_PER_TX) + 1)
    with pytest.raises(InvalidRequest, match="max_file_bytes"):      # refused after two groups were written
        files.upload(KEY, "user_data", "big.bin", io.BytesIO(data), len(data) - 1, 10)
    assert db.query("SELECT COUNT(*) AS n FROM file_chunks")[0]["n"] == 0
    # a gateway killed mid-upload left chunks without a row: an old one's and a recent one's
    now = time.time()
    dead, recent = (f"file-{int(t * 1_000_000):014x}00000000aa" for t in (now - ORPHAN_SECONDS - 60, now - 60))
    for orphan in (dead, recent):
        db.execute("INSERT INTO file_chunks (file_id, seq, data) VALUES (?, ?, ?)", (orphan, 0, b"lost"))
    kept = files.upload(KEY, "user_data", "small.bin", io.BytesIO(b"kept"), 100, 10)   # sweeps first
    left = {r["file_id"] for r in db.query("SELECT DISTINCT file_id FROM file_chunks")}
    assert left == {recent, kept["id"]}, left      # an upload under way elsewhere is not touched
    assert files.sweep_orphans(now + ORPHAN_SECONDS) == 1 and b"".join(files.content(KEY, kept["id"])[1]) == b"kept"


def test_leases_are_exclusive_and_pass(db):
    store, batch_id = started(db, 10)
    now = int(time.time())
    a = store.lease_lines("gw-a", 4, 60, now)
    b = store.lease_lines("gw-b", 100, 60, now)
    assert [x.line for x in a] == [0, 1, 2, 3] and [x.line for x in b] == list(range(4, 10))
    assert store.lease_lines("gw-c", 100, 60, now) == []
    # gw-a dies: once its leases pass, gw-c takes its lines; gw-b's are still held
    again = store.lease_lines("gw-c", 100, 60, now + 61)
    assert sorted(x.line for x in again) == list(range(10))
    line = again[0]
    result = {"custom_id": line.custom_id, "response": {"status_code": 200, "body": {}}}
    assert store.finish_line(line, True, result) is True
    assert store.finish_line(a[0], True, result) is False        # the dead gateway's redo: not a second result
    assert store.get(KEY, batch_id)["request_counts"] == {"total": 10, "completed": 1, "failed": 0}


def test_a_batch_completes_once_every_line_is_done(db):
    store, batch_id = started(db, 3)
    for line in store.lease_lines("gw", 10, 60):
        store.finish_line(line, line.line != 1, {"id": str(line.line), "custom_id": line.custom_id})
    assert store.take(60) == (batch_id, "finalize")
    assert store.take(60) is None                  # leased: nobody else finalizes it meanwhile
    store.finalize(batch_id, "completed")
    done = store.get(KEY, batch_id)
    assert done["status"] == "completed" and done["finalizing_at"] and done["completed_at"]
    out = b"".join(store.files.content(KEY, done["output_file_id"])[1]).decode().splitlines()
    err = b"".join(store.files.content(KEY, done["error_file_id"])[1]).decode().splitlines()
    assert [json.loads(x)["custom_id"] for x in out] == ["c0", "c2"]
    assert [json.loads(x)["custom_id"] for x in err] == ["c1"]
    assert store.files.get(KEY, done["output_file_id"])["purpose"] == "batch_output"


def test_cancel_waits_for_lines_in_flight(db):
    store, batch_id = started(db, 5)
    now = int(time.time())
    held = store.lease_lines("gw", 2, 60, now)
    assert store.cancel(KEY, batch_id)["status"] == "cancelling"
    assert store.lease_lines("gw", 10, 60, now) == []               # no new line once cancelling
    assert store.renew("gw", [(x.batch_id, x.line) for x in held], now + 60) == {batch_id}
    assert store.take(60, now) is None                              # two lines still in flight
    for line in held:
        store.release_line(line, "gw", None)                        # aborted by their runner
    assert store.take(60, now) == (batch_id, "cancel")
    store.finalize(batch_id, "cancelled")
    ended = store.get(KEY, batch_id)
    assert ended["status"] == "cancelled" and ended["cancelled_at"] and ended["output_file_id"] is None


def test_a_batch_past_its_window_expires(db):
    store, batch_id = started(db, 3)
    line = store.lease_lines("gw", 1, 60)[0]
    store.finish_line(line, True, {"id": "0", "custom_id": line.custom_id})
    later = int(time.time()) + WINDOW + 1
    assert store.lease_lines("gw", 10, 60, later) == []             # nothing runs past the window
    assert store.take(60, later) == (batch_id, "expire")
    store.finalize(batch_id, "expired")
    ended = store.get(KEY, batch_id)
    assert ended["status"] == "expired" and ended["expired_at"]
    err = [json.loads(x) for x in b"".join(store.files.content(KEY, ended["error_file_id"])[1]).decode().splitlines()]
    assert [(e["custom_id"], e["error"]["code"]) for e in err] == [("c1", "batch_expired"), ("c2", "batch_expired")]


def test_a_validating_batch_whose_gateway_died_fails(db):
    store = BatchStore(db)
    f = store.files.upload(KEY, "batch", "in.jsonl", io.BytesIO(jsonl(2)), 10_000_000, 1000)
    b = store.create(KEY, f["id"], "/v1/completions", None, 5)
    assert store.take(60) is None                                   # its gateway's lease holds
    assert store.take(60, int(time.time()) + 6) == (b["id"], "validate")
    store.fail_validation(b["id"])
    assert store.get(KEY, b["id"])["status"] == "failed"


def test_lines_are_numbered_as_the_file_is_and_bounded():
    from modelyard.control.batches import split_lines
    data = [b'{"a":', b' 1}\n\n  \n', b'x' * 50 + b'\n{"b": 2}', b'\n' + b'y' * 30]
    assert list(split_lines(iter(data), 40)) == [(1, b'{"a": 1}'), (4, None), (5, b'{"b": 2}'), (6, b'y' * 30)]
