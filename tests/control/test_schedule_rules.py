"""Schedules and keep rules as the API reads them: valid ones round-trip, invalid
ones are refused with a message that names the field."""

from __future__ import annotations

from datetime import timedelta

import pytest

from snapvisor.control import Schedule, keep_policy_from_json
from snapvisor.control.errors import BadRequest
from snapvisor.store import KeepPolicy


def test_schedule_from_json_round_trip() -> None:
    schedule = Schedule.from_json({"every": "15m", "repos": ["s3://backups/p", "/srv/repo"],
                                   "keep": {"last": 4, "daily": 7, "within": "2d"}, "tags": ["auto"]})
    assert schedule.every == 900 and schedule.repos == ("s3://backups/p", "/srv/repo") and schedule.tags == ("auto",)
    assert schedule.keep == KeepPolicy(last=4, daily=7, within=timedelta(days=2))
    assert schedule.to_json() == {"every_s": 900.0, "repos": ["s3://backups/p", "/srv/repo"], "tags": ["auto"],
                                  "keep": {"last": 4, "daily": 7, "within": "172800s"}}
    assert Schedule.from_json({"every": 30, "repos": ["/r"]}).keep is None
    assert keep_policy_from_json({"yearly": -1}) == KeepPolicy(yearly=-1)


@pytest.mark.parametrize("body,message", [
    ({"every": True, "repos": ["/r"]}, "every must be a duration string"),
    ({"every": [1], "repos": ["/r"]}, "every must be a duration string"),
    ({"every": 10 ** 9, "repos": ["/r"]}, "every must be between"),
    ({"every": "1m", "repos": "/r"}, "repos must be a list"),
    ({"every": "1m", "repos": ["/r"] * 9}, "1 to 8 repositories"),
    ({"every": "1m", "repos": [""]}, "repo must be a non-empty string"),
    ({"every": "1m", "repos": ["/r"], "tags": [1]}, "tag name 1 is invalid"),
    ({"every": "1m", "repos": ["/r"], "keep": [3]}, "keep must be an object"),
    ({"every": "1m", "repos": ["/r"], "keep": {"last": True}}, "keep.last must be a whole number"),
    ({"every": "1m", "repos": ["/r"], "keep": {"last": -2}}, "keep.last must be a whole number"),
    ({"every": "1m", "repos": ["/r"], "keep": {"within": 5}}, "keep.within"),
    ({"every": "1m", "repos": ["/r"], "when": "now"}, "unknown field(s) ['when']"),
])
def test_schedule_from_json_rejects(body: dict, message: str) -> None:
    with pytest.raises(BadRequest) as refused:
        Schedule.from_json(body)
    assert message in str(refused.value) and refused.value.status == 400
