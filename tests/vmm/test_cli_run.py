"""`snapvisor run` as a user runs it: through a subprocess, checking the exit
status, the console on stdout, and that bad input gives one clear line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from flat_guest import echo_one_byte_and_power_off, elf_image, power_off, print_text


def snapvisor(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "snapvisor", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def assert_clean_error(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert message in result.stderr, result.stderr


def test_help_explains_every_flag() -> None:
    result = snapvisor("run", "--help")
    assert result.returncode == 0
    for flag in ("--kernel", "--initrd", "--cmdline", "--mem", "--vcpus"):
        assert flag in result.stdout
    assert "0x501" in result.stdout  # how the exit status comes about


def test_top_level_help_lists_run() -> None:
    result = snapvisor("--help")
    assert result.returncode == 0 and "run" in result.stdout


@pytest.mark.kvm
@pytest.mark.parametrize("vcpus", ["1", "2"])
def test_run_boots_the_test_guest_with_its_console_on_stdout(testguest: Path, vcpus: str) -> None:
    result = snapvisor(
        "run", "--kernel", str(testguest), "--mem", "64M", "--vcpus", vcpus,
        "--cmdline", f"console=ttyS0 tg.mem=4 tg.rounds=1 tg.cpus={vcpus} tg.exit=17",
    )
    assert result.returncode == 17, result.stderr
    assert result.stdout.startswith(f"tg: snapvisor-testguest 1 cpus={vcpus} mem=4")
    assert result.stdout.endswith("tg: done\n")
    assert result.stderr == ""


@pytest.mark.kvm
def test_guest_errors_exit_non_zero_with_the_reason(tmp_path: Path) -> None:
    kernel = tmp_path / "k.elf"
    kernel.write_bytes(elf_image(print_text(b"x") + b"\x0f\x0b"))  # ud2 with no IDT: triple fault
    result = snapvisor("run", "--kernel", str(kernel), "--mem", "16M")
    assert result.returncode == 0 and result.stdout == "x"
    assert "triple-faulted" in result.stderr


@pytest.mark.kvm
def test_interactive_terminal_input_goes_to_the_guest(tmp_path: Path) -> None:
    kernel = tmp_path / "echo.elf"
    kernel.write_bytes(elf_image(echo_one_byte_and_power_off()))
    controller, terminal = os.openpty()
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "snapvisor", "run", "--kernel", str(kernel), "--mem", "16M"],
            stdin=terminal, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        os.write(controller, b"Z")  # typed without Enter: the terminal is not line-buffered
        stdout, stderr = process.communicate(timeout=30)
    finally:
        os.close(controller)
        os.close(terminal)
    assert process.returncode == ord("Z"), stderr
    assert stdout == b"Z"


@pytest.mark.kvm
@pytest.mark.parametrize(
    "args,message",
    [
        (["--kernel", "/nonexistent/vmlinux"], "error: kernel /nonexistent/vmlinux does not exist"),
        (["--kernel", "/etc/hostname"], "not an ELF64 kernel or a bzImage"),
        (["--kernel", "{truncated}"], "truncated ELF header"),
        (["--kernel", "{tiny}", "--initrd", "/nonexistent/initrd"], "error: initrd /nonexistent/initrd does not exist"),
        (["--kernel", "{tiny}", "--mem", "1M"], "must be at least 2 MiB"),
        (["--kernel", "{tiny}", "--mem", "100T"], "more than this host's"),
        (["--kernel", "{tiny}", "--vcpus", "64"], "64 vCPUs requested"),
        (["--kernel", "{tiny}", "--mem", "lots"], "'lots' is not a size"),
        (["--kernel", "{tiny}", "--vcpus", "0"], "'0' must be at least 1"),
        (["--kernel", "{tiny}", "--cmdline", "x" * 5000], "the kernel command line is 5000 bytes"),
    ],
    ids=["missing", "not-a-kernel", "truncated-elf", "missing-initrd", "mem-too-small", "mem-too-big",
         "too-many-vcpus", "bad-size", "zero-vcpus", "cmdline-too-long"],
)
def test_bad_input_gives_a_clear_error(tmp_path: Path, args: list[str], message: str) -> None:
    tiny = tmp_path / "tiny.elf"
    tiny.write_bytes(elf_image(power_off(0)))
    truncated = tmp_path / "truncated.elf"
    truncated.write_bytes(elf_image(power_off(0))[:40])
    args = [a.format(tiny=tiny, truncated=truncated) for a in args]
    assert_clean_error(snapvisor("run", *args), message)
