"""The legacy PC devices a stock Linux probes, read by small guests on /dev/kvm:
the CMOS RTC (host time, the guest's own setting, kept across save/restore as
an offset) and the i8042 (every probe command answered at once, no keyboard)."""

from __future__ import annotations

import calendar
import io
import time
from pathlib import Path

import pytest

from flat_guest import elf_image, in_byte, out_al, out_byte, power_off, spin
from snapvisor.vmm.builder import VmConfig, build_microvm_for_boot, build_microvm_from_state
from snapvisor.vmm.devices import i8042, rtc
from snapvisor.vmm.errors import VmStateError

pytestmark = pytest.mark.kvm
MiB = 1 << 20
COM1 = 0x3F8
TIME_REGISTERS = [rtc.SECONDS, rtc.MINUTES, rtc.HOURS, rtc.DAY, rtc.MONTH, rtc.YEAR, rtc.CENTURY]


def _run(tmp_path: Path, code: bytes, timeout: float = 10) -> bytes:
    kernel = tmp_path / "k.elf"
    kernel.write_bytes(elf_image(code))
    out = io.BytesIO()
    with build_microvm_for_boot(VmConfig(kernel=kernel, mem_size=64 * MiB, serial_out=out)) as vm:
        vm.start()
        status = vm.wait(timeout)
    assert status is not None and (status.code, status.reason) == (0, "poweroff"), status
    return out.getvalue()


def _read_cmos(register: int, nmi_off: bool = False) -> bytes:
    """Select the register (NMI mask bit as asked) and print its value on COM1."""
    return out_byte(rtc.INDEX_PORT, register | (rtc.NMI_DISABLE if nmi_off else 0)) + in_byte(0x71) + out_al(COM1)


def _write_cmos(register: int, value: int) -> bytes:
    return out_byte(rtc.INDEX_PORT, register) + out_byte(0x71, value)


def _bcd_time(values: bytes) -> int:
    sec, minute, hour, day, month, year, century = (int(f"{v:x}") for v in values)
    return calendar.timegm((century * 100 + year, month, day, hour, minute, sec, 0, 0, 0))


def test_rtc_reads_the_host_time_in_bcd(tmp_path: Path) -> None:
    before = int(time.time())
    console = _run(tmp_path, b"".join(_read_cmos(r, nmi_off=r == rtc.SECONDS) for r in TIME_REGISTERS)
                   + _read_cmos(rtc.STATUS_B) + _read_cmos(rtc.STATUS_D) + power_off(0))
    after = time.time()
    assert before <= _bcd_time(console[:7]) <= after
    status_b, status_d = console[7], console[8]
    assert status_b & rtc.B_24_HOUR and not status_b & rtc.B_BINARY  # BCD, 24-hour, as Linux expects
    assert status_d == rtc.D_VALID_RAM_AND_TIME  # bit 6 clear: Linux's "RTC accessible" check


def test_rtc_time_set_by_the_guest_moves_with_the_host_clock(tmp_path: Path) -> None:
    """The guest sets 2031-05-17 08:09:10 the way Linux does (SET held in status B),
    reads it back; the VM's saved state restores it as host time + the same offset."""
    setting = [(rtc.SECONDS, 0x10), (rtc.MINUTES, 0x09), (rtc.HOURS, 0x08), (rtc.DAY, 0x17),
               (rtc.MONTH, 0x05), (rtc.YEAR, 0x31), (rtc.CENTURY, 0x20)]
    code = (_write_cmos(rtc.STATUS_B, rtc.B_SET | rtc.B_24_HOUR)
            + b"".join(_write_cmos(r, v) for r, v in setting)
            + _write_cmos(rtc.STATUS_B, rtc.B_24_HOUR)
            + b"".join(_read_cmos(r) for r in TIME_REGISTERS) + out_byte(COM1, ord("\n")) + spin())
    kernel = tmp_path / "k.elf"
    kernel.write_bytes(elf_image(code))
    out = io.BytesIO()
    set_at = time.time()
    with build_microvm_for_boot(VmConfig(kernel=kernel, mem_size=64 * MiB, serial_out=out)) as vm:
        vm.start()
        deadline = time.monotonic() + 10
        while not out.getvalue().endswith(b"\n") and time.monotonic() < deadline:
            time.sleep(0.01)
        vm.pause()
        state = vm.save_state()
    target = calendar.timegm((2031, 5, 17, 8, 9, 10, 0, 0, 0))
    assert target <= _bcd_time(out.getvalue()[:7]) <= target + 1 + (time.time() - set_at)
    offset = state["devices"]["rtc"]["offset_s"]
    assert abs(offset - (target - set_at)) <= 1
    with build_microvm_from_state(state, serial_out=io.BytesIO()) as restored:
        device = restored.devices["rtc"]
        now = time.time()
        device.write(0, 1, rtc.SECONDS)
        seconds = int(f"{device.read(1, 1):x}")
        assert device.offset_s == offset
        expected = time.gmtime(int(now) + offset)
        assert seconds in (expected.tm_sec, (expected.tm_sec + 1) % 60)


def test_rtc_field_written_without_set_moves_the_clock_at_once() -> None:
    clock = rtc.CmosRtc()
    now = time.gmtime()
    if (now.tm_mon, now.tm_mday) == (2, 29):
        pytest.skip("no 29 February next year")
    clock.write(0, 1, rtc.YEAR)
    clock.write(1, 1, int(f"{(now.tm_year + 1) % 100}", 16))  # BCD
    next_year = calendar.timegm((now.tm_year + 1,) + tuple(now[1:6]) + (0, 0, 0))
    assert abs(clock.offset_s - (next_year - calendar.timegm(now))) <= 1


