"""Numbers for people: sizes, durations, ages (and reading sizes and durations back),
and a progress line on stderr that appears only when stderr is a terminal (scripts
and logs stay clean)."""

from __future__ import annotations

import math
import os
import re
import sys
import threading
import time
from datetime import datetime, timezone
from typing import TextIO

_SIZE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def size(n: int | float) -> str:
    """1536 -> '1.5 KiB'; exact bytes below 1 KiB."""
    value = float(n)
    for unit in _SIZE_UNITS:
        if abs(value) < 1024 or unit == _SIZE_UNITS[-1]:
            if unit == "B":
                return f"{int(value)} B"
            return f"{value:.1f} {unit}" if abs(value) < 100 else f"{value:.0f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def duration(seconds: float) -> str:
    """0.0123 -> '12 ms', 75 -> '1m15s', 7260 -> '2h01m', 200000 -> '2d07h'."""
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s"


def age(when: datetime, now: datetime | None = None) -> str:
    """How long ago `when` was: '42 s ago', '3m10s ago', '2d07h ago'."""
    now = now or datetime.now(timezone.utc)
    seconds = (now - when).total_seconds()
    if seconds < 0:
        return "in the future"
    return f"{duration(seconds)} ago" if seconds >= 1 else "just now"


def timestamp(when: datetime) -> str:
    """A UTC time to the second, as people and sort both read it."""
    return when.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


_PARSE_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)
_PARSE_SIZE_SHIFT = {"": 20, "K": 10, "M": 20, "G": 30, "T": 40}


def parse_size(text: str) -> int:
    """'256M', '1G', '512MiB', '4096K'; a bare number means MiB.

    Raises ValueError naming the text and the accepted forms."""
    match = _PARSE_SIZE.match(text) if isinstance(text, str) else None
    if not match:
        raise ValueError(f"'{text}' is not a size (examples: 256M, 1G, 512MiB)")
    return int(match.group(1)) << _PARSE_SIZE_SHIFT[match.group(2).upper()]


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_DURATION_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """'15m', '1h30m', '2d', '500ms', '1.5s'; a bare number means seconds.

    Raises ValueError naming the text and the accepted forms."""
    cleaned = text.strip().lower() if isinstance(text, str) else ""
    if re.fullmatch(r"\d+(?:\.\d+)?", cleaned):
        seconds = float(cleaned)
    elif cleaned and re.fullmatch(rf"(?:{_DURATION_PART.pattern})+", cleaned):
        seconds = sum(float(n) * _DURATION_SECONDS[unit] for n, unit in _DURATION_PART.findall(cleaned))
    else:
        raise ValueError(f"{text!r} is not a duration (examples: 30s, 15m, 1h30m, 2d; a bare number means seconds)")
    if seconds <= 0:
        raise ValueError(f"{text!r} must be longer than zero")
    return seconds


def interactive(stream: TextIO | None = None) -> bool:
    stream = stream if stream is not None else sys.stderr
    try:
        return stream.isatty() and os.environ.get("TERM") != "dumb"
    except (AttributeError, ValueError):
        return False


_BAR = 10  # characters


def _eta(seconds: float) -> str:
    return f"{math.ceil(seconds)}s" if seconds < 60 else duration(seconds)


def progress_line(label: str, done: int, total: int, rate: float | None) -> str:
    """'label [####------] 42% 1.2 GiB/2.9 GiB 310 MiB/s ETA 6s': `done` of `total`
    bytes at `rate` bytes/s (None: not known yet, so neither rate nor ETA)."""
    # No work at all is finished work; more than the total (an estimate) is full.
    fraction = min(done / total, 1.0) if total > 0 else 1.0
    filled = int(fraction * _BAR)
    line = f"{label} [{'#' * filled}{'-' * (_BAR - filled)}] {int(fraction * 100)}% {size(done)}/{size(total)}"
    if rate:
        line += f" {size(rate)}/s"
        if done < total:
            line += f" ETA {_eta((total - done) / rate)}"
    return line


class Activity:
    """`with Activity("verifying s3://b/r") as activity:` shows '<label> ... 12.3 s'
    on stderr, updated a few times a second, and erases it at the end; does nothing
    unless stderr is a terminal.

    Once `start(total)` says how many bytes the work has, the line is a progress
    bar (progress_line) that `advance(n)`, callable from any thread, moves on."""

    def __init__(self, label: str, stream: TextIO | None = None, interval: float = 0.2) -> None:
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self.detail = ""
        self._enabled = interactive(self.stream)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = 0.0
        self._lock = threading.Lock()  # `+=` from worker threads is not atomic
        self._total: int | None = None
        self._done = 0

    def start(self, total: int) -> None:
        """The work from here on is `total` bytes; rate and ETA count from now."""
        with self._lock:
            self._total, self._done, self._started = total, 0, time.monotonic()

    def advance(self, n: int) -> None:
        with self._lock:
            self._done += n

    def __enter__(self) -> "Activity":
        self._started = time.monotonic()
        if self._enabled:
            self._thread = threading.Thread(target=self._draw_loop, name="progress", daemon=True)
            self._thread.start()
        return self

    def _line(self, width: int) -> str:
        """The line to draw, its label cut short to fit in `width` columns: a terminal
        wraps a longer line, and \\r would then redraw only its last part."""
        with self._lock:
            total, done, elapsed = self._total, self._done, time.monotonic() - self._started
        if total is None:
            rest = f" ...{' ' + self.detail if self.detail else ''} {duration(elapsed)}"
        else:
            rest = progress_line("", done, total, done / elapsed if done and elapsed > 0 else None)
        room = width - 1 - len(rest)
        label = self.label if len(self.label) <= room else self.label[:max(room - 3, 0)] + "..."
        return (label + rest)[:width - 1]

    def _draw_loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.stream.write(f"\r\x1b[K{self._line(_columns(self.stream))}")
            self.stream.flush()

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.stream.write("\r\x1b[K")
            self.stream.flush()


def _columns(stream: TextIO) -> int:
    try:
        columns = os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        columns = 0
    return columns or 80  # 0: a terminal that does not know its size
