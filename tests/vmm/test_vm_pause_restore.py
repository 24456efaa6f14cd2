"""Pause/resume, dirty logging and moving a running guest into a fresh VM,
all with the project's test guest on real /dev/kvm."""

from __future__ import annotations

import io
import re
import time
from pathlib import Path

import numpy as np
import pytest

from testsupport import wait_for_output
from snapvisor.vmm.builder import VmConfig, build_microvm_for_boot, build_microvm_from_state
from snapvisor.vmm.errors import GuestMemoryError, VmRuntimeError, VmStateError
from snapvisor.vmm.memory import FileBacking, GuestMemory

pytestmark = pytest.mark.kvm
MiB = 1 << 20
ROUND = re.compile(rb"^tg: cpu=(\d+) round=(\d+) dirtied=(\d+) verified=(\d+) ticks=(\d+)$", re.M)


def paced_guest(testguest: Path, vcpus: int, rounds: int, out: io.BytesIO, exit_code: int = 0):
    """A guest that re-dirties its 4 MiB working set at 20 MiB/s per CPU, so it
    is still mid-run when the test acts on it."""
    cmdline = f"console=ttyS0 tg.mem=4 tg.rate=20 tg.rounds={rounds} tg.cpus={vcpus} tg.exit={exit_code}"
    return build_microvm_for_boot(
        VmConfig(kernel=testguest, cmdline=cmdline, mem_size=64 * MiB, vcpus=vcpus, serial_out=out)
    )


def rounds_by_cpu(console: bytes) -> dict[int, list[int]]:
    by_cpu: dict[int, list[int]] = {}
    for match in ROUND.finditer(console):
        by_cpu.setdefault(int(match.group(1)), []).append(int(match.group(2)))
    return by_cpu


def assert_clean_run(console: bytes, vcpus: int, rounds: int) -> None:
    assert b"FAIL" not in console and b"FAULT" not in console
    assert console.endswith(b"tg: done\n")
    assert rounds_by_cpu(console) == {cpu: list(range(rounds + 1)) for cpu in range(vcpus)}


@pytest.mark.parametrize("vcpus", [1, 2])
def test_pause_and_resume_repeatedly(testguest: Path, vcpus: int) -> None:
    out = io.BytesIO()
    with paced_guest(testguest, vcpus, rounds=6, out=out, exit_code=9) as vm:
        vm.start()
        wait_for_output(out, b"round=0", 30)
        latencies = []
        for _ in range(10):
            started = time.perf_counter()
            vm.pause()
            latencies.append(time.perf_counter() - started)
            frozen = out.getvalue()
            snapshot = bytes(vm.memory.regions[0].view)
            time.sleep(0.02)
            # Parked vCPUs neither print nor touch memory.
            assert out.getvalue() == frozen
            assert bytes(vm.memory.regions[0].view) == snapshot
            vm.resume()
            time.sleep(0.05)
        status = vm.wait(60)
    assert (status.code, status.reason) == (9, "poweroff")
    assert_clean_run(out.getvalue(), vcpus, 6)
    assert max(latencies) < 0.5, latencies


def test_save_state_needs_a_paused_vm(testguest: Path) -> None:
    out = io.BytesIO()
    with paced_guest(testguest, 1, rounds=0, out=out) as vm:
        vm.start()
        with pytest.raises(VmRuntimeError, match="pause the VM"):
            vm.save_state()


def test_dirty_log_covers_every_page_the_guest_changed(testguest: Path) -> None:
    out = io.BytesIO()
    with paced_guest(testguest, 1, rounds=0, out=out) as vm:
        region = vm.memory.regions[0]
        vm.memory.enable_dirty_log()
        vm.start()
        wait_for_output(out, b"round=1 ", 30)
        vm.pause()
        vm.memory.fetch_dirty(region)  # start a fresh interval
        before = np.frombuffer(bytes(region.view), dtype=np.uint8).reshape(-1, 4096)
        vm.resume()
        time.sleep(0.3)
        vm.pause()
        dirty = vm.memory.fetch_dirty(region)
        after = np.frombuffer(region.view, dtype=np.uint8).reshape(-1, 4096)
        changed = (before != after).any(axis=1)
        assert changed.sum() > 100  # the guest did re-dirty its working set
        assert not (changed & ~dirty).any(), "a changed page was missing from the dirty log"
        del after
        vm.resume()


