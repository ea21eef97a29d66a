"""Writing to the streams: jobs (with dedup), results (once per job, forever), dead letters."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

from nats.js import JetStreamContext
from nats.js.errors import APIError, NoStreamResponseError

from ratefleet.errors import QueueFull, SubmitError
from schemas import Result, Subjects
from schemas.job import FORBIDDEN_HEADERS

REPLY_HEADER = "Ratefleet-Reply-To"
MSG_ID = "Nats-Msg-Id"
ALREADY_STORED = 10077  # maximum messages per subject exceeded: the job already has its result


def _is_full(error: APIError) -> bool:
    text = (error.description or "").lower()
    return "maximum messages" in text or "maximum bytes" in text or error.err_code in (10047, 10048)


async def publish_job(js: JetStreamContext, subjects: Subjects, tier: str, job_id: str, payload: bytes,
                      *, reply_to: str | None = None, timeout: float = 5.0) -> bool:
    """Store one job durably. Returns False when it was a duplicate inside the dedup window."""
    headers = {MSG_ID: job_id}
    if reply_to:
        headers[REPLY_HEADER] = reply_to
    try:
        ack = await js.publish(subjects.jobs(tier), payload, headers=headers, timeout=timeout)
    except APIError as exc:
        if _is_full(exc):
            raise QueueFull(f"the job queue is full ({exc.description}); job {job_id} was NOT stored. "
                            "Retry later, or raise streams.jobs_max_msgs / jobs_max_bytes") from None
        raise SubmitError(f"job {job_id} was not stored: {exc.description}") from None
    except NoStreamResponseError:
        raise SubmitError(f"no stream takes {subjects.jobs(tier)}; run `ratefleet up` or a dispatcher "
                          "once to create the streams") from None
    except TimeoutError:
        raise SubmitError(f"NATS did not confirm job {job_id} within {timeout}s; it may or may not be stored "
                          "(resubmitting with the same id is safe)") from None
    return not ack.duplicate


async def store_result(js: JetStreamContext, subjects: Subjects, result: Result, *, timeout: float = 10.0) -> bool:
    """Store the terminal Result. False when the job already had one (error 10077 or dedup)."""
    subject = subjects.results(result.batch, result.job_id)
    try:
        ack = await js.publish(subject, result.to_json(), headers={MSG_ID: result.job_id}, timeout=timeout)
    except APIError as exc:
        if exc.err_code == ALREADY_STORED:
            return False
        raise
    return not ack.duplicate


def redact_payload(raw: bytes) -> dict[str, Any]:
    """The raw payload for a dead letter, with auth-like header values masked."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        try:
            return {"raw": raw.decode("utf-8")}
        except UnicodeDecodeError:
            return {"raw_b64": base64.b64encode(raw).decode()}
    request = data.get("request") if isinstance(data, dict) else None
    headers = request.get("headers") if isinstance(request, dict) else None
    if isinstance(headers, dict):
        for name in list(headers):
            if str(name).lower() in FORBIDDEN_HEADERS:
                headers[name] = "***"
    return {"payload": data}


async def dead_letter(js: JetStreamContext, subjects: Subjects, tier: str, *, code: str, message: str,
                      raw: bytes | None = None, job: dict | None = None, job_id: str | None = None,
                      attempts: int = 0, last_error: dict | None = None) -> None:
    """Record a dead letter with the reason, the payload (raw, redacted) or job, and attempts."""
    letter: dict[str, Any] = {
        "job_id": job_id, "tier": tier, "reason": {"code": code, "message": message},
        "attempts": attempts, "last_error": last_error, "at": time.time(),
    }
    if job is not None:
        letter["job"] = job
    elif raw is not None:
        letter.update(redact_payload(raw))
    safe_tier = tier if tier and all(c.isalnum() or c in "_-" for c in tier) else "_"
    await js.publish(subjects.dead(safe_tier), json.dumps(letter).encode(), timeout=10.0)