@pytest.mark.parametrize(
    "fields",
    [{rtc.MONTH: 0x13}, {rtc.DAY: 0x31, rtc.MONTH: 0x02}, {rtc.HOURS: 0x24}, {rtc.SECONDS: 0x5A}],
    ids=["month-13", "feb-31", "hour-24", "not-bcd"],
)
def test_rtc_ignores_a_time_that_does_not_exist(fields: dict[int, int]) -> None:
    """Guest writes are untrusted: an impossible date leaves the clock where it was."""
    clock = rtc.CmosRtc()
    clock.write(0, 1, rtc.STATUS_B)
    clock.write(1, 1, rtc.B_SET | rtc.B_24_HOUR)
    for register, value in fields.items():
        clock.write(0, 1, register)
        clock.write(1, 1, value)
    clock.write(0, 1, rtc.STATUS_B)
    clock.write(1, 1, rtc.B_24_HOUR)
    assert clock.offset_s == 0


@pytest.mark.parametrize(
    "state",
    [{"version": 9}, {"version": 1, "offset_s": 0, "index": 200, "cmos": bytes(128)},
     {"version": 1, "offset_s": 0, "index": 0, "cmos": bytes(12)},
     {"version": 1, "offset_s": 0, "index": 0, "cmos": bytes(128), "held": [1, 2]}],
)
def test_rtc_refuses_a_damaged_saved_state(state: dict) -> None:
    with pytest.raises(ValueError):
        rtc.CmosRtc().restore(state)


def _i8042_command(command: int, parameter: int | None = None) -> bytes:
    """Linux's __i8042_command: command to 0x64, its parameter to 0x60, then the
    status (printed) and the answer from 0x60 (printed)."""
    code = out_byte(0x64, command)
    if parameter is not None:
        code += out_byte(0x60, parameter)
    return code + in_byte(0x64) + out_al(COM1) + in_byte(0x60) + out_al(COM1)


def test_i8042_answers_what_linux_probes_with(tmp_path: Path) -> None:
    console = _run(
        tmp_path,
        _i8042_command(0xAA)  # self test
        + _i8042_command(0x20)  # read CTR
        + out_byte(0x64, 0x60) + out_byte(0x60, 0x47)  # write CTR
        + _i8042_command(0x20)
        + _i8042_command(0xD3, 0x5A)  # AUX loop-back
        + _i8042_command(0xA9)  # AUX interface test
        + _i8042_command(0xAB)  # keyboard interface test
        + in_byte(0x64) + out_al(COM1)  # nothing left to read
        + power_off(0),
    )
    pairs = [(console[i], console[i + 1]) for i in range(0, 12, 2)]
    assert all(status & i8042.STATUS_OUTPUT_FULL for status, _ in pairs)  # every answer is there at once
    assert [value for _, value in pairs] == [0x55, i8042.POWER_ON_CTR, 0x47, 0x5A, i8042.AUX_CLOCK_STUCK_LOW, 0x00]
    assert not pairs[3][0] & i8042.STATUS_AUX_DATA  # no AUX port: the loop-back is not AUX data
    assert not console[12] & i8042.STATUS_OUTPUT_FULL


def test_i8042_state_survives_save_and_restore(tmp_path: Path) -> None:
    """A CTR the guest wrote and an answer it has not read yet are in the saved state."""
    code = out_byte(0x64, 0x60) + out_byte(0x60, 0x30) + out_byte(0x64, 0xAA) + out_byte(COM1, ord("\n")) + spin()
    kernel = tmp_path / "k.elf"
    kernel.write_bytes(elf_image(code))
    out = io.BytesIO()
    with build_microvm_for_boot(VmConfig(kernel=kernel, mem_size=64 * MiB, serial_out=out)) as vm:
        vm.start()
        deadline = time.monotonic() + 10
        while out.getvalue() != b"\n" and time.monotonic() < deadline:
            time.sleep(0.01)
        vm.pause()
        state = vm.save_state()
    with build_microvm_from_state(state, serial_out=io.BytesIO()) as restored:
        controller = restored.devices["i8042"]
        assert controller.read(4, 1) & i8042.STATUS_OUTPUT_FULL
        assert controller.read(0, 1) == 0x55
        controller.write(4, 1, 0x20)
        assert controller.read(0, 1) == 0x30


def test_a_state_saved_before_these_devices_restores_them_at_power_on(tmp_path: Path) -> None:
    """Snapshots taken by a snapvisor without the RTC and the ACPI sleep registers
    (and with a stateless i8042) still restore; those devices start as powered on."""
    kernel = tmp_path / "k.elf"
    kernel.write_bytes(elf_image(spin()))
    with build_microvm_for_boot(VmConfig(kernel=kernel, mem_size=16 * MiB, serial_out=io.BytesIO())) as vm:
        vm.start()
        vm.pause()
        state = vm.save_state()
    del state["devices"]["rtc"], state["devices"]["acpi_sleep"]
    state["devices"]["i8042"] = {"version": 1}
    with build_microvm_from_state(state, serial_out=io.BytesIO()) as restored:
        assert restored.devices["rtc"].offset_s == 0
        assert restored.devices["i8042"].save()["ctr"] == i8042.POWER_ON_CTR
    del state["devices"]["serial"]
    with pytest.raises(VmStateError, match="the saved state has no serial device"):
        build_microvm_from_state(state, serial_out=io.BytesIO())
