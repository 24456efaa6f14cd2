"""Sizes, durations and ages as the CLI prints them, and the durations it reads."""

from __future__ import annotations

import io
from datetime import datetime, timedelta, timezone

import pytest

from snapvisor import humanize


@pytest.mark.parametrize("value,text", [
    (0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"), (256 << 10, "256 KiB"),
    (64 << 20, "64.0 MiB"), (3 << 30, "3.0 GiB"), (5 << 50, "5.0 PiB"),
])
def test_size(value: int, text: str) -> None:
    assert humanize.size(value) == text


@pytest.mark.parametrize("seconds,text", [
    (0.0123, "12 ms"), (1.25, "1.2 s"), (75, "1m15s"), (7260, "2h01m"), (200000, "2d07h"),
])
def test_duration(seconds: float, text: str) -> None:
    assert humanize.duration(seconds) == text


def test_age() -> None:
    now = datetime(2026, 1, 2, tzinfo=timezone.utc)
    assert humanize.age(now - timedelta(seconds=0.2), now) == "just now"
    assert humanize.age(now - timedelta(minutes=3, seconds=10), now) == "3m10s ago"
    assert humanize.age(now + timedelta(seconds=5), now) == "in the future"


@pytest.mark.parametrize("text,seconds", [
    ("90", 90), ("1.5s", 1.5), ("500ms", 0.5), ("15m", 900), ("1h30m", 5400), ("2d", 172800), ("1w", 604800),
    (" 15M ", 900),
])
def test_parse_duration(text: str, seconds: float) -> None:
    assert humanize.parse_duration(text) == seconds


@pytest.mark.parametrize("text,message", [
    ("", "is not a duration"), ("soon", "is not a duration"), ("5x", "is not a duration"), ("-1s", "is not a duration"),
    ("0", "must be longer than zero"), ("0m", "must be longer than zero"),
])
def test_parse_duration_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        humanize.parse_duration(text)


def test_activity_is_silent_when_not_a_terminal() -> None:
    stream = io.StringIO()
    with humanize.Activity("working", stream=stream, interval=0.01):
        pass
    assert stream.getvalue() == ""


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_activity_draws_and_erases_on_a_terminal(monkeypatch) -> None:
    monkeypatch.setenv("TERM", "xterm")
    stream = _Terminal()
    with humanize.Activity("verifying /srv/repo", stream=stream, interval=0.01) as activity:
        activity.detail = "3 packs"
        import time

        time.sleep(0.1)
    drawn = stream.getvalue()
    assert "\r\x1b[Kverifying /srv/repo ... 3 packs " in drawn
    assert drawn.endswith("\r\x1b[K")  # nothing left behind on the line
