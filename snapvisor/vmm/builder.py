"""The one place that wires a VM together: for a fresh boot, or from saved state
(Firecracker's build_microvm_for_boot / build_microvm_from_snapshot)."""

from __future__ import annotations

import logging
import os
import sys
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Mapping, Sequence

from snapvisor.vmm.acpi import MmioDevice
from snapvisor.vmm.bus import MmioBus, PioBus
from snapvisor.vmm.devices.acpi_sleep import PORT_COUNT as SLEEP_PORT_COUNT
from snapvisor.vmm.devices.acpi_sleep import SLEEP_CONTROL_PORT, AcpiSleepRegisters
from snapvisor.vmm.devices.blockfile import BlockFile, DiskConfig, check_disk_image
from snapvisor.vmm.devices.console import SerialInputPump
from snapvisor.vmm.devices.i8042 import DATA_PORT, I8042
from snapvisor.vmm.devices.i8042 import PORT_RANGE as I8042_PORT_RANGE
from snapvisor.vmm.devices.power import POWER_OFF_PORT, PowerOffPort
from snapvisor.vmm.devices.rtc import INDEX_PORT as RTC_PORT
from snapvisor.vmm.devices.rtc import PORT_COUNT as RTC_PORT_COUNT
from snapvisor.vmm.devices.rtc import CmosRtc
from snapvisor.vmm.devices.serial import COM1_IRQ, COM1_PORT, PORT_COUNT, Serial, SerialOutput
from snapvisor.vmm.devices.tap import Tap, require_tap
from snapvisor.vmm.devices.virtio.block import VirtioBlock
from snapvisor.vmm.devices.virtio.mmio import MMIO_WINDOW, VirtioMmioTransport, kernel_cmdline_option, mmio_window
from snapvisor.vmm.devices.virtio.net import NetConfigError, VirtioNet, format_mac, parse_mac, random_mac
from snapvisor.vmm.errors import VmConfigError, VmStateError
from snapvisor.vmm.exit_status import ExitStatus
from snapvisor.vmm.irqchip import Irqchip
from snapvisor.vmm.kvm import Kvm, VcpuFd, ffi
from snapvisor.vmm.kvm import bindings as b
from snapvisor.vmm.loader import check_boot_files, load_kernel
from snapvisor.vmm.memory import PAGE_SIZE, FileBacking, GuestMemory
from snapvisor.vmm.memory import STATE_VERSION as MEMORY_STATE_VERSION
from snapvisor.vmm.persist import upgraded
from snapvisor.vmm.vcpu import Vcpu
from snapvisor.vmm.vm import STATE_VERSION, Vm

# Where KVM may put the three pages it needs on Intel hosts (below the 4 GiB
# boundary, inside the MMIO hole, away from the LAPIC/IOAPIC).
KVM_TSS_ADDRESS = 0xFFFBD000
MIN_MEM_SIZE = 2 << 20
log = logging.getLogger("snapvisor.vmm")
MAX_VIRTIO_DEVICES = 16  # disks and network devices: IOAPIC pins 5..20


@dataclass(frozen=True)
class NetConfig:
    """A virtio-net device on host tap `tap`; `mac` None: a random local one."""

    tap: str
    mac: str | None = None
    create: bool = False  # create the tap if it does not exist


@dataclass(frozen=True)
class NetRestoreOptions:
    """How a restored or arriving VM's network devices attach on this host."""

    taps: Mapping[str, str] = field(default_factory=dict)  # tap named in the snapshot -> tap here
    announce: bool = True  # announce each guest MAC (RARP) once the VM runs
# Devices newer than some saved states: a state without one restores it at
# power-on (the guest that was saved never touched it).
DEVICES_ADDED_LATER = frozenset({"acpi_sleep", "rtc"})


@dataclass
class VmConfig:
    kernel: Path
    initrd: Path | None = None
    cmdline: str = "console=ttyS0"
    mem_size: int = 256 << 20
    vcpus: int = 1
    serial_out: BinaryIO | int | None = None  # None: the VMM's stdout
    serial_in: BinaryIO | int | None = None  # None: no console input
    prefault_memory: bool = False  # MAP_POPULATE guest RAM: slower start, faster first touch
    disks: list[DiskConfig] = field(default_factory=list)  # virtio-blk vda, vdb, ... in this order
    nets: list[NetConfig] = field(default_factory=list)  # virtio-net eth0, eth1, ... after the disks


