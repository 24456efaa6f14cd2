import pytest

from snapvisor import testguest


@pytest.fixture(scope="session")
def guest_elf_path():
    return testguest.build()


@pytest.fixture(scope="session")
def guest_elf(guest_elf_path):
    from _guest_elf import GuestElf

    return GuestElf(guest_elf_path)
