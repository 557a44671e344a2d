"""OpenAI's Files API's store: a file's record and its bytes in the control database, which every
gateway sharing it reads (a batch's input uploaded through one gateway runs on all of them).

The bytes are kept in chunks of at most CHUNK (1 MiB), so that no part of the server ever holds a
whole file (200 MB by default, `[server] max_file_bytes`): an upload is copied from Starlette's
spooled temporary file a chunk at a time, a download is sent a chunk at a time. Each chunk keeps
the file keeps the sha256 and size of all its bytes: a download reads every chunk and checks
them before the answer's headers go (a mismatch is `DataCorrupt`, a 500, never the file), then
sends them a chunk at a time, checking them again as it goes (a change in between cuts the
answer short of its Content-Length).

An upload is written a few chunks per transaction (UPLOAD_CHUNKS_PER_TX), each group read from
the source before its transaction opens, and its `files` row last: a gateway's database
connection (control/db) is one, behind one lock, so an upload in one transaction held every
other request's reads and writes (usage, keys, batches) for as long as it took to copy the
file in (0.68 s for 106 MB on SQLite). Until its row exists a file is invisible (every read goes
through `files`), so nobody sees part of one. An upload refused part-way deletes what it wrote;
one whose gateway died part-way leaves chunks without a row, which the next upload anywhere
sweeps once they are ORPHAN_SECONDS old (the id's leading microseconds say when it began).

Ownership is a WHERE clause, as for stored responses (control/responses): every read names the
key, so another key's file is "not found". Blocking calls (control/db): callers run them on a
worker thread.
"""

from __future__ import annotations

import hashlib
import time
from typing import BinaryIO, Callable, Iterable, Iterator

from ..errors import DataCorrupt, InvalidRequest, ObjectNotFound
from .db import Database
from .records import first_id_page, new_id
from .responses import owner

CHUNK = 1 << 20
UPLOAD_CHUNKS_PER_TX = 4        # ~26 ms of the connection's lock per group on SQLite, not the whole file
ORPHAN_SECONDS = 3600           # an upload's copy takes seconds; its chunks unclaimed for an hour are a dead one's
PURPOSES = ("batch", "user_data")           # what a client may upload
OUTPUT_PURPOSE = "batch_output"             # what the batch runner writes


def file_object(row: dict) -> dict:
    """OpenAI's File object."""
    return {"id": row["id"], "object": "file", "bytes": row["bytes"], "created_at": row["created_at"],
            "filename": row["filename"], "purpose": row["purpose"], "status": "processed"}


class FileStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def upload(self, key_id: str | None, purpose: str, filename: str, source: BinaryIO, max_bytes: int,
               max_lines: int) -> dict:
        """The file read from `source` a chunk at a time; over `max_bytes`, or a batch input
        over `max_lines` lines, refused (400 naming the limit) and nothing stored."""
        def chunks() -> Iterator[bytes]:
            size = 0
            while piece := source.read(CHUNK):
                size += len(piece)
                if size > max_bytes:
                    raise InvalidRequest(f"file is over this server's limit of {max_bytes} bytes "
                                         "([server] max_file_bytes)", param="file", code="file_too_large")
                yield piece
        self.sweep_orphans()
        return self.write(key_id, purpose, filename, chunks(), max_lines if purpose == "batch" else None)

    def write(self, key_id: str | None, purpose: str, filename: str, pieces: Iterable[bytes],
              max_lines: int | None = None, tx: Database | None = None) -> dict:
        """A file from `pieces` (any sizes), re-cut into CHUNK-sized rows; in `tx` when given
        (the batch runner's output files, with the batch's end), else a few chunks per
        transaction of its own and its row last (see the module's docstring)."""
        file_id = new_id("file").replace("file_", "file-")      # OpenAI's ids: file-...
        group: list[bytes] = []     # chunks read, not written yet
        seq = 0

        def write_group(into: Database) -> None:
            nonlocal seq
            for data in group:
                into.execute("INSERT INTO file_chunks (file_id, seq, data) VALUES (?, ?, ?)", (file_id, seq, data))
                seq += 1
            group.clear()

        def put(data: bytes) -> None:
            group.append(data)
            if tx is not None:
                write_group(tx)
            elif len(group) >= UPLOAD_CHUNKS_PER_TX:
                with self.db.transaction() as own:
                    write_group(own)
        try:
            size, lines, sha256 = self._cut(pieces, max_lines, put)
            row = {"id": file_id, "key_id": owner(key_id), "purpose": purpose, "filename": filename, "bytes": size,
                   "lines": lines, "sha256": sha256, "created_at": int(time.time())}
            insert = ("INSERT INTO files (id, key_id, purpose, filename, bytes, lines, sha256, created_at) "
                      "VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
            if tx is not None:
                tx.execute(insert, tuple(row.values()))
            else:
                with self.db.transaction() as own:      # the last chunks, and the row that makes the file
                    write_group(own)
                    own.execute(insert, tuple(row.values()))
        except BaseException:
            if tx is None:      # what a refused upload wrote so far (a dead gateway's is swept)
                self.db.execute("DELETE FROM file_chunks WHERE file_id = ?", (file_id,))
            raise
        return file_object(row)

    @staticmethod
    def _cut(pieces: Iterable[bytes], max_lines: int | None, put: Callable[[bytes], None]) -> tuple[int, int, str]:
        """`pieces` re-cut into CHUNK-sized parts handed to `put`; (bytes, lines, sha256), or the
        batch input's line limit refused as soon as it is passed."""
        whole = hashlib.sha256()
        size = lines = 0
        last = b"\n"
        pending = bytearray()
        for piece in pieces:
            if not piece:
                continue
            whole.update(piece)
            size += len(piece)
            lines += piece.count(b"\n")
            last = piece[-1:]
            if max_lines is not None and lines > max_lines:
                raise InvalidRequest(f"a batch input file may hold at most {max_lines} lines ([server] "
                                     "max_batch_lines)", param="file", code="too_many_lines")
            pending += piece
            while len(pending) >= CHUNK:
                put(bytes(pending[:CHUNK]))
                del pending[:CHUNK]
        if pending:
            put(bytes(pending))
        lines += last != b"\n"        # a last line without its newline
        if max_lines is not None and lines > max_lines:
            raise InvalidRequest(f"a batch input file may hold at most {max_lines} lines ([server] "
                                 "max_batch_lines)", param="file", code="too_many_lines")
        return size, lines, whole.hexdigest()

    def sweep_orphans(self, now: float | None = None) -> int:
        """Delete the chunks of uploads that began over ORPHAN_SECONDS ago and never got their
        row (their gateway died part-way); returns how many files' chunks went."""
        cutoff = int(((time.time() if now is None else now) - ORPHAN_SECONDS) * 1_000_000)
        before = f"file-{cutoff:014x}"             # ids sort by their leading microseconds
        dead = self.db.query("SELECT DISTINCT file_id FROM file_chunks WHERE file_id < ? "
                             "AND file_id NOT IN (SELECT id FROM files)", (before,))
        for r in dead:
            self.db.execute("DELETE FROM file_chunks WHERE file_id = ?", (r["file_id"],))
        return len(dead)

    def _row(self, key_id: str | None, file_id: str) -> dict:
        rows = self.db.query("SELECT * FROM files WHERE id = ? AND key_id = ?", (file_id, owner(key_id)))
        if not rows:
            raise ObjectNotFound(f"no file with id {file_id!r}", param="file_id")
        return rows[0]

    def owner_of(self, file_id: str) -> str:
        """The key a file belongs to (the admin API's reads of any key's file)."""
        rows = self.db.query("SELECT key_id FROM files WHERE id = ?", (file_id,))
        if not rows:
            raise ObjectNotFound(f"no file with id {file_id!r}", param="file_id")
        return rows[0]["key_id"]

    def get(self, key_id: str | None, file_id: str) -> dict:
        return file_object(self._row(key_id, file_id))

    def record(self, key_id: str | None, file_id: str) -> dict:
        """The stored row (lines and sha256 too): the batch's checks."""
        return self._row(key_id, file_id)

    def listed(self, key_id: str | None, purpose: str | None, limit: int, after: str | None, order: str,
               every_key: bool = False) -> dict:
        """OpenAI's list of files, by creation (`order` asc or desc), from the one after `after`;
        `every_key`: the admin API's, each with its owner."""
        desc = order == "desc"
        where, params = [], []
        if not every_key or key_id is not None:
            where.append("key_id = ?")
            params.append(owner(key_id))
        if purpose is not None:
            where.append("purpose = ?")
            params.append(purpose)
        if after is not None:
            where.append(f"id {'<' if desc else '>'} ?")
            params.append(after)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        rows = self.db.query(f"SELECT * FROM files {clause} ORDER BY id {'DESC' if desc else 'ASC'} LIMIT ?",
                             (*params, limit + 1))
        return first_id_page(rows, limit, lambda r: {**file_object(r), **({"key_id": r["key_id"]} if every_key else {})})

    def content(self, key_id: str | None, file_id: str) -> tuple[dict, Iterator[bytes]]:
        """The file's record and its bytes, a chunk at a time, checked (see the module's docstring)."""
        row = self._row(key_id, file_id)
        return row, self.chunks(row)

    def chunks(self, row: dict) -> Iterator[bytes]:
        whole = hashlib.sha256()
        size = seq = 0
        while True:
            got = self.db.query("SELECT data FROM file_chunks WHERE file_id = ? AND seq = ?", (row["id"], seq))
            if not got:
                break
            data = bytes(got[0]["data"])
            whole.update(data)
            size += len(data)
            seq += 1
            if size > row["bytes"]:
                break
            yield data
        if size != row["bytes"] or whole.hexdigest() != row["sha256"]:
            raise DataCorrupt(f"file {row['id']!r}: its stored bytes do not match the sha256 recorded at "
                                   "upload (the database was changed or damaged); not served", code="file_corrupt")

    def verified(self, key_id: str | None, file_id: str) -> dict:
        """The record, once every chunk has been read and checked (before anything is sent)."""
        row, chunks = self.content(key_id, file_id)
        for _ in chunks:
            pass
        return row

    def delete(self, key_id: str | None, file_id: str) -> None:
        with self.db.transaction() as tx:
            if not tx.execute("DELETE FROM files WHERE id = ? AND key_id = ?", (file_id, owner(key_id))):
                raise ObjectNotFound(f"no file with id {file_id!r}", param="file_id")
            tx.execute("DELETE FROM file_chunks WHERE file_id = ?", (file_id,))
