"""A/B routing: which of a tier's two pool chains a job uses, chosen from its id alone.

`[tiers.<t>.split] pools = [...], share = s` sends the fraction `s` of the tier's jobs to the
chain `pools` ("split") and the rest to the tier's own chain ("control"). The choice is a
pure function of the job id (`split_point`: the first 8 bytes of its SHA-256 as a fraction
in [0, 1); never Python's `hash()`, which is salted per process), so every leader, every
redelivery and every replay of the same id lands on the same side, and the side of a job
can be recomputed from its id afterwards.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

Variant = Literal["control", "split"]
_SCALE = float(1 << 64)


@dataclass(frozen=True)
class SplitSpec:
    """`share` (0..1) of a tier's jobs use the pool chain `pools` instead of the tier's own."""

    pools: tuple[str, ...]
    share: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.share <= 1.0:
            raise ValueError(f"split share must be within [0, 1], got {self.share}")
        if not self.pools:
            raise ValueError("a split needs at least one pool")


def split_point(job_id: str) -> float:
    """A stable point in [0, 1) for `job_id`: its SHA-256 (UTF-8) read as a 64-bit big-endian
    fraction. Uniform over ids, identical in every process and Python version."""
    digest = hashlib.sha256(job_id.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / _SCALE


def variant_of(job_id: str, split: SplitSpec | None) -> Variant | None:
    """"split" when the job's point falls below the share, else "control"; None when the
    tier has no split (or a share of 0): such a tier routes exactly as without this feature."""
    if split is None or split.share <= 0.0:
        return None
    return "split" if split_point(job_id) < split.share else "control"
