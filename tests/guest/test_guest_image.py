"""The built image: ring-0 code the PVM emulator can run, ring 3 kept apart,
and the headers both loaders need (snapvisor's ELF note, QEMU's Multiboot)."""

import struct

import pytest

from _guest_elf import PT_LOAD, PT_NOTE, forbidden_in_ring0, guest_elf, guest_elf_path  # noqa: F401 (fixtures)

MB_MAGIC = 0x1BADB002


def test_is_x86_64_elf_entering_at_start64(guest_elf):
    assert guest_elf.elf_class == 2 and guest_elf.machine == 62
    assert guest_elf.entry == guest_elf.symbols()["start64"]


@pytest.mark.parametrize(
    "mnemonic,operands,bad",
    [
        ("popcnt", "%rax,%rdx", True),
        ("tzcntq", "%rax,%rdx", True),
        ("cmpxchg16b", "(%rdi)", True),
        ("int3", "", True),
        ("int", "$0x80", True),
        ("movq", "%xmm0,%rax", True),
        ("fldz", "", True),
        ("xsaveopt", "(%rdi)", True),
        ("mov", "%rax,%rdx", False),
        ("lock", "", False),
        ("iretq", "", False),
        ("xchg", "%eax,(%rdx)", False),
    ],
)
def test_forbidden_instruction_classifier(mnemonic, operands, bad):
    assert forbidden_in_ring0(mnemonic, operands) is bad


def test_ring0_code_avoids_instructions_pvm_cannot_emulate(guest_elf):
    # .text is the 64-bit kernel; .boot32 the 32-bit Multiboot
    # entry (QEMU only), decoded as i386 code.
    for section, arch in ((".text", "i386:x86-64"), (".boot32", "i386")):
        insns = guest_elf.disassemble(section, arch)
        assert len(insns) > 20, f"{section} disassembled to almost nothing"
        bad = [f"{a:#x}: {m} {o}" for a, m, o in insns if forbidden_in_ring0(m, o)]
        assert not bad, f"instructions PVM's ring-0 emulator rejects in {section}: {bad}"


def test_ring3_code_only_calls_ring3_code(guest_elf):
    text = guest_elf.sections[".user.text"]
    insns = guest_elf.disassemble(".user.text")
    targets = [
        int(o.split()[0], 16)
        for _a, m, o in insns
        if (m.startswith(("call", "j"))) and not o.startswith("*")
    ]
    assert targets, "no branches found in the workload"
    outside = [hex(t) for t in targets if not text.addr <= t < text.addr + text.size]
    assert not outside, f"ring-3 code branches into supervisor pages: {outside}"
    assert not any(m.startswith("call") and o.startswith("*") for _a, m, o in insns)


def test_user_sections_are_page_aligned_and_apart_from_kernel_sections(guest_elf):
    syms = guest_elf.symbols()
    start, end = syms["__user_start"], syms["__user_end"]
    assert start % 4096 == 0 and end % 4096 == 0
    for name, sec in guest_elf.sections.items():
        if not sec.addr:
            continue
        inside = start <= sec.addr < end
        assert inside == name.startswith(".user."), f"{name} at {sec.addr:#x}"


def test_multiboot_header_with_address_fields_in_first_8k(guest_elf):
    data = guest_elf.data
    offsets = [
        off
        for off in range(0, min(len(data), 8192) - 12, 4)
        if struct.unpack_from("<I", data, off)[0] == MB_MAGIC
        and sum(struct.unpack_from("<III", data, off)) & 0xFFFFFFFF == 0
    ]
    assert len(offsets) == 1, "no Multiboot header (with a valid checksum) in the first 8 KiB"
    off = offsets[0]
    _magic, flags, _ck, header, load, load_end, bss_end, entry = struct.unpack_from("<8I", data, off)
    assert flags & (1 << 16), "flag bit 16 (address fields) not set: QEMU rejects 64-bit ELF"
    (seg,) = [s for s in guest_elf.segments if s.type == PT_LOAD]
    # QEMU reads the file from (header offset - (header_addr - load_addr)).
    assert off - (header - load) == seg.offset and load == seg.paddr
    assert load_end == seg.paddr + seg.filesz
    assert bss_end == seg.paddr + seg.memsz
    assert entry == guest_elf.symbols()["mb_entry32"]


def test_snapvisor_note_asks_for_64bit_start_on_every_cpu(guest_elf):
    notes = [s for s in guest_elf.segments if s.type == PT_NOTE]
    assert notes, "no PT_NOTE segment"
    found = []
    for seg in notes:
        blob = guest_elf.data[seg.offset : seg.offset + seg.filesz]
        pos = 0
        while pos + 12 <= len(blob):
            namesz, descsz, ntype = struct.unpack_from("<III", blob, pos)
            name = blob[pos + 12 : pos + 12 + namesz].rstrip(b"\0")
            found.append((name, ntype))
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    assert (b"snapvisor", 1) in found
