"""A paid answer NATS will not store: told apart from NATS being away, and turned into a
`failed` Result that can be stored (workers/service.py `_store`).

NATS away (timeouts, reconnects, after the store's own retries) sends the job back to be
run again. NATS refusing (a server error code: 10077 "maximum bytes exceeded" from a full
Object Store bucket or results stream, a full disk) would refuse again, and every retry
pays for the call once more: the job ends `failed` with `result_not_stored` instead.
"""

from __future__ import annotations

from nats.js.errors import APIError

from ratefleet.schemas import ErrorCode, ErrorInfo, Result
from ratefleet.schemas.errors import ResultNotStored


def refused(exc: BaseException) -> bool:
    """True when NATS refused a store (an APIError with a server error code, or the store's
    ResultNotStored), False when it could not be reached."""
    return isinstance(exc, ResultNotStored) or (isinstance(exc, APIError) and exc.err_code is not None)


def unstorable(result: Result, exc: BaseException) -> Result:
    """`result` as a `failed` Result with code `result_not_stored`: the status and headers of
    the answer are kept, its body (which NATS would not take) is not; the message names the
    refusal and what the job had ended as."""
    response = result.response.model_copy(update={"json_body": None, "body": None, "body_b64": None,
                                                   "body_ref": None}) if result.response else None
    status = f"HTTP {result.response.status}" if result.response else "no answer"
    earlier = f"; it had ended {result.status}" + (f" ({result.error.code})" if result.error else "")
    message = (f"the upstream answered ({status}) but NATS refused to store that answer "
               f"({type(exc).__name__}: {str(exc)[:200]}){earlier}; not called again. Check the Object Store "
               "bucket's and the results stream's limits and the server's disk, then resubmit")
    return result.model_copy(update={"status": "failed", "response": response,
                                     "error": ErrorInfo(code=ErrorCode.RESULT_NOT_STORED, message=message)})
