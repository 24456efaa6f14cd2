"""Sizes, durations and ages as the CLI prints them, and the durations it reads."""

from __future__ import annotations

import io
import threading
import time
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


@pytest.mark.parametrize("text,size", [
    ("256M", 256 << 20), ("1G", 1 << 30), ("512MiB", 512 << 20), ("4096K", 4 << 20), ("64", 64 << 20),
    (" 2 gb ", 2 << 30), ("1T", 1 << 40),
])
def test_parse_size(text: str, size: int) -> None:
    assert humanize.parse_size(text) == size


@pytest.mark.parametrize("text", ["", "lots", "1.5G", "-1M", "1P", "M"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=r"is not a size \(examples: 256M, 1G, 512MiB\)"):
        humanize.parse_size(text)


class _Stream(io.StringIO):
    """stderr as a test wants it: a terminal or not."""

    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize("tty,term", [(False, "xterm"), (True, "dumb")])
def test_activity_and_progress_are_silent_unless_on_a_terminal(tty: bool, term: str, monkeypatch) -> None:
    monkeypatch.setenv("TERM", term)
    stream = _Stream(tty)
    with humanize.Activity("working", stream=stream, interval=0.01) as activity:
        time.sleep(0.03)
        activity.start(100)
        activity.advance(40)
        time.sleep(0.03)
    assert stream.getvalue() == ""


def test_activity_draws_and_erases_on_a_terminal(monkeypatch) -> None:
    monkeypatch.setenv("TERM", "xterm")
    stream = _Stream(tty=True)
    with humanize.Activity("verifying /srv/repo", stream=stream, interval=0.01) as activity:
        activity.detail = "3 packs"
        time.sleep(0.1)
    drawn = stream.getvalue()
    assert "\r\x1b[Kverifying /srv/repo ... 3 packs " in drawn
    assert drawn.endswith("\r\x1b[K")  # nothing left behind on the line


@pytest.mark.parametrize("done,total,rate,text", [
    (int(1.2 * 2**30), int(2.9 * 2**30), 310 * 2**20, "restoring [####------] 41% 1.2 GiB/2.9 GiB 310 MiB/s ETA 6s"),
    (0, 100 << 20, None, "restoring [----------] 0% 0 B/100 MiB"),                 # rate not known yet
    (50 << 20, 100 << 20, 0.0, "restoring [#####-----] 50% 50.0 MiB/100 MiB"),     # nor when nothing moved
    (0, 0, None, "restoring [##########] 100% 0 B/0 B"),                           # no work is finished work
    (5 << 20, 4 << 20, 1 << 20, "restoring [##########] 100% 5.0 MiB/4.0 MiB 1.0 MiB/s"),  # past the total
    (1 << 20, 100 << 20, 1 << 20, "restoring [----------] 1% 1.0 MiB/100 MiB 1.0 MiB/s ETA 1m39s"),
])
def test_progress_line(done: int, total: int, rate: float | None, text: str) -> None:
    assert humanize.progress_line("restoring", done, total, rate) == text


def test_progress_counts_from_threads_draws_the_bar_and_erases_it(monkeypatch) -> None:
    monkeypatch.setenv("TERM", "xterm")
    stream = _Stream(tty=True)
    with humanize.Activity("reading s3://bucket/" + "x" * 200, stream=stream, interval=0.01) as activity:
        activity.start(400 << 20)
        workers = [threading.Thread(target=lambda: [activity.advance(1 << 20) for _ in range(50)]) for _ in range(4)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        time.sleep(0.05)
    lines = stream.getvalue().split("\r\x1b[K")
    assert "reading s3://bucket/xxx" in lines[-2] and "[#####-----] 50% 200 MiB/400 MiB" in lines[-2]
    assert "/s ETA " in lines[-2]
    assert all(len(line) < 80 for line in lines)  # the long label is cut to the terminal's width
    assert lines[-1] == ""  # nothing left behind on the line
