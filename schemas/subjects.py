"""Subject and stream names. Everything is derived from one configurable prefix."""

from __future__ import annotations

import re
from dataclasses import dataclass

TOKEN_PATTERN = r"^[A-Za-z0-9_-]{1,128}$"
_TOKEN = re.compile(TOKEN_PATTERN)
# in a reply subject: a wildcard, whitespace (`\s` is str.isspace for str patterns) or an empty
# token (a dot at either end or two in a row); one scan, not a check per character (run per job)
_UNSAFE_REPLY = re.compile(r"[*>\s]|\A\.|\.\.|\.\Z")
NO_BATCH = "_"


def is_token(value: str) -> bool:
    """True when `value` can be one NATS subject token (job ids, batch names, tiers)."""
    return bool(_TOKEN.match(value))


def is_safe_reply(subject: str | None, prefix: str = "ratefleet") -> bool:
    """True when a producer-given reply subject may receive a Result.

    Refused: system and API subjects (`$JS.`, `$KV.`, `$SYS.`...), ratefleet's own
    subjects, wildcards, whitespace and empty tokens: a job must not be able to make a
    worker publish into a stream, a KV bucket or the fleet's own protocol.
    """
    if not subject or len(subject) > 512 or subject.startswith("$"):
        return False
    if subject == prefix or subject.startswith(prefix + "."):
        return False
    return _UNSAFE_REPLY.search(subject) is None


@dataclass(frozen=True)
class Subjects:
    """All subjects and stream names for one `prefix` (default `ratefleet`)."""

    prefix: str = "ratefleet"

    @property
    def stream_suffix(self) -> str:
        return "" if self.prefix == "ratefleet" else "_" + re.sub(r"[^A-Za-z0-9]", "_", self.prefix).upper()

    @property
    def jobs_stream(self) -> str:
        return "RATEFLEET_JOBS" + self.stream_suffix

    @property
    def results_stream(self) -> str:
        return "RATEFLEET_RESULTS" + self.stream_suffix

    @property
    def dead_stream(self) -> str:
        return "RATEFLEET_DEAD" + self.stream_suffix

    @property
    def leader_bucket(self) -> str:
        return "ratefleet_leader" + self.stream_suffix.lower()

    @property
    def handbacks_bucket(self) -> str:
        return "ratefleet_handbacks" + self.stream_suffix.lower()

    @property
    def keys_bucket(self) -> str:
        """KV bucket of disabled keys (key id -> state and reason), read by each new leader."""
        return "ratefleet_keys" + self.stream_suffix.lower()

    @property
    def config_bucket(self) -> str:
        """KV bucket of the fleet config: key `current`, one revision per push (schemas/config_store.py)."""
        return "ratefleet_config" + self.stream_suffix.lower()

    @property
    def bodies_bucket(self) -> str:
        """Object Store bucket for response bodies too large to travel inside a Result."""
        return "ratefleet_bodies" + self.stream_suffix.lower()

    @property
    def cache_bucket(self) -> str:
        """KV bucket of cached 2xx answers (cache key -> entry), see ratefleet/runtime/cache.py."""
        return "ratefleet_cache" + self.stream_suffix.lower()

    def jobs(self, tier: str = "*") -> str:
        return f"{self.prefix}.jobs.{tier}"

    def results(self, batch: str | None = "*", job_id: str = "*") -> str:
        return f"{self.prefix}.results.{batch or NO_BATCH}.{job_id}"

    def batch_results(self, batch: str | None) -> str:
        return f"{self.prefix}.results.{batch or NO_BATCH}.*"

    def rpc(self, tier: str = "*") -> str:
        return f"{self.prefix}.rpc.{tier}"

    def dead(self, tier: str = "*") -> str:
        return f"{self.prefix}.dead.{tier}"

    @property
    def admin_status(self) -> str:
        return f"{self.prefix}.admin.status"

    @property
    def admin_keys(self) -> str:
        """Core request/reply to the leader: `{"action": "disable"|"enable", "key", "reason"}`."""
        return f"{self.prefix}.admin.keys"

    # internal protocol (not part of the contract)
    def assign(self, worker_id: str) -> str:
        return f"{self.prefix}.internal.assign.{worker_id}"

    @property
    def heartbeat(self) -> str:
        return f"{self.prefix}.internal.heartbeat"

    @property
    def outcome(self) -> str:
        return f"{self.prefix}.internal.outcome"

    @property
    def leader_announce(self) -> str:
        return f"{self.prefix}.internal.leader"

    @property
    def leader_status(self) -> str:
        return f"{self.prefix}.internal.status.leader"

    @property
    def dispatcher_beat(self) -> str:
        """Every dispatcher's presence (id, role, probe URL), for `status`."""
        return f"{self.prefix}.internal.dispatcher"

    def tier_of(self, subject: str) -> str:
        """The tier token of a `<prefix>.jobs.<tier>` or `<prefix>.rpc.<tier>` subject."""
        return subject.rsplit(".", 1)[-1]
