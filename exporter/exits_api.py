"""Recent engine exits with their cause and evidence: GET /api/v1/exits, and the
`gpu-residency-exporter exits` command that prints them for a human, newest first.

    GET /api/v1/exits?engine=rollout-0&since=1732350000&wait=3
        {"exits": [{"engine": ..., "exitcode": -9, "cause": "oom_kill", "detail": ..., "gpus": [...]}, ...]}

`wait` (seconds, at most 10) holds the answer until an exit newer than `since` is there: a
framework that just saw its engine die asks once and gets the exporter's evidence. At most
--api.max-waiters requests wait at once (429 beyond); asking without `wait` is never refused.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from datetime import datetime

from exporter.exit_log import ExitLog
from exporter.exits import fetch_exits
from exporter.server import Request, Response, Route, client_gone, json_response
from gpu_residency_common.exporter_client import (
    CA_FILE_ENV,
    PASSWORD_ENV,
    PASSWORD_FILE_ENV,
    TIMEOUT_S,
    URL_ENV,
    USER_ENV,
    ExporterClient,
    ExporterError,
)

MAX_WAIT_SECONDS = 10.0
WAIT_POLL_S = 0.1  # how often a waiter looks for a new exit and at its connection
GIB = 1024**3
LOCAL_URL = "http://127.0.0.1:9852"


def exits_route(exits: ExitLog, max_waiters: int) -> Route:
    """GET /api/v1/exits; at most `max_waiters` requests wait at once (429 beyond, as the gate's
    long poll answers), and a waiter whose client left frees its place."""
    places = threading.BoundedSemaphore(max_waiters) if max_waiters > 0 else None

    def answer(request: Request) -> Response:
        query = {key: values[-1] for key, values in request.query.items()}
        engine = query.get("engine") or None
        try:
            since = float(query.get("since", "0"))
            wait = min(MAX_WAIT_SECONDS, max(0.0, float(query.get("wait", "0"))))
            limit = int(query.get("limit", "50"))
        except ValueError:
            return json_response(400, {"error": "since and wait are seconds, limit an integer"})
        if not wait:
            return json_response(200, {"exits": _found(exits, engine, since)[: max(0, limit)]})
        if places is None or not places.acquire(blocking=False):
            status, headers, body = json_response(429, {"error": "too many waiters; retry, or ask without wait"})
            return status, [*headers, ("Retry-After", "1")], body
        try:
            deadline = time.monotonic() + wait
            while not (found := _found(exits, engine, since)) and time.monotonic() < deadline:
                if client_gone(request.connection):
                    return json_response(499, {"error": "client closed the connection"})  # nobody reads it
                time.sleep(WAIT_POLL_S)
        finally:
            places.release()
        return json_response(200, {"exits": found[: max(0, limit)]})

    return answer


def _found(exits: ExitLog, engine: str | None, since: float) -> list[dict]:
    return [r for r in exits.recent(engine) if float(r.get("time", 0)) > since]


def describe_record(record: dict) -> str:
    """A few lines for a human: when, which engine, how it ended, why, what its GPUs held."""
    when = datetime.fromtimestamp(float(record.get("time", 0))).strftime("%Y-%m-%d %H:%M:%S")
    code = record.get("exitcode")
    lines = [f"{when}  {record.get('engine')}  exitcode={'unknown' if code is None else code}  "
             f"cause={record.get('cause')}: {record.get('detail')}"]  # fmt: skip
    lines += [f"    {fact}" for fact in record.get("facts", [])]
    for gpu in record.get("gpus", []):
        total = gpu.get("total_bytes")
        of = f" of {total / GIB:.1f}" if total else ""
        holders = ", ".join(
            f"{h['kind']} {h['name']}".strip()
            + (f" pid {h['pid']}" if h.get("pid") else "")
            + f" {h['used_bytes'] / GIB:.1f}"
            for h in gpu.get("top_holders", [])
        )
        lines.append(
            f"    GPU {gpu['gpu']}: peak {gpu['used_bytes'] / GIB:.1f}{of} GiB used; holders: {holders or 'none'}"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="gpu-residency-exporter exits",
        description="Print the recent engine exits a running exporter recorded, newest first: the cause it "
        "found (oom_kill, child_failure, exit_code, unknown), its evidence, and the GPU peak before. "
        f"The exporter's settings, as every client of it takes them: each flag left out is read from "
        f"${URL_ENV}, ${CA_FILE_ENV}, ${USER_ENV}, ${PASSWORD_FILE_ENV} or ${PASSWORD_ENV}.",
    )
    parser.add_argument("--url", help=f"the exporter (default ${URL_ENV}, else {LOCAL_URL})")
    parser.add_argument("--engine", help="only this engine")
    parser.add_argument("--limit", type=int, default=20, help="at most this many (default 20)")
    parser.add_argument("--json", action="store_true", help="print the records as JSON")
    parser.add_argument("--ca-file", help="CA bundle to verify an https exporter (default: the system's CAs)")
    parser.add_argument("--user", help="basic auth user")
    parser.add_argument("--password-file", help="file holding that user's password (never a flag)")
    parser.add_argument("--timeout", type=float, default=TIMEOUT_S, help=f"seconds (default {TIMEOUT_S:g})")
    args = parser.parse_args(argv)
    try:
        client = ExporterClient(args.url, args.timeout, args.ca_file, args.user, None, args.password_file, LOCAL_URL)
    except ExporterError as exc:
        parser.error(str(exc))
    try:
        records = fetch_exits(client, args.engine, limit=args.limit)
    except ExporterError as exc:
        print(f"gpu-residency-exporter exits: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(records, indent=2))
    elif not records:
        print("no engine exits recorded")
    else:
        print("\n\n".join(describe_record(record) for record in records))
    return 0
