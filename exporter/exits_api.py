"""Recent engine exits with their cause and evidence: GET /api/v1/exits, and the
`gpu-residency-exporter exits` command that prints them for a human, newest first.

    GET /api/v1/exits?engine=rollout-0&since=1732350000&wait=3
        {"exits": [{"engine": ..., "exitcode": -9, "cause": "oom_kill", "detail": ..., "gpus": [...]}, ...]}

`wait` (seconds, at most 10) holds the answer until an exit newer than `since` is there: a
framework that just saw its engine die asks once and gets the exporter's evidence.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
from datetime import datetime

from exporter.exit_log import ExitLog
from exporter.exits import EXPORTER_URL_ENV, fetch_exits
from exporter.server import Request, Response, Route, json_response

MAX_WAIT_SECONDS = 10.0
GIB = 1024**3


def exits_route(exits: ExitLog) -> Route:
    def answer(request: Request) -> Response:
        query = {key: values[-1] for key, values in request.query.items()}
        engine = query.get("engine") or None
        try:
            since = float(query.get("since", "0"))
            wait = min(MAX_WAIT_SECONDS, max(0.0, float(query.get("wait", "0"))))
            limit = int(query.get("limit", "50"))
        except ValueError:
            return json_response(400, {"error": "since and wait are seconds, limit an integer"})
        deadline = time.monotonic() + wait
        while True:
            found = [r for r in exits.recent(engine) if float(r.get("time", 0)) > since]
            if found or time.monotonic() >= deadline:
                return json_response(200, {"exits": found[: max(0, limit)]})
            time.sleep(0.1)

    return answer


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


def _holder(holder: dict) -> str:
    pid = f" pid {holder['pid']}" if holder.get("pid") else ""
    return f"{holder['kind']} {holder['name']}".strip() + f"{pid} {holder['used_bytes'] / GIB:.1f} GiB"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="gpu-residency-exporter exits",
        description="Print the recent engine exits a running exporter recorded, newest first: the cause it "
        "found (oom_kill, child_failure, exit_code, unknown), its evidence, and the GPU peak before.",
    )
    parser.add_argument("--url", default=os.environ.get(EXPORTER_URL_ENV, "http://127.0.0.1:9852"),
                        help=f"the exporter (default ${EXPORTER_URL_ENV} or http://127.0.0.1:9852)")  # fmt: skip
    parser.add_argument("--engine", help="only this engine")
    parser.add_argument("--limit", type=int, default=20, help="at most this many (default 20)")
    parser.add_argument("--json", action="store_true", help="print the records as JSON")
    parser.add_argument("--ca-file", help="CA to verify an https exporter")
    parser.add_argument("--user", help="basic auth user (password from $GPU_RESIDENCY_EXPORTER_PASSWORD)")
    args = parser.parse_args(argv)
    try:
        records = fetch_exits(args.url, args.engine, limit=args.limit, ca_file=args.ca_file, user=args.user,
                              password=os.environ.get("GPU_RESIDENCY_EXPORTER_PASSWORD"))  # fmt: skip
    except urllib.error.HTTPError as exc:
        print(f"gpu-residency-exporter exits: {args.url}: HTTP {exc.code}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"gpu-residency-exporter exits: cannot ask {args.url}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(records, indent=2))
    elif not records:
        print("no engine exits recorded")
    else:
        print("\n\n".join(describe_record(record) for record in records))
    return 0
