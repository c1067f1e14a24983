"""`gpu-residency-exporter exits`: the recent engine exits a running exporter recorded, printed
for a human (or as JSON), newest first; it asks GET /api/v1/exits (exporter/web/exits_api.py)."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime

from exporter.exits.report import fetch_exits
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

GIB = 1024**3
LOCAL_URL = "http://127.0.0.1:9852"


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