def _check_nets(nets: Sequence[NetConfig]) -> None:
    """Before anything is opened: MACs well-formed, no tap or MAC given twice."""
    taps = [net.tap for net in nets]
    for tap in taps:
        if taps.count(tap) > 1:
            raise NetConfigError(f"tap {tap} is given to two network devices: give each its own tap")
    macs = [parse_mac(net.mac) for net in nets if net.mac is not None]
    for mac in macs:
        if macs.count(mac) > 1:
            raise NetConfigError(f"MAC {format_mac(mac)} is given to two network devices: give each its own MAC "
                                 f"(or leave mac= out for a random one)")


def _open_tap(stack: ExitStack, net: NetConfig, missing_hint: str) -> Tap:
    tap = Tap.open(net.tap, net.create, missing_hint)
    stack.callback(tap.close)
    if tap.created:
        log.warning("created tap %s (up, no address); it goes away when this VM exits", tap.name)
    return tap


def _host_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _check_vcpus(kvm: Kvm, vcpus: int) -> None:
    max_vcpus = kvm.check_extension(b.KVM_CAP_NR_VCPUS) or 4
    if not 1 <= vcpus <= max_vcpus:
        raise VmConfigError(
            f"{vcpus} vCPUs requested; this host's KVM supports 1 to {max_vcpus} per VM: ask for that many (--vcpus)"
        )


def _check_memory(mem_size: int) -> None:
    if mem_size < MIN_MEM_SIZE or mem_size % PAGE_SIZE:
        raise VmConfigError(f"memory size {mem_size} bytes is not usable: it must be at least 2 MiB and a multiple of 4 KiB")
    if mem_size > _host_memory():
        raise VmConfigError(
            f"memory size {mem_size >> 20} MiB is more than this host's {_host_memory() >> 20} MiB of RAM"
        )


