"""How a VM ended."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# "stopped": the VMM stopped the VM (Vm.stop) before the guest did.
# "migrated": the VM moved to another host and was ended here (machine.VM.moved_away).
ExitReason = Literal["poweroff", "reset", "error", "stopped", "migrated"]

# Exit status reported for a VMM-side failure (emulation failure, KVM error):
# EX_SOFTWARE from sysexits.h, so it stands out from small guest-chosen codes.
ERROR_EXIT_CODE = 70


@dataclass(frozen=True)
class ExitStatus:
    code: int
    reason: ExitReason
    message: str = ""
