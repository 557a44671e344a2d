"""modelyard serve | pull | models | admin | batch: argv -> Settings -> server, store, control database,
or a Batch API client (batch_client)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from pathlib import Path

from . import settings as settings_mod
from .errors import ModelyardError
from .settings import ADMIN_ROLES
from .redact import install_log_filter
from .store import ModelStore


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="modelyard", description="Serve your own language models "
                                "behind an OpenAI-compatible model-endpoints API.")
    sub = p.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the configured endpoints (default: smollm2-135m)")
    serve.add_argument("--config", type=Path, help="TOML config file ([server], [[endpoints]])")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 8000)")
    serve.add_argument("--model", help="serve this one model ref instead of the config's endpoints")
    serve.add_argument("--insecure-no-auth", action="store_true", default=None,
                       help="allow serving beyond loopback with no API keys")
    pull = sub.add_parser("pull", help="fetch a model into the store")
    pull.add_argument("ref", help="smollm2-135m, gemma3-270m, a .gguf path, or hf://org/repo/file.gguf")
    sub.add_parser("models", help="list the models in the store")
    admin = sub.add_parser("admin", help="admin tokens for the control plane, kept in its database")
    tokens = admin.add_subparsers(dest="admin_command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, help="the server's TOML config (its database_url, store_dir)")
    create = tokens.add_parser("create-token", parents=[common], help="make a token; it is printed once")
    create.add_argument("--name", required=True, help="who holds it (shown in the audit log)")
    create.add_argument("--role", choices=ADMIN_ROLES, default="admin", help="admin changes, viewer reads")
    tokens.add_parser("list-tokens", parents=[common], help="the active tokens: names, roles, prefixes")
    revoke = tokens.add_parser("revoke-token", parents=[common], help="revoke a token (servers refuse it within 2 s)")
    revoke.add_argument("name")
    _batch_parser(sub)
    return p


def _batch_parser(sub) -> None:
    batch = sub.add_parser("batch", help="OpenAI's Batch API: submit a JSONL file, follow it, download results")
    cmds = batch.add_subparsers(dest="batch_command", required=True)
    server = argparse.ArgumentParser(add_help=False)
    server.add_argument("--url", help="the server's OpenAI base URL (default: $OPENAI_BASE_URL, "
                        "else http://127.0.0.1:8000/v1)")
    server.add_argument("--api-key", help="an inference key (default: $MODELYARD_API_KEY, then $OPENAI_API_KEY)")
    out = argparse.ArgumentParser(add_help=False)
    out.add_argument("--output", type=Path, help="where the output file goes; its error file goes beside "
                     "it (results.jsonl -> results.errors.jsonl)")
    submit = cmds.add_parser("submit", parents=[server, out], help="upload FILE, create the batch, follow it "
                             "with a progress bar and download its results")
    submit.add_argument("file", type=Path, help="the requests, one JSON object per line (OpenAI's batch input)")
    submit.add_argument("--endpoint", default="/v1/chat/completions", help="the route every line calls")
    submit.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE", help="the batch's metadata")
    submit.add_argument("--no-wait", action="store_true", help="print the batch id and return at once")
    submit.add_argument("--poll", type=float, default=2.0, help="seconds between progress checks (0.01 to 600)")
    for name, what in (("status", "the batch's status and counts"), ("cancel", "cancel the batch"),
                       ("download", "download the batch's output and error files")):
        cmd = cmds.add_parser(name, parents=[server] + ([out] if name == "download" else []), help=what)
        cmd.add_argument("id", help="the batch id (batch_...)")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            return serve(args)
        if args.command == "admin":
            return admin(args)
        if args.command == "batch":
            return batch(args)
        cfg = settings_mod.load()
        store = ModelStore(cfg.store_dir)
        if args.command == "pull":
            m = store.pull(args.ref)
            print(f"{m.name}  {m.path}  {m.size} bytes  sha256 {m.sha256}")
        else:
            models = store.list()
            for m in models:
                print(f"{m.name:24} {m.size / 1e6:9.1f} MB  sha256 {m.sha256}  {m.path}")
            if not models:
                print(f"no models in {cfg.store_dir} yet; `modelyard pull smollm2-135m` fetches the default")
        return 0
    except ModelyardError as exc:
        print(f"modelyard: {exc}", file=sys.stderr)
        return 2


def serve(args: argparse.Namespace) -> int:
    from .api.app import create_app
    from .server import Server

    cfg = settings_mod.load(args.config, host=args.host, port=args.port, model=args.model,
                            insecure_no_auth=args.insecure_no_auth)
    if not cfg.admin_tokens:    # tokens made by `modelyard admin` turn the control plane on too
        from .control.admin_tokens import any_active
        if any_active(cfg.database):
            cfg = dataclasses.replace(cfg, stored_admin_tokens=True)
    cfg.check_auth_policy()
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    install_log_filter()       # no URL credentials in any log line
    # Pull missing models now, in the foreground, so the user sees the download's progress.
    store = ModelStore(cfg.store_dir)
    for ep in cfg.endpoints:
        if ep.engine == "llamacpp":
            try:
                store.resolve(ep.model)
            except ModelyardError as exc:   # the endpoint will report it as failed; others serve
                logging.getLogger("modelyard").error("endpoint %s: %s", ep.name, exc)
    Server(create_app(cfg), cfg).run()
    return 0


def admin(args: argparse.Namespace) -> int:
    """create-token | list-tokens | revoke-token on the control database the server would use."""
    from .control.admin_tokens import AdminTokenStore
    from .control.db import open_database

    cfg = settings_mod.load(args.config)
    db = open_database(cfg.database)
    try:
        store = AdminTokenStore(db)
        if args.admin_command == "create-token":
            record, token = store.create("cli", args.name, args.role)
            print(token)
            print(f"admin token {record['name']!r} ({record['role']}) created; it is shown only now. A server "
                  "that had no admin token turns its control plane on at its next start.", file=sys.stderr)
        elif args.admin_command == "list-tokens":
            for t in store.list():
                created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t["created_at"]))
                print(f"{t['name']:24} {t['role']:7} {t['prefix']}...  created {created}")
        else:
            store.revoke("cli", args.name)
            print(f"admin token {args.name!r} revoked; servers refuse it within 2 s", file=sys.stderr)
    finally:
        db.close()
    return 0


def batch(args: argparse.Namespace, env: dict[str, str] | None = None) -> int:
    """submit | status | cancel | download against the server's /files and /batches."""
    import os

    from . import batch_client as bc
    from .errors import InvalidRequest

    env = os.environ if env is None else env
    url = args.url or env.get("OPENAI_BASE_URL") or "http://127.0.0.1:8000/v1"
    key = args.api_key or env.get("MODELYARD_API_KEY") or env.get("OPENAI_API_KEY")
    say = lambda line: print(line, file=sys.stderr)   # noqa: E731
    with bc.BatchClient(url, key) as client:
        if args.batch_command == "submit":
            metadata = {}
            for item in args.metadata:
                k, sep, v = item.partition("=")
                if not sep or not k:
                    raise InvalidRequest(f"--metadata takes KEY=VALUE, got {item!r}", param="metadata")
                metadata[k] = v
            if not 0.01 <= args.poll <= 600:
                raise InvalidRequest(f"--poll is {args.poll:g} seconds; it must be between 0.01 and 600", param="poll")
            output = args.output or args.file.with_name(f"{args.file.stem}.output.jsonl")
            done = bc.submit(client, args.file, args.endpoint, output, follow=not args.no_wait,
                             metadata=metadata or None, say=say, poll=args.poll)
            print(done["id"] if args.no_wait else bc.summary(done))
            return 0 if args.no_wait else bc.exit_code(done)
        if args.batch_command == "status":
            print(bc.summary(client.retrieve(args.id)))
            return 0
        if args.batch_command == "cancel":
            print(bc.summary(client.cancel(args.id)))
            return 0
        done = client.retrieve(args.id)
        if done["status"] not in bc.TERMINAL:
            raise InvalidRequest(f"batch {args.id} is {done['status']}: its results are there once it ends "
                                 "(`modelyard batch status` says)", param="id")
        bc.fetch_results(client, done, args.output or Path(f"{args.id}.output.jsonl"), say)
        print(bc.summary(done))
        return bc.exit_code(done)