class _Parts:
    """Everything a VM is made of, created in dependency order; on failure the
    ExitStack closes what was already opened."""

    def __init__(
        self,
        stack: ExitStack,
        vcpu_count: int,
        mem_size: int,
        serial_out: BinaryIO | int | None,
        serial_in: BinaryIO | int | None,
        backing: Mapping[str, FileBacking] | None = None,
        prefault: bool = False,
        disks: Sequence[DiskConfig] = (),
        nets: Sequence[NetConfig] = (),
        announce: bool = False,
        missing_tap_hint: str = "",
    ) -> None:
        _check_memory(mem_size)
        if len(disks) + len(nets) > MAX_VIRTIO_DEVICES:
            raise VmConfigError(f"{len(disks)} disks and {len(nets)} network devices requested; a VM can have "
                                f"at most {MAX_VIRTIO_DEVICES} together")
        for disk in disks:
            check_disk_image(disk)
        _check_nets(nets)
        # Taps before KVM: a bad tap is an operator's mistake, told before anything is made.
        taps = [_open_tap(stack, net, missing_tap_hint) for net in nets]
        self.kvm = Kvm.open()
        stack.callback(self.kvm.close)
        _check_vcpus(self.kvm, vcpu_count)
        self.vm_fd = self.kvm.create_vm()
        stack.callback(self.vm_fd.close)
        self.vm_fd.set_tss_addr(KVM_TSS_ADDRESS)
        self.irqchip = Irqchip.create(self.vm_fd)
        self.memory = GuestMemory.create(self.vm_fd, mem_size, backing, prefault)
        stack.callback(self.memory.close)

        self.pio_bus = PioBus()
        self.mmio_bus = MmioBus()
        self.vm: Vm | None = None
        output = SerialOutput(sys.stdout.fileno() if serial_out is None else serial_out)
        self.serial = Serial(output, lambda level: self.irqchip.set_irq_line(COM1_IRQ, level))
        self.power = PowerOffPort(lambda code: self._exit(ExitStatus(code, "poweroff", f"the guest powered off with status {code}")))
        self.i8042 = I8042(
            lambda: self._exit(ExitStatus(0, "reset", "the guest reset the machine through the i8042")), self._pulse_irq
        )
        self.pio_bus.register(COM1_PORT, PORT_COUNT, self.serial)
        self.pio_bus.register(POWER_OFF_PORT, 1, self.power)
        self.acpi_sleep = AcpiSleepRegisters(lambda: self._exit(ExitStatus(0, "poweroff", "the guest powered off (ACPI S5)")))
        self.pio_bus.register(DATA_PORT, I8042_PORT_RANGE, self.i8042)
        self.pio_bus.register(SLEEP_CONTROL_PORT, SLEEP_PORT_COUNT, self.acpi_sleep)
        self.rtc = CmosRtc()
        self.pio_bus.register(RTC_PORT, RTC_PORT_COUNT, self.rtc)
        self.devices = {
            "serial": self.serial,
            "power": self.power,
            "i8042": self.i8042,
            "acpi_sleep": self.acpi_sleep,
            "rtc": self.rtc,
        }
        self.disk_names: list[str] = []
        self.mmio_devices: list[MmioDevice] = []  # for the ACPI DSDT
        for index, disk in enumerate(disks):
            self._attach_disk(stack, index, disk)
        self.nets: list[dict] = []  # as the VM's config records them
        for index, (net, tap) in enumerate(zip(nets, taps)):
            self._attach_net(stack, len(disks) + index, f"eth{index}", net, tap, announce)
        self.serial_input = SerialInputPump(serial_in, self.serial) if serial_in is not None else None

        supported_msrs = self.kvm.get_msr_index_list()
        xsave_size = self.kvm.check_extension(b.KVM_CAP_XSAVE2)
        run_size = self.kvm.get_vcpu_mmap_size()
        self.supported_cpuid = self.kvm.get_supported_cpuid()
        self.vcpus: list[Vcpu] = []
        for index in range(vcpu_count):
            fd = self.vm_fd.create_vcpu(index, run_size)
            stack.callback(fd.close)
            if index == 0:
                supported_msrs = _msrs_readable(fd, supported_msrs)
            self.vcpus.append(Vcpu(index, fd, self.pio_bus, self.mmio_bus, supported_msrs, xsave_size))

    def _attach_disk(self, stack: ExitStack, index: int, disk: DiskConfig) -> None:
        name = "vd" + chr(ord("a") + index)
        image = BlockFile(disk.path, disk.readonly)
        stack.callback(image.close)
        base, irq = mmio_window(index)
        transport = VirtioMmioTransport(VirtioBlock(name, image), self.memory, lambda: self._pulse_irq(irq))
        self.mmio_bus.register(base, MMIO_WINDOW, transport)
        self.mmio_devices.append(MmioDevice(base, MMIO_WINDOW, irq))
        self.devices[f"virtio-blk-{name}"] = transport
        self.disk_names.append(name)

    def _attach_net(self, stack: ExitStack, index: int, name: str, net: NetConfig, tap: Tap, announce: bool) -> None:
        mac = net.mac or random_mac()
        base, irq = mmio_window(index)
        device = VirtioNet(name, tap, parse_mac(mac), announce_on_restore=announce)
        stack.callback(device.close)
        transport = VirtioMmioTransport(device, self.memory, lambda: self._pulse_irq(irq))
        self.mmio_bus.register(base, MMIO_WINDOW, transport)
        self.mmio_devices.append(MmioDevice(base, MMIO_WINDOW, irq))
        self.devices[f"virtio-net-{name}"] = transport
        self.nets.append({"name": name, "tap": net.tap, "mac": mac})

    def _pulse_irq(self, irq: int) -> None:
        # An edge, as an irqfd would give: the driver learns the cause from InterruptStatus.
        self.irqchip.set_irq_line(irq, 1)
        self.irqchip.set_irq_line(irq, 0)

    def _exit(self, status: ExitStatus) -> None:
        assert self.vm is not None
        self.vm.request_exit(status)

    def assemble(self, config: dict) -> Vm:
        self.vm = Vm(
            kvm=self.kvm,
            vm_fd=self.vm_fd,
            memory=self.memory,
            irqchip=self.irqchip,
            vcpus=self.vcpus,
            serial=self.serial,
            pio_bus=self.pio_bus,
            mmio_bus=self.mmio_bus,
            devices=self.devices,
            config=config,
            serial_input=self.serial_input,
        )
        return self.vm


