"""The CMOS real-time clock (an MC146818) at ports 0x70 (index, bit 7 masks
NMIs) and 0x71 (data): what Linux's rtc_cmos driver and its boot-time
read_persistent_clock read.

The clock is the host's clock plus an offset, in whole seconds, that the guest
changes by setting the time. Only the offset is saved: a restored or moved VM
reads the host's current time (moved by the guest's own offset), not the time
of the snapshot. Binary-coded decimal or binary as status B asks, always 24-hour.
Alarms and periodic interrupts are not emulated (no IRQ 8): the alarm registers
hold what is written, status C reads 0. Registers 0x0E-0x7F are plain NVRAM.
"""

from __future__ import annotations

import calendar
import time
INDEX_PORT = 0x70
PORT_COUNT = 2
NMI_DISABLE = 1 << 7
INDEX_MASK = 0x7F
CMOS_SIZE = 128
STATE_VERSION = 1

SECONDS, MINUTES, HOURS, WEEKDAY, DAY, MONTH, YEAR = 0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09
STATUS_A, STATUS_B, STATUS_C, STATUS_D = 0x0A, 0x0B, 0x0C, 0x0D
CENTURY = 0x32  # the FADT's RTC_CENTURY_INDEX points here
_TIME_FIELDS = (SECONDS, MINUTES, HOURS, WEEKDAY, DAY, MONTH, YEAR, CENTURY)

A_UPDATE_IN_PROGRESS = 1 << 7
A_POWER_ON = 0x26  # 32.768 kHz time base, 1024 Hz rate
B_SET = 1 << 7  # the guest is setting the time: the clock is held
B_BINARY = 1 << 2  # 0: BCD
B_24_HOUR = 1 << 1
B_POWER_ON = B_24_HOUR
D_VALID_RAM_AND_TIME = 1 << 7
# The MC146818 sets UIP this long before each second's update; Linux waits it out.
UPDATE_IN_PROGRESS_S = 244e-6


def _bcd(value: int) -> int:
    return ((value // 10) << 4) | (value % 10)


def _from_bcd(value: int) -> int:
    high, low = value >> 4, value & 0xF
    if high > 9 or low > 9:
        raise ValueError(f"{value:#x} is not BCD")
    return high * 10 + low


class CmosRtc:
    def __init__(self) -> None:
        self.offset_s = 0  # guest time - host time
        self.index = 0
        self.nmi_disabled = False
        self.cmos = bytearray(CMOS_SIZE)
        self.cmos[STATUS_A] = A_POWER_ON
        self.cmos[STATUS_B] = B_POWER_ON
        self.held: dict[int, int] | None = None  # time fields while B_SET holds the clock

    # --- the guest's side ------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if offset == 0:
            return 0xFF  # the index register is write-only
        register = self.index
        if register in _TIME_FIELDS:
            fields = self.held if self.held is not None else self._fields(self._guest_time())
            return fields[register]
        if register == STATUS_A:
            return self.cmos[STATUS_A] | (A_UPDATE_IN_PROGRESS if self._updating() else 0)
        if register == STATUS_C:
            return 0  # no interrupt ever pending
        if register == STATUS_D:
            return D_VALID_RAM_AND_TIME
        return self.cmos[register]

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        if offset == 0:
            self.index, self.nmi_disabled = value & INDEX_MASK, bool(value & NMI_DISABLE)
            return
        register = self.index
        if register in _TIME_FIELDS:
            fields = self.held if self.held is not None else self._fields(self._guest_time())
            fields[register] = value
            if self.held is None:
                self._set_time(fields)
        elif register == STATUS_A:
            self.cmos[STATUS_A] = value & ~A_UPDATE_IN_PROGRESS
        elif register == STATUS_B:
            self._write_status_b(value | B_24_HOUR)
        elif register not in (STATUS_C, STATUS_D):
            self.cmos[register] = value

    def _write_status_b(self, value: int) -> None:
        was_held = self.held is not None
        if value & B_SET and not was_held:
            self.held = self._fields(self._guest_time())
        self.cmos[STATUS_B] = value
        if not value & B_SET and was_held:
            fields, self.held = self.held, None
            self._set_time(fields)

    # --- the clock -------------------------------------------------------------------
    def _guest_time(self) -> int:
        return int(time.time()) + self.offset_s

    def _updating(self) -> bool:
        return self.held is None and 1 - (time.time() % 1) < UPDATE_IN_PROGRESS_S

    def _encode(self, value: int) -> int:
        return value if self.cmos[STATUS_B] & B_BINARY else _bcd(value)

    def _decode(self, value: int) -> int:
        return value if self.cmos[STATUS_B] & B_BINARY else _from_bcd(value)

    def _fields(self, seconds: int) -> dict[int, int]:
        t = time.gmtime(seconds)
        values = {
            SECONDS: t.tm_sec,
            MINUTES: t.tm_min,
            HOURS: t.tm_hour,
            WEEKDAY: (t.tm_wday + 1) % 7 + 1,  # Sunday is 1
            DAY: t.tm_mday,
            MONTH: t.tm_mon,
            YEAR: t.tm_year % 100,
            CENTURY: t.tm_year // 100,
        }
        return {register: self._encode(value) for register, value in values.items()}

    def _set_time(self, fields: dict[int, int]) -> None:
        """The guest set the time: keep its distance to the host's clock. A date
        that does not exist (the guest is untrusted) leaves the clock as it was."""
        try:
            year = self._decode(fields[CENTURY]) * 100 + self._decode(fields[YEAR])
            when = (year, self._decode(fields[MONTH]), self._decode(fields[DAY]),
                    self._decode(fields[HOURS]), self._decode(fields[MINUTES]), self._decode(fields[SECONDS]))
            if not (1 <= year <= 9999 and 1 <= when[1] <= 12 and 1 <= when[2] <= calendar.monthrange(year, when[1])[1]
                    and when[3] < 24 and when[4] < 60 and when[5] < 60):
                raise ValueError(f"{when} is not a date")
        except ValueError:
            return
        self.offset_s = calendar.timegm(when) - int(time.time())

    # --- persistence --------------------------------------------------------------
    def save(self) -> dict:
        return {
            "version": STATE_VERSION,
            "offset_s": self.offset_s,
            "index": self.index,
            "nmi_disabled": self.nmi_disabled,
            "cmos": bytes(self.cmos),
            "held": [self.held[register] for register in _TIME_FIELDS] if self.held is not None else None,
        }

    def restore(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"CMOS RTC state version {state.get('version')} is not {STATE_VERSION}")
        cmos, offset, index, held = state.get("cmos"), state.get("offset_s"), state.get("index"), state.get("held")
        if not (isinstance(cmos, bytes) and len(cmos) == CMOS_SIZE and isinstance(offset, int)
                and isinstance(index, int) and 0 <= index <= INDEX_MASK):
            raise ValueError("the saved CMOS RTC state is not valid")
        if held is not None and not (
            isinstance(held, list) and len(held) == len(_TIME_FIELDS) and all(isinstance(v, int) and 0 <= v <= 0xFF for v in held)
        ):
            raise ValueError("the saved CMOS RTC time fields are not valid")
        self.offset_s, self.index, self.nmi_disabled = offset, index, bool(state.get("nmi_disabled"))
        self.cmos = bytearray(cmos)
        self.held = dict(zip(_TIME_FIELDS, held, strict=True)) if held is not None else None
