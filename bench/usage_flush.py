"""Usage flush into PostgreSQL from several processes. Issue 12's target: 10,000 requests a
minute from 4 processes, no lock errors, under 5% of one core.

    python bench/usage_flush.py [--processes 4] [--rpm 2500] [--seconds 60] [--flush 5]
                                [--keys 200] [--endpoints 5] [--json PATH]

It starts its own PostgreSQL (testkit/pg.py, the tests' too: initdb + pg_ctl into a temporary directory,
unix socket only, stopped by its PID), migrates one database, then starts --processes worker
processes of this script at one agreed moment. Each runs modelyard's own UsageRecorder on its
event loop: synthetic record() calls, --rpm a minute (in ticks of 50 ms, a random key of --keys
by a random endpoint of --endpoints: no HTTP), and the recorder's flush loop every --flush
seconds, then the shutdown flush. Per worker:
  flush cpu    time.thread_time() spent inside the flushes' writes (on the recorder's worker
               thread), summed; its share of one core = flush cpu / wall seconds (target < 5%)
  process cpu  time.process_time() of the whole worker (generator, loop, flushes) / wall
  lock errors  flushes that failed with a PostgreSQL lock, deadlock or serialization error (target 0)
  flush ms     wall time of each flush's write transaction, p50 and max
At the end the usage table must hold exactly the requests recorded (none lost, none twice).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import time

from common import machine_line, parser, percentile, write_record

TARGET_SHARE = 0.05
LOCK_ERRORS = ("DeadlockDetected", "LockNotAvailable", "SerializationFailure", "QueryCanceled")


async def work(url: str, rpm: int, seconds: float, flush: float, keys: int, endpoints: int, seed: int) -> dict:
    from modelyard.control.db import open_database
    from modelyard.control.usage import UsageRecorder

    db = open_database(url)
    recorder = UsageRecorder(db, interval=flush)
    stats = {"flush_cpu": 0.0, "flush_ms": [], "errors": {}}
    write = recorder._write

    def timed(pending) -> None:        # runs on the recorder's worker thread: thread_time is the flush's own
        cpu, wall = time.thread_time(), time.perf_counter()
        try:
            write(pending)
        except Exception as exc:
            stats["errors"][type(exc).__name__] = stats["errors"].get(type(exc).__name__, 0) + 1
            raise
        finally:
            stats["flush_cpu"] += time.thread_time() - cpu
            stats["flush_ms"].append((time.perf_counter() - wall) * 1000)
    recorder._write = timed
    rng = random.Random(seed)
    names = [f"key_{seed:02d}{i:05d}" if i % 2 else f"key_shared{i:05d}" for i in range(keys)]  # half shared by all
    eps = [f"endpoint-{j}" for j in range(endpoints)]
    tick, owed, recorded = 0.05, 0.0, 0
    cpu0, start = time.process_time(), time.monotonic()
    await recorder.start()
    for n in range(int(seconds / tick) + 1):
        owed += rpm / 60 * tick
        while owed >= 1:
            recorder.record(rng.choice(names), rng.choice(eps), rng.randint(5, 500), rng.randint(1, 200))
            recorded, owed = recorded + 1, owed - 1
        await asyncio.sleep(max(0.0, start + (n + 1) * tick - time.monotonic()))
    await recorder.stop()
    wall = time.monotonic() - start
    db.close()
    return {"recorded": recorded, "wall": wall, "process_cpu": time.process_time() - cpu0,
            "flush_cpu": stats["flush_cpu"], "flushes": len(stats["flush_ms"]), "errors": stats["errors"],
            "flush_ms_p50": percentile(stats["flush_ms"], 0.5), "flush_ms_max": max(stats["flush_ms"], default=None)}


def run(args: argparse.Namespace) -> dict:
    from testkit.pg import fresh_database, postgres
    from modelyard.control.db import open_database

    with postgres() as server:
        url = fresh_database(server, "usage_bench")
        open_database(url).close()          # migrated once, before the workers race to it
        start_at = time.time() + 3.0        # every worker begins at this moment (all started by then)
        procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(i), "--url", url, "--start-at", str(start_at),
                                   "--rpm", str(args.rpm), "--seconds", str(args.seconds), "--flush", str(args.flush),
                                   "--keys", str(args.keys), "--endpoints", str(args.endpoints)],
                                  stdout=subprocess.PIPE, text=True) for i in range(args.processes)]
        outs = [p.communicate(timeout=args.seconds + 120)[0] for p in procs]     # all of them, before PG stops
        failed = [i for i, p in enumerate(procs) if p.returncode != 0]
        if failed:
            raise SystemExit(f"worker(s) {failed} failed (their tracebacks are above)")
        results = [json.loads(out.strip().splitlines()[-1]) for out in outs]
        db = open_database(url)
        stored = int(db.query("SELECT COALESCE(SUM(requests), 0) AS n FROM usage")[0]["n"])
        rows = int(db.query("SELECT COUNT(*) AS n FROM usage")[0]["n"])
        db.close()
    return {"args": vars(args), "machine": machine_line(), "workers": results, "stored_requests": stored,
            "stored_rows": rows}


def report(result: dict) -> None:
    a = result["args"]
    print(result["machine"])
    print(f"{a['processes']} processes x {a['rpm']} requests/minute for {a['seconds']} s, flush every {a['flush']} s, "
          f"{a['keys']} keys x {a['endpoints']} endpoints")
    print(f"{'worker':>6} {'recorded':>9} {'flushes':>8} {'flush cpu s':>12} {'share of a core':>16} "
          f"{'process cpu':>12} {'flush p50 ms':>13} {'max ms':>8}  errors")
    worst, lock_errors, recorded = 0.0, 0, 0
    for i, w in enumerate(result["workers"]):
        share = w["flush_cpu"] / w["wall"]
        worst, recorded = max(worst, share), recorded + w["recorded"]
        lock_errors += sum(n for name, n in w["errors"].items() if name in LOCK_ERRORS)
        print(f"{i:>6} {w['recorded']:>9} {w['flushes']:>8} {w['flush_cpu']:>12.3f} {share:>15.2%} "
              f"{w['process_cpu'] / w['wall']:>11.2%} {w['flush_ms_p50'] or 0:>13.1f} {w['flush_ms_max'] or 0:>8.1f}  "
              f"{w['errors'] or '-'}")
    print(f"usage table: {result['stored_requests']} requests in {result['stored_rows']} rows; recorded {recorded}")
    print(f"lock errors: {lock_errors} (target 0): {'MET' if lock_errors == 0 else 'MISSED'}")
    print(f"flush cpu, worst process: {worst:.2%} of one core (target < {TARGET_SHARE:.0%}): "
          f"{'MET' if worst < TARGET_SHARE else 'MISSED'}")
    print(f"nothing lost or counted twice: {'MET' if result['stored_requests'] == recorded else 'MISSED'}")


def main() -> int:
    p = parser(__doc__.split("\n\n")[0], json_help="write the raw result here")
    p.add_argument("--processes", type=int, default=4)
    p.add_argument("--rpm", type=int, default=2500, help="requests a minute recorded by each process")
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--flush", type=float, default=5.0, help="seconds between flushes (the recorder's FLUSH)")
    p.add_argument("--keys", type=int, default=200)
    p.add_argument("--endpoints", type=int, default=5)
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--start-at", type=float, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker is not None:
        time.sleep(max(0.0, args.start_at - time.time()))
        print(json.dumps(asyncio.run(work(args.url, args.rpm, args.seconds, args.flush, args.keys,
                                          args.endpoints, args.worker))))
        return 0
    result = run(args)
    report(result)
    if args.json:
        write_record(args.json, result, indent=2)
    return 0 if result["stored_requests"] == sum(w["recorded"] for w in result["workers"]) else 1


if __name__ == "__main__":
    sys.exit(main())
