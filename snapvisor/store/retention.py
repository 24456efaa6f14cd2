"""Which snapshots a keep policy retains, with restic's `forget --keep-*` semantics.

Snapshots are taken newest first. `last` keeps the n newest. Each time-bucket rule
(hourly, daily, weekly, monthly, yearly) keeps the newest snapshot of each of the
n most recent buckets that hold a snapshot; a negative count means no limit.
`within` keeps every snapshot younger than the newest one minus the duration.
Buckets use UTC. Each VM's snapshots are judged on their own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

from snapvisor.store.errors import RepositoryError
from snapvisor.store.manifest import SnapshotInfo


@dataclass(frozen=True)
class KeepPolicy:
    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0
    within: timedelta | None = None

    def is_empty(self) -> bool:
        return not any((self.last, self.hourly, self.daily, self.weekly, self.monthly,
                        self.yearly)) and not self.within


@dataclass
class PruneResult:
    keep: list[SnapshotInfo]
    remove: list[SnapshotInfo]
    reasons: dict[str, list[str]] = field(default_factory=dict)
    dry_run: bool = False


_BUCKETS = {
    "hourly": lambda t: (t.year, t.month, t.day, t.hour),
    "daily": lambda t: (t.year, t.month, t.day),
    "weekly": lambda t: tuple(t.isocalendar()[:2]),
    "monthly": lambda t: (t.year, t.month),
    "yearly": lambda t: (t.year,),
}


def apply_policy(snapshots: list[SnapshotInfo], policy: KeepPolicy) -> PruneResult:
    """Split one VM's snapshots into keep and remove lists."""
    if policy.is_empty():
        raise RepositoryError("the keep policy is empty: it would remove every snapshot; "
                              "give at least one of last, hourly, daily, weekly, monthly, "
                              "yearly, within")
    ordered = sorted(snapshots, key=lambda s: (s.time, s.id), reverse=True)
    rules = [("last", policy.last, lambda t, i: i)] + [
        (name, getattr(policy, name), (lambda fn: lambda t, i: fn(t))(fn))
        for name, fn in _BUCKETS.items()]
    remaining = {name: count for name, count, _ in rules}
    last_bucket: dict[str, object] = {}
    newest = ordered[0].time if ordered else None
    result = PruneResult([], [])
    for i, snap in enumerate(ordered):
        reasons = []
        if policy.within is not None and snap.time > newest - policy.within:
            reasons.append(f"within {policy.within}")
        for name, _, bucket_of in rules:
            if remaining[name] == 0:
                continue
            bucket = bucket_of(snap.time, i)
            if last_bucket.get(name, object()) != bucket:
                last_bucket[name] = bucket
                remaining[name] -= 1
                reasons.append(f"{name} snapshot")
        if reasons:
            result.keep.append(snap)
            result.reasons[snap.id] = reasons
        else:
            result.remove.append(snap)
    return result
