"""A counting upstream for bench/soak.py, in its own process: every call is recorded.

`python bench/counting_upstream.py PORT` serves aiohttp on 127.0.0.1:PORT. Any POST gets
200 with a small chat-completion-like JSON after `delay_ms` (a field of the request's JSON
body, default 0). The call is recorded with the job id the soak writes into the body
(`soak_id`), its start and end in CLOCK_MONOTONIC seconds (the same clock as every process
on this machine, so the soak can set calls against its own kill times) and a call number,
which is echoed in the answer (`call`) so a Result can be matched to the call it carries.
`GET /_calls` returns every record as JSON: [[job_id, call, start_s, end_s or null,
wall_start_s], ...] (end is null while the call runs, or when the caller went away before
the answer; wall_start_s is time.time(), to set against the Results' stored times).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from aiohttp import web


def build_app() -> web.Application:
    calls: list[list] = []

    async def answer(request: web.Request) -> web.Response:
        start = time.monotonic()
        try:
            body = await request.json()
        except ValueError:
            body = {}
        job_id = str(body.get("soak_id", "")) if isinstance(body, dict) else ""
        record = [job_id, len(calls) + 1, start, None, time.time()]
        calls.append(record)
        delay = float(body.get("delay_ms", 0) or 0) / 1000 if isinstance(body, dict) else 0.0
        if delay > 0:
            await asyncio.sleep(delay)
        record[3] = time.monotonic()
        return web.json_response({"id": f"call-{record[1]}", "call": record[1], "object": "chat.completion",
                                  "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}],
                                  "usage": {"total_tokens": 1}})

    async def listing(request: web.Request) -> web.Response:
        return web.Response(text=json.dumps(calls), content_type="application/json")

    app = web.Application()
    app.router.add_get("/_calls", listing)
    app.router.add_route("*", "/{tail:.*}", answer)
    return app


if __name__ == "__main__":
    web.run_app(build_app(), host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
