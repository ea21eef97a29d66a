"""ratefleet: rate-limited API calls at scale over NATS JetStream.

Producers submit jobs by priority tier; one leader dispatcher spends each key's limits
exactly; a fleet of workers makes the calls and stores one Result per job.
"""

from ratefleet.client import Client
from ratefleet.errors import JobInvalid, QueueFull, RatefleetError, RequestTimeout, SubmitError
from schemas import Job, Result

__all__ = ["Client", "Job", "JobInvalid", "QueueFull", "RatefleetError", "RequestTimeout", "Result", "SubmitError"]
