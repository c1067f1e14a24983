"""Recent engine exits with their cause and evidence: GET /api/v1/exits (the
`gpu-residency-exporter exits` command, exporter/exits/command.py, prints them for a human).

    GET /api/v1/exits?engine=rollout-0&since=1732350000&wait=3
        {"exits": [{"engine": ..., "exitcode": -9, "cause": "oom_kill", "detail": ..., "gpus": [...]}, ...]}

`wait` (seconds, at most 10) holds the answer until an exit newer than `since` is there: a
framework that just saw its engine die asks once and gets the exporter's evidence. At most
--api.max-waiters requests wait at once (429 beyond); asking without `wait` is never refused.
"""

from __future__ import annotations

import threading
import time

from exporter.exits.log import ExitLog
from exporter.web.server import Request, Response, Route, client_gone, json_response

MAX_WAIT_SECONDS = 10.0
WAIT_POLL_S = 0.1  # how often a waiter looks for a new exit and at its connection


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
