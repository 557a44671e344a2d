"""The control plane's schema, as numbered steps (portable SQL: SQLite and PostgreSQL).

Never edit a step that has shipped: add the next one. Steps are applied by number, each one
that a database lacks (not only those above its highest): numbers are reserved per branch, so a
database may have 6 before it gets 4. Times are unix seconds (BIGINT); lists
are JSON text; booleans are 0/1.
"""

MIGRATIONS: list[tuple[int, list[str]]] = [
    (1, [
        """CREATE TABLE api_keys (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            prefix TEXT NOT NULL,
            digest TEXT NOT NULL UNIQUE,
            rpm BIGINT,
            tpm BIGINT,
            endpoints TEXT,
            expires_at BIGINT,
            created_at BIGINT NOT NULL,
            updated_at BIGINT NOT NULL,
            revoked_at BIGINT,
            revision BIGINT NOT NULL
        )""",
        "CREATE INDEX api_keys_updated ON api_keys (updated_at)",
        """CREATE TABLE audit_log (
            id TEXT PRIMARY KEY,
            at BIGINT NOT NULL,
            actor TEXT NOT NULL,
            action TEXT NOT NULL,
            object_id TEXT NOT NULL,
            detail TEXT NOT NULL
        )""",
        "CREATE INDEX audit_log_at ON audit_log (at)",
    ]),
    (2, [
        # One row per key, endpoint and minute; the request path adds to memory, a flush every
        # few seconds upserts here (control/usage.py).
        """CREATE TABLE usage (
            key_id TEXT NOT NULL,
            endpoint TEXT NOT NULL,
            minute BIGINT NOT NULL,
            requests BIGINT NOT NULL,
            prompt_tokens BIGINT NOT NULL,
            completion_tokens BIGINT NOT NULL,
            PRIMARY KEY (key_id, endpoint, minute)
        )""",
        "CREATE INDEX usage_minute ON usage (minute)",
    ]),
    (3, [
        # rotation: the secret a key had before its last rotation stays valid until previous_until
        "ALTER TABLE api_keys ADD COLUMN previous_digest TEXT",
        "ALTER TABLE api_keys ADD COLUMN previous_until BIGINT",
    ]),
    (4, [
        # a key's requests in flight at once, and its token budget per UTC day or month
        "ALTER TABLE api_keys ADD COLUMN max_parallel BIGINT",
        "ALTER TABLE api_keys ADD COLUMN budget_tokens BIGINT",
        "ALTER TABLE api_keys ADD COLUMN budget_period TEXT",
        # (This step once also created `quota_blocks`, the leases of `[quota] backend = "postgres"`:
        # that table is the quota backend's own now, created by quota/postgres.PostgresQuotas.prepare
        # (IF NOT EXISTS), so a database that has it from here keeps it and one that has not gets it
        # from the backend; the control plane's schema no longer names it.)
    ]),
    (5, [
        # Run-time model endpoints (control/endpoints.py): the spec as JSON (settings.spec_fields),
        # what an admin asked for (loaded / unloaded); a deleted endpoint's row is removed.
        """CREATE TABLE model_endpoints (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            spec TEXT NOT NULL,
            desired TEXT NOT NULL,
            created_at BIGINT NOT NULL,
            updated_at BIGINT NOT NULL,
            revision BIGINT NOT NULL
        )""",
    ]),
    (6, [
        # admin tokens made by `modelyard admin create-token` (control/admin_tokens.py): the
        # token's sha256 and a prefix to recognise it by, never the token; revoked rows stay
        """CREATE TABLE admin_tokens (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            role TEXT NOT NULL,
            prefix TEXT NOT NULL,
            digest TEXT NOT NULL UNIQUE,
            created_at BIGINT NOT NULL,
            revoked_at BIGINT
        )""",
    ]),
    (7, [
        # the web console's session key (console/session.py): one random secret per database,
        # so a session cookie signed by one gateway process is valid in every process sharing it;
        # later also the configured keys' id key (quota/keys.configured_id, control/records.server_secret)
        """CREATE TABLE console_secret (
            name TEXT PRIMARY KEY,
            value TEXT NOT NULL,
            created_at BIGINT NOT NULL
        )""",
    ]),
    (8, [
        # console sessions kept on the server (control/sessions.py): the sha256 of the random id
        # the cookie holds (never the id), a digest naming its admin token, its expiry. A read
        # of the database (a backup, a 0644 file) gives no cookie: the signing key of step 7 did.
        """CREATE TABLE console_sessions (
            id_digest TEXT PRIMARY KEY,
            token_ref TEXT NOT NULL,
            expires_at BIGINT NOT NULL,
            created_at BIGINT NOT NULL
        )""",
        "CREATE INDEX console_sessions_token ON console_sessions (token_ref)",
        # the old signing key forges sessions for whoever has read it: it goes (its table stays
        # for a process of the version before, which makes a new key that no one here trusts)
        "DELETE FROM console_secret WHERE name = 'session_hmac'",
    ]),
    (9, [
        # OpenAI's Responses API (control/responses.py): the Response object as answered (JSON),
        # owned by the key that created it (another key gets 404), swept once expires_at passes;
        # its input items (the whole context it was generated from, chain included) in order,
        # so that input_items pages and a continuation reads them without walking the chain.
        # lease_until: a background response in progress, renewed by the gateway running it;
        # one whose lease passed (its gateway died) is marked failed.
        """CREATE TABLE responses (
            id TEXT PRIMARY KEY,
            key_id TEXT NOT NULL,
            model TEXT NOT NULL,
            status TEXT NOT NULL,
            previous_response_id TEXT,
            body TEXT NOT NULL,
            created_at BIGINT NOT NULL,
            expires_at BIGINT NOT NULL,
            lease_until BIGINT
        )""",
        "CREATE INDEX responses_expires ON responses (expires_at)",
        """CREATE TABLE response_items (
            response_id TEXT NOT NULL,
            position BIGINT NOT NULL,
            id TEXT NOT NULL,
            item TEXT NOT NULL,
            PRIMARY KEY (response_id, position)
        )""",
        # conversations (control/conversations.py): their items in order, appended by the
        # responses made in them; owned and swept as responses are (expires_at moves on with
        # every change)
        """CREATE TABLE conversations (
            id TEXT PRIMARY KEY,
            key_id TEXT NOT NULL,
            metadata TEXT NOT NULL,
            created_at BIGINT NOT NULL,
            expires_at BIGINT NOT NULL
        )""",
        "CREATE INDEX conversations_expires ON conversations (expires_at)",
        """CREATE TABLE conversation_items (
            conversation_id TEXT NOT NULL,
            position BIGINT NOT NULL,
            id TEXT NOT NULL,
            item TEXT NOT NULL,
            PRIMARY KEY (conversation_id, position)
        )""",
    ]),
    (10, [
        # OpenAI's Files API (control/files.py): a file's record, owned by the key that uploaded
        # it (another key gets 404); its bytes in chunks of at most 1 MiB (never one value of
        # 200 MB in memory), their sha256 checked on every read. BYTEA: PostgreSQL's bytes;
        # SQLite keeps a blob as it is whatever the column's declared type.
        """CREATE TABLE files (
            id TEXT PRIMARY KEY,
            key_id TEXT NOT NULL,
            purpose TEXT NOT NULL,
            filename TEXT NOT NULL,
            bytes BIGINT NOT NULL,
            lines BIGINT NOT NULL,
            sha256 TEXT NOT NULL,
            created_at BIGINT NOT NULL
        )""",
        "CREATE INDEX files_key ON files (key_id, id)",
        """CREATE TABLE file_chunks (
            file_id TEXT NOT NULL,
            seq BIGINT NOT NULL,
            data BYTEA NOT NULL,
            PRIMARY KEY (file_id, seq)
        )""",
        # OpenAI's Batch API (control/batches.py): the batch (status, times, errors as JSON;
        # lease_until: who validates or finalizes it, a phase a killed gateway leaves to the
        # next), and one row per input line: its request, the gateway's lease on it while it
        # runs, its result once done. (batch_id, line) is the key: a line redone after its
        # lease passed stores one result, whoever finishes first (`done = 0` in the update).
        """CREATE TABLE batches (
            id TEXT PRIMARY KEY,
            key_id TEXT NOT NULL,
            endpoint TEXT NOT NULL,
            input_file_id TEXT NOT NULL,
            completion_window TEXT NOT NULL,
            status TEXT NOT NULL,
            metadata TEXT,
            errors TEXT,
            total BIGINT NOT NULL,
            output_file_id TEXT,
            error_file_id TEXT,
            lease_until BIGINT,
            created_at BIGINT NOT NULL,
            in_progress_at BIGINT,
            expires_at BIGINT NOT NULL,
            finalizing_at BIGINT,
            completed_at BIGINT,
            failed_at BIGINT,
            expired_at BIGINT,
            cancelling_at BIGINT,
            cancelled_at BIGINT
        )""",
        "CREATE INDEX batches_key ON batches (key_id, id)",
        "CREATE INDEX batches_status ON batches (status)",
        """CREATE TABLE batch_lines (
            batch_id TEXT NOT NULL,
            line BIGINT NOT NULL,
            custom_id TEXT NOT NULL,
            body TEXT NOT NULL,
            done BIGINT NOT NULL,
            ok BIGINT,
            lease_owner TEXT,
            lease_until BIGINT,
            result TEXT,
            PRIMARY KEY (batch_id, line)
        )""",
        "CREATE INDEX batch_lines_open ON batch_lines (batch_id, done, lease_until)",
    ]),
    (11, [
        # batch lines' share of a usage row (control/usage): requests and tokens a batch ran,
        # counted in the row's totals too (budgets read the totals), shown apart
        "ALTER TABLE usage ADD COLUMN batch_requests BIGINT NOT NULL DEFAULT 0",
        "ALTER TABLE usage ADD COLUMN batch_tokens BIGINT NOT NULL DEFAULT 0",
    ]),
]
