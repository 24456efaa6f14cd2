"""Versioned part state: upgrades from older versions, refusals of what cannot be
read (docs/format.md, "Compatibility"). The golden repository test
(tests/compat/test_golden.py) proves the promise on a whole snapshot."""

from __future__ import annotations

import copy
import io

import pytest

from snapvisor.vmm.builder import VmConfig, build_microvm_for_boot, build_microvm_from_state
from snapvisor.vmm.devices.blockfile import DiskConfig
from snapvisor.vmm.errors import VmStateError
from snapvisor.vmm.persist import upgraded


def test_upgrades_run_in_order_from_the_saved_version() -> None:
    upgrades = {
        1: lambda s: {**s, "b": s["a"] * 2},
        2: lambda s: {k: v for k, v in s.items() if k != "a"},
    }
    saved = {"version": 1, "a": 21}
    assert upgraded("widget", saved, 3, upgrades) == {"version": 3, "b": 42}
    assert saved == {"version": 1, "a": 21}, "the saved state must not change"
    assert upgraded("widget", {"version": 2, "a": 1, "b": 5}, 3, upgrades) == {"version": 3, "b": 5}
    assert upgraded("widget", {"version": 3, "b": 5}, 3, upgrades) == {"version": 3, "b": 5}


@pytest.mark.parametrize(
    ("saved", "message"),
    [
        ({"version": 4}, "widget state version 4 was written by a newer snapvisor"),
        ({"version": 1}, "widget state version 1 is older than this snapvisor restores (versions 2 to 3)"),
        ({}, "widget state has no valid version (None); the snapshot is damaged"),
        ({"version": "2"}, "no valid version ('2')"),
        ({"version": True}, "no valid version (True)"),
        ({"version": 0}, "no valid version (0)"),
    ],
)
def test_unreadable_versions_are_refused_by_name(saved: dict, message: str) -> None:
    with pytest.raises(VmStateError, match=message.replace("(", r"\(").replace(")", r"\)")):
        upgraded("widget", saved, 3, {2: lambda s: s})


def _versioned_parts(state: dict, path: tuple = ()) -> list[tuple]:
    """The key paths of every versioned part in a VM state tree."""
    found = [path] if "version" in state else []
    for key, value in state.items():
        if isinstance(value, dict):
            found += _versioned_parts(value, path + (key,))
        elif isinstance(value, list):
            for index, item in enumerate(value):
                if isinstance(item, dict):
                    found += _versioned_parts(item, path + (key, index))
    return found


@pytest.mark.kvm
def test_every_part_refuses_a_state_from_a_newer_release(testguest, tmp_path) -> None:
    """The class: each versioned part of a real VM's state (vCPU, irqchip, memory,
    every device and virtqueue), one at a time, set to a version this release does
    not know: the restore fails naming that part, and builds nothing."""
    image = tmp_path / "vda.img"
    image.write_bytes(bytes(1 << 20))
    vm = build_microvm_for_boot(VmConfig(
        kernel=testguest, cmdline="console=ttyS0", mem_size=16 << 20, vcpus=2,
        serial_out=io.BytesIO(), disks=[DiskConfig(image)],
    ))
    with vm:
        state = vm.save_state()
    parts = _versioned_parts(state)
    assert len(parts) >= 8, parts  # VM, memory, irqchip, 2 vCPUs, devices, virtio transport, queue
    for path in parts:
        newer = copy.deepcopy(state)
        node = newer
        for key in path:
            node = node[key]
        node["version"] += 1
        with pytest.raises(VmStateError, match="written by a newer snapvisor"):
            build_microvm_from_state(newer, serial_out=io.BytesIO())
    with build_microvm_from_state(state, serial_out=io.BytesIO()):
        pass