def _msrs_readable(vcpu_fd: VcpuFd, indices: list[int]) -> list[int]:
    """The subset of KVM_GET_MSR_INDEX_LIST that KVM_GET_MSRS accepts here
    (the kernel stops at the first one it refuses)."""
    remaining = list(indices)
    while True:
        msrs = ffi.new("struct kvm_msrs *", {"nmsrs": len(remaining), "entries": len(remaining)})
        for i, index in enumerate(remaining):
            msrs.entries[i].index = index
        read = vcpu_fd.get_msrs(msrs)
        if read == len(remaining):
            return remaining
        del remaining[read]


def build_microvm_for_boot(cfg: VmConfig) -> Vm:
    """A VM with the kernel loaded and every vCPU at its reset/entry state; not started.
    Bad input (kernel, initrd, memory size, disks, vCPU count) is refused before
    any VM exists."""
    # Kernels built with CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES and the test guest find
    # disks and NICs here; other kernels find them in the ACPI DSDT.
    devices = len(cfg.disks) + len(cfg.nets)
    cmdline = " ".join([cfg.cmdline] + [kernel_cmdline_option(i) for i in range(devices)])
    initrd = Path(cfg.initrd) if cfg.initrd else None
    _check_memory(cfg.mem_size)
    image = check_boot_files(Path(cfg.kernel), initrd, cmdline, cfg.mem_size)
    with ExitStack() as stack:
        parts = _Parts(
            stack, cfg.vcpus, cfg.mem_size, cfg.serial_out, cfg.serial_in, prefault=cfg.prefault_memory,
            disks=cfg.disks, nets=cfg.nets,
        )
        boot = load_kernel(
            parts.memory,
            Path(cfg.kernel),
            initrd,
            cmdline,
            cfg.vcpus,
            parts.mmio_devices,
            image=image,
        )
        for vcpu in parts.vcpus:
            enters = vcpu.index == 0 or boot.all_vcpus_at_entry
            vcpu.configure_for_boot(parts.supported_cpuid, boot.entry if enters else None)
        vm = parts.assemble(
            {
                "vcpus": cfg.vcpus,
                "mem_size": cfg.mem_size,
                "cmdline": cfg.cmdline,
                "kernel": str(cfg.kernel),
                "initrd": str(cfg.initrd) if cfg.initrd else None,
                "disks": [
                    {"name": name, "path": str(disk.path), "readonly": disk.readonly}
                    for name, disk in zip(parts.disk_names, cfg.disks)
                ],
                "nets": parts.nets,
            }
        )
        stack.pop_all()
        return vm


def _disk_configs(config: dict, disk_paths: Mapping[str, Path] | None) -> list[DiskConfig]:
    return [
        DiskConfig(Path((disk_paths or {}).get(disk["name"], disk["path"])), disk["readonly"])
        for disk in config.get("disks", [])
    ]


def _net_configs(config: dict, options: NetRestoreOptions) -> list[NetConfig]:
    """The saved network devices, each on its tap or the one `options` puts in its place."""
    saved = [net["tap"] for net in config.get("nets", [])]
    unknown = sorted(set(options.taps) - set(saved))
    if unknown:
        raise NetConfigError(f"--net-override names tap {', '.join(unknown)}, which the VM does not use "
                             f"(its taps: {', '.join(saved) or 'none'})")
    return [NetConfig(options.taps.get(net["tap"], net["tap"]), net["mac"]) for net in config.get("nets", [])]


def check_net_restore(config: dict, net: NetRestoreOptions | None) -> None:
    """Before a restore writes anything: every override names a tap of the VM, and
    every tap the restored VM will use exists here."""
    for nic in _net_configs(config, net or NetRestoreOptions()):
        require_tap(nic.tap, missing_hint=_missing_tap_hint(config))


def _missing_tap_hint(config: dict) -> str:
    taps = [net["tap"] for net in config.get("nets", [])]
    return f"or attach the VM to another tap (--net-override {taps[0] if taps else 'OLD'}=NEWTAP)"


def _shape(config: dict) -> tuple:
    """What parts a VM with `config` is made of (not where its files are)."""
    return (config["vcpus"], config["mem_size"], [(d["name"], d["readonly"]) for d in config.get("disks", [])],
            [net["mac"] for net in config.get("nets", [])])


