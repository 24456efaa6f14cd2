"""The console comparison of the Linux snapshot test ignores what the clock decides,
and nothing else."""

from __future__ import annotations

import pytest

from linux_console import comparable

BOOT = b"""[    0.000000] Linux version 6.1.0-57-cloud-amd64
[    0.000000] Command line: console=ttyS0 panic=-1
[    0.184103] sched_clock: Marking stable (181011290, 3047021)->(195061620, -11003309)
[    0.201000] clocksource: Switched to clocksource kvm-clock
[    0.250113] audit: type=2000 audit(1796604009.912:1): state=initialized audit_enabled=0 res=1
[    0.251000] NET: Registered PF_NETLINK/PF_ROUTE protocol family
[    0.262000] Freeing SMP alternatives memory: 44K
[    0.300000] rcu: Hierarchical SRCU implementation.
[    0.310000] sched offset of 2817 cycles
"""

# Each: the same boot as a restored run may print it.
CLOCK_ONLY = {
    "timestamps": BOOT.replace(b"[    0.2", b"[  170.1"),
    "sched offset reading": BOOT.replace(b"2817 cycles", b"99013 cycles"),
    "audit wall clock": BOOT.replace(b"1796604009.912", b"1796604170.148"),
    # kauditd's line lands 2 lines earlier in the restored run
    "audit line's position": BOOT.replace(
        b"[    0.250113] audit: type=2000 audit(1796604009.912:1): state=initialized audit_enabled=0 res=1\n", b""
    ).replace(
        b"[    0.201000] clocksource",
        b"[    0.250113] audit: type=2000 audit(1796604170.148:1): state=initialized audit_enabled=0 res=1\n"
        b"[    0.201000] clocksource",
    ),
}

# Each: a difference that is not the clock's and must be seen.
REAL = {
    "a changed line": BOOT.replace(b"Freeing SMP alternatives memory: 44K", b"Freeing SMP alternatives memory: 48K"),
    "a missing line": BOOT.replace(b"[    0.300000] rcu: Hierarchical SRCU implementation.\n", b""),
    "the audit serial": BOOT.replace(b"912:1)", b"912:2)"),
    "the audit state": BOOT.replace(b"audit_enabled=0", b"audit_enabled=1"),
    "lines swapped": BOOT.replace(b"NET: Registered", b"XX").replace(b"Freeing SMP", b"NET: Registered")
                         .replace(b"XX", b"Freeing SMP"),
}


@pytest.mark.parametrize("name", CLOCK_ONLY)
def test_clock_readings_and_kauditd_timing_compare_equal(name: str) -> None:
    assert comparable(CLOCK_ONLY[name]) == comparable(BOOT)


@pytest.mark.parametrize("name", REAL)
def test_every_other_difference_is_seen(name: str) -> None:
    assert comparable(REAL[name]) != comparable(BOOT)
