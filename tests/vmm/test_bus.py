"""PIO and MMIO buses: address-range dispatch and overlap refusal."""

from __future__ import annotations

import pytest

from snapvisor.vmm.bus import BusConflictError, MmioBus, PioBus


class Device:
    def read(self, offset: int, size: int) -> int:
        return offset

    def write(self, offset: int, size: int, value: int) -> None:
        pass


def test_pio_lookup_gives_the_device_and_offset() -> None:
    bus, com1 = PioBus(), Device()
    bus.register(0x3F8, 8, com1)
    assert bus.lookup(0x3F8) == (com1, 0)
    assert bus.lookup(0x3FF) == (com1, 7)
    assert bus.lookup(0x400) is None and bus.lookup(0x3F7) is None


@pytest.mark.parametrize("base,length", [(0x3FC, 2), (0x3F0, 9), (0xFFFF, 2), (-1, 1)])
def test_pio_refuses_overlaps_and_out_of_range(base: int, length: int) -> None:
    bus = PioBus()
    bus.register(0x3F8, 8, Device())
    with pytest.raises(BusConflictError):
        bus.register(base, length, Device())


def test_mmio_lookup_needs_the_whole_access_inside_one_range() -> None:
    bus, low, high = MmioBus(), Device(), Device()
    bus.register(0xD0000000, 0x1000, low)
    bus.register(0xD0002000, 0x1000, high)
    assert bus.lookup(0xD0000FFC, 4) == (low, 0xFFC)
    assert bus.lookup(0xD0002010, 8) == (high, 0x10)
    assert bus.lookup(0xD0000FFE, 4) is None  # straddles the end
    assert bus.lookup(0xD0001000, 4) is None  # the gap
    assert bus.lookup(0xCFFFFFFF, 1) is None


@pytest.mark.parametrize("base,length", [(0xD0000800, 0x1000), (0xCFFFF000, 0x1001), (0xD0000000, 1)])
def test_mmio_refuses_overlaps(base: int, length: int) -> None:
    bus = MmioBus()
    bus.register(0xD0000000, 0x1000, Device())
    with pytest.raises(BusConflictError):
        bus.register(base, length, Device())
