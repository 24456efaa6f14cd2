"""Comparing two Linux consoles line by line, except what the clock decides.

printk's timestamps and a few values the kernel reads from the clock say when
something happened: the only thing a pause may change. kauditd prints its
`audit(<wall clock>:<serial>)` line from its own thread, so where it lands among
the other lines is timing too: audit lines are compared as a set, apart from the
ordered rest. Every other character must match.
"""

from __future__ import annotations

import re

_TIMESTAMP = re.compile(r"^\[\s*\d+\.\d+\] ", re.M)
# Values the kernel measures from the clock: they differ between any two boots.
_CLOCK_READINGS = (
    (re.compile(r"(sched offset of )\d+( cycles)"), r"\1N\2"),
    (re.compile(r"audit\(\d+\.\d+:(\d+)\)"), r"audit(T:\1)"),
)
_AUDIT_LINE = re.compile(r"^audit: ")


def comparable(console: bytes) -> tuple[list[str], list[str]]:
    """(the ordered lines, the audit lines sorted), clock readings masked."""
    text = _TIMESTAMP.sub("", console.decode(errors="replace"))
    for reading, mask in _CLOCK_READINGS:
        text = reading.sub(mask, text)
    lines = text.splitlines()
    ordered = [line for line in lines if not _AUDIT_LINE.match(line)]
    return ordered, sorted(line for line in lines if _AUDIT_LINE.match(line))