class PreparedMicrovm:
    """The parts of a VM with `config` (KVM VM, vCPUs, guest RAM, devices, disks
    from `disk_paths`), created before its state is known. A live-migration
    receiver makes them while pages arrive and writes RAM through `memory`; then
    `build_microvm_from_state(state, prepared=...)` only restores state, which
    keeps creating the VM out of the guest's downtime. `close()` if unused."""

    def __init__(
        self,
        config: dict,
        serial_out: BinaryIO | int | None = None,
        serial_in: BinaryIO | int | None = None,
        disk_paths: Mapping[str, Path] | None = None,
        net: NetRestoreOptions | None = None,
    ) -> None:
        self.config = config
        self.disks = _disk_configs(config, disk_paths)
        net = net or NetRestoreOptions()
        self.nets = _net_configs(config, net)
        self.stack = ExitStack()
        try:
            self.parts = _Parts(self.stack, config["vcpus"], config["mem_size"], serial_out, serial_in, disks=self.disks,
                                nets=self.nets, announce=net.announce, missing_tap_hint=_missing_tap_hint(config))
        except BaseException:
            self.stack.close()
            raise

    @property
    def memory(self) -> GuestMemory:
        return self.parts.memory

    def close(self) -> None:
        self.stack.close()


def build_microvm_from_state(
    state: dict,
    serial_out: BinaryIO | int | None = None,
    serial_in: BinaryIO | int | None = None,
    memory_fill: Callable[[GuestMemory], None] | None = None,
    memory_backing: Mapping[str, FileBacking] | None = None,
    disk_paths: Mapping[str, Path] | None = None,
    prepared: "PreparedMicrovm | None" = None,
    net: NetRestoreOptions | None = None,
) -> Vm:
    """A paused-equivalent VM (not started) with the same layout as `state`,
    guest RAM filled by `memory_fill` (or mapped from `memory_backing`), each
    disk attached from `disk_paths[name]` (default: the path it had), each
    network device to its tap or the one `net.taps` names instead, and every
    part restored; `vm.start()` continues where the guest was. With
    `prepared`, its parts (and guest RAM as already filled) are used instead of
    new ones, and the serial, backing, disk and net arguments are not used."""
    state = upgraded("VM", state, STATE_VERSION)
    config = state["config"]
    with ExitStack() as stack:
        if prepared is not None:
            if _shape(prepared.config) != _shape(config):
                raise VmStateError(
                    f"the prepared VM {_shape(prepared.config)} does not fit the saved state {_shape(config)}"
                )
            stack.push(prepared.stack)  # closed with the rest if restoring fails
            parts, disks, nets = prepared.parts, prepared.disks, prepared.nets
        else:
            disks = _disk_configs(config, disk_paths)
            net = net or NetRestoreOptions()
            nets = _net_configs(config, net)
            parts = _Parts(
                stack, config["vcpus"], config["mem_size"], serial_out, serial_in, backing=memory_backing, disks=disks,
                nets=nets, announce=net.announce, missing_tap_hint=_missing_tap_hint(config),
            )
        memory_state = upgraded("guest memory", state["memory"], MEMORY_STATE_VERSION)
        saved_layout = [(r["name"], r["gpa"], r["size"]) for r in memory_state["regions"]]
        layout = [(r.name, r.gpa, r.size) for r in parts.memory.regions]
        if saved_layout != layout:
            raise VmStateError(f"saved memory layout {saved_layout} does not match the rebuilt one {layout}")
        if memory_fill is not None:
            memory_fill(parts.memory)
        parts.irqchip.restore(state["irqchip"])
        for vcpu, vcpu_state in zip(parts.vcpus, state["vcpus"], strict=True):
            vcpu.restore(vcpu_state)
        for name, device in parts.devices.items():
            if name not in state["devices"]:
                if name in DEVICES_ADDED_LATER:
                    continue
                raise VmStateError(f"the saved state has no {name} device")
            try:
                device.restore(state["devices"][name])
            except ValueError as exc:
                raise VmStateError(str(exc)) from None
        config = dict(config)
        config["disks"] = [{**saved, "path": str(disk.path)} for saved, disk in zip(config.get("disks", []), disks)]
        config["nets"] = [{**saved, "tap": nic.tap} for saved, nic in zip(config.get("nets", []), nets)]
        vm = parts.assemble(config)
        stack.pop_all()
        return vm
