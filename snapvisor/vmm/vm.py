"""A built VM: its vCPU threads and the controls the outside world uses
(start, pause, resume, wait, stop, save_state)."""

from __future__ import annotations

import signal
import threading
import time
from typing import Any, Callable

from snapvisor.vmm.bus import MmioBus, PioBus
from snapvisor.vmm.devices.console import SerialInputPump
from snapvisor.vmm.devices.serial import Serial
from snapvisor.vmm.errors import VmRuntimeError
from snapvisor.vmm.exit_status import ExitStatus
from snapvisor.vmm.irqchip import Irqchip
from snapvisor.vmm.kvm import Kvm, VmFd
from snapvisor.vmm.memory import GuestMemory
from snapvisor.vmm.vcpu import Vcpu, block_kicks_in_this_thread, install_kick_handler

STATE_VERSION = 1
PAUSE_TIMEOUT_S = 5.0
# Seen on the PVM host, rarely: a vCPU blocked in KVM_RUN (waiting for SIPI) stayed
# there although its kick was sent. Kicking again until it leaves costs nothing.
KICK_RETRY_S = 0.1
STOPPED = ExitStatus(0, "stopped", "stopped by the VMM")


class VcpuControl:
    """Pause and stop requests shared between the VM and its vCPU threads."""

    def __init__(self, vcpu_count: int, on_exit: Callable[[ExitStatus], None]) -> None:
        self._on_exit = on_exit
        self.stopping = False
        self.paused = False
        self._vcpu_count = vcpu_count
        self._cond = threading.Condition()
        self._parked: set[int] = set()
        self._finished: set[int] = set()
        self.status: ExitStatus | None = None
        self.exited = threading.Event()

    def park_if_paused(self, vcpu: Vcpu) -> None:
        with self._cond:
            if not self.paused:
                return
            self._parked.add(vcpu.index)
            self._cond.notify_all()
            while self.paused and not self.stopping:
                self._cond.wait()
            self._parked.discard(vcpu.index)

    def wait_all_parked(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(
                lambda: len(self._parked | self._finished) == self._vcpu_count, timeout=timeout
            )

    def request_pause(self) -> None:
        with self._cond:
            self.paused = True

    def release(self) -> None:
        with self._cond:
            self.paused = False
            self._cond.notify_all()

    def record_exit(self, status: ExitStatus) -> bool:
        """Keep the first exit status; returns True if this one was first."""
        with self._cond:
            first = self.status is None
            if first:
                self.status = status
            self.stopping = True
            self._cond.notify_all()
        self.exited.set()
        return first

    def vcpu_finished(self, vcpu: Vcpu, status: ExitStatus | None) -> None:
        with self._cond:
            self._finished.add(vcpu.index)
            self._cond.notify_all()
        if status is not None:
            self._on_exit(status)


class Vm:
    def __init__(
        self,
        kvm: Kvm,
        vm_fd: VmFd,
        memory: GuestMemory,
        irqchip: Irqchip,
        vcpus: list[Vcpu],
        serial: Serial,
        pio_bus: PioBus,
        mmio_bus: MmioBus,
        devices: dict[str, Any],
        config: dict,
        serial_input: SerialInputPump | None,
    ) -> None:
        self.kvm = kvm
        self.vm_fd = vm_fd
        self.memory = memory
        self.irqchip = irqchip
        self.vcpus = vcpus
        self.serial = serial
        self.pio_bus = pio_bus
        self.mmio_bus = mmio_bus
        self.devices = devices  # name -> device with save()/restore()
        self.config = config
        self._serial_input = serial_input
        self._control = VcpuControl(len(vcpus), on_exit=self.request_exit)
        self._started = False
        self._closed = False

    # --- lifecycle -------------------------------------------------------------
    def start(self) -> None:
        if self._started:
            raise VmRuntimeError("the VM was already started")
        install_kick_handler()
        self._started = True
        for vcpu in self.vcpus:
            vcpu.thread = threading.Thread(
                target=vcpu.run_loop, args=(self._control,), name=f"vcpu{vcpu.index}", daemon=True
            )
        # Threads inherit the creator's signal mask: starting them with kicks
        # already blocked means a kick sent before a thread reaches KVM_RUN
        # stays pending instead of being delivered (and lost) early.
        previous_mask = block_kicks_in_this_thread()
        try:
            for vcpu in self.vcpus:
                vcpu.thread.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)
        if self._serial_input is not None:
            self._serial_input.start()
        for device in self._io_devices():
            device.start_io()

    def _io_devices(self) -> list[Any]:
        """Devices that may write guest memory from threads of their own (net RX)."""
        return [device for device in self.devices.values() if hasattr(device, "pause_io")]

    @property
    def running(self) -> bool:
        return self._started and not self._control.exited.is_set()

    @property
    def paused(self) -> bool:
        return self._control.paused

    def pause(self, timeout: float = PAUSE_TIMEOUT_S) -> int:
        """Return once every vCPU is out of KVM_RUN and parked, with any pending
        port/MMIO exit completed (KVM completes it on the KVM_RUN that the kick
        interrupts), so the saved state is consistent. Returns how many rounds of
        kicks that took (1 unless a kick went unanswered for KICK_RETRY_S)."""
        if not self._started:
            raise VmRuntimeError("the VM has not been started")
        self._control.request_pause()
        deadline = time.monotonic() + timeout
        rounds = 0
        while True:
            rounds += 1
            for vcpu in self.vcpus:
                vcpu.kick()
            remaining = deadline - time.monotonic()
            if self._control.wait_all_parked(min(KICK_RETRY_S, max(remaining, 0))):
                for device in self._io_devices():
                    device.pause_io()  # and no device writes guest memory either
                return rounds
            if remaining <= 0:
                raise VmRuntimeError(f"the vCPUs did not pause within {timeout} s")

    def resume(self) -> None:
        if not self._control.paused:
            return
        for device in self._io_devices():
            device.resume_io()
        self._control.release()

    def request_exit(self, status: ExitStatus) -> None:
        """Called by devices (power off, reset) and failing vCPUs: the first
        status is the VM's, and every vCPU leaves its loop."""
        if self._control.record_exit(status):
            self.serial.flush()
        for vcpu in self.vcpus:
            vcpu.kick()

    def wait(self, timeout: float | None = None) -> ExitStatus | None:
        """The exit status once the VM has stopped, or None on timeout."""
        if not self._control.exited.wait(timeout):
            return None
        for vcpu in self.vcpus:
            if vcpu.thread is not None and vcpu.thread is not threading.current_thread():
                vcpu.thread.join(KICK_RETRY_S)
                while vcpu.thread.is_alive():
                    vcpu.kick()
                    vcpu.thread.join(KICK_RETRY_S)
        if self._serial_input is not None:
            self._serial_input.stop()
        return self._control.status

    def stop(self) -> ExitStatus:
        """Forced stop (idempotent): the VM's status stays the first one recorded."""
        if self._started:
            self.request_exit(STOPPED)
            status = self.wait()
            assert status is not None
            return status
        self._control.record_exit(STOPPED)
        return STOPPED

    def close(self) -> None:
        if self._closed:
            return
        self.stop()
        self._closed = True
        self.serial.flush()
        for vcpu in self.vcpus:
            vcpu.fd.close()
        for device in self.devices.values():
            if hasattr(device, "close"):
                device.close()  # devices holding host resources: disk images
        self.memory.close()
        self.vm_fd.close()
        self.kvm.close()

    def __enter__(self) -> "Vm":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- persistence ------------------------------------------------------------
    def save_state(self) -> dict:
        """Every part's state as plain data; the VM must be paused (or not started)."""
        if self._started and not self._control.paused:
            raise VmRuntimeError("pause the VM before saving its state")
        return {
            "version": STATE_VERSION,
            "config": dict(self.config),
            "memory": self.memory.save(),
            "irqchip": self.irqchip.save(),
            "vcpus": [vcpu.save() for vcpu in self.vcpus],
            "devices": {name: device.save() for name, device in self.devices.items()},
        }