def copy_memory_from(source: GuestMemory):
    def fill(target: GuestMemory) -> None:
        for src, dst in zip(source.regions, target.regions, strict=True):
            dst.view[:] = src.view

    return fill


@pytest.mark.parametrize("vcpus", [1, 2])
def test_running_guest_moves_into_a_fresh_vm_and_continues(testguest: Path, vcpus: int) -> None:
    rounds = 8
    first_out = io.BytesIO()
    first = paced_guest(testguest, vcpus, rounds=rounds, out=first_out, exit_code=33)
    first.start()
    wait_for_output(first_out, b"round=3 ", 30)
    first.pause()
    state = first.save_state()
    second_out = io.BytesIO()
    second = build_microvm_from_state(state, serial_out=second_out, memory_fill=copy_memory_from(first.memory))
    first.close()  # the original is gone: only the moved state lives on

    assert state["version"] == 1 and len(state["vcpus"]) == vcpus
    assert state["config"]["vcpus"] == vcpus and state["config"]["mem_size"] == 64 * MiB
    assert [r["name"] for r in state["memory"]["regions"]] == ["ram0"]
    with second:
        second.start()
        status = second.wait(60)
    assert (status.code, status.reason) == (33, "poweroff")
    before, after = first_out.getvalue(), second_out.getvalue()
    assert rounds_by_cpu(after), "the restored guest printed no further rounds"
    assert_clean_run(before + after, vcpus, rounds)


def test_restore_refuses_an_unknown_state_version(testguest: Path) -> None:
    out = io.BytesIO()
    with paced_guest(testguest, 1, rounds=0, out=out) as vm:
        vm.start()
        wait_for_output(out, b"timer ok", 30)
        vm.pause()
        state = vm.save_state()
    with pytest.raises(VmStateError, match="version 7"):
        build_microvm_from_state(state | {"version": 7})
    bad_vcpu = dict(state, vcpus=[state["vcpus"][0] | {"regs": b"short"}])
    with pytest.raises(VmStateError, match="regs is 5 bytes"):
        build_microvm_from_state(bad_vcpu, serial_out=io.BytesIO())


def test_restore_straight_from_a_memory_file_leaves_the_file_untouched(testguest: Path, tmp_path: Path) -> None:
    """memory_backing maps guest RAM privately from an image file: the guest runs
    on copy-on-write pages and the image stays as it was saved."""
    first_out = io.BytesIO()
    first = paced_guest(testguest, 1, rounds=6, out=first_out, exit_code=21)
    first.start()
    wait_for_output(first_out, b"round=2 ", 30)
    first.pause()
    state = first.save_state()
    image = tmp_path / "ram0.img"
    image.write_bytes(first.memory.regions[0].view)
    first.close()
    saved = image.read_bytes()

    second_out = io.BytesIO()
    second = build_microvm_from_state(
        state, serial_out=second_out, memory_backing={"ram0": FileBacking(image)}
    )
    with second:
        second.start()
        status = second.wait(60)
    assert (status.code, status.reason) == (21, "poweroff")
    assert_clean_run(first_out.getvalue() + second_out.getvalue(), 1, 6)
    assert image.read_bytes() == saved


def test_memory_file_too_small_is_refused(testguest: Path, tmp_path: Path) -> None:
    out = io.BytesIO()
    with paced_guest(testguest, 1, rounds=0, out=out) as vm:
        vm.start()
        wait_for_output(out, b"timer ok", 30)
        vm.pause()
        state = vm.save_state()
    image = tmp_path / "short.img"
    image.write_bytes(bytes(4096))
    with pytest.raises(GuestMemoryError, match="holds 4096 bytes"):
        build_microvm_from_state(state, serial_out=io.BytesIO(), memory_backing={"ram0": FileBacking(image)})
